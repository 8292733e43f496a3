"""fastedit.evaluate: results do not depend on how edits are grouped, on the strategy (loop, vmap,
measure), on the control chunk size or on the prefix cache budget; satisfied edits skip the control
pass and still report the original model's metrics."""
import sys

import pytest
import torch
from helpers import assert_identical, make_model, snapshot
from test_evaluate import naive_evaluate

import fastedit as fe
from fastedit._core import EditTarget, run_edit_loop, run_edit_loop_batched

EXACT = ("success", "steps", "errors", "flips", "correct_to_wrong", "wrong_to_correct", "errors_per_class",
         "nonfinite", "edit_class")


def _data(dtype=torch.float32, n_edits=9, n_control=37, seed=3):
    g = torch.Generator().manual_seed(seed)
    x_e = torch.randn(n_edits, 1, 8, 8, generator=g, dtype=dtype)
    x_c = torch.randn(n_control, 1, 8, 8, generator=g, dtype=dtype)
    return (x_e, torch.randint(0, 10, (n_edits,), generator=g)), (x_c, torch.randint(0, 10, (n_control,), generator=g))


def _assert_same(a, b, kl_rtol=0.0):
    for k in EXACT:
        assert torch.equal(a.per_edit[k], b.per_edit[k]), k
    if kl_rtol == 0.0:
        assert torch.equal(a.per_edit["kl"], b.per_edit["kl"])
        assert a.drawdown == b.drawdown and a.mean_kl == b.mean_kl
    else:
        torch.testing.assert_close(a.per_edit["kl"], b.per_edit["kl"], rtol=kl_rtol, atol=1e-9)
        assert a.drawdown == b.drawdown
    assert torch.equal(a.per_class_drawdown.nan_to_num(-7), b.per_class_drawdown.nan_to_num(-7))


@pytest.mark.parametrize("group", [2, 4, 9, 16])
def test_loop_groups_are_bit_identical(group):
    model = make_model()
    edits, control = _data()
    ref = fe.evaluate(model, edits, control, editor=fe.RMSProp(0.01), params="block", max_steps=5, progress=False)
    rep = fe.evaluate(model, edits, control, editor=fe.RMSProp(0.01), params="block", max_steps=5, progress=False,
                      strategy="loop", edits_per_group=group, keep_kl_vectors=True)
    _assert_same(ref, rep)
    assert rep.strategy == "loop" and rep.edits_per_group == group


@pytest.mark.parametrize("editor", [fe.GD(0.3), fe.RMSProp(0.01), fe.ScaledGD(0.5), fe.Adam(0.01)],
                         ids=lambda e: e.name)
@pytest.mark.parametrize("group", [1, 4])
def test_vmap_equals_loop_in_float64(editor, group):
    model = make_model(torch.float64)
    edits, control = _data(torch.float64)
    before = snapshot(model)
    loop = fe.evaluate(model, edits, control, editor=editor, params="block", max_steps=5, progress=False)
    vm = fe.evaluate(model, edits, control, editor=editor, params="block", max_steps=5, progress=False,
                     strategy="vmap", edits_per_group=group, keep_kl_vectors=True)
    assert_identical(model, before)
    assert vm.strategy == "vmap"
    _assert_same(loop, vm, kl_rtol=1e-9)
    torch.testing.assert_close(vm.per_edit["kl_vector"].mean(1), vm.per_edit["kl"], rtol=1e-5, atol=1e-7)


def test_batched_edit_loop_matches_single_loops():
    model = make_model(torch.float64)
    (x_e, y_e), _ = _data(torch.float64)
    target = EditTarget.build(model, "block")
    editor = fe.RMSProp(0.02)
    singles = [run_edit_loop(target.loss_fn(target.prefix(x_e[i:i + 1]), y_e[i:i + 1], "max"), target.params,
                             editor, 6) for i in range(x_e.shape[0])]
    acts = target.prefix(x_e)

    def loss_one(theta, inp):
        a, y = inp
        return fe.constraint.reduce_constraint(fe.constraint.classification_margins(target.logits(a, theta), y), "max")

    inputs = (tuple(a.unsqueeze(1) for a in acts), y_e.unsqueeze(1))
    for early in (False, True):
        out = run_edit_loop_batched(loss_one, target.params, inputs, editor, 6, early_exit=early)
        assert out.steps.tolist() == [int(s.steps) for s in singles]
        assert out.bad_step.tolist() == [-1] * x_e.shape[0]
        torch.testing.assert_close(out.loss, torch.stack([s.loss for s in singles]), rtol=1e-10, atol=1e-12)
        for j, p in enumerate(out.params):
            torch.testing.assert_close(p, torch.stack([s.params[j] for s in singles]), rtol=1e-10, atol=1e-12)


