"""Pure-PyTorch reference kernels: the oracle every fast backend is tested against."""
from __future__ import annotations

import torch
from torch import Tensor



def edit_constraint(logits: Tensor, target: Tensor) -> Tensor:
    """``max_i logits[..., i] − logits[..., target]`` per row; differentiable (ties of the maximum
    share the gradient, as in ``torch.amax``), vmap-friendly, NaN rows giving NaN."""
    picked = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1)
    return logits.amax(dim=-1) - picked


def edit_metrics(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor) -> dict[str, Tensor]:
    """Per-edit metrics of edited predictions against the original model.

    ``ref_logits [N, C]`` (original model), ``labels [N]``, ``edited_logits [E, N, C]``. Returns a dict
    of ``[E]`` tensors: ``errors`` (misclassified count), ``flips`` (predictions that changed),
    ``correct_to_wrong``, ``wrong_to_correct`` (int64) and ``kl`` (mean over N of
    KL(p_original ‖ p_edited), float32). Argmax ties break like ``torch.argmax`` (first index).
    """
    ref = ref_logits.float()
    edited = edited_logits.float()
    ref_pred = ref.argmax(-1)
    pred = edited.argmax(-1)
    was_right = ref_pred == labels
    is_right = pred == labels
    changed = pred != ref_pred
    logp_ref = torch.log_softmax(ref, -1)
    logp_edit = torch.log_softmax(edited, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_edit)).sum(-1).mean(-1)
    return {
        "errors": (~is_right).sum(-1),
        "flips": changed.sum(-1),
        "correct_to_wrong": (was_right & ~is_right).sum(-1),
        "wrong_to_correct": (~was_right & is_right).sum(-1),
        "kl": kl,
    }
