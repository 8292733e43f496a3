"""``edit_constraint``: the per-row edit constraint ``max_i z[b, i] − z[b, target[b]]`` (docs/design.md).

Contract (every backend): ``logits [B, C]`` (float32, float64, float16 or bfloat16; C ≥ 1) and
``target [B]`` int64 in ``[0, C)`` give ``[B]`` in the dtype of ``logits`` (half types accumulate in
float32). ``out[b] ≤ 0`` iff ``target[b]`` is an argmax of row ``b`` (``out[b] == 0`` then); a NaN
anywhere in a row gives NaN. Differentiable with respect to ``logits`` (ties of the maximum share
the gradient equally, as ``torch.amax`` does), also under ``torch.func`` transforms (grad, vmap,
grad of grad) and ``torch.compile``.

Backends: the compiled op ``torch.ops.fastedit.edit_constraint`` (csrc/cpu/edit_constraint.cpp,
csrc/cuda/edit_constraint.cu; its schema in csrc/ops.cpp) and the pure-PyTorch :func:`reference`,
the oracle, which also takes any leading dimensions (``[..., C]`` with ``target [...]``). Triton has
no kernel for it. This is the per-row building block; the constraint of a classification edit, with
its argmax tie rule and its reduction over the edit's rows, is :class:`fastedit.Classification`
(``per_sample``) with :func:`fastedit.constraint.reduce_constraint`.

This module also holds the op's Python parts (:data:`PYTHON_PARTS`, which fastedit.ops registers when
fastedit._C is loaded): its fake kernel (meta tensors, ``torch.compile``), its autograd formula and
vmap rule; and the ``autograd.Function`` wrapper that makes it work under ``torch.func``
(:func:`compiled`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from .dispatch import choose_backend, is_forced

__all__ = ["edit_constraint", "reference", "compiled", "CPU_FUSED_MIN_LOGITS"]

#: On the CPU, unless a backend is forced, logits ``[B, C]`` with fewer entries than this go to the
#: reference: below it the compiled op's call (its autograd.Function wrapper, ~45 µs) costs more than
#: ``amax`` minus ``gather`` computes, forward and backward; above it the fused forward + backward is
#: ~9% faster (benchmarks/kernels/bench_edit_constraint.py, docs/kernels.md).
CPU_FUSED_MIN_LOGITS = 1 << 20


def edit_constraint(logits: Tensor, target: Tensor, *, backend: str | None = None) -> Tensor:
    """``max_i logits[b, i] − logits[b, target[b]]`` per row, through the chosen backend.

    ``backend``: None for the dispatcher's choice (:func:`fastedit.ops.use_backend`,
    ``FASTEDIT_BACKEND``, else the priority order), or a backend name to force for this call
    (:class:`~fastedit.ops.dispatch.BackendError` if it cannot run here). The compiled op takes
    ``[B, C]``; other shapes go to the reference, and so do CPU logits with fewer than
    :data:`CPU_FUSED_MIN_LOGITS` entries unless a backend is forced (where the reference is faster).
    Both give the same values and gradients. See the module docstring for the contract.
    """
    name = choose_backend("edit_constraint", logits.device, backend)
    if name == "reference" or logits.dim() != 2:
        return reference(logits, target)
    if name == "cpu" and logits.numel() < CPU_FUSED_MIN_LOGITS and not is_forced(backend):
        return reference(logits, target)
    return compiled(logits, target)


def reference(logits: Tensor, target: Tensor) -> Tensor:
    """The oracle: ``max_i logits[..., i] − logits[..., target]`` per row in plain PyTorch;
    differentiable (ties of the maximum share the gradient, as in ``torch.amax``), vmap-friendly,
    NaN rows giving NaN."""
    picked = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1)
    return logits.amax(dim=-1) - picked


def compiled(logits: Tensor, target: Tensor) -> Tensor:
    """``torch.ops.fastedit.edit_constraint`` on ``[B, C]`` logits, wrapped in an autograd.Function
    with a vmap rule so that it also works under ``torch.func`` transforms (grad, vmap, grad of
    grad) and ``torch.compile`` (docs/design.md). ``RuntimeError`` when the extension is unavailable
    (see :func:`fastedit.ops._extension.unavailable_reason`)."""
    _extension.require()
    return _EditConstraint.apply(logits, target)


# ------------------------------------------------------------------------------------------------
# Python parts of the compiled op (fastedit.ops registers them once fastedit._C is imported)
# ------------------------------------------------------------------------------------------------
def _fake(logits: Tensor, target: Tensor) -> Tensor:
    torch._check(logits.dim() == 2, lambda: f"fastedit::edit_constraint: logits must be 2-D [B, C], got {logits.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"fastedit::edit_constraint: target must be 1-D [B], got {target.dim()}-D")
    torch._check(
        logits.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        lambda: f"fastedit::edit_constraint: logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    torch._check(target.dtype == torch.int64,
                 lambda: f"fastedit::edit_constraint: target must be int64 (torch.long), got {target.dtype}")
    torch._check(target.shape[0] == logits.shape[0],
                 lambda: f"fastedit::edit_constraint: shape mismatch: logits {tuple(logits.shape)}, "
                         f"target {tuple(target.shape)}")
    torch._check(logits.shape[1] >= 1, lambda: "fastedit::edit_constraint: logits must have C >= 1")
    return logits.new_empty(logits.shape[:1])


def _grad(logits: Tensor, target: Tensor, grad_out: Tensor) -> Tensor:
    # d out[b] / d logits[b, i] = [i is a maximum] / (number of maxima) - [i == target[b]]
    # (the subgradient torch.amax uses); differentiable torch ops only, so double backward and
    # torch.func transforms work through it.
    is_max = (logits == logits.amax(dim=1, keepdim=True)).to(grad_out.dtype)
    share = is_max / is_max.sum(dim=1, keepdim=True)
    return (share * grad_out[:, None]).scatter_add(
        1, target[:, None], -grad_out[:, None]).to(logits.dtype)


def _setup_context(ctx, inputs, output) -> None:
    logits, target = inputs
    ctx.save_for_backward(logits, target)


def _backward(ctx, grad_out: Tensor):
    logits, target = ctx.saved_tensors
    grad_logits = _grad(logits, target, grad_out) if ctx.needs_input_grad[0] else None
    return grad_logits, None


def _vmap(info, in_dims, logits: Tensor, target: Tensor):
    # One call of the op on [N * B, C] instead of torch's per-sample fallback loop.
    n = info.batch_size
    logits_dim, target_dim = in_dims
    logits = logits.movedim(logits_dim, 0) if logits_dim is not None else logits.expand(n, *logits.shape)
    target = target.movedim(target_dim, 0) if target_dim is not None else target.expand(n, *target.shape)
    if logits.dim() != 3 or target.dim() != 2:
        raise RuntimeError(
            "fastedit::edit_constraint: logits must be 2-D [B, C] and target 1-D [B] per sample, "
            f"got shapes {tuple(logits.shape[1:])} and {tuple(target.shape[1:])}")
    b, c = logits.shape[1], logits.shape[2]
    out = torch.ops.fastedit.edit_constraint(logits.reshape(n * b, c), target.reshape(n * target.shape[1]))
    return out.reshape(n, b), 0


class _EditConstraint(torch.autograd.Function):
    """torch.ops.fastedit.edit_constraint for torch.func: the op's own autograd registration
    (torch.library.register_autograd) works in eager autograd and torch.compile but not under
    torch.func.grad; an autograd.Function with setup_context and a generated vmap rule does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, target: Tensor) -> Tensor:
        return torch.ops.fastedit.edit_constraint(logits, target)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


#: What fastedit.ops registers for ``fastedit::edit_constraint`` once the op exists (torch requires the
#: registration to come from the module csrc/ops.cpp names, fastedit.ops).
PYTHON_PARTS = {"fake": _fake, "autograd": (_backward, _setup_context), "vmap": _vmap}