def test_measure_strategy_picks_one_and_keeps_loop_results():
    # float64: whichever strategy the timing picks, the counts agree (vmap rounds differently)
    model = make_model(torch.float64)
    edits, control = _data(torch.float64)
    ref = fe.evaluate(model, edits, control, editor=fe.GD(0.3), params="block", max_steps=4, progress=False)
    rep = fe.evaluate(model, edits, control, editor=fe.GD(0.3), params="block", max_steps=4, progress=False,
                      strategy="measure", edits_per_group=3)
    assert rep.strategy in ("loop", "vmap")
    _assert_same(ref, rep, kl_rtol=1e-9)


@pytest.mark.parametrize("budget", [0, 3000, float("inf")])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_cache_budget_and_chunks_do_not_change_results(budget, batch_size):
    model = make_model()
    edits, control = _data()
    ref = fe.evaluate(model, edits, control, editor=fe.RMSProp(0.01), params="block", max_steps=5,
                      progress=False, batch_size=batch_size)
    rep = fe.evaluate(model, edits, control, editor=fe.RMSProp(0.01), params="block", max_steps=5,
                      progress=False, batch_size=batch_size, cache_budget=budget)
    _assert_same(ref, rep)


def test_cache_budget_bounds_kept_activations():
    from fastedit.evaluate import ControlSet
    model = make_model()
    _, (x_c, y_c) = _data()
    target = EditTarget.build(model, "block")
    per_sample = sum(a[:1].nbytes for a in target.prefix(x_c[:1]))
    for budget in (0, 10 * per_sample, 25 * per_sample):
        cs = ControlSet(target, x_c, y_c, 5, budget)
        kept = sum(c[2] is not None for c in cs.chunks)
        assert cs.cached_bytes <= budget and kept == min(budget // (5 * per_sample), len(cs.chunks))


def test_satisfied_edits_skip_control_pass_with_original_metrics(monkeypatch):
    model = make_model()
    (x_e, _), control = _data()
    with torch.no_grad():
        pred = model.eval()(x_e).argmax(-1)
    y_e = pred.clone()
    y_e[::3] = (pred[::3] + 1) % 10  # every third edit needs steps, the others are satisfied already
    calls = []
    ev = sys.modules["fastedit.evaluate"]  # the package's `evaluate` attribute is the function
    original = ev._GroupRunner.control_pass
    monkeypatch.setattr(ev._GroupRunner, "control_pass",
                        lambda self, strategy, params: calls.append(params[0].shape[0]) or original(self, strategy, params))
    rep = fe.evaluate(model, (x_e, y_e), control, editor=fe.GD(0.3), params="block", max_steps=5, progress=False,
                      edits_per_group=9, keep_kl_vectors=True)
    assert calls == [3]  # only the three edits that moved the parameters
    base_error, rows = naive_evaluate(model, x_e, y_e, *control, fe.GD(0.3), "block", 5)
    assert rep.per_edit["steps"].tolist() == [r["steps"] for r in rows]
    assert rep.per_edit["errors"].tolist() == [r["errors"] for r in rows]
    assert rep.per_edit["flips"].tolist() == [r["flips"] for r in rows]
    skipped = rep.per_edit["steps"] == 0
    assert skipped.sum() == 6 and (rep.per_edit["kl"][skipped] == 0).all()
    assert (rep.per_edit["kl_vector"][skipped] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="fast"), "strategy"), (dict(edits_per_group=0), "edits_per_group"),
    (dict(edits_per_group=True), "edits_per_group"), (dict(cache_budget=-1), "cache_budget"),
    (dict(distributed="yes"), "distributed"), (dict(distributed=True), "not initialised"),
])
def test_bad_arguments(kwargs, match):
    model = make_model()
    edits, control = _data()
    before = snapshot(model)
    with pytest.raises((ValueError, RuntimeError), match=match):
        fe.evaluate(model, edits, control, editor=fe.GD(0.1), params="block", progress=False, **kwargs)
    assert_identical(model, before)
