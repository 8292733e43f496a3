"""Logits at the labelled positions only: a token edit reads a language model's head where it has labels.

Why: editing ``transformer.h.11.mlp`` of GPT-2 small with a four-token continuation of a 64-token
prompt, each editor step runs the suffix (the MLP, ``ln_f`` and ``lm_head``) forward and backward.
The head is 768 × 50,257: at 64 positions it is ~90% of the suffix's arithmetic, yet the constraint
(:class:`~fastedit.TokenTargets`, :class:`~fastedit.SequenceRanking`) reads four of those positions.

How (:func:`keep_labelled_logits`, used by :func:`fastedit.edit`):

1. the positions ``K`` the constraint reads are the logits positions with a label in any row (after
   the causal shift); the constraint is rewritten on them (``labels[:, K]``, no shift), so it reads
   logits ``[B, |K|, V]`` exactly as it read ``[B, T, V]`` at ``K``.
2. the model's output-embedding module (``get_output_embeddings()``, an HF language model's
   ``lm_head``) gets a ``forward`` that selects ``K`` along its input's position axis (``-2``)
   before computing: ``lm_head(hidden[..., K, :])``. It is an instance attribute installed for the
   editor steps only (:func:`fastedit.call_cache.installed_forwards`) and removed afterwards, also
   when the edit raises.
3. once per split (model fingerprint, selection, input signature) and number of kept positions,
   the model's output with the kept head is compared with its whole output at ``K`` (the edit's
   own activations, the unedited parameters): a model whose code after the head mixes positions, or whose head does not take
   ``[..., T, H]``, fails the check and edits with the whole head (``logits_reason`` says why).
4. a product of ``|K|`` rows rounds differently from one of ``T`` rows, so the final logits may
   differ from the whole head's in the last bits. Where the final verdict is within
   :data:`RECHECK_BAND` of the largest logit of flipping (a labelled position's label and best other
   token that close; a ranking's group that close to 0), the final constraint value is recomputed
   with the whole head, so a reported success always agrees with the model's own forward.

Not used (the whole head runs, ``logits_reason`` says why) when the constraint is another kind, every
position is labelled, the head holds an editable parameter (a tied embedding included), or the
steps run compiled or as a CUDA graph (fixed shapes).

:class:`fastedit.EditableTraining` keeps the logits of its token edits (sampled or given) the same way
in the inner steps and the final ``L_edit`` (``L_loc`` reads every position and runs the whole head);
there the verdicts only feed an objective and its statistics, so none is recomputed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .call_cache import installed_forwards
from .constraint import IGNORE_INDEX, SequenceRanking, TokenTargets, reduce_constraint

__all__ = ["KeptLogits", "keep_labelled_logits", "labelled_positions", "needs_recheck", "whole_loss", "RECHECK_BAND",
           "CHECK_RTOL", "CHECK_ATOL"]

#: the final constraint value is recomputed with the whole head where the verdict is closer than this
#: fraction of the largest logit to flipping (float32 products of different row counts differ by
#: ~1e-7 of it), or than 8 ulps of the logits' dtype where that is coarser (a half-precision product
#: rounds its last bit either way)
RECHECK_BAND = 1e-4
#: the comparison of the kept head with the whole one: rtol, and atol as a fraction of the largest
#: logit (as for units computing only their read rows, :mod:`fastedit.rows`), each at least 4 ulps
#: of the logits' dtype
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5


def _at_least_ulps(value: float, dtype: torch.dtype, ulps: int) -> float:
    return max(value, ulps * torch.finfo(dtype).eps) if dtype.is_floating_point else value


@dataclass
class KeptLogits:
    """A token constraint on the labelled logits positions only, and how to compute just those."""

    head: nn.Module
    index: Tensor              # int64 [|K|]: the logits positions kept
    constraint: Any            # the constraint rewritten on the kept positions

    @contextlib.contextmanager
    def installed(self, frozen: bool = False) -> Iterator[None]:
        """Run with the head computing the kept positions only. ``frozen``: nothing differentiates
        with respect to the head's parameters (:func:`fastedit.edit` takes gradients of the edited
        parameters only), so an ``nn.Linear`` head on the CPU gets :class:`_FrozenLinear`."""
        head, index = self.head, self.index
        forward = head.forward
        if frozen and type(head) is nn.Linear and head.weight.device.type == "cpu":
            def kept_forward(hidden: Tensor):
                kept = hidden.index_select(-2, index)
                if torch.is_autocast_enabled(kept.device.type):
                    return forward(kept)
                bias = head.bias.detach() if head.bias is not None else None
                return _FrozenLinear.apply(kept, head.weight.detach(), bias)
        else:
            def kept_forward(hidden: Tensor, *args, **kwargs):
                return forward(hidden.index_select(-2, index), *args, **kwargs)
        with installed_forwards([(head, kept_forward)]):
            yield


class _FrozenLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a weight nothing differentiates, whose output gradient is
    nonzero in few columns: a token margin's gradient is, at the positions it reads, the label and
    the best other token (two of 50,257 columns for GPT-2). The input gradient then reads only those
    rows of the weight instead of all of it (154 MB for GPT-2 small); a denser gradient (a ranking's
    log-softmax) takes the whole product. Plain autograd only (no torch.func transforms)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        columns = grad.reshape(-1, grad.shape[-1]).ne(0).any(0).nonzero().reshape(-1)
        if columns.numel() * _SPARSE_SHARE > grad.shape[-1]:
            return grad @ weight, None, None
        return grad.index_select(-1, columns) @ weight.index_select(0, columns), None, None


_SPARSE_SHARE = 8  # the rows-only product is used while at most 1/8 of the columns are nonzero


def labelled_positions(constraint) -> Tensor | None:
    """The logits positions a token constraint reads (int64 ``[|K|]``), or None for other constraints
    and for labels that leave a row without any labelled position (the edit's checks report that)."""
    if type(constraint) not in (TokenTargets, SequenceRanking):
        return None
    labels = constraint.aligned_labels()
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(-1).all()):
        return None
    return labelled.any(0).nonzero().reshape(-1)


