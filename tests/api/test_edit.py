"""fastedit.edit: success, atomicity, revert, bad input, modes, and an independent naive reference."""
import copy

import pytest
import torch
from helpers import assert_identical, make_model, snapshot, wrong_label

import fastedit as fe
from fastedit._core import EditTarget, run_edit_loop

EDITORS = [fe.GD(0.5), fe.ScaledGD(1.0), fe.RProp(0.02), fe.RMSProp(0.02), fe.Momentum(0.2), fe.Adam(0.02)]


@pytest.mark.parametrize("editor", EDITORS, ids=lambda e: e.name)
def test_edit_succeeds_and_reverts_bit_identically(editor):
    model = make_model()
    x = torch.randn(1, 1, 8, 8)
    y = wrong_label(model, x)
    before = snapshot(model)
    r = fe.edit(model, x, y, editor=editor, params=["head", "out"], max_steps=20)
    assert r.success and r.applied and 1 <= r.steps <= 20 and r.loss <= 0 < r.initial_loss
    with torch.no_grad():
        assert model(x).argmax(-1).item() == y.item()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("head.", "out.")) for k in changed)
    r.revert()
    assert_identical(model, before)
    r.revert()  # idempotent
    assert_identical(model, before)


def test_matches_independent_naive_unrolled_loop():
    """Reference: full-model forwards, autograd, explicit Python early stopping, float64."""
    for editor in EDITORS:
        model = make_model(torch.float64)
        x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
        y = wrong_label(model, x)
        naive = copy.deepcopy(model)
        params = [naive.head.weight, naive.head.bias, naive.out.weight, naive.out.bias]
        state = editor.init_state([p.detach() for p in params])
        theta, steps = [p.detach().clone() for p in params], 0
        for _ in range(8):
            for p, t in zip(params, theta):
                p.data = t.clone()
            z = naive(x)
            loss = (z.max(-1).values - z.gather(1, y[:, None])[:, 0]).max()
            if loss.item() <= 0:
                break
            grads = torch.autograd.grad(loss, params)
            theta, state = editor.step(theta, list(grads), state)
            steps += 1
        r = fe.edit(model, x, y, editor=editor, params=["head", "out"], max_steps=8, on_failure="keep")
        assert r.steps == steps, editor.name
        for p, t in zip([model.head.weight, model.head.bias, model.out.weight, model.out.bias], theta):
            torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-12)


def test_early_exit_and_prefix_do_not_change_results():
    results = []
    for early_exit in (True, False):
        for use_prefix in (True, False):
            model = make_model()
            x = torch.randn(1, 1, 8, 8)
            r = fe.edit(model, x, wrong_label(model, x), editor=fe.RMSProp(0.01), params="block", max_steps=10,
                        early_exit=early_exit, use_prefix=use_prefix)
            results.append((r.steps, r.success, snapshot(model)))
    for steps, success, snap in results[1:]:
        assert (steps, success) == results[0][:2]
        for k, v in snap.items():
            torch.testing.assert_close(v, results[0][2][k], rtol=1e-6, atol=1e-6)


def test_already_satisfied_edit_takes_no_step():
    model = make_model()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)
    before = snapshot(model)
    r = fe.edit(model, x, y, editor=fe.GD(1.0), params="out")
    assert r.success and r.steps == 0 and r.loss <= 0
    assert_identical(model, before)


@pytest.mark.parametrize("editor", EDITORS, ids=lambda e: e.name)
def test_failed_edit_rolls_back_by_default_or_is_kept(editor):
    model = make_model()
    x = torch.randn(1, 1, 8, 8)
    y = wrong_label(model, x)
    before = snapshot(model)
    small = editor.with_hparams(lr=1e-7)
    r = fe.edit(model, x, y, editor=small, params="out", max_steps=2)
    assert not r.success and not r.applied and r.steps == 2 and r.loss > 0
    assert_identical(model, before)
    r = fe.edit(model, x, y, editor=small, params="out", max_steps=2, on_failure="keep")
    assert not r.success and r.applied
    assert not torch.equal(model.out.weight, before["out.weight"])
    r.revert()
    assert_identical(model, before)


