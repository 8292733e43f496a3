"""A property of every edit, on random small models: the reported ``success`` agrees with an
independent forward of the edited model (``argmax == target``), and ``revert()`` is bit-exact.

Models are random stacks of convolutions, linear layers, normalisations and activations, in float32,
float64 or bfloat16, in contiguous or channels_last memory format; the editable parameters, the
editor and the target are random too. The examples are derandomised (the same ones every run)."""
import pytest
import torch
from helpers import assert_identical, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastedit as fe

pytestmark = pytest.mark.usefixtures("one_thread")

NORMS = {
    "batch": lambda c: nn.BatchNorm2d(c),
    "group": lambda c: nn.GroupNorm(2, c),
    "none": lambda c: nn.Identity(),
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
EDITORS = {
    "gd": lambda: fe.GD(0.5), "scaled_gd": lambda: fe.ScaledGD(1.0), "rprop": lambda: fe.RProp(0.05),
    "rmsprop": lambda: fe.RMSProp(0.05), "momentum": lambda: fe.Momentum(0.2), "adam": lambda: fe.Adam(0.05),
}
CLASSES = 5


def build(spec: dict) -> tuple[nn.Module, torch.Tensor]:
    """A model and an input batch from a drawn specification."""
    torch.manual_seed(spec["seed"])
    layers, c = [], 3
    for width, norm, act in spec["blocks"]:
        layers += [nn.Conv2d(c, width, 3, padding=1), NORMS[norm](width), ACTIVATIONS[act]()]
        c = width
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    features = c * 4
    for hidden, act in spec["dense"]:
        layers += [nn.Linear(features, hidden), ACTIVATIONS[act]()]
        features = hidden
    layers.append(nn.Linear(features, CLASSES))
    model = nn.Sequential(*layers)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[spec["dtype"]]
    model = model.to(dtype)
    x = torch.randn(spec["batch"], 3, 6, 6).to(dtype)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # BatchNorm statistics of their own
        model.train()
        model(torch.randn(16, 3, 6, 6).to(dtype))
    return model.eval(), x


def specs():
    block = st.tuples(st.sampled_from([4, 6]), st.sampled_from(list(NORMS)), st.sampled_from(list(ACTIVATIONS)))
    dense = st.tuples(st.sampled_from([5, 8]), st.sampled_from(list(ACTIVATIONS)))
    return st.fixed_dictionaries({
        "seed": st.integers(0, 10_000),
        "blocks": st.lists(block, min_size=1, max_size=3),
        "dense": st.lists(dense, min_size=0, max_size=2),
        "dtype": st.sampled_from(["fp32", "fp64", "bf16"]),
        "channels_last": st.booleans(),
        "batch": st.integers(1, 2),
        "editor": st.sampled_from(list(EDITORS)),
        "selection": st.integers(0, 2**16),
        "target_shift": st.integers(1, CLASSES - 1),
        "reduction": st.sampled_from(["max", "mean"]),
    })


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_success_agrees_with_an_independent_forward_and_revert_is_exact(spec):
    model, x = build(spec)
    names = [n for n, _ in model.named_parameters()]
    # a random non-empty subset of the parameter tensors
    chosen = [n for i, n in enumerate(names) if spec["selection"] >> (i % 16) & 1] or [names[-1]]
    if spec["channels_last"] and any(isinstance(model.get_submodule(n.rpartition(".")[0]), nn.GroupNorm)
                                     for n in chosen):
        # torch (2.11, 2.13) CPU bug: channels_last GroupNorm backward with the weight requiring grad and
        # the input not (a frozen prefix ends there) segfaults in GroupNormBackwardKernelImplChannelsLast;
        # editing the first convolution too makes every later input require grad
        chosen = sorted(set(chosen) | {names[0]}, key=names.index)
    with torch.no_grad():
        target = (model(x).argmax(-1) + spec["target_shift"]) % CLASSES
    before = snapshot(model)
    strides = {n: p.stride() for n, p in model.named_parameters()}
    r = fe.edit(model, x, target, editor=EDITORS[spec["editor"]](), params=chosen, max_steps=8,
                reduction=spec["reduction"], on_failure="keep")
    with torch.no_grad():
        agrees = model(x).argmax(-1) == target
    if spec["reduction"] == "max":
        assert r.success == bool(agrees.all()), (r, agrees)
    elif r.success:  # "mean": satisfied on average, so some row may still disagree; a failure says nothing
        assert r.loss <= 0
    assert {n: p.stride() for n, p in model.named_parameters()} == strides  # memory format kept
    r.revert()
    assert_identical(model, before)
