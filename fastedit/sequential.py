"""Sequential editing: edits applied one after another to one model, measured as the model drifts.

:func:`fastedit.evaluate` applies every edit to the original model (the paper's protocol).
:func:`evaluate_sequential` applies them in order to one working model, each edit made on the model
the previous ones left, which is how a deployed model is maintained. At every checkpoint (a number
of edits applied) it measures, against the original model (docs/design.md, "Sequential editing"):

- ``drawdown``: control error now minus the original's; ``flip_rate``: share of control predictions
  (samples, or labelled tokens) that changed; ``mean_kl``: mean KL(original ‖ now);
- ``retention``: among the earlier edits that succeeded when they were made, the share whose
  constraint still holds now (NaN before the first success);
- ``success_rate`` and ``mean_steps`` of the edits made so far (re-edits not counted);
- ``changed_scalars``: parameter scalars whose bits differ from the original.

Methods: ``"edit"`` (:func:`fastedit.edit`), ``"surgery"`` (:func:`fastedit.surgery`, at most
``budget`` changed scalars per edit), ``"ewc"`` (:func:`fastedit.baselines.ewc_edit` anchored at the
*original* parameters, so the penalty bounds the whole drift, not each edit's step). Every applied
change can be recorded in an :class:`~fastedit.EditJournal` (always for surgery), so any single fix
can be rolled back exactly, the later ones kept.

Options that keep a long sequence local:

- ``recheck=R``: after each edit, the earlier successful edits are checked (their constraints on the
  current model) and up to ``R`` broken ones re-edited with the same method, the most recent first;
  the work per edit is bounded by one check pass over the earlier edits plus ``R`` edits;
- ``trust_region=("linf", r)`` or ``("l2", r)``: after each edit the editable parameters are projected
  onto the ball of radius ``r`` around the original: ``linf`` clamps every scalar to ``θ₀ ± r``,
  ``l2`` scales the whole change ``θ − θ₀`` (all editable parameters as one vector) to norm ``≤ r``.
  Success is judged after the projection, by a forward of the edit's inputs.

A failed edit (its constraint still violated after its steps, and after the projection) leaves the
model as it was before that edit (``on_failure="revert"``, the default) or keeps the change
(``"keep"``). The caller's model is not touched unless ``in_place=True``.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._core import EditTarget, check_common, eval_mode
from ._validate import check_choice, check_count, check_real
from .baselines.ewc import check_fisher, ewc_edit
from .constraint import reduce_constraint
from .edit import EditError, edit
from .edit_journal import EditJournal
from .editors import Editor, make_editor
from .evaluate import ControlSet, EditSet, chunk_metrics, is_pair, nan_to_none
from .model_io import OutputSpec
from .selection import ParamSpec
from .sparse_delta import SparseDelta, same_bits
from .surgery import surgery

__all__ = ["evaluate_sequential", "SequentialReport"]

METHODS = ("edit", "surgery", "ewc")
TRUST_REGIONS = ("l2", "linf")
CHECKPOINT_KEYS = ("edits", "error", "drawdown", "flip_rate", "mean_kl", "retention", "retained", "successes",
                   "success_rate", "mean_steps", "reedits", "changed_scalars", "seconds")


@dataclass
class SequentialReport:
    """What :func:`evaluate_sequential` measured. ``checkpoints``: one row per checkpoint (keys
    :data:`CHECKPOINT_KEYS`, the first at 0 edits); ``per_edit``: lists over the edits in order
    (``success``, ``steps``, ``loss``, ``seconds``, ``reedits`` made after it, ``nnz`` changed by it,
    ``entry`` its journal id or None). ``model``: the edited model (the caller's with ``in_place``);
    ``journal``: the :class:`~fastedit.EditJournal` of every applied change, or None."""

    method: str
    editor: dict
    params: list[str]
    num_edits: int
    num_control: int
    base_error: float
    checkpoints: list[dict]
    per_edit: dict[str, list]
    options: dict
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)
    journal: EditJournal | None = field(default=None, repr=False)

    @property
    def final(self) -> dict:
        """The last checkpoint's row (after all edits)."""
        return self.checkpoints[-1]

    def edits_until(self, max_drawdown: float = 0.01, min_retention: float = 0.95) -> int | None:
        """The number of edits at the first checkpoint where the drawdown exceeds ``max_drawdown``
        (0.01: one point of accuracy) or the retention falls below ``min_retention``; None if no
        checkpoint does."""
        for row in self.checkpoints:
            retention = row["retention"]
            if row["drawdown"] > max_drawdown or (not math.isnan(retention) and retention < min_retention):
                return row["edits"]
        return None

    def to_dict(self) -> dict:
        return nan_to_none({
            "method": self.method, "editor": self.editor, "params": self.params, "num_edits": self.num_edits,
            "num_control": self.num_control, "base_error": self.base_error, "options": self.options,
            "seconds": self.seconds, "edits_until_1pt_or_5pct_retention": self.edits_until(),
            "checkpoints": self.checkpoints, "per_edit": self.per_edit})

    def to_json(self, path) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        with open(path, "w") as f:
            f.write(text + "\n")
        return str(path)

    def to_csv(self, path) -> str:
        """The checkpoint curve, one row per checkpoint."""
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CHECKPOINT_KEYS))
            w.writeheader()
            for row in self.checkpoints:
                w.writerow({k: row[k] for k in CHECKPOINT_KEYS})
        return str(path)

    def plot(self, path, title: str | None = None) -> str:
        """Drawdown and retention against the number of edits (:func:`fastedit.plots.plot_sequential`)."""
        from .plots import plot_sequential
        return plot_sequential({self.method: self}, path, title=title)


