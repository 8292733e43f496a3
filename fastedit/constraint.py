"""The edit constraint ``l_e`` (DESIGN.md §1).

For a classifier with logits ``z`` and target ``y``::

    l_e = max_i z_i − z_y      (≥ 0, and = 0 exactly when y attains the maximum)

which equals ``max_i log p_i − log p_y``: the log-softmax normaliser cancels. The paper's
"satisfied" test ``l_e ≤ 0`` is therefore ``l_e == 0``. An edit with several
samples (a batch of constraints) is reduced with ``"max"`` (the default: the edit is satisfied only
when *every* sample is, and each step follows the worst sample) or ``"mean"`` (satisfied when the
mean is ≤ 0; steps follow the average).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import dispatch

REDUCTIONS = ("max", "mean")


def constraint_per_sample(logits: Tensor, target: Tensor) -> Tensor:
    """``max_i z_i − z_target`` per row of ``logits [B, C]``; differentiable, vmap-friendly, through
    the kernel dispatcher (the compiled op where it is built, the reference otherwise).

    Half-precision logits are promoted to float32 so a tiny positive margin never rounds to 0.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return dispatch.edit_constraint(logits, target)


def reduce_constraint(per_sample: Tensor, reduction: str = "max") -> Tensor:
    """Reduce per-sample constraints over the last dimension (the samples of one edit)."""
    if reduction == "max":
        return per_sample.amax(dim=-1)
    if reduction == "mean":
        return per_sample.mean(dim=-1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def edit_constraint(logits: Tensor, target: Tensor, reduction: str = "max") -> Tensor:
    """The edit's constraint value ``l_e``: ``logits [B, C]``, ``target [B]`` → 0-dim tensor."""
    return reduce_constraint(constraint_per_sample(logits, target), reduction)
