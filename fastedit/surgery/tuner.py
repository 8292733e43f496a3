"""The tuning loop of :func:`fastedit.surgery`: :class:`Tuner`.

One *unit* is one pass over a goal's batches (edit: one editor step on all inputs; pattern: one
epoch), each batch one editor step: the gradient of the goal's loss (:meth:`Tuner.gradient`,
non-finite values refused) and one :func:`~fastedit.ops.editor_step_` with ``mask=``, which never
writes a coordinate outside the mask (dense when there is no mask). On top of that, a run can
(lagrange) follow every step by the proximal step of an L1 penalty (:meth:`Tuner.prox`) or
(dynamic) shrink its mask on a schedule (:meth:`Tuner.run`'s ``shrink``). The methods
(:mod:`fastedit.surgery.methods`) are built from these runs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..edit import EditError
from ..editors import Editor
from ..ops.editor_step import editor_step_
from .masks import abs_delta, count, nnz, reset_outside, top_masks

__all__ = ["Tuner"]


def _compute_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 for float64 parameters, else float32: the dtype of scores, |Δ| and the prox."""
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


class Tuner:
    """Tunes copies of the selected parameters towards a goal; counts the editor steps taken
    (:attr:`steps`, over every :meth:`run`).

    Args:
        goal: an :class:`~fastedit.surgery.goals.EditGoal` or
            :class:`~fastedit.surgery.goals.PatternGoal`.
        editor: the update rule; its state is fresh at every :meth:`run`.
        theta0: the original values (never modified), one tensor per selected parameter.
        n: the budget, the most coordinates that may differ from ``theta0`` when a run may stop.
    """

    def __init__(self, goal, editor: Editor, theta0: list[Tensor], n: int):
        self.goal, self.editor, self.theta0, self.n = goal, editor, theta0, n
        self.cdtype = _compute_dtype(theta0)
        self.steps = 0

    def gradient(self, theta: Sequence[Tensor], batch) -> tuple[Tensor, list[Tensor]]:
        """The goal's loss on ``batch`` at ``theta`` and its gradient, one tensor per parameter
        (zeros where the loss does not depend on it); :class:`~fastedit.edit.EditError` if either is
        non-finite."""
        leaves = [t.detach().requires_grad_() for t in theta]
        with torch.enable_grad():
            loss = self.goal.loss(leaves, batch)
        if not bool(torch.isfinite(loss)):
            raise EditError(f"non-finite surgery loss ({float(loss)}) at step {self.steps}; the model is unchanged")
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, theta)]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise EditError(f"non-finite gradient at step {self.steps}; the model is unchanged")
        return loss.detach(), grads

    def grad_scores(self) -> list[Tensor]:
        """``|∇L(θ₀)|`` (edit), or the sum over epoch 0's minibatches of ``|∇|`` (pattern)."""
        scores = [torch.zeros(t.shape, dtype=self.cdtype, device=t.device) for t in self.theta0]
        for batch in self.goal.batches(0):
            _, grads = self.gradient(self.theta0, batch)
            for s, g in zip(scores, grads):
                s.add_(g.to(self.cdtype).abs())
        return scores

    def prox(self, theta: list[Tensor], tau: float) -> None:
        """Soft threshold of Δ = θ − θ₀; coordinates shrunk to 0 get θ₀'s bits."""
        for t, t0 in zip(theta, self.theta0):
            d = t.to(self.cdtype) - t0.to(self.cdtype)
            shrunk = d.sign() * (d.abs() - tau).clamp_min(0)
            new = (t0.to(self.cdtype) + shrunk).to(t.dtype)
            t.copy_(torch.where(shrunk == 0, t0, new))

    def run(self, theta: list[Tensor], masks: list[Tensor] | None, units: int, *, tau: float | None = None,
            shrink: dict | None = None) -> tuple[float, bool, dict]:
        """Up to ``units`` units of masked (or dense, ``masks=None``) tuning of ``theta`` in place.

        ``tau``: proximal L1 threshold after every step (lagrange; stop needs nnz ≤ n).
        ``shrink``: Dyn-Δ schedule ``{"every", "factor"}``; ``masks`` is then shrunk in place.
        """
        state = self.editor.init_state(theta)
        since = 0

        def done(met: bool) -> bool:
            if not met:
                return False
            if shrink is not None and count(masks) > self.n:
                return False
            if tau is not None and nnz(theta, self.theta0) > self.n:
                return False
            return True

        def do_shrink() -> None:
            size = count(masks)
            new = max(self.n, int(math.floor(size * shrink["factor"])))
            keep = top_masks(abs_delta(theta, self.theta0, self.cdtype), new, within=masks)
            reset_outside(theta, self.theta0, keep)
            masks[:] = keep

        loss, met, metrics = self.goal.check(theta)
        for unit in range(units):
            if shrink is not None:
                while met and count(masks) > self.n:  # satisfied on a larger set: shrink at once
                    do_shrink()
                    since = 0
                    loss, met, metrics = self.goal.check(theta)
            if done(met):
                break
            for batch in self.goal.batches(unit):
                if self.goal.kind == "edit" and met:
                    pass  # constraint holds: the hinge has zero gradient, no editor step
                else:
                    _, grads = self.gradient(theta, batch)
                    editor_step_(self.editor, theta, grads, state, mask=masks, names=self.goal.target.names)
                    self.steps += 1
                if tau is not None:
                    self.prox(theta, tau)
            since += 1
            if shrink is not None and count(masks) > self.n and since >= shrink["every"]:
                do_shrink()
                since = 0
            loss, met, metrics = self.goal.check(theta)
        if shrink is not None and count(masks) > self.n:  # out of units: final cut
            while count(masks) > self.n:
                do_shrink()
            loss, met, metrics = self.goal.check(theta)
        return loss, met, metrics
