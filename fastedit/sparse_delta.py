"""Sparse, bit-exact, revertible parameter changes: :class:`SparseDelta`.

A :class:`SparseDelta` records, for each changed parameter, the flat indices of the changed scalars
(int64, sorted, unique) with their OLD and NEW values, both *absolute* and in the parameter's own
dtype. Because nothing is stored as a difference, ``apply`` writes NEW and ``revert`` writes OLD bit
for bit: no ``θ₀ + Δ`` rounding, and NaN or ``-0.0`` survive the round trip.

An ordered, roll-back-able log of deltas applied to one model is
:class:`fastedit.edit_journal.EditJournal`; it builds on this module's private helpers (tensors by
name and memory, bit comparison, atomic writes, the file format and its digest), whose one home is
here.

Tied weights. One tensor registered under several names (a language model's ``lm_head.weight`` and
``transformer.wte.weight``; any names whose tensors are the same memory: same data pointer, shape,
strides and dtype) is one tensor here too: a delta holds ONE entry for it, under its canonical
name (the first in ``named_parameters()`` / state-dict order), counts each changed scalar once and
remembers the other names as its *aliases*. Applying a delta writes every distinct tensor the
target holds under any of those names once, so it works on a tied model (both names, one memory),
on an untied copy (both names, two tensors: both are written) and on a state dict.

A delta saves to a single safetensors file (tensors plus string metadata, including a SHA-256
digest that :meth:`SparseDelta.load` verifies; an :class:`~fastedit.edit_journal.EditJournal`'s
file is built the same way).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import Tensor, nn

from ._optional import require

__all__ = ["SparseDelta"]

FORMAT = "fastedit.sparse_delta"
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


def same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise bit equality of two tensors of one dtype."""
    return _bits(a) == _bits(b)


