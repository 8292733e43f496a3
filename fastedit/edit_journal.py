"""An ordered log of sparse deltas applied to one model, any entry of which can be rolled back:
:class:`EditJournal` (see :meth:`EditJournal.rollback` for the exact semantics with overlapping
entries).

The deltas are :class:`~fastedit.sparse_delta.SparseDelta`; how they find their tensors in a model
(tied weights by memory), compare bits, write atomically and save with a SHA-256 digest is
:mod:`fastedit.sparse_delta`'s, and the journal uses those helpers from there. A journal saves to
one safetensors file of format :data:`JOURNAL_FORMAT`, verified by :meth:`EditJournal.load`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from ._optional import require
from .sparse_delta import (
    VERSION,
    SparseDelta,
    _check_digest,
    _check_format,
    _digest,
    _Entry,
    _flat_read,
    _flat_write,
    _Hit,
    _key_or_id,
    _Named,
    _parse_json,
    _read_safetensors,
    _write_hits,
    same_bits,
)

__all__ = ["EditJournal", "JournalEntry", "JOURNAL_FORMAT"]

JOURNAL_FORMAT = "fastedit.edit_journal"


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

    Tied weights: entries are resolved on the model's tensors by memory (see :class:`SparseDelta`),
    so deltas naming a tied tensor by any alias act on that one tensor, and overlap there. Each
    entry holds the delta as it lands on the model: entries of one tied tensor merged, under the
    model's canonical name for it, every other name of it (the model's, the delta's) as aliases.

    All journal operations are atomic: they verify bit for bit that the model still holds what the
    journal last wrote (else ``ValueError``), and restore every touched value if anything fails.
    """

    def __init__(self, model: nn.Module | Mapping[str, Tensor]):
        _Named(model, "model")  # type check now
        self.model = model
        self._entries: list[JournalEntry] = []
        self._next_id = 0

    @property
    def _target(self) -> _Named:
        # resolved on every use, so the journal follows the model's tensors (e.g. after .to())
        return _Named(self.model, "model")

    @property
    def entries(self) -> list[JournalEntry]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        items = ", ".join(f"{e.id}{'' if e.name is None else ':' + e.name} (nnz={e.delta.nnz})" for e in self._entries)
        return f"EditJournal([{items}])"

    @staticmethod
    def _rebased(delta: SparseDelta, target: _Named) -> tuple[SparseDelta, list[_Hit]]:
        """``delta`` as it lands on ``target``, with OLD read from it now, and where it writes."""
        hits = delta._validate(target, "old", check=False)
        out = []
        for h in hits:
            e = h.entry
            first_name, first = h.tensors[0]
            old = _flat_read(first, e.indices).clone()
            for m, t in h.tensors[1:]:
                if not bool(same_bits(_flat_read(t, e.indices), old.to(t.device)).all()):
                    raise ValueError(f"{first_name} and {m} are separate tensors in the model, holding different "
                                     f"values at the coordinates of {h.name}, which the delta treats as one "
                                     f"tensor (aliases); the journal cannot record one OLD value for both "
                                     f"(nothing was written)")
            out.append(_Hit(h.name, _Entry(e.indices, old.to(e.new.device), e.new, e.shape, e.dtype),
                            h.tensors, h.names))
        return SparseDelta._landed(out, target), out

    def apply(self, delta: SparseDelta, name: str | None = None, check: bool = False) -> int:
        """Apply ``delta`` and record it; returns the entry's id.

        Args:
            delta: a :class:`SparseDelta` for this model's parameters.
            name: an optional label.
            check: also require the model's current values to equal the delta's OLD values.
        """
        _check_entry_args(delta, name)
        target = self._target
        if check:
            delta._validate(target, "old", check=True)
        rebased, hits = self._rebased(delta, target)
        _write_hits(hits, "new")
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
        target = self._target
        hits = delta._validate(target, "new", check=True)
        entry = JournalEntry(self._next_id, name, SparseDelta._landed(hits, target))
        self._next_id += 1
        self._entries.append(entry)
        return entry.id

    def _position(self, entry_id: int) -> int:
        for i, e in enumerate(self._entries):
            if e.id == entry_id:
                return i
        raise KeyError(f"no journal entry with id {entry_id!r}; ids: {[e.id for e in self._entries]}")

    @staticmethod
    def _snapshot(entries: list[JournalEntry], target: _Named) -> list[tuple[Tensor, Tensor, Tensor]]:
        snap = []
        for e in entries:
            for h in e.delta._validate(target, "new", check=False):  # names, shapes, dtypes
                for _, t in h.tensors:
                    snap.append((t, h.entry.indices, _flat_read(t, h.entry.indices).clone()))
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
        target = self._target
        snap = self._snapshot(self._entries[pos:], target)
        try:
            for e in reversed(self._entries[pos:]):
                _write_hits(e.delta._validate(target, "new", check=True), "old")
            replayed = []
            for e in later:
                d, hits = self._rebased(e.delta, target)
                _write_hits(hits, "new")
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
        reverse order, on a copy of the touched tensors (tied ones copied once, still tied) passes
        every bit-exact check."""
        target = self._target
        touched = {_key_or_id(t) for e in self._entries for h in e.delta._validate(target, "new", check=False)
                   for _, t in h.tensors}
        clones: dict = {}
        copies: dict[str, Tensor] = {}
        for n, t in target.tensors.items():
            key = _key_or_id(t)
            if key in touched:
                if key not in clones:
                    clones[key] = t.detach().clone()
                copies[n] = clones[key]
        copy_target = _Named(copies, "model")
        for e in reversed(self._entries):
            _write_hits(e.delta._validate(copy_target, "new", check=True), "old")

    # -- files -------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Save every entry (ids, names, deltas as applied) to one safetensors file, with a SHA-256
        digest that :meth:`load` verifies."""
        save_file = require("safetensors.torch", "saving an EditJournal").save_file

        tensors, entries = {}, []
        for k, e in enumerate(self._entries):
            t, meta = e.delta._tensors_and_meta(prefix=f"e{k}.")
            tensors.update(t)
            entries.append({"id": e.id, "name": e.name, **meta})
        header = json.dumps({"entries": entries, "next_id": self._next_id})
        save_file(tensors, str(path), metadata={"format": JOURNAL_FORMAT, "version": VERSION, "journal": header,
                                                "sha256": _digest(tensors, header)})

    @classmethod
    def load(cls, path, model: nn.Module | Mapping[str, Tensor], check: bool = True) -> "EditJournal":
        """A journal read from ``path`` and attached to ``model``, which must already hold the
        journal's state (e.g. the same model object, or one restored from a checkpoint taken then).

        The file's SHA-256 digest is verified as in :meth:`SparseDelta.load` (files of earlier
        versions carry none and load with the structural checks only).

        Args:
            check: verify bit for bit that ``model`` holds that state (:meth:`verify`).

        Raises:
            ValueError for a foreign or damaged file, or a model not in the journal's state.
        """
        tensors, metadata = _read_safetensors(path)
        _check_format(metadata, JOURNAL_FORMAT, path)
        _check_digest(tensors, metadata, "journal", path)
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
        target = journal._target
        for e in journal._entries:
            e.delta._validate(target, "old", check=False)
        if check:
            journal.verify()
        return journal
