"""Sparse, bit-exact, revertible parameter changes: :class:`SparseDelta` and :class:`EditJournal`.

A :class:`SparseDelta` records, for each changed parameter, the flat indices of the changed scalars
(int64, sorted, unique) with their OLD and NEW values, both *absolute* and in the parameter's own
dtype. Because nothing is stored as a difference, ``apply`` writes NEW and ``revert`` writes OLD bit
for bit: no ``θ₀ + Δ`` rounding, and NaN or ``-0.0`` survive the round trip.

An :class:`EditJournal` is an ordered log of deltas applied to one model, from which any entry can
be rolled back (see :meth:`EditJournal.rollback` for the exact semantics with overlapping entries).

Both save to a single safetensors file (tensors plus string metadata).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import Tensor, nn

__all__ = ["SparseDelta", "EditJournal", "JournalEntry"]

FORMAT = "fastedit.sparse_delta"
JOURNAL_FORMAT = "fastedit.edit_journal"
VERSION = "1"

# dtypes a delta may hold, by their name in the saved metadata
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# an integer type of the same width, to compare floating-point values by their bits (NaN == NaN,
# -0.0 != 0.0)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}

TensorsLike = Union[nn.Module, Mapping[str, Tensor]]


def _bits(t: Tensor) -> Tensor:
    return t.view(_BITS[t.dtype]) if t.dtype in _BITS else t


def _same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise bit equality of two tensors of one dtype."""
    return _bits(a) == _bits(b)


def _tensors_of(obj: TensorsLike, what: str) -> dict[str, Tensor]:
    """``{name: tensor}`` of a module (parameters, then buffers) or a mapping (as given)."""
    if isinstance(obj, nn.Module):
        out: dict[str, Tensor] = dict(obj.named_parameters())
        for n, b in obj.named_buffers():
            out.setdefault(n, b)
        return out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                raise TypeError(f"{what}: a mapping must map names (str) to tensors, got {type(k).__name__} → "
                                f"{type(v).__name__}")
        return dict(obj)
    raise TypeError(f"{what} must be an nn.Module or a mapping name → tensor, got {type(obj).__name__}")


def _flat_read(t: Tensor, idx: Tensor) -> Tensor:
    return t.detach().reshape(-1)[idx.to(t.device)]


def _flat_write(t: Tensor, idx: Tensor, values: Tensor) -> None:
    """``t.flat[idx] = values`` in place (also for non-contiguous ``t``), outside autograd."""
    idx = idx.to(t.device)
    values = values.to(t.device)
    with torch.no_grad():
        if t.is_contiguous():
            t.view(-1)[idx] = values
        else:
            t.index_put_(torch.unravel_index(idx, t.shape), values)


@dataclass(frozen=True)
class _Entry:
    indices: Tensor   # int64 [k], sorted, unique, in [0, numel)
    old: Tensor       # [k], the parameter's dtype
    new: Tensor       # [k], the parameter's dtype
    shape: tuple
    dtype: torch.dtype


def _check_entry(name: str, indices: Tensor, old: Tensor, new: Tensor, shape: tuple, dtype: torch.dtype) -> _Entry:
    if not isinstance(name, str) or not name:
        raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
    for what, t in (("indices", indices), ("old", old), ("new", new)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name}: {what} must be one-dimensional, got shape {tuple(t.shape)}")
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name}: unsupported dtype {dtype}; supported: {sorted(_DTYPES)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name}: indices must be int64, got {indices.dtype}")
    if old.dtype != dtype or new.dtype != dtype:
        raise TypeError(f"{name}: old/new values must have the parameter's dtype {dtype}, got {old.dtype}/{new.dtype}")
    k = indices.shape[0]
    if old.shape[0] != k or new.shape[0] != k:
        raise ValueError(f"{name}: {k} indices but {old.shape[0]} old and {new.shape[0]} new values")
    if len({indices.device, old.device, new.device}) > 1:
        raise ValueError(f"{name}: indices, old and new values must be on one device")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{name}: bad shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    if k:
        if bool((indices[1:] <= indices[:-1]).any()):
            raise ValueError(f"{name}: indices must be sorted and unique")
        if int(indices[0]) < 0 or int(indices[-1]) >= numel:
            raise ValueError(f"{name}: indices must lie in [0, {numel}) for shape {shape}, got "
                             f"{int(indices[0])}..{int(indices[-1])}")
    return _Entry(indices, old, new, shape, dtype)


