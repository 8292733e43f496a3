"""Edit constraints: what an edit must achieve, as a differentiable value ``l_e ≤ 0`` (docs/design.md).

A constraint maps the model's logits to one value per *unit* (one sample of a classifier, one row of
a sequence model, one group of candidates of a ranking); a unit is satisfied iff its value is ≤ 0.
An edit with several units is reduced with ``"max"`` (the default: every unit must be satisfied,
and each step follows the worst one) or ``"mean"`` (satisfied when the mean is ≤ 0).

* :class:`Classification` ``(labels)``, logits ``[B, C]``: ``l_e = max_i z_i − z_y`` per row. It
  equals ``max_i log p_i − log p_y`` (the log-softmax normaliser cancels), is ≥ 0, and is 0 exactly
  when ``y`` attains the maximum. Ties break like ``torch.argmax`` (the first maximal index wins):
  when an earlier class ties with ``y`` the value is raised by the smallest normal float (its
  gradient unchanged), so "satisfied" means exactly ``logits.argmax(-1) == y``.
* :class:`TokenTargets` ``(labels, causal=False)``, logits ``[B, T, V]``, ``labels [B, T]`` with
  ``-100`` ignored (the HF convention). Per row, ``l_e = max over labelled positions t of
  (max_v z[t, v] − z[t, labels[t]])``, ties broken as for classification: satisfied iff every
  labelled position's ``argmax`` is its label, i.e. teacher-forced greedy decoding reproduces the
  target. ``causal=True`` compares
  ``logits[:, :-1]`` with ``labels[:, 1:]``, as HF causal-LM losses do.
* :class:`SequenceRanking` ``(labels, num_candidates, causal=False)``: rows come in groups of
  ``num_candidates``, the desired output first, then alternatives (e.g. the model's own n-best). A
  row's score is the mean log-probability of its labelled tokens under teacher forcing
  (length-normalised); per group ``l_e = max over alternatives of score − score(desired)``:
  satisfied iff the desired output scores at least as high as every alternative. This is the
  machine-translation edit of the official Editable Training code.
* user-defined: a subclass of :class:`Constraint` (implement :meth:`Constraint.per_sample`), or any
  callable ``logits -> l_e`` per unit ``[U]`` (or a 0-dim value), differentiable, ≤ 0 when satisfied::

      # make class 0 win over class 1 by a margin of 3 logits
      margin = lambda logits: 3.0 - (logits[:, 0] - logits[:, 1])
      fe.edit(model, x, margin)

An int or an integer tensor target means :class:`Classification`. Half-precision logits are
promoted to float32 so a tiny positive margin never rounds to 0.

NumPy labels
    Wherever labels are accepted, a NumPy integer (``np.int64(3)``) counts as an int and a NumPy
    array of an integer dtype as an integer tensor (copied into an int64 tensor). NumPy floats,
    bools and other dtypes are rejected with a ``TypeError`` naming the dtype, like float tensors.
    Labels given as Python ints or NumPy values live on the host and follow the model:
    :meth:`Constraint.check_device` moves them to the model's device (labels given as tensors must
    already be there).
"""
from __future__ import annotations

from typing import Any, Callable

try:
    import numpy as _np
except ImportError:  # pragma: no cover - NumPy is optional for torch, and so it is here
    _np = None
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .ops.edit_constraint import edit_constraint as _per_row

__all__ = ["Constraint", "Classification", "TokenTargets", "SequenceRanking", "FunctionConstraint",
           "as_constraint", "IGNORE_INDEX", "REDUCTIONS", "classification_margins", "reduce_constraint"]

REDUCTIONS = ("max", "mean")
#: label of a position that a sequence constraint ignores (HF's ``ignore_index``)
IGNORE_INDEX = -100


def is_numpy(value: Any) -> bool:
    """Whether ``value`` is a NumPy array or a NumPy scalar (``np.int64(3)``, ``np.float32(1)``, ...)."""
    return _np is not None and isinstance(value, (_np.ndarray, _np.generic))


_NUMPY_KINDS = {"b": "bools", "f": "floats", "c": "complex numbers", "U": "strings", "S": "bytes",
                "O": "Python objects", "M": "datetimes", "m": "timedeltas"}


