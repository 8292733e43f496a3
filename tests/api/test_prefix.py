"""Tests of the frozen-prefix split (fastedit.prefix).

Every model here is defined in this file. Each split is checked for: exact outputs, parameter
names, functional_call with perturbed editable parameters, torch.func.grad against autograd of the
full model (float64), vmap over stacked parameter sets against a loop, and visibility of in-place
parameter changes. ``python tests/api/test_prefix.py`` prints suffix-vs-full timings.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fastedit.prefix import PrefixSplit, split_prefix

# --------------------------------------------------------------------------------------------------
# test models


class ShortcutA(nn.Module):
    """Option-A shortcut: parameter-free subsampling and zero channel padding."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, inp: int, planes: int, stride: int = 1, inplace_relu: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.shortcut = ShortcutA(planes) if stride != 1 or inp != planes else nn.Sequential()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, option A): 3 stages, global pooling, linear head."""

    def __init__(self, blocks: int = 1, width: int = 8, classes: int = 10, inplace_relu: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, inp = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(inp, planes, stride, inplace_relu))
                inp = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(inp, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class DownsampleBlock(nn.Module):
    """ImageNet-ResNet style block: in-place ReLU, `out += identity`, conv+BN downsample."""

    def __init__(self, inp: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SmallImageNetResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.layer1 = DownsampleBlock(8, 8, 1)
        self.layer2 = DownsampleBlock(8, 16, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class SkipAcross(nn.Module):
    """The editable layer's input is used again after it (skip connection over the boundary)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.edit = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        y = torch.sigmoid(self.edit(h))
        return self.b(y * h + h)


class DataDependent(nn.Module):
    """Data-dependent branch: not symbolically traceable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * self.scale
        else:
            h = -h
        return self.b(torch.tanh(h))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fx = nn.Linear(4, 6)
        self.fz = nn.Linear(3, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x, z):
        h = torch.relu(self.fx(x)) * torch.tanh(self.fz(z))
        return self.head(torch.relu(self.mix(h)) + self.fz(z))


class Shared(nn.Module):
    """The same Linear is applied twice."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(5, 5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        h = torch.tanh(self.fc(h))
        h = torch.tanh(self.fc(h))
        return self.head(h)


class Tied(nn.Module):
    """Two modules share one Parameter object (tied weights)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.mid = nn.Linear(5, 5)
        self.dec = nn.Linear(5, 5)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(torch.tanh(self.enc(x)))))


class Aliased(Shared):
    """The same submodule registered under two names (``alias`` is ``fc``)."""

    def __init__(self):
        super().__init__()
        self.alias = self.fc

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        h = torch.tanh(self.fc(h))
        h = torch.tanh(self.alias(h))
        return self.head(h)


class Functional(nn.Module):
    """Root parameters used functionally, a non-tensor frontier value, a non-dependent output."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.w2 = nn.Parameter(torch.randn(12, 6))
        self.b2 = nn.Parameter(torch.randn(3))
        self.register_buffer("shift", torch.randn(6))

    def forward(self, x):
        n = x.size(0)
        h = torch.tanh(F.linear(x, self.w1) + self.shift)  # [n, 6]
        z = F.linear(h, self.w2).view(n, 3, 4)
        return z.mean(-1) + self.b2, h


# --------------------------------------------------------------------------------------------------
# the generic check


def _perturb(model: nn.Module, names, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        p = model.get_parameter(n).detach()
        out[n] = p + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return out


def _leaves(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert torch.equal(x, y), (x - y).abs().max()


def _assert_close(a, b, tol):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=0, atol=tol)


def check_split(
    model: nn.Module, editable, inputs: tuple, *, traced: bool = True, vmappable: bool = True
) -> PrefixSplit:
    model = model.double().eval()
    inputs = tuple(i.double() for i in inputs)
    editable = list(editable)
    split = split_prefix(model, editable)
    assert split.traced is traced, split.reason
    assert (split.reason is None) == traced

    # exact outputs, with the prefix under no_grad as callers do
    with torch.no_grad():
        ref = model(*inputs)
        _assert_equal(split(*inputs), ref)
        acts = split.prefix(*inputs)
        assert isinstance(acts, tuple)
        _assert_equal(split.suffix(acts), ref)
        _assert_equal(split.suffix(acts), ref)  # acts are not consumed/mutated

    # names: a subset of the model's, every editable name present
    model_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    suffix_params = dict(split.suffix_module.named_parameters(remove_duplicate=False))
    assert set(suffix_params) <= model_names
    for n in editable:
        assert suffix_params[n] is model.get_parameter(n)

    # functional_call with perturbed editable parameters
    pert = _perturb(model, editable, seed=1)
    with torch.no_grad():
        _assert_close(
            functional_call(split.suffix_module, pert, (acts,)), functional_call(model, pert, inputs), 1e-12
        )

    # torch.func.grad through the suffix == autograd through the full model
    weights = [torch.randn_like(o) for o in _leaves(ref)]

    def loss_of(out):
        return sum((o * w).sum() for o, w in zip(_leaves(out), weights))

    g_func = grad(lambda p: loss_of(functional_call(split.suffix_module, p, (acts,))))(pert)
    leaf = {n: t.clone().requires_grad_(True) for n, t in pert.items()}
    full_loss = loss_of(functional_call(model, leaf, inputs))
    if full_loss.requires_grad:
        g_auto = torch.autograd.grad(full_loss, list(leaf.values()), allow_unused=True)
    else:
        g_auto = [None] * len(leaf)
    for (n, gf), ga in zip(g_func.items(), g_auto):
        torch.testing.assert_close(gf, torch.zeros_like(gf) if ga is None else ga, rtol=0, atol=1e-12)
    # plain autograd through the suffix as well
    s_loss = loss_of(functional_call(split.suffix_module, leaf, (acts,)))
    g_sfx = torch.autograd.grad(s_loss, list(leaf.values()), allow_unused=True)
    for gs, ga in zip(g_sfx, g_auto):
        if ga is not None:
            torch.testing.assert_close(gs, ga, rtol=0, atol=1e-12)

    # vmap over 3 stacked parameter sets, acts shared (skipped for models that vmap cannot run)
    sets = [_perturb(model, editable, seed=10 + i) for i in range(3)]
    stacked = {n: torch.stack([s[n] for s in sets]) for n in editable}
    if vmappable:
        batched = vmap(
            lambda p, a: functional_call(split.suffix_module, p, (a,)), in_dims=(0, None)
        )(stacked, acts)
        with torch.no_grad():
            loop = [functional_call(model, s, inputs) for s in sets]
        for k, out_k in enumerate(_leaves(batched)):
            torch.testing.assert_close(
                out_k, torch.stack([_leaves(o)[k] for o in loop]), rtol=0, atol=1e-10
            )

    # in-place parameter changes are seen by the split (suffix and prefix parameters)
    changed = [model.get_parameter(editable[0])]
    changed += [p for n, p in model.named_parameters() if n not in editable][:1]
    saved = [p.detach().clone() for p in changed]
    with torch.no_grad():
        for p in changed:
            p.add_(0.25)
        new_ref = model(*inputs)
        assert not torch.equal(_leaves(new_ref)[0], _leaves(ref)[0])
        _assert_equal(split(*inputs), new_ref)
        for p, s in zip(changed, saved):
            p.copy_(s)
        _assert_equal(split(*inputs), ref)
    return split


def _bn_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model


def _names(model: nn.Module, prefix: str = "") -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


# --------------------------------------------------------------------------------------------------
# tests


@pytest.fixture
def resnet():
    return _bn_stats(CifarResNet(blocks=2, width=8))


X_IMG = (torch.randn(4, 3, 16, 16),)


def test_resnet_last_stage(resnet):
    split = check_split(resnet, _names(resnet, "layer3"), X_IMG)
    assert split.num_prefix_nodes > split.num_suffix_nodes > 0
    # layer2's output, and the parameter-free option-A shortcut of layer3.0 (computed once)
    assert len(split.frontier) == 2
    names = [n for n, _ in split.suffix_module.named_parameters()]
    assert not any(n.startswith(("layer1", "layer2", "conv1")) for n in names)


def test_resnet_middle_stage(resnet):
    split = check_split(resnet, _names(resnet, "layer2"), X_IMG)
    names = {n for n, _ in split.suffix_module.named_parameters()}
    assert names >= set(_names(resnet, "layer3")) | set(_names(resnet, "linear"))
    assert not names & set(_names(resnet, "layer1"))


def test_resnet_single_conv_in_block(resnet):
    # only conv2 of the first block of layer2: its input and the block's shortcut cross the boundary
    split = check_split(resnet, ["layer2.0.conv2.weight"], X_IMG)
    assert len(split.frontier) == 2


def test_resnet_bn_affine_only(resnet):
    check_split(resnet, ["layer3.1.bn1.weight", "layer3.1.bn1.bias"], X_IMG)


def test_resnet_first_layer(resnet):
    split = check_split(resnet, ["conv1.weight"], X_IMG)
    assert split.num_prefix_nodes == 0
    x = X_IMG[0].double()
    acts = split.prefix(x)
    assert len(acts) == 1 and acts[0] is x


def test_resnet_last_layer(resnet):
    split = check_split(resnet, ["linear.weight", "linear.bias"], X_IMG)
    assert split.num_suffix_nodes == 1
    assert {n for n, _ in split.suffix_module.named_parameters()} == {"linear.weight", "linear.bias"}
    assert split_prefix(resnet, "linear.weight").num_suffix_nodes == 1  # a single name as a str


def test_resnet_whole_model(resnet):
    split = check_split(resnet, _names(resnet), X_IMG)
    assert split.num_prefix_nodes == 0


def test_resnet_inplace_relu():
    model = _bn_stats(CifarResNet(blocks=1, width=8, inplace_relu=True))
    check_split(model, _names(model, "layer3"), X_IMG)
    check_split(model, ["layer2.0.bn1.weight"], X_IMG)


def test_imagenet_style_blocks():
    model = _bn_stats(SmallImageNetResNet())
    check_split(model, _names(model, "layer2"), X_IMG)
    check_split(model, _names(model, "layer2.downsample"), X_IMG)
    check_split(model, ["layer1.bn2.weight", "layer1.bn2.bias"], X_IMG)


def test_resnet_train_mode_split_matches():
    # BN in train mode: running stats live in shared modules; outputs still match in train mode
    model = _bn_stats(CifarResNet(blocks=1, width=8)).double()
    split = split_prefix(model, _names(model, "layer3"))
    model.train()
    x = X_IMG[0].double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    model.load_state_dict(state)
    _assert_equal(split(x), ref)


def test_skip_across_boundary():
    model = SkipAcross()
    split = check_split(model, ["edit.weight", "edit.bias"], (torch.randn(7, 6),))
    assert len(split.frontier) == 1  # h feeds both the editable layer and the add after it


def test_untraceable_falls_back():
    model = DataDependent()
    for x in (torch.randn(5, 5), -torch.randn(5, 5)):
        # vmap cannot run a data-dependent branch at all (a property of the model)
        split = check_split(model, ["a.weight", "scale"], (x,), traced=False, vmappable=False)
        assert "tracing failed" in split.reason and len(split.reason) < 400
        assert split.num_prefix_nodes == 0
        acts = split.prefix(x)
        assert isinstance(acts, tuple) and acts[0] is x
    # the fallback suffix exposes exactly the model's names and state
    assert [n for n, _ in split.suffix_module.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert split.suffix_module.state_dict().keys() == model.state_dict().keys()


class ShapeBranch(nn.Module):
    """Untraceable (branch on a Proxy's dim) but vmap-able."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.b(torch.tanh(self.a(x)) * self.gain).squeeze(1)


def test_fallback_vmap_and_root_param():
    split = check_split(ShapeBranch(), ["a.weight", "gain"], (torch.randn(4, 5),), traced=False)
    assert "tracing failed" in split.reason


def test_two_inputs():
    model = TwoInputs()
    inputs = (torch.randn(5, 4), torch.randn(5, 3))
    check_split(model, ["mix.weight"], inputs)
    check_split(model, ["head.bias"], inputs)
    split = check_split(model, ["fz.weight"], inputs)
    assert "z" in split.frontier


def test_shared_parameters():
    model = Shared()
    split = check_split(model, ["fc.weight", "fc.bias"], (torch.randn(6, 5),))
    assert split.num_suffix_nodes >= 4


def test_tied_parameters():
    model = Tied()
    x = (torch.randn(6, 5),)
    split = check_split(model, ["mid.weight"], x)
    assert split.num_prefix_nodes > 0
    # dec.weight is enc.weight: editing it makes enc dependent too
    split = check_split(model, ["dec.weight"], x)
    assert split.num_prefix_nodes == 0
    check_split(model, ["enc.weight", "dec.bias"], x)


def test_aliased_submodule():
    # torch's functional_call corrupts a model whose submodule is registered under two names
    # (pytorch/pytorch#164759), so the reference here is the suffix under the canonical name
    model = Aliased().double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    split = split_prefix(model, ["alias.weight"])
    assert split.traced, split.reason
    assert split.suffix_module.get_parameter("alias.weight") is model.fc.weight
    with torch.no_grad():
        _assert_equal(split(x), model(x))
        acts = split.prefix(x)
        w = torch.randn(5, 5, dtype=torch.float64)
        a = functional_call(split.suffix_module, {"alias.weight": w}, (acts,))
        b = functional_call(split.suffix_module, {"fc.weight": w}, (acts,))
        _assert_equal(a, b)
        assert not torch.equal(a, model(x))
    assert type(model.fc.weight) is nn.Parameter  # the split's functional_call left the model intact
    _assert_equal(split(x), model(x))


def test_functional_root_params_and_non_tensor_frontier():
    model = Functional()
    split = check_split(model, ["w2"], (torch.randn(5, 4),))
    assert not any(n == "w1" for n, _ in split.suffix_module.named_parameters())
    # x.size(0) travels as an int; h is returned directly by the suffix from the acts
    acts = split.prefix(torch.randn(5, 4).double())
    assert any(isinstance(a, int) for a in acts)
    check_split(model, ["w1", "b2"], (torch.randn(5, 4),))


def test_captured_constant_does_not_mutate_model():
    table = torch.randn(5)

    class UsesGlobal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 5)

        def forward(self, x):
            return self.b(self.a(x) + table.to(x.dtype))

    model = UsesGlobal()
    keys = set(model.__dict__)
    check_split(model, ["b.weight"], (torch.randn(3, 5),))
    assert set(model.__dict__) == keys


def test_concrete_args():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x, double=False):
            h = self.a(x)
            if double:
                h = 2 * h
            return self.b(h)

    model = Flag().double().eval()
    assert not split_prefix(model, ["b.weight"]).traced  # `if double:` on a Proxy
    split = split_prefix(model, ["b.weight"], concrete_args={"double": True})
    assert split.traced, split.reason
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        _assert_equal(split(x, True), model(x, True))


class PrefixMutatesAfterRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.edit = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        y = h + self.edit(x)
        h.mul_(2)  # non-dependent, but runs after the dependent add read h
        return y + h


class SuffixMutatesPrefixValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.edit = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        v = h.view(-1)
        v.add_(self.edit(x).view(-1))  # writes into h through a view
        return h


@pytest.mark.parametrize("cls", [PrefixMutatesAfterRead, SuffixMutatesPrefixValue])
def test_unsafe_inplace_falls_back(cls):
    model = cls()
    # in-place writes of batched values into unbatched tensors: vmap cannot run these models at all
    split = check_split(model, ["edit.weight"], (torch.randn(3, 4),), traced=False, vmappable=False)
    assert "in-place" in split.reason


def test_example_inputs_verification(resnet):
    resnet.eval()
    split = split_prefix(resnet, _names(resnet, "layer3"), example_inputs=X_IMG)
    assert split.traced, split.reason

    class Noisy(nn.Module):  # a split of a random model cannot reproduce it: fall back
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x) + torch.randn_like(x))

    split = split_prefix(Noisy(), ["b.weight"], example_inputs=(torch.randn(2, 3),))
    assert not split.traced and "verification" in split.reason


def test_invalid_editable(resnet):
    with pytest.raises(ValueError, match="nope.weight"):
        split_prefix(resnet, ["layer3.0.conv1.weight", "nope.weight"])
    with pytest.raises(ValueError, match="empty"):
        split_prefix(resnet, [])
    with pytest.raises(ValueError, match="bn1.running_mean"):
        split_prefix(resnet, ["bn1.running_mean"])  # a buffer, not a parameter
    with pytest.raises(ValueError, match="wrong"):
        split_prefix(DataDependent(), ["wrong"])  # raised even for untraceable models


