"""Pure-PyTorch reference kernels: the oracle every fast backend is tested against."""
from __future__ import annotations

import torch
from torch import Tensor



def edit_constraint(logits: Tensor, target: Tensor) -> Tensor:
    """``max_i logits[..., i] − logits[..., target]`` per row; differentiable (ties of the maximum
    share the gradient, as in ``torch.amax``), vmap-friendly, NaN rows giving NaN."""
    picked = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1)
    return logits.amax(dim=-1) - picked


def edit_metrics(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor, *,
                 return_kl_rows: bool = False) -> dict[str, Tensor]:
    """Per-edit metrics of edited predictions against the original model.

    ``ref_logits [N, C]`` (original model), ``labels [N]``, ``edited_logits [E, N, C]``. Returns a dict
    of ``[E]`` tensors: ``errors`` (misclassified count), ``flips`` (predictions that changed),
    ``correct_to_wrong``, ``wrong_to_correct`` (int64) and ``kl`` (mean over N of
    KL(p_original ‖ p_edited), float32); ``errors_per_class`` ``[E, C]`` int64 (the errors counted by
    true label, so it sums to ``errors``); with ``return_kl_rows`` also ``kl_rows`` ``[E, N]``
    float32, the per-sample KL. Argmax ties break like ``torch.argmax`` (first maximal index; a NaN
    counts as the maximum). Computed in float32 (float64 for float64 logits). A sample whose ref
    or edited row holds a non-finite logit (NaN, ±inf) has KL NaN, and so has its edit's mean; the
    predictions of such rows still follow ``torch.argmax``. ``kl`` is NaN for N = 0.
    This is the oracle of :func:`fastedit.kernels.metrics.edit_metrics`.
    """
    acc = torch.float64 if ref_logits.dtype == torch.float64 else torch.float32
    ref = ref_logits.to(acc)
    edited = edited_logits.to(acc)
    ref_pred = ref.argmax(-1)
    pred = edited.argmax(-1)
    was_right = ref_pred == labels
    is_right = pred == labels
    changed = pred != ref_pred
    logp_ref = torch.log_softmax(ref, -1)
    logp_edit = torch.log_softmax(edited, -1)
    kl_rows = (logp_ref.exp() * (logp_ref - logp_edit)).sum(-1)
    finite = torch.isfinite(ref).all(-1) & torch.isfinite(edited).all(-1)
    kl_rows = torch.where(finite, kl_rows, torch.full_like(kl_rows, float("nan")))
    wrong = ~is_right
    errors_per_class = torch.zeros(edited.shape[0], ref.shape[-1], dtype=torch.int64, device=ref.device)
    errors_per_class.scatter_add_(1, labels.expand(wrong.shape), wrong.long())
    out = {
        "errors": wrong.sum(-1),
        "flips": changed.sum(-1),
        "correct_to_wrong": (was_right & ~is_right).sum(-1),
        "wrong_to_correct": (~was_right & is_right).sum(-1),
        "kl": kl_rows.mean(-1).float(),
        "errors_per_class": errors_per_class,
    }
    if return_kl_rows:
        out["kl_rows"] = kl_rows.float()
    return out
