"""Editors: hand-computed updates, torch.optim cross-checks, masks, batching, dtypes, gradients.

Hyper-parameters are asymmetric (RMSProp β = 0.7, Adam β = (0.9, 0.999)): with β = 0.5 a rule that
swapped β and 1 − β would give the same numbers and pass.
"""
import math

import pytest
import torch

import fastedit as fe
from fastedit.editors import EDITORS, make_editor

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


def run(editor, params, grads_seq, active_seq=None):
    state = editor.init_state(params)
    for i, g in enumerate(grads_seq):
        active = None if active_seq is None else torch.tensor(active_seq[i])
        params, state = editor.step(params, g, state, active)
    return params, state


ALL = [fe.GD(0.1), fe.ScaledGD(0.1), fe.RProp(0.1), fe.RMSProp(0.1, beta=0.7, eps=1e-6),
       fe.Momentum(0.1, momentum=0.9), fe.Adam(0.1, betas=(0.9, 0.999))]
IDS = [e.name for e in ALL]


# -- hand-computed values ---------------------------------------------------------------------------
def test_gd_by_hand():
    (p,), _ = run(fe.GD(0.1), [t(1.0, -2.0)], [[t(0.5, 1.0)]])
    assert torch.equal(p, t(1.0 - 0.05, -2.0 - 0.1))


def test_scaled_gd_by_hand_global_norm():
    # g = ([3], [4]) over two tensors: global norm 5, step lr * g / 5
    params, _ = run(fe.ScaledGD(0.5), [t(0.0), t(1.0)], [[t(3.0), t(4.0)]])
    assert torch.allclose(params[0], t(-0.3), atol=0, rtol=1e-15)
    assert torch.allclose(params[1], t(1.0 - 0.4), atol=0, rtol=1e-15)


def test_scaled_gd_zero_gradient_is_finite():
    (p,), _ = run(fe.ScaledGD(0.5), [t(1.0, 2.0)], [[t(0.0, 0.0)]])
    assert torch.equal(p, t(1.0, 2.0))


def test_rprop_by_hand_and_alias():
    assert fe.SignGD is fe.RProp
    (p,), _ = run(fe.RProp(0.25), [t(1.0, 1.0, 1.0)], [[t(-3.0, 0.0, 1e-9)]])
    assert torch.equal(p, t(1.25, 1.0, 0.75))


def test_rmsprop_two_steps_by_hand():
    lr, beta, eps = 0.1, 0.7, 1e-6
    g1, g2 = 2.0, -1.0
    s1 = g1 * g1                                   # s0 = g0^2
    p1 = 1.0 - lr * g1 / math.sqrt(s1 + eps)
    s2 = beta * s1 + (1 - beta) * g2 * g2
    p2 = p1 - lr * g2 / math.sqrt(s2 + eps)
    (p,), state = run(fe.RMSProp(lr, beta, eps), [t(1.0)], [[t(g1)], [t(g2)]])
    assert p.item() == pytest.approx(p2, rel=1e-15)
    assert state["square_avg"][0].item() == pytest.approx(s2, rel=1e-15)
    assert state["t"].item() == 2


def test_rmsprop_first_step_is_about_sign():
    g = torch.randn(1000, dtype=D) * 10
    g = g + torch.sign(g)  # |g| >= 1 >> sqrt(eps)
    (p,), _ = run(fe.RMSProp(1e-3), [torch.zeros(1000, dtype=D)], [[g]])
    assert torch.allclose(p, -1e-3 * torch.sign(g), rtol=1e-6, atol=0)


def test_momentum_by_hand():
    lr, mu = 0.1, 0.9
    v1 = lr * 1.0
    v2 = lr * 2.0 + mu * v1
    (p,), _ = run(fe.Momentum(lr, mu), [t(0.0)], [[t(1.0)], [t(2.0)]])
    assert p.item() == pytest.approx(-(v1 + v2), rel=1e-15)


def test_adam_two_steps_by_hand():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    g1, g2 = 1.0, 3.0
    m = (1 - b1) * g1
    v = (1 - b2) * g1 * g1
    p = -lr * (m / (1 - b1)) / (math.sqrt(v / (1 - b2)) + eps)  # = -lr * g1 / (|g1| + eps)
    m = b1 * m + (1 - b1) * g2
    v = b2 * v + (1 - b2) * g2 * g2
    p = p - lr * (m / (1 - b1 ** 2)) / (math.sqrt(v / (1 - b2 ** 2)) + eps)
    (out,), _ = run(fe.Adam(lr, betas=(b1, b2), eps=eps), [t(0.0)], [[t(g1)], [t(g2)]])
    assert out.item() == pytest.approx(p, rel=1e-14)


