"""Coordinate sets of :func:`fastedit.surgery`: boolean masks, one per selected parameter tensor,
chosen and applied as one set over all tensors together.

A surgery's change is ``θ = θ₀ + M ⊙ Δ``; these helpers pick ``M`` (the ``k`` largest scores),
measure ``|Δ|`` and enforce ``M`` bit for bit (outside the mask, ``θ₀``'s exact bits).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..sparse_delta import same_bits

__all__ = ["top_masks", "abs_delta", "reset_outside", "count", "nnz"]


def top_masks(scores: Sequence[Tensor], k: int, within: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Bool masks of the ``k`` largest scores over all tensors together (only among the coordinates
    of ``within``, when given; scores are ``≥ 0``)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    if within is not None:
        flat = torch.where(torch.cat([m.reshape(-1) for m in within]), flat, torch.full_like(flat, -1.0))
    k = min(k, flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    return [m.reshape(s.shape) for m, s in zip(chosen.split([s.numel() for s in scores]), scores)]


def abs_delta(theta: Sequence[Tensor], theta0: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``|θ − θ₀|`` per tensor, computed in ``dtype``."""
    return [(t.to(dtype) - t0.to(dtype)).abs() for t, t0 in zip(theta, theta0)]


def reset_outside(theta: list[Tensor], theta0: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """θ ← where(mask, θ, θ₀), in place: coordinates outside the mask get θ₀'s exact bits."""
    for t, t0, m in zip(theta, theta0, masks):
        t.copy_(torch.where(m, t, t0))


def count(masks: Sequence[Tensor]) -> int:
    """The number of coordinates in ``masks``."""
    return int(sum(int(m.sum()) for m in masks))


def nnz(theta: Sequence[Tensor], theta0: Sequence[Tensor]) -> int:
    """The number of coordinates whose bits differ between ``theta`` and ``theta0``."""
    return int(sum(int((~same_bits(t, t0)).sum()) for t, t0 in zip(theta, theta0)))
