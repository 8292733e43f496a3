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

from .edit import EditTarget, check_common, resolve_early_exit, eval_mode, run_edit_loop
from .editors import Editor, make_editor
from .kernels.reference import edit_metrics
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

    def to_dict(self, per_edit: bool = False) -> dict:
        """JSON-ready summary (with the per-edit lists when ``per_edit``); NaN matrix cells become None."""
        out = {k: getattr(self, k) for k in (
            "base_error", "drawdown", "success_rate", "mean_steps", "flip_rate",
            "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl",
            "num_edits", "num_control", "editor", "params", "max_steps", "seconds")}
        out["num_classes"] = self.num_classes
        out["edit_class_source"] = self.edit_class_source
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


def evaluate(model: nn.Module, edits, control, editor: Editor | str = "rmsprop", params: ParamSpec = None,
             max_steps: int = 10, *, batch_size: int = 256, reduction: str = "max", use_prefix: bool = True,
             early_exit: bool | str = "auto", progress: bool = True, edit_labels=None,
             keep_kl_vectors: bool = False) -> EvalReport:
    """Apply each edit ``(x_e[i], y_e[i])`` independently and measure its side effects on ``control``.

    Args:
        edits: ``(x_e [E, ...], y_e [E])``; each row is one edit.
        control: ``(x_c [N, ...], y_c [N])``, the set on which drawdown and flips are measured.
        editor, params, max_steps, reduction, use_prefix, early_exit: as in :func:`fastedit.edit`.
        batch_size: control samples per forward pass.
        progress: show a progress bar with edits/s.
        edit_labels: ``[E]`` true classes of the edit inputs, the rows of ``per_class_drawdown``; when
            None the original model's predictions on the edit inputs are used
            (``edit_class_source == "predictions"``). Stored as ``per_edit["edit_class"]``.
        keep_kl_vectors: also store ``per_edit["kl_vector"]`` ``[E, N]`` float32, the per-control-sample
            KL(original ‖ edited) of each edit (its row mean is ``per_edit["kl"]``). Memory: E·N floats.

    Besides the summary numbers, ``per_edit["errors_per_class"]`` ``[E, C]`` int64 counts each edit's
    control errors by true control class, and ``per_class_drawdown`` is the ``[C, C]`` matrix of the
    paper's Figure 2. Identity: ``Σ_r (edits in r / E) · Σ_c per_class_drawdown[r, c] · (N_c / N)``
    equals ``drawdown`` (when every class occurs in the control set).
    """
    check_common(max_steps, reduction)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    editor = make_editor(editor)
    x_e, y_e = _pairs(edits, "edits")
    x_c, y_c = _pairs(control, "control")
    start = time.perf_counter()
    with eval_mode(model):
        target = EditTarget.build(model, params, use_prefix)
        y_e = target.check_inputs(x_e, y_e)
        y_c = target.check_inputs(x_c, y_c)
        early = resolve_early_exit(early_exit, target.device)

        chunks = []  # (prefix activations, labels, original logits) per control chunk, computed once
        ref_logp = []  # the original model's log-probabilities per chunk, for the KL vectors
        with torch.no_grad():
            for lo in range(0, x_c.shape[0], batch_size):
                acts = target.prefix(x_c[lo:lo + batch_size])
                chunks.append((acts, y_c[lo:lo + batch_size], target.logits(acts)))
                if keep_kl_vectors:
                    ref_logp.append(torch.log_softmax(chunks[-1][2].float(), -1))
            if edit_labels is None:  # rows of the per-class matrix: the original model's predictions
                edit_labels = torch.cat([target.logits(target.prefix(x_e[lo:lo + batch_size])).argmax(-1)
                                         for lo in range(0, x_e.shape[0], batch_size)])
                edit_class_source = "predictions"
            else:
                edit_labels = target.check_inputs(x_e, edit_labels)
                edit_class_source = "labels"
        num_classes = chunks[0][2].shape[-1]
        target.check_labels(num_classes, torch.cat([y_e, y_c, edit_labels]))
        n_control = x_c.shape[0]
        base_errors = sum(int((ref.argmax(-1) != y).sum()) for _, y, ref in chunks)
        base_per_class = sum(torch.bincount(y[ref.argmax(-1) != y], minlength=num_classes) for _, y, ref in chunks)

        names = ("errors", "flips", "correct_to_wrong", "wrong_to_correct", "kl")
        extra = ("errors_per_class",) + (("kl_vector",) if keep_kl_vectors else ())
        per_edit = {k: [] for k in names + ("success", "steps", "loss", "nonfinite") + extra}
        bar = _progress(x_e.shape[0], editor, progress)
        for i in range(x_e.shape[0]):
            acts_e = target.prefix(x_e[i:i + 1])
            out = run_edit_loop(target.loss_fn(acts_e, y_e[i:i + 1], reduction), target.params, editor,
                                max_steps, early_exit=early)
            totals = {k: (0.0 if k == "kl" else 0) for k in names}  # counts stay integers
            errors_per_class = 0
            kl_vector = []
            with torch.no_grad():
                for j, (acts, y, ref) in enumerate(chunks):
                    logits = target.logits(acts, out.params)
                    m = edit_metrics(ref, y, logits.unsqueeze(0))
                    for k in names:
                        totals[k] = totals[k] + (m[k][0] * y.shape[0] if k == "kl" else m[k][0])
                    wrong = logits.float().argmax(-1) != y  # as edit_metrics counts errors
                    errors_per_class = errors_per_class + torch.bincount(y[wrong], minlength=num_classes)
                    if keep_kl_vectors:
                        logp_edit = torch.log_softmax(logits.float(), -1)
                        kl_vector.append((ref_logp[j].exp() * (ref_logp[j] - logp_edit)).sum(-1))
            totals["kl"] = totals["kl"] / n_control
            per_edit["errors_per_class"].append(errors_per_class)
            if keep_kl_vectors:
                per_edit["kl_vector"].append(torch.cat(kl_vector))
            for k in names:
                per_edit[k].append(totals[k])
            per_edit["success"].append(out.success & (out.bad_step < 0))
            per_edit["steps"].append(out.steps)
            per_edit["loss"].append(out.loss)
            per_edit["nonfinite"].append(out.bad_step >= 0)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    pe = {k: torch.stack(v).cpu() for k, v in per_edit.items()}
    base_error = base_errors / n_control
    error = pe["errors"].double() / n_control
    pe["error"] = error
    pe["edit_class"] = edit_labels.cpu().to(torch.int64)
    per_class = _per_class_drawdown(pe["errors_per_class"], base_per_class.cpu(), y_c.cpu(), pe["edit_class"],
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
        num_edits=int(x_e.shape[0]), num_control=int(n_control), editor=editor.to_dict(),
        params=list(target.names), max_steps=max_steps, seconds=time.perf_counter() - start, per_edit=pe,
        per_class_drawdown=per_class, num_classes=int(num_classes),
        edit_class_source=edit_class_source,
    )


def _per_class_drawdown(errors_per_class: Tensor, base_per_class: Tensor, y_c: Tensor, edit_class: Tensor,
                        num_classes: int) -> Tensor:
    """``[C, C]`` float64 mean over edits of row class r of (error rate in control class c after − before)."""
    n_c = torch.bincount(y_c, minlength=num_classes).double()  # 0 → 0/0 = NaN column
    delta = (errors_per_class.double() - base_per_class.double()) / n_c  # [E, C]
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, edit_class, delta)
    counts = torch.bincount(edit_class, minlength=num_classes).double()
    return sums / counts.unsqueeze(1)  # rows without edits: 0/0 = NaN


def _progress(total: int, editor: Editor, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but evaluation must not need it
        return None
    return tqdm(total=total, desc=f"edits ({editor.name})", unit="edit", leave=False)
