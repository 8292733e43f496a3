"""The paper's evaluation protocol (Sinitsin et al. 2020, §4.1), plus instance-wise side effects.

Each edit (inputs with a constraint: a target label, target tokens, a preferred sequence, ...) is
applied *independently* to the original model; after it, the whole control set is measured.
Reported: base error, drawdown (mean increase of the control error), success rate, mean number of
steps, and from Neural Network Surgery the flip rate (share of control predictions that changed;
split correct→wrong / wrong→correct) and the mean KL(original ‖ edited). A classification control
counts samples; a token control (``fe.TokenTargets``) counts labelled tokens, plus the sequence exact
match (a row is right iff all its labelled tokens are). Also the paper's Figure 2 data for
classifiers: a per-class drawdown matrix (class of the edited input × class of the control sample)
and, optionally, per-edit vectors of per-control-unit KL divergences (for a t-SNE of edits, see
:mod:`fastedit.plots`).

The model is never written: every edit runs on copies of the editable parameters, so the model is
bit-identical afterwards. The frozen prefix of the control set is computed once.
"""
from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._core import (
    EditTarget,
    check_common,
    eval_mode,
    resolve_early_exit,
    run_edit_loop,
    run_edit_loop_batched,
    split_info,
)
from .compiled import resolve_compile
from .constraint import (
    IGNORE_INDEX,
    Classification,
    Constraint,
    TokenTargets,
    check_label_range,
    reduce_constraint,
    validate,
)
from .editors import Editor, make_editor
from .model_io import ModelInputs, OutputSpec
from .ops.edit_metrics import edit_metrics
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
    #: "classification" (per-sample metrics) or "tokens" (per labelled token, and per row)
    control_kind: str = "classification"
    #: why vmap was given up for the loop (None: it was not)
    strategy_fallback: str | None = None
    #: whether the frozen prefix was skipped in the editor steps ("fx" or "call-cache"), and if not why
    prefix_used: bool = False
    prefix_reason: str | None = None
    prefix_method: str = "none"
    #: the submodules that computed only the output positions the model reads, and why that stopped
    rows_pruned: list = field(default_factory=list)
    rows_reason: str | None = None
    #: whether the edit steps ran through torch.compile (``compile=``), why not where asked, and the
    #: seconds this call spent compiling
    compiled: bool = False
    compile_reason: str | None = None
    compile_seconds: float = 0.0
    #: token controls: the share of rows with some labelled token wrong, before, and its mean increase
    sequence_base_error: float | None = None
    sequence_drawdown: float | None = None
    num_control_tokens: int | None = None
    #: edits whose constraint or gradient became non-finite (NaN/±inf) at some step
    #: (``per_edit["nonfinite"]``): such an edit stops before that step, counts as failed (success 0),
    #: and its control metrics are those of its parameters before that step (the original model's
    #: when it was step 0, e.g. for a non-finite input). :func:`evaluate` warns when it is not 0.
    num_nonfinite: int = 0

    @property
    def metrics(self) -> list[str]:
        """The metrics this report holds (they depend on the control's kind)."""
        common = ["drawdown", "success_rate", "mean_steps", "flip_rate", "flip_rate_correct_to_wrong",
                  "flip_rate_wrong_to_correct", "mean_kl"]
        if self.control_kind == "tokens":
            return ["token_error", *common[:1], "sequence_error", "sequence_drawdown", *common[1:]]
        return ["error", *common, "per_class_drawdown"]

    def to_dict(self, per_edit: bool = False) -> dict:
        """JSON-ready summary (with the per-edit lists when ``per_edit``); NaN matrix cells become None."""
        out = {k: getattr(self, k) for k in (
            "base_error", "drawdown", "success_rate", "mean_steps", "flip_rate",
            "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl",
            "num_edits", "num_nonfinite", "num_control", "editor", "params", "max_steps", "seconds")}
        out["num_classes"] = self.num_classes
        out["edit_class_source"] = self.edit_class_source
        out["strategy"], out["edits_per_group"], out["world_size"] = self.strategy, self.edits_per_group, self.world_size
        out["strategy_fallback"] = self.strategy_fallback
        out["control_kind"], out["metrics"] = self.control_kind, self.metrics
        out["prefix_used"], out["prefix_reason"], out["prefix_method"] = (self.prefix_used, self.prefix_reason,
                                                                          self.prefix_method)
        out["rows_pruned"], out["rows_reason"] = list(self.rows_pruned), self.rows_reason
        out["compiled"], out["compile_reason"] = self.compiled, self.compile_reason
        out["compile_seconds"] = self.compile_seconds
        if self.control_kind == "tokens":
            out["sequence_base_error"], out["sequence_drawdown"] = self.sequence_base_error, self.sequence_drawdown
            out["num_control_tokens"] = self.num_control_tokens
        out["per_class_drawdown"] = nan_to_none(self.per_class_drawdown.tolist())
        if per_edit:
            out["per_edit"] = {k: v.tolist() for k, v in self.per_edit.items()}
        return out

    def to_json(self, path) -> str:
        """Write ``to_dict(per_edit=True)`` as strict JSON (every NaN/±inf becomes null); returns ``path``."""
        with open(path, "w") as f:
            json.dump(nan_to_none(self.to_dict(per_edit=True)), f, allow_nan=False)
        return path

    CSV_COLUMNS = ("index", "success", "steps", "errors", "flips", "correct_to_wrong", "wrong_to_correct",
                   "kl", "loss", "edit_class")

    def to_csv(self, path) -> str:
        """One row per edit (columns :attr:`CSV_COLUMNS`, and ``sequence_errors`` for a token
        control; counts as integers, success as 0/1); returns ``path``."""
        pe = self.per_edit
        columns = self.CSV_COLUMNS + (("sequence_errors",) if "sequence_errors" in pe else ())
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for i in range(self.num_edits):
                row = [i]
                for k in columns[1:]:
                    v = pe[k][i].item() if k in pe else ""
                    row.append(int(v) if k in _COUNT_COLUMNS and v != "" and math.isfinite(v) else v)
                w.writerow(row)
        return path


