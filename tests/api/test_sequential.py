"""fe.evaluate_sequential: the same as a naive loop (deep copy, edit after edit, full forwards), with
retention, drift and the trust regions recomputed independently; the caller's model untouched
unless in_place (and restored when a run raises); journal rollbacks exact; bad input refused."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_identical, bits, make_model, snapshot

import fastedit as fe
from fastedit.baselines import fisher_diagonal


def _data(seed=1, n_edits=14, n_control=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_edits, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n_edits,), generator=g)
    xc = torch.randn(n_control, 1, 8, 8, generator=g)
    yc = torch.randint(0, 10, (n_control,), generator=g)
    return (x, y), (xc, yc)


def _holds(model, x, y) -> torch.Tensor:
    """Whether each (image, label) edit holds: its label is the argmax (full forward, eval mode)."""
    with torch.no_grad():
        z = model.eval()(x)
    return (z.amax(-1) - z.gather(1, y[:, None])[:, 0]) <= 0


def _naive(model, edits, control, editor, params, checkpoints, max_steps=10):
    """Deep copy, fe.edit one edit after another, every metric from full forwards."""
    work = copy.deepcopy(model)
    (x, y), (xc, yc) = edits, control
    with torch.no_grad():
        z0 = model(xc)
    curve, success, steps = [], [], []

    def measure(done):
        with torch.no_grad():
            z = work(xc)
        err0, err = (z0.argmax(-1) != yc).double().mean(), (z.argmax(-1) != yc).double().mean()
        kl = F.kl_div(F.log_softmax(z, -1), F.log_softmax(z0, -1), log_target=True, reduction="none").sum(-1).mean()
        made = torch.tensor(success[:done], dtype=torch.bool)
        kept = int((_holds(work, x[:done], y[:done]) & made).sum()) if done else 0
        curve.append({"edits": done, "drawdown": float(err - err0), "flip_rate": float((z.argmax(-1) != z0.argmax(-1)).double().mean()),
                      "mean_kl": float(kl), "retention": kept / int(made.sum()) if int(made.sum()) else math.nan,
                      "success_rate": sum(success) / done if done else math.nan})

    measure(0)
    for k in range(x.shape[0]):
        r = fe.edit(work, x[k:k + 1], y[k:k + 1], editor=editor, params=params, max_steps=max_steps)
        success.append(r.success)
        steps.append(r.steps)
        if k + 1 in checkpoints:
            measure(k + 1)
    return work, curve, success, steps


def test_equals_the_naive_loop():
    model = make_model()
    edits, control = _data()
    snap = snapshot(model, layout=True)
    marks = [0, 4, 9, 14]
    editor = fe.RMSProp(0.05)
    rep = fe.evaluate_sequential(model, edits, control, editor=editor, params="out", checkpoints=marks, progress=False)
    assert_identical(model, snap)  # the caller's model: every bit, mode and flag as before
    work, curve, success, steps = _naive(model, edits, control, editor, "out", marks)
    assert rep.per_edit["success"] == success and rep.per_edit["steps"] == steps
    assert 0 < sum(success) and [r["edits"] for r in rep.checkpoints] == marks
    for got, want in zip(rep.checkpoints, curve):
        for key in ("drawdown", "flip_rate", "success_rate", "retention"):
            if isinstance(want[key], float) and math.isnan(want[key]):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(want[key], abs=1e-12), (got["edits"], key)
        assert got["mean_kl"] == pytest.approx(want["mean_kl"], rel=1e-4, abs=1e-7)
    for (name, p), q in zip(rep.model.named_parameters(), work.parameters()):
        assert torch.equal(bits(p), bits(q)), name  # the same edits on the same model, bit for bit
    changed = sum(int((bits(p) != bits(q)).sum()) for p, q in zip(rep.model.parameters(), model.parameters()))
    assert rep.final["changed_scalars"] == changed > 0
    assert rep.final["retention"] < 1.0  # later edits undid some earlier ones: what the metric is for


def test_list_of_pairs_and_in_place():
    model = make_model()
    (x, y), control = _data(n_edits=5)
    pairs = [(x[k:k + 1], y[k:k + 1]) for k in range(5)]
    ref = fe.evaluate_sequential(model, (x, y), control, params="out", progress=False)
    work = copy.deepcopy(model)
    rep = fe.evaluate_sequential(work, pairs, control, params="out", progress=False, in_place=True)
    assert rep.model is work
    assert rep.per_edit["success"] == ref.per_edit["success"] and rep.per_edit["steps"] == ref.per_edit["steps"]
    assert [c["retained"] for c in rep.checkpoints] == [c["retained"] for c in ref.checkpoints]
    for p, q in zip(work.parameters(), ref.model.parameters()):
        assert torch.equal(bits(p), bits(q))


def test_in_place_run_that_raises_restores_the_model():
    model = make_model()
    (x, y), control = _data(n_edits=4)
    calls = {"n": 0}

    def flaky(logits):
        calls["n"] += 1
        if calls["n"] > 6:  # after the validation passes and a few steps: mid-sequence
            raise RuntimeError("boom")
        return (logits.amax(-1) - logits[:, 3]).amax()

    pairs = [(x[k:k + 1], int(y[k])) for k in range(3)] + [(x[3:4], fe.FunctionConstraint(flaky))]
    snap = snapshot(model, layout=True)
    with pytest.raises(RuntimeError, match="boom"):
        fe.evaluate_sequential(model, pairs, control, params="out", progress=False, in_place=True)
    assert_identical(model, snap)


def test_trust_regions_bound_the_drift_and_success_is_judged_after_projection():
    model = make_model()
    edits, control = _data()
    p0 = [p.detach().clone() for p in model.out.parameters()]
    for region in (("linf", 0.02), ("l2", 0.05)):
        rep = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out",
                                     trust_region=region, progress=False)
        delta = [p.detach() - q for p, q in zip(rep.model.out.parameters(), p0)]
        if region[0] == "linf":
            assert max(float(d.abs().max()) for d in delta) <= 0.02 + 1e-7
        else:
            assert math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta)) <= 0.05 * (1 + 1e-6)
        for other, q in zip(rep.model.parameters(), model.parameters()):
            if not any(other is p for p in rep.model.out.parameters()):
                assert torch.equal(bits(other), bits(q))
        assert rep.options["trust_region"] == list(region)
    # the region is tight enough that some edits fail after the projection
    tight = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out",
                                   trust_region=("linf", 1e-4), progress=False)
    assert sum(tight.per_edit["success"]) < len(tight.per_edit["success"])
    assert all(nnz == 0 for ok, nnz in zip(tight.per_edit["success"], tight.per_edit["nnz"]) if not ok)


def test_recheck_re_edits_broken_edits_within_its_bound():
    model = make_model()
    edits, control = _data()
    plain = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out", progress=False)
    rep = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out", recheck=2,
                                 progress=False)
    assert all(r <= 2 for r in rep.per_edit["reedits"]) and sum(rep.per_edit["reedits"]) > 0
    assert rep.final["reedits"] == sum(rep.per_edit["reedits"])
    assert rep.final["retention"] >= plain.final["retention"]
    x, y = edits
    made = torch.tensor(rep.per_edit["success"])
    kept = int((_holds(rep.model, x, y) & made).sum())
    assert rep.final["retained"] == kept  # retention recomputed with full forwards


def test_surgery_journal_rolls_back_one_fix_exactly():
    model = make_model()
    edits, control = _data(n_edits=8)
    rep = fe.evaluate_sequential(model, edits, control, params="out", method="surgery", budget=6, progress=False)
    assert all(nnz <= 6 for nnz in rep.per_edit["nnz"])
    entries = list(rep.journal.entries)
    assert [e.id for e in entries] == [i for i in rep.per_edit["entry"] if i is not None]
    mid = entries[len(entries) // 2]
    rep.journal.rollback(mid.id)
    expected = copy.deepcopy(model)
    for e in entries:
        if e.id != mid.id:
            e.delta.apply(expected, check=False)
    for (name, p), q in zip(rep.model.named_parameters(), expected.parameters()):
        assert torch.equal(bits(p), bits(q)), name
    rep.journal.verify()


def test_ewc_anchors_at_the_original_model():
    model = make_model()
    edits, control = _data()
    fisher = fisher_diagonal(model, control, params="out")
    loose = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out", method="ewc",
                                   fisher=fisher, ewc_lambda=0.0, progress=False)
    plain = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out", progress=False)
    assert loose.per_edit["steps"] == plain.per_edit["steps"]  # λ = 0 is plain editing
    tight = fe.evaluate_sequential(model, edits, control, editor=fe.RMSProp(0.05), params="out", method="ewc",
                                   fisher=fisher, ewc_lambda=1e3, progress=False)
    def drift(rep):
        return sum(float(((p - q).double() ** 2).sum()) for p, q in zip(rep.model.out.parameters(), model.out.parameters()))
    assert tight.options["ewc_lambda"] == 1e3 and drift(tight) < drift(plain)  # the penalty holds the model near θ₀


def test_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    model = make_model()
    edits, control = _data(n_edits=6)
    rep = fe.evaluate_sequential(model, edits, control, params="out", checkpoints=[2], progress=False)
    data = json.loads(open(rep.to_json(tmp_path / "r.json")).read())
    assert data["checkpoints"][0]["retention"] is None and [c["edits"] for c in data["checkpoints"]] == [0, 2, 6]
    lines = open(rep.to_csv(tmp_path / "r.csv")).read().splitlines()
    assert lines[0].startswith("edits,error,drawdown") and len(lines) == 4
    rep.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    rows = [{"edits": 0, "drawdown": 0.0, "retention": math.nan}, {"edits": 5, "drawdown": 0.005, "retention": 0.96},
            {"edits": 9, "drawdown": 0.02, "retention": 0.99}]
    assert fe.SequentialReport("edit", {}, [], 9, 1, 0.0, rows, {}, {}, 0.0).edits_until() == 9
    rows[1]["retention"] = 0.9
    assert fe.SequentialReport("edit", {}, [], 9, 1, 0.0, rows, {}, {}, 0.0).edits_until() == 5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="dense"), ValueError, "method"),
    (dict(method="surgery"), TypeError, "budget"),
    (dict(method="ewc"), TypeError, "fisher"),
    (dict(trust_region=("l1", 1.0)), ValueError, "trust_region"),
    (dict(trust_region=("l2", -1.0)), ValueError, "radius"),
    (dict(trust_region=0.1), TypeError, "trust_region"),
    (dict(checkpoints=[3, 99]), ValueError, "beyond"),
    (dict(recheck=-1), ValueError, "recheck"),
    (dict(params="nothing_here"), ValueError, "nothing_here"),
])
def test_bad_input_is_refused_before_any_edit(kwargs, error, match):
    model = make_model()
    edits, control = _data(n_edits=4)
    snap = snapshot(model, layout=True)
    with pytest.raises(error, match=match):
        fe.evaluate_sequential(model, edits, control, progress=False, in_place=True, **kwargs)
    assert_identical(model, snap)


def test_a_bad_label_is_found_before_the_first_edit():
    model = make_model()
    (x, y), control = _data(n_edits=4)
    y = y.clone()
    y[3] = 10  # out of range for 10 classes
    snap = snapshot(model, layout=True)
    with pytest.raises(ValueError, match="out of range"):
        fe.evaluate_sequential(model, (x, y), control, params="out", progress=False, in_place=True)
    assert_identical(model, snap)


def test_token_edits_and_control():
    pytest.importorskip("transformers")
    from seq_models import small_gpt2
    model = small_gpt2().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (5, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = torch.randint(1, 64, (5, 2), generator=g)
    ctl = torch.randint(1, 64, (6, 12), generator=g)
    rep = fe.evaluate_sequential(model, ({"input_ids": ids}, fe.TokenTargets(labels, causal=True)),
                                 ({"input_ids": ctl}, fe.TokenTargets(ctl, causal=True)), editor=fe.RMSProp(1e-2),
                                 params="transformer.h.1.mlp", progress=False)
    assert rep.options["control_kind"] == "tokens" and len(rep.per_edit["success"]) == 5
    assert 0 <= rep.final["flip_rate"] <= 1 and rep.final["changed_scalars"] > 0
