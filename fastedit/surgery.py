"""Neural Network Surgery: reach a goal while changing at most ``n`` scalar parameters.

The change has the form ``θ = θ₀ + M ⊙ Δ`` with ``|M| ≤ n`` (DESIGN.md §1). Every coordinate
outside the mask keeps the bits of ``θ₀``: masked steps go through
:func:`fastedit.ops.editor_step_` with ``mask=`` (which never writes outside the mask), coordinates
dropped from a mask are reset with ``torch.where(mask, θ, θ₀)`` (which copies ``θ₀``'s bits), and the
result's :class:`~fastedit.sparse_delta.SparseDelta` is computed from the bit patterns before and
after, so ``nnz ≤ n`` holds by construction (and is checked).

Budget
    ``budget`` is an ``int ≥ 1`` (a count of scalars; a count above the number of candidate scalars
    means all of them) or a ``float`` in ``(0, 1)``: that fraction of the candidate scalars, rounded
    down, at least 1. Floats ``≥ 1`` are rejected (pass an int count), as are 0, negatives, NaN and
    bools. The candidates are the scalars of the parameters selected by ``params`` (as in
    :func:`fastedit.edit`; default: every parameter).

Goals
    ``goal="edit"`` (default): the edit constraint of :func:`fastedit.edit`,
    ``l_e = max_{i≠y} z_i − z_y`` reduced over the samples of ``x`` with ``reduction`` (``"max"``:
    every sample; ``"mean"``); met when ``l_e ≤ 0``. One *unit* of tuning is one editor step on the
    whole ``x`` (the frozen prefix is run once).

    ``goal="pattern"``: inject a data pattern. ``x`` are triggered inputs, ``y`` the target
    class(es); the loss of a minibatch is ``CE(f(x_b), y_b) + clean_weight · KL(f₀(c_b) ‖ f(c_b))``
    where ``clean=(x_clean, y_clean)`` (or ``x_clean`` alone) are clean inputs whose original
    predictions ``f₀`` are computed once (batchmean KL, in float32 at least). One *unit* is one epoch:
    the triggered inputs are shuffled (``torch.Generator`` seeded with ``seed`` and the epoch number)
    and cut into minibatches of ``batch_size`` (default: all at once), each paired with an equal
    share of the (also shuffled) clean inputs; one editor step per minibatch. The goal is met when
    the share of ``x`` predicted as ``y`` is at least ``target_rate`` (default 1.0: every triggered
    input), checked on all of ``x`` after every epoch.

    Both run in eval mode (BatchNorm running statistics, no dropout); every module's train/eval flag
    is restored afterwards.

Methods (``steps``, ``probe_steps``, ``refit_steps`` and ``shrink_every`` count units)
    ``"select-random"``: ``M`` = ``n`` coordinates drawn uniformly without replacement
    (``torch.randperm`` with a generator seeded by ``seed``) from all candidate scalars; then up to
    ``steps`` masked units.

    ``"select-grad"``: ``M`` = the top-``n`` coordinates of ``|∇L(θ₀)|`` (edit: the full-batch gradient
    of ``l_e``; pattern: the sum over the minibatches of epoch 0 of ``|∇|`` of the minibatch loss);
    then up to ``steps`` masked units.

    ``"select-delta"``: a dense probe of up to ``probe_steps`` units (stopping early once the goal is
    met), ``M`` = the top-``n`` of ``|θ_probe − θ₀|``; the probe is then discarded (back to ``θ₀``,
    fresh editor state) and up to ``steps`` masked units follow.

    ``"lagrange"``: up to ``steps`` dense units, each editor step followed by the proximal step of
    ``l1·‖Δ‖₁``: ``Δ ← sign(Δ)·max(|Δ| − l1·lr, 0)`` (``lr`` = the editor's learning rate; with
    :class:`~fastedit.editors.GD` this is exactly ISTA on ``L + l1‖Δ‖₁``; with adaptive editors, whose
    steps are about ``lr`` per coordinate, it removes coordinates whose steps are not consistent).
    Coordinates shrunk to 0 get ``θ₀``'s bits back. In edit mode no editor step is taken while the
    constraint holds (the hinge's gradient is 0 there), only the proximal step. The dense phase stops
    early once the goal is met with ``nnz(Δ) ≤ n``. Then a hard cut keeps the top-``n`` of ``|Δ|``
    (others reset to ``θ₀``) and up to ``refit_steps`` masked units (fresh editor state) refit them.

    ``"dynamic"`` (Dyn-Δ, the default): start from the top-``min(total, start_factor·n)`` coordinates
    of ``|∇L(θ₀)|`` and tune them masked. The set shrinks geometrically, to
    ``max(n, ⌊size·shrink⌋)`` coordinates, keeping those with the largest ``|Δ|`` and resetting the
    dropped ones to ``θ₀``'s bits (their editor state is never read again): every ``shrink_every``
    units, and at once whenever the goal is met while the set is still larger than ``n``. Once the
    set has ``n`` coordinates, tuning continues until the goal is met or ``steps`` units are used;
    if they run out earlier, a final cut to ``n`` is made.

    Every method stops as soon as the goal is met on at most ``n`` coordinates. Success is judged
    on the final parameters, after every cut.

Editor
    Default ``fe.ScaledGD(0.1)``: each step moves the masked coordinates by 0.1 in L2, along the
    (masked) gradient. Its steps keep the gradient's relative magnitudes, which the selections by
    ``|Δ|`` (select-delta, lagrange, dynamic) rely on, while the step length does not depend on the
    gradient's scale. Sign-like editors (Adam, RMSProp: their first steps are about ``lr·sign(g)``
    for every coordinate) make ``|Δ|`` nearly uniform after a few steps, so the selections degrade
    to chance; in our small tests they needed 2-4x the budget of ScaledGD. With ScaledGD, the
    lagrange threshold ``l1·lr`` removes coordinates whose gradient is below ``l1`` times the
    gradient's L2 norm (over the dense phase's coordinates); with GD it is plain ISTA, ``l1`` in
    gradient units.

Atomicity
    All tuning runs on copies of the selected parameters; the model is written once, at the end,
    through :meth:`SparseDelta.apply` (which checks and restores). Bad input raises
    ``ValueError``/``TypeError`` and a non-finite loss or gradient raises
    :class:`~fastedit.edit.EditError`, in each case with the model bit-identical to before.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .constraint import check_label_range
from .edit import EditError, EditTarget, check_common, eval_mode, resolve_aliases, split_info
from .editors import Editor, ScaledGD, make_editor
from .kernels.editor_step import editor_step_
from .model_io import ModelInputs, OutputSpec
from .selection import ParamSpec
from .sparse_delta import SparseDelta

__all__ = ["surgery", "SurgeryResult", "METHODS", "GOALS", "resolve_budget"]

METHODS = ("dynamic", "select-random", "select-grad", "select-delta", "lagrange")
GOALS = ("edit", "pattern")


def _default_editor() -> Editor:
    return ScaledGD(0.1)


# ------------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------------
@dataclass
class SurgeryResult:
    """What :func:`surgery` did. ``applied`` tells whether the model now holds ``delta``'s NEW values."""

    delta: SparseDelta
    success: bool
    steps: int
    loss: float
    initial_loss: float
    method: str
    goal: str
    budget: int
    applied: bool
    param_names: list[str]
    metrics: dict = field(default_factory=dict)
    editor: dict = field(default_factory=dict)
    prefix_used: bool = False
    prefix_reason: str | None = None
    prefix_method: str = "none"
    _model: Any = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        """Number of changed scalars (≤ ``budget``)."""
        return self.delta.nnz

    def revert(self, model: nn.Module | None = None) -> None:
        """Write the original values back, bit-exact. Without ``model``: the surgered model (a no-op
        if the change is not applied). With another model: :meth:`SparseDelta.revert` on it.

        Raises ``ValueError`` (and writes nothing) if the model no longer holds the delta's values."""
        if model is None or model is self._model:
            if not self.applied:
                return
            self.delta.revert(self._model, check=True)
            self.applied = False
        else:
            self.delta.revert(model, check=True)

    def apply(self, model: nn.Module | None = None) -> None:
        """Apply the change (again): to the surgered model (a no-op if already applied) or another."""
        if model is None or model is self._model:
            if self.applied:
                return
            self.delta.apply(self._model, check=True)
            self.applied = True
        else:
            self.delta.apply(model, check=True)

    def save(self, path) -> None:
        """Save :attr:`delta` (:meth:`SparseDelta.save`)."""
        self.delta.save(path)

    def to_dict(self) -> dict:
        return {"success": self.success, "steps": self.steps, "loss": self.loss,
                "initial_loss": self.initial_loss, "method": self.method, "goal": self.goal,
                "budget": self.budget, "nnz": self.nnz, "nnz_per_param": self.delta.nnz_per_param,
                "applied": self.applied, "params": list(self.param_names), "metrics": dict(self.metrics),
                "editor": dict(self.editor), "prefix_used": self.prefix_used, "prefix_reason": self.prefix_reason,
                "prefix_method": self.prefix_method}


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
def resolve_budget(budget, total: int) -> int:
    """The number of scalars ``n`` a surgery may change, out of ``total`` candidates (see the module
    docstring)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be an int count or a float fraction in (0, 1), got {type(budget).__name__}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget must be ≥ 1 scalar, got {budget}")
        return int(min(int(budget), total))
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0 or budget >= 1:
        raise ValueError(f"a float budget is a fraction of the candidate scalars and must lie in (0, 1), got "
                         f"{budget}; pass an int for a count")
    return max(1, int(math.floor(budget * total)))


def _check_units(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
        raise ValueError(f"{name} must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {v}")
    return v


def _compute_dtype(params: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# goals
# ------------------------------------------------------------------------------------------------
class _EditGoal:
    """The edit constraint on fixed inputs (prefix activations computed once); any constraint."""

    kind = "edit"

    def __init__(self, target: EditTarget, inputs, constraint, reduction: str):
        self.target = target
        mi, c = target.check_inputs(inputs, constraint)
        self.acts = target.checked_prefix(mi)
        # the goal is judged without grad, on activations made for that (cached module calls are bound
        # to a grad mode); the first check validates the constraint against the logits
        acts_eval = self.acts if target.split.grad_mode_free else target.checked_prefix(mi, steps=False)
        self._loss = target.loss_fn(self.acts, c, reduction, mi)
        self._value = target.loss_fn(acts_eval, c, reduction, mi)

    def batches(self, unit: int) -> list:
        return [None]

    def loss(self, theta: Sequence[Tensor], batch) -> Tensor:
        return self._loss(theta)

    def check(self, theta: Sequence[Tensor]) -> tuple[float, bool, dict]:
        with torch.no_grad():
            value = float(self._value(theta))
        if not math.isfinite(value):
            raise EditError(f"non-finite edit constraint ({value}); the model is unchanged")
        return value, value <= 0, {}


class _PatternGoal:
    """Trigger → target class, with an optional KL term keeping clean predictions."""

    kind = "pattern"

    def __init__(self, target: EditTarget, inputs, y, clean, clean_weight: float,
                 batch_size: int | None, seed: int, target_rate: float):
        self.target = target
        mi = ModelInputs.of(inputs)
        if isinstance(y, int) and not isinstance(y, bool) or isinstance(y, Tensor) and y.dim() == 0:
            y = torch.as_tensor(y, device=target.device).expand(mi.num_samples)  # one class for every input
        if not isinstance(y, (int, Tensor)) or isinstance(y, bool):
            raise TypeError(f"a pattern's target must be class labels (an int or an integer tensor), got "
                            f"{type(y).__name__}")
        self.mi, c = target.check_inputs(mi, y)
        self.y = c.labels
        self.clean_weight = clean_weight
        self.seed = seed
        self.target_rate = target_rate
        n = self.mi.num_samples
        self.batch_size = n if batch_size is None else min(batch_size, n)
        self.xc = self.yc = None
        if clean is not None:
            if isinstance(clean, (tuple, list)) and len(clean) == 2:
                xc, yc = clean
            elif isinstance(clean, (Tensor, Mapping)):
                xc, yc = clean, None
            else:
                raise TypeError("clean must be the clean inputs (a tensor or a mapping) or a pair (clean inputs, "
                                "clean labels or None)")
            xc = ModelInputs.of(xc, "clean")
            if yc is not None:
                _, yc = target.check_inputs(xc, yc, "clean")
                yc = yc.labels
            xc.check_device(target.device, "clean")
            self.xc, self.yc = xc, yc
        try:
            num_classes = target.num_classes(self.mi.rows(0, 1))
            if self.xc is not None:
                with torch.no_grad():
                    self.logp0 = self._logp(self._forward(None, self.xc))
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            raise ValueError(f"the model failed on the inputs: {exc}") from exc
        check_label_range(self.y, num_classes, "target label")
        if self.yc is not None:
            check_label_range(self.yc, num_classes, "clean label")
        self.num_batches = math.ceil(n / self.batch_size)

    def _forward(self, theta, inputs: ModelInputs) -> Tensor:
        """Logits of ``inputs`` with ``theta``, in the ambient grad mode (steps with, checks without)."""
        acts = self.target.checked_prefix(inputs, steps=torch.is_grad_enabled())
        return self.target.logits(acts, theta)

    @staticmethod
    def _logp(z: Tensor) -> Tensor:
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        return F.log_softmax(z, dim=-1)

    def batches(self, unit: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + unit)
        device = self.target.device
        order = torch.randperm(self.mi.num_samples, generator=g).to(device)
        trig = list(order.split(self.batch_size))
        if self.xc is None:
            return [(t, None) for t in trig]
        corder = torch.randperm(self.xc.num_samples, generator=g).to(device)
        clean = list(corder.tensor_split(len(trig)))  # an equal share of clean inputs per step
        return list(zip(trig, clean))

    def loss(self, theta: Sequence[Tensor], batch) -> Tensor:
        ti, ci = batch
        z = self._forward(theta, self.mi.take(ti))
        loss = F.cross_entropy(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, self.y[ti])
        if ci is not None and ci.numel() and self.clean_weight > 0:
            logq = self._logp(self._forward(theta, self.xc.take(ci)))
            p0 = self.logp0[ci]
            loss = loss + self.clean_weight * F.kl_div(logq, p0.to(logq.dtype), reduction="batchmean", log_target=True)
        return loss

    def _chunks(self, inputs: ModelInputs) -> list[ModelInputs]:
        n, b = inputs.num_samples, max(self.batch_size, 1)
        return [inputs.rows(lo, min(lo + b, n)) for lo in range(0, n, b)]

    def check(self, theta: Sequence[Tensor]) -> tuple[float, bool, dict]:
        with torch.no_grad():
            hits, ce_sum = 0, 0.0
            for xb, yb in zip(self._chunks(self.mi), self.y.split(max(self.batch_size, 1))):
                z = self._forward(theta, xb)
                zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
                ce_sum += float(F.cross_entropy(zf, yb, reduction="sum"))
                hits += int((z.argmax(-1) == yb).sum())
            n = self.mi.num_samples
            value = ce_sum / n
            metrics = {"target_rate": hits / n}
            if self.xc is not None:
                kl_sum, same, correct = 0.0, 0, 0
                chunks = self._chunks(self.xc)
                b = max(self.batch_size, 1)
                labels = self.yc.split(b) if self.yc is not None else [None] * len(chunks)
                for xb, lb, yb in zip(chunks, self.logp0.split(b), labels):
                    logq = self._logp(self._forward(theta, xb))
                    kl_sum += float(F.kl_div(logq, lb.to(logq.dtype), reduction="sum", log_target=True))
                    pred = logq.argmax(-1)
                    same += int((pred == lb.argmax(-1)).sum())
                    if yb is not None:
                        correct += int((pred == yb).sum())
                nc = self.xc.num_samples
                value += self.clean_weight * kl_sum / nc
                metrics["clean_agreement"] = same / nc
                metrics["clean_kl"] = kl_sum / nc
                if self.yc is not None:
                    metrics["clean_accuracy"] = correct / nc
        if not math.isfinite(value):
            raise EditError(f"non-finite surgery loss ({value}); the model is unchanged")
        met = hits >= math.ceil(self.target_rate * self.mi.num_samples - 1e-9)
        return value, met, metrics


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def _top_masks(scores: Sequence[Tensor], k: int, within: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Bool masks of the ``k`` largest scores over all tensors together (restricted to ``within``)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    if within is not None:
        flat = torch.where(torch.cat([m.reshape(-1) for m in within]), flat, torch.full_like(flat, -1.0))
    k = min(k, flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    return [m.reshape(s.shape) for m, s in zip(chosen.split([s.numel() for s in scores]), scores)]


def _abs_delta(theta: Sequence[Tensor], theta0: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [(t.to(dtype) - t0.to(dtype)).abs() for t, t0 in zip(theta, theta0)]


def _reset_outside(theta: list[Tensor], theta0: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """θ ← where(mask, θ, θ₀): coordinates outside the mask get θ₀'s exact bits."""
    for t, t0, m in zip(theta, theta0, masks):
        t.copy_(torch.where(m, t, t0))