class _Drift:
    """The editable parameters' original values and the trust region around them."""

    def __init__(self, params: list[Tensor], region: tuple[str, float] | None):
        self.params = params
        self.original = [p.detach().clone() for p in params]
        self.region = region

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def project(self) -> None:
        """Move the parameters into the trust region (no-op without one)."""
        if self.region is None:
            return
        kind, radius = self.region
        with torch.no_grad():
            if kind == "linf":
                for p, p0 in zip(self.params, self.original):
                    p.copy_(torch.maximum(torch.minimum(p, p0 + radius), p0 - radius))
                return
            norm = torch.sqrt(sum(((p - p0).double() ** 2).sum() for p, p0 in zip(self.params, self.original)))
            if float(norm) > radius:
                scale = radius / float(norm)
                for p, p0 in zip(self.params, self.original):
                    p.copy_(p0 + (p - p0) * scale)


def _changed_scalars(model: nn.Module, original: dict[str, Tensor]) -> int:
    """Parameter scalars whose bits differ from ``original`` (NaN equal to itself, −0.0 ≠ 0.0)."""
    return sum(int((~same_bits(p.detach(), original[name])).sum())
               for name, p in model.named_parameters(remove_duplicate=True))


class _EditChecks:
    """Whether edits hold on the current model, from their prefix activations cached once (the
    prefix is frozen: only ``params`` change). Batched edits are checked in chunks of units."""

    def __init__(self, target: EditTarget, edit_set: EditSet, reduction: str, batch_size: int):
        self.target, self.edit_set, self.reduction = target, edit_set, reduction
        self.chunks: list[tuple[int, int, object]] = []
        self.single: list[tuple[EditTarget, object]] = []
        with torch.no_grad():
            if edit_set.batched is not None:
                mi, _ = edit_set.batched
                r = edit_set.rows_per_unit
                for u0 in range(0, len(edit_set), batch_size):
                    u1 = min(u0 + batch_size, len(edit_set))
                    self.chunks.append((u0, u1, target.checked_prefix(mi.rows(u0 * r, u1 * r), steps=False)))
            else:
                for mi, _ in edit_set.cases:
                    t = target.for_inputs(mi)
                    self.single.append((t, t.checked_prefix(mi, steps=False)))

    def holds_one(self, k: int) -> bool:
        """Whether edit ``k`` holds now, from a fresh run of its inputs (prefix and suffix)."""
        mi, c = self.edit_set[k]
        with torch.no_grad():
            t = self.target.for_inputs(mi)
            value = reduce_constraint(c.pack(c.per_sample(t.logits(t.checked_prefix(mi, steps=False)))),
                                      self.reduction)
        return bool(value <= 0)

    def holds(self, upto: int) -> Tensor:
        """Bool ``[upto]``: which of the first ``upto`` edits hold now."""
        out = []
        with torch.no_grad():
            if self.edit_set.batched is not None:
                _, c = self.edit_set.batched
                for u0, u1, acts in self.chunks:
                    if u0 >= upto:
                        break
                    values = c.units(u0, u1).per_sample(self.target.logits(acts))
                    out.append((values <= 0).cpu())
                return torch.cat(out)[:upto] if out else torch.zeros(0, dtype=torch.bool)
            for k in range(upto):
                t, acts = self.single[k]
                c = self.edit_set.cases[k][1]
                value = reduce_constraint(c.pack(c.per_sample(t.logits(acts))), self.reduction)
                out.append(bool(value <= 0))
        return torch.tensor(out, dtype=torch.bool)


