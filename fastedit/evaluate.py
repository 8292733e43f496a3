"""The paper's evaluation protocol (Sinitsin et al. 2020, §4.1), plus instance-wise side effects.

Each edit (one input with a target label) is applied *independently* to the original model; after
it, the whole control set is classified. Reported: base error, drawdown (mean increase of the
control error), success rate, mean number of steps, and from Neural Network Surgery the flip rate
(share of control predictions that changed; split correct→wrong / wrong→correct) and the mean
KL(original ‖ edited).

The model is never written: every edit runs on copies of the editable parameters, so the model is
bit-identical afterwards. The frozen prefix of the control set is computed once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .edit import EditTarget, _check_common, resolve_early_exit, eval_mode, run_edit_loop
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

    def to_dict(self, per_edit: bool = False) -> dict:
        """JSON-ready summary (with the per-edit lists when ``per_edit``)."""
        out = {k: getattr(self, k) for k in (
            "base_error", "drawdown", "success_rate", "mean_steps", "flip_rate",
            "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl",
            "num_edits", "num_control", "editor", "params", "max_steps", "seconds")}
        if per_edit:
            out["per_edit"] = {k: v.tolist() for k, v in self.per_edit.items()}
        return out


def _pairs(data, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{what} must be a pair (x, y)")
    return data[0], data[1]


def evaluate(model: nn.Module, edits, control, editor: Editor | str = "rmsprop", params: ParamSpec = None,
             max_steps: int = 10, *, batch_size: int = 256, reduction: str = "max", use_prefix: bool = True,
             early_exit: bool | str = "auto", progress: bool = True) -> EvalReport:
    """Apply each edit ``(x_e[i], y_e[i])`` independently and measure its side effects on ``control``.

    Args:
        edits: ``(x_e [E, ...], y_e [E])``; each row is one edit.
        control: ``(x_c [N, ...], y_c [N])``, the set on which drawdown and flips are measured.
        editor, params, max_steps, reduction, use_prefix, early_exit: as in :func:`fastedit.edit`.
        batch_size: control samples per forward pass.
        progress: show a progress bar with edits/s.
    """
    _check_common(max_steps, reduction)
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
        with torch.no_grad():
            for lo in range(0, x_c.shape[0], batch_size):
                acts = target.prefix(x_c[lo:lo + batch_size])
                chunks.append((acts, y_c[lo:lo + batch_size], target.logits(acts)))
        target.check_labels(chunks[0][2].shape[-1], torch.cat([y_e, y_c]))
        n_control = x_c.shape[0]
        base_errors = sum(int((ref.argmax(-1) != y).sum()) for _, y, ref in chunks)

        names = ("errors", "flips", "correct_to_wrong", "wrong_to_correct", "kl")
        per_edit = {k: [] for k in names + ("success", "steps", "loss", "nonfinite")}
        bar = _progress(x_e.shape[0], editor, progress)
        for i in range(x_e.shape[0]):
            acts_e = target.prefix(x_e[i:i + 1])
            out = run_edit_loop(target.loss_fn(acts_e, y_e[i:i + 1], reduction), target.params, editor,
                                max_steps, early_exit=early)
            totals = dict.fromkeys(names, 0.0)
            with torch.no_grad():
                for acts, y, ref in chunks:
                    m = edit_metrics(ref, y, target.logits(acts, out.params).unsqueeze(0))
                    for k in names:
                        totals[k] = totals[k] + (m[k][0] * y.shape[0] if k == "kl" else m[k][0])
            totals["kl"] = totals["kl"] / n_control
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
    )


def _progress(total: int, editor: Editor, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but evaluation must not need it
        return None
    return tqdm(total=total, desc=f"edits ({editor.name})", unit="edit", leave=False)
