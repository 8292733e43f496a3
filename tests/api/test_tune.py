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
    assert set(res.table[0]) == {"lr", "drawdown", "success_rate", "mean_steps", "flip_rate", "seconds", "stage"}
    assert res.lr_resolution is None  # a given grid is searched exactly as given
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
    res = tune(None, None, None, fe.RMSProp(1e-3, beta=0.7, eps=1e-4), refine=False, progress=False)
    assert res.lr_resolution is None
    assert len(res.table) == 22 and len(calls) == 22  # default grid: 11 lrs × beta {0.5, 0.9}
    assert [r["beta"] for r in res.table[:2]] == [0.5, 0.9]
    assert all(c.eps == 1e-4 for c in calls)  # non-searched hyper-parameter kept
    assert math.isclose(ft.DEFAULT_LRS[0], 1e-5) and math.isclose(ft.DEFAULT_LRS[-1], 1.0)
    assert all(math.isclose(b / a, math.sqrt(10)) for a, b in zip(ft.DEFAULT_LRS, ft.DEFAULT_LRS[1:]))
    calls.clear()
    tune(None, None, None, "adam", grid={"lr": [1e-2], "beta1": [0.3, 0.9], "beta2": [0.99]}, progress=False)
    assert [c.betas for c in calls] == [(0.3, 0.99), (0.9, 0.99)]
    assert tune(None, None, None, "gd", refine=False, progress=False).table[0].keys() >= {"lr", "stage"}


def tiny_setting(seed: int, n_edits: int, n_control: int):
    """The tiny CNN of tests/helpers.py, random edits and a random control set."""
    model = make_model()
    torch.manual_seed(seed)
    edits = (torch.randn(n_edits, 1, 8, 8), torch.randint(0, 10, (n_edits,)))
    control = (torch.randn(n_control, 1, 8, 8), torch.randint(0, 10, (n_control,)))
    return model, edits, control


