"""Hyper-parameter search by the paper's protocol (Sinitsin et al. 2020): minimise drawdown subject to
a success rate of at least ``min_success`` within ``max_steps`` editor steps.

Every grid point is measured with :func:`fastedit.evaluate`, which never writes the model, so the
model is bit-identical after :func:`tune`.
"""
from __future__ import annotations

import csv
import inspect
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import Tensor, nn

from .editors import EDITORS, Adam, Editor, RMSProp
from .evaluate import EvalReport, evaluate
from .selection import ParamSpec

__all__ = ["tune", "TuneResult", "default_grid"]

#: learning rates log-spaced over 1e-5..1, a factor √10 apart: 1e-5, 3.16e-5, …, 1 (11 points)
DEFAULT_LRS: tuple[float, ...] = tuple(10.0 ** (-5 + i / 2) for i in range(11))
_METRICS = ("drawdown", "success_rate", "mean_steps", "flip_rate")
#: the default refinement resolution: the chosen lr is within ×1.2 of the best lr
DEFAULT_RESOLUTION = 1.2
#: how many grid spacings the refinement may step past the grid's edge
MAX_EXPANSIONS = 3
_GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.382: the golden-section fraction


@dataclass
class TuneResult:
    """Outcome of :func:`tune`.

    Attributes:
        editor: the chosen editor (searched hyper-parameters set, the others kept).
        report: its :class:`~fastedit.EvalReport` on the tuning edits.
        table: one dict per grid point, in search order: the searched hyper-parameters, then
            ``drawdown``, ``success_rate``, ``mean_steps``, ``flip_rate``, ``seconds``.
        feasible: whether the chosen point reaches ``min_success`` (False: no grid point did, and the
            one with the highest success rate was chosen).
        min_success: the success-rate constraint used.
        lr_resolution: after a refinement, the largest factor between the chosen lr and its nearest
            measured neighbour on either side (the optimum lies within that factor of the choice);
            None for a plain grid search, ``inf`` when the choice sits at the edge of the search.
    """

    editor: Editor
    report: EvalReport = field(repr=False)
    table: list[dict[str, Any]] = field(repr=False)
    feasible: bool
    min_success: float
    lr_resolution: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: chosen editor, its report, the full table, feasibility."""
        return {"editor": self.editor.to_dict(), "report": self.report.to_dict(),
                "table": [dict(r) for r in self.table], "feasible": self.feasible,
                "min_success": self.min_success, "lr_resolution": self.lr_resolution}

    def to_csv(self, path) -> None:
        """Write the search table as CSV (header + one row per grid point)."""
        fields: list[str] = []
        for row in self.table:
            fields += [k for k in row if k not in fields]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.table)


def default_grid(editor: Editor | str | type) -> dict[str, list[float]]:
    """The default search grid: ``lr`` in :data:`DEFAULT_LRS`, plus ``beta ∈ {0.5, 0.9}`` for RMSProp."""
    cls = _editor_class(editor)
    grid: dict[str, list[float]] = {"lr": list(DEFAULT_LRS)}
    if issubclass(cls, RMSProp):
        grid["beta"] = [0.5, 0.9]
    return grid


def _editor_class(editor: Editor | str) -> type[Editor]:
    if isinstance(editor, Editor):
        return type(editor)
    if isinstance(editor, type) and issubclass(editor, Editor):
        return editor
    key = str(editor).lower().replace("-", "_")
    if key not in EDITORS:
        raise ValueError(f"unknown editor {editor!r}; choose one of {sorted(EDITORS)}")
    return EDITORS[key]


def _as_number(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach())
    return value


def _check_grid(cls: type[Editor], grid: dict[str, Sequence]) -> dict[str, list]:
    if not isinstance(grid, dict) or not grid:
        raise ValueError("grid must be a non-empty dict {hyper-parameter name: list of values}")
    allowed = set(cls.hyperparameter_names)
    if issubclass(cls, Adam):
        allowed |= {"beta1", "beta2"}
    unknown = sorted(set(grid) - allowed)
    if unknown:
        raise ValueError(f"{cls.name} has no hyper-parameter(s) {unknown}; it has {sorted(allowed)}")
    if "betas" in grid and ({"beta1", "beta2"} & set(grid)):
        raise ValueError("search either 'betas' or 'beta1'/'beta2' for Adam, not both")
    out = {}
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"grid[{name!r}] must be a list of values, got {values!r}")
        values = list(values)
        if not values:
            raise ValueError(f"grid[{name!r}] is empty")
        out[name] = values
    return out


def _base_hparams(editor: Editor | str | type, cls: type[Editor]) -> dict[str, Any]:
    """The non-searched hyper-parameters: the instance's, or the constructor's defaults for a name or a
    class (every built-in editor has one for each hyper-parameter; a user's subclass without some
    default needs them in the grid, :func:`_build` says so)."""
    if isinstance(editor, Editor):
        return editor.hparams()
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k in cls.hyperparameter_names and p.default is not inspect.Parameter.empty}


def _build(cls: type[Editor], base: dict[str, Any], point: dict[str, Any]) -> Editor:
    values = dict(base)
    point = dict(point)
    if "beta1" in point or "beta2" in point:
        b1, b2 = values.get("betas", (0.5, 0.999))
        values["betas"] = (point.pop("beta1", b1), point.pop("beta2", b2))
    values.update(point)
    missing = [k for k in cls.hyperparameter_names if k not in values]
    if missing:
        raise ValueError(f"{cls.name} needs hyper-parameter(s) {missing}: put them in the grid "
                         f"or pass an editor instance")
    return cls(**values)


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but tuning must not need it
        return None
    return tqdm(total=total, desc=f"tune ({name})", unit="point")


def tune(model: nn.Module, edits, control, editor: Editor | str | type = "rmsprop", params: ParamSpec = None,
         max_steps: int = 10, *, grid: dict[str, Sequence] | None = None, min_success: float = 0.95,
         refine: bool | None = None, resolution: float = DEFAULT_RESOLUTION, batch_size: int = 256,
         progress: bool = True, **evaluate_kwargs) -> TuneResult:
    """Search an editor's hyper-parameters by the paper's protocol: minimise drawdown subject to
    ``success_rate ≥ min_success`` within ``max_steps`` steps.

    Every point of the cartesian product of ``grid`` is measured with :func:`fastedit.evaluate` on
    ``edits`` and ``control``. **``edits`` is a tuning split**: keep it disjoint from the edits you
    report results on (e.g. tuning edits from training images, reported edits from the test set),
    otherwise the reported numbers are optimistically biased. The model is never written (it is
    bit-identical afterwards).

    Selection: among the points with ``success_rate ≥ min_success``, the lowest drawdown (ties: higher
    success rate, then fewer mean steps, then smaller lr, then grid order). If none qualifies, the
    highest success rate (ties: lower drawdown, fewer steps, smaller lr), with ``feasible=False``
    and a :class:`UserWarning`.

    Args:
        model, edits, control, params, max_steps, batch_size: as in :func:`fastedit.evaluate`.
        editor: a name or an :class:`~fastedit.Editor` class (the class defaults, see
            :mod:`fastedit.editors`, for the hyper-parameters not in ``grid``) or an instance (its
            hyper-parameters not in ``grid`` are kept).
        grid: ``{hyper-parameter name: list of values}``, searched as a full cartesian product (in
            the dict's order, the last name varying fastest). Names must be hyper-parameters of the
            editor; for Adam, ``"beta1"``/``"beta2"`` set the two entries of ``betas``. Default:
            ``lr`` log-spaced over 1e-5..1 (11 points, factor √10: :data:`DEFAULT_LRS`), plus ``beta ∈ {0.5, 0.9}``
            for RMSProp.
        min_success: the required success rate, in [0, 1].
        refine: after the grid, refine ``lr`` for every combination of the other searched
            hyper-parameters (e.g. each RMSProp ``beta``): start from that combination's best grid lr,
            step outward by the grid's spacing while the best sits at an edge (at most
            :data:`MAX_EXPANSIONS` times), then golden-section search on log lr inside the bracket
            until both neighbours of the best lr are within ``resolution``. The selection rule is the
            one above, read as an order that is unimodal in lr (infeasible points below the
            feasibility threshold improve with lr, drawdown grows past it). Default: on for the
            default grid, off for a given grid (which is then searched exactly as given).
        resolution: the refinement's stopping factor in lr (> 1; default 1.2).
        progress: one progress bar over grid points (evaluate's own bar is always off).
        **evaluate_kwargs: passed on to :func:`fastedit.evaluate` (``reduction``, ``use_prefix``,
            ``early_exit``).

    Every measured point, grid and refinement, is a row of ``table`` (``stage``: ``"grid"``,
    ``"expand"`` or ``"refine"``); comparisons between models need a fine resolution *and* enough
    tuning edits (≥ 100: one edit moves the success rate by 1%).

    Returns:
        :class:`TuneResult` with the chosen editor, its report and the whole table.
    """
    if isinstance(min_success, bool) or not isinstance(min_success, (int, float)) \
            or not math.isfinite(min_success) or not 0.0 <= min_success <= 1.0:
        raise ValueError(f"min_success must lie in [0, 1], got {min_success!r}")
    if "progress" in evaluate_kwargs:
        raise TypeError("pass progress to tune itself")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) \
            or not math.isfinite(resolution) or resolution <= 1.0:
        raise ValueError(f"resolution must be a finite factor > 1, got {resolution!r}")
    cls = _editor_class(editor)
    refine = grid is None if refine is None else bool(refine)
    grid = _check_grid(cls, default_grid(cls) if grid is None else grid)
    if refine and ("lr" not in grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and v > 0 for v in grid["lr"])):
        raise ValueError("refine=True needs an 'lr' entry of positive numbers in grid")
    base = _base_hparams(editor, cls)
    names = list(grid)
    points = [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]
    editors = [_build(cls, base, p) for p in points]  # invalid values fail before any evaluation
    search = _Search(model, edits, control, cls, base, params, max_steps, min_success, batch_size,
                     evaluate_kwargs, _progress(len(points), cls.name, progress))
    try:
        for point, ed in zip(points, editors):
            search.measure(point, "grid", ed)
        if refine:
            others = [n for n in names if n != "lr"]
            for combo in itertools.product(*(grid[n] for n in others)):
                search.refine_lr(dict(zip(others, combo)), sorted(set(float(v) for v in grid["lr"])), resolution)
    finally:
        if search.bar is not None:
            search.bar.close()

    table = search.table
    best = min(range(len(table)), key=search.rank)
    feasible = table[best]["success_rate"] >= min_success
    if not feasible:
        warnings.warn(f"tune: no grid point reached success_rate ≥ {min_success} within {max_steps} steps "
                      f"(best {table[best]['success_rate']:.3f}); chose the highest success rate "
                      f"{search.editors[best]!r}", UserWarning, stacklevel=2)
    return TuneResult(editor=search.editors[best], report=search.reports[best], table=table, feasible=feasible,
                      min_success=float(min_success),
                      lr_resolution=search.neighbour_factor(best) if refine else None)


class _Search:
    """The measured points of one :func:`tune` call, their ranking and the lr refinement."""

    def __init__(self, model, edits, control, cls, base, params, max_steps, min_success, batch_size,
                 evaluate_kwargs, bar):
        self.model, self.edits, self.control, self.cls, self.base = model, edits, control, cls, base
        self.params, self.max_steps, self.min_success, self.batch_size = params, max_steps, min_success, batch_size
        self.evaluate_kwargs, self.bar = evaluate_kwargs, bar
        self.table: list[dict[str, Any]] = []
        self.reports: list[EvalReport] = []
        self.editors: list[Editor] = []
        self.points: list[dict[str, Any]] = []

    def measure(self, point: dict, stage: str, ed: Editor | None = None) -> int:
        """Evaluate one point (once: a repeated point returns its earlier row) -> its row index."""
        for i, p in enumerate(self.points):
            if p == point:
                return i
        ed = _build(self.cls, self.base, point) if ed is None else ed
        start = time.perf_counter()
        rep = evaluate(self.model, self.edits, self.control, editor=ed, params=self.params,
                       max_steps=self.max_steps, batch_size=self.batch_size, progress=False, **self.evaluate_kwargs)
        row = {k: _as_number(v) for k, v in point.items()}
        row.update({m: float(getattr(rep, m)) for m in _METRICS})
        row["seconds"] = time.perf_counter() - start
        row["stage"] = stage
        self.table.append(row)
        self.reports.append(rep)
        self.editors.append(ed)
        self.points.append(dict(point))
        if self.bar is not None:
            if stage != "grid":
                self.bar.total += 1
            self.bar.update(1)
            self.bar.set_postfix(drawdown=f"{rep.drawdown:.4f}", success=f"{rep.success_rate:.3f}")
        return len(self.table) - 1

    def lr_of(self, i: int) -> float:
        lr = _as_number(getattr(self.editors[i], "lr", 0.0))
        return float(lr) if isinstance(lr, (int, float)) else 0.0

    def rank(self, i: int) -> tuple:
        """The selection order (smaller is better): feasible by drawdown, else by success rate."""
        r = self.table[i]
        if r["success_rate"] >= self.min_success:
            return (0, r["drawdown"], -r["success_rate"], r["mean_steps"], self.lr_of(i), i)
        return (1, -r["success_rate"], r["drawdown"], r["mean_steps"], self.lr_of(i), i)

    def neighbour_factor(self, i: int) -> float:
        """The larger factor between row i's lr and its nearest measured lrs (same other hyper-parameters)."""
        others = {k: v for k, v in self.points[i].items() if k != "lr"}
        lrs = sorted({float(p["lr"]) for p in self.points if {k: v for k, v in p.items() if k != "lr"} == others})
        lr = float(self.points[i]["lr"])
        k = lrs.index(lr)
        if k == 0 or k == len(lrs) - 1:
            return math.inf
        return max(lr / lrs[k - 1], lrs[k + 1] / lr)

    def refine_lr(self, fixed: dict, grid_lrs: list[float], resolution: float) -> None:
        """Bracket and golden-section the best lr for the other hyper-parameters ``fixed``."""
        def at(lr: float, stage: str) -> int:
            return self.measure({**fixed, "lr": lr} if fixed else {"lr": lr}, stage)

        rows = [at(lr, "grid") for lr in grid_lrs]
        # the grid's mean log spacing (×√10 for a single point)
        step = math.sqrt(10.0) if len(grid_lrs) < 2 else (grid_lrs[-1] / grid_lrs[0]) ** (1 / (len(grid_lrs) - 1))
        k = min(range(len(rows)), key=lambda j: self.rank(rows[j]))
        lo, best, hi = (grid_lrs[k - 1] if k > 0 else None), grid_lrs[k], (grid_lrs[k + 1] if k + 1 < len(rows) else None)
        best_row = rows[k]
        for _ in range(MAX_EXPANSIONS):  # step outward while the best is at an edge
            if lo is not None and hi is not None:
                break
            new = best / step if lo is None else best * step
            j = at(new, "expand")
            if self.rank(j) < self.rank(best_row):
                if lo is None:
                    hi, best, best_row = best, new, j
                else:
                    lo, best, best_row = best, new, j
            elif lo is None:
                lo = new
            else:
                hi = new
        if lo is None or hi is None:
            return  # still at an edge: the reported resolution is inf
        a, c, b = math.log(lo), math.log(best), math.log(hi)
        tol = math.log(resolution)
        while max(c - a, b - c) > tol * (1 + 1e-9):
            x = c + _GOLDEN * (b - c) if b - c >= c - a else c - _GOLDEN * (c - a)
            j = at(math.exp(x), "refine")
            if self.rank(j) < self.rank(best_row):
                if x > c:
                    a, c = c, x
                else:
                    b, c = c, x
                best_row = j
            elif x > c:
                b = x
            else:
                a = x