class SparseDelta:
    """A sparse change of named parameters: at each recorded coordinate, the OLD and the NEW value.

    Build one with :meth:`from_models` (the coordinates whose bits differ between two models or
    state dicts) or :meth:`from_entries`. Parameters without any change are not recorded.

    Attributes:
        names: the changed parameters, in order.
        nnz: the number of changed scalars; ``nnz_per_param``: per parameter.
    """

    def __init__(self, entries: Mapping[str, _Entry] | None = None):
        self._entries: dict[str, _Entry] = dict(entries or {})

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_entries(cls, entries: Mapping[str, Mapping | tuple]) -> "SparseDelta":
        """A delta from explicit entries ``{name: (indices, old, new, shape)}`` or
        ``{name: {"indices", "old", "new", "shape"}}``; the dtype is that of ``old``/``new``.

        Indices are flat (row-major) positions; they are sorted here (with the values) and must be
        unique and within the shape.

        Raises:
            TypeError / ValueError for mismatched lengths, dtypes or devices, duplicate or
            out-of-range indices.
        """
        if not isinstance(entries, Mapping):
            raise TypeError(f"entries must be a mapping name → (indices, old, new, shape), got {type(entries).__name__}")
        out: dict[str, _Entry] = {}
        for name, e in entries.items():
            if isinstance(e, Mapping):
                missing = {"indices", "old", "new", "shape"} - set(e)
                if missing:
                    raise ValueError(f"{name}: entry is missing {sorted(missing)}")
                indices, old, new, shape = e["indices"], e["old"], e["new"], e["shape"]
            else:
                try:
                    indices, old, new, shape = e
                except (TypeError, ValueError):
                    raise TypeError(f"{name}: an entry must be (indices, old, new, shape)") from None
            indices = torch.as_tensor(indices)
            if indices.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
                indices = indices.to(torch.int64)
            if isinstance(old, Tensor) and isinstance(new, Tensor) and indices.dim() == 1 \
                    and old.shape == indices.shape == new.shape and indices.dtype == torch.int64:
                order = torch.argsort(indices)
                indices, old, new = indices[order], old[order], new[order]
            dtype = old.dtype if isinstance(old, Tensor) else None
            out[name] = _check_entry(name, indices, old, new, tuple(shape), dtype)
        return cls(out)

    @classmethod
    def from_models(cls, before: TensorsLike, after: TensorsLike,
                    names: Iterable[str] | None = None) -> "SparseDelta":
        """The coordinates whose bits differ between ``before`` and ``after``.

        Args:
            before, after: ``nn.Module`` (its parameters and buffers) or mappings name → tensor.
            names: the tensors to compare; default: every name of ``before`` (``after`` must have
                the same names, shapes and dtypes).

        Comparison is by bit pattern (NaN equals NaN, ``-0.0`` differs from ``0.0``), so applying
        the result to ``before`` reproduces ``after`` exactly.
        """
        b = _tensors_of(before, "before")
        a = _tensors_of(after, "after")
        if names is None:
            if set(b) != set(a):
                raise ValueError(f"before and after hold different names: only in before "
                                 f"{sorted(set(b) - set(a))[:5]}, only in after {sorted(set(a) - set(b))[:5]}")
            names = list(b)
        else:
            names = [names] if isinstance(names, str) else list(names)
        out: dict[str, _Entry] = {}
        for n in names:
            if n not in b or n not in a:
                raise ValueError(f"{n!r} is missing from {'before' if n not in b else 'after'}")
            tb, ta = b[n].detach(), a[n].detach()
            if tb.shape != ta.shape or tb.dtype != ta.dtype:
                raise ValueError(f"{n}: before is {tb.dtype} {tuple(tb.shape)}, after is {ta.dtype} {tuple(ta.shape)}")
            if tb.dtype not in _DTYPE_NAMES:
                raise TypeError(f"{n}: unsupported dtype {tb.dtype}")
            fb, fa = tb.reshape(-1), ta.to(tb.device).reshape(-1)
            idx = torch.nonzero(~_same_bits(fb, fa)).reshape(-1)
            if idx.numel():
                out[n] = _Entry(idx, fb[idx].clone(), fa[idx].clone(), tuple(tb.shape), tb.dtype)
        return cls(out)

    # -- inspection ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def nnz(self) -> int:
        return sum(e.indices.numel() for e in self._entries.values())

    @property
    def nnz_per_param(self) -> dict[str, int]:
        return {n: e.indices.numel() for n, e in self._entries.items()}

    def entry(self, name: str) -> dict:
        """``{"indices", "old", "new", "shape", "dtype"}`` of one parameter (the stored tensors)."""
        e = self._entries[name]
        return {"indices": e.indices, "old": e.old, "new": e.new, "shape": e.shape, "dtype": e.dtype}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        per = ", ".join(f"{n}: {k}" for n, k in self.nnz_per_param.items())
        return f"SparseDelta(nnz={self.nnz}, params={{{per}}})"

    def __eq__(self, other: object) -> bool:
        """Bit-exact equality of names, shapes, dtypes, indices and values."""
        if not isinstance(other, SparseDelta) or self.names != other.names:
            return False
        for n, e in self._entries.items():
            f = other._entries[n]
            if e.shape != f.shape or e.dtype != f.dtype or not torch.equal(e.indices.cpu(), f.indices.cpu()):
                return False
            if not bool(_same_bits(e.old.cpu(), f.old.cpu()).all()) or not bool(_same_bits(e.new.cpu(), f.new.cpu()).all()):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def to(self, device: torch.device | str) -> "SparseDelta":
        """A copy with every tensor on ``device``."""
        return SparseDelta({n: _Entry(e.indices.to(device), e.old.to(device), e.new.to(device), e.shape, e.dtype)
                            for n, e in self._entries.items()})

    def inverse(self) -> "SparseDelta":
        """The delta that undoes this one (OLD and NEW swapped)."""
        return SparseDelta({n: _Entry(e.indices, e.new, e.old, e.shape, e.dtype) for n, e in self._entries.items()})

    # -- apply / revert ---------------------------------------------------------------------------
    def _validate(self, tensors: dict[str, Tensor], expect: str, check: bool) -> None:
        for n, e in self._entries.items():
            if n not in tensors:
                raise ValueError(f"the model has no parameter or buffer named {n!r}")
            t = tensors[n]
            if tuple(t.shape) != e.shape:
                raise ValueError(f"{n}: the model's tensor has shape {tuple(t.shape)}, the delta was made for {e.shape}")
            if t.dtype != e.dtype:
                raise ValueError(f"{n}: the model's tensor is {t.dtype}, the delta holds {e.dtype}")
            if check:
                want = e.old if expect == "old" else e.new
                ok = _same_bits(_flat_read(t, e.indices), want.to(t.device))
                if not bool(ok.all()):
                    bad = int((~ok).sum())
                    raise ValueError(f"{n}: {bad} of {e.indices.numel()} coordinates do not hold the delta's "
                                     f"{expect.upper()} values; the model is not in the state this delta "
                                     f"{'starts from' if expect == 'old' else 'produces'} (nothing was written)")

    def _write(self, tensors: dict[str, Tensor], which: str) -> None:
        """Write NEW (``which="new"``) or OLD values; on a failure midway, restore what was written."""
        done: list[tuple[Tensor, Tensor, Tensor]] = []
        try:
            for n, e in self._entries.items():
                t = tensors[n]
                saved = _flat_read(t, e.indices).clone()
                _flat_write(t, e.indices, e.new if which == "new" else e.old)
                done.append((t, e.indices, saved))
        except BaseException:
            for t, idx, saved in reversed(done):
                _flat_write(t, idx, saved)
            raise

    def apply(self, model: TensorsLike, check: bool = True) -> None:
        """Write the NEW values into ``model`` (a module, or a mapping name → tensor), in place.

        Args:
            check: first verify that the model holds the OLD values at every recorded coordinate
                (bit for bit).

        Raises:
            ValueError if a name is missing, a shape or dtype differs, or (``check``) the current
            values are not OLD. Every check runs before anything is written; a failure while
            writing restores the values already written.
        """
        tensors = _tensors_of(model, "model")
        self._validate(tensors, "old", check)
        self._write(tensors, "new")

    def revert(self, model: TensorsLike, check: bool = True) -> None:
        """Write the OLD values back (bit-exact); ``check`` verifies the model holds NEW first.
        Same errors and atomicity as :meth:`apply`."""
        tensors = _tensors_of(model, "model")
        self._validate(tensors, "new", check)
        self._write(tensors, "old")

    def patched_state_dict(self, model: nn.Module, check: bool = True) -> dict[str, Tensor]:
        """A copy of ``model.state_dict()`` with this delta applied; the model is not modified."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.apply(sd, check=check)
        return sd

    def dense(self, model: TensorsLike | None = None) -> dict[str, Tensor]:
        """``{name: NEW − OLD as a dense tensor of the parameter's shape, zero elsewhere}``.

        float64 parameters give float64, every other dtype float32. With ``model``, the shapes and
        dtypes are checked against it and the tensors are placed on its tensors' devices.
        """
        tensors = None
        if model is not None:
            tensors = _tensors_of(model, "model")
            self._validate(tensors, "old", check=False)
        out = {}
        for n, e in self._entries.items():
            dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
            device = tensors[n].device if tensors is not None else e.indices.device
            d = torch.zeros(e.shape, dtype=dtype, device=device)
            d.view(-1)[e.indices.to(device)] = (e.new.to(device, dtype) - e.old.to(device, dtype))
            out[n] = d
        return out

    # -- files -------------------------------------------------------------------------------------
    def _tensors_and_meta(self, prefix: str = "") -> tuple[dict[str, Tensor], dict]:
        tensors, params = {}, []
        for i, (n, e) in enumerate(self._entries.items()):
            tensors[f"{prefix}{i}.indices"] = e.indices.detach().cpu().contiguous()
            tensors[f"{prefix}{i}.old"] = e.old.detach().cpu().contiguous()
            tensors[f"{prefix}{i}.new"] = e.new.detach().cpu().contiguous()
            params.append({"name": n, "shape": list(e.shape), "dtype": _DTYPE_NAMES[e.dtype]})
        return tensors, {"params": params}

    @classmethod
    def _from_tensors_and_meta(cls, tensors: Mapping[str, Tensor], meta: dict, prefix: str, where: str) -> "SparseDelta":
        try:
            params = meta["params"]
            entries = {}
            for i, p in enumerate(params):
                name, shape, dtype_name = p["name"], p["shape"], p["dtype"]
                if dtype_name not in _DTYPES:
                    raise ValueError(f"unknown dtype {dtype_name!r}")
                keys = [f"{prefix}{i}.{k}" for k in ("indices", "old", "new")]
                for k in keys:
                    if k not in tensors:
                        raise ValueError(f"tensor {k!r} is missing")
                if name in entries:
                    raise ValueError(f"parameter {name!r} appears twice")
                entries[name] = _check_entry(name, tensors[keys[0]], tensors[keys[1]], tensors[keys[2]],
                                             tuple(shape), _DTYPES[dtype_name])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is not a valid fastedit SparseDelta: {exc}") from None
        return cls(entries)

    def save(self, path) -> None:
        """Save to one safetensors file (bit-exact; metadata: format, version, names, shapes, dtypes)."""
        from safetensors.torch import save_file

        tensors, meta = self._tensors_and_meta()
        save_file(tensors, str(path), metadata={"format": FORMAT, "version": VERSION, "delta": json.dumps(meta)})

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu") -> "SparseDelta":
        """Load a file written by :meth:`save`.

        Raises:
            ValueError for a file that is not a safetensors file, not a fastedit SparseDelta
            (another format, another version) or is inconsistent; FileNotFoundError if missing.
        """
        tensors, metadata = _read_safetensors(path)
        _check_format(metadata, FORMAT, path)
        meta = _parse_json(metadata, "delta", path)
        delta = cls._from_tensors_and_meta(tensors, meta, "", f"{path}")
        return delta.to(device) if str(device) != "cpu" else delta


def _read_safetensors(path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    if not os.path.exists(str(path)):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, metadata


def _check_format(metadata: dict, fmt: str, path) -> None:
    if metadata.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} file (format {metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported {fmt} version {metadata.get('version')!r} (this is version {VERSION})")


def _parse_json(metadata: dict, key: str, path):
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: damaged metadata {key!r}: {exc}") from None


# ------------------------------------------------------------------------------------------------
# the journal
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JournalEntry:
    """One applied delta: its id, optional name, and the delta as applied (OLD re-recorded from
    the model at the time it was applied)."""

    id: int
    name: str | None
    delta: SparseDelta


def _check_entry_args(delta, name) -> None:
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"delta must be a SparseDelta, got {type(delta).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string or None, got {type(name).__name__}")


class EditJournal:
    """An ordered log of sparse deltas applied to one model; any entry can be rolled back.

    Semantics. :meth:`record` logs a delta the model already holds (a successful ``fe.surgery``).
    :meth:`apply` writes the delta's NEW values and records the model's *current* values
    at those coordinates as OLD (it does not require them to equal the delta's own OLD unless
    ``check=True``). So every coordinate holds the NEW value of the latest entry that touched it,
    or its original value if no entry did.

    :meth:`rollback` of entry ``i`` reverts the entries after ``i`` in reverse order, reverts ``i``,
    then re-applies the later entries in order, re-recording their OLD values. Deltas store absolute
    NEW values, so the result is exactly the state obtained by applying all remaining entries, in
    order, to the model as it was before the journal's first entry: on a coordinate touched by a
    later entry that entry's value still wins; a coordinate touched only by the removed entry (and
    earlier ones) returns to the value it had before the removed entry.

    All journal operations are atomic: they verify bit for bit that the model still holds what the
    journal last wrote (else ``ValueError``), and restore every touched value if anything fails.
    """

    def __init__(self, model: nn.Module | Mapping[str, Tensor]):
        _tensors_of(model, "model")  # type check now
        self.model = model
        self._entries: list[JournalEntry] = []
        self._next_id = 0

    @property
    def _tensors(self) -> dict[str, Tensor]:
        # resolved on every use, so the journal follows the model's tensors (e.g. after .to())
        return _tensors_of(self.model, "model")

    @property
    def entries(self) -> list[JournalEntry]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        items = ", ".join(f"{e.id}{'' if e.name is None else ':' + e.name} (nnz={e.delta.nnz})" for e in self._entries)
        return f"EditJournal([{items}])"

    def _rebased(self, delta: SparseDelta) -> SparseDelta:
        """``delta`` with OLD read from the model now (validated against the model's tensors)."""
        delta._validate(self._tensors, "old", check=False)
        return SparseDelta({n: _Entry(e.indices, _flat_read(self._tensors[n], e.indices).clone().to(e.new.device),
                                      e.new, e.shape, e.dtype) for n, e in delta._entries.items()})

    def apply(self, delta: SparseDelta, name: str | None = None, check: bool = False) -> int:
        """Apply ``delta`` and record it; returns the entry's id.

        Args:
            delta: a :class:`SparseDelta` for this model's parameters.
            name: an optional label.
            check: also require the model's current values to equal the delta's OLD values.
        """
        _check_entry_args(delta, name)
        if check:
            delta._validate(self._tensors, "old", check=True)
        rebased = self._rebased(delta)
        rebased._write(self._tensors, "new")
        entry = JournalEntry(self._next_id, name, rebased)
        self._next_id += 1
        self._entries.append(entry)
        return entry.id

    def record(self, delta, name: str | None = None) -> int:
        """Record a delta the model *already holds* (e.g. ``fe.surgery(...)``'s result, applied on
        success) without writing anything; returns the entry's id. ``delta`` is a
        :class:`SparseDelta` or anything with a ``.delta`` (a ``SurgeryResult``). Its OLD values are
        what a rollback restores.

        Raises:
            ValueError if the model does not hold the delta's NEW values (nothing is recorded).
        """
        delta = getattr(delta, "delta", delta)
        _check_entry_args(delta, name)
        delta._validate(self._tensors, "new", check=True)
        entry = JournalEntry(self._next_id, name, delta)
        self._next_id += 1
        self._entries.append(entry)
        return entry.id

    def _position(self, entry_id: int) -> int:
        for i, e in enumerate(self._entries):
            if e.id == entry_id:
                return i
        raise KeyError(f"no journal entry with id {entry_id!r}; ids: {[e.id for e in self._entries]}")

    def _snapshot(self, entries: list[JournalEntry]) -> list[tuple[Tensor, Tensor, Tensor]]:
        tensors = self._tensors
        snap = []
        for e in entries:
            e.delta._validate(tensors, "new", check=False)  # names, shapes, dtypes
            for n, d in e.delta._entries.items():
                snap.append((tensors[n], d.indices, _flat_read(tensors[n], d.indices).clone()))
        return snap

    def rollback(self, entry_id: int) -> JournalEntry:
        """Remove entry ``entry_id``, leaving the model as if it had never been applied (see the
        class docstring for overlapping entries). Returns the removed entry.

        Raises:
            KeyError for an unknown id; ValueError if the model no longer holds what the journal
            wrote (nothing is changed then).
        """
        pos = self._position(entry_id)
        later = self._entries[pos + 1:]
        snap = self._snapshot(self._entries[pos:])
        try:
            for e in reversed(later):
                e.delta.revert(self._tensors, check=True)
            self._entries[pos].delta.revert(self._tensors, check=True)
            replayed = []
            for e in later:
                d = self._rebased(e.delta)
                d._write(self._tensors, "new")
                replayed.append(JournalEntry(e.id, e.name, d))
        except BaseException:
            for t, idx, saved in reversed(snap):
                _flat_write(t, idx, saved)
            raise
        removed = self._entries[pos]
        self._entries[pos:] = replayed
        return removed

    def undo(self) -> JournalEntry:
        """Roll back the last entry; ``IndexError`` if the journal is empty."""
        if not self._entries:
            raise IndexError("undo: the journal is empty")
        return self.rollback(self._entries[-1].id)

    def verify(self) -> None:
        """``ValueError`` unless the model holds the journal's state: reverting every entry, in
        reverse order, on a copy of the touched tensors passes every bit-exact check."""
        copies = {n: t.detach().clone() for n, t in self._tensors.items()
                  if any(n in e.delta._entries for e in self._entries)}
        for e in reversed(self._entries):
            e.delta.revert(copies, check=True)

    # -- files -------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Save every entry (ids, names, deltas as applied) to one safetensors file."""
        from safetensors.torch import save_file

        tensors, entries = {}, []
        for k, e in enumerate(self._entries):
            t, meta = e.delta._tensors_and_meta(prefix=f"e{k}.")
            tensors.update(t)
            entries.append({"id": e.id, "name": e.name, **meta})
        meta = {"entries": entries, "next_id": self._next_id}
        save_file(tensors, str(path), metadata={"format": JOURNAL_FORMAT, "version": VERSION,
                                                "journal": json.dumps(meta)})

    @classmethod
    def load(cls, path, model: nn.Module | Mapping[str, Tensor], check: bool = True) -> "EditJournal":
        """A journal read from ``path`` and attached to ``model``, which must already hold the
        journal's state (e.g. the same model object, or one restored from a checkpoint taken then).

        Args:
            check: verify bit for bit that ``model`` holds that state (:meth:`verify`).

        Raises:
            ValueError for a foreign or damaged file, or a model not in the journal's state.
        """
        tensors, metadata = _read_safetensors(path)
        _check_format(metadata, JOURNAL_FORMAT, path)
        meta = _parse_json(metadata, "journal", path)
        journal = cls(model)
        try:
            ids = set()
            for k, e in enumerate(meta["entries"]):
                delta = SparseDelta._from_tensors_and_meta(tensors, e, f"e{k}.", f"{path} (entry {k})")
                if not isinstance(e["id"], int) or e["id"] in ids:
                    raise ValueError(f"bad or duplicate entry id {e['id']!r}")
                if e["name"] is not None and not isinstance(e["name"], str):
                    raise ValueError(f"bad entry name {e['name']!r}")
                ids.add(e["id"])
                journal._entries.append(JournalEntry(e["id"], e["name"], delta))
            journal._next_id = int(meta["next_id"])
            if ids and journal._next_id <= max(ids):
                raise ValueError("next_id is not above every entry id")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid fastedit EditJournal: {exc}") from None
        for e in journal._entries:
            e.delta._validate(journal._tensors, "old", check=False)
        if check:
            journal.verify()
        return journal