class _Tracked:
    """Keeps, from the last logits it was evaluated on, their largest magnitude and how far its
    verdict is from flipping (0-dim tensors, read once at the end of the edit: no host
    synchronisation per step), for :func:`needs_recheck`."""

    largest: Tensor | None = None
    closest: Tensor | None = None
    dtype: torch.dtype = torch.float32

    def per_sample(self, logits: Tensor) -> Tensor:
        values = super().per_sample(logits)
        with torch.no_grad():
            self.dtype = logits.dtype
            self.largest = logits.detach().abs().amax()
            self.closest = self._closest(logits.detach(), values.detach())
        return values


class _KeptTokenTargets(_Tracked, TokenTargets):
    def _closest(self, logits: Tensor, values: Tensor) -> Tensor:
        # a labelled position's argmax flips only if its label's logit and the best other logit
        # trade places: their distance, over every labelled position
        z, labels = self.aligned(logits.float())
        picked = z.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        top = z.topk(2, dim=-1).values
        other = torch.where(top[..., 0] == picked, top[..., 1], top[..., 0])
        return (picked - other).abs().masked_fill(labels == IGNORE_INDEX, float("inf")).amin()


class _KeptSequenceRanking(_Tracked, SequenceRanking):
    def _closest(self, logits: Tensor, values: Tensor) -> Tensor:
        # a group's verdict flips only if its value changes sign, a mean reduction's only if the mean does
        return torch.minimum(values.abs().amin(), values.mean().abs())


def _on_positions(constraint, index: Tensor):
    """``constraint`` on logits ``[B, |K|, V]`` computed at the logits positions ``index``."""
    shift = 1 if constraint.causal else 0
    labels = constraint.labels.index_select(1, index + shift)
    if type(constraint) is TokenTargets:
        return _KeptTokenTargets(labels, causal=False)
    return _KeptSequenceRanking(labels, constraint.num_candidates, causal=False)


