"""Hostile-input and rule checks from issue 13 (items 6, 7, 9, 10, 18).

1. Editor defaults: every editor is usable by name without hyper-parameters (``editor="gd"``), the
   defaults are the documented ones (the tuned values stored in ``benchmarks/results/evaluation``),
   and ``fe.tune`` builds editors from a name or a class with the defaults for what it does not
   search.
2. NumPy labels: NumPy integers and integer arrays are accepted wherever class labels are (fe.edit,
   evaluate's edits, control and edit_labels, surgery, EditableTraining, the constraint classes) and
   give exactly the results of the equal tensors; NumPy floats, bools and strings raise a TypeError
   naming the dtype, with the model untouched. Host labels follow the model's device.
3. EditableTraining's batch checks: bad labels, empty batches, labels out of range, token targets
   with nothing labelled and bad given edits raise a clear ValueError/TypeError, and the model is
   bit-identical afterwards (parameters and the BatchNorm statistics its train-mode forward moves),
   every module's mode and ``requires_grad`` restored; the module then works as a fresh one.
4. fe.evaluate with non-finite edits: counted in the report (``num_nonfinite``, ``to_dict``, JSON)
   and announced by a UserWarning naming how many and the first indices; no warning otherwise.
5. Surgery's lagrange method takes no editor step while the edit constraint holds (only the
   proximal step): a hook on the editor step checks the constraint at every step taken, and a
   hand-rolled ISTA reference (GD, float64) gives the same step count and the same delta.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_identical, bits, make_model, snapshot
from seq_models import GRUSeq2Seq
from test_training import tiny_batch, tiny_model
from torch import nn

import fastedit as fe
import fastedit.tuning as ft
from fastedit.constraint import as_constraint

F64 = torch.float64
fs = sys.modules["fastedit.surgery.tuner"]  # the tuning loop (`fastedit.surgery` the attribute is the function)


def edit_data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, dtype=F64, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------------------------
# 1. editor defaults
# ------------------------------------------------------------------------------------------------
def _tuned_cell(name: str) -> dict:
    path = ROOT / "benchmarks" / "results" / "evaluation" / "cells" / f"resnet20_layer3_{name}.json"
    return json.loads(path.read_text())["chosen"]


@pytest.mark.parametrize("name", ["gd", "scaled_gd", "rprop", "momentum", "adam"])
def test_default_learning_rates_are_the_tuned_resnet20_values(name):
    chosen = _tuned_cell(name)
    editor = fe.EDITORS[name]()
    expected = {k: (tuple(v) if isinstance(v, list) else v) for k, v in chosen.items() if k != "editor"}
    assert editor.hparams() == expected


def test_rmsprop_keeps_the_official_defaults():
    assert fe.RMSProp().hparams() == {"lr": 1e-3, "beta": 0.5, "eps": 1e-6}


@pytest.mark.parametrize("name", sorted(fe.EDITORS))
def test_every_editor_name_edits_with_its_defaults(name):
    x, _ = edit_data(1)
    model = make_model(F64)
    before = snapshot(model)
    with torch.no_grad():
        y = int((model(x).argmax(-1) + 3) % 10)
    r = fe.edit(model, x, y, editor=name, params="out", max_steps=3, on_failure="keep")
    assert r.applied and r.steps >= 1
    by_name = {k: v.clone() for k, v in model.state_dict().items()}
    r.revert()
    assert_identical(model, before)
    r2 = fe.edit(model, x, y, editor=fe.EDITORS[name](), params="out", max_steps=3, on_failure="keep")
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(by_name[k])), k
    r2.revert()
    assert fe.make_editor(name) == fe.EDITORS[name]()


def test_tune_builds_named_and_class_editors_with_the_defaults(monkeypatch):
    seen = []

    def fake_evaluate(model, edits, control, editor, **kwargs):
        seen.append(editor)
        return fe.EvalReport(base_error=0.0, drawdown=0.1 * len(seen), success_rate=1.0, mean_steps=1.0,
                             flip_rate=0.0, flip_rate_correct_to_wrong=0.0, flip_rate_wrong_to_correct=0.0,
                             mean_kl=0.0, num_edits=1, num_control=1, editor=editor.to_dict(), params=[],
                             max_steps=10, seconds=0.0)

    monkeypatch.setattr(ft, "evaluate", fake_evaluate)
    res = fe.tune(None, None, None, editor="momentum", grid={"momentum": [0.5, 0.8]}, progress=False)
    assert seen == [fe.Momentum(1e-4, 0.5), fe.Momentum(1e-4, 0.8)]
    assert res.editor == fe.Momentum(1e-4, 0.5)
    seen.clear()
    res = fe.tune(None, None, None, editor=fe.Adam, grid={"beta1": [0.9]}, progress=False)
    assert seen == [fe.Adam(betas=(0.9, 0.999))] and res.editor.lr == 10 ** -3.5
    seen.clear()
    fe.tune(None, None, None, editor="gd", refine=False, progress=False)  # the default grid searches lr only
    assert [e.lr for e in seen] == list(ft.DEFAULT_LRS)
    seen.clear()
    fe.tune(None, None, None, editor="gd", progress=False)  # ... then refines it (metrics all equal here)
    assert [e.lr for e in seen[:11]] == list(ft.DEFAULT_LRS) and len(seen) > 11


def test_editable_training_takes_a_named_editor():
    et = fe.EditableTraining(make_model(F64), params="out", editor="gd", max_steps=2)
    assert type(et.editor()) is fe.GD and math.isclose(et.editor().lr, fe.GD().lr, rel_tol=1e-12)  # exp(log(lr))


# ------------------------------------------------------------------------------------------------
# 2. NumPy labels
# ------------------------------------------------------------------------------------------------
NUMPY_INTS = [np.int64(3), np.int32(3), np.uint8(3), np.array(3), np.array([3], dtype=np.int16)]


@pytest.mark.parametrize("label", NUMPY_INTS, ids=lambda v: f"{type(v).__name__}-{np.asarray(v).dtype}")
def test_edit_accepts_numpy_integer_labels(label):
    x, _ = edit_data(1)
    ref_model, model = make_model(F64), make_model(F64)
    ref = fe.edit(ref_model, x, 3, editor=fe.GD(0.5), params="out")
    r = fe.edit(model, x, label, editor=fe.GD(0.5), params="out")
    assert (r.success, r.steps, r.loss) == (ref.success, ref.steps, ref.loss)
    for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(bits(v), bits(w)), k


def test_edit_accepts_a_numpy_label_array_for_several_samples():
    x, y = edit_data(3)
    ref_model, model = make_model(F64), make_model(F64)
    ref = fe.edit(ref_model, x, y, editor=fe.GD(0.5), params="out")
    r = fe.edit(model, x, y.numpy().astype(np.int32), editor=fe.GD(0.5), params="out")
    assert (r.success, r.steps, r.loss) == (ref.success, ref.steps, ref.loss)
    for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(bits(v), bits(w)), k


@pytest.mark.parametrize("label, kind", [
    (np.float64(3.0), "scalar of floats"), (np.float32(3.0), "scalar of floats"),
    (np.array([3.0]), "array of floats"), (np.bool_(True), "scalar of bools"), (np.array([True]), "array of bools"),
    (np.array(["3"]), "array of strings"),
], ids=["np.float64", "np.float32", "float-array", "np.bool_", "bool-array", "str-array"])
def test_edit_rejects_numpy_floats_and_bools(label, kind):
    x, _ = edit_data(1)
    model = make_model(F64)
    before = snapshot(model)
    with pytest.raises(TypeError, match=f"must be integers, got a NumPy {kind}"):
        fe.edit(model, x, label, editor=fe.GD(0.5), params="out")
    assert_identical(model, before)


def test_numpy_labels_are_copied_and_unsigned_overflow_is_refused():
    arr = np.array([1, 2], dtype=np.int64)
    c = fe.Classification(arr)
    arr[0] = 7
    assert c.labels.tolist() == [1, 2] and c.labels.dtype == torch.int64
    assert fe.Classification(np.array([5, 4, 3])[::-2]).labels.tolist() == [3, 5]  # negative strides
    with pytest.raises(ValueError, match="does not fit in int64"):
        fe.Classification(np.array([2 ** 63], dtype=np.uint64))
    with pytest.raises(ValueError, match="fe.TokenTargets"):
        fe.Classification(np.zeros((2, 3), dtype=np.int64))


def test_token_targets_and_rankings_take_numpy_integer_arrays():
    labels = np.array([[1, -100, 4], [2, 3, -100]], dtype=np.int32)
    t = fe.TokenTargets(labels, causal=True)
    assert torch.equal(t.labels, torch.tensor(labels, dtype=torch.int64)) and t.causal
    r = fe.SequenceRanking(labels, 2)
    assert torch.equal(r.labels, t.labels)
    logits = torch.randn(2, 3, 5, dtype=F64)
    assert torch.equal(fe.TokenTargets(labels).per_sample(logits), fe.TokenTargets(torch.tensor(labels)).per_sample(logits))
    with pytest.raises(TypeError, match="TokenTargets: labels must be integers, got a NumPy array of floats"):
        fe.TokenTargets(labels.astype(np.float32))
    with pytest.raises(TypeError, match="SequenceRanking: labels must be integers, got a NumPy array of bools"):
        fe.SequenceRanking(labels > 0, 2)


def test_host_labels_follow_the_model_device_and_tensors_must_match():
    meta = torch.device("meta")  # any device other than the labels': no accelerator needed
    for c in (fe.Classification(np.array([1, 2])), fe.Classification(4), as_constraint(np.int64(1)),
              fe.TokenTargets(np.array([[1, -100]]))):
        c.check_device(meta)
        assert c.labels.device == meta
    for c in (fe.Classification(torch.tensor([1, 2])), fe.TokenTargets(torch.tensor([[1, -100]]))):
        with pytest.raises(ValueError, match="labels are on cpu but the inputs on meta"):
            c.check_device(meta)


def _report_dict(rep) -> dict:
    d = rep.to_dict(per_edit=True)
    d.pop("seconds")
    return d


def test_evaluate_accepts_numpy_edits_control_and_edit_labels():
    x, y = edit_data(5, seed=2)
    xc, yc = edit_data(20, seed=3)
    model = make_model(F64)
    before = snapshot(model)
    kw = dict(editor=fe.GD(0.5), params="out", max_steps=3, progress=False)
    ref = fe.evaluate(model, (x, y), (xc, yc), edit_labels=(y + 1) % 10, **kw)
    rep = fe.evaluate(model, (x, y.numpy()), (xc, yc.numpy().astype(np.int32)),
                      edit_labels=((y + 1) % 10).numpy().astype(np.uint8), **kw)
    assert _report_dict(rep) == _report_dict(ref)
    pairs = [(x[i:i + 1], np.int64(y[i])) for i in range(5)]
    assert _report_dict(fe.evaluate(model, pairs, (xc, yc), edit_labels=(y + 1) % 10, **kw)) == _report_dict(ref)
    assert_identical(model, before)
    with pytest.raises(TypeError, match="NumPy array of floats"):
        fe.evaluate(model, (x, y.numpy().astype(np.float64)), (xc, yc), **kw)
    with pytest.raises(TypeError, match="NumPy array of floats"):
        fe.evaluate(model, (x, y), (xc, yc.numpy().astype(np.float32)), **kw)
    assert_identical(model, before)


def test_surgery_accepts_a_numpy_label():
    x, _ = edit_data(1)
    a, b = make_model(F64), make_model(F64)
    with torch.no_grad():
        y = int((a(x).argmax(-1) + 3) % 10)
    ra = fe.surgery(a, x, y, 20, params="out", steps=20)
    rb = fe.surgery(b, x, np.int64(y), 20, params="out", steps=20)
    assert ra.success and rb.success and ra.delta == rb.delta and ra.steps == rb.steps


def _et_run(model, *args):
    et = fe.EditableTraining(model, params="out", editor=fe.GD(0.1), max_steps=3, c_edit=1.0, c_loc=1.0)
    torch.manual_seed(5)  # the sampled edits
    loss, stats = et(*args)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    return loss, stats, grads


def test_editable_training_accepts_numpy_batch_labels_and_edit_targets():
    x, y, edit_x = tiny_batch()
    model = tiny_model().eval()  # eval mode: no statistics move, so every run starts from the same model
    ref = _et_run(model, x, y)
    got = _et_run(model, x, y.numpy().astype(np.int32))
    assert torch.equal(ref[0], got[0])
    assert all(torch.equal(g, h) for g, h in zip(ref[2], got[2]) if g is not None)
    ref = _et_run(model, x, y, edit_x[:1], 4)
    for target in (np.int64(4), np.array([4]), np.array(4, dtype=np.uint8)):
        got = _et_run(model, x, y, edit_x[:1], target)
        assert torch.equal(ref[0], got[0]) and ref[1]["edit_steps"] == got[1]["edit_steps"]
    ref = _et_run(model, x, y, edit_x, torch.tensor([1, 2, 3]))
    got = _et_run(model, x, y, edit_x, np.array([1, 2, 3]))
    assert torch.equal(ref[0], got[0])


# ------------------------------------------------------------------------------------------------
# 3. EditableTraining's batch checks
# ------------------------------------------------------------------------------------------------
def _bad_training_calls():
    x, y, edit_x = tiny_batch()
    return [
        ("float labels", (x, y.double()), TypeError, "batch's target must hold integer class labels.*float64"),
        ("float numpy labels", (x, y.numpy().astype(np.float32)), TypeError, "NumPy array of floats"),
        ("bool labels", (x, y > 4), TypeError, "integer class labels.*bool"),
        ("a Python list", (x, y.tolist()), TypeError, "batch's target must be class labels"),
        ("an empty batch", (x[:0], y[:0]), ValueError, "non-empty sample dimension"),
        ("too few labels", (x, y[:5]), ValueError, "batch's target.*8 samples.*shape \\(5,\\)"),
        ("labels [B, T] for a classifier", (x, y.reshape(2, 4)), ValueError, "batch's target.*one label per sample"),
        ("a label above the classes", (x, torch.where(torch.arange(8) == 3, 10, y)), ValueError,
         "batch's target.*label 10 is out of range for a model with 10 classes"),
        ("a negative label", (x, torch.where(torch.arange(8) == 0, -1, y)), ValueError,
         "batch's target.*label -1 is out of range"),
        ("a given edit label out of range", (x, y, edit_x, torch.tensor([1, 2, 10])), ValueError,
         "edit_y.*label 10 is out of range"),
        ("a given edit label as numpy out of range", (x, y, edit_x[:1], np.int64(12)), ValueError,
         "edit_y.*label 12 is out of range"),
        ("a float given edit", (x, y, edit_x[:1], torch.tensor([1.0])), TypeError, "edit_y.*integer"),
        ("an empty given edit", (x, y, edit_x[:0], torch.tensor([], dtype=torch.int64)), ValueError,
         "edit_inputs must have a non-empty"),
        ("too many given edit labels", (x, y, edit_x, torch.tensor([1, 2, 3, 4])), ValueError, "edit_y"),
    ]


BAD_TRAINING = _bad_training_calls()


def test_editable_training_bad_batch_raises_and_changes_nothing():
    """Every bad call on one module (train mode: the batch's forward moves BatchNorm statistics);
    after each the model is as before, and afterwards the module goes on exactly as a fresh one."""
    model = tiny_model()
    model.head.weight.requires_grad_(False)
    pristine = copy.deepcopy(model)
    before = snapshot(model)
    et = fe.EditableTraining(model, params="out", editor=fe.GD(0.1), max_steps=2, c_edit=1.0, c_loc=1.0)
    x, y, edit_x = tiny_batch()
    et(x, y, edit_x, torch.tensor([1, 2, 3]))  # the splits exist: later failures come after a real forward
    pristine_et = fe.EditableTraining(pristine, params="out", editor=fe.GD(0.1), max_steps=2, c_edit=1.0, c_loc=1.0)
    pristine_et(x, y, edit_x, torch.tensor([1, 2, 3]))
    before = snapshot(model)
    for what, args, exc, match in BAD_TRAINING:
        with pytest.raises(exc, match=match):
            et(*args)
        try:
            assert_identical(model, before)
        except AssertionError as err:
            raise AssertionError(f"{what}: {err}") from None
        assert all(p.grad is None for p in et.parameters()), what
    loss, _ = et(x, y, edit_x, torch.tensor([1, 2, 3]))
    want, _ = pristine_et(x, y, edit_x, torch.tensor([1, 2, 3]))
    assert torch.equal(loss, want)
    assert_identical(model, snapshot(pristine))


def test_editable_training_token_batch_without_labelled_position():
    torch.manual_seed(0)
    model = GRUSeq2Seq()
    g = torch.Generator().manual_seed(4)
    src, dec = torch.randint(0, 20, (3, 5), generator=g), torch.randint(0, 16, (3, 6), generator=g)
    before = snapshot(model)
    et = fe.EditableTraining(model, params="out", editor=fe.GD(0.1), max_steps=2)
    with pytest.raises(ValueError, match="no position of the batch is labelled: every label is -100"):
        et((src, dec), fe.TokenTargets(torch.full((3, 6), -100)))
    only_first = torch.full((3, 6), -100)
    only_first[:, 0] = 2
    with pytest.raises(ValueError, match="after the causal shift"):  # labels[:, 0] drops out when causal
        et((src, dec), fe.TokenTargets(only_first, causal=True))
    with pytest.raises(ValueError, match="out of range for a vocabulary of 16"):
        et((src, dec), fe.TokenTargets(only_first + 18))
    assert_identical(model, before)
    loss, _ = et((src, dec), fe.TokenTargets(only_first))
    assert torch.isfinite(loss)


def test_a_failing_train_mode_forward_puts_the_statistics_back():
    """A model that fails after its BatchNorm moved (the failure is the model's own, not a label
    check): the step raises and the running statistics are restored."""

    class FailsOnNegativeMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            if float(x.mean()) < 0:
                self.inner.stem(x)  # BatchNorm in train mode: statistics move ...
                raise RuntimeError("boom")  # ... then the model fails
            return self.inner(x)

    model = FailsOnNegativeMean()
    model.train()
    model.inner.block[3].eval()
    x, y, _ = tiny_batch()
    et = fe.EditableTraining(model, params="inner.out", editor=fe.GD(0.1), max_steps=2, c_edit=1.0, c_loc=1.0)
    et(x.abs(), y)  # the split is built on good inputs
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        et(-x.abs(), y)
    assert_identical(model, before)


# ------------------------------------------------------------------------------------------------
# 4. evaluate with non-finite edits
# ------------------------------------------------------------------------------------------------
def _nonfinite_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "non-finite" in str(w.message)]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_evaluate_counts_and_warns_about_nonfinite_edits(strategy, tmp_path):
    x, y = edit_data(6, seed=4)
    x[[1, 4]] = float("nan")
    xc, yc = edit_data(16, seed=5)
    model = make_model(F64)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rep = fe.evaluate(model, (x, y), (xc, yc), editor=fe.GD(0.5), params="out", max_steps=3, progress=False,
                          strategy=strategy, edits_per_group=3)
    msgs = _nonfinite_warnings(record)
    assert len(msgs) == 1 and "2 of 6 edits" in msgs[0] and "edits 1, 4)" in msgs[0], msgs
    assert rep.num_nonfinite == 2 and rep.per_edit["nonfinite"].tolist() == [False, True, False, False, True, False]
    assert rep.to_dict()["num_nonfinite"] == 2
    assert json.load(open(rep.to_json(tmp_path / "r.json")))["num_nonfinite"] == 2
    assert not rep.per_edit["success"][[1, 4]].any()
    assert_identical(model, before)


def test_evaluate_nonfinite_warning_lists_the_first_five():
    x, y = edit_data(8, seed=6)
    x[[0, 2, 3, 5, 6, 7]] = float("inf")
    xc, yc = edit_data(16, seed=7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rep = fe.evaluate(make_model(F64), (x, y), (xc, yc), editor=fe.GD(0.5), params="out", max_steps=3,
                          progress=False)
    msgs = _nonfinite_warnings(record)
    assert rep.num_nonfinite == 6 == int(rep.per_edit["nonfinite"].sum())
    assert len(msgs) == 1 and "6 of 8 edits" in msgs[0] and "edits 0, 2, 3, 5, 6, ...)" in msgs[0], msgs


def test_evaluate_counts_edits_that_turn_nonfinite_after_some_steps():
    """Finite inputs; the constraint ``sqrt(5 − z₀) − 1`` (met for z₀ ≥ 4) is NaN once a step
    overshoots z₀ > 5: such an edit took its steps, then stopped, and counts as failed."""
    x, _ = edit_data(3, seed=10)
    xc, yc = edit_data(16, seed=11)

    def overshoots(z):
        return torch.sqrt(5.0 - z[:, 0]) - 1.0

    def gentle(z):
        return 0.5 - (z[:, 0] - z[:, 1])

    edits = [(x[0:1], overshoots), (x[1:2], gentle), (x[2:3], overshoots)]
    model = make_model(F64)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rep = fe.evaluate(model, edits, (xc, yc), editor=fe.GD(50.0), params="out", max_steps=5, progress=False)
    msgs = _nonfinite_warnings(record)
    assert rep.per_edit["nonfinite"].tolist() == [True, False, True] and rep.num_nonfinite == 2
    assert len(msgs) == 1 and "2 of 3 edits" in msgs[0] and "edits 0, 2)" in msgs[0], msgs
    assert rep.per_edit["steps"][[0, 2]].tolist() == [1, 1] and not rep.per_edit["success"][[0, 2]].any()
    assert_identical(model, before)


def test_evaluate_with_finite_edits_does_not_warn():
    x, y = edit_data(4, seed=8)
    xc, yc = edit_data(16, seed=9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rep = fe.evaluate(make_model(F64), (x, y), (xc, yc), editor=fe.GD(0.5), params="out", max_steps=3,
                          progress=False)
    assert not _nonfinite_warnings(record)
    assert rep.num_nonfinite == 0 and rep.to_dict()["num_nonfinite"] == 0


# ------------------------------------------------------------------------------------------------
# 5. surgery's lagrange method: no editor step while the constraint holds
# ------------------------------------------------------------------------------------------------
def _linear_case():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(F64).eval()
    x = torch.randn(1, 6, dtype=F64)
    with torch.no_grad():
        y = int(model(x).argmin())
    return model, x, y


def _margin(x, y, weight, bias) -> torch.Tensor:
    z = x @ weight.T + bias
    return (z.amax(-1) - z[:, y]).amax()  # the edit constraint, reduction "max"


def _reference_lagrange(model, x, y, lr, l1, steps, n):
    """The dense phase and the hard cut, by the module docstring, with GD (ISTA): per unit, one GD
    step unless the constraint holds, then the soft threshold of Δ by l1·lr (θ₀'s bits where it is
    0); stop once the constraint holds with nnz ≤ n; keep the top-n |Δ|. Returns (θ, steps, units
    in which only the proximal step ran, cut margin of the n-th vs (n+1)-th |Δ|)."""
    theta0 = [model.weight.detach().clone(), model.bias.detach().clone()]
    theta = [t.clone() for t in theta0]
    tau = l1 * lr

    def holds(th):
        return float(_margin(x, y, *th)) <= 0

    def nnz(th):
        return sum(int((bits(a) != bits(b)).sum()) for a, b in zip(th, theta0))

    taken = prox_only = 0
    met = holds(theta)
    for _ in range(steps):
        if met and nnz(theta) <= n:
            break
        if met:
            prox_only += 1
        else:
            leaves = [t.clone().requires_grad_() for t in theta]
            grads = torch.autograd.grad(_margin(x, y, *leaves), leaves)
            theta = [t - lr * g for t, g in zip(theta, grads)]
            taken += 1
        new = []
        for t, t0 in zip(theta, theta0):
            d = t - t0
            shrunk = d.sign() * (d.abs() - tau).clamp_min(0)
            new.append(torch.where(shrunk == 0, t0, t0 + shrunk))
        theta = new
        met = holds(theta)
    delta = torch.cat([(t - t0).abs().reshape(-1) for t, t0 in zip(theta, theta0)])
    order = delta.sort(descending=True).values
    keep = delta >= order[n - 1]
    flat_kept = torch.where(keep, torch.cat([t.reshape(-1) for t in theta]), torch.cat([t.reshape(-1) for t in theta0]))
    cut = [flat_kept[:theta0[0].numel()].reshape(theta0[0].shape), flat_kept[theta0[0].numel():]]
    return cut, taken, prox_only, float(order[n - 1] - order[n])


LAGRANGE = dict(budget=2, method="lagrange", params=None, steps=25, l1=1.0, refit_steps=0, on_failure="keep")


def test_lagrange_matches_a_hand_rolled_ista_reference():
    model, x, y = _linear_case()
    lr = 0.02
    cut, taken, prox_only, gap = _reference_lagrange(model, x, y, lr, LAGRANGE["l1"], LAGRANGE["steps"],
                                                     LAGRANGE["budget"])
    assert prox_only >= 3 and taken >= 2  # the rule is exercised: units with the constraint holding, steps between
    assert gap > 1e-6  # the reference's top-n cut is unambiguous
    theta0 = [model.weight.detach().clone(), model.bias.detach().clone()]
    r = fe.surgery(model, x, y, editor=fe.GD(lr), **LAGRANGE)
    assert r.steps == taken, "editor steps taken while the constraint held (or skipped while it failed)"
    now = [model.weight.detach(), model.bias.detach()]
    for got, want, t0 in zip(now, cut, theta0):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert torch.equal(bits(got) == bits(t0), bits(want) == bits(t0))  # the same coordinates changed
    assert r.success == (float(_margin(x, y, *cut)) <= 0)


@pytest.mark.parametrize("editor, l1", [(fe.GD(0.02), 1.0), (fe.Momentum(0.007), 1.0), (fe.Adam(0.05), 0.3),
                                        (fe.ScaledGD(0.1), 0.1)], ids=lambda e: getattr(e, "name", str(e)))
def test_lagrange_takes_no_editor_step_while_the_constraint_holds(editor, l1, monkeypatch):
    """Momentum and Adam would keep moving on a zero gradient, GD and ScaledGD would count steps."""
    model, x, y = _linear_case()
    real_step, real_prox = fs.editor_step_, fs.Tuner.prox
    margins_at_steps, prox_only = [], []
    stepped = [False]

    def step(ed, theta, grads, state, active=None, **kw):
        with torch.no_grad():
            margins_at_steps.append(float(_margin(x, y, *theta)))
        stepped[0] = True
        return real_step(ed, theta, grads, state, active, **kw)

    def prox(self, theta, tau):
        if not stepped[0]:
            prox_only.append(float(_margin(x, y, *theta)))
        stepped[0] = False
        return real_prox(self, theta, tau)

    monkeypatch.setattr(fs, "editor_step_", step)
    monkeypatch.setattr(fs.Tuner, "prox", prox)
    r = fe.surgery(model, x, y, editor=editor, **{**LAGRANGE, "l1": l1})
    assert margins_at_steps and all(m > 0 for m in margins_at_steps), margins_at_steps
    assert r.steps == len(margins_at_steps)
    assert len(prox_only) >= 2 and all(m <= 0 for m in prox_only)  # units where only the proximal step ran