def test_adam_beta1_bounds():
    fe.Adam(0.1, betas=(0.1, 0.9))
    fe.Adam(0.1, betas=(0.999, 0.9))
    for bad in (0.0, 0.05, 1.0, 1.5):
        with pytest.raises(ValueError, match="beta1"):
            fe.Adam(0.1, betas=(bad, 0.9))
    with pytest.raises(ValueError, match="beta1"):
        fe.Adam(0.1, betas=(torch.tensor(0.05), 0.9))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_learning_rates(bad):
    for cls in (fe.GD, fe.ScaledGD, fe.RProp, fe.RMSProp, fe.Momentum, fe.Adam):
        with pytest.raises(ValueError, match="lr"):
            cls(bad)


def test_bad_beta_momentum_types():
    with pytest.raises(ValueError, match="beta"):
        fe.RMSProp(1e-3, beta=1.5)
    with pytest.raises(ValueError, match="momentum"):
        fe.Momentum(1e-3, momentum=1.0)
    with pytest.raises(TypeError):
        fe.GD("fast")
    with pytest.raises(ValueError, match="scalar"):
        fe.GD(torch.ones(2))


# -- cross-checks against torch.optim where the rules coincide ---------------------------------------
def _torch_optim_run(opt_cls, grads, **kw):
    p = torch.nn.Parameter(torch.zeros(5, dtype=D))
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_matches_torch_sgd_and_adam():
    grads = [torch.randn(5, dtype=D) for _ in range(6)]
    ours, _ = run(fe.GD(0.05), [torch.zeros(5, dtype=D)], [[g] for g in grads])
    assert torch.allclose(ours[0], _torch_optim_run(torch.optim.SGD, grads, lr=0.05), rtol=1e-13, atol=1e-15)
    ours, _ = run(fe.Momentum(0.05, 0.8), [torch.zeros(5, dtype=D)], [[g] for g in grads])
    ref = _torch_optim_run(torch.optim.SGD, grads, lr=0.05, momentum=0.8)
    assert torch.allclose(ours[0], ref, rtol=1e-12, atol=1e-15)
    ours, _ = run(fe.Adam(0.05, betas=(0.6, 0.95), eps=1e-8), [torch.zeros(5, dtype=D)], [[g] for g in grads])
    ref = _torch_optim_run(torch.optim.Adam, grads, lr=0.05, betas=(0.6, 0.95), eps=1e-8)
    assert torch.allclose(ours[0], ref, rtol=1e-12, atol=1e-15)


# -- the functional contract --------------------------------------------------------------------------
@pytest.mark.parametrize("editor", ALL, ids=IDS)
def test_step_does_not_modify_inputs(editor):
    params = [torch.randn(3, 4, dtype=D), torch.randn(7, dtype=D)]
    grads = [torch.randn_like(p) for p in params]
    saved = [p.clone() for p in params] + [g.clone() for g in grads]
    state = editor.init_state(params)
    state_saved = {k: (v.clone() if k == "t" else [s.clone() for s in v]) for k, v in state.items()}
    new, _ = editor.step(params, grads, state)
    assert all(torch.equal(a, b) for a, b in zip(params + grads, saved))
    for k, v in state.items():
        if k == "t":
            assert torch.equal(v, state_saved[k])
        else:
            assert all(torch.equal(a, b) for a, b in zip(v, state_saved[k]))
    assert not all(torch.equal(a, b) for a, b in zip(new, params))


@pytest.mark.parametrize("editor", ALL, ids=IDS)
def test_inactive_step_is_bit_identity(editor):
    params = [torch.randn(6, dtype=D)]
    p1, s1 = run(editor, params, [[torch.randn(6, dtype=D)]])
    p2, s2 = editor.step(p1, [torch.randn(6, dtype=D)], s1, torch.tensor(False))
    assert torch.equal(p1[0], p2[0])
    assert torch.equal(s1["t"], s2["t"])
    for slot in editor.slots:
        assert torch.equal(s1[slot][0], s2[slot][0])


@pytest.mark.parametrize("editor", ALL, ids=IDS)
def test_masked_sequence_equals_early_stopped_sequence(editor):
    grads = [[torch.randn(4, dtype=D)] for _ in range(5)]
    stopped, _ = run(editor, [torch.ones(4, dtype=D)], grads[:2])
    masked, state = run(editor, [torch.ones(4, dtype=D)], grads, active_seq=[True, True, False, False, False])
    assert torch.equal(stopped[0], masked[0])
    assert state["t"].item() == 2


