"""fastedit.evaluate and fastedit.tune on sequence models (a GRU encoder–decoder, a GPT-2 causal LM, BERT
classifiers, an LSTM and an nn.TransformerEncoder), each checked against a naive loop: copy the model, edit
the copy with fe.edit (no prefix, no early exit, keep partial edits), run full forwards of the copy on the
control set and count with plain torch ops. Every metric is compared (counts exactly, KL to rounding)."""
import copy
import csv
import json
import re
import sys
import warnings
from collections.abc import Mapping

import pytest
import torch
from helpers import assert_identical, snapshot
from seq_models import GRUSeq2Seq, TransformerClassifier, small_bert, small_gpt2
from torch import nn

import fastedit as fe

IGNORE = -100
SRC_VOCAB, TGT_VOCAB = 11, 9
COUNTS = ("errors", "flips", "correct_to_wrong", "wrong_to_correct")
TOKEN_METRICS = ["token_error", "drawdown", "sequence_error", "sequence_drawdown", "success_rate", "mean_steps",
                 "flip_rate", "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl"]

pytestmark = pytest.mark.usefixtures("one_thread")


def approx(value):
    return pytest.approx(value, rel=1e-12, abs=1e-12)


# --- models -------------------------------------------------------------------------------------

class LSTMClassifier(nn.Module):
    def __init__(self, vocab=13, hidden=8, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.lstm(self.emb(x))
        return self.head(y.mean(1))


def make_gru(seed=0):
    """The GRU encoder–decoder of these tests: width 12, a tanh projection before the readout, float64."""
    torch.manual_seed(seed)
    return GRUSeq2Seq(SRC_VOCAB, TGT_VOCAB, 12, proj=True).double().eval()


def make_bert(seed=0, num_labels=3):
    """The BERT classifier of these tests: width 16, initializer range 0.2, float64, eval mode."""
    return small_bert(vocab=50, hidden=16, intermediate=32, max_positions=16, dropout=0.1, seed=seed,
                      num_labels=num_labels, initializer_range=0.2).double().eval()


# --- data -----------------------------------------------------------------------------------------

def gru_edits(model, n=6, s=5, t=6, seed=2, keep=0.3):
    """``((src, dec_in), TokenTargets)``: random targets at one position of each row, and at others with
    probability ``keep``."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, SRC_VOCAB, (n, s), generator=g)
    dec = torch.randint(0, TGT_VOCAB, (n, t), generator=g)
    labels = torch.randint(0, TGT_VOCAB, (n, t), generator=g)
    keep = torch.rand(n, t, generator=g) < keep
    keep[torch.arange(n), torch.randint(0, t, (n,), generator=g)] = True
    labels[~keep] = IGNORE
    return (src, dec), fe.TokenTargets(labels)


def token_labels(pred, g, unlabelled, first_ignored=()):
    """The model's own predictions ``pred [N, T]`` with about a third replaced by random tokens (some
    right, some wrong), ragged lengths, and the rows ``unlabelled`` without any labelled token."""
    n, t = pred.shape
    labels = torch.where(torch.rand(n, t, generator=g) < 0.35, torch.randint(0, TGT_VOCAB, (n, t), generator=g), pred)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    labels[torch.arange(t) >= lengths[:, None]] = IGNORE
    for r in first_ignored:
        labels[r, 0] = IGNORE
    labels[list(unlabelled)] = IGNORE
    return labels


def gru_control(model, n=11, s=5, t=6, seed=1, unlabelled=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, SRC_VOCAB, (n, s), generator=g)
    dec = torch.randint(0, TGT_VOCAB, (n, t), generator=g)
    with torch.no_grad():
        pred = model(src, dec).argmax(-1)
    labels = token_labels(pred, g, unlabelled, first_ignored=(0, 5))
    if n > 1:
        labels[1] = pred[1]  # one fully labelled row the original model gets right
    return (src, dec), fe.TokenTargets(labels)


# --- the naive reference ------------------------------------------------------------------------

def rows_of(inputs, lo, hi):
    if isinstance(inputs, Mapping):
        return {k: v[lo:hi] for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(v[lo:hi] for v in inputs)
    return inputs[lo:hi]


def forward(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out["logits"]


def kl_rows(ref, new):
    """KL(softmax(ref) ‖ softmax(new)) over the last dimension."""
    lp, lq = ref.log_softmax(-1), new.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def naive_edit(model, inputs, target, editor, params, max_steps, reduction="max"):
    m = copy.deepcopy(model).eval()
    r = fe.edit(m, inputs, target, editor=editor, params=params, max_steps=max_steps, on_failure="keep",
                use_prefix=False, early_exit=False, reduction=reduction)
    assert not any(mod.training for mod in m.modules())
    return m, r


def naive_tokens(model, cases, control, editor, params, max_steps, reduction="max"):
    """Each ``(inputs, target)`` of ``cases`` applied to a copy; the token control measured by full forwards."""
    c_inputs, c_target = control
    labels, causal = c_target.labels, c_target.causal
    base = forward(model, c_inputs)
    z0, lab = (base[:, :-1], labels[:, 1:]) if causal else (base, labels)
    mask = lab != IGNORE
    y, ref = lab[mask], z0[mask]
    ref_pred = ref.argmax(-1)
    out = dict(n=labels.shape[0], tokens=int(mask.sum()), sequences=int(mask.any(-1).sum()),
               base_errors=int((ref_pred != y).sum()),
               base_sequence_errors=int(((z0.argmax(-1) != lab) & mask).any(-1).sum()), rows=[])
    for inputs, target in cases:
        m, r = naive_edit(model, inputs, target, editor, params, max_steps, reduction)
        z = forward(m, c_inputs)
        z = z[:, :-1] if causal else z
        pred = z[mask].argmax(-1)
        out["rows"].append(dict(
            success=r.success, steps=r.steps, errors=int((pred != y).sum()), flips=int((pred != ref_pred).sum()),
            correct_to_wrong=int(((ref_pred == y) & (pred != y)).sum()),
            wrong_to_correct=int(((ref_pred != y) & (pred == y)).sum()),
            kl=float(kl_rows(ref, z[mask]).mean()),
            sequence_errors=int(((z.argmax(-1) != lab) & mask).any(-1).sum())))
    return out


def naive_classes(model, cases, control, editor, params, max_steps, num_classes):
    x_c, y_c = control
    base = forward(model, x_c)
    ref_pred = base.argmax(-1)
    out = dict(n=y_c.shape[0], base_errors=int((ref_pred != y_c).sum()),
               base_per_class=torch.bincount(y_c[ref_pred != y_c], minlength=num_classes), rows=[])
    for inputs, target in cases:
        m, r = naive_edit(model, inputs, target, editor, params, max_steps)
        z = forward(m, x_c)
        pred = z.argmax(-1)
        out["rows"].append(dict(
            success=r.success, steps=r.steps, errors=int((pred != y_c).sum()), flips=int((pred != ref_pred).sum()),
            correct_to_wrong=int(((ref_pred == y_c) & (pred != y_c)).sum()),
            wrong_to_correct=int(((ref_pred != y_c) & (pred == y_c)).sum()),
            kl=float(kl_rows(base, z).mean()),
            errors_per_class=torch.bincount(y_c[pred != y_c], minlength=num_classes).tolist()))
    return out


def token_cases(edits):
    """The per-row edits of a batched ``(inputs, TokenTargets)``."""
    inputs, target = edits
    return [(rows_of(inputs, i, i + 1), fe.TokenTargets(target.labels[i:i + 1], causal=target.causal))
            for i in range(target.labels.shape[0])]


def assert_common(rep, ref, kl_rtol, kl_atol):
    pe, rows = rep.per_edit, ref["rows"]
    e = len(rows)
    assert rep.num_edits == e and rep.num_control == ref["n"]
    assert pe["success"].tolist() == [r["success"] for r in rows]
    assert pe["steps"].tolist() == [r["steps"] for r in rows]
    for k in COUNTS:
        assert pe[k].dtype == torch.int64 and pe[k].tolist() == [r[k] for r in rows], k
    kl = torch.tensor([r["kl"] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(pe["kl"].double(), kl, rtol=kl_rtol, atol=kl_atol)
    assert rep.mean_kl == pytest.approx(float(kl.mean()), rel=kl_rtol, abs=kl_atol)
    assert rep.success_rate == approx(sum(r["success"] for r in rows) / e)
    assert rep.mean_steps == approx(sum(r["steps"] for r in rows) / e)


def assert_token_report(rep, ref, kl_rtol=1e-6, kl_atol=1e-12):
    """``rep`` (a token control) equals the naive reference on every metric."""
    assert_common(rep, ref, kl_rtol, kl_atol)
    pe, rows = rep.per_edit, ref["rows"]
    m, n_seq = ref["tokens"], ref["sequences"]
    assert rep.control_kind == "tokens" and rep.metrics == TOKEN_METRICS
    assert rep.num_control_tokens == m
    assert pe["sequence_errors"].tolist() == [r["sequence_errors"] for r in rows]
    base = ref["base_errors"] / m
    assert rep.base_error == approx(base)
    assert rep.drawdown == approx(sum(r["errors"] / m - base for r in rows) / len(rows))
    assert rep.flip_rate == approx(sum(r["flips"] for r in rows) / len(rows) / m)
    assert rep.flip_rate_correct_to_wrong == approx(sum(r["correct_to_wrong"] for r in rows) / len(rows) / m)
    assert rep.flip_rate_wrong_to_correct == approx(sum(r["wrong_to_correct"] for r in rows) / len(rows) / m)
    base_seq = ref["base_sequence_errors"] / n_seq
    assert rep.sequence_base_error == approx(base_seq)
    assert rep.sequence_drawdown == approx(sum(r["sequence_errors"] / n_seq - base_seq for r in rows) / len(rows))
    assert "errors_per_class" not in pe and rep.per_class_drawdown.numel() == 0


def assert_class_report(rep, ref, edit_class, num_classes, kl_rtol=1e-6, kl_atol=1e-12):
    assert_common(rep, ref, kl_rtol, kl_atol)
    pe, rows, n = rep.per_edit, ref["rows"], ref["n"]
    assert rep.control_kind == "classification" and "per_class_drawdown" in rep.metrics
    assert rep.num_classes == num_classes and rep.num_control_tokens is None
    base = ref["base_errors"] / n
    assert rep.base_error == approx(base)
    assert rep.drawdown == approx(sum(r["errors"] / n - base for r in rows) / len(rows))
    assert rep.flip_rate == approx(sum(r["flips"] for r in rows) / len(rows) / n)
    assert pe["errors_per_class"].tolist() == [r["errors_per_class"] for r in rows]
    assert pe["edit_class"].tolist() == edit_class.tolist()
    return pe


def naive_per_class(ref, y_c, edit_class, num_classes):
    """The [C, C] per-class drawdown matrix from the naive per-class errors."""
    n_c = torch.bincount(y_c, minlength=num_classes).double()
    base = ref["base_per_class"].double() / n_c
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for r, cls in zip(ref["rows"], edit_class.tolist()):
        sums[cls] += torch.tensor(r["errors_per_class"], dtype=torch.float64) / n_c - base
        counts[cls] += 1
    return sums / counts.unsqueeze(1)


def modes(model):
    return [m.training for m in model.modules()]


def assert_untouched(model, snap, flags):
    assert_identical(model, snap)
    assert modes(model) == flags


def changed_something(rep):
    """The comparison covers edits that moved the parameters and changed control predictions."""
    assert int(rep.per_edit["steps"].max()) > 0 and int(rep.per_edit["flips"].max()) > 0


# --- 1. GRU encoder–decoder, token control ------------------------------------------------------

@pytest.mark.parametrize("batch_size", [None, 4])
def test_gru_token_control_equals_naive_loop(batch_size, tmp_path):
    model = make_gru()
    model.train()
    model.encoder.eval()  # a mixed pattern of modes, restored afterwards
    snap, flags = snapshot(model), modes(model)
    edits = gru_edits(model)
    control = gru_control(model)
    editor = fe.GD(0.5)
    rep = fe.evaluate(model, edits, control, editor=editor, params=["decoder", "proj"], max_steps=5,
                      batch_size=batch_size, progress=False)
    assert_untouched(model, snap, flags)
    ref = naive_tokens(model.eval(), token_cases(edits), control, editor, ["decoder", "proj"], 5)
    assert_token_report(rep, ref)
    changed_something(rep)
    assert 0 < rep.success_rate < 1 and ref["sequences"] < ref["n"] == 11
    assert rep.prefix_used and rep.prefix_method == "fx"

    d = rep.to_dict(per_edit=True)
    for k in ("base_error", "drawdown", "sequence_base_error", "sequence_drawdown", "flip_rate",
              "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl", "success_rate",
              "mean_steps", "num_control", "num_control_tokens", "num_edits"):
        assert d[k] == getattr(rep, k), k
    assert d["control_kind"] == "tokens" and d["metrics"] == TOKEN_METRICS
    assert d["per_edit"]["sequence_errors"] == rep.per_edit["sequence_errors"].tolist()
    assert d["per_edit"]["errors"] == rep.per_edit["errors"].tolist()

    def no_constant(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    text = (tmp_path / "r.json").read_text() if rep.to_json(tmp_path / "r.json") else ""
    j = json.loads(text, parse_constant=no_constant)
    for k in ("base_error", "drawdown", "sequence_base_error", "sequence_drawdown", "flip_rate", "mean_kl",
              "num_control", "num_control_tokens"):
        assert j[k] == pytest.approx(getattr(rep, k), rel=1e-15, abs=0), k
    assert j["control_kind"] == "tokens" and j["metrics"] == TOKEN_METRICS
    assert j["per_edit"]["sequence_errors"] == [r["sequence_errors"] for r in ref["rows"]]

    rep.to_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert "sequence_errors" in reader.fieldnames
        rows = list(reader)
    assert len(rows) == len(ref["rows"])
    for k in (*COUNTS, "steps", "sequence_errors"):
        assert [int(r[k]) for r in rows] == [x[k] for x in ref["rows"]], k
    assert [int(r["success"]) for r in rows] == [int(x["success"]) for x in ref["rows"]]
    assert [float(r["kl"]) for r in rows] == pytest.approx([x["kl"] for x in ref["rows"]], rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_token_control_chunk_without_labelled_tokens(batch_size):
    """A control chunk whose rows have no labelled token (rows 2 and 3 here) adds nothing: results
    do not depend on the chunk size."""
    model = make_gru()
    snap, flags = snapshot(model), modes(model)
    edits = gru_edits(model, n=4, keep=0.0)
    control = gru_control(model, n=8, unlabelled=(2, 3))
    whole = fe.evaluate(model, edits, control, editor=fe.GD(0.5), params="proj", max_steps=5, progress=False)
    rep = fe.evaluate(model, edits, control, editor=fe.GD(0.5), params="proj", max_steps=5, progress=False,
                      batch_size=batch_size)
    assert_untouched(model, snap, flags)
    ref = naive_tokens(model, token_cases(edits), control, fe.GD(0.5), "proj", 5)
    assert_token_report(whole, ref)
    assert torch.isfinite(rep.per_edit["kl"]).all(), rep.per_edit["kl"]
    assert_token_report(rep, ref)


# --- 2. a causal LM (GPT-2), dict inputs ------------------------------------------------------------

def gpt2_data(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    e, n, t, v = 4, 9, 7, model.config.vocab_size
    ids = torch.randint(0, v, (e, t), generator=g)
    am = torch.ones(e, t, dtype=torch.int64)
    am[1, 5:] = 0
    labels = torch.full((e, t), IGNORE)
    labels[:, 4:] = torch.randint(0, v, (e, 3), generator=g)  # the next tokens after positions 3..5
    labels[am == 0] = IGNORE
    edits = ({"input_ids": ids, "attention_mask": am}, fe.TokenTargets(labels, causal=True))

    ids_c = torch.randint(0, v, (n, t), generator=g)
    am_c = torch.ones(n, t, dtype=torch.int64)
    for r, length in ((1, 4), (2, 1), (5, 3), (7, 6)):
        am_c[r, length:] = 0
    with torch.no_grad():
        pred = model(input_ids=ids_c, attention_mask=am_c).logits.argmax(-1)
    labels_c = torch.full((n, t), IGNORE)
    noisy = torch.where(torch.rand(n, t - 1, generator=g) < 0.3, torch.randint(0, v, (n, t - 1), generator=g),
                        pred[:, :-1])
    labels_c[:, 1:] = noisy  # mostly the model's own next-token predictions
    labels_c[am_c == 0] = IGNORE  # row 2 keeps only position 0, which the causal shift drops
    labels_c[4] = IGNORE
    control = ({"input_ids": ids_c, "attention_mask": am_c}, fe.TokenTargets(labels_c, causal=True))
    return edits, control


def test_gpt2_causal_token_control_equals_naive_loop():
    model = small_gpt2(vocab=40, positions=16, width=16, inner=32, dropout=0.1, initializer_range=0.2).double().eval()
    snap, flags = snapshot(model), modes(model)
    edits, control = gpt2_data(model)
    params = "transformer.h.1.mlp"
    editor = fe.GD(1.0)
    rep = fe.evaluate(model, edits, control, editor=editor, params=params, max_steps=4, progress=False)
    assert_untouched(model, snap, flags)
    assert rep.prefix_used and rep.prefix_method == "call-cache" and rep.prefix_reason is None
    assert all(n.startswith("transformer.h.1.mlp.") for n in rep.params)
    ref = naive_tokens(model, token_cases(edits), control, editor, params, 4)
    assert ref["n"] == 9 and ref["sequences"] == 7  # rows 2 (label only at position 0) and 4 do not count
    assert_token_report(rep, ref)
    changed_something(rep)


# --- 3. and 4. edits as a list of pairs: ragged, mixed constraints; SequenceRanking -----------------

class LastTokenMargin(fe.Constraint):
    """A user constraint: token ``a`` beats token ``b`` at the last position of every row by ``margin``."""

    def __init__(self, a, b, margin):
        self.a, self.b, self.margin = a, b, margin

    def per_sample(self, logits):
        return self.margin - (logits[:, -1, self.a] - logits[:, -1, self.b])


def ranking_rows(model, src, dec, g, k=3):
    """``k`` candidate rows per source: a random desired output first, then the model's greedy one and a
    noisy copy (ragged: the last candidate is shorter)."""
    with torch.no_grad():
        pred = model(src, dec).argmax(-1)
    desired = torch.randint(0, TGT_VOCAB, pred.shape, generator=g)
    noisy = torch.where(torch.rand(pred.shape, generator=g) < 0.5, desired, pred)
    noisy[:, -2:] = IGNORE
    labels = torch.stack([desired, pred, noisy], 1)[:, :k].reshape(-1, pred.shape[1])
    rep = lambda t: t.repeat_interleave(k, 0)  # noqa: E731
    return (rep(src), rep(dec)), labels


def mixed_pairs(model, seed=5):
    g = torch.Generator().manual_seed(seed)

    def seq(b, s, t):
        return (torch.randint(0, SRC_VOCAB, (b, s), generator=g), torch.randint(0, TGT_VOCAB, (b, t), generator=g))

    def targets(b, t, keep=0.5):
        lab = torch.randint(0, TGT_VOCAB, (b, t), generator=g)
        mask = torch.rand(b, t, generator=g) < keep
        mask[:, -1] = True
        return lab.masked_fill(~mask, IGNORE)

    src, dec = seq(1, 4, 6)
    rank_inputs, rank_labels = ranking_rows(model, src, dec, g)
    pairs = [
        (seq(1, 5, 3), fe.TokenTargets(targets(1, 3))),
        (rank_inputs, fe.SequenceRanking(rank_labels, 3)),
        (seq(2, 6, 5), lambda z: 0.5 + z[:, -1, 0] - z[:, -1, 3]),
        (seq(2, 3, 2), fe.TokenTargets(targets(2, 2))),
        (seq(1, 7, 4), LastTokenMargin(2, 5, 0.25)),
    ]
    return pairs


@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_ragged_pairs_with_mixed_constraints_equal_naive_loop(reduction):
    model = make_gru()
    snap, flags = snapshot(model), modes(model)
    pairs = mixed_pairs(model)
    control = gru_control(model)
    editor = fe.GD(0.5)
    rep = fe.evaluate(model, pairs, control, editor=editor, params=["decoder", "out"], max_steps=5,
                      reduction=reduction, progress=False)
    assert_untouched(model, snap, flags)
    ref = naive_tokens(model, pairs, control, editor, ["decoder", "out"], 5, reduction)
    assert_token_report(rep, ref)
    changed_something(rep)
    # ragged edits cannot run side by side: vmap falls back to the loop, with the same results
    with pytest.warns(UserWarning, match="vmap failed"):
        vm = fe.evaluate(model, pairs, control, editor=editor, params=["decoder", "out"], max_steps=5,
                         reduction=reduction, progress=False, strategy="vmap", edits_per_group=5)
    assert vm.strategy == "loop" and vm.strategy_fallback.startswith("vmap failed")
    assert_token_report(vm, ref)
    assert_untouched(model, snap, flags)


def test_sequence_ranking_pair_form_gives_one_edit_per_group():
    model = make_gru()
    snap, flags = snapshot(model), modes(model)
    g = torch.Generator().manual_seed(7)
    e = 4
    src = torch.randint(0, SRC_VOCAB, (e, 5), generator=g)
    dec = torch.randint(0, TGT_VOCAB, (e, 6), generator=g)
    inputs, labels = ranking_rows(model, src, dec, g)
    assert labels.shape == (3 * e, 6)
    edits = (inputs, fe.SequenceRanking(labels, 3))
    control = gru_control(model, seed=8)
    editor = fe.GD(0.5)
    rep = fe.evaluate(model, edits, control, editor=editor, params="proj", max_steps=5, progress=False)
    assert_untouched(model, snap, flags)
    assert rep.num_edits == e
    cases = [(rows_of(inputs, 3 * i, 3 * i + 3), fe.SequenceRanking(labels[3 * i:3 * i + 3], 3)) for i in range(e)]
    ref = naive_tokens(model, cases, control, editor, "proj", 5)
    assert_token_report(rep, ref)
    changed_something(rep)
    listed = fe.evaluate(model, cases, control, editor=editor, params="proj", max_steps=5, progress=False)
    for k in ("success", "steps", *COUNTS, "sequence_errors", "kl"):
        assert torch.equal(listed.per_edit[k], rep.per_edit[k]), k


# --- 5. classification control on a small HF BERT, tokenizer-like dict inputs -----------------------

def bert_inputs(g, n, t=7, vocab=50):
    from transformers import BatchEncoding
    ids = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    am = (torch.arange(t) < lengths[:, None]).to(torch.int64)
    ids = ids.masked_fill(am == 0, 0)
    return BatchEncoding({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": am})


def test_bert_classification_control_equals_naive_loop():
    model = make_bert()
    snap, flags = snapshot(model), modes(model)
    g = torch.Generator().manual_seed(11)
    x_e, x_c = bert_inputs(g, 6), bert_inputs(g, 24)
    y_c = torch.arange(24) % 3
    with torch.no_grad():
        y_e = (model(**x_e).logits.argmax(-1) + 1) % 3  # every edit needs steps
    edit_class = torch.tensor([0, 0, 1, 2, 2, 2])
    params = "bert.encoder.layer.1"
    editor = fe.GD(0.03)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=editor, params=params, max_steps=4, progress=False,
                      edit_labels=edit_class)
    assert_untouched(model, snap, flags)
    assert rep.prefix_used and rep.prefix_method == "call-cache"
    cases = [(rows_of(x_e, i, i + 1), y_e[i:i + 1]) for i in range(6)]
    ref = naive_classes(model, cases, (x_c, y_c), editor, params, 4, 3)
    assert_class_report(rep, ref, edit_class, 3)
    changed_something(rep)
    assert rep.per_class_drawdown.shape == (3, 3) and rep.edit_class_source == "labels"
    torch.testing.assert_close(rep.per_class_drawdown, naive_per_class(ref, y_c, edit_class, 3),
                               rtol=0, atol=1e-12)
    d = rep.to_dict()
    assert d["per_class_drawdown"] == rep.per_class_drawdown.tolist()


# --- 6. strategies on models vmap cannot batch -----------------------------------------------------

def lstm_setup():
    torch.manual_seed(0)
    model = LSTMClassifier().double().eval()
    g = torch.Generator().manual_seed(12)
    x_e, x_c = torch.randint(0, 13, (5, 6), generator=g), torch.randint(0, 13, (20, 6), generator=g)
    with torch.no_grad():
        y_e = (model(x_e).argmax(-1) + 1) % 4
    return model, "lstm", (x_e, y_e), (x_c, torch.randint(0, 4, (20,), generator=g)), fe.GD(0.5)


def transformer_setup():
    torch.manual_seed(0)
    model = TransformerClassifier(13, 8, 4, ff=16, layers=2, pool="sum").double().eval()  # sum over unpadded tokens
    g = torch.Generator().manual_seed(13)

    def inputs(n):
        lengths = torch.randint(2, 7, (n,), generator=g)
        lengths[0] = 6
        return torch.randint(0, 13, (n, 6), generator=g), torch.arange(6) >= lengths[:, None]

    x_e, x_c = inputs(5), inputs(20)
    with torch.no_grad():
        y_e = (model(*x_e).argmax(-1) + 1) % 4
    return model, "encoder.layers.1", (x_e, y_e), (x_c, torch.randint(0, 4, (20,), generator=g)), fe.GD(0.01)


def bert_setup():
    model = make_bert(num_labels=4)
    g = torch.Generator().manual_seed(14)
    x_e, x_c = bert_inputs(g, 5), bert_inputs(g, 12)
    with torch.no_grad():
        y_e = (model(**x_e).logits.argmax(-1) + 1) % 4
    return model, "bert.encoder.layer.1", (x_e, y_e), (x_c, torch.arange(12) % 4), fe.GD(0.03)


@pytest.mark.parametrize("setup", [lstm_setup, transformer_setup, bert_setup], ids=["lstm", "transformer", "bert"])
def test_vmap_and_measure_fall_back_on_models_vmap_cannot_batch(setup):
    model, params, edits, control, editor = setup()
    snap, flags = snapshot(model), modes(model)
    kw = dict(editor=editor, params=params, max_steps=4, progress=False)
    loop = fe.evaluate(model, edits, control, **kw)
    assert loop.strategy == "loop" and loop.strategy_fallback is None
    x_e, y_e = edits
    cases = [(rows_of(x_e, i, i + 1), y_e[i:i + 1]) for i in range(y_e.shape[0])]
    ref = naive_classes(model, cases, control, editor, params, 4, loop.num_classes)
    assert_class_report(loop, ref, loop.per_edit["edit_class"], loop.num_classes)
    changed_something(loop)
    for strategy in ("vmap", "measure"):
        with pytest.warns(UserWarning, match="vmap failed") as record:
            rep = fe.evaluate(model, edits, control, strategy=strategy, edits_per_group=2, **kw)
        assert_untouched(model, snap, flags)
        assert rep.strategy == "loop", strategy
        assert rep.strategy_fallback and rep.strategy_fallback.startswith("vmap failed, the loop ran instead: ")
        assert any(rep.strategy_fallback in str(w.message) for w in record)
        assert rep.edits_per_group == 2
        for k in ("success", "steps", *COUNTS, "kl", "errors_per_class", "edit_class", "loss"):
            assert torch.equal(rep.per_edit[k], loop.per_edit[k]), (strategy, k)
        assert rep.drawdown == loop.drawdown and rep.mean_kl == loop.mean_kl
        assert torch.equal(rep.per_class_drawdown.nan_to_num(-7.0), loop.per_class_drawdown.nan_to_num(-7.0))


@pytest.mark.parametrize("params", ["proj", "decoder"])
def test_vmap_on_gru_edits_reports_consistently(params):
    model = make_gru()
    snap, flags = snapshot(model), modes(model)
    edits, control = gru_edits(model, n=5), gru_control(model)
    kw = dict(editor=fe.GD(0.5), params=params, max_steps=5, progress=False)
    loop = fe.evaluate(model, edits, control, **kw)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        vm = fe.evaluate(model, edits, control, strategy="vmap", edits_per_group=5, **kw)
    assert_untouched(model, snap, flags)
    fallback_warnings = [w for w in record if "vmap failed" in str(w.message)]
    if vm.strategy == "vmap":
        assert vm.strategy_fallback is None and not fallback_warnings
        for k in ("success", "steps", *COUNTS, "sequence_errors"):
            assert torch.equal(vm.per_edit[k], loop.per_edit[k]), k
        torch.testing.assert_close(vm.per_edit["kl"], loop.per_edit["kl"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(vm.per_edit["loss"], loop.per_edit["loss"], rtol=1e-6, atol=1e-9)
    else:
        assert vm.strategy == "loop" and vm.strategy_fallback.startswith("vmap failed")
        assert len(fallback_warnings) == 1 and vm.strategy_fallback in str(fallback_warnings[0].message)
        for k in ("success", "steps", *COUNTS, "sequence_errors", "kl", "loss"):
            assert torch.equal(vm.per_edit[k], loop.per_edit[k]), k
    ref = naive_tokens(model, token_cases(edits), control, fe.GD(0.5), params, 5)
    assert_token_report(vm, ref, kl_rtol=1e-6)


# --- 8. fe.tune with a token control --------------------------------------------------------------

def test_tune_with_token_control_picks_lowest_feasible_drawdown():
    model = make_gru()
    snap, flags = snapshot(model), modes(model)
    edits, control = gru_edits(model, keep=0.0), gru_control(model)
    lrs = [0.03, 0.1, 0.3, 1.0, 3.0]
    res = fe.tune(model, edits, control, editor="gd", params=["decoder", "proj"], max_steps=5,
                  grid={"lr": lrs}, min_success=0.6, progress=False)
    assert_untouched(model, snap, flags)
    table = res.table
    assert [r["lr"] for r in table] == lrs
    ok = [r for r in table if r["success_rate"] >= 0.6]
    best = min(ok, key=lambda r: (r["drawdown"], -r["success_rate"], r["mean_steps"], r["lr"]))
    # the constraint matters: an infeasible point has a lower drawdown, and feasible ones a higher one
    assert min(r["drawdown"] for r in table if r not in ok) < best["drawdown"]
    assert any(r["drawdown"] > best["drawdown"] for r in ok)
    assert res.feasible and res.editor.lr == best["lr"] and res.min_success == 0.6
    assert res.report.drawdown == best["drawdown"] and res.report.success_rate == best["success_rate"]
    assert res.report.mean_steps == best["mean_steps"] and res.report.flip_rate == best["flip_rate"]
    assert res.report.control_kind == "tokens" and res.to_dict()["report"]["control_kind"] == "tokens"
    ref = naive_tokens(model, token_cases(edits), control, fe.GD(best["lr"]), ["decoder", "proj"], 5)
    assert_token_report(res.report, ref)


# --- 9. bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_raise_before_any_edit(monkeypatch):
    model = make_gru()
    snap, flags = snapshot(model), modes(model)
    ev = sys.modules["fastedit.evaluate"]  # the package's `evaluate` attribute is the function
    calls = []
    original = ev.run_edit_loop
    monkeypatch.setattr(ev, "run_edit_loop", lambda *a, **k: calls.append(1) or original(*a, **k))
    edits, ((src_c, dec_c), c_target) = gru_edits(model, n=4), gru_control(model)
    control = ((src_c, dec_c), c_target)
    kw = dict(editor=fe.GD(0.5), params="proj", max_steps=3, progress=False)

    with pytest.raises(TypeError, match="control labels"):
        fe.evaluate(model, edits, ((src_c[:10], dec_c[:10]), fe.SequenceRanking(c_target.labels[:10], 2)), **kw)
    wide = torch.cat([c_target.labels, torch.zeros(11, 1, dtype=torch.int64)], 1)
    with pytest.raises(ValueError, match="labels have shape"):
        fe.evaluate(model, edits, ((src_c, dec_c), fe.TokenTargets(wide)), **kw)
    with pytest.raises(ValueError, match="logits"):  # class labels for a sequence model
        fe.evaluate(model, edits, ((src_c, dec_c), torch.zeros(11, dtype=torch.int64)), **kw)
    with pytest.raises(TypeError, match="list of"):
        fe.evaluate(model, (edits[0], lambda z: z[:, -1, 0] - z[:, -1, 1]), control, **kw)

    (src, dec), target = edits
    labels = target.labels.clone()
    labels[2] = IGNORE
    with pytest.raises(ValueError, match="no labelled position"):
        fe.evaluate(model, ((src, dec), fe.TokenTargets(labels)), control, **kw)
    pairs = token_cases(edits)
    pairs[3] = (pairs[3][0], fe.TokenTargets(torch.full_like(pairs[3][1].labels, IGNORE)))
    with pytest.raises(ValueError, match="edit 3.*no labelled position"):
        fe.evaluate(model, pairs, control, **kw)
    only_first = torch.full_like(target.labels, IGNORE)
    only_first[:, 0] = 1  # labelled at position 0 only: nothing left after the causal shift
    only_first[0, 3] = 1
    with pytest.raises(ValueError, match="causal shift"):
        fe.evaluate(model, ((src, dec), fe.TokenTargets(only_first, causal=True)), control, **kw)
    assert calls == []
    assert_untouched(model, snap, flags)


def test_unlabelled_edit_is_named_by_its_index():
    """The message names the edit (row) that has no labelled position, not its row within a chunk."""
    model = make_gru()
    (src, dec), target = gru_edits(model, n=5)
    labels = target.labels.clone()
    labels[2] = IGNORE
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no labelled position") as info:
        fe.evaluate(model, ((src, dec), fe.TokenTargets(labels)), gru_control(model), editor=fe.GD(0.5),
                    params="proj", max_steps=3, progress=False)
    assert_identical(model, snap)
    msg = str(info.value)
    assert msg.startswith("edits") and re.search(r"\b(row|edit) 2\b", msg) and "row 1 " not in msg, msg


def test_token_control_without_any_labelled_token_is_a_value_error():
    model = make_gru()
    snap = snapshot(model)
    (src_c, dec_c), c_target = gru_control(model)
    nothing = fe.TokenTargets(torch.full_like(c_target.labels, IGNORE))
    with pytest.raises(ValueError, match="labelled"):
        fe.evaluate(model, gru_edits(model, n=2), ((src_c, dec_c), nothing), editor=fe.GD(0.5), params="proj",
                    max_steps=3, progress=False)
    assert_identical(model, snap)


# --- 10. the real MiniLM --------------------------------------------------------------------------

TEXTS = [
    "the film was a delight from start to finish", "a tedious and overlong mess", "i would watch it again",
    "the plot made no sense at all", "wonderful acting and a clever script", "boring", "an instant classic",
    "the soundtrack alone is worth the ticket", "i fell asleep halfway through", "sharp, funny and warm",
    "the dialogue is wooden and the pacing is slow", "a triumph", "not my cup of tea, but well made",
    "the worst sequel of the year", "charming characters in a thin story", "it never finds its footing",
    "a bold, ambitious and moving piece of cinema", "predictable", "great for the whole family",
    "the ending ruins everything that came before",
]


def test_minilm_equals_naive_loop(shared_models_dir):
    path = shared_models_dir / "all-MiniLM-L6-v2"
    if not path.is_dir():
        pytest.skip("all-MiniLM-L6-v2 not found")
    from transformers import BertForSequenceClassification, BertTokenizerFast
    tok = BertTokenizerFast.from_pretrained(path)
    torch.manual_seed(0)  # the classification head is new (random)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    snap, flags = snapshot(model), modes(model)
    x_e = tok(TEXTS[:4], padding=True, return_tensors="pt")
    x_c = tok(TEXTS[4:], padding=True, return_tensors="pt")
    with torch.no_grad():
        y_e = 1 - model(**x_e).logits.argmax(-1)
        y_c = model(**x_c).logits.argmax(-1)
    y_c[::3] = 1 - y_c[::3]  # some control samples wrong before any edit
    params = "bert.encoder.layer.5"
    editor = fe.GD(0.5)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=editor, params=params, max_steps=3, progress=False)
    assert_untouched(model, snap, flags)
    assert rep.prefix_used and rep.num_control == 16
    cases = [(rows_of(x_e, i, i + 1), y_e[i:i + 1]) for i in range(4)]
    ref = naive_classes(model, cases, (x_c, y_c), editor, params, 3, 2)
    assert_class_report(rep, ref, rep.per_edit["edit_class"], 2, kl_rtol=1e-3, kl_atol=1e-6)
    assert int(rep.per_edit["steps"].max()) > 0
