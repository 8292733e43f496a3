"""fastedit.data.text: the TSV corpora, their seeded splits (Rotten Tomatoes by movie), and errors."""
from __future__ import annotations

import csv

import pytest
import torch

from fastedit.data import (
    load_cmudict,
    load_rotten_tomatoes,
    load_sms_spam,
    load_trec_questions,
    load_verse_pairs,
    read_cmudict,
)

SPLITS = ("train", "validation", "test")


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "text").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for m in range(23):  # films with 1..9 snippets each
        for k in range(1 + m % 9):
            rows.append(("fresh" if torch.rand(1, generator=g) < 0.6 else "rotten", f"film_{m}", f"snippet {m}.{k} 'quoted'"))
    _write(tmp_path / "text" / "rotten_tomatoes.tsv", ("label", "movie", "text"), rows)
    _write(tmp_path / "text" / "sms_spam.tsv", ("label", "text"), [("spam" if i % 5 == 0 else "ham", f"msg {i}") for i in range(41)])
    _write(tmp_path / "trec_questions.tsv", ("coarse", "fine", "question"),
           [(("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")[i % 6], "x", f"q {i} ?") for i in range(30)])
    return tmp_path, rows


def test_rotten_tomatoes_splits_by_movie(corpus):
    d, rows = corpus
    parts = {s: load_rotten_tomatoes(d, s) for s in SPLITS}
    texts = [t for s in SPLITS for t in parts[s][0]]
    assert sorted(texts) == sorted(r[2] for r in rows)  # every snippet once
    film = {r[2]: r[1] for r in rows}
    films = {s: {film[t] for t in parts[s][0]} for s in SPLITS}
    assert not (films["train"] & films["validation"] or films["train"] & films["test"] or films["validation"] & films["test"])
    label = {r[2]: int(r[0] == "fresh") for r in rows}
    for s in SPLITS:
        assert parts[s][1].dtype == torch.int64 and parts[s][1].tolist() == [label[t] for t in parts[s][0]]
    n = len(rows)
    assert abs(len(parts["train"][0]) - 0.8 * n) <= 9  # within one film of its share
    again = load_rotten_tomatoes(d, "test")
    assert again[0] == parts["test"][0]  # fixed seed
    other = load_rotten_tomatoes(d, "test", seed=1)
    assert other[0] != parts["test"][0]


@pytest.mark.parametrize("loader, n", [(load_sms_spam, 41), (load_trec_questions, 30)])
def test_seeded_row_splits(corpus, loader, n):
    d, _ = corpus
    parts = {s: loader(d, s) for s in SPLITS}
    assert sum(len(p[0]) for p in parts.values()) == n and len({t for p in parts.values() for t in p[0]}) == n
    assert [len(parts[s][0]) for s in SPLITS] == [round(0.8 * n), round(0.1 * n), n - round(0.8 * n) - round(0.1 * n)]
    assert loader(d, "train", fractions=(0.5, 0.25, 0.25))[1].shape[0] == round(0.5 * n)


def test_labels_and_classes(corpus):
    d, _ = corpus
    texts, labels = load_sms_spam(d, "train", fractions=(1.0, 0.0, 0.0))
    assert [t for t, y in zip(texts, labels) if y == 1] == [f"msg {i}" for i in range(0, 41, 5)]
    _, y = load_trec_questions(d, "train", fractions=(1.0, 0.0, 0.0))
    assert y.tolist() == [i % 6 for i in range(30)]


def test_errors(corpus, tmp_path_factory, monkeypatch):
    d, _ = corpus
    with pytest.raises(ValueError, match="split must be one of"):
        load_sms_spam(d, "dev")
    with pytest.raises(ValueError, match="fractions"):
        load_sms_spam(d, "train", fractions=(0.9, 0.2, 0.0))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="rotten_tomatoes.tsv not found"):
        load_rotten_tomatoes(empty)
    _write(empty / "sms_spam.tsv", ("label", "text"), [("maybe", "hello")])
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        load_sms_spam(empty)
    _write(empty / "trec_questions.tsv", ("coarse", "question"), [("HUM", "who ?")])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['fine'\]"):
        load_trec_questions(empty)
    monkeypatch.setenv("FASTEDIT_DATA", str(d))
    assert load_sms_spam(split="test")[0] == load_sms_spam(d, "test")[0]


