"""The per-row edit constraint op ``edit_constraint`` (fastedit/ops/edit_constraint.py): the compiled
op ``torch.ops.fastedit.edit_constraint`` (values, ties, NaN/inf rows, strides, bad inputs, opcheck,
gradients, torch.func, torch.compile, CUDA), its autograd.Function wrapper, and the dispatched entry
``fastedit.ops.edit_constraint`` on every backend that runs here.

Tests of the compiled op skip when fastedit._C is not built, except in CI (see
tests/packaging/test_extension.py; ``require_extension`` is in tests/helpers.py).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from helpers import require_extension

import fastedit as fe
from fastedit.ops import _extension as ext
from fastedit.ops.dispatch import BackendError
from fastedit.ops.edit_constraint import compiled as wrapped_op  # the autograd.Function wrapper of the op

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HAS_EXT = ext.load() is not None and ext.has_cpu_ops()


@pytest.fixture
def op():
    require_extension()
    return torch.ops.fastedit.edit_constraint


def reference(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch: max_i z_i - z_target, in float32 (float64 for float64), cast back."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    return (z.amax(1) - z.gather(1, target[:, None])[:, 0]).to(logits.dtype)


# ------------------------------------------------------------------------------------------------
# The compiled op and its wrapper


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("C", [1, 3, 10, 1001])
def test_matches_reference(op, dtype, B, C):
    logits = (torch.randn(B, C, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, C, (B,))
    out = op(logits, target)
    assert out.dtype == dtype and out.shape == (B,)
    torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(wrapped_op(logits, target), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_and_sign(op, dtype):
    B, C = 300, 13
    logits = torch.randint(0, 3, (B, C)).to(dtype)  # many ties of the maximum
    target = torch.randint(0, C, (B,))
    target[::3] = logits[::3].float().argmax(1)  # make a third of the targets argmaxes
    out = op(logits, target)
    torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0)
    is_argmax = logits.gather(1, target[:, None])[:, 0] == logits.amax(1)
    assert torch.equal(out <= 0, is_argmax)
    assert torch.equal(out == 0, is_argmax)
    assert (out >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 5, 37])
def test_nan_and_inf_rows(op, dtype, C):
    B = 12
    logits = torch.randn(B, C).to(dtype)
    target = torch.randint(0, C, (B,))
    logits[0, 0] = float("nan")
    logits[1, C - 1] = float("nan")
    logits[2, target[2]] = float("nan")
    logits[3, :] = float("nan")
    logits[4, C // 2] = float("inf")
    logits[5, target[5]] = float("inf")
    logits[6, :] = float("-inf")
    logits[7, target[7]] = float("-inf")
    logits[8, C // 2] = float("-inf")
    logits[9, :] = float("inf")
    out = op(logits, target)
    expected = reference(logits, target)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out[:4].isnan().all(), "a NaN in a row must give NaN"
    assert not out[10:].isnan().any()


def test_non_contiguous_inputs_and_empty_batch(op):
    logits = torch.randn(40, 33).t()  # [33, 40], not contiguous
    target = torch.randint(0, 40, (66,))[::2]
    assert not logits.is_contiguous() and not target.is_contiguous()
    torch.testing.assert_close(op(logits, target), reference(logits, target), rtol=0, atol=0)
    empty = op(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("threads", [1, 2])
def test_large_batch_uses_parallel_rows(op, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = torch.randn(5000, 97)
        target = torch.randint(0, 97, (5000,))
        torch.testing.assert_close(op(logits, target), reference(logits, target), rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 3), torch.zeros(4, dtype=torch.int32)), "target must be int64"),
        (lambda: (torch.randn(4, 3), torch.zeros(4)), "target must be int64"),
        (lambda: (torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "shape mismatch"),
        (lambda: (torch.randn(4, 3), torch.tensor([0, 1, 3, 0])), r"target\[2\] = 3 is out of range"),
        (lambda: (torch.randn(4, 3), torch.tensor([0, -1, 2, 0])), r"target\[1\] = -1 is out of range"),
        (lambda: (torch.randn(12), torch.zeros(12, dtype=torch.long)), "logits must be 2-D"),
        (lambda: (torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long)), "logits must be 2-D"),
        (lambda: (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)), "target must be 1-D"),
        (lambda: (torch.randint(0, 5, (4, 3)), torch.zeros(4, dtype=torch.long)),
         "logits must be float32, float64, float16 or bfloat16"),
        (lambda: (torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), r"at least one class"),
    ],
    ids=["target-int32", "target-float", "shape-mismatch", "target-too-large", "target-negative",
         "logits-1d", "logits-3d", "target-2d", "logits-int", "no-classes"],
)
def test_bad_inputs_raise(op, make, message):
    logits, target = make()
    with pytest.raises(RuntimeError, match=message):
        op(logits, target)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(op, dtype):
    logits = torch.randn(9, 11).to(dtype)
    target = torch.randint(0, 11, (9,))
    torch.library.opcheck(op, (logits, target))
    torch.library.opcheck(op, (logits.clone().requires_grad_(), target))


def test_gradient_matches_reference(op):
    # Without ties: the exact gradient; with ties: the maximum's gradient shared like torch.amax.
    for logits in (torch.randn(17, 6, dtype=torch.float64),
                   torch.randint(0, 2, (17, 6)).to(torch.float64)):
        target = torch.randint(0, 6, (17,))
        weights = torch.randn(17, dtype=torch.float64)
        mine = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()
        (op(mine, target) * weights).sum().backward()
        (reference(theirs, target) * weights).sum().backward()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: op(z, torch.tensor([0, 3, 1, 2, 2])), (logits,))


def test_wrapper_under_torch_func(op):
    target = torch.tensor([0, 3, 1, 2, 2])
    weights = torch.randn(5, dtype=torch.float64)

    def mine(z):
        return (wrapped_op(z, target) * weights).sum()

    def theirs(z):
        return (reference(z, target) * weights).sum()

    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(mine)(z), torch.func.grad(theirs)(z))
    batch = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(torch.func.grad(mine))(batch),
                               torch.vmap(torch.func.grad(theirs))(batch))
    torch.testing.assert_close(torch.vmap(lambda b: wrapped_op(b, target))(batch),
                               torch.stack([reference(b, target) for b in batch]))
    both_batched = torch.randint(0, 4, (3, 5))
    torch.testing.assert_close(torch.vmap(wrapped_op)(batch, both_batched),
                               torch.stack([reference(b, t) for b, t in zip(batch, both_batched)]))
    torch.testing.assert_close(torch.vmap(wrapped_op, in_dims=(None, 0))(z, both_batched),
                               torch.stack([reference(z, t) for t in both_batched]))
    torch.testing.assert_close(torch.vmap(op, in_dims=(2, None))(batch.permute(1, 2, 0), target),
                               torch.stack([reference(b, target) for b in batch]))
    with pytest.raises(RuntimeError, match="per sample"):
        torch.vmap(op)(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.long))
    # second order: the gradient is piecewise constant, its own gradient is zero
    hess = torch.func.grad(lambda z: (torch.func.grad(mine)(z) * z).sum())(z)
    torch.testing.assert_close(hess, torch.func.grad(mine)(z))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(op, backend):
    def loss(logits, target):
        l_e = wrapped_op(logits.log_softmax(1), target)  # the autograd.Function wrapper
        raw = torch.ops.fastedit.edit_constraint(logits, target)  # the op itself
        return torch.relu(l_e).mean() + 0.5 * raw.mean(), l_e

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    for B in (8, 9):
        logits = torch.randn(B, 10)
        target = torch.randint(0, 10, (B,))
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        value, l_e = compiled(x1, target)
        ref_value, ref_l_e = loss(x2, target)
        torch.testing.assert_close(l_e, ref_l_e)
        torch.testing.assert_close(value, ref_value)
        torch.testing.assert_close(l_e, reference(logits.log_softmax(1), target), rtol=1e-5, atol=1e-5)
        value.backward()
        ref_value.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(op, dtype):
    if not ext.has_cuda_ops():
        pytest.skip("fastedit._C was built without its CUDA sources")
    for B, C in [(1, 1), (7, 3), (129, 1001), (3000, 37)]:
        logits = (torch.randn(B, C, device="cuda", dtype=torch.float64) * 4).to(dtype)
        target = torch.randint(0, C, (B,), device="cuda")
        logits[0, 0] = float("nan") if B > 1 else logits[0, 0]
        out = op(logits, target)
        torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match=r"target\[1\] = 5 is out of range"):
        op(torch.randn(2, 5, device="cuda"), torch.tensor([0, 5], device="cuda"))
    torch.library.opcheck(op, (torch.randn(9, 11, device="cuda", dtype=dtype),
                               torch.randint(0, 11, (9,), device="cuda")))


# ------------------------------------------------------------------------------------------------
# The dispatched entry fastedit.ops.edit_constraint


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dispatched_entry_on_each_backend(backend, dtype):
    logits = (torch.randn(37, 11, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, 11, (37,))
    out = fe.ops.edit_constraint(logits, target, backend=backend)
    assert out.dtype == dtype and out.shape == (37,)
    torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0)
    with fe.ops.use_backend(backend):
        torch.testing.assert_close(fe.ops.edit_constraint(logits, target), out, rtol=0, atol=0)


def test_reference_takes_leading_dimensions():
    """The dispatched op sends logits that are not [B, C] to the reference (any leading dims)."""
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (3, 5))
    module = importlib.import_module("fastedit.ops.edit_constraint")
    want = torch.stack([reference(z, t) for z, t in zip(logits, target)])
    torch.testing.assert_close(module.reference(logits, target), want, rtol=0, atol=0)
    torch.testing.assert_close(fe.ops.edit_constraint(logits, target), want, rtol=0, atol=0)


def test_dispatched_entry_is_differentiable_on_each_backend():
    logits = torch.randn(9, 6, dtype=torch.float64)
    target = torch.randint(0, 6, (9,))
    grads = {}
    for backend in ("reference", "cpu") if HAS_EXT else ("reference",):
        z = logits.clone().requires_grad_()
        fe.ops.edit_constraint(z, target, backend=backend).sum().backward()
        grads[backend] = z.grad
    for g in grads.values():
        torch.testing.assert_close(g, grads["reference"], rtol=0, atol=0)


def test_forced_backend_without_the_op_fails_loudly():
    """Triton has no edit_constraint kernel: forcing it (per call) names the reason."""
    with pytest.raises(BackendError, match="backend='triton'"):
        fe.ops.edit_constraint(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="triton")


def test_small_cpu_logits_take_the_reference_unless_a_backend_is_forced(monkeypatch):
    """Below CPU_FUSED_MIN_LOGITS the dispatcher's choice on the CPU is the reference (faster there);
    a forced backend (keyword, use_backend, FASTEDIT_BACKEND) and larger logits run the compiled op.
    Either way the values and gradients are the reference's."""
    require_extension()
    module = importlib.import_module("fastedit.ops.edit_constraint")
    calls = []
    real = module.compiled

    def spy(logits, target):
        calls.append(tuple(logits.shape))
        return real(logits, target)
    monkeypatch.setattr(module, "compiled", spy)
    monkeypatch.setattr(module, "CPU_FUSED_MIN_LOGITS", 64)
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    small, large = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    t_small, t_large = torch.randint(0, 7, (3,)), torch.randint(0, 13, (5,))

    def run(z, t, **kw):
        z = z.clone().requires_grad_()
        out = fe.ops.edit_constraint(z, t, **kw)
        out.sum().backward()
        torch.testing.assert_close(out, reference(z.detach(), t), rtol=0, atol=0)
        return z.grad
    run(small, t_small)
    assert calls == []
    g_large = run(large, t_large)
    assert calls == [(5, 13)]
    g_forced = run(small, t_small, backend="cpu")
    with fe.ops.use_backend("cpu"):
        run(small, t_small)
    monkeypatch.setenv("FASTEDIT_BACKEND", "cpu")
    run(small, t_small)
    assert calls == [(5, 13)] + [(3, 7)] * 3
    monkeypatch.delenv("FASTEDIT_BACKEND")
    z = large.clone().requires_grad_()
    reference(z, t_large).sum().backward()
    torch.testing.assert_close(g_large, z.grad, rtol=0, atol=0)
    z = small.clone().requires_grad_()
    reference(z, t_small).sum().backward()
    torch.testing.assert_close(g_forced, z.grad, rtol=0, atol=0)
