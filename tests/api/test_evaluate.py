"""fastedit.evaluate against a naive loop: copy the model, edit it, classify the control set."""
import copy

import pytest
import torch
from helpers import assert_identical, make_model, snapshot

import fastedit as fe


def naive_evaluate(model, x_e, y_e, x_c, y_c, editor, params, max_steps):
    with torch.no_grad():
        base_logits = model(x_c)
    base_pred = base_logits.argmax(-1)
    rows = []
    for i in range(x_e.shape[0]):
        m = copy.deepcopy(model)
        r = fe.edit(m, x_e[i:i + 1], y_e[i:i + 1], editor=editor, params=params, max_steps=max_steps,
                    on_failure="keep", use_prefix=False, early_exit=False)
        with torch.no_grad():
            logits = m(x_c)
        pred = logits.argmax(-1)
        kl = (base_logits.log_softmax(-1).exp() * (base_logits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()
        rows.append(dict(success=r.success, steps=r.steps, errors=int((pred != y_c).sum()),
                         flips=int((pred != base_pred).sum()),
                         c2w=int(((base_pred == y_c) & (pred != y_c)).sum()),
                         w2c=int(((base_pred != y_c) & (pred == y_c)).sum()), kl=float(kl)))
    return float((base_pred != y_c).double().mean()), rows


@pytest.mark.parametrize("editor", [fe.GD(0.3), fe.RMSProp(0.01), fe.Adam(0.01), fe.ScaledGD(0.5)], ids=lambda e: e.name)
@pytest.mark.parametrize("batch_size", [7, 256])
def test_evaluate_equals_naive_loop(editor, batch_size):
    model = make_model()
    torch.manual_seed(1)
    x_e, y_e = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    x_c, y_c = torch.randn(41, 1, 8, 8), torch.randint(0, 10, (41,))
    before = snapshot(model)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=editor, params="block", max_steps=5,
                      batch_size=batch_size, progress=False)
    assert_identical(model, before)
    base_error, rows = naive_evaluate(model, x_e, y_e, x_c, y_c, editor, "block", 5)
    pe = rep.per_edit
    assert rep.base_error == pytest.approx(base_error)
    assert pe["success"].tolist() == [r["success"] for r in rows]
    assert pe["steps"].tolist() == [r["steps"] for r in rows]
    assert pe["errors"].tolist() == [r["errors"] for r in rows]
    assert pe["flips"].tolist() == [r["flips"] for r in rows]
    assert pe["correct_to_wrong"].tolist() == [r["c2w"] for r in rows]
    assert pe["wrong_to_correct"].tolist() == [r["w2c"] for r in rows]
    torch.testing.assert_close(pe["kl"].double(), torch.tensor([r["kl"] for r in rows], dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    errs = torch.tensor([r["errors"] for r in rows], dtype=torch.float64) / 41
    assert rep.drawdown == pytest.approx(float((errs - base_error).mean()))
    assert rep.success_rate == pytest.approx(sum(r["success"] for r in rows) / 6)
    assert rep.mean_steps == pytest.approx(sum(r["steps"] for r in rows) / 6)
    assert rep.flip_rate == pytest.approx(sum(r["flips"] for r in rows) / 6 / 41)
    d = rep.to_dict(per_edit=True)
    assert d["num_edits"] == 6 and len(d["per_edit"]["steps"]) == 6 and d["editor"]["editor"] == editor.name


def test_evaluate_bad_input_leaves_model_identical():
    model = make_model()
    before = snapshot(model)
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        fe.evaluate(model, (x, torch.tensor([1, 2, 10])), (x, torch.tensor([0, 1, 2])), params="out", progress=False)
    with pytest.raises(TypeError, match="pair"):
        fe.evaluate(model, x, (x, torch.tensor([0, 1, 2])), params="out", progress=False)
    assert_identical(model, before)


# --- per-class drawdown (paper Figure 2), KL vectors, reports -------------------------------------

def _setup(n_e=12, n_c=60, seed=1):
    model = make_model()
    torch.manual_seed(seed)
    x_e, y_e = torch.randn(n_e, 1, 8, 8), torch.randint(0, 10, (n_e,))
    x_c = torch.randn(n_c, 1, 8, 8)
    y_c = torch.arange(n_c) % 10  # every class occurs in the control set
    y_c = y_c[torch.randperm(n_c)]
    return model, x_e, y_e, x_c, y_c


def naive_per_class(model, x_e, y_e, x_c, y_c, edit_cls, editor, params, max_steps, C=10):
    """[E, C] errors per control class, and the [C, C] matrix, by copying and editing the model."""
    with torch.no_grad():
        base_pred = model(x_c).argmax(-1)
    n_c = torch.bincount(y_c, minlength=C).double()
    base_rate = torch.bincount(y_c[base_pred != y_c], minlength=C).double() / n_c
    epc, sums, counts = [], torch.zeros(C, C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for i in range(x_e.shape[0]):
        m = copy.deepcopy(model)
        fe.edit(m, x_e[i:i + 1], y_e[i:i + 1], editor=editor, params=params, max_steps=max_steps,
                on_failure="keep", use_prefix=False, early_exit=False)
        with torch.no_grad():
            pred = m(x_c).argmax(-1)
        errs = torch.bincount(y_c[pred != y_c], minlength=C)
        epc.append(errs)
        r = int(edit_cls[i])
        sums[r] += errs.double() / n_c - base_rate
        counts[r] += 1
    return torch.stack(epc), sums / counts.unsqueeze(1)


@pytest.mark.parametrize("use_labels", [True, False])
def test_per_class_drawdown_equals_naive(use_labels):
    model, x_e, y_e, x_c, y_c = _setup()
    true_cls = torch.tensor([0, 0, 3, 3, 3, 5, 7, 7, 1, 1, 9, 9])  # classes 2, 4, 6, 8 have no edit
    editor = fe.GD(0.3)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=editor, params="block", max_steps=5,
                      progress=False, edit_labels=true_cls if use_labels else None)
    with torch.no_grad():
        pred_cls = model(x_e).argmax(-1)
    edit_cls = true_cls if use_labels else pred_cls
    assert rep.edit_class_source == ("labels" if use_labels else "predictions")
    assert rep.num_classes == 10
    assert rep.per_edit["edit_class"].tolist() == edit_cls.tolist()
    epc, mat = naive_per_class(model, x_e, y_e, x_c, y_c, edit_cls, editor, "block", 5)
    assert rep.per_edit["errors_per_class"].dtype == torch.int64
    assert rep.per_edit["errors_per_class"].shape == (12, 10)
    assert rep.per_edit["errors_per_class"].tolist() == epc.tolist()
    assert rep.per_edit["errors_per_class"].sum(1).tolist() == rep.per_edit["errors"].tolist()
    M = rep.per_class_drawdown
    assert M.dtype == torch.float64 and M.shape == (10, 10)
    torch.testing.assert_close(M, mat, equal_nan=True)
    empty = torch.bincount(edit_cls, minlength=10) == 0
    assert empty.any() or not use_labels
    assert torch.isnan(M[empty]).all() and torch.isfinite(M[~empty]).all()
    if use_labels:
        assert torch.isnan(M[[2, 4, 6, 8]]).all()


def test_per_class_identity_with_drawdown():
    model, x_e, y_e, x_c, y_c = _setup(n_e=10, n_c=53, seed=3)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=fe.RMSProp(0.05), params="block", max_steps=5,
                      progress=False, edit_labels=torch.randint(0, 10, (10,)))
    edit_counts = torch.bincount(rep.per_edit["edit_class"], minlength=10).double()
    freq = torch.bincount(y_c, minlength=10).double() / y_c.shape[0]
    rows = rep.per_class_drawdown.nan_to_num(0.0) @ freq  # NaN rows have weight 0
    identity = float((edit_counts * rows).sum() / edit_counts.sum())
    assert identity == pytest.approx(rep.drawdown, abs=1e-12)
    assert rep.drawdown != 0.0


def test_kl_vectors_row_means():
    model, x_e, y_e, x_c, y_c = _setup(n_e=5, n_c=37)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=fe.GD(0.3), params="block", max_steps=5,
                      batch_size=7, progress=False, keep_kl_vectors=True)
    kv = rep.per_edit["kl_vector"]
    assert kv.shape == (5, 37) and kv.dtype == torch.float32
    torch.testing.assert_close(kv.mean(1), rep.per_edit["kl"].float(), rtol=0, atol=1e-5)
    assert (kv > -1e-6).all()
    off = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=fe.GD(0.3), params="block", max_steps=5, progress=False)
    assert "kl_vector" not in off.per_edit


