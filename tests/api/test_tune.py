"""fastedit.tune (fastedit/tuning.py): the selection rule on a known answer, a real end-to-end run, validation."""
import csv
import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_identical, make_model, snapshot

import fastedit as fe
import fastedit.tuning as ft
from fastedit.tuning import TuneResult, tune


def fake_evaluate(results):
    """A stand-in for fastedit.evaluate whose metrics are looked up by the editor's lr."""
    calls = []

    def evaluate(model, edits, control, editor, params, max_steps, *, batch_size, progress, **kw):
        assert progress is False
        calls.append(editor)
        dd, sr, steps = results[editor.lr]
        d = dict(drawdown=dd, success_rate=sr, mean_steps=steps, flip_rate=dd / 2)
        return SimpleNamespace(**d, to_dict=lambda: dict(d))

    return evaluate, calls


# lr -> (drawdown, success_rate, mean_steps)
KNOWN = {
    1e-4: (0.001, 0.10, 10.0),   # infeasible, lowest drawdown: must not win
    1e-3: (0.002, 0.90, 8.0),    # infeasible
    1e-2: (0.010, 0.96, 4.0),    # feasible, tie on drawdown, lower success
    2e-2: (0.010, 1.00, 5.0),    # feasible, tie on drawdown, higher success, more steps
    3e-2: (0.010, 1.00, 3.0),    # feasible, tie on drawdown and success, fewest steps -> the answer
    5e-2: (0.010, 1.00, 3.0),    # full tie with 3e-2 but larger lr
    1e-1: (0.050, 1.00, 1.0),    # feasible, higher drawdown at high lr
    1.0: (0.300, 1.00, 1.0),
}


def test_known_answer(monkeypatch):
    fake, calls = fake_evaluate(KNOWN)
    monkeypatch.setattr(ft, "evaluate", fake)
    lrs = list(KNOWN)
    res = tune(None, None, None, "gd", grid={"lr": lrs}, progress=False)
    assert isinstance(res, TuneResult)
    assert res.feasible and res.min_success == 0.95
    assert isinstance(res.editor, fe.GD) and res.editor.lr == 3e-2
    assert res.report.mean_steps == 3.0
    assert [r["lr"] for r in res.table] == lrs and len(calls) == len(lrs)
    assert set(res.table[0]) == {"lr", "drawdown", "success_rate", "mean_steps", "flip_rate", "seconds"}
    json.dumps(res.to_dict())
    # a stricter constraint moves the answer; a looser one lets the low-drawdown point win
    assert tune(None, None, None, "gd", grid={"lr": lrs}, min_success=0.97, progress=False).editor.lr == 3e-2
    assert tune(None, None, None, "gd", grid={"lr": lrs}, min_success=0.9, progress=False).editor.lr == 1e-3
    assert tune(None, None, None, "gd", grid={"lr": lrs}, min_success=0.0, progress=False).editor.lr == 1e-4


def test_infeasible_picks_highest_success(monkeypatch):
    table = {1e-3: (0.01, 0.5, 10.0), 1e-2: (0.05, 0.8, 9.0), 1e-1: (0.02, 0.8, 9.0), 1.0: (0.4, 0.7, 8.0)}
    monkeypatch.setattr(ft, "evaluate", fake_evaluate(table)[0])
    with pytest.warns(UserWarning, match="no grid point"):
        res = tune(None, None, None, "gd", grid={"lr": list(table)}, progress=False)
    assert not res.feasible and res.editor.lr == 1e-1  # success 0.8, tie broken by lower drawdown
    assert res.to_dict()["feasible"] is False


def test_grid_product_and_kept_hparams(monkeypatch):
    fake, calls = fake_evaluate({lr: (0.0, 1.0, 1.0) for lr in ft.DEFAULT_LRS})
    monkeypatch.setattr(ft, "evaluate", fake)
    res = tune(None, None, None, fe.RMSProp(1e-3, beta=0.7, eps=1e-4), progress=False)
    assert len(res.table) == 22 and len(calls) == 22  # default grid: 11 lrs × beta {0.5, 0.9}
    assert [r["beta"] for r in res.table[:2]] == [0.5, 0.9]
    assert all(c.eps == 1e-4 for c in calls)  # non-searched hyper-parameter kept
    assert math.isclose(ft.DEFAULT_LRS[0], 1e-5) and math.isclose(ft.DEFAULT_LRS[-1], 1.0)
    assert all(math.isclose(b / a, math.sqrt(10)) for a, b in zip(ft.DEFAULT_LRS, ft.DEFAULT_LRS[1:]))
    calls.clear()
    tune(None, None, None, "adam", grid={"lr": [1e-2], "beta1": [0.3, 0.9], "beta2": [0.99]}, progress=False)
    assert [c.betas for c in calls] == [(0.3, 0.99), (0.9, 0.99)]
    assert tune(None, None, None, "gd", progress=False).table[0].keys() >= {"lr"}


def test_end_to_end_tiny_model():
    model = make_model()
    torch.manual_seed(3)
    edits = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    control = (torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    before = snapshot(model)
    lrs = [0.01, 0.1, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infeasibility warning is acceptable here
        res = tune(model, edits, control, "gd", params="out", max_steps=5, grid={"lr": lrs}, progress=False)
    assert_identical(model, before)
    assert [r["lr"] for r in res.table] == lrs
    assert res.editor.lr in lrs and isinstance(res.editor, fe.GD)
    row = res.table[lrs.index(res.editor.lr)]
    assert row["drawdown"] == res.report.drawdown and row["success_rate"] == res.report.success_rate
    ok = [r for r in res.table if r["success_rate"] >= 0.95]
    assert res.feasible == bool(ok)
    if ok:
        assert row["drawdown"] == min(r["drawdown"] for r in ok)
    else:
        assert row["success_rate"] == max(r["success_rate"] for r in res.table)
    json.dumps(res.to_dict())


def test_to_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "evaluate", fake_evaluate(KNOWN)[0])
    res = tune(None, None, None, "gd", grid={"lr": [1e-2, 2e-2, 3e-2]}, progress=False)
    path = tmp_path / "t.csv"
    res.to_csv(path)
    rows = list(csv.reader(open(path)))
    assert len(rows) == 4 and rows[0][:2] == ["lr", "drawdown"]
    assert [float(r[0]) for r in rows[1:]] == [1e-2, 2e-2, 3e-2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid={"lr": [0.1], "momentum": [0.9]}), "momentum"),
    (dict(grid={"lr": []}), "empty"),
    (dict(grid={}), "non-empty"),
    (dict(grid={"lr": [0.1]}, min_success=1.5), "min_success"),
    (dict(grid={"lr": [0.1]}, min_success=-0.1), "min_success"),
    (dict(editor="nope"), "unknown editor"),
    (dict(editor="adam", grid={"betas": [(0.5, 0.9)], "beta1": [0.5]}), "not both"),
    (dict(editor="gd", grid={"lr": [-1.0]}), "lr"),
])
def test_validation(kwargs, match, monkeypatch):
    monkeypatch.setattr(ft, "evaluate", lambda *a, **k: pytest.fail("evaluate must not be called"))
    kwargs.setdefault("editor", "gd")
    with pytest.raises(ValueError, match=match):
        tune(None, None, None, progress=False, **kwargs)
