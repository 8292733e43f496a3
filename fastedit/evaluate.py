"""The paper's evaluation protocol (Sinitsin et al. 2020, §4.1), plus instance-wise side effects.

Each edit (one input with a target label) is applied *independently* to the original model; after
it, the whole control set is classified. Reported: base error, drawdown (mean increase of the
control error), success rate, mean number of steps, and from Neural Network Surgery the flip rate
(share of control predictions that changed; split correct→wrong / wrong→correct) and the mean
KL(original ‖ edited). Also the paper's Figure 2 data: a per-class drawdown matrix (class of the
edited input × class of the control sample) and, optionally, per-edit vectors of per-control-sample
KL divergences (for a t-SNE of edits, see :mod:`fastedit.plots`).

The model is never written: every edit runs on copies of the editable parameters, so the model is
bit-identical afterwards. The frozen prefix of the control set is computed once.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .constraint import constraint_per_sample, reduce_constraint
from .edit import EditTarget, check_common, eval_mode, resolve_early_exit, run_edit_loop, run_edit_loop_batched
from .editors import Editor, make_editor
from .kernels.metrics import edit_metrics
from .selection import ParamSpec

__all__ = ["evaluate", "EvalReport"]


@dataclass
class EvalReport:
    base_error: float
    drawdown: float
    success_rate: float
    mean_steps: float
    flip_rate: float
    flip_rate_correct_to_wrong: float
    flip_rate_wrong_to_correct: float
    mean_kl: float
    num_edits: int
    num_control: int
    editor: dict
    params: list[str]
    max_steps: int
    seconds: float
    per_edit: dict[str, Tensor] = field(repr=False, default_factory=dict)
    #: ``[C, C]`` float64: row = class of the edited input, column = true class of the control sample;
    #: entry = mean over the row's edits of (control error rate within the column class after the edit
    #: − before). NaN rows: no edit of that class; NaN columns: no control sample of that class.
    per_class_drawdown: Tensor = field(repr=False, default_factory=lambda: torch.empty(0, 0, dtype=torch.float64))
    num_classes: int = 0
    #: where the rows' classes come from: "labels" (``edit_labels``) or "predictions" (original model)
    edit_class_source: str = "labels"
    #: how edits were processed ("loop" or "vmap"), how many per group, and over how many ranks
    strategy: str = "loop"
    edits_per_group: int = 1
    world_size: int = 1

    def to_dict(self, per_edit: bool = False) -> dict:
        """JSON-ready summary (with the per-edit lists when ``per_edit``); NaN matrix cells become None."""
        out = {k: getattr(self, k) for k in (
            "base_error", "drawdown", "success_rate", "mean_steps", "flip_rate",
            "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl",
            "num_edits", "num_control", "editor", "params", "max_steps", "seconds")}
        out["num_classes"] = self.num_classes
        out["edit_class_source"] = self.edit_class_source
        out["strategy"], out["edits_per_group"], out["world_size"] = self.strategy, self.edits_per_group, self.world_size
        out["per_class_drawdown"] = _nan_to_none(self.per_class_drawdown.tolist())
        if per_edit:
            out["per_edit"] = {k: v.tolist() for k, v in self.per_edit.items()}
        return out

    def to_json(self, path) -> str:
        """Write ``to_dict(per_edit=True)`` as strict JSON (every NaN/±inf becomes null); returns ``path``."""
        with open(path, "w") as f:
            json.dump(_nan_to_none(self.to_dict(per_edit=True)), f, allow_nan=False)
        return path

    CSV_COLUMNS = ("index", "success", "steps", "errors", "flips", "correct_to_wrong", "wrong_to_correct",
                   "kl", "loss", "edit_class")

    def to_csv(self, path) -> str:
        """One row per edit (columns :attr:`CSV_COLUMNS`; counts as integers, success as 0/1); returns ``path``."""
        pe = self.per_edit
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.CSV_COLUMNS)
            for i in range(self.num_edits):
                row = [i]
                for k in self.CSV_COLUMNS[1:]:
                    v = pe[k][i].item() if k in pe else ""
                    row.append(int(v) if k in _COUNT_COLUMNS and v != "" and math.isfinite(v) else v)
                w.writerow(row)
        return path


_COUNT_COLUMNS = ("success", "steps", "errors", "flips", "correct_to_wrong", "wrong_to_correct", "edit_class")


def _nan_to_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _pairs(data, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{what} must be a pair (x, y)")
    return data[0], data[1]


#: Default memory budget for the control set's cached prefix activations (bytes); beyond it the
#: remaining chunks' activations are recomputed for every edit instead of kept.
DEFAULT_CACHE_BUDGET = 2 * 1024 ** 3

STRATEGIES = ("auto", "loop", "vmap", "measure")


def evaluate(model: nn.Module, edits, control, editor: Editor | str = "rmsprop", params: ParamSpec = None,
             max_steps: int = 10, *, batch_size: int = 256, reduction: str = "max", use_prefix: bool = True,
             early_exit: bool | str = "auto", progress: bool = True, edit_labels=None,
             keep_kl_vectors: bool = False, strategy: str = "auto", edits_per_group: int | None = None,
             cache_budget: float = DEFAULT_CACHE_BUDGET, distributed: bool | str = "auto") -> EvalReport:
    """Apply each edit ``(x_e[i], y_e[i])`` independently and measure its side effects on ``control``.

    Args:
        edits: ``(x_e [E, ...], y_e [E])``; each row is one edit.
        control: ``(x_c [N, ...], y_c [N])``, the set on which drawdown and flips are measured.
        editor, params, max_steps, reduction, use_prefix, early_exit: as in :func:`fastedit.edit`.
        batch_size: control samples per forward pass (a chunk).
        progress: show a progress bar with edits/s.
        edit_labels: ``[E]`` true classes of the edit inputs, the rows of ``per_class_drawdown``; when
            None the original model's predictions on the edit inputs are used
            (``edit_class_source == "predictions"``). Stored as ``per_edit["edit_class"]``.
        keep_kl_vectors: also store ``per_edit["kl_vector"]`` ``[E, N]`` float32, the per-control-sample
            KL(original ‖ edited) of each edit (its row mean is ``per_edit["kl"]``). Memory: E·N floats.
        strategy: how edits are processed together. ``"loop"``: one edit after the other (the exact
            reference; ``edits_per_group`` edits share each pass over the cached control chunks);
            ``"vmap"``: ``edits_per_group`` edits run side by side under :func:`torch.func.vmap`, both
            their edit loops and their control passes (convolutions become grouped convolutions;
            results equal the loop's up to rounding); ``"measure"``: time the first group both ways
            and use the faster; ``"auto"``: ``"loop"`` on the CPU (where vmap measured slower, see
            ``benchmarks/bench_evaluate.py``), ``"measure"`` on other devices.
        edits_per_group: edits per group (default 1 for ``"loop"``, 16 otherwise).
        cache_budget: bytes of control-set prefix activations kept in memory; chunks beyond the budget
            are recomputed from the inputs for every edit (same results, more time). ``0`` keeps none.
        distributed: with ``torch.distributed`` initialised (e.g. under ``torchrun``) and ``"auto"``
            (or True), the edits are sharded across the ranks in contiguous blocks and the per-edit
            results gathered, so every rank returns the report a single process would (up to
            ``seconds``). All ranks must call ``evaluate`` with the same arguments. False: no sharding.

    Besides the summary numbers, ``per_edit["errors_per_class"]`` ``[E, C]`` int64 counts each edit's
    control errors by true control class, and ``per_class_drawdown`` is the ``[C, C]`` matrix of the
    paper's Figure 2. Identity: ``Σ_r (edits in r / E) · Σ_c per_class_drawdown[r, c] · (N_c / N)``
    equals ``drawdown`` (when every class occurs in the control set).

    An edit satisfied before its first step leaves the parameters untouched, so its control metrics
    are the original model's and its control pass is skipped (with ``early_exit``, where the step
    count is read anyway).
    """
    check_common(max_steps, reduction)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if edits_per_group is not None and (isinstance(edits_per_group, bool) or not isinstance(edits_per_group, int)
                                        or edits_per_group < 1):
        raise ValueError(f"edits_per_group must be an integer ≥ 1, got {edits_per_group!r}")
    if not (isinstance(cache_budget, (int, float)) and not isinstance(cache_budget, bool) and cache_budget >= 0):
        raise ValueError(f"cache_budget must be a number of bytes ≥ 0, got {cache_budget!r}")
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    editor = make_editor(editor)
    x_e, y_e = _pairs(edits, "edits")
    x_c, y_c = _pairs(control, "control")
    rank, world = _shard_info(distributed)
    start = time.perf_counter()
    with eval_mode(model):
        target = EditTarget.build(model, params, use_prefix)
        y_e = target.check_inputs(x_e, y_e)
        y_c = target.check_inputs(x_c, y_c)
        early = resolve_early_exit(early_exit, target.device)
        if strategy == "auto":
            strategy = "loop" if target.device.type == "cpu" else "measure"
        group = edits_per_group or (1 if strategy == "loop" else 16)

        with torch.no_grad():
            control_set = _ControlSet(target, x_c, y_c, batch_size, cache_budget)
            if edit_labels is None:  # rows of the per-class matrix: the original model's predictions
                edit_labels = torch.cat([target.logits(target.prefix(x_e[lo:lo + batch_size])).argmax(-1)
                                         for lo in range(0, x_e.shape[0], batch_size)])
                edit_class_source = "predictions"
            else:
                edit_labels = target.check_inputs(x_e, edit_labels)
                edit_class_source = "labels"
        num_classes = control_set.num_classes
        target.check_labels(num_classes, torch.cat([y_e, y_c, edit_labels]))
        base_per_class = control_set.base_errors_per_class().cpu()

        runner = _GroupRunner(target, control_set, editor, max_steps, reduction, early, keep_kl_vectors,
                              num_classes, base_per_class)
        n_edits = x_e.shape[0]
        lo, hi = rank * n_edits // world, (rank + 1) * n_edits // world  # this rank's block of edits
        rows: list[dict[str, Tensor]] = []
        bar = _progress(n_edits, editor, progress and rank == 0, world)
        for g0 in range(lo, hi, group):
            idx = range(g0, min(g0 + group, hi))
            if strategy == "measure":
                strategy = runner.measure(x_e, y_e, idx)
                rows.append(runner.last)
            else:
                rows.append(runner.run(strategy, x_e, y_e, idx))
            if bar is not None:
                bar.update(len(idx) * world)
        if bar is not None:
            bar.close()

    pe = {k: torch.cat([r[k] for r in rows]) if rows else torch.empty(0) for k in (rows[0] if rows else {})}
    if world > 1:
        pe = _gather_per_edit(pe, world)
    base_error = int(base_per_class.sum()) / control_set.n
    n_control = control_set.n
    error = pe["errors"].double() / n_control
    pe["error"] = error
    pe["edit_class"] = edit_labels.cpu().to(torch.int64)
    per_class = _per_class_drawdown(pe["errors_per_class"], base_per_class, y_c.cpu(), pe["edit_class"],
                                    num_classes)
    return EvalReport(
        base_error=base_error,
        drawdown=float((error - base_error).mean()),
        success_rate=float(pe["success"].double().mean()),
        mean_steps=float(pe["steps"].double().mean()),
        flip_rate=float(pe["flips"].double().mean() / n_control),
        flip_rate_correct_to_wrong=float(pe["correct_to_wrong"].double().mean() / n_control),
        flip_rate_wrong_to_correct=float(pe["wrong_to_correct"].double().mean() / n_control),
        mean_kl=float(pe["kl"].double().mean()),
        num_edits=int(n_edits), num_control=int(n_control), editor=editor.to_dict(),
        params=list(target.names), max_steps=max_steps, seconds=time.perf_counter() - start, per_edit=pe,
        per_class_drawdown=per_class, num_classes=int(num_classes),
        edit_class_source=edit_class_source, strategy=strategy, edits_per_group=group, world_size=world,
    )


class _ControlSet:
    """The control set in chunks of ``batch_size``: labels and the original logits always kept, the
    frozen prefix's activations kept while they fit ``budget`` bytes and recomputed per use beyond."""

    def __init__(self, target: EditTarget, x: Tensor, y: Tensor, batch_size: int, budget: float):
        self.target, self.x, self.n = target, x, int(x.shape[0])
        self.chunks: list[list] = []  # [lo, hi, activations or None, labels, original logits]
        self.cached_bytes = 0
        for lo in range(0, self.n, batch_size):
            hi = min(lo + batch_size, self.n)
            acts = target.prefix(x[lo:hi])
            size = sum(t.nbytes for t in torch.utils._pytree.tree_leaves(acts) if isinstance(t, Tensor))
            keep = self.cached_bytes + size <= budget
            self.cached_bytes += size if keep else 0
            self.chunks.append([lo, hi, acts if keep else None, y[lo:hi], target.logits(acts)])
        self.num_classes = int(self.chunks[0][4].shape[-1])

    def base_errors_per_class(self) -> Tensor:
        """``[C]`` int64: the original model's control errors by true class, counted by the same op
        (same argmax, same dtype) that counts the edited models' errors."""
        return sum(edit_metrics(ref, yc, ref.unsqueeze(0))["errors_per_class"][0] for *_, yc, ref in self.chunks)

    def __iter__(self):
        for lo, hi, acts, yc, ref in self.chunks:
            yield (acts if acts is not None else self.target.prefix(self.x[lo:hi])), yc, ref


