"""fastedit.evaluate against a naive loop: copy the model, edit it, classify the control set."""
import copy

import pytest
import torch

import fastedit as fe
from test_edit import make_model, snapshot, assert_identical


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
