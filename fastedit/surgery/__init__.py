"""Neural Network Surgery: reach a goal while changing at most ``n`` scalar parameters.

The change has the form ``θ = θ₀ + M ⊙ Δ`` with ``|M| ≤ n`` (docs/design.md). Every coordinate
outside the mask keeps the bits of ``θ₀``: masked steps go through
:func:`fastedit.ops.editor_step_` with ``mask=`` (which never writes outside the mask), coordinates
dropped from a mask are reset with ``torch.where(mask, θ, θ₀)`` (which copies ``θ₀``'s bits), and the
result's :class:`~fastedit.sparse_delta.SparseDelta` is computed from the bit patterns before and
after, so ``nnz ≤ n`` holds by construction (and is checked).

The package: :func:`surgery` and :func:`resolve_budget` (here), :class:`SurgeryResult`
(``result.py``), the goals (``goals.py``), the tuning loop (``tuner.py``) and its coordinate masks
(``masks.py``), and the methods, one function each in the table :data:`METHODS` (``methods.py``).

Budget
    ``budget`` is an ``int ≥ 1`` (a count of scalars; a count above the number of candidate scalars
    means all of them) or a ``float`` in ``(0, 1)``: that fraction of the candidate scalars, rounded
    down, at least 1. Floats ``≥ 1`` are rejected (pass an int count), as are 0, negatives, NaN and
    bools. The candidates are the scalars of the parameters selected by ``params`` (as in
    :func:`fastedit.edit`; default: every parameter).

Goals (exactly: :mod:`fastedit.surgery.goals`)
    ``goal="edit"`` (default): the edit constraint of :func:`fastedit.edit` (with class labels
    ``l_e = max_{i≠y} z_i − z_y``, reduced over the samples with ``reduction``), met when
    ``l_e ≤ 0``; one unit of tuning is one editor step on all of ``x``.

    ``goal="pattern"``: inject a data pattern: triggered inputs ``x`` → target class(es) ``y``, loss
    ``CE(f(x_b), y_b) + clean_weight · KL(f₀(c_b) ‖ f(c_b))`` over minibatches of ``batch_size``
    paired with shares of the clean inputs ``clean``; one unit is one epoch (seeded shuffles); met
    when at least ``target_rate`` of ``x`` is predicted as ``y``.

    Both run in eval mode (BatchNorm running statistics, no dropout); every module's train/eval flag
    is restored afterwards.

Methods (exactly: :mod:`fastedit.surgery.methods`, one function each)
    ``"dynamic"`` (Dyn-Δ, the default): tune the top-``start_factor·n`` coordinates of
    ``|∇L(θ₀)|`` and shrink the set geometrically to the ``n`` of largest ``|Δ|``.
    ``"select-random"``, ``"select-grad"``, ``"select-delta"``: fix ``M`` first (``n`` seeded
    random coordinates; the top-``n`` of ``|∇L(θ₀)|``; the top-``n`` of ``|Δ|`` after a dense
    probe), then tune masked. ``"lagrange"``: dense tuning with an L1 proximal step, a cut to the
    top-``n`` of ``|Δ|``, a masked refit. ``steps``, ``probe_steps``, ``refit_steps`` and
    ``shrink_every`` count units.

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
from typing import Sequence

import torch
from torch import nn

from .._core import EditTarget, check_common, eval_mode, resolve_aliases, split_info
from .._validate import check_choice, check_count, check_int, check_real
from ..compiled import resolve_compile
from ..editors import Editor, ScaledGD, make_editor
from ..model_io import OutputSpec
from ..selection import ParamSpec
from ..sparse_delta import SparseDelta
from .goals import GOALS, EditGoal, PatternGoal
from .methods import METHODS, MethodArgs
from .result import SurgeryResult
from .tuner import Tuner

__all__ = ["surgery", "SurgeryResult", "METHODS", "GOALS", "resolve_budget"]


def _default_editor() -> Editor:
    return ScaledGD(0.1)


def resolve_budget(budget, total: int) -> int:
    """The number of scalars ``n`` a surgery may change, out of ``total`` candidates (see "Budget"
    in the package docstring)."""
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


def surgery(model: nn.Module, inputs=None, target=None, budget: int | float | None = None, method: str = "dynamic",
            editor: Editor | str | None = None, params: ParamSpec = None, steps: int | None = None, *,
            goal: str = "edit", reduction: str = "max", clean=None, clean_weight: float = 1.0,
            batch_size: int | None = None, target_rate: float = 1.0, seed: int = 0,
            probe_steps: int | None = None, l1: float = 0.1, refit_steps: int | None = None,
            start_factor: float = 10.0, shrink: float = 0.5, shrink_every: int | None = None,
            on_failure: str = "revert", use_prefix: bool = True, output: OutputSpec = None,
            include_frozen: bool = False, compile: bool | str = False, x=None, y=None) -> SurgeryResult:
    """Change at most ``budget`` scalar parameters of ``model`` so that it reaches a goal.

    See the package docstring for the budget and the goals' outline, and
    :mod:`fastedit.surgery.methods` (one function per method) for the exact methods.

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
        use_prefix, output, include_frozen, compile: as in :func:`fastedit.edit` (``compile`` runs the
            goal's suffix forward and backward through ``torch.compile``; ``"auto"`` stays eager: one
            surgery is too few steps to pay for compilation).

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
    run_method = METHODS[check_choice("surgery method", method, METHODS)]
    check_choice("surgery goal", goal, GOALS)
    if steps is None:
        steps = 100 if goal == "edit" else 20
    steps = check_count("steps", steps, 0)
    check_common(steps, reduction, on_failure)
    probe_steps = check_count("probe_steps", (10 if goal == "edit" else 2) if probe_steps is None else probe_steps)
    refit_steps = check_count("refit_steps", steps if refit_steps is None else refit_steps, 0)
    shrink_every = check_count("shrink_every", max(1, steps // 10) if shrink_every is None else shrink_every)
    # a non-number is a ValueError here, as bad as a number out of range
    l1 = check_real("l1", l1, 0.0, math.inf, high_open=True, wrong_type=ValueError)
    start_factor = check_real("start_factor", start_factor, 1.0, math.inf, high_open=True, wrong_type=ValueError)
    shrink = check_real("shrink", shrink, 0.0, 1.0, low_open=True, high_open=True, wrong_type=ValueError)
    target_rate = check_real("target_rate", target_rate, 0.0, 1.0, low_open=True, wrong_type=ValueError)
    clean_weight = check_real("clean_weight", clean_weight, 0.0, math.inf, high_open=True, wrong_type=ValueError)
    if batch_size is not None:
        batch_size = check_count("batch_size", batch_size)
    seed = check_int("seed", seed)
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
        et.use_compiled(resolve_compile(compile, et.device, 0))
        total = sum(p.numel() for p in live)
        n = resolve_budget(budget, total)
        if goal == "edit":
            g = EditGoal(et, inputs, target, reduction)
        else:
            g = PatternGoal(et, inputs, target, clean, clean_weight, batch_size, seed, target_rate)

        theta0 = [p.detach().clone() for p in live]
        theta = [t.clone() for t in theta0]
        tuner = Tuner(g, editor, theta0, n)
        with torch.no_grad():
            initial_loss, met, metrics = g.check(theta0)
            loss = initial_loss
            if not met:
                args = MethodArgs(steps=steps, probe_steps=probe_steps, refit_steps=refit_steps, l1=l1,
                                  lr=float(editor.lr), start_factor=start_factor, shrink=shrink,
                                  shrink_every=shrink_every, seed=seed)
                loss, met, metrics = run_method(tuner, theta, args)

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
                           compiled=et.compiled is not None and et.compiled.failed is None,
                           compile_reason=et.compiled.failed if et.compiled is not None else None,
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