def test_modes_are_restored_and_edit_runs_in_eval_mode():
    model = make_model()
    model.train()
    model.head.eval()  # a mixed state must come back exactly
    x = torch.randn(1, 1, 8, 8)
    before = snapshot(model)
    seen = []
    model.block[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    r = fe.edit(model, x, wrong_label(model.eval(), x), editor=fe.RMSProp(0.02), params="block", max_steps=20)
    model.train()
    model.head.eval()
    r2 = fe.edit(model, x, 0, editor=fe.RMSProp(0.02), params="block")
    assert seen and not any(seen)  # dropout and BatchNorm saw eval mode
    assert model.training and model.stem.training and not model.head.training
    r2.revert()
    r.revert()
    assert_identical(model, before)  # BatchNorm running statistics untouched too


def test_param_selection_forms_are_equivalent():
    x = torch.randn(1, 1, 8, 8)
    outs = []
    for spec in ("out", ["out.weight", "out.bias"], lambda m: [m.out.weight, m.out.bias]):
        model = make_model()
        r = fe.edit(model, x, wrong_label(model, x), editor=fe.GD(0.5), params=spec(model) if callable(spec) else spec)
        assert r.param_names == ["out.weight", "out.bias"]
        outs.append(model.out.weight.detach().clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_multi_sample_edit_reductions():
    model = make_model()
    x = torch.randn(3, 1, 8, 8)
    y = wrong_label(model, x)
    r = fe.edit(model, x, y, editor=fe.RMSProp(0.02), params=["head", "out"], max_steps=30, reduction="max")
    assert r.success
    with torch.no_grad():
        assert torch.equal(model(x).argmax(-1), y)  # "max": every sample satisfied
    r.revert()
    r = fe.edit(model, x, y, editor=fe.RMSProp(0.02), params=["head", "out"], max_steps=30, reduction="mean")
    assert r.success  # "mean": the average margin is satisfied


BAD_INPUTS = {
    "empty params": (dict(params=[]), ValueError, "empty"),
    "unknown params": (dict(params="layer9"), ValueError, "layer9"),
    "label too big": (dict(y=10), ValueError, "out of range"),
    "negative label": (dict(y=-1), ValueError, "out of range"),
    "float label": (dict(y=torch.tensor([1.0])), TypeError, "integer"),
    "label count": (dict(y=torch.tensor([1, 2])), ValueError, "one label per sample"),
    "x dtype": (dict(x=torch.randn(1, 1, 8, 8, dtype=torch.float64)), ValueError, "dtype"),
    "x shape": (dict(x=torch.randn(1, 3, 8, 8)), ValueError, "failed on x of shape"),
    "x device": (dict(x=torch.randn(1, 1, 8, 8, device="meta")), ValueError, "meta"),
    "x not tensor": (dict(x=[[1.0]]), TypeError, "tensor"),
    "empty x": (dict(x=torch.randn(0, 1, 8, 8), y=torch.zeros(0, dtype=torch.long)), ValueError, "non-empty"),
    "max_steps": (dict(max_steps=-1), ValueError, "max_steps"),
    "reduction": (dict(reduction="sum"), ValueError, "reduction"),
    "on_failure": (dict(on_failure="maybe"), ValueError, "on_failure"),
    "editor name": (dict(editor="lbfgs"), ValueError, "unknown editor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clearly_and_leaves_model_identical(case):
    model = make_model()
    model.train()
    kwargs, exc, match = BAD_INPUTS[case]
    call = dict(x=torch.randn(1, 1, 8, 8), y=3, editor=fe.RMSProp(0.02), params="out")
    call.update(kwargs)
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fe.edit(model, **call)
    assert_identical(model, before)
    assert all(m.training for m in model.modules())


def test_non_finite_loss_or_gradient_raises_and_leaves_model_identical():
    model = make_model()
    before = snapshot(model)
    x = torch.full((1, 1, 8, 8), float("nan"))
    with pytest.raises(fe.EditError, match="non-finite"):
        fe.edit(model, x, 3, editor=fe.GD(0.1), params="out")
    assert_identical(model, before)
    # finite at first, then the huge step overflows the logits: caught at the step where it happens
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(fe.EditError, match="non-finite"):
        fe.edit(model, x, wrong_label(model, x), editor=fe.GD(1e38), params=["head", "out"], max_steps=5)
    assert_identical(model, before)


def test_run_edit_loop_masks_without_early_exit():
    """With early_exit=False the loop runs all steps; satisfied edits must stay frozen."""
    model = make_model()
    x = torch.randn(1, 1, 8, 8)
    y = wrong_label(model, x)
    target = EditTarget.build(model, "out")
    acts = target.prefix(x)
    out_full = run_edit_loop(target.loss_fn(acts, y, "max"), target.params, fe.GD(0.5), 30, early_exit=False)
    out_early = run_edit_loop(target.loss_fn(acts, y, "max"), target.params, fe.GD(0.5), 30, early_exit=True)
    assert int(out_full.steps) == int(out_early.steps) < 30
    for a, b in zip(out_full.params, out_early.params):
        assert torch.equal(a, b)
    assert int(out_full.bad_step) == -1
