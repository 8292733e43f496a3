"""The differentiable editor step (fastedit.ops.editor_step, in fastedit/ops/editor_step.py) against Editor.step.

``Editor.step`` (a chain of elementwise torch ops, differentiated by autograd) is the oracle for
values and derivatives; ``editor_step`` is one ``autograd.Function`` with a closed-form backward.

1. Values: bit-identical to ``Editor.step`` (same formulas, same order) for every editor, batched or
   not, active masks all/none/mixed, several consecutive steps, float64/float32, tensor or float
   hyper-parameters, odd shapes; bf16 parameters with fp32 state (forward).
2. ``gradcheck``/``gradgradcheck`` (float64) w.r.t. params, grads, state slots and tensor
   hyper-parameters, at the first step (RMSProp's s₀ = g₀² branch) and a later one, ScaledGD in both
   clamp branches; and each VJP equal to autograd through ``Editor.step`` (rtol 1e-12).
3. torch.func: ``grad``, ``grad(grad)``, ``vmap`` over independent problems, ``vmap(grad)``, against
   the same transforms of ``Editor.step`` (rtol 1e-10).
4. A 3-step unrolled meta-gradient (tiny MLP, inner gradients with create_graph) w.r.t. the initial
   parameters and the hyper-parameters, against the same with ``Editor.step``.
5. ``torch.compile(fullgraph=True)``, forward and backward.
6. Inactive edits: identity, gradients pass through; fewer saved tensors than autograd's graph; the
   fallback for other editors; bad inputs.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, vmap

import fastedit as fe
from fastedit.models import MLP
from fastedit.ops.editor_step import editor_step, supports

F64 = torch.float64
# asymmetric hyper-parameters (β ≠ 1 − β): with β = 0.5 a step that swapped β and 1 − β would pass
EDITORS = [fe.GD(0.1), fe.ScaledGD(0.1), fe.RProp(0.1), fe.RMSProp(0.05, beta=0.7, eps=1e-3),
           fe.Momentum(0.1, momentum=0.8), fe.Adam(0.05, betas=(0.9, 0.999), eps=1e-3)]
IDS = [e.name for e in EDITORS]
SHAPES = [(3, 5), (7,), (1,)]  # odd sizes, a 1-element tensor
E = 3


def tensor_hparams(editor: fe.Editor, dtype=F64, requires_grad=True) -> fe.Editor:
    """The same editor with every hyper-parameter a 0-dim tensor (as Editable Training builds them)."""
    def t(v):
        return torch.tensor(float(v), dtype=dtype, requires_grad=requires_grad)
    hp = {k: (tuple(t(b) for b in v) if k == "betas" else t(v)) for k, v in editor.hparams().items()}
    return type(editor).from_trusted(**hp)


def hp_leaves(editor: fe.Editor) -> list[torch.Tensor]:
    out = []
    for v in editor.hparams().values():
        out += list(v) if isinstance(v, tuple) else [v]
    return [x for x in out if isinstance(x, torch.Tensor)]


def with_hp_leaves(editor: fe.Editor, leaves) -> fe.Editor:
    it = iter(leaves)
    hp = {k: ((next(it), next(it)) if k == "betas" else next(it)) for k in editor.hparams()}
    return type(editor).from_trusted(**hp)


def shapes(batched: bool, e: int = E):
    return [((e,) + s) if batched else s for s in SHAPES]


def masks(batched: bool):
    if batched:
        return {"none": None, "all": torch.ones(E, dtype=torch.bool), "off": torch.zeros(E, dtype=torch.bool),
                "mixed": torch.tensor([True, False, True])}
    return {"none": None, "all": torch.tensor(True), "off": torch.tensor(False)}


def assert_same(a, b, exact=True, **tol):
    if exact:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------------------------------------
# 1. values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_values_are_bit_identical_to_editor_step(editor, batched, dtype):
    gen = torch.Generator().manual_seed(0)
    for hp_kind, ed in (("float", editor), ("tensor", tensor_hparams(editor, requires_grad=False))):
        for name, active in masks(batched).items():
            params = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes(batched)]
            ref_p, ref_s = params, ed.init_state(params, batched=batched)
            new_p, new_s = params, ed.init_state(params, batched=batched)
            for step in range(4):
                grads = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes(batched)]
                if step == 2:  # a zero gradient: sign(0), Adam's v̂ = 0, ScaledGD's clamp
                    grads = [torch.zeros_like(g) for g in grads]
                # with the mixed mask, which edits are active changes from step to step
                act = active if name != "mixed" or step % 2 == 0 else ~active
                ref_p, ref_s = ed.step(ref_p, grads, ref_s, act, batched=batched)
                new_p, new_s = editor_step(ed, new_p, grads, new_s, act, batched=batched)
                where = f"{hp_kind} hparams, mask {name}, step {step}"
                for a, b in zip(new_p, ref_p):
                    assert_same(a, b), where
                assert list(new_s) == list(ref_s)
                for key in ref_s:
                    for a, b in zip(new_s[key] if key != "t" else [new_s[key]],
                                    ref_s[key] if key != "t" else [ref_s[key]]):
                        assert_same(a, b), (where, key)
            if name == "off":  # never active: everything bit for bit as it was
                for a, b in zip(new_p, params):
                    assert_same(a, b)


@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_single_tensor_flat_buffer(editor):
    p, g = torch.randn(11, dtype=F64), torch.randn(11, dtype=F64)
    state = editor.init_state(p)
    out, st = editor_step(editor, p, g, state)
    ref, ref_st = editor.step(p, g, state)
    assert isinstance(out, torch.Tensor)
    assert_same(out, ref)
    assert_same(st["t"], ref_st["t"])


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_bf16_params_fp32_state(editor, batched):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).bfloat16() for s in shapes(batched)]
    state = editor.init_state(params, batched=batched)
    assert all(s.dtype == torch.float32 for k, v in state.items() if k != "t" for s in v)
    ref_p, ref_s, new_p, new_s = params, state, params, state
    active = torch.tensor([True, False, True]) if batched else None
    for _ in range(3):
        grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes(batched)]
        ref_p, ref_s = editor.step(ref_p, grads, ref_s, active, batched=batched)
        new_p, new_s = editor_step(editor, new_p, grads, new_s, active, batched=batched)
        for a, b in zip(new_p, ref_p):
            assert a.dtype == torch.bfloat16
            assert_same(a, b)
        for key in type(editor).slots:
            for a, b in zip(new_s[key], ref_s[key]):
                assert a.dtype == torch.float32
                assert_same(a, b)


# ------------------------------------------------------------------------------------------------
# 2. gradcheck, gradgradcheck, VJPs against autograd through Editor.step
# ------------------------------------------------------------------------------------------------
def step_fn(editor, step, batched, t, active, n):
    """(params, grads, slots, hparams) -> flat outputs of one step, for gradcheck."""
    slots = type(editor).slots

    def fn(*args):
        params, grads = list(args[:n]), list(args[n:2 * n])
        i = 2 * n
        state = {"t": t}
        for name in slots:
            state[name] = list(args[i:i + n])
            i += n
        ed = with_hp_leaves(editor, args[i:])
        new_p, new_s = step(ed, params, grads, state, active, batched=batched)
        return (*new_p, *(x for name in slots for x in new_s[name]))
    return fn


def grad_inputs(editor, batched, gen, small=(2, 3)):
    shp = [((2,) + s) if batched else s for s in [small, (2,)]]
    n = len(shp)
    params = [torch.randn(s, dtype=F64, generator=gen) for s in shp]
    # keep g away from 0 (sign, and √ of a zero second moment, are not differentiable there)
    grads = [(torch.rand(s, dtype=F64, generator=gen) + 0.2) * (torch.randint(0, 2, s, generator=gen) * 2 - 1)
             for s in shp]
    slots = [torch.rand(s, dtype=F64, generator=gen) + 0.1 for _ in type(editor).slots for s in shp]
    hps = hp_leaves(editor)
    inputs = [x.detach().requires_grad_() for x in (*params, *grads, *slots, *hps)]
    return inputs, n, shp


CASES = [(e, b, t) for e in EDITORS for b in (False, True) for t in (0.0, 2.0)]
CASE_IDS = [f"{e.name}-{'batched' if b else 'single'}-t{int(t)}" for e, b, t in CASES]


@pytest.mark.parametrize("editor,batched,t0", CASES, ids=CASE_IDS)
def test_gradcheck_and_gradgradcheck(editor, batched, t0):
    gen = torch.Generator().manual_seed(2)
    ed = tensor_hparams(editor)
    if isinstance(editor, fe.ScaledGD):  # both branches of the clamp: ‖g‖ > eps and ‖g‖ < eps
        eds = [ed, with_hp_leaves(ed, [hp_leaves(ed)[0], torch.tensor(50.0, dtype=F64, requires_grad=True)])]
    else:
        eds = [ed]
    for ed in eds:
        inputs, n, _ = grad_inputs(ed, batched, gen)
        t = torch.full((2,) if batched else (), t0, dtype=F64)
        active = torch.tensor([True, False]) if batched else None
        fn = step_fn(ed, editor_step, batched, t, active, n)
        assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
        assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("editor,batched,t0", CASES, ids=CASE_IDS)
def test_vjp_equals_autograd_through_editor_step(editor, batched, t0):
    """First and second order: the VJP, and the gradient of ⟨VJP, w⟩ w.r.t. every input."""
    gen = torch.Generator().manual_seed(3)
    ed = tensor_hparams(editor)
    inputs, n, _ = grad_inputs(ed, batched, gen)
    t = torch.full((2,) if batched else (), t0, dtype=F64)
    for active in ([None, torch.tensor([True, False]), torch.tensor([False, False])] if batched
                   else [None, torch.tensor(True), torch.tensor(False)]):
        results = []
        for step in (editor_step, lambda e, *a, **k: e.step(*a, **k)):
            fn = step_fn(ed, step, batched, t, active, n)
            outs = fn(*inputs)
            ups = [torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
            first = torch.autograd.grad(outs, inputs, ups, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            w = sum((f * torch.cos(torch.arange(f.numel(), dtype=F64).reshape(f.shape))).sum() for f in first)
            second = torch.autograd.grad(w, inputs, allow_unused=True, materialize_grads=True)
            results.append((first, second))
        for (a1, a2), (b1, b2) in [results]:
            for x, y in zip(a1 + a2, b1 + b2):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("used", ["params", "state", "some"])
@pytest.mark.parametrize("editor", [e for e in EDITORS if type(e).slots], ids=lambda e: e.name)
def test_unused_outputs(editor, used):
    """Outputs that do not reach the loss (the last step's state; or θ' when only the state is used)
    get no incoming gradient (None); first and second order still match autograd."""
    gen = torch.Generator().manual_seed(9)
    ed = tensor_hparams(editor)
    inputs, n, _ = grad_inputs(ed, True, gen)
    t = torch.ones(2, dtype=F64)
    results = []
    for step in (editor_step, lambda e, *a, **k: e.step(*a, **k)):
        outs = step_fn(ed, step, True, t, torch.tensor([True, False]), n)(*inputs)
        picked = {"params": outs[:n], "state": outs[n:], "some": outs[1:n + 1]}[used]
        loss = sum((torch.sin(o) * (j + 1)).sum() for j, o in enumerate(picked))
        first = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True, materialize_grads=True)
        w = sum((f ** 2).sum() for f in first)
        results.append(first + torch.autograd.grad(w, inputs, allow_unused=True, materialize_grads=True))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_inactive_edit_passes_gradient_through(editor):
    """active False: θ' = θ and state' = state, so ∂θ = ∂θ', ∂state = ∂state', ∂g = ∂hparams = 0."""
    gen = torch.Generator().manual_seed(4)
    ed = tensor_hparams(editor)
    inputs, n, _ = grad_inputs(ed, True, gen)
    t = torch.ones(2, dtype=F64)
    fn = step_fn(ed, editor_step, True, t, torch.tensor([False, False]), n)
    outs = fn(*inputs)
    ups = [torch.randn(o.shape, dtype=F64, generator=gen) for o in outs]
    got = torch.autograd.grad(outs, inputs, ups, allow_unused=True, materialize_grads=True)
    n_slots = len(type(editor).slots) * n
    for u, d in zip(ups[:n], got[:n]):
        assert torch.equal(u, d)
    for d in got[n:2 * n]:
        assert torch.equal(d, torch.zeros_like(d))
    for u, d in zip(ups[n:], got[2 * n:2 * n + n_slots]):
        assert torch.equal(u, d)
    for d in got[2 * n + n_slots:]:
        assert torch.equal(d, torch.zeros_like(d))


# ------------------------------------------------------------------------------------------------
# 3. torch.func
# ------------------------------------------------------------------------------------------------
def func_loss(editor, step):
    """A scalar of (params, grads, lr) after two steps from a non-zero state; lr is a tensor."""
    cls = type(editor)

    def loss(p, g, lr, w):
        hp = dict(editor.hparams())
        hp["lr"] = lr
        ed = cls.from_trusted(**hp)
        state = ed.init_state([p])
        state = {k: (v + 1 if k == "t" else [torch.full_like(x, 0.3) for x in v]) for k, v in state.items()}
        for _ in range(2):
            gg = g * p + torch.sin(p)  # gradients depending on p: second-order terms
            (p,), state = step(ed, [p], [gg], state)
        slots = sum((x * x).sum() for k, v in state.items() if k != "t" for x in v)
        return (w * p).sum() ** 2 + slots
    return loss


STEPS = {"closed_form": lambda e, *a: editor_step(e, *a), "reference": lambda e, *a: e.step(*a)}


@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_torch_func_transforms_match_reference(editor):
    gen = torch.Generator().manual_seed(5)
    p, g, w = (torch.randn(5, dtype=F64, generator=gen) for _ in range(3))
    lr = torch.tensor(0.1, dtype=F64)
    P, G = torch.randn(4, 5, dtype=F64, generator=gen), torch.randn(4, 5, dtype=F64, generator=gen)
    LR = torch.rand(4, dtype=F64, generator=gen) * 0.1 + 0.01
    out = {}
    for name, step in STEPS.items():
        loss = func_loss(editor, step)
        res = [loss(p, g, lr, w)]
        res += list(grad(loss, argnums=(0, 1, 2))(p, g, lr, w))
        for arg in (0, 1, 2):  # grad(grad): ∂/∂(p, g, lr) of Σ ∂loss/∂arg
            res += list(grad(lambda *a: grad(loss, argnums=arg)(*a).sum(), argnums=(0, 1, 2))(p, g, lr, w))
        res.append(vmap(loss, in_dims=(0, 0, 0, None))(P, G, LR, w))
        res += list(vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, 0, None))(P, G, LR, w))
        out[name] = res
    for a, b in zip(out["closed_form"], out["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_vmap_over_batched_edits(editor):
    """vmap (and vmap(grad)) over independent problems, each a batched step with a mixed active mask."""
    gen = torch.Generator().manual_seed(6)
    P = [torch.randn((2,) + s, dtype=F64, generator=gen) for s in shapes(True)]
    G = [torch.randn((2,) + s, dtype=F64, generator=gen) for s in shapes(True)]
    active = torch.tensor([[True, False, True], [False, True, True]])

    LR = torch.tensor([0.05, 0.02], dtype=F64)

    def run(step):
        def one(ps, gs, lr, a):
            ed = with_hp_leaves(editor, [lr] + hp_leaves(tensor_hparams(editor, requires_grad=False))[1:])
            state = ed.init_state(ps, batched=True)
            for _ in range(2):
                gs = [g + 0.1 * torch.tanh(p) for g, p in zip(gs, ps)]  # depends on the parameters
                ps, state = step(ed, ps, gs, state, a, batched=True)
            return ps

        def loss(ps, gs, lr, a):
            return sum((torch.sin(p) * (j + 1)).sum() for j, p in enumerate(one(ps, gs, lr, a)))
        return (*vmap(one)(P, G, LR, active), *vmap(grad(loss, argnums=(0, 1, 2)))(P, G, LR, active))
    for a, b in zip(run(editor_step), run(lambda e, *x, **k: e.step(*x, **k))):
        if isinstance(a, (list, tuple)):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. an unrolled meta-gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_three_step_meta_gradient_matches_editor_step(editor):
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 4, dtype=F64, generator=gen), torch.randn(6, 2, dtype=F64, generator=gen)
    w1, w2 = torch.randn(4, 5, dtype=F64, generator=gen), torch.randn(5, 2, dtype=F64, generator=gen)

    def inner_loss(theta):
        return ((torch.tanh(x @ theta[0]) @ theta[1] - y) ** 2).mean()

    results = []
    for step in (editor_step, lambda e, *a, **k: e.step(*a, **k)):
        theta0 = [w1.clone().requires_grad_(), w2.clone().requires_grad_()]
        ed = tensor_hparams(editor)
        hps = hp_leaves(ed)
        theta, state = theta0, ed.init_state([t.detach() for t in theta0])
        for _ in range(3):
            grads = torch.autograd.grad(inner_loss(theta), theta, create_graph=True)
            theta, state = step(ed, theta, grads, state)
        outer = inner_loss(theta) + sum((s ** 2).sum() for k, v in state.items() if k != "t" for s in v)
        results.append(torch.autograd.grad(outer, theta0 + hps))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# 5. torch.compile
# ------------------------------------------------------------------------------------------------
COMPILE_CASES = [(e, "aot_eager") for e in EDITORS] + [(fe.RMSProp(0.05, beta=0.7), "inductor")]  # inductor: cold ≈ 5–15 s each


@pytest.mark.parametrize("editor,backend", [pytest.param(e, b, id=f"{e.name}-{b}", marks=[pytest.mark.slow] if b == "inductor" else [])
                                            for e, b in COMPILE_CASES])
def test_torch_compile_fullgraph_forward_and_backward(editor, backend):
    """fullgraph=True: no graph break in editor_step; AOTAutograd traces the closed-form backward."""
    torch._dynamo.reset()
    ed = tensor_hparams(editor, dtype=torch.float32)
    lr = hp_leaves(ed)[0]

    def f(p, g, state, active):
        new_p, new_s = editor_step(ed, p, g, state, active, batched=True)
        return new_p, new_s

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(8)
    p = [torch.randn((E,) + s, generator=gen).requires_grad_() for s in SHAPES]
    g = [torch.randn((E,) + s, generator=gen).requires_grad_() for s in SHAPES]
    state = ed.init_state([x.detach() for x in p], batched=True)
    active = torch.tensor([True, False, True])
    outs = []
    for fn in (compiled, f):
        new_p, new_s = fn(p, g, state, active)
        loss = sum((x ** 2).sum() for x in new_p)
        outs.append((new_p, torch.autograd.grad(loss, p + g + [lr], allow_unused=True, materialize_grads=True)))
    for a, b in zip(outs[0][0] + list(outs[0][1]), outs[1][0] + list(outs[1][1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 6. memory, fallback, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_saves_fewer_tensors_than_autograd(editor):
    """Bytes saved for backward by a 3-step unroll (hparams learnable, g from create_graph)."""
    theta0 = [torch.randn(64, 33, dtype=F64, requires_grad=True)]

    def saved_bytes(step):
        ed = tensor_hparams(editor)
        seen: dict[int, int] = {}

        def pack(t):
            seen[id(t.untyped_storage()) if t.layout == torch.strided else id(t)] = t.numel() * t.element_size()
            return t
        theta, state = theta0, ed.init_state([theta0[0].detach()])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for _ in range(3):
                g = [th * 0.5 + 1.0 for th in theta]  # a differentiable "gradient"
                theta, state = step(ed, theta, g, state)
        return sum(seen.values())
    mine = saved_bytes(editor_step)
    ref = saved_bytes(lambda e, *a: e.step(*a))
    # per step: g, plus the old slots of RMSProp (s), Momentum (v, for ∂μ) and Adam (m, v); the
    # rest (t, active, 0-dim hparams) is a few bytes
    per_step = {"gd": 1, "scaled_gd": 1, "rprop": 1, "rmsprop": 2, "momentum": 2, "adam": 3}[editor.name]
    assert mine <= 3 * per_step * theta0[0].numel() * 8 + 128, (mine, ref)
    if editor.name in ("scaled_gd", "rmsprop", "adam"):  # autograd keeps g², √(s+ε), m̂, v̂, … too
        assert mine < 0.6 * ref, (mine, ref)
    else:  # autograd saves the same tensors for these simple rules
        assert mine <= ref + 64, (mine, ref)


def test_other_editors_fall_back_to_their_step():
    class Halving(fe.GD):
        def _rule(self, g, slots, t, context):
            return 0.5 * self.lr * g, []
    ed = Halving(0.2)
    assert not supports(ed) and supports(fe.GD(0.2)) and supports(fe.SignGD(0.1))
    p, g = torch.randn(4), torch.randn(4)
    out, _ = editor_step(ed, p, g, ed.init_state(p))
    assert_same(out, p - 0.1 * g)


def test_bad_inputs_raise_like_editor_step():
    ed = fe.RMSProp(0.1)
    p = [torch.randn(2, 3)]
    state = ed.init_state(p, batched=True)
    with pytest.raises(ValueError, match="shape"):
        editor_step(ed, p, [torch.randn(3, 2)], state, batched=True)
    with pytest.raises(ValueError, match="active must have shape"):
        editor_step(ed, p, [torch.randn(2, 3)], state, torch.ones(3, dtype=torch.bool), batched=True)
    with pytest.raises(TypeError, match="bool"):
        editor_step(ed, p, [torch.randn(2, 3)], state, torch.ones(2), batched=True)
    with pytest.raises(ValueError, match="state does not match"):
        editor_step(ed, p, [torch.randn(2, 3)], {"t": torch.zeros(2)}, batched=True)
    with pytest.raises(ValueError, match="gradients"):
        editor_step(ed, p, [], state, batched=True)


# ------------------------------------------------------------------------------------------------
# 7. Editable Training with and without the closed form
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rematerialize", [False, True])
@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_editable_training_closed_form_equals_autograd_step(editor, rematerialize):
    """EditableTraining(closed_form=True) (the default) and closed_form=False: same objective and
    meta-gradients (model parameters and learnable hyper-parameters), float64; tests/api/test_training.py
    checks the default against an independent naive unrolled implementation."""
    learn = {"adam": ("lr", "beta1", "beta2", "eps"), "rmsprop": ("lr", "beta", "eps"),
             "momentum": ("lr", "momentum"), "scaled_gd": ("lr", "eps")}.get(editor.name, ("lr",))
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(16, 6, dtype=F64, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    edit_x, edit_y = x[:2], (y[:2] + 1) % 4
    out = []
    for closed_form in (True, False):
        torch.manual_seed(0)
        model = MLP(6, (8, 8), 4).double()
        et = fe.EditableTraining(model, params=["features.2.weight", "features.2.bias", "classifier.weight"],
                                 editor=editor, max_steps=3, learn=learn, rematerialize=rematerialize,
                                 early_exit=False, closed_form=closed_form)
        loss, stats = et(x, y, edit_x, edit_y)
        assert stats["edit_steps"] >= 1  # the edits take steps: the meta-gradient goes through them
        names = [n for n, p in et.named_parameters()]
        out.append((loss, torch.autograd.grad(loss, list(et.parameters()), allow_unused=True,
                                              materialize_grads=True), names))
    (l1, g1, n1), (l2, g2, _) = out
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    for name, a, b in zip(n1, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_bf16_backward_error_is_like_autograds(editor):
    """bf16 parameters and gradients, fp32 state: the closed-form gradients' error against a float64
    ground truth is at most 2× autograd-through-Editor.step's error plus 1 bf16 ulp, elementwise."""
    gen = torch.Generator().manual_seed(11)
    P = [torch.randn((E,) + s, generator=gen).bfloat16() for s in SHAPES]
    G = [torch.randn((E,) + s, generator=gen).bfloat16() for s in SHAPES]
    slots = {name: [torch.rand(p.shape, generator=gen) + 0.1 for p in P] for name in type(editor).slots}
    active = torch.tensor([True, False, True])

    def grads_of(step, dtype, param_dtype):
        ed = tensor_hparams(editor, dtype=dtype)
        p = [x.to(param_dtype).requires_grad_() for x in P]
        g = [x.to(param_dtype).requires_grad_() for x in G]
        state = {"t": torch.ones(E, dtype=dtype), **{k: [s.to(dtype) for s in v] for k, v in slots.items()}}
        new_p, new_s = step(ed, p, g, state, active, batched=True)
        loss = sum((x.to(dtype) ** 2).sum() for x in new_p) + sum(
            (x ** 2).sum() for k, v in new_s.items() if k != "t" for x in v)
        return torch.autograd.grad(loss, p + g + hp_leaves(ed), allow_unused=True, materialize_grads=True)
    mine = grads_of(editor_step, torch.float32, torch.bfloat16)
    ref = grads_of(lambda e, *a, **k: e.step(*a, **k), torch.float32, torch.bfloat16)
    truth = grads_of(lambda e, *a, **k: e.step(*a, **k), F64, F64)
    for a, b, c in zip(mine, ref, truth):
        assert a.dtype == b.dtype
        ulp = c.abs().bfloat16().double() * 2.0 ** -7 if a.dtype == torch.bfloat16 else c.abs() * 2.0 ** -23
        err, ref_err = (a.double() - c).abs(), (b.double() - c).abs()
        assert bool((err <= 2 * ref_err + ulp + 1e-30).all()), (err - 2 * ref_err - ulp).max()


