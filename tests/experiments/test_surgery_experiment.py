"""The Neural Network Surgery CIFAR-10 experiment script (benchmarks/experiments/surgery_cifar.py) on a tiny
lossless-format npz and a randomly initialised ResNet-20: both parts run end to end, every surgery
stays within its budget, the numbers agree with a plain recomputation, and a second call resumes
without recomputing anything."""
import json

import numpy as np
import pytest
import torch

import fastedit as fe
from benchmarks.experiments import surgery_cifar
from fastedit import data as fdata
from fastedit.models import load_pretrained_cifar_resnet
from fastedit.models.resnet_cifar import cifar_resnet

pytestmark = pytest.mark.slow  # the module fixture runs the experiment's cells (~20 s)


@pytest.fixture(scope="module")
def script():
    return surgery_cifar


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)

    def images(labels):  # a colour per class plus noise: a random network then predicts several classes
        colours = np.random.default_rng(7).integers(0, 256, (10, 3))
        noise = rng.integers(0, 80, (len(labels), 32, 32, 3))
        return np.clip(colours[labels][:, None, None, :] * 0.7 + noise, 0, 255).astype(np.uint8)

    y_train, y_test = np.arange(41) % 10, (np.arange(31) * 7) % 10  # odd sizes, every class
    x_train, x_test = images(y_train), images(y_test)
    npz = d / "tiny_lossless.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    torch.manual_seed(11)
    model = cifar_resnet(20)
    # BatchNorm statistics of the data (a cumulative average over one pass), so that the random
    # network's logits are of a sane scale in eval mode
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(fdata.to_float_tensor(x_train, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD))
    model.eval()
    weights = d / "resnet20-random.th"
    torch.save(model.state_dict(), weights)
    return npz, weights


PATTERN = ["--part", "pattern", "--budgets", "10", "100", "--inject", "8", "--clean", "6", "--batch-size", "4",
           "--epochs", "2"]
EDITS = ["--part", "edits", "--edits", "4", "--tune-edits", "3", "--lr-grid", "1e-3", "1e-2", "--nnz-edits", "2",
         "--surgery-budgets", "10", "100", "--surgery-steps", "8", "--ewc-lambdas-gd", "10",
         "--ewc-lambdas-rmsprop", "1e5", "--dknn-k", "5",
         "--cnp-steps", "3", "--cnp-batch-size", "6", "--cnp-edits-per-batch", "2"]