_METRIC_KEYS = ("errors", "flips", "correct_to_wrong", "wrong_to_correct")


class _GroupRunner:
    """Runs a group of edits (edit loops, then one pass over the control chunks for all of them)."""

    def __init__(self, target, control_set, editor, max_steps, reduction, early, keep_kl, num_classes,
                 base_per_class):
        self.target, self.control, self.editor = target, control_set, editor
        self.max_steps, self.reduction, self.early, self.keep_kl = max_steps, reduction, early, keep_kl
        self.num_classes, self.base_per_class = num_classes, base_per_class
        self.last: dict[str, Tensor] = {}

    def _loss_one(self, theta, inp):
        acts, y = inp
        return reduce_constraint(constraint_per_sample(self.target.logits(acts, theta), y), self.reduction)

    def edit_loops(self, strategy: str, x_e: Tensor, y_e: Tensor, idx: range):
        """Per group: edited parameters (list of ``[G, ...]``), steps, final loss and bad steps ``[G]``."""
        t = self.target
        if strategy == "loop":
            outs = [run_edit_loop(t.loss_fn(t.prefix(x_e[i:i + 1]), y_e[i:i + 1], self.reduction), t.params,
                                  self.editor, self.max_steps, early_exit=self.early) for i in idx]
            params = [torch.stack(ps) for ps in zip(*(o.params for o in outs))]
            return params, *(torch.stack([getattr(o, k) for o in outs]) for k in ("steps", "loss", "bad_step"))
        acts = t.prefix(x_e[idx.start:idx.stop])  # eval mode: per-sample, so one batch serves all edits
        inputs = (torch.utils._pytree.tree_map(lambda a: a.unsqueeze(1) if isinstance(a, Tensor) else a, acts),
                  y_e[idx.start:idx.stop].unsqueeze(1))
        out = run_edit_loop_batched(self._loss_one, t.params, inputs, self.editor, self.max_steps,
                                    early_exit=self.early)
        return out.params, out.steps, out.loss, out.bad_step

    def control_pass(self, strategy: str, params: list[Tensor]) -> dict[str, Tensor]:
        """Metrics of ``G`` edited parameter sets over the whole control set."""
        g = params[0].shape[0]
        t = self.target
        totals = {k: torch.zeros(g, dtype=torch.int64) for k in _METRIC_KEYS}
        totals["kl"] = torch.zeros(g, dtype=torch.float64)
        totals["errors_per_class"] = torch.zeros(g, self.num_classes, dtype=torch.int64)
        kl_rows = []
        if strategy == "vmap":
            from torch.func import vmap
        with torch.no_grad():
            for acts, y, ref in self.control:
                if strategy == "vmap":
                    logits = vmap(lambda th: t.logits(acts, th))(params)
                else:
                    logits = torch.stack([t.logits(acts, [p[e] for p in params]) for e in range(g)])
                m = _chunk_metrics(ref, y, logits, self.num_classes, self.keep_kl)
                for k in totals:
                    totals[k] += m[k].to(totals[k].device)
                if self.keep_kl:
                    kl_rows.append(m["kl_rows"])
        totals["kl"] = (totals["kl"] / self.control.n).float()
        if self.keep_kl:
            totals["kl_vector"] = torch.cat(kl_rows, dim=1).cpu()
        return totals

    def run(self, strategy: str, x_e: Tensor, y_e: Tensor, idx: range) -> dict[str, Tensor]:
        params, steps, loss, bad_step = self.edit_loops(strategy, x_e, y_e, idx)
        g = len(idx)
        # an edit with no step kept the original parameters: its metrics are the original model's
        untouched = ((steps == 0) & (bad_step < 0)).cpu() if self.early else torch.zeros(g, dtype=torch.bool)
        need = (~untouched).nonzero().flatten().tolist()
        row = {k: torch.zeros(g, dtype=torch.int64) for k in _METRIC_KEYS}
        row["errors"] += int(self.base_per_class.sum())
        row["kl"] = torch.zeros(g)
        row["errors_per_class"] = self.base_per_class.repeat(g, 1)
        if self.keep_kl:
            row["kl_vector"] = torch.zeros(g, self.control.n)
        if need:
            sub = params if len(need) == g else [p[need] for p in params]
            for k, v in self.control_pass(strategy, sub).items():
                row[k][need] = v
        row["success"] = ((loss <= 0) & (bad_step < 0)).cpu()
        row["steps"] = steps.cpu()
        row["loss"] = loss.float().cpu()
        row["nonfinite"] = (bad_step >= 0).cpu()
        self.last = row
        return row

    def measure(self, x_e: Tensor, y_e: Tensor, idx: range) -> str:
        """Run the group both ways, keep the loop's results (the reference), return the faster strategy."""
        seconds = {}
        for strategy in ("vmap", "loop"):
            _synchronize(self.target.device)
            t0 = time.perf_counter()
            row = self.run(strategy, x_e, y_e, idx)
            _synchronize(self.target.device)
            seconds[strategy] = time.perf_counter() - t0
        self.last = row
        return min(seconds, key=seconds.get)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunk_metrics(ref: Tensor, y: Tensor, logits: Tensor, num_classes: int, keep_kl: bool) -> dict[str, Tensor]:
    """Per-edit metrics of one control chunk (``ref [B, C]``, ``y [B]``, ``logits [G, B, C]``) from the
    fused :func:`fastedit.ops.edit_metrics` (one pass per row, no ``[G, B, C]`` softmax)."""
    if logits.dtype != ref.dtype:  # the op takes one dtype; the wider one loses nothing
        common = torch.promote_types(ref.dtype, logits.dtype)
        ref, logits = ref.to(common), logits.to(common)
    m = edit_metrics(ref, y, logits, return_kl_rows=keep_kl)
    out = {k: m[k] for k in _METRIC_KEYS}
    out["errors_per_class"] = m["errors_per_class"]
    out["kl"] = m["kl"].double() * y.shape[0]  # chunk mean → sum, so chunks of any size add up
    if keep_kl:
        out["kl_rows"] = m["kl_rows"]
    return out