@pytest.mark.parametrize("editor", ALL, ids=IDS)
@pytest.mark.parametrize("mask", ["all", "none", "mixed"])
def test_batched_equals_loop_over_edits(editor, mask):
    E = 5
    shapes = [(3, 7), (11,)]  # odd sizes
    params = [torch.randn(E, *s, dtype=D) for s in shapes]
    grads_seq = [[torch.randn(E, *s, dtype=D) for s in shapes] for _ in range(3)]
    masks = {"all": [[True] * E] * 3, "none": [[False] * E] * 3,
             "mixed": [[True, False, True, True, False], [True, True, False, True, False], [False, True, True, True, True]]}[mask]
    state = editor.init_state(params, batched=True)
    batched = params
    for g, m in zip(grads_seq, masks):
        batched, state = editor.step(batched, g, state, torch.tensor(m), batched=True)
    for e in range(E):
        single = [p[e] for p in params]
        st = editor.init_state(single)
        for g, m in zip(grads_seq, masks):
            single, st = editor.step(single, [x[e] for x in g], st, torch.tensor(m[e]))
        for a, b in zip(single, batched):
            assert torch.allclose(a, b[e], rtol=1e-14, atol=1e-15), (editor.name, e)
        assert state["t"][e] == st["t"]


@pytest.mark.parametrize("editor", ALL, ids=IDS)
def test_flat_buffer_equals_tensor_list(editor):
    shapes = [(2, 3), (5,), (1, 1, 4)]
    params = [torch.randn(s, dtype=D) for s in shapes]
    grads = [[torch.randn(s, dtype=D) for s in shapes] for _ in range(3)]
    listed, _ = run(editor, params, grads)
    flat = torch.cat([p.reshape(-1) for p in params])
    state = editor.init_state(flat)
    for g in grads:
        flat, state = editor.step(flat, torch.cat([x.reshape(-1) for x in g]), state)
    assert isinstance(flat, torch.Tensor)
    assert torch.allclose(flat, torch.cat([p.reshape(-1) for p in listed]), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("editor", ALL, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_params_fp32_state(editor, dtype):
    p32 = torch.randn(33, dtype=torch.float32)
    p = p32.to(dtype)
    grads = [torch.randn(33).to(dtype) for _ in range(3)]
    state = editor.init_state([p])
    for slot in editor.slots:
        assert state[slot][0].dtype == torch.float32
    out, ref = [p], [p.float()]
    ref_state = editor.init_state(ref)
    for g in grads:
        out, state = editor.step(out, [g], state)
        ref, ref_state = editor.step(ref, [g.float()], ref_state)
        ref = [ref[0].to(dtype).float()]  # the reference rounds to dtype after every step, as stored
    assert out[0].dtype == dtype
    assert torch.equal(out[0].float(), ref[0])


def test_gradients_flow_to_params_and_hyperparameters():
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    beta = torch.tensor(0.7, dtype=D, requires_grad=True)
    p0 = torch.randn(4, dtype=D, requires_grad=True)

    def f(p0, lr, beta):
        editor = fe.RMSProp(lr, beta=beta, eps=1e-6)
        params, state = [p0], editor.init_state([p0])
        for _ in range(3):
            g = [params[0] ** 3]  # a gradient that depends on the parameters
            params, state = editor.step(params, g, state)
        return params[0].pow(2).sum()

    assert torch.autograd.gradcheck(f, (p0, lr, beta))


def test_editor_helpers():
    e = fe.RMSProp(1e-3, beta=0.7)
    assert e.to_dict() == {"editor": "rmsprop", "lr": 1e-3, "beta": 0.7, "eps": 1e-6}
    assert e.with_hparams(lr=0.5).lr == 0.5 and e.lr == 1e-3
    assert make_editor("rmsprop", lr=0.5) == fe.RMSProp(0.5)
    assert make_editor("SignGD", lr=1.0).name == "rprop"
    assert make_editor("scaled-gd", lr=1.0).name == "scaled_gd"
    assert "RMSProp(lr=0.001" in repr(e)
    with pytest.raises(ValueError, match="unknown editor"):
        make_editor("lbfgs")
    with pytest.raises(ValueError, match="no hyper-parameter"):
        e.with_hparams(momentum=0.1)
    assert set(EDITORS) >= {"gd", "scaled_gd", "rprop", "signgd", "rmsprop", "momentum", "adam"}


def test_step_input_errors():
    e = fe.GD(0.1)
    with pytest.raises(ValueError, match="gradient"):
        e.step([torch.zeros(3)], [torch.zeros(4)], e.init_state([torch.zeros(3)]))
    with pytest.raises(ValueError, match="active"):
        e.step([torch.zeros(2, 3)], [torch.zeros(2, 3)], e.init_state([torch.zeros(2, 3)], batched=True),
               torch.ones(3, dtype=torch.bool), batched=True)
    with pytest.raises(TypeError, match="bool"):
        e.step([torch.zeros(3)], [torch.zeros(3)], e.init_state([torch.zeros(3)]), torch.tensor(1))
    r = fe.RMSProp()
    with pytest.raises(ValueError, match="state"):
        r.step([torch.zeros(3)], [torch.zeros(3)], {"t": torch.zeros(())})