def test_end_to_end_tiny_model():
    model, edits, control = tiny_setting(3, 8, 40)
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
    (dict(editor="gd", grid={"lr": [0.1]}, resolution=1.0), "resolution"),
    (dict(editor="gd", grid={"lr": [0.1]}, resolution=float("nan")), "resolution"),
    (dict(editor="gd", grid={"lr": [-0.1, 0.1]}, refine=True), "positive"),
])
def test_validation(kwargs, match, monkeypatch):
    monkeypatch.setattr(ft, "evaluate", lambda *a, **k: pytest.fail("evaluate must not be called"))
    kwargs.setdefault("editor", "gd")
    with pytest.raises(ValueError, match=match):
        tune(None, None, None, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------
# the refinement (default grid): known answers from metrics that are smooth functions of lr
# ------------------------------------------------------------------------------------------------
def analytic_evaluate(metrics):
    """A stand-in for fastedit.evaluate: ``metrics(editor) -> (drawdown, success_rate, mean_steps)``."""
    calls = []

    def evaluate(model, edits, control, editor, params, max_steps, *, batch_size, progress, **kw):
        calls.append(editor)
        dd, sr, steps = metrics(editor)
        d = dict(drawdown=dd, success_rate=sr, mean_steps=steps, flip_rate=dd / 2)
        return SimpleNamespace(**d, to_dict=lambda: dict(d))

    return evaluate, calls


def threshold(lr_star):
    """Success only from lr_star on, drawdown growing with lr: the answer is lr_star's feasible side."""
    return lambda ed: (ed.lr, 1.0 if ed.lr >= lr_star else 0.5 * ed.lr / lr_star, 3.0)


@pytest.mark.parametrize("lr_star", [7.3e-4, 2.2e-2, 1.1e-5, 0.8])
def test_refine_finds_the_feasibility_threshold(monkeypatch, lr_star):
    fake, calls = analytic_evaluate(threshold(lr_star))
    monkeypatch.setattr(ft, "evaluate", fake)
    res = tune(None, None, None, "gd", progress=False)
    assert res.feasible and res.editor.lr >= lr_star
    assert res.editor.lr / lr_star <= ft.DEFAULT_RESOLUTION ** 2   # within the resolution of the threshold
    assert res.lr_resolution <= ft.DEFAULT_RESOLUTION * (1 + 1e-9)
    stages = [r["stage"] for r in res.table]
    assert stages[:11] == ["grid"] * 11 and "refine" in stages
    lrs = [r["lr"] for r in res.table]
    assert len(lrs) == len(set(lrs)) == len(calls) <= 11 + 8  # every point once, few extra points
    # the choice is the rank-best of every row measured (not only of the grid)
    ok = [r for r in res.table if r["success_rate"] >= 0.95]
    assert res.report.drawdown == min(r["drawdown"] for r in ok)


def test_refine_u_shaped_drawdown(monkeypatch):
    opt = 4.1e-3  # all feasible, drawdown minimal at opt (between grid points)
    fake, _ = analytic_evaluate(lambda ed: ((math.log(ed.lr / opt)) ** 2, 1.0, 2.0))
    monkeypatch.setattr(ft, "evaluate", fake)
    res = tune(None, None, None, "gd", progress=False)
    assert max(res.editor.lr / opt, opt / res.editor.lr) <= ft.DEFAULT_RESOLUTION
    assert 1.0 < res.lr_resolution <= ft.DEFAULT_RESOLUTION * (1 + 1e-9)
    finer = tune(None, None, None, "gd", resolution=1.02, progress=False)
    assert max(finer.editor.lr / opt, opt / finer.editor.lr) <= 1.02
    assert len(finer.table) > len(res.table)


def test_refine_expands_past_the_grid_edge(monkeypatch):
    for opt in (8.0, 1.3e-6):  # outside 1e-5 … 1: reached by stepping ×√10 outward
        fake, _ = analytic_evaluate(lambda ed: ((math.log(ed.lr / opt)) ** 2, 1.0, 2.0))
        monkeypatch.setattr(ft, "evaluate", fake)
        res = tune(None, None, None, "gd", progress=False)
        assert "expand" in [r["stage"] for r in res.table]
        assert max(res.editor.lr / opt, opt / res.editor.lr) <= ft.DEFAULT_RESOLUTION
    far = 1e6  # beyond MAX_EXPANSIONS steps: the choice is at the edge, and says so
    fake, _ = analytic_evaluate(lambda ed: ((math.log(ed.lr / far)) ** 2, 1.0, 2.0))
    monkeypatch.setattr(ft, "evaluate", fake)
    res = tune(None, None, None, "gd", progress=False)
    assert res.lr_resolution == math.inf
    assert math.isclose(res.editor.lr, 10.0 ** (ft.MAX_EXPANSIONS / 2))


def test_refine_per_beta_and_infeasible(monkeypatch):
    # RMSProp: each beta has its own threshold; the smaller drawdown is at beta 0.9
    stars = {0.5: 3e-3, 0.9: 2e-4}
    fake, _ = analytic_evaluate(lambda ed: (ed.lr * (1 if ed.beta == 0.9 else 2),
                                             1.0 if ed.lr >= stars[ed.beta] else 0.0, 3.0))
    monkeypatch.setattr(ft, "evaluate", fake)
    res = tune(None, None, None, "rmsprop", progress=False)
    assert res.editor.beta == 0.9 and 1.0 <= res.editor.lr / stars[0.9] <= ft.DEFAULT_RESOLUTION ** 2
    for beta, star in stars.items():  # both betas were refined
        refined = [r["lr"] for r in res.table if r["beta"] == beta and r["stage"] == "refine"]
        assert refined and min(abs(math.log(lr / star)) for lr in refined) < math.log(ft.DEFAULT_RESOLUTION ** 2)
    # nothing feasible: refinement climbs the success rate, warns, and reports infeasible
    fake, _ = analytic_evaluate(lambda ed: (0.01, 0.5 - (math.log10(ed.lr) + 2.3) ** 2 / 100, 10.0))
    monkeypatch.setattr(ft, "evaluate", fake)
    with pytest.warns(UserWarning, match="no grid point"):
        res = tune(None, None, None, "gd", progress=False)
    assert not res.feasible and max(res.editor.lr / 10 ** -2.3, 10 ** -2.3 / res.editor.lr) <= ft.DEFAULT_RESOLUTION


def test_refine_opt_in_for_a_given_grid(monkeypatch):
    fake, _ = analytic_evaluate(threshold(5e-3))
    monkeypatch.setattr(ft, "evaluate", fake)
    res = tune(None, None, None, "gd", grid={"lr": [1e-4, 1e-3, 1e-2, 1e-1]}, refine=True, progress=False)
    assert 1.0 <= res.editor.lr / 5e-3 <= ft.DEFAULT_RESOLUTION ** 2
    assert [r["stage"] for r in res.table[:4]] == ["grid"] * 4


def test_refine_end_to_end_tiny_model():
    model, edits, control = tiny_setting(5, 6, 30)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune(model, edits, control, "gd", params="out", max_steps=5,
                   grid={"lr": [1e-3, 1e-2, 1e-1, 1.0]}, refine=True, progress=False)
    assert_identical(model, before)
    # the chosen editor's report agrees with an independent evaluate of it
    again = fe.evaluate(model, edits, control, editor=res.editor, params="out", max_steps=5, progress=False)
    assert again.drawdown == res.report.drawdown and again.success_rate == res.report.success_rate
    json.dumps(res.to_dict())