def keep_labelled_logits(model: nn.Module, constraint, entry: dict, editable: list[Tensor],
                         logits: Callable[[], Tensor], allowed: str | None = None) -> tuple[KeptLogits | None, str | None]:
    """``(KeptLogits, None)`` when an edit of ``constraint`` can compute the head at the labelled
    positions only, else ``(None, why)`` (``why`` is None where there was nothing to keep: another
    kind of constraint, or every position labelled).

    ``entry``: the split's cache entry, which keeps the once-per-split check; ``editable``: the
    edited parameters; ``logits()``: the model's logits from the edit's activations with the
    unedited parameters (called once with the kept head installed and once without, at the first
    edit of a split); ``allowed``: why the steps cannot change shape (compiled, CUDA graph), if so."""
    index = labelled_positions(constraint)
    if index is None:
        return None, None
    positions = constraint.labels.shape[-1]  # the logits positions, as the labels match them
    if index.numel() == positions:
        return None, None
    if allowed is not None:
        return None, allowed
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return None, "the model has no output embeddings (get_output_embeddings()) to compute at the labelled positions"
    ids = {id(p) for p in editable}
    if any(id(p) in ids for p in head.parameters()):
        return None, "the output embeddings hold an edited parameter (a tied input embedding included)"
    kept = KeptLogits(head, index, _on_positions(constraint, index))
    # once per split (the entry is keyed by the model's fingerprint and the inputs' signature) and
    # number of kept positions (code after the head that mixes positions or needs their count shows
    # at any of them; Editable Training samples a new position per batch); the whole logits'
    # [batch, time] is kept too, so labels of another shape take the whole head, whose checks name
    # the mismatch
    verdicts = entry.setdefault("kept_logits", {})
    if "shape" in verdicts and verdicts["shape"] != tuple(constraint.labels.shape):
        return None, None
    verdict = verdicts.get(index.numel())
    if verdict is None:
        verdict = verdicts[index.numel()] = _check(kept, constraint, logits, verdicts)
    if verdict is not True:
        return None, verdict
    return kept, None


def _check(kept: KeptLogits, constraint, logits: Callable[[], Tensor], verdicts: dict) -> bool | str:
    """True if the model's logits with the kept head equal its whole logits at the kept positions,
    else why not. ``constraint`` is validated against the whole logits first (a user error raises)."""
    whole = logits()
    constraint.validate(whole)  # [batch, time, vocab] matching the labels, or a ValueError naming the problem
    verdicts["shape"] = tuple(whole.shape[:2])
    try:
        with kept.installed():
            part = logits()
    except Exception as exc:  # noqa: BLE001  (a head that cannot take fewer positions: run it whole)
        return f"the model fails with the head at the labelled positions only ({type(exc).__name__}: {exc})"
    want = whole.index_select(-2, kept.index)
    if part.shape != want.shape:
        return (f"with the head at {kept.index.numel()} positions the model gives logits {tuple(part.shape)}, "
                f"not {tuple(want.shape)} (its code after the head depends on the position count)")
    scale = float(want.abs().amax()) if want.numel() else 0.0
    rtol, atol = (_at_least_ulps(t, want.dtype, 4) for t in (CHECK_RTOL, CHECK_ATOL))
    if not torch.allclose(part, want, rtol=rtol, atol=atol * scale, equal_nan=True):
        return "the logits at the labelled positions change when the head computes only those (its code mixes positions)"
    return True


def needs_recheck(kept: KeptLogits) -> bool:
    """Whether a final constraint value from the kept head is close enough to 0 that rounding could
    flip its sign (see :data:`RECHECK_BAND`)."""
    c = kept.constraint
    if c.closest is None:
        return True
    return bool(c.closest <= _at_least_ulps(RECHECK_BAND, c.dtype, 8) * max(float(c.largest), 1.0))


def whole_loss(constraint, logits: Tensor, reduction: str) -> Tensor:
    """The edit's constraint value from the whole head's logits."""
    return reduce_constraint(constraint.pack(constraint.per_sample(logits)), reduction)
