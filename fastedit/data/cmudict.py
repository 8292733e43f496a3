"""CMUdict, the Carnegie Mellon Pronouncing Dictionary, from a local ``cmudict.dict``.

:func:`read_cmudict` parses the file (``word PH1 PH2 ...``, ARPAbet with stress digits, alternates as
``word(2)``, comments after ``#``). :func:`load_cmudict` returns one split ``(words, pronunciations)``
of a fixed, seeded partition of the words (80 / 10 / 10 % by default), each word with its **first**
pronunciation, stress kept. ``letters_only`` (default) keeps the words spelled with ``a``–``z`` only:
the alphabet of the g2p-en model (:mod:`fastedit.models.g2p`), which maps any other character to
``<unk>``. The file is looked for in ``data_dir/g2p/`` and in ``data_dir``; ``data_dir`` defaults to
``$FASTEDIT_DATA``.
"""
from __future__ import annotations

import os
import re

from .registry import _data_dir
from .text import _by_rows, _check

__all__ = ["read_cmudict", "load_cmudict"]

_ALTERNATE = re.compile(r"\(\d+\)$")
_LETTERS = re.compile(r"[a-z]+")


def read_cmudict(path: str | os.PathLike, first_only: bool = True) -> dict[str, list[str]]:
    """``{word: phonemes}`` from a ``cmudict.dict`` file (lines ``word PH1 PH2 ...``, stress digits kept).

    Text after ``#`` is a comment and blank lines are skipped. Alternate pronunciations are lines
    ``word(2) ...``: with ``first_only`` they are dropped, so each word maps to its first
    pronunciation; otherwise they are kept under their own keys (``"word(2)"``).
    """
    entries: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if not fields or (first_only and _ALTERNATE.search(fields[0])):
                continue
            entries.setdefault(fields[0], fields[1:])
    return entries


def load_cmudict(data_dir=None, split: str = "train", *, fractions=(0.8, 0.1, 0.1), seed: int = 0,
                 letters_only: bool = True) -> tuple[list[str], list[list[str]]]:
    """One seeded split of CMUdict's words with their first pronunciations (see the module docstring).

    ``split="all"`` returns every word, sorted. The partition permutes the sorted word list with
    ``seed``, so it does not depend on the file's line order.
    """
    d = _data_dir(data_dir)
    candidates = [d / "g2p" / "cmudict.dict", d / "cmudict.dict"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"cmudict.dict not found (looked at {', '.join(map(str, candidates))})")
    entries = read_cmudict(path)
    words = sorted(w for w, pron in entries.items() if pron and (not letters_only or _LETTERS.fullmatch(w)))
    if not words:
        raise ValueError(f"{path}: no {'a-z ' if letters_only else ''}words with a pronunciation")
    if split != "all":
        fr = _check(split, fractions)
        words = [words[i] for i in _by_rows(len(words), split, fr, seed)]
    return words, [entries[w] for w in words]