def numpy_labels(value: Any, what: str = "class labels") -> Tensor:
    """An int64 CPU tensor (a copy) of NumPy integer labels: a scalar gives a 0-dim tensor, an array
    one of the same shape. ``TypeError`` for any other NumPy dtype (floats, bools, ...), naming it;
    ``ValueError`` for an unsigned value beyond the int64 range."""
    arr = _np.asarray(value)
    scalar = not isinstance(value, _np.ndarray)
    if arr.dtype.kind not in "iu":
        kind = _NUMPY_KINDS.get(arr.dtype.kind, "values")
        hint = "; cast it with .astype(np.int64) if the values are whole numbers" if arr.dtype.kind == "f" else ""
        raise TypeError(f"{what} must be integers, got a NumPy {'scalar' if scalar else 'array'} of {kind} "
                        f"(dtype {arr.dtype}){hint}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _np.iinfo(_np.int64).max:
        raise ValueError(f"{what}: label {int(arr.max())} does not fit in int64")
    return torch.tensor(_np.ascontiguousarray(arr, dtype=_np.int64))


def _follow(labels: Tensor, device: torch.device, host: bool, what: str) -> Tensor:
    """``labels`` on ``device``: host labels (Python ints, NumPy values) are moved there; tensors on
    another device raise ``ValueError``."""
    if labels.device == device:
        return labels
    if host:
        return labels.to(device)
    raise ValueError(f"{what}the labels are on {labels.device} but the inputs on {device}")


def _promote(logits: Tensor) -> Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def classification_margins(logits: Tensor, target: Tensor) -> Tensor:
    """``max_i z_i − z_target`` per row of ``logits [B, C]`` with the argmax tie rule: the values of
    :meth:`Classification.per_sample`. Differentiable, vmap-friendly, through the kernel dispatcher
    (:func:`fastedit.ops.edit_constraint`: the compiled op where it is built and pays off, the reference
    otherwise). ≤ 0 exactly where ``logits.argmax(-1) == target`` (see :func:`_argmax_ties`)."""
    z = _promote(logits)
    return _argmax_ties(_per_row(z, target), z, target)


def _argmax_ties(margin: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """``margin`` (``max_i z_i − z_target``, 0 when the target attains the maximum) raised by the
    smallest normal float where an earlier class ties with the target, so that ``margin ≤ 0`` iff
    ``torch.argmax`` (first maximal index) picks the target. Low-precision logits tie often (bfloat16
    has 8 significant bits). Added, not substituted: the gradient stays the margin's (at a tie the
    maximum's gradient is shared, so a step still raises the target above the other class)."""
    lost_tie = (margin == 0) & (logits.argmax(-1) != target)
    return margin + lost_tie.to(margin.dtype) * torch.finfo(margin.dtype).tiny


def reduce_constraint(per_sample: Tensor, reduction: str = "max") -> Tensor:
    """Reduce per-unit constraint values over the last dimension (the units of one edit)."""
    if reduction == "max":
        return per_sample.amax(dim=-1)
    if reduction == "mean":
        return per_sample.mean(dim=-1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ------------------------------------------------------------------------------------------------
# the classes
# ------------------------------------------------------------------------------------------------
class Constraint:
    """Base class of edit constraints. Subclasses implement :meth:`per_sample`.

    ``rows_per_unit``: input rows per unit (1 for per-row constraints, ``num_candidates`` for a
    ranking); ``None`` (the default of user subclasses): all rows of an edit form one unit, and such
    an edit is given on its own (in :func:`fastedit.evaluate`, as an ``(inputs, constraint)`` pair).
    """

    rows_per_unit: int | None = None

    def per_sample(self, logits: Tensor) -> Tensor:
        """``l_e`` per unit ``[U]`` from the model's logits; differentiable; ≤ 0 means satisfied."""
        raise NotImplementedError

    def satisfied(self, logits: Tensor) -> Tensor:
        """Bool ``[U]``: which units hold."""
        return self.per_sample(logits) <= 0

    def validate(self, logits: Tensor, *, allow_unlabelled_rows: bool = False) -> None:
        """Raise ``ValueError`` if the constraint does not fit these logits (shapes, label ranges).

        The default evaluates :meth:`per_sample` once and checks that it gives a floating value per
        unit (or a 0-dim value)."""
        with torch.no_grad():
            value = self.per_sample(logits)
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() > 1:
            raise ValueError(f"{type(self).__name__}: the constraint must give a floating value per unit [U] "
                             f"(or a 0-dim value), got {value!r:.80}")

    def check_device(self, device: torch.device) -> None:
        """``ValueError`` if a label tensor is on another device than the model; labels given as
        Python ints or NumPy values are moved to ``device`` instead."""

    def num_units(self, num_rows: int) -> int:
        if self.rows_per_unit is None:
            return 1
        return num_rows // self.rows_per_unit

    def units(self, lo: int, hi: int) -> "Constraint":
        """The constraint of units ``lo:hi`` (only for per-row and grouped constraints)."""
        raise TypeError(f"{type(self).__name__} covers one whole edit and cannot be split into units; pass the "
                        "edits as a list of (inputs, constraint) pairs")

    def pack(self, values: Tensor) -> Tensor:
        """``per_sample`` values ``[U]`` as given, or ``[1]`` for a 0-dim value."""
        return values.reshape(1) if values.dim() == 0 else values

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__}


class Classification(Constraint):
    """``l_e = max_i z_i − z_y`` per row of logits ``[B, C]``; ``labels [B]`` int64 (see the module
    docstring). The default constraint: an int or integer tensor target means this.

    ``labels``: an int, an integer tensor (0-dim or ``[B]``), a NumPy integer or a NumPy integer
    array (copied); host labels (ints, NumPy) follow the model's device in :meth:`check_device`."""

    rows_per_unit = 1

    def __init__(self, labels):
        host = True
        if is_numpy(labels):
            labels = numpy_labels(labels, "class labels")
        elif isinstance(labels, bool) or not isinstance(labels, (int, Tensor)):
            raise TypeError(f"class labels must be an int, an integer tensor or a NumPy integer (array), got "
                            f"{type(labels).__name__}")
        elif isinstance(labels, Tensor):
            host = False
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class labels must be integers, got dtype {labels.dtype}")
        if labels.dim() > 1:
            raise ValueError(f"class labels must be one label per sample [B], got shape {tuple(labels.shape)}; "
                             "for token labels [B, T] use fe.TokenTargets")
        self.labels = labels.reshape(-1).to(torch.int64)
        self._host = host

    def per_sample(self, logits: Tensor) -> Tensor:
        return classification_margins(logits, self.labels)

    def check_device(self, device: torch.device) -> None:
        self.labels = _follow(self.labels, device, getattr(self, "_host", False), "")

    def check_rows(self, num_rows: int) -> None:
        if self.labels.shape[0] != num_rows:
            raise ValueError(f"the target must hold one label per sample: the inputs have {num_rows} samples, "
                             f"the labels have shape {tuple(self.labels.shape)}")

    def validate(self, logits: Tensor, *, allow_unlabelled_rows: bool = False) -> None:
        if logits.dim() != 2:
            raise ValueError(f"a class-label target needs logits [batch, classes], but the model gives shape "
                             f"{tuple(logits.shape)}; for sequence outputs use fe.TokenTargets or fe.SequenceRanking")
        self.check_rows(logits.shape[0])
        check_label_range(self.labels, logits.shape[-1])

    def units(self, lo: int, hi: int) -> "Classification":
        return Classification(self.labels[lo:hi])

    def to_dict(self) -> dict:
        return {"kind": "Classification"}


def check_label_range(y: Tensor, num_classes: int, what: str = "label") -> None:
    """``ValueError`` naming the first label outside ``[0, num_classes)`` (one host read)."""
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{what} {int(y[bad][0])} is out of range for a model with {num_classes} classes")


class _TokenLabels(Constraint):
    """Shared checks of constraints on ``[B, T]`` token labels over ``[B, T, V]`` logits."""

    rows_per_unit = 1

    def __init__(self, labels, causal: bool):
        host = is_numpy(labels)
        if host:
            labels = numpy_labels(labels, f"{type(self).__name__}: labels")
        if not isinstance(labels, Tensor):
            raise TypeError(f"{type(self).__name__}: labels must be an integer tensor [B, T] (or a NumPy integer "
                            f"array), got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{type(self).__name__}: labels must hold integer token ids, got dtype {labels.dtype}")
        if labels.dim() != 2:
            raise ValueError(f"{type(self).__name__}: labels must be [batch, time], got shape {tuple(labels.shape)}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        self.labels = labels.to(torch.int64)
        self.causal = causal
        self._host = host

    def aligned(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` position by position (shifted when causal)."""
        if self.causal:
            return logits[..., :-1, :], self.labels[..., 1:]
        return logits, self.labels

    def mask(self) -> Tensor:
        """Bool ``[B, T']``: the labelled positions (after the causal shift)."""
        return self.aligned_labels() != IGNORE_INDEX

    def aligned_labels(self) -> Tensor:
        return self.labels[..., 1:] if self.causal else self.labels

    def check_device(self, device: torch.device) -> None:
        self.labels = _follow(self.labels, device, getattr(self, "_host", False), f"{type(self).__name__}: ")

    def validate(self, logits: Tensor, *, allow_unlabelled_rows: bool = False, row_offset: int = 0) -> None:
        """As :meth:`Constraint.validate`; ``row_offset`` numbers the rows in messages (a slice's first row)."""
        name = type(self).__name__
        if logits.dim() != 3:
            raise ValueError(f"{name} needs logits [batch, time, vocab], but the model gives shape "
                             f"{tuple(logits.shape)}; for a classifier use class labels")
        if tuple(logits.shape[:2]) != tuple(self.labels.shape):
            raise ValueError(f"{name}: labels have shape {tuple(self.labels.shape)} but the logits "
                             f"{tuple(logits.shape)}: labels must be [batch, time] matching the logits' first two "
                             "dimensions")
        labels = self.aligned_labels()
        vocab = logits.shape[-1]
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{name}: label {int(labels[bad][0])} is out of range for a vocabulary of {vocab} "
                             f"(use {IGNORE_INDEX} for positions to ignore)")
        if not allow_unlabelled_rows:
            empty = ~(labels != IGNORE_INDEX).any(-1)
            if bool(empty.any()):
                row = int(empty.nonzero()[0, 0]) + row_offset
                shift = " after the causal shift (labels[:, 1:])" if self.causal else ""
                raise ValueError(f"{name}: row {row} has no labelled position{shift}: every label is "
                                 f"{IGNORE_INDEX}; label at least one token per row")

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__, "causal": self.causal}


class TokenTargets(_TokenLabels):
    """Every labelled position's argmax must be its label (see the module docstring for the exact
    definition). ``labels [B, T]`` int64, ``-100`` ignored; ``causal=True`` shifts as HF causal LMs."""

    def __init__(self, labels, causal: bool = False):
        super().__init__(labels, causal)

    def margins(self, logits: Tensor) -> Tensor:
        """``max_v z − z_label`` per position ``[B, T']``, ``-inf`` at ignored positions."""
        z, labels = self.aligned(_promote(logits))
        mask = labels != IGNORE_INDEX
        b, t, v = z.shape
        flat, picked = z.reshape(b * t, v), labels.clamp_min(0).reshape(b * t)
        m = _argmax_ties(_per_row(flat, picked), flat, picked).reshape(b, t)
        return m.masked_fill(~mask, float("-inf"))

    def per_sample(self, logits: Tensor) -> Tensor:
        return self.margins(logits).amax(-1)

    def units(self, lo: int, hi: int) -> "TokenTargets":
        return TokenTargets(self.labels[lo:hi], self.causal)


class SequenceRanking(_TokenLabels):
    """The desired row of each group of ``num_candidates`` must score at least as high as every
    alternative; score = mean log-probability of a row's labelled tokens (see the module docstring)."""

    def __init__(self, labels, num_candidates: int, causal: bool = False):
        super().__init__(labels, causal)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 2:
            raise ValueError(f"num_candidates must be an integer ≥ 2 (the desired row and at least one "
                             f"alternative), got {num_candidates!r}")
        if self.labels.shape[0] % num_candidates:
            raise ValueError(f"SequenceRanking: {self.labels.shape[0]} rows do not divide into groups of "
                             f"num_candidates={num_candidates} (desired row first, then the alternatives)")
        self.num_candidates = num_candidates
        self.rows_per_unit = num_candidates

    def scores(self, logits: Tensor) -> Tensor:
        """Mean log-probability of each row's labelled tokens ``[B]`` (teacher forcing)."""
        z, labels = self.aligned(_promote(logits))
        mask = labels != IGNORE_INDEX
        logp = torch.log_softmax(z, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        # where, not a product: an ignored position's stand-in label may have log-probability -inf
        return torch.where(mask, logp, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)

    def per_sample(self, logits: Tensor) -> Tensor:
        s = self.scores(logits).reshape(-1, self.num_candidates)
        return s[:, 1:].amax(-1) - s[:, 0]

    def units(self, lo: int, hi: int) -> "SequenceRanking":
        n = self.num_candidates
        return SequenceRanking(self.labels[lo * n:hi * n], n, self.causal)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "num_candidates": self.num_candidates}


class FunctionConstraint(Constraint):
    """A user's callable ``logits -> l_e`` per unit (or a 0-dim value) as a :class:`Constraint`."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        if not callable(fn):
            raise TypeError(f"a constraint function must be callable, got {type(fn).__name__}")
        self.fn = fn

    def per_sample(self, logits: Tensor) -> Tensor:
        value = self.fn(logits)
        if not isinstance(value, Tensor):
            raise TypeError(f"the constraint function returned {type(value).__name__}, not a tensor")
        return self.pack(value)

    def to_dict(self) -> dict:
        return {"kind": "function", "name": getattr(self.fn, "__name__", type(self.fn).__name__)}


def validate(c: Constraint, logits: Tensor, what: str, *, row_offset: int = 0,
             allow_unlabelled_rows: bool = False) -> None:
    """``c.validate(logits)`` with its ``ValueError`` prefixed by ``what``; token constraints count
    rows in messages from ``row_offset`` (the first row of a slice) and may accept rows with no label."""
    try:
        if isinstance(c, _TokenLabels):
            c.validate(logits, row_offset=row_offset, allow_unlabelled_rows=allow_unlabelled_rows)
        else:
            c.validate(logits)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def as_constraint(target: Any, what: str = "target") -> Constraint:
    """A :class:`Constraint` for ``target``: itself, :class:`Classification` for an int, an integer
    tensor, a NumPy integer or a NumPy integer array, :class:`FunctionConstraint` for a callable."""
    if isinstance(target, Constraint):
        return target
    if is_numpy(target):  # before the float/bool checks: np.float64 is a float, np.bool_ no bool
        numpy_labels(target, f"{what} (class labels)")  # a TypeError naming `what` for other dtypes
        return Classification(target)
    if isinstance(target, bool):
        raise TypeError(f"{what} must be an int, an integer tensor, a fe.Constraint or a callable, got a bool")
    if isinstance(target, (int, Tensor)):
        if isinstance(target, Tensor) and (target.is_floating_point() or target.is_complex()
                                           or target.dtype == torch.bool):
            raise TypeError(f"{what} must hold integer class labels, got dtype {target.dtype}")
        return Classification(target)
    if callable(target):
        return FunctionConstraint(target)
    raise TypeError(f"{what} must be an int, an integer tensor of class labels, a fe.Constraint (e.g. "
                    f"fe.TokenTargets) or a callable logits -> l_e, got {type(target).__name__}")


# ------------------------------------------------------------------------------------------------
# pytree registration: constraints of edits side by side can be stacked and vmapped
# ------------------------------------------------------------------------------------------------
def _register(cls, fields: tuple[str, ...], build):
    def flatten(c):
        return [c.labels], tuple(getattr(c, f) for f in fields)

    def unflatten(children, ctx):
        return build(children[0], *ctx)

    def flatten_with_keys(c):
        return [(pytree.GetAttrKey("labels"), c.labels)], tuple(getattr(c, f) for f in fields)

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"fastedit.{cls.__name__}",
                                flatten_with_keys_fn=flatten_with_keys)


def _trusted(cls, **attrs):
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


# unflatten must not re-validate: under vmap the labels are batched tensors of a different shape
_register(Classification, (), lambda labels: _trusted(Classification, labels=labels))
_register(TokenTargets, ("causal",), lambda labels, causal: _trusted(TokenTargets, labels=labels, causal=causal))
_register(SequenceRanking, ("causal", "num_candidates"),
          lambda labels, causal, n: _trusted(SequenceRanking, labels=labels, causal=causal, num_candidates=n,
                                             rows_per_unit=n))