def _count(masks: Sequence[Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks))


def _nnz(theta: Sequence[Tensor], theta0: Sequence[Tensor]) -> int:
    return int(sum(int((~_same(t, t0)).sum()) for t, t0 in zip(theta, theta0)))


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _same(a: Tensor, b: Tensor) -> Tensor:
    return a.view(_INT_OF[a.dtype]) == b.view(_INT_OF[b.dtype])


# ------------------------------------------------------------------------------------------------
# the tuning loop
# ------------------------------------------------------------------------------------------------
class _Tuner:
    def __init__(self, goal, editor: Editor, theta0: list[Tensor], n: int):
        self.goal, self.editor, self.theta0, self.n = goal, editor, theta0, n
        self.cdtype = _compute_dtype(theta0)
        self.steps = 0

    def gradient(self, theta: Sequence[Tensor], batch) -> tuple[Tensor, list[Tensor]]:
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
            if shrink is not None and _count(masks) > self.n:
                return False
            if tau is not None and _nnz(theta, self.theta0) > self.n:
                return False
            return True

        def do_shrink() -> None:
            size = _count(masks)
            new = max(self.n, int(math.floor(size * shrink["factor"])))
            keep = _top_masks(_abs_delta(theta, self.theta0, self.cdtype), new, within=masks)
            _reset_outside(theta, self.theta0, keep)
            masks[:] = keep

        loss, met, metrics = self.goal.check(theta)
        for unit in range(units):
            if shrink is not None:
                while met and _count(masks) > self.n:  # satisfied on a larger set: shrink at once
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
            if shrink is not None and _count(masks) > self.n and since >= shrink["every"]:
                do_shrink()
                since = 0
            loss, met, metrics = self.goal.check(theta)
        if shrink is not None and _count(masks) > self.n:  # out of units: final cut
            while _count(masks) > self.n:
                do_shrink()
            loss, met, metrics = self.goal.check(theta)
        return loss, met, metrics