def test_results_independent_of_batch_size():
    model, x_e, y_e, x_c, y_c = _setup(n_e=6, n_c=45)
    reps = [fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=fe.RMSProp(0.05), params="block", max_steps=5,
                        batch_size=bs, progress=False, keep_kl_vectors=True) for bs in (7, 256)]
    a, b = reps
    torch.testing.assert_close(a.per_class_drawdown, b.per_class_drawdown, equal_nan=True, rtol=0, atol=1e-12)
    for k in ("errors", "flips", "correct_to_wrong", "wrong_to_correct", "steps", "success",
              "errors_per_class", "edit_class"):
        assert a.per_edit[k].tolist() == b.per_edit[k].tolist(), k
    torch.testing.assert_close(a.per_edit["kl_vector"], b.per_edit["kl_vector"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.per_edit["kl"], b.per_edit["kl"], rtol=1e-5, atol=1e-6)
    assert a.drawdown == pytest.approx(b.drawdown) and a.flip_rate == pytest.approx(b.flip_rate)


def test_edit_labels_validated():
    model, x_e, y_e, x_c, y_c = _setup(n_e=3, n_c=10)
    with pytest.raises(ValueError, match="out of range"):
        fe.evaluate(model, (x_e, y_e), (x_c, y_c), params="out", progress=False, edit_labels=torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="one label per sample"):
        fe.evaluate(model, (x_e, y_e), (x_c, y_c), params="out", progress=False, edit_labels=torch.tensor([0, 1]))


def test_to_json_and_csv_round_trip(tmp_path):
    import csv
    import json
    import math
    model, x_e, y_e, x_c, y_c = _setup(n_e=4, n_c=30)
    rep = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=fe.GD(0.3), params="block", max_steps=5,
                      progress=False, edit_labels=torch.tensor([1, 1, 2, 2]), keep_kl_vectors=True)
    d = rep.to_dict()
    for k in ("base_error", "drawdown", "success_rate", "mean_steps", "flip_rate", "num_edits", "editor"):
        assert k in d
    assert d["per_class_drawdown"][0] == [None] * 10 and d["per_class_drawdown"][1][0] is not None
    text = (tmp_path / "r.json").read_text() if rep.to_json(tmp_path / "r.json") else ""
    assert "NaN" not in text
    j = json.loads(text)
    assert j["drawdown"] == pytest.approx(rep.drawdown)
    assert j["edit_class_source"] == "labels" and j["num_classes"] == 10
    assert len(j["per_edit"]["steps"]) == 4 and len(j["per_edit"]["kl_vector"][0]) == 30
    assert j["per_edit"]["errors_per_class"] == rep.per_edit["errors_per_class"].tolist()
    M = rep.per_class_drawdown
    for r in range(10):
        for c in range(10):
            v = j["per_class_drawdown"][r][c]
            assert (v is None) if math.isnan(float(M[r, c])) else v == pytest.approx(float(M[r, c]))
    rep.to_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for k in ("index", "success", "steps", "errors", "flips", "correct_to_wrong", "wrong_to_correct", "kl", "loss"):
        assert k in rows[0]
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert [int(r["errors"]) for r in rows] == rep.per_edit["errors"].tolist()
    assert [int(r["success"]) for r in rows] == rep.per_edit["success"].int().tolist()
    assert [float(r["kl"]) for r in rows] == pytest.approx(rep.per_edit["kl"].tolist())
