"""``edit_metrics``: the per-edit control-set metrics of the evaluation protocol, fused.

One pass over the edited logits: no ``[E, N, C]`` softmax is ever materialised. Backends: CUDA
extension, Triton (GPU), C++ CPU extension, pure-PyTorch reference (the oracle), chosen by
:func:`fastedit.kernels.dispatch.choose_backend` (``FASTEDIT_BACKEND`` forces one).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import extension, reference
from .dispatch import choose_backend

__all__ = ["edit_metrics", "METRIC_KEYS"]

#: the keys of the result, in the order of the compiled op's outputs
METRIC_KEYS = ("errors", "flips", "correct_to_wrong", "wrong_to_correct", "kl", "errors_per_class", "kl_rows")

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def edit_metrics(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor, *,
                 return_kl_rows: bool = False) -> dict[str, Tensor]:
    """Per-edit metrics of E edited models against the original one, on N control samples.

    Args:
        ref_logits: ``[N, C]`` logits of the original model (float32, float64, float16 or
            bfloat16; C >= 1).
        labels: ``[N]`` int64 true classes, each in ``[0, C)``.
        edited_logits: ``[E, N, C]`` logits of the E edited models, same dtype and device as
            ``ref_logits`` (mixed dtypes are rejected: cast first).
        return_kl_rows: also return the per-sample KL ``kl_rows``.

    Returns:
        a dict of tensors on the inputs' device, with ``pred = argmax(edited_logits, -1)`` and
        ``ref_pred = argmax(ref_logits, -1)`` (``torch.argmax``'s rule: the first maximal index, a
        NaN counting as the maximum):

        - ``errors`` ``[E]`` int64: ``sum_n pred != labels``;
        - ``flips`` ``[E]`` int64: ``sum_n pred != ref_pred`` (every changed prediction);
        - ``correct_to_wrong`` ``[E]`` int64: ``sum_n (ref_pred == labels) & (pred != labels)``;
        - ``wrong_to_correct`` ``[E]`` int64: ``sum_n (ref_pred != labels) & (pred == labels)``;
        - ``kl`` ``[E]`` float32: ``mean_n KL(softmax(ref_logits[n]) || softmax(edited_logits[e, n]))``
          (NaN when N = 0);
        - ``errors_per_class`` ``[E, C]`` int64: the errors counted by true label
          (``errors_per_class.sum(1) == errors``);
        - ``kl_rows`` ``[E, N]`` float32, only with ``return_kl_rows``: the per-sample KL.

    Numerics: accumulation in float32 (float64 for float64 logits); the KL is computed from
    differences of logits relative to their row maxima, so large common offsets (logits ~1e4) cost
    no accuracy, and identical ref and edited rows give exactly 0. A sample whose ref or edited row
    holds a NaN or an infinite logit gets KL NaN (and so does its edit's mean); the predictions of
    such rows still follow ``torch.argmax``. The mean over N is summed in a fixed order: the result
    is the same for any number of threads. Backends agree to float rounding (not bit for bit).

    Not differentiable: the outputs never require grad.

    Raises:
        TypeError: wrong dtypes (logits not floating point or of different dtypes, labels not int64).
        ValueError: wrong dimensions or shapes, C = 0, tensors on different devices, labels out of
            range (on the CUDA backend the compiled op checks the range: RuntimeError, same message).
    """
    _check_inputs(ref_logits, labels, edited_logits)
    backend = choose_backend("edit_metrics", ref_logits.device)
    with torch.no_grad():
        if backend == "reference":
            _check_label_range(labels, ref_logits.shape[1])
            return reference.edit_metrics(ref_logits, labels, edited_logits, return_kl_rows=return_kl_rows)
        if backend != "cuda":  # the CUDA op checks the range itself (one synchronisation, not two)
            _check_label_range(labels, ref_logits.shape[1])
        if backend == "triton":
            from .triton.edit_metrics import edit_metrics_triton

            out = edit_metrics_triton(ref_logits, labels, edited_logits, return_kl_rows)
        else:  # "cpu" and "cuda": the compiled op
            out = extension.edit_metrics(ref_logits, labels, edited_logits, return_kl_rows)
    result = dict(zip(METRIC_KEYS, out))
    if not return_kl_rows:
        del result["kl_rows"]
    return result


def _check_inputs(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor) -> None:
    name = "fastedit.edit_metrics"
    for arg, value in (("ref_logits", ref_logits), ("labels", labels), ("edited_logits", edited_logits)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if ref_logits.dim() != 2:
        raise ValueError(f"{name}: ref_logits must be 2-D [N, C], got shape {tuple(ref_logits.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{name}: labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if edited_logits.dim() != 3:
        raise ValueError(f"{name}: edited_logits must be 3-D [E, N, C], got shape {tuple(edited_logits.shape)}")
    if ref_logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: ref_logits must be float32, float64, float16 or bfloat16, got {ref_logits.dtype}")
    if edited_logits.dtype != ref_logits.dtype:
        raise TypeError(f"{name}: edited_logits must have the dtype of ref_logits ({ref_logits.dtype}), "
                        f"got {edited_logits.dtype}; cast one of them first")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: labels must be int64 (torch.long), got {labels.dtype}")
    if labels.device != ref_logits.device or edited_logits.device != ref_logits.device:
        raise ValueError(f"{name}: all inputs must be on one device, got ref_logits on {ref_logits.device}, "
                         f"labels on {labels.device}, edited_logits on {edited_logits.device}")
    n, c = ref_logits.shape
    if labels.shape[0] != n or edited_logits.shape[1:] != ref_logits.shape:
        raise ValueError(f"{name}: shape mismatch: ref_logits {tuple(ref_logits.shape)} [N, C], labels "
                         f"{tuple(labels.shape)} [N], edited_logits {tuple(edited_logits.shape)} [E, N, C]")
    if c < 1:
        raise ValueError(f"{name}: logits must have at least one class (C >= 1), got shape {tuple(ref_logits.shape)}")


def _check_label_range(labels: Tensor, num_classes: int) -> None:
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):  # one host synchronisation on a GPU
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fastedit.edit_metrics: labels[{i}] = {int(labels[i])} is out of range for "
                         f"{num_classes} classes (expected 0 <= label < {num_classes})")
