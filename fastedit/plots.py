"""Figures from :class:`fastedit.EvalReport` (paper Figure 2 and an editor comparison) and
:class:`fastedit.SequentialReport` (drawdown and retention against the edits applied).

matplotlib (Agg backend, nothing is shown) and, for the t-SNE, scikit-learn are imported lazily, so
``import fastedit`` does not need them. Every function writes a PNG (or whatever ``path``'s suffix
says) and returns ``path``.
"""
from __future__ import annotations

import math

import torch

from .evaluate import EvalReport

__all__ = ["plot_per_class_drawdown", "plot_edit_tsne", "plot_editor_comparison", "plot_drawdown_vs_error",
           "plot_per_class_drawdowns", "plot_sequential"]


def _pyplot():
    from ._optional import require
    matplotlib = require("matplotlib", "fastedit.plots")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _names(class_names, n: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n)]
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"class_names has {len(names)} entries but the report has {n} classes")
    return names


def _symmetric_limit(mats) -> float:
    """The largest |finite value| over the matrices (1 when there is none): a colour scale centred at 0."""
    finite = torch.cat([m[torch.isfinite(m)] for m in mats])
    vmax = float(finite.abs().max()) if finite.numel() else 0.0
    return vmax if vmax > 0 else 1.0


def _drawdown_heatmap(plt, ax, m: torch.Tensor, names: list[str], vmax: float, rotate: bool, *, rotation: int,
                      tick_size=None, annotation_size: float = 7):
    """One per-class drawdown matrix (percent) on ``ax``: diverging colours centred at 0, NaN cells
    blank, values written in the cells when C ≤ 12. Returns the image (for a colour bar)."""
    from matplotlib.colors import TwoSlopeNorm
    c = m.shape[0]
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    img = ax.imshow(m.numpy(), cmap=cmap, norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax))
    ax.set_xticks(range(c), names, rotation=rotation if rotate else 0, ha="right" if rotate else "center",
                  fontsize=tick_size)
    ax.set_yticks(range(c), names, fontsize=tick_size)
    if c <= 12:
        for r in range(c):
            for k in range(c):
                v = float(m[r, k])
                if math.isfinite(v):
                    ax.text(k, r, f"{v:.1f}", ha="center", va="center", fontsize=annotation_size,
                            color="white" if abs(v) > 0.6 * vmax else "black")
    return img


