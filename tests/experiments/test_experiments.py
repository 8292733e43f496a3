"""The Editable Training CIFAR-10 experiment script (benchmarks/experiments/editable_training_cifar.py) on a tiny
JPEG zip: it runs end to end, resumes bit-identically from its checkpoints, and its summary is what
the cells say."""
import json
import statistics

import pytest
import torch
from helpers import write_jpeg_zip as _write_jpeg_zip

from benchmarks.experiments import editable_training_cifar, editable_training_cifar_diagnose


@pytest.fixture(scope="module")
def script():
    return editable_training_cifar


@pytest.fixture
def tiny_zip(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cifar10-jpeg.zip"
    _write_jpeg_zip(path, n_train=40, n_test=30, seed=5)
    return path


def _args(zip_path, out, *extra):
    return ["--data", str(zip_path), "--out-dir", str(out), "--model", "resnet20", "--init", "scratch",
            "--steps", "4", "--batch-size", "8", "--edits", "4", "--control", "12", "--tune-edits", "3",
            "--tune-control", "10", "--lr-grid", "1e-3", "1e-2", "--seeds", "0", "--configs", "plain", "et-c0.1",
            "--threads", "1", "--quiet", "--no-reference", *extra]


@pytest.mark.slow
def test_runs_and_resumes_bit_identically(script, tiny_zip, tmp_path):
    straight = tmp_path / "straight"
    assert script.main(_args(tiny_zip, straight)) == 0
    resumed = tmp_path / "resumed"
    calls = 0
    while True:  # stop after every 3 training steps (checkpointed), then run the same command again
        calls += 1
        rc = script.main(_args(tiny_zip, resumed, "--max-steps-per-call", "3"))
        if rc == 0:
            break
        assert rc == script.EXIT_TIME_LIMIT and calls < 10
    assert calls == 3  # the cap is per cell: plain 3 | plain 1 + et 3 | et 1
    for name in ("plain", "et-c0.1"):
        a = torch.load(straight / "ckpt" / f"{name}_seed0.pt", weights_only=False)
        b = torch.load(resumed / "ckpt" / f"{name}_seed0.pt", weights_only=False)
        assert a["state"]["step"] == b["state"]["step"] == 4
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), (name, k)
        ca = json.loads((straight / "cells" / f"{name}_seed0.json").read_text())
        cb = json.loads((resumed / "cells" / f"{name}_seed0.json").read_text())
        assert ca["report"]["drawdown"] == cb["report"]["drawdown"]
        assert ca["test_error"] == cb["test_error"]
        assert ca["tuned_editor"] == cb["tuned_editor"]
    et_cell = json.loads((straight / "cells" / "et-c0.1_seed0.json").read_text())
    assert et_cell["c_loc"] == 0.1 and et_cell["learned_editor"]["editor"] == "rmsprop"
    assert {"loss_base", "loss_loc", "edit_success", "edit_steps"} <= set(et_cell["training"]["log"][-1])
    for png in ("drawdown_vs_test_error.png", "per_class_drawdown.png"):
        assert (straight / png).read_bytes().startswith(b"\x89PNG")

    # the diagnosis reads the same cells and checkpoints and leaves them as they were
    diagnose = editable_training_cifar_diagnose
    before = (straight / "ckpt" / "plain_seed0.pt").read_bytes()
    assert diagnose.main(["--out-dir", str(straight), "--data", str(tiny_zip), "--edits", "3", "--control", "8",
                          "--batches", "2", "--batch-size", "4", "--quiet"]) == 0
    assert (straight / "ckpt" / "plain_seed0.pt").read_bytes() == before
    rows = json.loads((straight / "diagnose.json").read_text())["rows"]
    assert [(r["config"], r["seed"]) for r in rows] == [("et-c0.1", 0), ("plain", 0)]
    for r in rows:
        for key in ("eval on train images", "eval on test images"):
            assert 0.0 <= r[key]["flip_rate"] <= 1.0 and r[key]["mean_kl"] >= 0.0
        assert r["training L_loc (shared)"]["loss_loc"] >= 0.0


