"""The methods of :func:`fastedit.surgery`: how the set ``M`` of at most ``n`` changed coordinates is
found. One function per method, each registered under its name in :data:`METHODS`, the one table
that :func:`~fastedit.surgery.surgery` looks a method up in.

Every method is called as ``run(tuner, theta, args)`` with

- ``tuner``: a :class:`~fastedit.surgery.tuner.Tuner` holding the goal, the editor, the original
  values ``θ₀`` (``tuner.theta0``) and the budget ``n`` (``tuner.n``);
- ``theta``: copies of ``θ₀``, tuned in place; what they hold on return is the result;
- ``args``: :class:`MethodArgs`, the validated settings;

and returns the goal's ``(loss, met, metrics)`` on the final ``theta``, after every cut.

Units. ``steps``, ``probe_steps``, ``refit_steps`` and ``shrink_every`` count tuning units (edit
goal: one editor step on all inputs; pattern goal: one epoch). ``L`` below is the goal's loss and
``|∇L(θ₀)|`` the tuner's :meth:`~fastedit.surgery.tuner.Tuner.grad_scores`: for the edit goal the
full-batch gradient's magnitude, for the pattern goal the sum of the per-minibatch ``|∇|`` over
epoch 0. "Top-``k`` of a score" is over all candidate scalars together, every tensor at once.

Stopping. Every method stops as soon as the goal is met with at most ``n`` changed coordinates
(on its mask, or, for the dense phase of ``"lagrange"``, with ``nnz(Δ) ≤ n``); success is judged
on the final parameters. Coordinates leave a set only by getting ``θ₀``'s exact bits back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .masks import abs_delta, reset_outside, top_masks
from .tuner import Tuner

__all__ = ["METHODS", "MethodArgs", "run_dynamic", "run_select_random", "run_select_grad", "run_select_delta",
           "run_lagrange"]


@dataclass(frozen=True)
class MethodArgs:
    """The settings of a surgery's method, validated by :func:`fastedit.surgery` (which documents
    them); each method reads those it needs."""

    steps: int          # tuning units (every method; lagrange: of the dense phase)
    probe_steps: int    # select-delta: units of the dense probe
    refit_steps: int    # lagrange: masked units after the cut
    l1: float           # lagrange: L1 weight; the proximal threshold per step is l1 · lr
    lr: float           # lagrange: the editor's learning rate
    start_factor: float  # dynamic: the start set has start_factor · n coordinates
    shrink: float       # dynamic: shrink factor, in (0, 1)
    shrink_every: int   # dynamic: units between scheduled shrinks
    seed: int           # select-random: seeds the draw


def _total(tuner: Tuner) -> int:
    return sum(t.numel() for t in tuner.theta0)


def run_select_random(tuner: Tuner, theta: list[Tensor], args: MethodArgs):
    """``"select-random"``: ``M`` = ``n`` coordinates drawn uniformly, without replacement, from
    all candidate scalars (``torch.randperm`` over the flattened candidates, with a CPU
    ``torch.Generator`` seeded by ``seed``: the same seed, the same ``M``); then up to ``steps``
    masked units."""
    theta0, total = tuner.theta0, _total(tuner)
    gen = torch.Generator().manual_seed(args.seed)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=gen)[:tuner.n]] = True
    flat = flat.to(theta0[0].device)
    masks = [m.reshape(t.shape) for m, t in zip(flat.split([t.numel() for t in theta0]), theta0)]
    return tuner.run(theta, masks, args.steps)


def run_select_grad(tuner: Tuner, theta: list[Tensor], args: MethodArgs):
    """``"select-grad"``: ``M`` = the top-``n`` of ``|∇L(θ₀)|``; then up to ``steps`` masked units."""
    masks = top_masks(tuner.grad_scores(), tuner.n)
    return tuner.run(theta, masks, args.steps)


def run_select_delta(tuner: Tuner, theta: list[Tensor], args: MethodArgs):
    """``"select-delta"``: a dense probe, up to ``probe_steps`` units from ``θ₀`` (stopping early
    once the goal is met), then ``M`` = the top-``n`` of ``|θ_probe − θ₀|``. The probe is thrown
    away: from ``θ₀`` again, with fresh editor state, up to ``steps`` masked units."""
    theta0 = tuner.theta0
    probe = [t.clone() for t in theta0]
    tuner.run(probe, None, args.probe_steps)
    masks = top_masks(abs_delta(probe, theta0, tuner.cdtype), tuner.n)
    return tuner.run(theta, masks, args.steps)


def run_lagrange(tuner: Tuner, theta: list[Tensor], args: MethodArgs):
    """``"lagrange"``: L1-penalised dense tuning, then a hard cut to ``n`` and a masked refit.

    Dense phase, up to ``steps`` units: every editor step is followed by the proximal step of
    ``l1·‖Δ‖₁`` (``Δ = θ − θ₀``), a soft threshold with ``τ = l1·lr`` (``lr``: the editor's
    learning rate)::

        Δ ← sign(Δ) · max(|Δ| − τ, 0)

    and coordinates shrunk to 0 get ``θ₀``'s bits back. With :class:`~fastedit.editors.GD` this is
    ISTA on ``L + l1‖Δ‖₁`` (``l1`` in gradient units); with ScaledGD, whose step moves by ``lr`` in
    L2, it drops the coordinates whose gradient is below ``l1`` times the gradient's L2 norm (over
    all the candidates); with adaptive editors (Adam, RMSProp: steps of about ``lr`` per
    coordinate) it drops those whose steps do not keep one direction from step to step. For the
    edit goal no editor step is taken while the constraint holds (the hinge's gradient is 0
    there), only the proximal step. The phase stops early once the goal is met with
    ``nnz(Δ) ≤ n``.

    Then ``M`` = the top-``n`` of ``|Δ|`` (every other coordinate back to ``θ₀``'s bits) and up to
    ``refit_steps`` masked units, with fresh editor state, refit them.
    """
    theta0 = tuner.theta0
    tuner.run(theta, None, args.steps, tau=args.l1 * args.lr)
    masks = top_masks(abs_delta(theta, theta0, tuner.cdtype), tuner.n)
    reset_outside(theta, theta0, masks)
    return tuner.run(theta, masks, args.refit_steps)


def run_dynamic(tuner: Tuner, theta: list[Tensor], args: MethodArgs):
    """``"dynamic"`` (Dyn-Δ, the default): tune a large set and shrink it geometrically to ``n``.

    Start set: the top-``s`` of ``|∇L(θ₀)|`` with ``s = min(total, max(n, ⌊start_factor·n⌋))``
    (every candidate when ``s = total``), tuned masked. A shrink keeps the
    ``max(n, ⌊size·shrink⌋)`` coordinates of the current set with the largest ``|Δ|`` and gives
    the dropped ones ``θ₀``'s bits back (their editor state is never read again). It happens every
    ``shrink_every`` units, and at once, repeatedly, whenever the goal is met while the set is
    still larger than ``n``. Once the set has ``n`` coordinates, tuning goes on until the goal is
    met or ``steps`` units are used; if they run out before the set reaches ``n``, it is shrunk to
    ``n`` at the end.
    """
    theta0, n, total = tuner.theta0, tuner.n, _total(tuner)
    device = theta0[0].device
    start = int(min(total, max(n, math.floor(args.start_factor * n))))
    masks = top_masks(tuner.grad_scores(), start) if start < total else \
        [torch.ones(t.shape, dtype=torch.bool, device=device) for t in theta0]
    return tuner.run(theta, masks, args.steps, shrink={"every": args.shrink_every, "factor": args.shrink})


#: The methods by name, in the order of :func:`fastedit.surgery`'s documentation (the default first).
METHODS: dict[str, Callable[[Tuner, list[Tensor], MethodArgs], tuple[float, bool, dict]]] = {
    "dynamic": run_dynamic,
    "select-random": run_select_random,
    "select-grad": run_select_grad,
    "select-delta": run_select_delta,
    "lagrange": run_lagrange,
}
