"""Text corpora from local TSV files: Rotten Tomatoes snippets, SMS spam, TREC questions (classification)
and English–Spanish Bible verses (translation pairs).

The classification loaders return ``(texts, labels)``: a list of strings and ``torch.int64 [N]`` class
indices (the class names are in the module's ``*_CLASSES``); :func:`load_verse_pairs` returns
``(english, spanish)``, two aligned lists of strings. Each is one split of a fixed, seeded partition:
``"train"``, ``"validation"`` or ``"test"`` (80 / 10 / 10 % by default). The files are looked for in
``data_dir/text/`` and in ``data_dir`` itself; ``data_dir`` defaults to ``$FASTEDIT_DATA``.

- :func:`load_rotten_tomatoes`: columns ``label`` (``fresh``/``rotten``), ``movie``, ``text``; split
  **by movie**, so that no film's reviews are in two splits (a seeded permutation of the films,
  assigned in order until each split holds its share of the snippets). ``rotten`` = 0, ``fresh`` = 1.
- :func:`load_sms_spam`: ``label`` (``ham``/``spam``), ``text``; a seeded permutation of the messages.
- :func:`load_trec_questions`: ``coarse``, ``fine``, ``question``; the 6 coarse classes; seeded.
- :func:`load_verse_pairs`: ``bible_en_es.tsv.gz`` (gzip or plain), ``verse_index``, ``en_kjv``,
  ``es_rv1909``; a seeded permutation of the verses.
"""
from __future__ import annotations

import csv
import gzip
import math

import torch

from .registry import _data_dir

ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")
SMS_SPAM_CLASSES = ("ham", "spam")
TREC_COARSE_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SPLITS = ("train", "validation", "test")

__all__ = ["load_rotten_tomatoes", "load_sms_spam", "load_trec_questions", "load_verse_pairs",
           "ROTTEN_TOMATOES_CLASSES", "SMS_SPAM_CLASSES", "TREC_COARSE_CLASSES"]


def _read(name: str, data_dir, required: tuple[str, ...]) -> list[dict]:
    d = _data_dir(data_dir)
    candidates = [d / "text" / name, d / name]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{name} not found (looked at {', '.join(map(str, candidates))})")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(required)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _check(split: str, fractions) -> tuple[float, float, float]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative shares of train/validation/test summing to 1, "
                         f"got {fractions!r}")
    return fr


def _labels(rows: list[dict], column: str, classes: tuple[str, ...], path_name: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    bad = next((r[column] for r in rows if r[column] not in index), None)
    if bad is not None:
        raise ValueError(f"{path_name}: unknown {column} {bad!r}; expected one of {list(classes)}")
    return torch.tensor([index[r[column]] for r in rows], dtype=torch.int64)


def _by_rows(n: int, split: str, fractions, seed: int) -> list[int]:
    """The row indices of ``split`` in a seeded permutation of ``n`` rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    return sorted({"train": order[:a], "validation": order[a:b], "test": order[b:]}[split])


def load_rotten_tomatoes(data_dir=None, split: str = "train", *, fractions=(0.8, 0.1, 0.1), seed: int = 0):
    """Rotten Tomatoes critic snippets, split by movie (see the module docstring)."""
    fr = _check(split, fractions)
    rows = _read("rotten_tomatoes.tsv", data_dir, ("label", "movie", "text"))
    labels = _labels(rows, "label", ROTTEN_TOMATOES_CLASSES, "rotten_tomatoes.tsv")
    movies = sorted({r["movie"] for r in rows})
    order = [movies[i] for i in torch.randperm(len(movies), generator=torch.Generator().manual_seed(seed))]
    per_movie: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        per_movie.setdefault(r["movie"], []).append(i)
    bounds = (fr[0] * len(rows), (fr[0] + fr[1]) * len(rows))
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    filled = 0
    for movie in order:  # films in a seeded order, each wholly in the split whose share is not yet full
        target = "train" if filled < bounds[0] else "validation" if filled < bounds[1] else "test"
        assigned[target].extend(per_movie[movie])
        filled += len(per_movie[movie])
    pick = sorted(assigned[split])
    return [rows[i]["text"] for i in pick], labels[pick]


def load_sms_spam(data_dir=None, split: str = "train", *, fractions=(0.8, 0.1, 0.1), seed: int = 0):
    """SMS messages, ham / spam, in a seeded partition (see the module docstring)."""
    fr = _check(split, fractions)
    rows = _read("sms_spam.tsv", data_dir, ("label", "text"))
    labels = _labels(rows, "label", SMS_SPAM_CLASSES, "sms_spam.tsv")
    pick = _by_rows(len(rows), split, fr, seed)
    return [rows[i]["text"] for i in pick], labels[pick]


def load_trec_questions(data_dir=None, split: str = "train", *, fractions=(0.8, 0.1, 0.1), seed: int = 0):
    """TREC questions with their 6 coarse classes, in a seeded partition (see the module docstring)."""
    fr = _check(split, fractions)
    rows = _read("trec_questions.tsv", data_dir, ("coarse", "fine", "question"))
    labels = _labels(rows, "coarse", TREC_COARSE_CLASSES, "trec_questions.tsv")
    pick = _by_rows(len(rows), split, fr, seed)
    return [rows[i]["question"] for i in pick], labels[pick]


def load_verse_pairs(data_dir=None, split: str = "train", *, fractions=(0.8, 0.1, 0.1), seed: int = 0,
                     file_name: str = "bible_en_es.tsv.gz"):
    """Aligned English (King James) – Spanish (Reina-Valera 1909) verses ``(english, spanish)``, one split
    of a seeded permutation of the verses (see the module docstring). Rows with an empty side are dropped."""
    fr = _check(split, fractions)
    rows = _read(file_name, data_dir, ("verse_index", "en_kjv", "es_rv1909"))
    rows = [r for r in rows if r["en_kjv"].strip() and r["es_rv1909"].strip()]
    pick = _by_rows(len(rows), split, fr, seed)
    return [rows[i]["en_kjv"] for i in pick], [rows[i]["es_rv1909"] for i in pick]