@pytest.mark.slow
def test_summary_matches_cells(script, tiny_zip, tmp_path):
    out = tmp_path / "two_seeds"
    assert script.main(_args(tiny_zip, out)[:-1] + ["--seeds", "0", "1", "--steps", "2", "--fixed-lr", "1e-3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cells = {(c["config"], c["seed"]): c for c in
             (json.loads(p.read_text()) for p in (out / "cells").glob("*_seed*.json"))}
    assert set(cells) == {("plain", 0), ("plain", 1), ("et-c0.1", 0), ("et-c0.1", 1)}
    for name in ("plain", "et-c0.1"):
        dd = [cells[(name, s)]["report"]["drawdown"] for s in (0, 1)]
        got = summary["per_config"][name]["drawdown"]
        assert got["mean"] == pytest.approx(statistics.fmean(dd), abs=1e-15)
        assert got["std"] == pytest.approx(statistics.stdev(dd), abs=1e-15)
    diffs = [cells[("et-c0.1", s)]["report"]["drawdown"] - cells[("plain", s)]["report"]["drawdown"] for s in (0, 1)]
    assert summary["vs_plain"]["et-c0.1"]["drawdown_minus_plain"]["mean"] == pytest.approx(statistics.fmean(diffs))
    # the fixed-editor evaluation: the same RMSProp for every model, stored in each cell and summarised
    fixed = summary["fixed_editor"]["rmsprop lr=0.001"]
    dd = {k: c["fixed_reports"]["rmsprop lr=0.001"]["drawdown"] for k, c in cells.items()}
    assert fixed["plain"]["drawdown"]["mean"] == pytest.approx(statistics.fmean([dd[("plain", 0)], dd[("plain", 1)]]))
    assert fixed["et-c0.1"]["drawdown_minus_plain"]["mean"] == pytest.approx(
        statistics.fmean([dd[("et-c0.1", s)] - dd[("plain", s)] for s in (0, 1)]))
    assert all(c["fixed_reports"]["rmsprop lr=0.001"]["editor"]["lr"] == 1e-3 for c in cells.values())
    # the shared editor: each seed's plain model's tuned editor, for every model of that seed
    for (name, seed), c in cells.items():
        shared = c["fixed_reports"][script.SHARED_KEY]
        assert shared["editor"] == cells[("plain", seed)]["tuned_editor"]
        if name == "plain":
            assert shared == c["report"]
    assert "et-c0.1" in summary["fixed_editor"][script.SHARED_KEY]


@pytest.mark.slow
def test_scratch_preset_trains_first_then_evaluates_with_refined_tuning(script, tiny_zip, tmp_path):
    out = tmp_path / "scratch"
    argv = ["--preset", "scratch", "--data", str(tiny_zip), "--out-dir", str(out), "--steps", "3", "--batch-size", "8",
            "--edits", "4", "--control", "12", "--tune-edits", "3", "--tune-control", "10", "--lr-grid", "1e-3", "1e-2",
            "--seeds", "0", "--threads", "1", "--quiet", "--no-reference"]
    assert script.main(argv + ["--train-only"]) == 0
    assert not list((out / "cells").glob("*.json"))  # trained, not evaluated
    names = script.DEFAULT_CONFIGS["scratch"]
    assert {p.stem for p in (out / "ckpt").glob("*.pt")} == {f"{n}_seed0" for n in names}
    assert len(names) == 4 and "et-c0.01-eval" in names
    before = {n: (out / "ckpt" / f"{n}_seed0.pt").read_bytes() for n in names}
    assert script.main(argv) == 0  # evaluates the trained cells without training again
    assert {n: (out / "ckpt" / f"{n}_seed0.pt").read_bytes() for n in names} == before
    for n in names:
        cell = json.loads((out / "cells" / f"{n}_seed0.json").read_text())
        assert cell["setting"]["init"] == "scratch" and cell["setting"]["refine"] is True
        stages = [r["stage"] for r in cell["tune_table"]]
        assert stages[:2] == ["grid", "grid"] and len(stages) > 2  # the grid, then the refinement
        assert cell["tune_lr_resolution"] is None or cell["tune_lr_resolution"] > 1
    eval_cell = json.loads((out / "cells" / "et-c0.01-eval_seed0.json").read_text())
    assert eval_cell["loc_mode"] == "eval" and eval_cell["c_loc"] == 0.01


def test_eval_split_is_disjoint_and_fixed(script):
    xte = torch.arange(50, dtype=torch.float32).view(50, 1)
    yte = torch.arange(50) % 10
    xtr = 100 + torch.arange(20, dtype=torch.float32).view(20, 1)
    cfg = {"edits": 10, "control": 25, "tune_control": 15, "tune_edits": 5}
    a = script.eval_split(xte, yte, xtr, cfg)
    b = script.eval_split(xte, yte, xtr, cfg)
    assert torch.equal(a["edits"][0], b["edits"][0]) and torch.equal(a["edits"][1], b["edits"][1])
    ids = [set(a[k][0].view(-1).tolist()) for k in ("edits", "control", "tune_control")]
    assert sum(map(len, ids)) == 50 and len(set.union(*ids)) == 50  # disjoint, all test images used
    assert set(a["tune_edits"][0].view(-1).tolist()) <= set(range(100, 120))
    assert torch.equal(a["edit_classes"], yte[a["edits"][0].view(-1).long()])
    with pytest.raises(SystemExit, match="exceeds"):
        script.eval_split(xte, yte, xtr, {**cfg, "control": 40})


def test_help_explains_itself(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--preset" in text and "--time-limit" in text and "resume" in text


def test_time_limit_stops_cleanly_and_resumes(script, tiny_zip, tmp_path):
    out = tmp_path / "limited"
    # a budget already spent: nothing is trained or written, exit code 3 says "run me again"
    assert script.main(_args(tiny_zip, out, "--time-limit", "1e-3", "--eval-reserve", "0")) == script.EXIT_TIME_LIMIT
    assert not list((out / "cells").glob("*.json")) and not list((out / "ckpt").glob("*.pt"))
    assert script.main(_args(tiny_zip, out, "--time-limit", "3600")) == 0
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == ["et-c0.1_seed0.json", "plain_seed0.json"]