# ------------------------------------------------------------------------------------------------
# the public function
# ------------------------------------------------------------------------------------------------
def surgery(model: nn.Module, inputs=None, target=None, budget: int | float | None = None, method: str = "dynamic",
            editor: Editor | str | None = None, params: ParamSpec = None, steps: int | None = None, *,
            goal: str = "edit", reduction: str = "max", clean=None, clean_weight: float = 1.0,
            batch_size: int | None = None, target_rate: float = 1.0, seed: int = 0,
            probe_steps: int | None = None, l1: float = 0.1, refit_steps: int | None = None,
            start_factor: float = 10.0, shrink: float = 0.5, shrink_every: int | None = None,
            on_failure: str = "revert", use_prefix: bool = True, output: OutputSpec = None,
            include_frozen: bool = False, x=None, y=None) -> SurgeryResult:
    """Change at most ``budget`` scalar parameters of ``model`` so that it reaches a goal.

    See the module docstring for the exact goals and methods.

    Args:
        model: any ``nn.Module`` (see :func:`fastedit.edit`); run in eval mode, modes restored
            afterwards.
        inputs: a tensor, a tuple of positional arguments or a mapping of keyword arguments, on the
            parameters' device: the edit's samples (``goal="edit"``) or the triggered inputs
            (``goal="pattern"``). (Formerly ``x``, still accepted as a keyword.)
        target: ``goal="edit"``: any constraint of :func:`fastedit.edit` (class labels, a
            ``fe.TokenTargets``, a ``fe.SequenceRanking``, a callable); ``goal="pattern"``: the target
            class(es), an int or an integer tensor ``[B]``. (Formerly ``y``.)
        budget: at most this many scalars change: an int ``≥ 1`` or a float fraction in ``(0, 1)`` of
            the candidate scalars (rounded down, at least 1).
        method: ``"dynamic"`` (Dyn-Δ), ``"select-random"``, ``"select-grad"``, ``"select-delta"`` or
            ``"lagrange"``.
        editor: an :class:`~fastedit.editors.Editor` or its name; default ``ScaledGD(0.1)``.
        params: the candidate parameters (as in :func:`fastedit.edit`); ``None``: all.
        steps: tuning units (edit: editor steps; pattern: epochs); default 100 (edit) or 20 (pattern).
        goal: ``"edit"`` or ``"pattern"``.
        reduction: edit goal: ``"max"`` (every sample) or ``"mean"``.
        clean, clean_weight: pattern goal: clean inputs (a tensor or a mapping), or a pair ``(clean
            inputs, clean labels or None)``, and the weight of their KL term.
        batch_size: pattern goal: minibatch size (default: all inputs at once).
        target_rate: pattern goal: the share of the inputs that must be predicted as the target.
        seed: seeds the random mask and the minibatch order.
        probe_steps: select-delta: units of the dense probe (default 10 edit / 2 pattern).
        l1: lagrange: the proximal threshold per step is ``l1 · lr``.
        refit_steps: lagrange: masked units after the cut (default ``steps``).
        start_factor, shrink, shrink_every: dynamic: start set ``start_factor · n``; shrink factor
            in ``(0, 1)``; units between shrinks (default ``max(1, steps // 10)``).
        on_failure: ``"revert"`` (default: the model is left as it was when the goal is not met) or
            ``"keep"``.
        use_prefix, output, include_frozen: as in :func:`fastedit.edit`.

    Returns:
        :class:`SurgeryResult`: ``delta`` (a :class:`SparseDelta`, ``nnz ≤ budget``), ``success``,
        ``steps`` (editor steps taken, all phases), ``loss`` (final goal loss: ``l_e``, or the
        pattern loss on all inputs), ``metrics`` (pattern: ``target_rate``, clean agreement/KL/
        accuracy), ``applied``, ``revert()``.

    Raises:
        ValueError / TypeError for bad input (budget, method, goal, labels, empty or unknown
        ``params``, shapes, devices, dtypes); :class:`~fastedit.edit.EditError` for a non-finite
        loss or gradient. In every such case the model is left bit-identical to before.
    """
    # -- arguments, before anything else ------------------------------------------------------------
    inputs, target = resolve_aliases(inputs, target, x, y)
    if budget is None:
        raise TypeError("missing the budget: the number (int) or fraction (float) of scalars that may change")
    if method not in METHODS:
        raise ValueError(f"unknown surgery method {method!r}; choose one of {METHODS}")
    if goal not in GOALS:
        raise ValueError(f"unknown surgery goal {goal!r}; choose one of {GOALS}")
    if steps is None:
        steps = 100 if goal == "edit" else 20
    steps = _check_units("steps", steps, 0)
    check_common(steps, reduction, on_failure)
    probe_steps = _check_units("probe_steps", (10 if goal == "edit" else 2) if probe_steps is None else probe_steps, 1)
    refit_steps = _check_units("refit_steps", steps if refit_steps is None else refit_steps, 0)
    shrink_every = _check_units("shrink_every", max(1, steps // 10) if shrink_every is None else shrink_every, 1)
    l1 = _check_float("l1", l1, 0.0, math.inf, False, True)
    start_factor = _check_float("start_factor", start_factor, 1.0, math.inf, False, True)
    shrink = _check_float("shrink", shrink, 0.0, 1.0, True, True)
    target_rate = _check_float("target_rate", target_rate, 0.0, 1.0, True, False)
    clean_weight = _check_float("clean_weight", clean_weight, 0.0, math.inf, False, True)
    if batch_size is not None:
        batch_size = _check_units("batch_size", batch_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if goal == "edit" and (clean is not None or batch_size is not None):
        raise ValueError("clean and batch_size apply to goal='pattern' only")
    editor = _default_editor() if editor is None else make_editor(editor)

    with eval_mode(model):
        et = EditTarget.build(model, params, use_prefix, output=output, include_frozen=include_frozen)
        names, live = et.names, et.params
        if len({p.dtype == torch.float64 for p in live}) > 1:
            raise TypeError("surgery cannot mix float64 parameters with other dtypes in one selection "
                            f"({sorted({str(p.dtype) for p in live})})")
        et = et.for_inputs(inputs)
        total = sum(p.numel() for p in live)
        n = resolve_budget(budget, total)
        if goal == "edit":
            g = _EditGoal(et, inputs, target, reduction)
        else:
            g = _PatternGoal(et, inputs, target, clean, clean_weight, batch_size, int(seed), target_rate)

        theta0 = [p.detach().clone() for p in live]
        theta = [t.clone() for t in theta0]
        tuner = _Tuner(g, editor, theta0, n)
        with torch.no_grad():
            initial_loss, met, metrics = g.check(theta0)
            loss = initial_loss
            if not met:
                loss, met, metrics = _run_method(method, tuner, theta, n, total, steps, probe_steps,
                                                 refit_steps, l1, float(editor.lr), start_factor, shrink,
                                                 shrink_every, int(seed))

    # the change, from the bit patterns: nnz ≤ n by construction, checked all the same
    delta = SparseDelta.from_models(dict(zip(names, theta0)), dict(zip(names, theta)))
    aliases = {n: a for n, a in _aliases(model, names).items() if n in delta.names}
    if aliases:  # a tied weight's other names, so the saved delta also patches an untied copy
        delta = SparseDelta(delta._entries, aliases)
    if delta.nnz > n:
        raise RuntimeError(f"internal error: surgery changed {delta.nnz} scalars for a budget of {n}")
    result = SurgeryResult(delta=delta, success=bool(met), steps=tuner.steps, loss=float(loss),
                           initial_loss=float(initial_loss), method=method, goal=goal, budget=n, applied=False,
                           param_names=list(names), metrics=metrics, editor=editor.to_dict(), **split_info(et),
                           _model=model)
    if met or on_failure == "keep":
        delta.apply(model, check=True)
        result.applied = True
    return result


def _aliases(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The other names under which ``model`` registers each of ``names``' tensors (tied weights)."""
    wanted = {id(model.get_parameter(n)): n for n in names}
    out: dict[str, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first = wanted.get(id(p))
        if first is not None and n != first:
            out.setdefault(first, []).append(n)
    return {n: tuple(a) for n, a in out.items()}


def _run_method(method, tuner: _Tuner, theta, n, total, steps, probe_steps, refit_steps, l1, lr,
                start_factor, shrink, shrink_every, seed):
    theta0 = tuner.theta0
    shapes = [t.shape for t in theta0]
    device = theta0[0].device
    if method == "select-random":
        gen = torch.Generator().manual_seed(seed)
        flat = torch.zeros(total, dtype=torch.bool)
        flat[torch.randperm(total, generator=gen)[:n]] = True
        flat = flat.to(device)
        masks = [m.reshape(s) for m, s in zip(flat.split([t.numel() for t in theta0]), shapes)]
        return tuner.run(theta, masks, steps)
    if method == "select-grad":
        masks = _top_masks(tuner.grad_scores(), n)
        return tuner.run(theta, masks, steps)
    if method == "select-delta":
        probe = [t.clone() for t in theta0]
        tuner.run(probe, None, probe_steps)
        masks = _top_masks(_abs_delta(probe, theta0, tuner.cdtype), n)
        return tuner.run(theta, masks, steps)  # from θ₀, fresh editor state
    if method == "lagrange":
        tuner.run(theta, None, steps, tau=l1 * lr)
        masks = _top_masks(_abs_delta(theta, theta0, tuner.cdtype), n)
        _reset_outside(theta, theta0, masks)
        return tuner.run(theta, masks, refit_steps)
    # dynamic
    start = int(min(total, max(n, math.floor(start_factor * n))))
    masks = _top_masks(tuner.grad_scores(), start) if start < total else \
        [torch.ones(s, dtype=torch.bool, device=device) for s in shapes]
    return tuner.run(theta, masks, steps, shrink={"every": shrink_every, "factor": shrink})