def _shard_info(distributed) -> tuple[int, int]:
    if distributed is False:
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if distributed is True:
            raise RuntimeError("distributed=True but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _gather_per_edit(pe: dict[str, Tensor], world: int) -> dict[str, Tensor]:
    """All ranks' per-edit tensors, concatenated in rank order (= edit order: blocks are contiguous)."""
    import torch.distributed as dist
    parts: list = [None] * world
    dist.all_gather_object(parts, {k: v.cpu() for k, v in pe.items()})
    keys = next(p for p in parts if p)  # a rank with no edits sends an empty dict
    return {k: torch.cat([p[k] for p in parts if p]) for k in keys}


def _per_class_drawdown(errors_per_class: Tensor, base_per_class: Tensor, y_c: Tensor, edit_class: Tensor,
                        num_classes: int) -> Tensor:
    """``[C, C]`` float64 mean over edits of row class r of (error rate in control class c after − before)."""
    n_c = torch.bincount(y_c, minlength=num_classes).double()  # 0 → 0/0 = NaN column
    delta = (errors_per_class.double() - base_per_class.double()) / n_c  # [E, C]
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, edit_class, delta)
    counts = torch.bincount(edit_class, minlength=num_classes).double()
    return sums / counts.unsqueeze(1)  # rows without edits: 0/0 = NaN


def _progress(total: int, editor: Editor, enabled: bool, world: int = 1):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but evaluation must not need it
        return None
    desc = f"edits ({editor.name}{f', {world} ranks' if world > 1 else ''})"
    return tqdm(total=total, desc=desc, unit="edit", leave=False)