def _memory_key(t: Tensor):
    """A key equal for two tensors exactly when they are one tensor in memory (aliases): same device,
    data pointer, shape, strides and dtype. ``None`` for a tensor with no memory to share (empty,
    meta, or a wrapper without storage)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (str(t.device), ptr, tuple(t.shape), t.stride(), t.dtype)


def _key_or_id(t: Tensor):
    key = _memory_key(t)
    return ("id", id(t)) if key is None else key


class _Named:
    """The tensors of a module or mapping by name, grouped by memory (tied weights).

    ``tensors``: ``{name: tensor}``: a module's parameters, then its buffers, every alias included
    (the names of its state dict, plus non-persistent buffers); a mapping as given. ``canonical``:
    ``{name: first name of its tensor}``; ``members``: ``{canonical name: every name of that tensor}``.
    """

    def __init__(self, obj: TensorsLike, what: str):
        if isinstance(obj, nn.Module):
            tensors: dict[str, Tensor] = dict(obj.named_parameters(remove_duplicate=False))
            for n, b in obj.named_buffers(remove_duplicate=False):
                tensors.setdefault(n, b)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                if not isinstance(k, str) or not isinstance(v, Tensor):
                    raise TypeError(f"{what}: a mapping must map names (str) to tensors, got {type(k).__name__} → "
                                    f"{type(v).__name__}")
            tensors = dict(obj)
        else:
            raise TypeError(f"{what} must be an nn.Module or a mapping name → tensor, got {type(obj).__name__}")
        self.tensors = tensors
        self.canonical: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        first: dict = {}
        for n, t in tensors.items():
            key = _memory_key(t)
            c = n if key is None else first.setdefault(key, n)
            self.canonical[n] = c
            self.members.setdefault(c, []).append(n)


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


class _Hit:
    """One entry of a delta resolved on a target: ``tensors``, the distinct tensors (by memory) that
    the target holds under the entry's names, as ``(name, tensor)``; ``names``, the entry's name
    first, then every other name the delta gives that tensor (aliases, and merged entries' names)."""

    __slots__ = ("name", "entry", "tensors", "names")

    def __init__(self, name: str, entry: _Entry, tensors: list, names: tuple):
        self.name, self.entry, self.tensors, self.names = name, entry, tensors, names


def _merge(a_name: str, a: _Entry, b_name: str, b: _Entry) -> _Entry:
    """One entry for two entries of one tensor of the model (names tied there): the union of their
    coordinates; where both record a coordinate, their OLD and NEW values must agree bit for bit."""
    device = a.indices.device
    idx = torch.cat([a.indices, b.indices.to(device)])
    old = torch.cat([a.old, b.old.to(device)])
    new = torch.cat([a.new, b.new.to(device)])
    order = torch.argsort(idx, stable=True)
    idx, old, new = idx[order], old[order], new[order]
    dup = idx[1:] == idx[:-1]
    if bool(dup.any()):
        agree = same_bits(old[1:], old[:-1]) & same_bits(new[1:], new[:-1])
        bad = int((dup & ~agree).sum())
        if bad:
            raise ValueError(f"{a_name} and {b_name} are one tensor in the model (tied weights), but the delta "
                             f"records different values for them at {bad} coordinates; build the delta from the "
                             f"tied model (SparseDelta.from_models) so that it holds one entry for the tensor "
                             f"(nothing was written)")
        keep = torch.cat([torch.ones(1, dtype=torch.bool, device=device), ~dup])
        idx, old, new = idx[keep], old[keep], new[keep]
    return _Entry(idx, old, new, a.shape, a.dtype)


def _write_hits(hits: list[_Hit], which: str) -> None:
    """Write NEW (``which="new"``) or OLD values into every tensor of ``hits``; on a failure midway,
    restore what was written."""
    done: list[tuple[Tensor, Tensor, Tensor]] = []
    try:
        for h in hits:
            e = h.entry
            values = e.new if which == "new" else e.old
            for _, t in h.tensors:
                saved = _flat_read(t, e.indices).clone()
                _flat_write(t, e.indices, values)
                done.append((t, e.indices, saved))
    except BaseException:
        for t, idx, saved in reversed(done):
            _flat_write(t, idx, saved)
        raise


class SparseDelta:
    """A sparse change of named parameters: at each recorded coordinate, the OLD and the NEW value.

    Build one with :meth:`from_models` (the coordinates whose bits differ between two models or
    state dicts) or :meth:`from_entries`. Parameters without any change are not recorded.

    Tied weights: a tensor known under several names has one entry, under its canonical name, and
    its other names in :attr:`aliases` (see the module docstring). :meth:`apply`, :meth:`revert`,
    :meth:`patched_state_dict` and :meth:`dense` find the tensor under any of them and write each
    distinct tensor of the target once. Two entries that land on one tensor of the target (a delta
    built from an untied copy, or a file of an earlier fastedit that recorded both names) are
    merged there: their coordinates are united and must agree where they overlap, else
    ``ValueError``.

    Attributes:
        names: the changed parameters (canonical names), in order.
        aliases: ``{name: (other names of that tensor, ...)}`` for the entries that have some.
        nnz: the number of changed scalars, each counted once; ``nnz_per_param``: per parameter.
    """

    def __init__(self, entries: Mapping[str, _Entry] | None = None,
                 aliases: Mapping[str, Iterable[str]] | None = None):
        self._entries: dict[str, _Entry] = dict(entries or {})
        self._aliases: dict[str, tuple[str, ...]] = {}
        taken = set(self._entries)
        for n, names in (aliases or {}).items():
            if n not in self._entries:
                raise ValueError(f"aliases are given for {n!r}, which the delta does not hold")
            names = (names,) if isinstance(names, str) else tuple(names)
            for a in names:
                if not isinstance(a, str) or not a:
                    raise TypeError(f"{n}: aliases must be non-empty strings, got {a!r}")
                if a in taken:
                    raise ValueError(f"{a!r} is named twice in the delta (as a parameter and an alias, or as an "
                                     f"alias of two parameters); a tensor must have one entry")
                taken.add(a)
            if names:
                self._aliases[n] = names

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_entries(cls, entries: Mapping[str, Mapping | tuple]) -> "SparseDelta":
        """A delta from explicit entries ``{name: (indices, old, new, shape)}`` or
        ``{name: {"indices", "old", "new", "shape"}}`` (optionally with ``"aliases"``: the other
        names of that tensor); the dtype is that of ``old``/``new``.

        Indices are flat (row-major) positions; they are sorted here (with the values) and must be
        unique and within the shape.

        Raises:
            TypeError / ValueError for mismatched lengths, dtypes or devices, duplicate or
            out-of-range indices, or a name given twice (as a parameter and an alias).
        """
        if not isinstance(entries, Mapping):
            raise TypeError(f"entries must be a mapping name → (indices, old, new, shape), got {type(entries).__name__}")
        out: dict[str, _Entry] = {}
        aliases: dict[str, Iterable[str]] = {}
        for name, e in entries.items():
            if isinstance(e, Mapping):
                missing = {"indices", "old", "new", "shape"} - set(e)
                if missing:
                    raise ValueError(f"{name}: entry is missing {sorted(missing)}")
                indices, old, new, shape = e["indices"], e["old"], e["new"], e["shape"]
                if e.get("aliases"):
                    aliases[name] = e["aliases"]
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
        return cls(out, aliases)

    @classmethod
    def from_models(cls, before: TensorsLike, after: TensorsLike,
                    names: Iterable[str] | None = None) -> "SparseDelta":
        """The coordinates whose bits differ between ``before`` and ``after``.

        Args:
            before, after: ``nn.Module`` (its parameters and buffers, every alias of a tied weight
                included) or mappings name → tensor (e.g. state dicts).
            names: the tensors to compare (any alias of a tied tensor selects it); default: every
                name of ``before`` (``after`` must have the same names, shapes and dtypes).

        Comparison is by bit pattern (NaN equals NaN, ``-0.0`` differs from ``0.0``), so applying
        the result to ``before`` reproduces ``after`` exactly.

        Tied weights are those of ``before``: names whose tensors are one memory there give ONE
        entry, under the first of them (``named_parameters()`` / mapping order), with the others as
        :attr:`aliases`; each changed scalar is counted once. If ``after`` holds them as separate
        tensors, they must agree bit for bit (else ``ValueError``).
        """
        bn = _Named(before, "before")
        an = _Named(after, "after")
        b, a = bn.tensors, an.tensors
        if names is None:
            if set(b) != set(a):
                raise ValueError(f"before and after hold different names: only in before "
                                 f"{sorted(set(b) - set(a))[:5]}, only in after {sorted(set(a) - set(b))[:5]}")
            names = list(b)
        else:
            names = [names] if isinstance(names, str) else list(names)
        out: dict[str, _Entry] = {}
        aliases: dict[str, tuple[str, ...]] = {}
        done: set[str] = set()
        for n in names:
            if n not in b or n not in a:
                raise ValueError(f"{n!r} is missing from {'before' if n not in b else 'after'}")
            c = bn.canonical[n]
            if c in done:
                continue
            done.add(c)
            group = bn.members[c]
            in_after = [m for m in group if m in a]  # n among them
            tb, ta = b[c].detach(), a[in_after[0]].detach()
            if tb.shape != ta.shape or tb.dtype != ta.dtype:
                raise ValueError(f"{n}: before is {tb.dtype} {tuple(tb.shape)}, after is {ta.dtype} {tuple(ta.shape)}")
            if tb.dtype not in _DTYPE_NAMES:
                raise TypeError(f"{n}: unsupported dtype {tb.dtype}")
            fb, fa = tb.reshape(-1), ta.to(tb.device).reshape(-1)
            for m in in_after[1:]:
                if an.canonical[m] == an.canonical[in_after[0]]:
                    continue  # one tensor in after too
                tm = a[m].detach()
                if tm.shape != ta.shape or tm.dtype != ta.dtype \
                        or not bool(same_bits(tm.to(tb.device).reshape(-1), fa).all()):
                    raise ValueError(f"{in_after[0]} and {m} are one tensor in before (tied weights), but after "
                                     f"holds different values under the two names; a delta cannot record both")
            idx = torch.nonzero(~same_bits(fb, fa)).reshape(-1)
            if idx.numel():
                out[c] = _Entry(idx, fb[idx].clone(), fa[idx].clone(), tuple(tb.shape), tb.dtype)
                if len(group) > 1:
                    aliases[c] = tuple(m for m in group if m != c)
        return cls(out, aliases)

    # -- inspection ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def aliases(self) -> dict[str, tuple[str, ...]]:
        return dict(self._aliases)

    @property
    def nnz(self) -> int:
        return sum(e.indices.numel() for e in self._entries.values())

    @property
    def nnz_per_param(self) -> dict[str, int]:
        return {n: e.indices.numel() for n, e in self._entries.items()}

    def _entry_name(self, name: str) -> str:
        if name in self._entries:
            return name
        for n, names in self._aliases.items():
            if name in names:
                return n
        raise KeyError(f"the delta holds no parameter named {name!r}; names: {self.names}")

    def entry(self, name: str) -> dict:
        """``{"indices", "old", "new", "shape", "dtype", "aliases"}`` of one parameter (the stored
        tensors); ``name`` may also be an alias. ``KeyError`` for a name the delta does not hold."""
        n = self._entry_name(name)
        e = self._entries[n]
        return {"indices": e.indices, "old": e.old, "new": e.new, "shape": e.shape, "dtype": e.dtype,
                "aliases": self._aliases.get(n, ())}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        per = ", ".join(f"{n}{' (= ' + ', '.join(self._aliases[n]) + ')' if n in self._aliases else ''}: {k}"
                        for n, k in self.nnz_per_param.items())
        return f"SparseDelta(nnz={self.nnz}, params={{{per}}})"

    def __eq__(self, other: object) -> bool:
        """Bit-exact equality of names, aliases, shapes, dtypes, indices and values."""
        if not isinstance(other, SparseDelta) or self.names != other.names:
            return False
        if {n: set(a) for n, a in self._aliases.items()} != {n: set(a) for n, a in other._aliases.items()}:
            return False
        for n, e in self._entries.items():
            f = other._entries[n]
            if e.shape != f.shape or e.dtype != f.dtype or not torch.equal(e.indices.cpu(), f.indices.cpu()):
                return False
            if not bool(same_bits(e.old.cpu(), f.old.cpu()).all()) or not bool(same_bits(e.new.cpu(), f.new.cpu()).all()):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def to(self, device: torch.device | str) -> "SparseDelta":
        """A copy with every tensor on ``device``."""
        return SparseDelta({n: _Entry(e.indices.to(device), e.old.to(device), e.new.to(device), e.shape, e.dtype)
                            for n, e in self._entries.items()}, self._aliases)

    def inverse(self) -> "SparseDelta":
        """The delta that undoes this one (OLD and NEW swapped; same aliases)."""
        return SparseDelta({n: _Entry(e.indices, e.new, e.old, e.shape, e.dtype) for n, e in self._entries.items()},
                           self._aliases)

    # -- apply / revert ---------------------------------------------------------------------------
    def _resolve(self, target: _Named) -> list[_Hit]:
        """Where each entry lands in ``target`` (shapes and dtypes checked); entries landing on one
        tensor of the target are merged (:func:`_merge`)."""
        hits: list[_Hit] = []
        owner: dict[str, _Hit] = {}  # the target's canonical name → the hit that writes that tensor
        for n, e in self._entries.items():
            names = (n, *self._aliases.get(n, ()))
            present = [m for m in names if m in target.tensors]
            if not present:
                nor = f" (nor its aliases {list(names[1:])})" if len(names) > 1 else ""
                raise ValueError(f"the model has no parameter or buffer named {n!r}{nor}")
            groups = list(dict.fromkeys(target.canonical[m] for m in present))
            tensors, keys = [], set()
            for g in groups:
                for m in target.members[g]:
                    t = target.tensors[m]
                    label = m if m == n else f"{m} (an alias of {n})"
                    if tuple(t.shape) != e.shape:
                        raise ValueError(f"{label}: the model's tensor has shape {tuple(t.shape)}, the delta was "
                                         f"made for {e.shape}")
                    if t.dtype != e.dtype:
                        raise ValueError(f"{label}: the model's tensor is {t.dtype}, the delta holds {e.dtype}")
                    key = _key_or_id(t)
                    if key not in keys:
                        keys.add(key)
                        tensors.append((m, t))
            hit = _Hit(n, e, tensors, names)
            earlier = [h for h in hits if any(owner.get(g) is h for g in groups)]
            if earlier:  # tied in the target, separate entries in the delta: merged, written once
                base = earlier[0]
                for other in earlier[1:] + [hit]:
                    base.entry = _merge(base.name, base.entry, other.name, other.entry)
                    have = {_key_or_id(t) for _, t in base.tensors}
                    base.tensors = base.tensors + [(m, t) for m, t in other.tensors if _key_or_id(t) not in have]
                    base.names = tuple(dict.fromkeys(base.names + other.names))
                hits = [h for h in hits if not any(h is x for x in earlier[1:])]
                for g, h in list(owner.items()):
                    if any(h is x for x in earlier):
                        owner[g] = base
                hit = base
            else:
                hits.append(hit)
            for g in groups:
                owner[g] = hit
        return hits

    def _validate(self, target: _Named, expect: str, check: bool) -> list[_Hit]:
        hits = self._resolve(target)
        if check:
            for h in hits:
                e = h.entry
                want = e.old if expect == "old" else e.new
                for m, t in h.tensors:
                    ok = same_bits(_flat_read(t, e.indices), want.to(t.device))
                    if not bool(ok.all()):
                        bad = int((~ok).sum())
                        raise ValueError(f"{m}: {bad} of {e.indices.numel()} coordinates do not hold the delta's "
                                         f"{expect.upper()} values; the model is not in the state this delta "
                                         f"{'starts from' if expect == 'old' else 'produces'} (nothing was written)")
        return hits

    @staticmethod
    def _landed(hits: list[_Hit], target: _Named) -> "SparseDelta":
        """The delta as it lands on ``target`` (:meth:`_resolve`'s ``hits``): entries merged where the
        target ties them, each under the target's canonical name for that tensor, with every other
        name (the target's and the delta's) as aliases."""
        entries, aliases = {}, {}
        for h in hits:
            names = [target.canonical[h.tensors[0][0]]]
            for m, _ in h.tensors:
                names += target.members[target.canonical[m]]
            names = list(dict.fromkeys(names + list(h.names)))
            entries[names[0]] = h.entry
            if len(names) > 1:
                aliases[names[0]] = tuple(names[1:])
        return SparseDelta(entries, aliases)

    def apply(self, model: TensorsLike, check: bool = True) -> None:
        """Write the NEW values into ``model`` (a module, or a mapping name → tensor), in place.

        Each entry is written into every distinct tensor the model holds under its name or an
        alias: once for a tied model, into each copy for an untied one.

        Args:
            check: first verify that the model holds the OLD values at every recorded coordinate
                (bit for bit), in every tensor written.

        Raises:
            ValueError if a name (and every alias) is missing, a shape or dtype differs, two
            entries land on one tensor with conflicting values, or (``check``) the current values
            are not OLD. Every check runs before anything is written; a failure while writing
            restores the values already written.
        """
        hits = self._validate(_Named(model, "model"), "old", check)
        _write_hits(hits, "new")

    def revert(self, model: TensorsLike, check: bool = True) -> None:
        """Write the OLD values back (bit-exact); ``check`` verifies the model holds NEW first.
        Same errors, aliases and atomicity as :meth:`apply`."""
        hits = self._validate(_Named(model, "model"), "new", check)
        _write_hits(hits, "old")

    def patched_state_dict(self, model: nn.Module, check: bool = True) -> dict[str, Tensor]:
        """A copy of ``model.state_dict()`` with this delta applied; the model is not modified.

        Every key of the state dict is an independent tensor, and every key of a changed tensor is
        patched: each alias of a tied weight (the model's own, found by memory, and the delta's
        :attr:`aliases`). So ``load_state_dict`` of the result keeps the change in a tied model
        (whichever alias it copies last) and in an untied one (every copy carries it).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        target = _Named(model.state_dict(), "model.state_dict()")  # the model's aliases, by memory
        target.tensors = {k: v.detach().clone() for k, v in target.tensors.items()}  # then independent copies
        hits = self._validate(target, "old", check)
        _write_hits(hits, "new")
        return target.tensors

    def dense(self, model: TensorsLike | None = None) -> dict[str, Tensor]:
        """``{name: NEW − OLD as a dense tensor of the parameter's shape, zero elsewhere}``, one per
        entry (under its canonical name; see :attr:`aliases` for the others).

        float64 parameters give float64, every other dtype float32. With ``model``, the shapes and
        dtypes are checked against it (found under any alias) and the tensors are placed on its
        tensors' devices.
        """
        devices: dict[str, torch.device] = {}
        if model is not None:
            for h in self._validate(_Named(model, "model"), "old", check=False):
                for m in h.names:
                    devices[m] = h.tensors[0][1].device
        out = {}
        for n, e in self._entries.items():
            dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
            device = devices.get(n, e.indices.device)
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
            params.append({"name": n, "shape": list(e.shape), "dtype": _DTYPE_NAMES[e.dtype],
                           "aliases": list(self._aliases.get(n, ()))})
        return tensors, {"params": params}

    @classmethod
    def _from_tensors_and_meta(cls, tensors: Mapping[str, Tensor], meta: dict, prefix: str, where: str) -> "SparseDelta":
        try:
            params = meta["params"]
            entries, aliases = {}, {}
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
                names = p.get("aliases", [])  # absent in files of fastedit before aliases were recorded
                if not isinstance(names, list):
                    raise ValueError(f"{name}: aliases must be a list, got {names!r}")
                if names:
                    aliases[name] = names
            delta = cls(entries, aliases)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is not a valid fastedit SparseDelta: {exc}") from None
        return delta

    def save(self, path) -> None:
        """Save to one safetensors file (bit-exact; metadata: format, version, names, aliases,
        shapes, dtypes, and a SHA-256 digest of all of it that :meth:`load` verifies)."""
        save_file = require("safetensors.torch", "saving a SparseDelta").save_file

        tensors, meta = self._tensors_and_meta()
        header = json.dumps(meta)
        save_file(tensors, str(path), metadata={"format": FORMAT, "version": VERSION, "delta": header,
                                                "sha256": _digest(tensors, header)})

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu") -> "SparseDelta":
        """Load a file written by :meth:`save`.

        The file's SHA-256 digest (over its tensors and its ``delta`` metadata) is verified: a
        file changed after it was saved (a flipped byte, a truncated or edited copy) is rejected.
        Files saved by fastedit before digests were stored have none; they still load, with the
        structural checks only (sorted, unique, in-range indices, consistent lengths and dtypes),
        and without a warning. Save such a file again to add a digest.

        Raises:
            ValueError for a file that is not a safetensors file, not a fastedit SparseDelta
            (another format, another version), is damaged (digest mismatch) or is inconsistent;
            FileNotFoundError if missing.
        """
        tensors, metadata = _read_safetensors(path)
        _check_format(metadata, FORMAT, path)
        _check_digest(tensors, metadata, "delta", path)
        meta = _parse_json(metadata, "delta", path)
        delta = cls._from_tensors_and_meta(tensors, meta, "", f"{path}")
        return delta.to(device) if str(device) != "cpu" else delta


def _digest(tensors: Mapping[str, Tensor], header: str) -> str:
    """SHA-256 (hex) over ``header`` (the JSON metadata describing the tensors), then every tensor
    in sorted-name order: its name, dtype and shape, then its raw bytes (little-endian, as saved).
    Each piece is preceded by its length, so no two different contents hash alike by shifting."""
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(header.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        put(json.dumps([k, _DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape)]).encode())
        put(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_digest(tensors: Mapping[str, Tensor], metadata: dict, key: str, path) -> None:
    """``ValueError`` unless the digest stored in ``metadata`` matches; nothing to check if none is
    stored (files of earlier versions)."""
    want = metadata.get("sha256")
    if want is None:
        return
    if _digest(tensors, str(metadata.get(key, ""))) != want:
        raise ValueError(f"{path} is damaged: its contents do not match the SHA-256 digest stored in it (the file "
                         f"changed after it was saved, e.g. a corrupted copy); use an intact copy or save it again "
                         f"from its source")


def _read_safetensors(path) -> tuple[dict[str, Tensor], dict]:
    safe_open = require("safetensors", "reading a saved SparseDelta or EditJournal").safe_open

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