_COUNT_COLUMNS = ("success", "steps", "errors", "flips", "correct_to_wrong", "wrong_to_correct", "edit_class",
                  "sequence_errors")


def nan_to_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


#: Default memory budget for the control set's cached prefix activations (bytes); beyond it the
#: remaining chunks' activations are recomputed for every edit instead of kept.
DEFAULT_CACHE_BUDGET = 2 * 1024 ** 3

STRATEGIES = ("auto", "loop", "vmap", "measure")


def is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


class EditSet:
    """The edits of an evaluation, each ``(ModelInputs, Constraint)``: from ``(inputs, target)``, whose
    units (rows, or groups of candidates) are the edits, or from a list of ``(inputs, target)`` pairs."""

    def __init__(self, target: EditTarget, edits):
        self.batched: tuple[ModelInputs, Constraint] | None = None
        self.cases: list[tuple[ModelInputs, Constraint]] = []
        if isinstance(edits, (tuple, list)) and edits and all(is_pair(e) for e in edits):
            self.cases = [target.check_inputs(inp, tgt, f"edit {k}") for k, (inp, tgt) in enumerate(edits)]
        elif is_pair(edits):
            mi, c = target.check_inputs(edits[0], edits[1], "edits")
            if c.rows_per_unit is None:
                raise TypeError(f"{type(c).__name__} covers one whole edit: pass the edits as a list of "
                                "(inputs, constraint) pairs")
            self.batched = (mi, c)
            self.rows_per_unit = c.rows_per_unit
        else:
            raise TypeError("edits must be a pair (inputs, target), whose rows are the edits, or a list of "
                            "(inputs, target) pairs")

    def __len__(self) -> int:
        if self.batched is None:
            return len(self.cases)
        mi, c = self.batched
        return c.num_units(mi.num_samples)

    def __getitem__(self, i: int) -> tuple[ModelInputs, Constraint]:
        if self.batched is None:
            return self.cases[i]
        mi, c = self.batched
        r = self.rows_per_unit
        return mi.rows(i * r, (i + 1) * r), c.units(i, i + 1)

    def first_inputs(self) -> ModelInputs:
        return self[0][0]

    def checked_classes(self, target: EditTarget, batch_size: int) -> Tensor:
        """Validate every edit's constraint against the original model's logits (shapes, label
        ranges, labelled positions) before any step is taken; return each edit's predicted class
        (the argmax of its first row; -1 when the logits are not ``[B, C]``)."""
        classes = []

        def first_classes(logits: Tensor, r: int) -> Tensor:
            if logits.dim() != 2:
                return torch.full((logits.shape[0] // r,), -1, dtype=torch.int64, device=logits.device)
            return logits[::r].argmax(-1)

        with torch.no_grad():
            if self.batched is None:
                for k, (mi, c) in enumerate(self.cases):
                    t = target.for_inputs(mi)  # edits may differ in call signature
                    logits = t.logits(t.checked_prefix(mi, steps=False))
                    validate(c, logits, f"edit {k}")
                    classes.append(first_classes(logits[:1], 1))
            else:
                mi, c = self.batched
                r = self.rows_per_unit
                u0, per = 0, 1  # the first unit alone tells the logits' size per row
                while u0 < len(self):
                    u1 = min(u0 + per, len(self))
                    logits = target.logits(target.checked_prefix(mi.rows(u0 * r, u1 * r), steps=False))
                    validate(c.units(u0, u1), logits, "edits", row_offset=u0 * r)
                    classes.append(first_classes(logits, r))
                    per_row = max(1, logits[0].numel())
                    per = max(1, min(batch_size, 2 ** 25 // per_row) // r)
                    u0 = u1
        return torch.cat(classes)


class ControlSet:
    """The control set in chunks of ``batch_size`` rows: labels and the original logits always kept, the
    frozen prefix's activations kept while they fit ``budget`` bytes and recomputed per use beyond.

    Classification controls (``labels [N]``) are measured per sample; token controls
    (``fe.TokenTargets``) per labelled position, and per row for the sequence exact match."""

    def __init__(self, target: EditTarget, inputs, labels, batch_size: int | None, budget: float):
        self.target = target
        self.inputs = ModelInputs.of(inputs, "control")
        self.n = self.inputs.num_samples
        if isinstance(labels, TokenTargets):
            self.kind = "tokens"
            target.check_inputs(self.inputs, labels, "control")
            self.labels = labels
        elif isinstance(labels, Constraint) and not isinstance(labels, Classification):
            raise TypeError(f"control labels must be class labels [N] or fe.TokenTargets, got {type(labels).__name__}")
        else:
            self.kind = "classification"
            _, c = target.check_inputs(self.inputs, labels, "control")
            self.labels = c
        self.chunks: list[list] = []  # [lo, hi, activations or None, labels, original logits, token index]
        self.cached_bytes = 0
        lo = 0
        with torch.no_grad():
            while lo < self.n:
                hi = min(lo + (batch_size or self._auto_rows()), self.n)
                acts = target.checked_prefix(self.inputs.rows(lo, hi), steps=False)
                size = sum(t.nbytes for t in torch.utils._pytree.tree_leaves(acts) if isinstance(t, Tensor))
                keep = self.cached_bytes + size <= budget
                self.cached_bytes += size if keep else 0
                logits = target.logits(acts)
                self.chunks.append([lo, hi, acts if keep else None, *self._measured(logits, lo, hi)])
                lo = hi
        self.num_classes = int(self.chunks[0][4].shape[-1])
        self.num_units = sum(int(c[3].shape[0]) for c in self.chunks)  # samples, or labelled tokens
        if self.num_units == 0:
            raise ValueError("control: no labelled token in the whole control set (every label is -100); label "
                             "the tokens the metrics should count")

    def _auto_rows(self) -> int:
        """Rows per chunk when ``batch_size`` is None: 256 for classifiers; for token controls as many
        as keep one chunk's logits under 2**25 elements (128 MB in float32)."""
        if self.kind == "classification":
            return 256
        if not hasattr(self, "_rows"):
            with torch.no_grad():
                shape = self.target.logits(self.target.checked_prefix(self.inputs.rows(0, 1), steps=False)).shape
            self._rows = max(1, min(256, 2 ** 25 // max(1, shape[-2] * shape[-1])))
        return self._rows

    def _measured(self, logits: Tensor, lo: int, hi: int) -> tuple:
        """``(labels, original logits, token index)`` of one chunk: per sample, or per labelled token
        (``token index = (mask [B, T'], row of each token [M])``)."""
        if self.kind == "classification":
            c = self.labels.units(lo, hi)
            validate(c, logits, "control")
            return c.labels, logits, None
        c = self.labels.units(lo, hi)
        validate(c, logits, "control", row_offset=lo, allow_unlabelled_rows=True)
        z, lab = c.aligned(logits)
        mask = lab != IGNORE_INDEX
        rows = mask.nonzero()[:, 0]
        return lab[mask], z[mask], (mask, rows)

    def gather(self, logits: Tensor, index) -> Tensor:
        """Edited logits ``[G, B, ...]`` → the measured units ``[G, units, C]``."""
        if index is None:
            return logits
        mask, _ = index
        z = logits[:, :, :-1] if self.labels.causal else logits
        return z[:, mask]

    def base_errors_per_class(self) -> Tensor:
        """``[C]`` int64: the original model's control errors by true class (classification) or
        by target token (tokens), counted by the same op (same argmax, same dtype) that counts the
        edited models' errors."""
        return sum(edit_metrics(ref, yc, ref.unsqueeze(0))["errors_per_class"][0] for *_, yc, ref, _ in self.chunks)

    def base_sequence_errors(self) -> int:
        return int(sum(_sequence_errors(ref.argmax(-1).unsqueeze(0), yc, index)[0]
                       for *_, yc, ref, index in self.chunks))

    def num_sequences(self) -> int:
        return int(sum(index[0].any(-1).sum() for *_, index in self.chunks))

    def __iter__(self):
        for lo, hi, acts, yc, ref, index in self.chunks:
            yield (acts if acts is not None else self.target.checked_prefix(self.inputs.rows(lo, hi), steps=False)), yc, ref, index


def _sequence_errors(pred: Tensor, labels: Tensor, index) -> Tensor:
    """``[G]`` int64: rows (with at least one labelled token) where some labelled token is wrong."""
    mask, rows = index
    wrong = (pred != labels).to(torch.int64)                    # [G, M]
    per_row = torch.zeros(pred.shape[0], mask.shape[0], dtype=torch.int64, device=pred.device)
    per_row.index_add_(1, rows, wrong)
    return (per_row > 0).sum(1)


_METRIC_KEYS = ("errors", "flips", "correct_to_wrong", "wrong_to_correct")


class _CannotBatch(Exception):
    """The edits of a group cannot run side by side under vmap."""


def _stack(trees: list):
    """Stack pytrees of equal structure: tensors of equal shape along a new first dimension; other
    leaves must be equal."""
    flat = [torch.utils._pytree.tree_flatten(t) for t in trees]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat[1:]):
        raise _CannotBatch("the edits' inputs or activations differ in structure")
    out = []
    for leaves in zip(*(f[0] for f in flat)):
        if isinstance(leaves[0], Tensor):
            if any(not isinstance(v, Tensor) or v.shape != leaves[0].shape for v in leaves):
                raise _CannotBatch("the edits' inputs differ in shape (vmap needs equal shapes)")
            out.append(torch.stack(leaves))
        else:
            if any(v is not leaves[0] and v != leaves[0] for v in leaves):
                raise _CannotBatch("the edits' non-tensor arguments differ")
            out.append(leaves[0])
    return torch.utils._pytree.tree_unflatten(out, spec)


class _GroupRunner:
    """Runs a group of edits (edit loops, then one pass over the control chunks for all of them)."""

    def __init__(self, target, control_set, editor, max_steps, reduction, early, keep_kl, base_row):
        self.target, self.control, self.editor = target, control_set, editor
        self.max_steps, self.reduction, self.early, self.keep_kl = max_steps, reduction, early, keep_kl
        self.base_row = base_row
        self.last: dict[str, Tensor] = {}
        self.fallback: str | None = None  # why vmap was given up for the loop
        self.compile = False  # edit steps of the loop strategy through the compiled suffix
        self.compile_reason: str | None = None
        self.compiled_targets: dict[int, tuple] = {}  # the targets whose steps ran compiled

    def compile_info(self) -> dict:
        """The report's ``compiled``, ``compile_reason`` and ``compile_seconds``."""
        done = [(t, before) for t, before in self.compiled_targets.values() if t.compiled is not None]
        failed = next((t.compiled.failed for t, _ in done if t.compiled.failed), None)
        return {"compiled": bool(done) and failed is None, "compile_reason": failed or self.compile_reason,
                "compile_seconds": sum(t.compiled.compile_seconds - before for t, before in done)}

    def edit_loops(self, strategy: str, edits: EditSet, idx: range):
        """Per group: edited parameters (list of ``[G, ...]``), steps, final loss and bad steps ``[G]``."""
        t = self.target
        if strategy == "loop":
            outs = []
            for i in idx:
                mi, c = edits[i]
                ti = t.for_inputs(mi)  # the same parameters; the split for this edit's call signature
                if self.compile and id(ti) not in self.compiled_targets:
                    ti.use_compiled(True)
                    if ti.compiled is not None:
                        self.compiled_targets[id(ti)] = (ti, ti.compiled.compile_seconds)
                outs.append(run_edit_loop(ti.loss_fn(ti.prefix(mi), c, self.reduction, mi), ti.params,
                                          self.editor, self.max_steps, early_exit=self.early, names=ti.names))
            # one edit per group (the CPU default): a view, not an 8 MB copy per edit of ResNet-20's layer3
            params = [torch.stack(ps) if len(ps) > 1 else ps[0].unsqueeze(0) for ps in zip(*(o.params for o in outs))]
            return params, *(torch.stack([getattr(o, k) for o in outs]) for k in ("steps", "loss", "bad_step"))
        cases = [edits[i] for i in idx]
        t = t.for_inputs(cases[0][0])
        if t.compiled is not None:
            t.use_compiled(False)  # vmap groups run eager
            self.compiled_targets.pop(id(t), None)
        if self.compile:
            self.compile_reason = self.compile_reason or "vmap groups run eager"
        acts = _stack([t.prefix(mi) for mi, _ in cases])
        constraints = _stack([c for _, c in cases])

        def loss_one(theta, inp):
            a, c = inp
            return reduce_constraint(c.pack(c.per_sample(t.logits(a, theta))), self.reduction)

        out = run_edit_loop_batched(loss_one, t.params, (acts, constraints), self.editor, self.max_steps,
                                    early_exit=self.early, names=t.names)
        return out.params, out.steps, out.loss, out.bad_step

    def control_pass(self, strategy: str, params: list[Tensor]) -> dict[str, Tensor]:
        """Metrics of ``G`` edited parameter sets over the whole control set."""
        g = params[0].shape[0]
        t = self.control.target
        tokens = self.control.kind == "tokens"
        totals = {k: torch.zeros(g, dtype=torch.int64) for k in _METRIC_KEYS}
        totals["kl"] = torch.zeros(g, dtype=torch.float64)
        totals["errors_per_class"] = torch.zeros(g, self.control.num_classes, dtype=torch.int64)
        if tokens:
            totals["sequence_errors"] = torch.zeros(g, dtype=torch.int64)
        kl_rows = []
        if strategy == "vmap":
            from torch.func import vmap
        with torch.no_grad():
            for acts, y, ref, index in self.control:
                if strategy == "vmap":
                    logits = vmap(lambda th: t.logits(acts, th))(params)
                else:
                    logits = torch.stack([t.logits(acts, [p[e] for p in params]) for e in range(g)])
                logits = self.control.gather(logits, index)
                m = chunk_metrics(ref, y, logits, self.keep_kl)
                if tokens:
                    m["sequence_errors"] = _sequence_errors(logits.argmax(-1), y, index)
                for k in totals:
                    totals[k] += m[k].to(totals[k].device)
                if self.keep_kl:
                    kl_rows.append(m["kl_rows"])
        totals["kl"] = (totals["kl"] / self.control.num_units).float()
        if self.keep_kl:
            totals["kl_vector"] = torch.cat(kl_rows, dim=1).cpu()
        return totals

    def run(self, strategy: str, edits: EditSet, idx: range) -> dict[str, Tensor]:
        if strategy == "vmap":
            try:
                return self._run("vmap", edits, idx)
            except Exception as exc:  # noqa: BLE001 - no batching rule, ragged edits, ...: loop instead
                self.fallback = f"vmap failed, the loop ran instead: {_short(exc)}"
                warnings.warn(f"fastedit.evaluate: {self.fallback}", UserWarning, stacklevel=3)
                return self._run("loop", edits, idx)
        return self._run(strategy, edits, idx)

    def _run(self, strategy: str, edits: EditSet, idx: range) -> dict[str, Tensor]:
        params, steps, loss, bad_step = self.edit_loops(strategy, edits, idx)
        g = len(idx)
        # an edit with no step kept the original parameters: its metrics are the original model's
        untouched = ((steps == 0) & (bad_step < 0)).cpu() if self.early else torch.zeros(g, dtype=torch.bool)
        need = (~untouched).nonzero().flatten().tolist()
        row = {k: v.repeat(g, *([1] * v.dim())) for k, v in self.base_row.items()}
        if self.keep_kl:
            row["kl_vector"] = torch.zeros(g, self.control.num_units)
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

    def measure(self, edits: EditSet, idx: range) -> str:
        """Run the group both ways, keep the loop's results (the reference), return the faster strategy."""
        seconds = {}
        try:
            _synchronize(self.target.device)
            t0 = time.perf_counter()
            self._run("vmap", edits, idx)
            _synchronize(self.target.device)
            seconds["vmap"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            self.fallback = f"vmap failed, the loop ran instead: {_short(exc)}"
            warnings.warn(f"fastedit.evaluate: {self.fallback}", UserWarning, stacklevel=3)
        t0 = time.perf_counter()
        row = self._run("loop", edits, idx)
        _synchronize(self.target.device)
        seconds["loop"] = time.perf_counter() - t0
        self.last = row
        return min(seconds, key=seconds.get)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def evaluate(model: nn.Module, edits, control, editor: Editor | str = "rmsprop", params: ParamSpec = None,
             max_steps: int = 10, *, batch_size: int | None = None, reduction: str = "max", use_prefix: bool = True,
             early_exit: bool | str = "auto", progress: bool = True, edit_labels=None,
             keep_kl_vectors: bool = False, strategy: str = "auto", edits_per_group: int | None = None,
             cache_budget: float = DEFAULT_CACHE_BUDGET, distributed: bool | str = "auto",
             output: OutputSpec = None, include_frozen: bool = False, compile: bool | str = False) -> EvalReport:
    """Apply each edit independently to the original model and measure its side effects on ``control``.

    Args:
        edits: ``(inputs, target)``, whose units are the edits (each row for class labels
            ``[E]`` or :class:`~fastedit.TokenTargets`, each group of candidates for
            :class:`~fastedit.SequenceRanking`), or a list of ``(inputs, target)`` pairs, one per edit,
            with any constraint. Inputs are tensors, tuples or mappings (see :func:`fastedit.edit`).
        control: ``(inputs, labels [N])`` (a classifier: per-sample metrics) or ``(inputs,
            fe.TokenTargets(labels))`` (per labelled token: token error, token flips, mean per-token
            KL; and per row: sequence exact match, a row being right iff all its labelled tokens are).
        editor, params, max_steps, reduction, use_prefix, early_exit, output, include_frozen: as in
            :func:`fastedit.edit`.
        compile: the edit steps' suffix forward and backward through ``torch.compile`` (as in
            :func:`fastedit.edit`; the loop strategy only, vmap groups run eager). ``"auto"``
            compiles on CUDA when there are at least 32 edits. ``compiled``, ``compile_reason`` and
            ``compile_seconds`` in the report say what ran.
        batch_size: control rows per forward pass (a chunk); default 256 for classifiers, and for
            token controls as many rows as keep a chunk's logits under 2**25 elements.
        progress: show a progress bar with edits/s.
        edit_labels: ``[E]`` true classes of the edit inputs, the rows of ``per_class_drawdown``; when
            None the original model's predictions on each edit's first row are used
            (``edit_class_source == "predictions"``). Stored as ``per_edit["edit_class"]``.
        keep_kl_vectors: also store ``per_edit["kl_vector"]`` ``[E, N]`` float32, the per-control-unit
            KL(original ‖ edited) of each edit (its row mean is ``per_edit["kl"]``). Memory: E·N floats.
        strategy: how edits are processed together. ``"loop"``: one edit after the other (the exact
            reference; ``edits_per_group`` edits share each pass over the cached control chunks);
            ``"vmap"``: ``edits_per_group`` edits run side by side under :func:`torch.func.vmap`, both
            their edit loops and their control passes (convolutions become grouped convolutions;
            results equal the loop's up to rounding); ``"measure"``: time the first group both ways
            and use the faster; ``"auto"``: ``"loop"`` on the CPU (where vmap measured slower, see
            ``benchmarks/experiments/bench_evaluate.py``), ``"measure"`` on other devices. A group that vmap cannot
            run (no batching rule, edits of different shapes) runs in the loop, and so do all later
            ones: ``strategy`` then reports ``"loop"`` and ``strategy_fallback`` why (with a warning).
        edits_per_group: edits per group (default 1 for ``"loop"``, 16 otherwise).
        cache_budget: bytes of control-set prefix activations kept in memory; chunks beyond the budget
            are recomputed from the inputs for every edit (same results, more time). ``0`` keeps none.
        distributed: with ``torch.distributed`` initialised (e.g. under ``torchrun``) and ``"auto"``
            (or True), the edits are sharded across the ranks in contiguous blocks and the per-edit
            results gathered, so every rank returns the report a single process would (up to
            ``seconds``). All ranks must call ``evaluate`` with the same arguments. False: no sharding.

    Besides the summary numbers, for a classification control ``per_edit["errors_per_class"]``
    ``[E, C]`` int64 counts each edit's control errors by true control class, and
    ``per_class_drawdown`` is the ``[C, C]`` matrix of the paper's Figure 2. Identity:
    ``Σ_r (edits in r / E) · Σ_c per_class_drawdown[r, c] · (N_c / N)`` equals ``drawdown`` (when every
    class occurs in the control set). Token controls report ``sequence_base_error``,
    ``sequence_drawdown`` and ``per_edit["sequence_errors"]`` as well; ``metrics`` lists what applies.

    An edit whose constraint or gradient becomes non-finite stops before that step and counts as
    failed; ``num_nonfinite`` counts them (``per_edit["nonfinite"]`` says which), and a
    :class:`UserWarning` names how many and the first few indices.

    An edit satisfied before its first step leaves the parameters untouched, so its control metrics
    are the original model's and its control pass is skipped (with ``early_exit``, where the step
    count is read anyway). Every edit's constraint is checked against the model's logits before
    the first edit runs; bad input raises with the model untouched (it is never written).
    """
    check_common(max_steps, reduction)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
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
    if not is_pair(control):
        raise TypeError("control must be a pair (inputs, labels) or (inputs, fe.TokenTargets(labels))")
    rank, world = _shard_info(distributed)
    start = time.perf_counter()
    with eval_mode(model):
        target = EditTarget.build(model, params, use_prefix, output=output, include_frozen=include_frozen)
        edit_set = EditSet(target, edits)
        target = target.for_inputs(edit_set.first_inputs())
        early = resolve_early_exit(early_exit, target.device)
        if strategy == "auto":
            strategy = "loop" if target.device.type == "cpu" else "measure"
        group = edits_per_group or (1 if strategy == "loop" else 16)

        with torch.no_grad():
            control_set = ControlSet(target.for_inputs(control[0]), control[0], control[1], batch_size,
                                      cache_budget)
            predicted = edit_set.checked_classes(target, batch_size or 256)
        tokens = control_set.kind == "tokens"
        num_classes = control_set.num_classes
        if tokens:  # no per-class matrix over a vocabulary
            edit_labels, edit_class_source = torch.full((len(edit_set),), -1, dtype=torch.int64), "none"
        elif edit_labels is None:  # rows of the per-class matrix: the original model's predictions
            edit_labels, edit_class_source = predicted, "predictions"
        else:
            edit_labels = Classification(edit_labels).labels
            if edit_labels.shape[0] != len(edit_set):
                raise ValueError(f"edit_labels must hold one label per sample (edit): {len(edit_set)} edits, "
                                 f"{edit_labels.shape[0]} labels")
            check_label_range(edit_labels, num_classes)
            edit_class_source = "labels"
        base_per_class = control_set.base_errors_per_class().cpu()
        base_row = _base_row(control_set, base_per_class)

        runner = _GroupRunner(target, control_set, editor, max_steps, reduction, early, keep_kl_vectors, base_row)
        runner.compile = resolve_compile(compile, target.device, len(edit_set))
        n_edits = len(edit_set)
        lo, hi = rank * n_edits // world, (rank + 1) * n_edits // world  # this rank's block of edits
        rows: list[dict[str, Tensor]] = []
        bar = _progress(n_edits, editor, progress and rank == 0, world)
        for g0 in range(lo, hi, group):
            idx = range(g0, min(g0 + group, hi))
            if strategy == "measure":
                strategy = runner.measure(edit_set, idx)
                rows.append(runner.last)
            else:
                rows.append(runner.run(strategy, edit_set, idx))
                if runner.fallback is not None:
                    strategy = "loop"
            if bar is not None:
                bar.update(len(idx) * world)
        if bar is not None:
            bar.close()

    pe = {k: torch.cat([r[k] for r in rows]) if rows else torch.empty(0) for k in (rows[0] if rows else {})}
    if world > 1:
        pe = _gather_per_edit(pe, world)
    num_nonfinite = int(pe["nonfinite"].sum())
    if num_nonfinite and rank == 0:
        warnings.warn(_nonfinite_message(pe["nonfinite"]), UserWarning, stacklevel=2)
    n_units = control_set.num_units
    base_error = int(base_per_class.sum()) / n_units
    error = pe["errors"].double() / n_units
    pe["error"] = error
    pe["edit_class"] = edit_labels.cpu().to(torch.int64)
    extra = {}
    if tokens:
        n_seq = max(control_set.num_sequences(), 1)
        base_seq = control_set.base_sequence_errors() / n_seq
        extra = dict(sequence_base_error=base_seq,
                     sequence_drawdown=float((pe["sequence_errors"].double() / n_seq - base_seq).mean()),
                     num_control_tokens=int(n_units))
        per_class = torch.empty(0, 0, dtype=torch.float64)
        pe.pop("errors_per_class")
    else:
        per_class = _per_class_drawdown(pe["errors_per_class"], base_per_class,
                                        control_set.labels.labels.cpu(), pe["edit_class"], num_classes)
    return EvalReport(
        base_error=base_error,
        drawdown=float((error - base_error).mean()),
        success_rate=float(pe["success"].double().mean()),
        mean_steps=float(pe["steps"].double().mean()),
        flip_rate=float(pe["flips"].double().mean() / n_units),
        flip_rate_correct_to_wrong=float(pe["correct_to_wrong"].double().mean() / n_units),
        flip_rate_wrong_to_correct=float(pe["wrong_to_correct"].double().mean() / n_units),
        mean_kl=float(pe["kl"].double().mean()),
        num_edits=int(n_edits), num_control=int(control_set.n), editor=editor.to_dict(),
        params=list(target.names), max_steps=max_steps, seconds=time.perf_counter() - start, per_edit=pe,
        per_class_drawdown=per_class, num_classes=int(num_classes) if not tokens else 0,
        edit_class_source=edit_class_source, strategy=strategy, edits_per_group=group, world_size=world,
        control_kind=control_set.kind, strategy_fallback=runner.fallback, num_nonfinite=num_nonfinite,
        **split_info(target), **runner.compile_info(), **extra,
    )


def _nonfinite_message(nonfinite: Tensor, shown: int = 5) -> str:
    """The warning about edits with a non-finite constraint or gradient: how many, and the first few."""
    idx = nonfinite.nonzero().flatten().tolist()
    first = ", ".join(map(str, idx[:shown])) + (", ..." if len(idx) > shown else "")
    return (f"fastedit.evaluate: {len(idx)} of {nonfinite.numel()} edits had a non-finite constraint or gradient "
            f"(NaN/inf; edits {first}) and count as failed: check those edits' inputs for NaN/inf values, or use "
            "a smaller editor learning rate if the steps diverge (report.num_nonfinite, per_edit['nonfinite'])")


def _base_row(control_set: ControlSet, base_per_class: Tensor) -> dict[str, Tensor]:
    """The per-edit metrics of an edit that changed nothing (the original model's)."""
    row = {k: torch.zeros((), dtype=torch.int64) for k in _METRIC_KEYS}
    row["errors"] += int(base_per_class.sum())
    row["kl"] = torch.zeros(())
    row["errors_per_class"] = base_per_class
    if control_set.kind == "tokens":
        row["sequence_errors"] = torch.tensor(control_set.base_sequence_errors())
    return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_metrics(ref: Tensor, y: Tensor, logits: Tensor, keep_kl: bool) -> dict[str, Tensor]:
    """Per-edit metrics of one control chunk (``ref [B, C]``, ``y [B]``, ``logits [G, B, C]``; B samples
    or labelled tokens) from the fused :func:`fastedit.ops.edit_metrics` (one pass per row, no
    ``[G, B, C]`` softmax)."""
    if logits.dtype != ref.dtype:  # the op takes one dtype; the wider one loses nothing
        common = torch.promote_types(ref.dtype, logits.dtype)
        ref, logits = ref.to(common), logits.to(common)
    m = edit_metrics(ref, y, logits, return_kl_rows=keep_kl)
    out = {k: m[k] for k in _METRIC_KEYS}
    out["errors_per_class"] = m["errors_per_class"]
    # chunk mean → sum, so chunks of any size add up (a chunk with no labelled token adds 0, not NaN)
    out["kl"] = m["kl"].double() * y.shape[0] if y.shape[0] else torch.zeros_like(m["kl"], dtype=torch.float64)
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