def _common(inputs, out):
    npz, weights = inputs
    return ["--data", str(npz), "--weights", str(weights), "--out-dir", str(out), "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(script, inputs, tmp_path_factory):
    """Part A in two calls (stopped after 3 cells, then resumed), part B in one; then a second call
    of each, which must recompute nothing."""
    out = tmp_path_factory.mktemp("out")
    assert script.main(_common(inputs, out) + PATTERN + ["--max-new-cells", "3"]) == 3
    assert len(list((out / "cells").glob("pattern_*.json"))) == 3
    assert script.main(_common(inputs, out) + PATTERN) == 0
    assert script.main(_common(inputs, out) + EDITS) == 0
    cells = sorted((out / "cells").glob("*.json"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells}
    summaries = {part: json.loads((out / f"summary_{part}.json").read_text()) for part in ("pattern", "edits")}
    assert script.main(_common(inputs, out) + PATTERN) == 0
    assert script.main(_common(inputs, out) + EDITS) == 0
    return out, before, summaries


def _cells(out, part):
    return {json.loads(p.read_text())["cell"]: json.loads(p.read_text())
            for p in (out / "cells").glob(f"{part}_*.json")}


def test_pattern_cells(runs):
    out, _, _ = runs
    cells = _cells(out, "pattern")
    expected = {"pattern_original", "pattern_unrestricted"} | {
        f"pattern_{m}_b{b}" for m in ("select-random", "select-grad", "select-delta", "lagrange", "dynamic")
        for b in (10, 100)}
    assert set(cells) == expected
    for name, c in cells.items():
        assert c["command"].startswith("python benchmarks/experiments/surgery_cifar.py") and "--part pattern" in c["command"]
        assert c["machine"]["threads"] == 1
        for key in ("pattern_success", "clean_accuracy", "consistency"):
            if key in c:
                assert 0.0 <= c[key] <= 1.0, (name, key)
        if name == "pattern_original":
            assert c["consistency"] == 1.0 and c["nnz"] == 0
            continue
        assert 0 <= c["nnz"] <= c["budget"]
        assert sum(c["nnz_per_param"].values()) == c["nnz"]
        assert c["reverted_bit_identical"] is True
    unrestricted = cells["pattern_unrestricted"]
    assert unrestricted["budget"] == unrestricted["num_parameters"] == sum(
        p.numel() for p in cifar_resnet(20).parameters())
    assert unrestricted["nnz"] > 1000  # dense: far more scalars than the sparse budgets


def test_pattern_cell_matches_a_plain_recomputation(runs, inputs, script):
    """Re-run one surgery with the same arguments and measure it with plain forwards."""
    out, _, _ = runs
    npz, weights = inputs
    cell = _cells(out, "pattern")["pattern_dynamic_b100"]
    model = load_pretrained_cifar_resnet(weights)
    xtr, ytr = fdata.load_cifar10_lossless(npz, "train")
    xte, yte = fdata.load_cifar10_lossless(npz, "test")
    norm = lambda x: fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(xtr.shape[0], generator=gen)
    inject = [int(i) for i in order if int(ytr[i]) != 0][:8]
    rest = [int(i) for i in order if int(i) not in inject][:6]
    trig = xtr[inject].clone()
    trig[:, -3:, -3:, :] = 255
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(norm(xte)).argmax(-1)
    res = fe.surgery(model, norm(trig), 0, 100, "dynamic", editor=fe.ScaledGD(0.1), steps=2, goal="pattern",
                     clean=(norm(xtr[rest]), ytr[rest]), batch_size=4, seed=0, on_failure="keep")
    changed = sum(int((model.state_dict()[k] != v).sum()) for k, v in before.items())
    xte_t = xte.clone()
    xte_t[:, -3:, -3:, :] = 255
    with torch.no_grad():
        pred = model(norm(xte)).argmax(-1)
        pred_t = model(norm(xte_t)).argmax(-1)
    other = yte != 0
    assert cell["nnz"] == res.nnz == changed
    assert cell["consistency"] == pytest.approx(float((pred == base).double().mean()))
    assert cell["clean_accuracy"] == pytest.approx(float((pred == yte).double().mean()))
    assert cell["pattern_success"] == pytest.approx(float((pred_t[other] == 0).double().mean()))


def test_edit_cells(runs, inputs):
    out, _, _ = runs
    cells = _cells(out, "edits")
    expected = {"edits_gd", "edits_rmsprop", "edits_dknn", "edits_cnp", "edits_ewc-gd_lam10",
                "edits_ewc-rmsprop_lam1e5"} | {
        f"edits_surgery-{m}_b{b}" for m in ("dynamic", "select-grad") for b in (10, 100)}
    assert set(cells) == expected
    for name, c in cells.items():
        assert c["num_edits"] == 4
        for key in ("base_error", "success_rate", "flip_rate"):
            assert 0.0 <= c[key] <= 1.0, (name, key)
        assert -1.0 <= c["drawdown"] <= 1.0
        pe = c.get("per_edit")
        if pe is not None:  # the summary numbers are the per-edit means
            assert c["flip_rate"] == pytest.approx(sum(pe["flips"]) / 4)
            assert c["drawdown"] == pytest.approx(sum(pe["error"]) / 4 - c["base_error"])
            assert c["success_rate"] == pytest.approx(sum(pe["success"]) / 4)
        if name.startswith("edits_surgery"):
            assert c["budget"] == c["setting"]["budget"]
            assert c["nnz_max"] <= c["budget"] and all(n <= c["budget"] for n in pe["nnz"])
            assert c["base_error"] == cells["edits_gd"]["base_error"]  # the same network, the same control set
        if name.startswith("edits_ewc") or name in ("edits_gd", "edits_rmsprop"):
            assert c["nnz_mean"] is not None and 0 <= c["nnz_mean"] <= c["layer3_size"]
    assert "network_base_error" in cells["edits_dknn"]
    assert cells["edits_cnp"]["train_seconds"] > 0
    # the EWC cells use the tuned lrs of the dense cells
    assert cells["edits_ewc-gd_lam10"]["editor"]["lr"] == cells["edits_gd"]["editor"]["lr"]
    assert cells["edits_ewc-rmsprop_lam1e5"]["editor"]["lr"] == cells["edits_rmsprop"]["editor"]["lr"]
    assert (out / "fisher_layer3.pt").exists()


def test_edit_cell_flips_match_a_full_forward(runs, inputs):
    """Edit 0 of a surgery cell, redone with fe.surgery and measured with a full forward."""
    out, _, _ = runs
    npz, weights = inputs
    c = _cells(out, "edits")["edits_surgery-select-grad_b100"]
    model = load_pretrained_cifar_resnet(weights)
    xte, yte = fdata.load_cifar10_lossless(npz, "test")
    x = fdata.to_float_tensor(xte, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(x.shape[0], generator=gen)
    labels = torch.randint(0, 10, (x.shape[0],), generator=gen)
    with torch.no_grad():
        base = model(x).argmax(-1)
    res = fe.surgery(model, x[order[:1]], int(labels[0]), 100, "select-grad", params="layer3", steps=8, seed=0,
                     on_failure="keep")
    with torch.no_grad():
        pred = model(x).argmax(-1)
    assert c["per_edit"]["flips"][0] == pytest.approx(float((pred != base).double().mean()))
    assert c["per_edit"]["error"][0] == pytest.approx(float((pred != yte).double().mean()))
    assert c["per_edit"]["nnz"][0] == res.nnz
    assert c["per_edit"]["success"][0] == res.success


def test_summaries_match_cells_and_resume_recomputes_nothing(runs):
    out, before, summaries = runs
    for p, (mtime, content) in before.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == content, p.name
    assert set(before) == set((out / "cells").glob("*.json"))  # no new cells either
    for part in ("pattern", "edits"):
        again = json.loads((out / f"summary_{part}.json").read_text())
        assert again["rows"] == summaries[part]["rows"]
        cells = _cells(out, part)
        assert len(again["rows"]) == len(cells)
        for row in again["rows"]:
            cell = cells[row["cell"]]
            for key, value in row.items():
                if key in cell:
                    assert value == cell[key], (row["cell"], key)
        csv_lines = (out / f"summary_{part}.csv").read_text().strip().splitlines()
        assert len(csv_lines) == len(cells) + 1
    assert (out / "consistency_vs_budget.png").stat().st_size > 0
    assert (out / "edits_drawdown_flips.png").stat().st_size > 0


def test_summary_only_and_setting_mismatch(runs, inputs, script):
    out, before, _ = runs
    (out / "summary_pattern.json").unlink()
    assert script.main(_common(inputs, out) + ["--part", "pattern", "--summary-only"]) == 0
    assert (out / "summary_pattern.json").exists()
    with pytest.raises(SystemExit, match="another setting"):
        script.main(_common(inputs, out) + PATTERN[:-1] + ["3"])  # --epochs 3 instead of 2
    for p, (mtime, _) in before.items():
        assert p.stat().st_mtime_ns == mtime


def test_help(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--part" in text and "pattern injection" in text and "--cnp-steps" in text


def test_triggers(script):
    x = torch.randint(0, 200, (3, 7, 6, 3), dtype=torch.uint8)
    sq = script.add_trigger(x, 2, 255)
    fr = script.add_trigger(x, 1, 250, "frame")
    assert torch.equal(x, x.clone()) and not torch.equal(sq, x)  # copies
    inside = torch.zeros(7, 6, dtype=torch.bool)
    inside[5:, 4:] = True
    assert (sq[:, inside] == 255).all() and torch.equal(sq[:, ~inside], x[:, ~inside])
    border = torch.ones(7, 6, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert (fr[:, border] == 250).all() and torch.equal(fr[:, ~border], x[:, ~border])
    with pytest.raises(ValueError, match="trigger shape"):
        script.add_trigger(x, 1, 255, "circle")