def plot_per_class_drawdown(report: EvalReport, path, class_names=None, title=None):
    """Heatmap of ``report.per_class_drawdown`` in percent (paper Figure 2, left).

    Rows: class of the edited input; columns: class of the affected control sample. Diverging colormap
    centred at 0; cells annotated when C ≤ 12; NaN cells (no edit / no control sample) left blank.
    """
    plt = _pyplot()
    m = report.per_class_drawdown.double() * 100.0
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"report has no per-class drawdown matrix (shape {tuple(m.shape)})")
    c = m.shape[0]
    names = _names(class_names, c)
    vmax = _symmetric_limit([m])
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * c + 1.5, 1.0 + 0.55 * c + 0.8))
    try:
        img = _drawdown_heatmap(plt, ax, m, names, vmax, class_names is not None, rotation=45)
        fig.colorbar(img, ax=ax, label="drawdown (percentage points)")
        ax.set_xlabel("class of affected sample")
        ax.set_ylabel("class of edited input")
        ax.set_title(title if title is not None else f"Per-class drawdown (%), {report.editor.get('editor', '')}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_edit_tsne(report: EvalReport, path, class_names=None, perplexity: float = 30, seed: int = 0):
    """t-SNE of edits, each described by its per-control-sample KL vector (paper Figure 2, right).

    Needs ``evaluate(..., keep_kl_vectors=True)``. Points are coloured by the edited input's class
    (``per_edit["edit_class"]``). The perplexity is clamped below the number of edits.
    """
    if "kl_vector" not in report.per_edit:
        raise ValueError("report has no per-edit KL vectors: run evaluate(..., keep_kl_vectors=True)")
    from ._optional import require
    TSNE = require("sklearn.manifold", "plot_edit_tsne").TSNE
    plt = _pyplot()
    kl = report.per_edit["kl_vector"].double()
    e = kl.shape[0]
    if e < 2:
        raise ValueError(f"a t-SNE needs at least 2 edits, got {e}")
    finite = kl[torch.isfinite(kl)]
    big = float(finite.abs().max()) if finite.numel() else 0.0
    kl = torch.nan_to_num(kl, nan=0.0, posinf=big, neginf=-big)  # edits with a non-finite step
    perp = float(min(perplexity, e - 1))
    emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(kl.numpy())
    cls = report.per_edit["edit_class"].tolist() if "edit_class" in report.per_edit else [0] * e
    names = _names(class_names, report.num_classes) if report.num_classes else None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    try:
        cmap = plt.get_cmap("tab10" if max(report.num_classes, 1) <= 10 else "tab20")
        for k in sorted(set(cls)):
            idx = [i for i, v in enumerate(cls) if v == k]
            label = names[k] if names is not None else str(k)
            ax.scatter(emb[idx, 0], emb[idx, 1], s=18, color=cmap(k % cmap.N), label=label)
        ax.legend(title="class of edited input", fontsize=7, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0),
                  ncol=2 if len(set(cls)) > 10 else 1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t-SNE of {e} edits by per-sample KL (perplexity {perp:g})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_editor_comparison(reports: dict[str, EvalReport], path, title=None):
    """Grouped bars (percent) of drawdown, flip rate and success rate for each named report."""
    if not reports:
        raise ValueError("reports is empty")
    plt = _pyplot()
    names = list(reports)
    metrics = [("drawdown", "drawdown"), ("flip_rate", "flip rate"), ("success_rate", "success rate")]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(names) + 3), 4),
                             gridspec_kw={"width_ratios": [2, 1]})
    try:
        # drawdown and flip rate share a scale; success rate (near 100%) gets its own panel
        for ax, group in ((axes[0], metrics[:2]), (axes[1], metrics[2:])):
            w = 0.8 / len(group)
            for j, (attr, label) in enumerate(group):
                vals = [100.0 * getattr(reports[n], attr) for n in names]
                xs = [i + (j - (len(group) - 1) / 2) * w for i in range(len(names))]
                bars = ax.bar(xs, vals, width=w, label=label)
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
            ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0)
            ax.set_ylabel("%")
            ax.legend(fontsize=8)
        axes[1].set_ylim(0, 105)
        fig.suptitle(title if title is not None else "Editor comparison")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_drawdown_vs_error(points: dict[str, list[tuple[float, float]]], path, title=None):
    """Drawdown against test error (both in percent), one colour per configuration.

    ``points`` maps a configuration name to its ``(test_error, drawdown)`` pairs (fractions), e.g. one
    per seed: each pair is drawn as a small dot and, for two or more, their mean with ±1 std bars on
    both axes.
    """
    if not points or not any(points.values()):
        raise ValueError("points is empty")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    try:
        cmap = plt.get_cmap("tab10")
        for i, (name, pairs) in enumerate(points.items()):
            if not pairs:
                continue
            err = torch.tensor([100.0 * p[0] for p in pairs], dtype=torch.float64)
            dd = torch.tensor([100.0 * p[1] for p in pairs], dtype=torch.float64)
            color = cmap(i % cmap.N)
            ax.scatter(err.numpy(), dd.numpy(), s=14, color=color, alpha=0.55)
            if len(pairs) > 1:
                ax.errorbar(float(err.mean()), float(dd.mean()), xerr=float(err.std()), yerr=float(dd.std()),
                            fmt="o", ms=7, color=color, capsize=3, label=f"{name} (n={len(pairs)})")
            else:
                ax.scatter([float(err[0])], [float(dd[0])], s=50, marker="D", color=color, label=name)
        ax.set_xlabel("test error (%)")
        ax.set_ylabel("drawdown (percentage points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title if title is not None else "Drawdown vs test error")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_per_class_drawdowns(matrices: dict[str, torch.Tensor], path, class_names=None, title=None):
    """Per-class drawdown heatmaps (percent) side by side, on one shared colour scale.

    ``matrices`` maps a name to a ``[C, C]`` per-class drawdown matrix (fractions, as
    ``EvalReport.per_class_drawdown``; NaN cells blank), e.g. plain vs Editable Training.
    """
    if not matrices:
        raise ValueError("matrices is empty")
    mats = {k: v.double() * 100.0 for k, v in matrices.items()}
    shapes = {tuple(m.shape) for m in mats.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        raise ValueError(f"matrices must all be [C, C] of one size, got shapes {sorted(shapes)}")
    c = next(iter(shapes))[0]
    names = _names(class_names, c)
    vmax = _symmetric_limit(mats.values())
    plt = _pyplot()
    k = len(mats)
    fig, axes = plt.subplots(1, k, figsize=(0.5 * c * k + 2.5, 0.5 * c + 1.6), squeeze=False, layout="constrained")
    try:
        for ax, (label, m) in zip(axes[0], mats.items()):
            img = _drawdown_heatmap(plt, ax, m, names, vmax, class_names is not None, rotation=60, tick_size=7,
                                    annotation_size=5.5)
            ax.set_xlabel("class of affected sample", fontsize=8)
            ax.set_title(label, fontsize=9)
        axes[0][0].set_ylabel("class of edited input", fontsize=8)
        fig.colorbar(img, ax=list(axes[0]), label="drawdown (percentage points)", shrink=0.8)
        fig.suptitle(title if title is not None else "Per-class drawdown (%)")
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_sequential(reports: dict, path, title=None):
    """Drawdown and retention (percent) against the number of edits applied, one line per named
    :class:`~fastedit.SequentialReport` (e.g. one per method or option)."""
    if not reports:
        raise ValueError("reports is empty")
    plt = _pyplot()
    fig, (ax_d, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for name, rep in reports.items():
            edits = [row["edits"] for row in rep.checkpoints]
            ax_d.plot(edits, [100.0 * row["drawdown"] for row in rep.checkpoints], marker=".", label=name)
            kept = [(row["edits"], 100.0 * row["retention"]) for row in rep.checkpoints
                    if not math.isnan(row["retention"])]
            ax_r.plot([e for e, _ in kept], [r for _, r in kept], marker=".", label=name)
        ax_d.set_ylabel("drawdown (percentage points)")
        ax_r.set_ylabel("retention of earlier edits (%)")
        ax_r.set_ylim(0, 102)
        for ax in (ax_d, ax_r):
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title if title is not None else "Sequential editing")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