@pytest.mark.real_data
def test_real_corpora(shared_data_dir):
    parts = {s: load_rotten_tomatoes(shared_data_dir, s) for s in SPLITS}
    assert sum(len(p[0]) for p in parts.values()) == 12808
    assert int(sum(int(p[1].sum()) for p in parts.values())) == 7403  # fresh
    assert sum(len(load_sms_spam(shared_data_dir, s)[0]) for s in SPLITS) == 4837
    assert sum(len(load_trec_questions(shared_data_dir, s)[0]) for s in SPLITS) == 5381


def test_verse_pairs(tmp_path):
    import gzip
    (tmp_path / "text").mkdir()
    rows = [(str(2 * i), f"In the beginning {i}.", f"En el principio {i}.") for i in range(37)] + [("99", "", "vacío")]
    with gzip.open(tmp_path / "text" / "bible_en_es.tsv.gz", "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(("verse_index", "en_kjv", "es_rv1909"))
        w.writerows(rows)
    parts = {s: load_verse_pairs(tmp_path, s) for s in SPLITS}
    assert [len(parts[s][0]) for s in SPLITS] == [30, 4, 3]  # the empty-English row is dropped
    for en, es in parts.values():
        assert len(en) == len(es) and all(e.split()[-1] == s.split()[-1] for e, s in zip(en, es))  # aligned
    assert sorted(e for p in parts.values() for e in p[0]) == sorted(r[1] for r in rows[:-1])
    assert load_verse_pairs(tmp_path, "test") == parts["test"] and load_verse_pairs(tmp_path, "test", seed=3) != parts["test"]


def test_read_cmudict(tmp_path):
    path = tmp_path / "mini.dict"
    path.write_text("a AH0\na(2) EY1\n\naalborg AO1 L B AO0 R G # place, danish\n'bout B AW1 T\n")
    assert read_cmudict(path) == {"a": ["AH0"], "aalborg": "AO1 L B AO0 R G".split(), "'bout": ["B", "AW1", "T"]}
    assert read_cmudict(path, first_only=False)["a(2)"] == ["EY1"]


def test_load_cmudict_splits(tmp_path):
    (tmp_path / "g2p").mkdir()
    words = [f"w{'abcdefghij'[i % 10]}{'xyz'[i % 3]}{i}" for i in range(50)]  # digits: not letters-only
    lines = [f"{''.join(c for c in w if c.isalpha())}{'q' * (i // 30)} K AE1 T" for i, w in enumerate(words)]
    lines += ["cat K AE1 T", "cat(2) K AA1 T", "o'clock AH0 K L AA1 K", "nopron"]
    (tmp_path / "g2p" / "cmudict.dict").write_text("\n".join(lines) + "\n")
    every, prons = load_cmudict(tmp_path, "all")
    assert every == sorted(every) and "cat" in every and "o'clock" not in every and "nopron" not in every
    assert prons[every.index("cat")] == ["K", "AE1", "T"]  # the first pronunciation
    assert "o'clock" in load_cmudict(tmp_path, "all", letters_only=False)[0]
    parts = {s: load_cmudict(tmp_path, s) for s in SPLITS}
    assert sorted(w for p in parts.values() for w in p[0]) == every
    assert [len(parts[s][0]) for s in SPLITS] == [round(0.8 * len(every)), round(0.1 * len(every)),
                                                 len(every) - round(0.8 * len(every)) - round(0.1 * len(every))]
    assert load_cmudict(tmp_path, "validation") == parts["validation"]
    with pytest.raises(FileNotFoundError, match="cmudict.dict"):
        load_cmudict(tmp_path / "g2p" / "nothing")
    with pytest.raises(ValueError, match="split"):
        load_cmudict(tmp_path, "dev")
