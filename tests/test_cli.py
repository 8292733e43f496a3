"""The fastedit command line: --help everywhere, and the demo end to end on a tiny budget."""
import json
import subprocess
import sys

import pytest

from fastedit.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["evaluate", "--help"], ["tune", "--help"],
                                  ["backends", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastedit" in out


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "usable" in out
    assert main(["backends", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["usable"] is True


def test_demo_runs_and_writes_results(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fastedit", "demo", "--edits", "8", "--epochs", "3",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("GD", "Scaled GD", "RProp", "RMSProp", "Momentum", "Adam"):
        assert name in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("fastedit demo --edits 8")
    assert [r["editor"] for r in data["rows"]] == ["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"]
    for r in data["rows"]:
        assert 0 <= r["success_rate"] <= 1 and r["num_edits"] == 8
    assert (out / "results.csv").read_text().startswith("editor,lr,drawdown")
    assert (out / "editors.png").stat().st_size > 1000


def test_demo_hyperparameters_come_from_the_committed_calibration():
    from fastedit.demo import EDITOR_ORDER, HPARAMS_FILE, default_hparams

    data = json.loads(HPARAMS_FILE.read_text())
    for setting in ("small", "resnet"):
        assert set(default_hparams()[setting]) == set(EDITOR_ORDER)
        assert data["sources"][setting]["command"].startswith("python benchmarks/calibrate_demo.py")


def test_evaluate_and_tune_commands_write_their_outputs(tmp_path):
    ev, tu = tmp_path / "ev", tmp_path / "tu"
    common = ["--epochs", "2", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "fastedit", "evaluate", "--edits", "12", "--out", str(ev), *common],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((ev / "report.json").read_text())
    assert report["command"].startswith("fastedit evaluate --edits 12") and report["num_edits"] == 12
    assert len(report["per_class_drawdown"]) == 10
    assert len((ev / "edits.csv").read_text().strip().splitlines()) == 13
    assert (ev / "per_class_drawdown.png").stat().st_size > 1000 and (ev / "edit_tsne.png").stat().st_size > 1000
    proc = subprocess.run([sys.executable, "-m", "fastedit", "tune", "--editor", "gd", "--lrs", "0.01,0.05",
                           "--tune-edits", "10", "--out", str(tu), *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tu / "tune.json").read_text())
    assert len(result["table"]) == 2 and result["tuning_edits_from"] == "the training split"
    assert result["editor"]["lr"] in (0.01, 0.05)