def _measure(control: ControlSet) -> dict:
    """Control metrics of the live model against the original (whose logits the control set holds)."""
    errors = flips = 0
    kl = 0.0
    with torch.no_grad():
        for acts, y, ref, index in control:
            logits = control.gather(control.target.logits(acts).unsqueeze(0), index)
            m = chunk_metrics(ref, y, logits, False)
            errors += int(m["errors"][0])
            flips += int(m["flips"][0])
            kl += float(m["kl"][0])
    n = control.num_units
    return {"error": errors / n, "flip_rate": flips / n, "mean_kl": kl / n}


def _default_checkpoints(n: int) -> list[int]:
    step = max(1, n // 20)
    return sorted(set(range(0, n + 1, step)) | {0, n})


def _check_checkpoints(checkpoints, n: int) -> list[int]:
    if checkpoints is None:
        return _default_checkpoints(n)
    if isinstance(checkpoints, (str, bytes)) or not hasattr(checkpoints, "__iter__"):
        raise TypeError(f"checkpoints must be a list of edit counts, got {type(checkpoints).__name__}")
    out = set()
    for c in checkpoints:
        c = int(check_count("checkpoints entry", c, minimum=0))
        if c > n:
            raise ValueError(f"checkpoint {c} is beyond the {n} edits")
        out.add(c)
    return sorted(out | {0, n})


def _check_trust_region(region) -> tuple[str, float] | None:
    if region is None:
        return None
    if not (isinstance(region, (tuple, list)) and len(region) == 2):
        raise TypeError(f"trust_region must be None or a pair (kind, radius) with kind 'l2' or 'linf', got {region!r}")
    kind = check_choice("trust_region kind", region[0], TRUST_REGIONS)
    radius = check_real("trust_region radius", region[1], 0.0, math.inf, low_open=True)
    return kind, float(radius)


def evaluate_sequential(model: nn.Module, edits, control, editor: Editor | str = "rmsprop", params: ParamSpec = None,
                        max_steps: int = 10, *, method: str = "edit", checkpoints=None, in_place: bool = False,
                        recheck: int = 0, trust_region: tuple[str, float] | None = None,
                        budget: int | float | None = None, surgery_method: str = "dynamic",
                        surgery_steps: int | None = None, fisher: dict[str, Tensor] | None = None,
                        ewc_lambda: float = 1.0, journal: bool | None = None, on_failure: str = "revert",
                        reduction: str = "max", batch_size: int | None = None, output: OutputSpec = None,
                        include_frozen: bool = False, progress: bool = True) -> SequentialReport:
    """Apply ``edits`` in order to one model and measure, at ``checkpoints``, how it drifts.

    Args:
        model: any ``nn.Module`` (see :func:`fastedit.edit`); a deep copy is edited unless ``in_place``.
        edits: as in :func:`fastedit.evaluate`: ``(inputs, target)`` whose units are the edits, in
            order, or a list of ``(inputs, target)`` pairs, any constraint.
        control: ``(inputs, labels [N])`` or ``(inputs, fe.TokenTargets(labels))``, as in
            :func:`fastedit.evaluate`.
        editor, params, max_steps, reduction, output, include_frozen: as in :func:`fastedit.edit`
            (for surgery the editor defaults to surgery's ``ScaledGD(0.1)`` when ``editor`` is None).
        method: ``"edit"``, ``"surgery"`` or ``"ewc"`` (see the module docstring).
        checkpoints: edit counts after which to measure (0 and the total are always added); default
            about 20 evenly spaced.
        in_place: edit ``model`` itself (the report's ``model`` is then ``model``).
        recheck: re-edit up to this many broken earlier edits after each edit (0: none).
        trust_region: ``None``, ``("linf", r)`` or ``("l2", r)`` around the original parameters.
        budget, surgery_method, surgery_steps: surgery: the budget per edit (required), the method and
            its tuning units (see :func:`fastedit.surgery`).
        fisher, ewc_lambda: ewc: ``{name: F}`` diagonal Fisher of the original model (e.g.
            :func:`fastedit.baselines.fisher_diagonal`; required) and the penalty weight.
        journal: record every applied change in an :class:`~fastedit.EditJournal` (default: only for
            surgery; a dense edit of many parameters stores all of them per entry).
        on_failure: ``"revert"`` (a failed edit leaves the model as it was) or ``"keep"``.
        batch_size: rows per forward pass over the control set and the earlier edits (default 256).
        progress: show a progress bar.

    Returns:
        :class:`SequentialReport` (checkpoint curve, per-edit rows, JSON/CSV/plot).

    Raises:
        ValueError / TypeError for bad input, before any edit is made (the caller's model is then
        unchanged, also with ``in_place``).
    """
    check_common(max_steps, reduction, on_failure)
    method = check_choice("method", method, METHODS)
    recheck = check_count("recheck", recheck, minimum=0)
    region = _check_trust_region(trust_region)
    if batch_size is not None:
        check_count("batch_size", batch_size)
    if not is_pair(control):
        raise TypeError("control must be a pair (inputs, labels) or (inputs, fe.TokenTargets(labels))")
    if method == "surgery":
        if budget is None:
            raise TypeError("method='surgery' needs budget= (changed scalars per edit, or a fraction in (0, 1))")
        editor = make_editor(editor) if editor is not None else None
    else:
        editor = make_editor(editor)
    if method == "ewc":
        if fisher is None:
            raise TypeError("method='ewc' needs fisher= (the original model's diagonal Fisher, e.g. from "
                            "fastedit.baselines.fisher_diagonal)")
        ewc_lambda = check_real("ewc_lambda", ewc_lambda, 0.0, math.inf)
    keep_journal = (method == "surgery") if journal is None else bool(journal)
    start = time.perf_counter()

    work = model if in_place else copy.deepcopy(model)
    saved = [p.detach().clone() for p in work.parameters()] if in_place else None
    try:
        with eval_mode(work):
            run = _Sequence(work, edits, control, editor, params, max_steps, method, checkpoints, recheck, region,
                            budget, surgery_method, surgery_steps, fisher, ewc_lambda, keep_journal, on_failure,
                            reduction, batch_size, output, include_frozen)
            run.run(progress)
    except BaseException:
        if saved is not None:  # the caller's model as it was, bit for bit
            with torch.no_grad():
                for p, s in zip(work.parameters(), saved):
                    p.copy_(s)
        raise
    if run.nonfinite:
        warnings.warn(f"fastedit.evaluate_sequential: {len(run.nonfinite)} of {run.n} edits had a non-finite "
                      f"constraint or gradient (edits {run.nonfinite[:5]}) and count as failed (the model was not "
                      "changed by them)", UserWarning, stacklevel=2)
    return SequentialReport(
        method=method, editor=editor.to_dict() if editor is not None else {"editor": "scaled_gd (surgery default)"},
        params=run.names, num_edits=run.n, num_control=int(run.control.n), base_error=run.base["error"],
        checkpoints=run.curve, per_edit=run.per_edit, seconds=time.perf_counter() - start, model=work,
        journal=run.journal,
        options={"max_steps": max_steps, "recheck": recheck, "trust_region": list(region) if region else None,
                 "budget": budget, "surgery_method": surgery_method if method == "surgery" else None,
                 "ewc_lambda": ewc_lambda if method == "ewc" else None, "on_failure": on_failure,
                 "reduction": reduction, "in_place": in_place, "control_kind": run.control.kind,
                 "nonfinite_edits": run.nonfinite})


class _Sequence:
    """One run of :func:`evaluate_sequential` on the working model (in eval mode)."""

    def __init__(self, work, edits, control, editor, params, max_steps, method, checkpoints, recheck, region,
                 budget, surgery_method, surgery_steps, fisher, ewc_lambda, keep_journal, on_failure, reduction,
                 batch_size, output, include_frozen):
        self.work, self.method, self.recheck, self.on_failure = work, method, recheck, on_failure
        self.start = time.perf_counter()
        target = EditTarget.build(work, params, output=output, include_frozen=include_frozen)
        self.edit_set = EditSet(target, edits)
        target = target.for_inputs(self.edit_set.first_inputs())
        self.n = len(self.edit_set)
        self.marks = set(_check_checkpoints(checkpoints, self.n))
        rows = batch_size or 256
        self.control = ControlSet(target.for_inputs(control[0]), control[0], control[1], batch_size, math.inf)
        self.edit_set.checked_classes(target, rows)  # every edit validated before the first one is made
        self.checks = _EditChecks(target, self.edit_set, reduction, rows)
        self.names = list(target.names)
        self.drift = _Drift(list(target.params), region)
        self.original = {k: v.detach().clone() for k, v in work.named_parameters(remove_duplicate=True)}
        anchor = None
        if method == "ewc":
            check_fisher(fisher, self.names, self.drift.params, "fisher")
            anchor = dict(zip(self.names, self.drift.original))
        common = dict(params=params, reduction=reduction, on_failure="keep", output=output,
                      include_frozen=include_frozen)
        if method == "edit":
            self.one_edit = lambda mi, c: edit(work, mi, c, editor=editor, max_steps=max_steps, **common)
        elif method == "ewc":
            self.one_edit = lambda mi, c: ewc_edit(work, mi, c, fisher, ewc_lambda=ewc_lambda, editor=editor,
                                                   max_steps=max_steps, anchor=anchor, **common)
        else:
            self.one_edit = lambda mi, c: surgery(work, mi, c, budget, surgery_method, editor,
                                                  steps=surgery_steps, **common)
        self.journal = EditJournal(work) if keep_journal else None
        self.per_edit: dict[str, list] = {k: [] for k in ("success", "steps", "loss", "seconds", "reedits", "nnz",
                                                           "entry")}
        self.curve: list[dict] = []
        self.reedits = 0
        self.nonfinite: list[int] = []
        self.base = _measure(self.control)

    def make(self, k: int, label: str) -> tuple[bool, int, float, int, int | None]:
        """Edit ``k`` on the current model: (success after the projection, steps, final loss, scalars
        changed, journal entry). A failure with ``on_failure="revert"`` leaves the model as it was."""
        mi, c = self.edit_set[k]
        before = self.drift.snapshot()
        try:
            r = self.one_edit(mi, c)
        except EditError:  # a non-finite constraint or gradient: the model is unchanged, the edit failed
            self.nonfinite.append(k)
            return False, 0, math.nan, 0, None
        self.drift.project()
        ok = self.checks.holds_one(k)
        if not ok and self.on_failure == "revert":
            self.drift.restore(before)
        delta = SparseDelta.from_models(dict(zip(self.names, before)), dict(zip(self.names, self.drift.params)))
        entry = self.journal.record(delta, name=label) if self.journal is not None and delta.nnz else None
        return ok, int(r.steps), float(r.loss), int(delta.nnz), entry

    def checkpoint(self, done: int) -> None:
        m = _measure(self.control)
        made_ok = torch.tensor(self.per_edit["success"][:done], dtype=torch.bool)
        kept = int((self.checks.holds(done) & made_ok).sum()) if done else 0
        successes = int(made_ok.sum())
        self.curve.append({
            "edits": done, "error": m["error"], "drawdown": m["error"] - self.base["error"],
            "flip_rate": m["flip_rate"], "mean_kl": m["mean_kl"],
            "retention": kept / successes if successes else math.nan, "retained": kept,
            "successes": successes, "success_rate": successes / done if done else math.nan,
            "mean_steps": sum(self.per_edit["steps"][:done]) / done if done else math.nan,
            "reedits": self.reedits, "changed_scalars": _changed_scalars(self.work, self.original),
            "seconds": time.perf_counter() - self.start})

    def run(self, progress: bool) -> None:
        bar = _bar(self.n, progress, self.method)
        self.checkpoint(0)
        for k in range(self.n):
            t0 = time.perf_counter()
            ok, steps, loss, nnz, entry = self.make(k, f"edit {k}")
            reedits = 0
            if self.recheck and k:
                made_ok = torch.tensor(self.per_edit["success"], dtype=torch.bool)
                broken = (~self.checks.holds(k) & made_ok).nonzero().flatten().tolist()
                for j in reversed(broken[-self.recheck:]):  # the most recent first
                    self.make(j, f"re-edit {j} after {k}")
                    reedits += 1
            self.reedits += reedits
            for key, value in zip(self.per_edit, (ok, steps, loss, time.perf_counter() - t0, reedits, nnz, entry)):
                self.per_edit[key].append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"success {sum(self.per_edit['success']) / (k + 1):.0%}")
            if k + 1 in self.marks:
                self.checkpoint(k + 1)
        if bar is not None:
            bar.close()


def _bar(total: int, enabled: bool, method: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the `progress` extra; sequential editing does not need it
        return None
    return tqdm(total=total, desc=f"sequential {method}", unit="edit", leave=False)
