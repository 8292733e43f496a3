"""The fused in-place editor step ``editor_step_`` on every backend available here, against the
functional oracle ``Editor.step`` (fastedit/editors.py).

Backends: "reference" (Editor.step + copy_), "cpu" (the C++ kernel, skipped when fastedit._C is not
built), "triton" (the Triton kernel on CPU tensors under TRITON_INTERPRET=1, small sizes), "cuda"
(skipped without a GPU).

Tolerances: GD, Scaled GD, sign and Momentum are compared bit for bit. RMSProp and Adam are within
2 ulp of the compute dtype, relative to the size of the terms (|θ| + |θ_new| + |Δθ|): the kernels use a
correctly rounded sqrt, torch's CPU sqrt (MKL VML) is not, and Adam's beta**t goes through pow.
float16/bfloat16 parameters: ≤ 1 ulp of the parameter dtype (the Triton interpreter truncates
bf16 casts instead of rounding, docs/design.md).

Hyper-parameters are asymmetric everywhere a kernel is compared with the rule (RMSProp β = 0.7,
Adam β = (0.9, 0.999)): with β = 0.5, β and 1 − β are the same number, and a kernel that swapped
them would pass.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import ROOT

import fastedit as fe
from fastedit.ops import _extension as extension
from fastedit.ops import dispatch
from fastedit.ops.editor_step import editor_step_

es = importlib.import_module("fastedit.ops.editor_step")

HAS_EXT = extension.load() is not None and extension.has_cpu_ops()
HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available() and extension.load() is not None and extension.has_cuda_ops()

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EXACT_RULES = {"gd", "scaled_gd", "rprop", "momentum"}


def editors():
    return [fe.GD(0.1), fe.ScaledGD(0.05), fe.RProp(0.01), fe.RMSProp(1e-2, beta=0.7, eps=1e-6),
            fe.Momentum(0.1, momentum=0.9), fe.Adam(0.01, betas=(0.9, 0.999), eps=1e-8)]


EDITOR_IDS = [e.name for e in editors()]


def backend_param(name):
    marks = {
        "cpu": pytest.mark.skipif(not HAS_EXT, reason=f"fastedit._C not built: {extension.unavailable_reason()}"),
        "triton": pytest.mark.skipif(not HAS_TRITON, reason="triton missing or TRITON_INTERPRET!=1"),
        "reference": (),
    }[name]
    return pytest.param(name, marks=marks)


BACKENDS = [backend_param(b) for b in ("reference", "cpu", "triton")]


def clone_state(state):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else [x.clone() for x in v]) for k, v in state.items()}


def step(backend, editor, params, grads, state, active=None, *, batched=False, mask=None, names=None):
    """editor_step_ through one named backend (bypassing the dispatcher's choice)."""
    with torch.no_grad():
        es._editor_step(editor, params, grads, state, active, batched, mask, backend=backend, names=names)


def tolerance(ref: torch.Tensor, old: torch.Tensor, rule: str, backend: str) -> torch.Tensor:
    ref64, old64 = ref.double(), old.double()
    scale = ref64.abs() + old64.abs() + (old64 - ref64).abs()  # theta - delta rounds on the grid of theta
    if ref.dtype in (torch.float16, torch.bfloat16):
        ulps = 1.0
    elif rule in EXACT_RULES:
        ulps = 0.0
    else:
        ulps = 2.0
    return ulps * torch.finfo(ref.dtype).eps * scale + (0 if ulps == 0 else torch.finfo(ref.dtype).tiny)


def assert_matches(got, ref, old, rule, backend, what):
    exact = rule in EXACT_RULES and not (backend == "triton" and ref.dtype == torch.bfloat16)
    if exact:
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    err = (got.double() - ref.double()).abs()
    tol = tolerance(ref, old, rule, backend)
    bad = ~((err <= tol) | (got == ref) | (got.isnan() & ref.isnan()))
    assert not bad.any(), f"{what}: {int(bad.sum())} coordinates off, worst err {err[bad].max().item()} " \
                          f"(tol {tol[bad].max().item()})"


def sync_to(mine, mine_state, params, state):
    for a, b in zip(mine, params):
        a.copy_(b)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            mine_state[key].copy_(value)
        else:
            for a, b in zip(mine_state[key], value):
                a.copy_(b)


def make(editor, dtype, batched, sizes, E=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (E,) if batched else ()
    params = [torch.randn(lead + (n,), generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    state = editor.init_state(params, batched=batched)
    return params, state, gen


def random_grads(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


def check_against_oracle(backend, editor, dtype, batched, sizes, actives, E=3, mask=None):
    params, state, gen = make(editor, dtype, batched, sizes, E)
    mine, mine_state = [p.clone() for p in params], clone_state(state)
    for k, active in enumerate(actives):
        grads = random_grads(params, gen)
        if k == 1:
            for g in grads:  # zeros in g: sign(0) = 0, RMSProp/Adam with zero gradient
                g.view(-1)[::3] = 0
        before = [p.clone() for p in mine], clone_state(mine_state)
        params, state = editor.step(params, grads, state, active, batched=batched)
        step(backend, editor, mine, grads, mine_state, active, batched=batched)
        assert torch.equal(mine_state["t"], state["t"]), f"step {k}: t {mine_state['t']} != {state['t']}"
        for i, (got, ref, old) in enumerate(zip(mine, params, before[0])):
            assert_matches(got, ref, old, editor.name, backend, f"step {k} param {i}")
            if active is not None:  # inactive edits: bit for bit untouched
                keep = ~active if batched else ~active.reshape(())
                if batched and keep.any():
                    assert torch.equal(got[keep], old[keep]), f"step {k}: inactive edit changed"
                elif not batched and bool(keep):
                    assert torch.equal(got, old)
        for slot in editor.slots:
            for i, (got, ref, old) in enumerate(zip(mine_state[slot], state[slot], before[1][slot])):
                assert_matches(got, ref, old, editor.name, backend, f"step {k} {slot}[{i}]")
        # continue from the oracle's values: each step is checked on identical inputs (last-bit
        # differences would otherwise accumulate), while t, s and m/v still evolve over the steps
        sync_to(mine, mine_state, params, state)


# ------------------------------------------------------------------------------------------------
# Every backend against the oracle


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("editor", editors(), ids=EDITOR_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_editor_step(backend, editor, dtype, batched):
    sizes = [1, 7, 1023, 4097] if backend != "triton" else [1, 7, 1023, 2053]
    if batched:  # all active, mixed (per-edit t diverges: RMSProp first step, Adam bias), none
        actives = [None, torch.tensor([True, False, True]), torch.tensor([False, True, True]),
                   torch.tensor([False, False, False]), torch.tensor([True, True, False])]
    else:
        actives = [None, torch.tensor(True), torch.tensor(False), torch.tensor(True)]
    check_against_oracle(backend, editor, dtype, batched, sizes, actives)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_edits_untouched_even_with_nan_gradients(backend):
    editor = fe.Adam(0.1, betas=(0.9, 0.999))
    params, state, gen = make(editor, torch.float32, True, [5, 33], E=4)
    state["t"] += torch.tensor([0.0, 3.0, 1.0, 7.0])
    for s in editor.slots:
        for x in state[s]:
            x.uniform_(0, 1, generator=gen)
    before_p, before_s = [p.clone() for p in params], clone_state(state)
    grads = [torch.full_like(p, float("nan")) for p in params]
    step(backend, editor, params, grads, state, torch.zeros(4, dtype=torch.bool), batched=True)
    for a, b in zip(params, before_p):
        assert torch.equal(a, b)
    for s in editor.slots:
        for a, b in zip(state[s], before_s[s]):
            assert torch.equal(a, b)
    assert torch.equal(state["t"], before_s["t"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("editor", editors(), ids=EDITOR_IDS)
def test_flat_buffer_and_mixed_half_dtypes(backend, editor):
    # a single flat tensor
    p = torch.randn(1000)
    g = torch.randn(1000)
    state = editor.init_state(p)
    ref_p, ref_state = editor.step(p, g, state)
    mine, mine_state = p.clone(), clone_state(state)
    step(backend, editor, mine, g, mine_state)
    assert_matches(mine, ref_p, p, editor.name, backend, "flat")
    # float32, float16 and bfloat16 parameters in one call (all with float32 state)
    params = [torch.randn(37), torch.randn(64).half(), torch.randn(5, 3).bfloat16()]
    grads = [torch.randn_like(x) for x in params]
    state = editor.init_state(params)
    ref, _ = editor.step(params, grads, state)
    mine, mine_state = [x.clone() for x in params], clone_state(state)
    step(backend, editor, mine, grads, mine_state)
    for i, (a, b, o) in enumerate(zip(mine, ref, params)):
        assert_matches(a, b, o, editor.name, backend, f"mixed {i}")


# ------------------------------------------------------------------------------------------------
# Sparse (surgery) variant


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("editor", editors(), ids=EDITOR_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mask(backend, editor, batched):
    gen = torch.Generator().manual_seed(1)
    params, state, _ = make(editor, torch.float32, batched, [7, 300, 1025], E=2)
    for s in editor.slots:
        for x in state[s]:
            x.uniform_(0, 1, generator=gen)
    shapes = [p.shape[1:] if batched else p.shape for p in params]
    masks = [torch.rand(s, generator=gen) < 0.1 for s in shapes]
    if batched:  # one full-shape (per-edit) mask too
        masks[2] = torch.rand(params[2].shape, generator=gen) < 0.1
    for step_no in range(3):
        grads = random_grads(params, gen)
        before_p, before_s = [p.clone() for p in params], clone_state(state)
        # oracle: the dense step (on the masked gradient: Scaled GD's norm is over the selection)
        g_masked = [torch.where(m, g, torch.zeros(())) for g, m in zip(grads, masks)]
        ref_p, ref_s = editor.step(before_p, g_masked, before_s, batched=batched)
        step(backend, editor, params, grads, state, batched=batched, mask=masks)
        for i, (m, got, ref, old) in enumerate(zip(masks, params, ref_p, before_p)):
            m = m.expand_as(got)
            assert torch.equal(got[~m], old[~m]), "a coordinate outside the mask was written"
            assert_matches(got[m], ref[m], old[m], editor.name, backend, f"masked param {i}")
        for s in editor.slots:
            for got, ref, old, m in zip(state[s], ref_s[s], before_s[s], masks):
                m = m.expand_as(got)
                assert torch.equal(got[~m], old[~m])
                assert_matches(got[m], ref[m], old[m], editor.name, backend, f"masked {s}")
        assert torch.equal(state["t"], ref_s["t"])
        sync_to(params, state, ref_p, ref_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_masks_equal_bool_masks(backend):
    editor = fe.RMSProp(0.01, beta=0.7)
    params = [torch.randn(50), torch.randn(4, 6)]
    grads = [torch.randn_like(p) for p in params]
    idx = [torch.tensor([0, 7, 49]), torch.tensor([3, 23])]
    bools = [torch.zeros(50, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.bool)]
    bools[0][[0, 7, 49]] = True
    bools[1].view(-1)[[3, 23]] = True
    a, sa = [p.clone() for p in params], editor.init_state(params)
    b, sb = [p.clone() for p in params], editor.init_state(params)
    step(backend, editor, a, grads, sa, mask=idx)
    step(backend, editor, b, grads, sb, mask=bools)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert int((a[0] != params[0]).sum()) == 3 and int((a[1] != params[1]).sum()) == 2


# ------------------------------------------------------------------------------------------------
# Property tests: shapes and extreme values


import hypothesis  # noqa: E402,F401  (a test dependency: missing, the module must fail, not skip)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       rule=st.sampled_from(EDITOR_IDS),
       scale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e15, 1e30]),
       batched=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_cpu_vs_oracle(sizes, rule, scale, batched, seed):
    editor = next(e for e in editors() if e.name == rule)
    params, state, gen = make(editor, torch.float32, batched, sizes, E=2, seed=seed)
    mine, mine_state = [p.clone() for p in params], clone_state(state)
    for _ in range(2):
        grads = [(torch.randn(p.shape, generator=gen) * scale) for p in params]
        for g in grads:
            g.view(-1)[::2] = 0  # exact zeros: sign(0) = 0
        before = [p.clone() for p in mine]
        params, state = editor.step(params, grads, state, batched=batched)
        step("cpu", editor, mine, grads, mine_state, batched=batched)
        for got, ref, old in zip(mine, params, before):
            assert_matches(got, ref, old, rule, "cpu", f"scale {scale}")
        for s in editor.slots:
            for got, ref in zip(mine_state[s], state[s]):
                assert_matches(got, ref, ref, rule, "cpu", f"{s} scale {scale}")
        sync_to(mine, mine_state, params, state)


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors, nothing written


def _inputs(editor=None, **over):
    editor = editor or fe.RMSProp(0.1, beta=0.7)
    params = [torch.randn(3, 4), torch.randn(5)]
    grads = [torch.randn(3, 4), torch.randn(5)]
    state = editor.init_state(params)
    return editor, params, grads, state


# every case that concerns one tensor names its parameter: "parameter 0" without names, the
# name with names= (the same cases run both ways)
BAD_CASES = [
    ("overlapping_param", ValueError, "parameter 0 overlaps itself in memory"),
    ("overlapping_state", ValueError, r"state\['square_avg'\] of parameter 1 overlaps itself"),
    ("overlapping_t", ValueError, r"state\['t'\] overlaps itself"),
    ("grad_dtype", TypeError, "the gradient of parameter 0 is torch.float64"),
    ("grad_shape", ValueError, r"parameter 1 has shape \(5,\) but its gradient \(6,\)"),
    ("grad_device", ValueError, "parameter 1 .* must be on"),
    ("int_param", TypeError, "parameter 0 has dtype torch.int64"),
    ("fewer_grads", ValueError, "2 parameter tensors but 1 gradients"),
    ("state_dtype", ValueError, r"state\['square_avg'\] of parameter 0 must be a torch.float32"),
    ("state_alias", ValueError, r"state\['square_avg'\] of parameter 1 aliases the parameter"),
    ("state_missing", ValueError, "slot 'square_avg'"),
    ("t_dtype", TypeError, "state\\['t'\\] is torch.float64"),
    ("active_shape", ValueError, "active must have shape"),
    ("active_dtype", TypeError, "active must be a bool"),
    ("mask_shape", ValueError, "the mask of parameter 1 has shape"),
    ("mask_dtype", TypeError, "the mask of parameter 0 must be bool"),
    ("mask_index", IndexError, r"the index mask of parameter 1 holds a flat index outside \[-5, 5\)"),
    ("mixed_fp64", TypeError, "parameter 1 is torch.float64 but parameter 0 is torch.float32: float64"),
    ("not_editor", TypeError, "fastedit Editor"),
    ("names_length", ValueError, "1 names for 2 parameter tensors"),
    ("names_type", TypeError, r"names\[1\] must be a string"),
]
NAMES = ["layer.weight", "layer.bias"]


def _named(match: str) -> str:
    """The expected message when the call names its parameters (NAMES)."""
    return match.replace("parameter 0", f"parameter '{NAMES[0]}'").replace("parameter 1", f"parameter '{NAMES[1]}'")


@pytest.mark.parametrize("named", [False, True], ids=["positions", "names"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, error, match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_rejected_before_writing(backend, case, error, match, named):
    editor, params, grads, state = _inputs()
    active, mask = None, None
    names = list(NAMES) if named else None
    if case == "overlapping_param":
        params[0] = torch.randn(4).expand(3, 4)
    elif case == "overlapping_state":
        state["square_avg"][1] = torch.zeros(1).expand(5)
    elif case == "overlapping_t":
        params, grads = [torch.randn(3, 4)], [torch.randn(3, 4)]
        state = editor.init_state(params, batched=True)
        state["t"] = torch.zeros(1).expand(3)
    elif case == "grad_dtype":
        grads[0] = grads[0].double()
    elif case == "grad_shape":
        grads[1] = torch.randn(6)
    elif case == "grad_device":
        grads[1] = torch.randn(5, device="meta")
    elif case == "int_param":
        params[0] = torch.ones(3, 4, dtype=torch.long)
        grads[0] = torch.ones(3, 4, dtype=torch.long)
    elif case == "fewer_grads":
        grads = grads[:1]
    elif case == "state_dtype":
        state["square_avg"][0] = state["square_avg"][0].double()
    elif case == "state_alias":
        state["square_avg"][1] = params[1]
    elif case == "state_missing":
        del state["square_avg"]
    elif case == "t_dtype":
        state["t"] = state["t"].double()
    elif case == "active_shape":
        active = torch.ones(2, dtype=torch.bool)
    elif case == "active_dtype":
        active = torch.tensor(1.0)
    elif case == "mask_shape":
        mask = [torch.ones(3, 4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    elif case == "mask_dtype":
        mask = [torch.ones(3, 4), torch.ones(5)]
    elif case == "mask_index":
        mask = [torch.tensor([0, 11]), torch.tensor([2, 5])]
    elif case == "mixed_fp64":
        params[1], grads[1] = params[1].double(), grads[1].double()
    elif case == "not_editor":
        editor = torch.optim.SGD
    elif case == "names_length":
        names = ["only.one"]
    elif case == "names_type":
        names = ["layer.weight", 3]
    if case == "overlapping_t" and names is not None:
        names = names[:1]
    snap = [p.clone() for p in params if p.device.type == "cpu"]
    state_snap = clone_state(state) if case not in ("state_missing",) else None
    with pytest.raises(error, match=_named(match) if named else match):
        step(backend, editor, params, grads, state, active, mask=mask, names=names,
             batched=case == "overlapping_t")
    for a, b in zip([p for p in params if p.device.type == "cpu"], snap):
        assert torch.equal(a, b)
    if state_snap is not None:
        for key, value in state_snap.items():
            for a, b in zip(value if isinstance(value, list) else [value],
                            state[key] if isinstance(value, list) else [state[key]]):
                assert torch.equal(a, b), f"state[{key!r}] was written"


def test_batched_shape_errors():
    editor = fe.GD(0.1)
    params = [torch.randn(3, 4), torch.randn(2, 5)]
    state = editor.init_state(params[:1], batched=True)
    with pytest.raises(ValueError, match="leading edit dimension"):
        editor_step_(editor, params, [torch.randn(3, 4), torch.randn(2, 5)], state, batched=True)
    with pytest.raises(ValueError, match=r"state\['t'\] must have shape \(3,\)"):
        editor_step_(editor, params[:1], [torch.randn(3, 4)], editor.init_state(params[:1]), batched=True)


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
def test_compiled_op_checks_its_inputs():
    op = torch.ops.fastedit.editor_step_
    p, g = [torch.randn(4)], [torch.randn(4)]
    t = torch.zeros(())
    with pytest.raises(RuntimeError, match="unknown rule id 9"):
        op(p, g, [], [], t, None, None, [], 9, 0.1, 0.5, 0.9, 1e-6, False)
    with pytest.raises(RuntimeError, match="needs 1 \\+ 0 state tensors"):
        op(p, g, [], [], t, None, None, [], 3, 0.1, 0.5, 0.9, 1e-6, False)
    with pytest.raises(RuntimeError, match="parameter 0 overlaps itself in memory"):
        op([torch.randn(2).expand(4, 2)], [torch.randn(4, 2)], [], [], t, None, None, [], 0, 0.1, 0, 0, 0, False)
    with pytest.raises(RuntimeError, match="ScaledGD needs inv_norm"):
        op(p, g, [], [], t, None, None, [], 1, 0.1, 0, 0, 0, False)
    with pytest.raises(RuntimeError, match="the state of parameter 0 must be"):
        op(p, g, [torch.zeros(4, dtype=torch.float64)], [], t, None, None, [], 3, 0.1, 0.5, 0, 1e-6, False)
    with pytest.raises(RuntimeError, match="t must be 0-dim"):
        op(p, g, [], [], torch.zeros(1), None, None, [], 0, 0.1, 0, 0, 0, False)
    # names=: every per-tensor message names the parameter
    named = ["head.weight"]
    with pytest.raises(RuntimeError, match="the state of parameter 'head.weight' must be"):
        op(p, g, [torch.zeros(4, dtype=torch.float64)], [], t, None, None, [], 3, 0.1, 0.5, 0, 1e-6, False, named)
    with pytest.raises(RuntimeError, match="the gradient of parameter 'head.weight' is Double"):
        op(p, [torch.randn(4, dtype=torch.float64)], [], [], t, None, None, [], 0, 0.1, 0, 0, 0, False, named)
    with pytest.raises(RuntimeError, match=r"parameter 'head.weight' has shape \[4\] but its gradient \[5\]"):
        op(p, [torch.randn(5)], [], [], t, None, None, [], 0, 0.1, 0, 0, 0, False, names=named)
    with pytest.raises(RuntimeError, match="parameter 'head.weight' overlaps itself"):
        op([torch.randn(1).expand(4)], g, [], [], t, None, None, [], 0, 0.1, 0, 0, 0, False, names=named)
    with pytest.raises(RuntimeError, match="the state of parameter 'head.weight' aliases the parameter"):
        op(p, g, p, [], t, None, None, [], 4, 0.1, 0.5, 0, 0, False, names=named)
    with pytest.raises(RuntimeError, match="the mask of parameter 'head.weight' must have the shape"):
        op(p, g, [], [], t, None, None, [torch.ones(3, dtype=torch.bool)], 0, 0.1, 0, 0, 0, False, names=named)
    with pytest.raises(RuntimeError, match="the mask of parameter 'head.weight' must be a bool tensor"):
        op(p, g, [], [], t, None, None, [torch.ones(4)], 0, 0.1, 0, 0, 0, False, names=named)
    with pytest.raises(RuntimeError, match="parameter 'head.weight' must be float32, float64"):
        op([torch.ones(4, dtype=torch.long)], [torch.ones(4, dtype=torch.long)], [], [], t, None, None, [], 0,
           0.1, 0, 0, 0, False, names=named)
    with pytest.raises(RuntimeError, match="2 names for 1 parameter tensors"):
        op(p, g, [], [], t, None, None, [], 0, 0.1, 0, 0, 0, False, names=["a", "b"])
    assert torch.equal(t, torch.zeros(())), "a rejected call advanced t"


# ------------------------------------------------------------------------------------------------
# Dispatch, fallbacks, torch.library integration


def test_dispatch_reports_the_op(monkeypatch):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    info = fe.backends()["backends"]
    assert "editor_step" in info["reference"]["ops"]
    if HAS_EXT:
        assert "editor_step" in info["cpu"]["ops"]
        assert dispatch.choose_backend("editor_step", torch.device("cpu")) == "cpu"
        assert "editor_step_" in extension.build_info()["ops"]
    monkeypatch.setenv("FASTEDIT_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendError, match="FASTEDIT_BACKEND=cuda"):
        editor_step_(fe.GD(0.1), [torch.randn(3)], [torch.randn(3)], fe.GD(0.1).init_state([torch.randn(3)]))


def test_tensor_hyperparameters_and_subclasses_use_the_reference():
    editor = fe.RMSProp(torch.tensor(0.01), beta=torch.tensor(0.7))
    assert es._kernel_hparams(editor) is None

    class MyGD(fe.GD):
        name = "my_gd"

        def _rule(self, g, slots, t, context):
            return 2 * self.lr * g, []

    for ed in (editor, MyGD(0.1)):
        params = [torch.randn(8), torch.randn(3, 3)]
        grads = [torch.randn_like(p) for p in params]
        state = ed.init_state(params)
        ref, ref_state = ed.step(params, grads, state)
        mine, mine_state = [p.clone() for p in params], clone_state(state)
        editor_step_(ed, mine, grads, mine_state)
        for a, b in zip(mine, ref):
            assert torch.equal(a, b)
        assert torch.equal(mine_state["t"], ref_state["t"])


def test_parameters_requiring_grad_are_updated_without_autograd():
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    editor = fe.GD(0.1)
    expected = [(p - 0.1 * g).detach() for p, g in zip(params, grads)]
    editor_step_(editor, params, grads, editor.init_state([p.detach() for p in params]))
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e) and p.grad_fn is None


def _op_args(rule, batched, masked):
    gen = torch.Generator().manual_seed(3)
    lead = (2,) if batched else ()
    params = [torch.randn(lead + (5,), generator=gen), torch.randn(lead + (3, 4), generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    n1, n2 = (1 if rule in (3, 4, 5) else 0), (1 if rule == 5 else 0)
    slot1 = [torch.rand(p.shape, generator=gen) for p in params] if n1 else []
    slot2 = [torch.rand(p.shape, generator=gen) for p in params] if n2 else []
    t = torch.zeros(lead)
    active = torch.tensor([True, False]) if batched else torch.tensor(True)
    inv = torch.full(lead, 0.5) if rule == 1 else None
    masks = [torch.rand(p.shape, generator=gen) < 0.5 for p in params] if masked else []
    return (params, grads, slot1, slot2, t, active, inv, masks, rule, 0.1, 0.7, 0.999, 1e-6, batched)


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@pytest.mark.parametrize("rule", range(6))
def test_opcheck(rule):
    for batched, masked in ((False, False), (True, True)):
        torch.library.opcheck(torch.ops.fastedit.editor_step_.default, _op_args(rule, batched, masked))
    # with names=, and with non-contiguous parameters and state (stepped through stand-ins)
    args = _op_args(rule, True, True)
    args[0][1] = args[0][1].transpose(1, 2).contiguous().transpose(1, 2)
    for slot in args[2] + args[3]:
        slot.set_(slot.transpose(-1, -2).contiguous().transpose(-1, -2))
    assert not args[0][1].is_contiguous()
    torch.library.opcheck(torch.ops.fastedit.editor_step_.default, args, {"names": ["a", "b"]})


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(params, grads, slot1, t, active):
        torch.ops.fastedit.editor_step_(params, grads, slot1, [], t, active, None, [], 3, 0.01, 0.7, 0.0,
                                        1e-6, True)
        return params[0].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(2, 9, generator=gen), torch.randn(2, 17, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    a = ([p.clone() for p in params], [torch.zeros_like(p) for p in params], torch.zeros(2))
    b = ([p.clone() for p in params], [torch.zeros_like(p) for p in params], torch.zeros(2))
    active = torch.tensor([True, False])
    for _ in range(2):
        out_c = compiled(a[0], grads, a[1], a[2], active)
        out_e = f(b[0], grads, b[1], b[2], active)
        assert torch.equal(out_c, out_e)
    for x, y in zip(a[0] + a[1] + [a[2]], b[0] + b[1] + [b[2]]):
        assert torch.equal(x, y)


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
def test_torch_compile_fullgraph_public_api(monkeypatch):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    torch._dynamo.reset()
    editor = fe.RMSProp(0.01, beta=0.7)

    def f(params, grads, state, active):
        editor_step_(editor, params, grads, state, active, batched=True)
        return params[0] * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 11, generator=gen), torch.randn(3, 4, 5, generator=gen)]
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    sa, sb = editor.init_state(a, batched=True), editor.init_state(b, batched=True)
    for active in (torch.tensor([True, False, True]), torch.tensor([False, True, True])):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        assert torch.equal(compiled(a, grads, sa, active), f(b, grads, sb, active))
    for x, y in zip(a + sa["square_avg"] + [sa["t"]], b + sb["square_avg"] + [sb["t"]]):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------
# CUDA (needs a GPU and a CUDA build of the extension)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device, or fastedit._C built without CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("editor", editors(), ids=EDITOR_IDS)
def test_cuda_matches_editor_step(editor, dtype):
    for batched in (False, True):
        params, state, gen = make(editor, dtype, batched, [1, 7, 1023, 4097, 70001], E=3)
        params = [p.cuda() for p in params]
        state = {k: (v.cuda() if isinstance(v, torch.Tensor) else [x.cuda() for x in v]) for k, v in state.items()}
        mine, mine_state = [p.clone() for p in params], clone_state(state)
        actives = [None, torch.tensor([True, False, True]), torch.tensor([False, False, False])] if batched \
            else [None, torch.tensor(True), torch.tensor(False)]
        for active in actives:
            active = None if active is None else active.cuda()
            grads = [torch.randn(p.shape, device="cuda", dtype=torch.float64).to(dtype) for p in params]
            before = [p.clone() for p in mine]
            params, state = editor.step(params, grads, state, active, batched=batched)
            step("cuda", editor, mine, grads, mine_state, active, batched=batched)
            assert torch.equal(mine_state["t"], state["t"])
            for got, ref, old in zip(mine, params, before):
                # the GPU reference's own sqrt/div/pow may differ in the last bit: 2 ulp everywhere
                assert_matches(got.cpu(), ref.cpu(), old.cpu(), "rmsprop", "cuda", f"cuda {editor.name}")
        masks = [torch.rand(p.shape, device="cuda") < 0.2 for p in mine]
        snap = [p.clone() for p in mine]
        step("cuda", editor, mine, [torch.randn_like(p) for p in mine], mine_state, batched=batched, mask=masks)
        for m, a, b in zip(masks, mine, snap):
            assert torch.equal(a[~m], b[~m])


def test_cuda_sources_are_listed():
    text = (ROOT / "csrc" / "sources.txt").read_text()
    for path in ("csrc/cpu/editor_step.cpp", "csrc/cuda/editor_step.cu", "csrc/cuda/editor_step_binding.cpp"):
        assert path in text


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the Triton interpreter: inf - inf
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_half_bit_pattern(backend, dtype):
    """All 65536 bit patterns (zeros, subnormals, normals, max, inf, NaN) as parameters, with a zero
    gradient (the conversion round trip must be the identity) and with gradients that push values
    across rounding boundaries, overflow to inf and into subnormals."""
    params = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    if backend == "triton":
        params = params[::4].contiguous()  # the interpreter is slow
    editor = fe.GD(1.0)
    gen = torch.Generator().manual_seed(5)
    for grads in (torch.zeros_like(params),
                  (params.float() * torch.randn(params.shape, generator=gen) * 1e-3).to(dtype),
                  (torch.randn(params.shape, generator=gen) * 7e4).to(dtype)):
        ref, _ = editor.step(params, grads, editor.init_state(params))
        mine = params.clone()
        step(backend, editor, mine, grads, editor.init_state(params))
        if backend == "triton" and dtype == torch.bfloat16:  # the interpreter truncates bf16 casts
            assert_matches(mine, ref, params, "rmsprop", backend, "bit patterns")
        else:
            torch.testing.assert_close(mine, ref, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# Triton: one launch per dtype group over the whole tensor list (apex multi-tensor style)

triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton missing or TRITON_INTERPRET!=1")


class _LaunchCounter:
    """Stands in for the jitted kernel: records each launch's grid, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.dtypes = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            self.dtypes.append(kwargs["DT"])
            return self.kernel[grid](*args, **kwargs)
        return launch


def _count_launches(monkeypatch):
    from fastedit.ops.triton import editor_step as tes
    counter = _LaunchCounter(tes._editor_step_kernel)
    monkeypatch.setattr(tes, "_editor_step_kernel", counter)
    return counter


# odd per-edit lengths around the block size (1024), a 0-size tensor, and enough tensors that the
# per-dtype groups are not powers of two (the program -> tensor search pads its table)
MT_SIZES = [1, 7, 1023, 2053, 0, 5, 1024, 1025, 3, 2048, 17, 130]


def _mt_inputs(editor, dtypes, batched, E, seed, masked):
    gen = torch.Generator().manual_seed(seed)
    lead = (E,) if batched else ()
    params = [torch.randn(lead + (n,), generator=gen, dtype=torch.float64).to(dtypes[i % len(dtypes)])
              for i, n in enumerate(MT_SIZES)]
    state = editor.init_state(params, batched=batched)
    for s in editor.slots:
        for x in state[s]:
            x.uniform_(0, 1, generator=gen)
    if batched:
        state["t"] += torch.arange(E, dtype=state["t"].dtype) % 3  # per-edit t (Adam bias, RMSProp first step)
    grads = random_grads(params, gen)
    for g in grads[::2]:
        g.view(-1)[::3] = 0  # exact zeros: sign(0) = 0
    masks = None
    if masked:  # shared masks, and per-edit (full-shape) masks on every third tensor
        masks = [torch.rand((p.shape if (batched and i % 3 == 0) else p.shape[1:] if batched else p.shape),
                            generator=gen) < 0.3 for i, p in enumerate(params)]
    return params, grads, state, masks


@triton_only
def test_triton_one_launch_per_dtype_group(monkeypatch):
    counter = _count_launches(monkeypatch)
    BLOCK = 1024
    for dtypes, E in (([torch.float32], 3), ([torch.float64], 2), ([torch.float32, torch.float16, torch.bfloat16], 2)):
        editor = fe.Adam(0.01, betas=(0.9, 0.999))
        params, grads, state, masks = _mt_inputs(editor, dtypes, True, E, seed=0, masked=True)
        counter.grids.clear(), counter.dtypes.clear()
        step("triton", editor, params, grads, state, torch.tensor([True, False] * (E // 2) + [True] * (E % 2)),
             batched=True, mask=masks)
        assert len(counter.grids) == len(dtypes), f"{len(params)} tensors of {dtypes}: {len(counter.grids)} launches"
        assert len(set(map(str, counter.dtypes))) == len(dtypes)
        # the grid covers every block of every tensor of its group, for every edit, once
        want = sorted(E * sum(-(-p.shape[1] // BLOCK) for p in params if p.dtype == d) for d in dtypes)
        assert sorted(g[0] for g in counter.grids) == want
    # single edit, flat tensors; and an all-empty list launches nothing
    counter.grids.clear(), counter.dtypes.clear()
    params = [torch.randn(n) for n in (3, 4000, 1)]
    step("triton", fe.GD(0.1), params, [torch.randn_like(p) for p in params], fe.GD(0.1).init_state(params))
    assert counter.grids == [(1 + 4 + 1,)]
    counter.grids.clear()
    empty = [torch.zeros(0), torch.zeros(2, 0)]
    state = fe.GD(0.1).init_state(empty)
    step("triton", fe.GD(0.1), empty, [torch.zeros(0), torch.zeros(2, 0)], state)
    assert counter.grids == [] and float(state["t"]) == 1.0


def _per_tensor(editor, params, grads, state, active, batched, masks):
    """The same kernel, one call (and launch) per tensor: what the multi-tensor launch must equal bit
    for bit. Scaled GD's inv_norm is the whole call's, as in the multi-tensor call."""
    from fastedit.ops.triton.editor_step import editor_step_triton
    rule, hp = es.RULES[type(editor)], es._kernel_hparams(editor)
    inv = es._inv_norm(editor, grads, batched, masks) if rule == 1 else None
    t = state["t"]
    for i, (p, g) in enumerate(zip(params, grads)):
        slots = [[state[s][i]] for s in editor.slots] + [[], []]
        editor_step_triton([p], [g], slots[0], slots[1], t.clone(), active, inv,
                           [masks[i]] if masks is not None else [], rule, *hp, batched)
    t.add_(1 if active is None else active.to(t.dtype))


@triton_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", ["single_mixed", "batched_mixed_masked", "batched_fp64_masked", "single_fp64"])
@pytest.mark.parametrize("editor", editors(), ids=EDITOR_IDS)
def test_triton_multi_tensor_equals_per_tensor_and_reference(monkeypatch, editor, case):
    batched = case.startswith("batched")
    masked = case.endswith("masked")
    dtypes = [torch.float64] if "fp64" in case else [torch.float32, torch.float16, torch.bfloat16]
    E = 4
    active = torch.tensor([True, False, True, True]) if batched else torch.tensor(True)
    params, grads, state, masks = _mt_inputs(editor, dtypes, batched, E, seed=len(case), masked=masked)
    before_p, before_s = [p.clone() for p in params], clone_state(state)

    counter = _count_launches(monkeypatch)
    mt_p, mt_s = [p.clone() for p in params], clone_state(state)
    step("triton", editor, mt_p, grads, mt_s, active, batched=batched, mask=masks)
    assert len(counter.grids) == len(dtypes)

    pt_p, pt_s = [p.clone() for p in params], clone_state(state)
    _per_tensor(editor, pt_p, grads, pt_s, active, batched, masks)
    assert len(counter.grids) == len(dtypes) + sum(p.numel() > 0 for p in params)  # really one per tensor
    for i, (a, b) in enumerate(zip(mt_p, pt_p)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"param {i}: {m}")
    for s in editor.slots:
        for a, b in zip(mt_s[s], pt_s[s]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(mt_s["t"], pt_s["t"])

    # and the reference (dense step on the masked gradient; outside the mask nothing is written)
    g_ref = grads if masks is None else [torch.where(m, g, torch.zeros((), dtype=g.dtype)) for g, m in zip(grads, masks)]
    ref_p, ref_s = editor.step(before_p, g_ref, before_s, active, batched=batched)
    assert torch.equal(mt_s["t"], ref_s["t"])
    full = [torch.ones_like(p, dtype=torch.bool) for p in params] if masks is None else \
        [m.expand_as(p) for m, p in zip(masks, params)]
    for i, (m, got, ref, old) in enumerate(zip(full, mt_p, ref_p, before_p)):
        assert torch.equal(got[~m], old[~m]), f"param {i}: a coordinate outside the mask was written"
        assert_matches(got[m], ref[m], old[m], editor.name, "triton", f"{case} param {i}")
    for s in editor.slots:
        for i, (m, got, ref, old) in enumerate(zip(full, mt_s[s], ref_s[s], before_s[s])):
            assert torch.equal(got[~m], old[~m])
            assert_matches(got[m], ref[m], old[m], editor.name, "triton", f"{case} {s}[{i}]")


@triton_only
def test_triton_tables_are_cached_by_content(monkeypatch):
    from fastedit.ops.triton import editor_step as tes
    monkeypatch.setattr(tes, "_TABLES", type(tes._TABLES)())
    editor = fe.Momentum(0.1, momentum=0.9)
    params = [torch.randn(2, n) for n in (5, 1030)]
    grads = [torch.randn_like(p) for p in params]
    state = editor.init_state(params, batched=True)
    ref_p, ref_s = [p.clone() for p in params], clone_state(state)
    for k in range(3):  # the same lists again: one table, reused
        step("triton", editor, params, grads, state, batched=True)
        ref_p, ref_s = editor.step(ref_p, grads, ref_s, batched=True)
        assert len(tes._TABLES) == 1
    for a, b in zip(params, ref_p):
        assert torch.equal(a, b)
    # other tensors (other addresses or rows) get their own table, even at a reused address
    params2 = [p[:1].clone() for p in params]
    step("triton", editor, params2, [g[:1].clone() for g in grads], editor.init_state(params2, batched=True),
         batched=True)
    assert len(tes._TABLES) == 2
    tab = next(iter(tes._TABLES.values()))
    assert tab.dtype == torch.int64 and tab.numel() == 2 * 8  # 2 tensors x 8 words


@triton_only
def test_triton_interpreter_rejects_device_tensors():
    from fastedit.ops.triton.editor_step import editor_step_triton
    p = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="CPU tensors only"):
        editor_step_triton([p], [p], [], [], torch.zeros((), device="meta"), None, None, [], 0, 0.1, 0, 0, 0, False)