# ------------------------------------------------------------------------------------------------
# 8. any strides
# ------------------------------------------------------------------------------------------------
def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values, non-contiguous: channels_last for 4-D, a transposed copy for 2-D."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 2:
        return x.t().contiguous().t()
    return x


@pytest.mark.parametrize("editor", EDITORS, ids=IDS)
def test_non_contiguous_inputs(editor):
    """Parameters, gradients and state of any strides (a channels_last weight, a transposed view): the
    values and every gradient equal those on contiguous copies, bit for bit (the step is elementwise;
    Scaled GD's norm sums the gradient in memory order, so there: rtol 1e-15), for two steps."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 2, 2), (5, 7), (6,)]
    params = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=F64, generator=gen) for s in shapes] for _ in range(2)]
    exact = editor.name != "scaled_gd"

    def run(layout):
        p = [layout(x).requires_grad_() for x in params]
        gs = [[layout(x).requires_grad_() for x in g] for g in grads]
        state = editor.init_state(p)
        for slot in editor.slots:
            state[slot] = [layout(torch.rand(s, dtype=F64, generator=torch.Generator().manual_seed(k)))
                           for k, s in enumerate(shapes)]
        theta = p
        for g in gs:
            theta, state = editor_step(editor, theta, g, state)
        loss = sum((t * torch.arange(t.numel(), dtype=F64).reshape(t.shape)).sum() for t in theta)
        loss = loss + sum(s.square().sum() for slot in editor.slots for s in state[slot])
        inputs = p + [x for g in gs for x in g]
        return theta, state, torch.autograd.grad(loss, inputs, allow_unused=True)

    theta_nc, state_nc, d_nc = run(_strided)
    theta_c, state_c, d_c = run(lambda x: x.clone())
    assert not params[0].contiguous(memory_format=torch.channels_last).is_contiguous()
    outs_nc = theta_nc + [s for slot in editor.slots for s in state_nc[slot]] + [x for x in d_nc if x is not None]
    outs_c = theta_c + [s for slot in editor.slots for s in state_c[slot]] + [x for x in d_c if x is not None]
    assert len(outs_nc) == len(outs_c) and [x is None for x in d_nc] == [x is None for x in d_c]
    for a, b in zip(outs_nc, outs_c):
        assert_same(a.detach(), b.detach(), exact=exact, rtol=1e-15, atol=1e-15)