def test_editable_unused():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.spare = nn.Linear(3, 3)
            self.dead = nn.Linear(3, 3)

        def forward(self, x):
            _ = self.dead(x)
            return self.a(x)

    with pytest.raises(ValueError, match="uses"):
        split_prefix(Unused(), ["spare.weight"])
    with pytest.raises(ValueError, match="does not depend"):
        split_prefix(Unused(), ["dead.weight"])
    # partly unused: fine, the unused one gets a zero gradient
    check_split(Unused(), ["a.weight", "spare.weight"], (torch.randn(2, 3),))


# --------------------------------------------------------------------------------------------------
# timing (not a test): python tests/api/test_prefix.py


def _bench(fns: dict, reps: int = 3, trials: int = 7) -> dict:
    """Best-of-``trials`` seconds per call; the candidates are interleaved so load affects all."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(trials):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    torch.manual_seed(0)
    model = _bn_stats(CifarResNet(blocks=3, width=16)).eval()  # ResNet-20 layout
    editable = _names(model, "layer3")
    split = split_prefix(model, editable)
    x = torch.randn(64, 3, 32, 32)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ResNet-20-like, batch 64, "
          f"editable layer3 ({len(editable)} tensors); traced={split.traced}, "
          f"prefix nodes {split.num_prefix_nodes}, suffix nodes {split.num_suffix_nodes}")
    with torch.no_grad():
        acts = split.prefix(x)
        t = _bench({
            "full": lambda: model(x), "prefix": lambda: split.prefix(x), "suffix": lambda: split.suffix(acts)
        })
    print(f"forward, no_grad:  full {t['full'] * 1e3:7.2f} ms | prefix {t['prefix'] * 1e3:7.2f} ms | "
          f"suffix {t['suffix'] * 1e3:7.2f} ms | full/suffix {t['full'] / t['suffix']:5.2f}x")

    params = {n: model.get_parameter(n).detach() for n in editable}
    w = torch.randn(64, 10)
    g_full = grad(lambda p: (functional_call(model, p, (x,)) * w).sum())
    g_sfx = grad(lambda p: (functional_call(split.suffix_module, p, (acts,)) * w).sum())
    t = _bench({"full": lambda: g_full(params), "suffix": lambda: g_sfx(params)})
    print(f"grad (fwd+bwd):    full {t['full'] * 1e3:7.2f} ms | suffix {t['suffix'] * 1e3:7.2f} ms | "
          f"full/suffix {t['full'] / t['suffix']:5.2f}x")

if __name__ == "__main__":
    main()
