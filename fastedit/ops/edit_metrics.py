"""``edit_metrics``: the per-edit control-set metrics of the evaluation protocol, fused.

One pass over the edited logits: no ``[E, N, C]`` softmax is ever materialised. Backends: the
compiled op ``torch.ops.fastedit.edit_metrics`` (csrc/cpu/edit_metrics.cpp, csrc/cuda/edit_metrics.cu;
schema in csrc/ops.cpp), Triton (fastedit/ops/triton/edit_metrics.py, GPU) and the pure-PyTorch
:func:`reference` (the oracle), chosen by :func:`fastedit.ops.dispatch.choose_backend` (the
``backend=`` keyword, :func:`fastedit.ops.use_backend` or ``FASTEDIT_BACKEND`` force one).

This module also holds the compiled op's Python parts (:data:`PYTHON_PARTS`, which fastedit.ops
registers when fastedit._C is loaded): its fake kernel (meta tensors, ``torch.compile``) and an
autograd kernel whose backward says that the op is not differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from .dispatch import choose_backend

__all__ = ["edit_metrics", "reference", "compiled", "METRIC_KEYS"]

#: the keys of the result, in the order of the compiled op's outputs
METRIC_KEYS = ("errors", "flips", "correct_to_wrong", "wrong_to_correct", "kl", "errors_per_class", "kl_rows")

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def edit_metrics(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor, *,
                 return_kl_rows: bool = False, backend: str | None = None) -> dict[str, Tensor]:
    """Per-edit metrics of E edited models against the original one, on N control samples.

    Args:
        ref_logits: ``[N, C]`` logits of the original model (float32, float64, float16 or
            bfloat16; C >= 1).
        labels: ``[N]`` int64 true classes, each in ``[0, C)``.
        edited_logits: ``[E, N, C]`` logits of the E edited models, same dtype and device as
            ``ref_logits`` (mixed dtypes are rejected: cast first).
        return_kl_rows: also return the per-sample KL ``kl_rows``.
        backend: None for the dispatcher's choice (:func:`fastedit.ops.use_backend`,
            ``FASTEDIT_BACKEND``, else the priority order), or a backend name to force for this
            call (``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``).

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
        BackendError: the forced backend cannot run here.
    """
    _check_inputs(ref_logits, labels, edited_logits)
    backend = choose_backend("edit_metrics", ref_logits.device, backend)
    with torch.no_grad():
        if backend == "reference":
            _check_label_range(labels, ref_logits.shape[1])
            return reference(ref_logits, labels, edited_logits, return_kl_rows=return_kl_rows)
        if backend != "cuda":  # the CUDA op checks the range itself (one synchronisation, not two)
            _check_label_range(labels, ref_logits.shape[1])
        if backend == "triton":
            from .triton.edit_metrics import edit_metrics_triton

            out = edit_metrics_triton(ref_logits, labels, edited_logits, return_kl_rows)
        else:  # "cpu" and "cuda": the compiled op
            out = compiled(ref_logits, labels, edited_logits, return_kl_rows)
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


def reference(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor, *,
                 return_kl_rows: bool = False) -> dict[str, Tensor]:
    """The oracle: per-edit metrics of edited predictions against the original model, in plain PyTorch.

    ``ref_logits [N, C]`` (original model), ``labels [N]``, ``edited_logits [E, N, C]``. Returns a dict
    of ``[E]`` tensors: ``errors`` (misclassified count), ``flips`` (predictions that changed),
    ``correct_to_wrong``, ``wrong_to_correct`` (int64) and ``kl`` (mean over N of
    KL(p_original ‖ p_edited), float32); ``errors_per_class`` ``[E, C]`` int64 (the errors counted by
    true label, so it sums to ``errors``); with ``return_kl_rows`` also ``kl_rows`` ``[E, N]``
    float32, the per-sample KL. Argmax ties break like ``torch.argmax`` (first maximal index; a NaN
    counts as the maximum). Computed in float32 (float64 for float64 logits). A sample whose ref
    or edited row holds a non-finite logit (NaN, ±inf) has KL NaN, and so has its edit's mean; the
    predictions of such rows still follow ``torch.argmax``. ``kl`` is NaN for N = 0.
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


def compiled(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor,
             return_kl_rows: bool = False) -> tuple[Tensor, ...]:
    """``torch.ops.fastedit.edit_metrics``: the 7-tuple ``(errors, flips, correct_to_wrong,
    wrong_to_correct, kl, errors_per_class, kl_rows)`` (see :func:`edit_metrics` for the contract;
    ``kl_rows`` is ``[E, 0]`` unless ``return_kl_rows``). ``RuntimeError`` when the extension is
    unavailable."""
    _extension.require()
    return torch.ops.fastedit.edit_metrics(ref_logits, labels, edited_logits, return_kl_rows)


# ------------------------------------------------------------------------------------------------
# Python parts of the compiled op (fastedit.ops registers them once fastedit._C is imported)
# ------------------------------------------------------------------------------------------------
def _fake(ref_logits: Tensor, labels: Tensor, edited_logits: Tensor, return_kl_rows: bool):
    name = "fastedit::edit_metrics"
    torch._check(ref_logits.dim() == 2, lambda: f"{name}: ref_logits must be 2-D [N, C], got {ref_logits.dim()}-D")
    torch._check(labels.dim() == 1, lambda: f"{name}: labels must be 1-D [N], got {labels.dim()}-D")
    torch._check(edited_logits.dim() == 3,
                 lambda: f"{name}: edited_logits must be 3-D [E, N, C], got {edited_logits.dim()}-D")
    torch._check(ref_logits.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"{name}: ref_logits must be float32, float64, float16 or bfloat16, got {ref_logits.dtype}")
    torch._check(edited_logits.dtype == ref_logits.dtype,
                 lambda: f"{name}: edited_logits must have the dtype of ref_logits ({ref_logits.dtype}), "
                         f"got {edited_logits.dtype}")
    torch._check(labels.dtype == torch.int64, lambda: f"{name}: labels must be int64 (torch.long), got {labels.dtype}")
    n, c = ref_logits.shape
    e = edited_logits.shape[0]
    torch._check(labels.shape[0] == n and edited_logits.shape[1] == n and edited_logits.shape[2] == c,
                 lambda: f"{name}: shape mismatch: ref_logits {tuple(ref_logits.shape)} [N, C], labels "
                         f"{tuple(labels.shape)} [N], edited_logits {tuple(edited_logits.shape)} [E, N, C]")
    torch._check(c >= 1, lambda: f"{name}: logits must have at least one class (C >= 1)")
    counts = [edited_logits.new_empty((e,), dtype=torch.int64) for _ in range(4)]
    kl = edited_logits.new_empty((e,), dtype=torch.float32)
    per_class = edited_logits.new_empty((e, c), dtype=torch.int64)
    kl_rows = edited_logits.new_empty((e, n if return_kl_rows else 0), dtype=torch.float32)
    return (*counts, kl, per_class, kl_rows)


def _setup_context(ctx, inputs, output) -> None:
    pass


def _backward(ctx, *grads):
    raise RuntimeError("fastedit::edit_metrics is not differentiable (counts, argmax-based flips and a "
                       "reporting KL); compute a differentiable KL with torch.log_softmax instead")


#: What fastedit.ops registers for ``fastedit::edit_metrics`` once the op exists: the fake kernel, and
#: an autograd kernel whose backward says the op is not differentiable (rather than torch's generic
#: "no autograd kernel" warning, or silently zero gradients).
PYTHON_PARTS = {"fake": _fake, "autograd": (_backward, _setup_context)}
