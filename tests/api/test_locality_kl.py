"""locality_kl (Editable Training's L_loc) against F.kl_div over log-softmaxes: values and gradients
in float64 on fresh random logits, all rows or a subset, chunk boundaries that leave ragged tails,
half precision against the float32 computation, and the first-order-only contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastedit.locality_kl as lk
from fastedit.locality_kl import locality_kl


def _reference(ref, edited, rows):
    dtype = torch.promote_types(edited.dtype, torch.float32)
    r, e = (ref, edited) if rows is None else (ref[rows], edited[rows])
    return F.kl_div(F.log_softmax(e.to(dtype), -1), F.log_softmax(r.detach().to(dtype), -1), log_target=True,
                    reduction="batchmean")


def _logits(n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ref = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    edited = (ref + torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return ref.to(dtype), edited


@pytest.mark.parametrize("chunk", [None, 7, 64])   # None: the default (one chunk here)
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("n,c", [(1, 2), (13, 10), (37, 129)])
def test_value_and_gradient_match_kl_div_float64(monkeypatch, chunk, subset, n, c):
    if chunk is not None:  # chunk elements → rows per chunk that do not divide the row count
        monkeypatch.setattr(lk, "CHUNK_ELEMENTS", chunk * c)
    ref, edited = _logits(n, c, torch.float64, seed=n * c)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: max(1, n // 2)] if subset else None
    ours = locality_kl(ref, edited, rows)
    theirs = _reference(ref, edited, rows)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    w = torch.tensor(0.37, dtype=torch.float64)  # a grad_output other than 1, as c_loc gives
    (g_ours,) = torch.autograd.grad(w * ours, edited)
    (g_theirs,) = torch.autograd.grad(w * theirs, edited)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-15)
    if subset:  # rows not measured get exactly no gradient
        unmeasured = torch.ones(n, dtype=torch.bool)
        unmeasured[rows] = False
        assert bool((g_ours[unmeasured] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(monkeypatch, dtype):
    monkeypatch.setattr(lk, "CHUNK_ELEMENTS", 5 * 50)
    ref, edited = _logits(23, 50, dtype, seed=3)
    ours = locality_kl(ref, edited)
    theirs = _reference(ref, edited, None)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    (g_ours,) = torch.autograd.grad(ours, edited)
    (g_theirs,) = torch.autograd.grad(theirs, edited)
    assert g_ours.dtype == dtype
    # both round the float32 gradient once to the logits' dtype; the sums differ in order only
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=tol, atol=tol * float(g_theirs.abs().max()))


def test_equal_logits_give_zero_and_no_grad_needed():
    ref, edited = _logits(9, 31, torch.float32, seed=5)
    with torch.no_grad():
        same = locality_kl(ref, ref.clone())
    assert abs(float(same)) < 1e-6
    assert not same.requires_grad


def test_first_order_only_and_bad_inputs():
    ref, edited = _logits(4, 6, torch.float64, seed=7)
    with pytest.raises(RuntimeError, match="first-order gradient only"):
        torch.autograd.grad(locality_kl(ref, edited) + (edited ** 2).sum(), edited, create_graph=True)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        locality_kl(ref[None], edited[None])
    with pytest.raises(ValueError, match="no row"):
        locality_kl(ref, edited, torch.zeros(0, dtype=torch.int64))


def test_inside_torch_func_transforms_it_is_the_plain_composition():
    """torch.func.grad (which differentiates with create_graph) gets F.kl_div's value and gradient,
    also through a whole Editable Training step, equal to plain autograd's."""
    from torch.func import functional_call, grad

    import fastedit as fe
    from fastedit.models import MLP

    ref, edited = _logits(11, 7, torch.float64, seed=9)
    rows = torch.tensor([0, 3, 10])
    g_func = grad(lambda e: locality_kl(ref, e, rows))(edited.detach())
    (g_plain,) = torch.autograd.grad(_reference(ref, edited, rows), edited)
    torch.testing.assert_close(g_func, g_plain, rtol=1e-12, atol=1e-15)

    torch.manual_seed(0)
    model = MLP(16, 32, 10).double()
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    edit_x, edit_y = torch.randn(2, 16, dtype=torch.float64), torch.tensor([3, 4])
    et = fe.EditableTraining(model, params=[n for n, _ in model.named_parameters()][-2:], editor=fe.RMSProp(0.03),
                             max_steps=3, c_edit=1.0, c_loc=1.0)
    params = {k: v.detach() for k, v in et.named_parameters()}
    by_func = grad(lambda p: functional_call(et, p, (x, y, edit_x, edit_y))[0])(params)
    loss, stats = et(x, y, edit_x, edit_y)
    assert stats["loss_loc"] > 0
    by_autograd = dict(zip(params, torch.autograd.grad(loss, list(et.parameters()))))
    for name, g in by_func.items():
        torch.testing.assert_close(g, by_autograd[name], rtol=1e-10, atol=1e-12, msg=name)
