"""Editable Training's locality term without the large temporaries of ``F.kl_div``.

``L_loc = KL(softmax(ref) ‖ softmax(edited))``, averaged over the measured rows. Written with
``F.log_softmax`` and ``F.kl_div``, autograd keeps both log-softmaxes for the backward and the
forward makes several more tensors of the logits' size; with a language model's head that is
``[B·T, V]`` each (GPT-2 small, batch 4 × 128: 103 MB apiece, several at once). Here the forward
walks the rows in chunks, computes the value and, in the same pass, the gradient with respect to the
edited logits, and keeps only that gradient: one tensor of the measured rows' size, and no second
pass over the logits in the backward.

The gradient is first order only (a backward with ``create_graph=True`` raises): Editable Training's
meta-gradient needs the KL's derivative with respect to the edited logits, never its second
derivative (the second order lives in the unrolled editor steps). Inside ``torch.func`` transforms
the plain composition runs instead, so ``torch.func.grad`` over a training step works as before. The value and gradient equal ``F.kl_div``'s up to the
order of the sums (tests compare them in float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: elements of the logits per chunk (16 MB in float32); a classifier's logits fit in one chunk
CHUNK_ELEMENTS = 2 ** 22


def locality_kl(ref: Tensor, edited: Tensor, rows: Tensor | None = None) -> Tensor:
    """Mean over ``rows`` of ``KL(softmax(ref[r]) ‖ softmax(edited[r]))``.

    Args:
        ref: ``[N, C]`` reference logits (no gradient flows into them).
        edited: ``[N, C]`` edited logits (the gradient flows here).
        rows: int64 ``[M]``: the rows measured (default: all ``N``).

    Computed in ``float32`` for half-precision logits (``float64`` stays), like
    ``F.kl_div(F.log_softmax(edited[rows]), F.log_softmax(ref[rows]), log_target=True,
    reduction="batchmean")``; the gradient has ``edited``'s dtype.
    """
    if ref.shape != edited.shape or ref.dim() != 2:
        raise ValueError(f"locality_kl: ref and edited must both be [N, C], got {tuple(ref.shape)} and "
                         f"{tuple(edited.shape)}")
    every = rows is None
    if every:
        rows = torch.arange(edited.shape[0], device=edited.device)
    if rows.numel() == 0:
        raise ValueError("locality_kl: no row to measure")
    if _functorch_wrapped(ref) or _functorch_wrapped(edited):
        # inside torch.func transforms (grad, vmap, ...), which call backward with create_graph: the
        # plain composition, differentiable to any order
        dtype = torch.promote_types(edited.dtype, torch.float32)
        return F.kl_div(F.log_softmax(edited[rows].to(dtype), -1), F.log_softmax(ref.detach()[rows].to(dtype), -1),
                        log_target=True, reduction="batchmean")
    return _LocalityKL.apply(ref.detach(), edited, rows, every)


def _functorch_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class _LocalityKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ref: Tensor, edited: Tensor, rows: Tensor, every: bool) -> Tensor:
        dtype = torch.promote_types(edited.dtype, torch.float32)
        m, width = rows.numel(), edited.shape[-1]
        chunk = max(1, CHUNK_ELEMENTS // max(1, width))
        want_grad = ctx.needs_input_grad[1]
        grad = edited.new_empty(m, width) if want_grad else None
        total = torch.zeros((), dtype=dtype, device=edited.device)
        for lo in range(0, m, chunk):
            idx = rows[lo:lo + chunk]
            log_p = F.log_softmax(ref[idx].to(dtype), -1)
            log_q = F.log_softmax(edited[idx].to(dtype), -1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if want_grad:
                # d/d log_q of sum(p·(log_p − log_q))/m is −p/m; through log_softmax: g − softmax(q)·Σg
                g = p.mul_(-1.0 / m)
                grad[lo:lo + chunk] = g.sub_(log_q.exp_().mul_(g.sum(-1, keepdim=True)))
        if want_grad:
            ctx.save_for_backward(grad, rows)
            ctx.num_rows, ctx.every = edited.shape[0], every
        return total / m

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently miss this term
            raise RuntimeError("fastedit's L_loc (locality_kl) has a first-order gradient only: it cannot be "
                               "differentiated twice (create_graph=True)")
        grad, rows = ctx.saved_tensors
        scaled = grad * grad_out.to(grad.dtype)
        if ctx.every:
            return None, scaled, None, None
        full = grad.new_zeros(ctx.num_rows, grad.shape[-1])
        return None, full.index_copy_(0, rows, scaled), None, None
