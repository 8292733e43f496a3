"""The fastedit command line: --help everywhere, the demo end to end on a tiny budget, and every user
error as one line on stderr with exit code 2."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.slow
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
        assert data["sources"][setting]["command"].startswith("python benchmarks/experiments/calibrate_demo.py")


@pytest.mark.slow
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
    assert result["tuning_edits_from"] == "the training split"
    rows = result["table"]  # the two grid points, then the refinement around the better one
    assert [r["lr"] for r in rows[:2]] == [0.01, 0.05] and {r["stage"] for r in rows[2:]} <= {"expand", "refine"}
    assert len(rows) > 2 and result["editor"]["lr"] in [r["lr"] for r in rows]
    assert result["lr_resolution"] is None or result["lr_resolution"] > 1


def test_sequential_command_writes_its_outputs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "seq"
    argv = ["sequential", "--edits", "9", "--every", "3", "--method", "surgery", "--budget", "30", "--recheck", "1",
            "--epochs", "2", "--no-progress", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["fastedit", *argv])  # the command the report records
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("fastedit sequential --edits 9") and report["method"] == "surgery"
    assert [c["edits"] for c in report["checkpoints"]] == [0, 3, 6, 9] and report["options"]["recheck"] == 1
    assert report["num_control"] == 450 - 9  # the test images not edited
    assert len((out / "checkpoints.csv").read_text().strip().splitlines()) == 5
    assert (out / "sequential.png").stat().st_size > 1000
    assert "9 sequential edits" in capsys.readouterr().out


def test_summary_line_counts_nonfinite_edits():
    import fastedit as fe
    from fastedit.cli import report_summary

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = torch.randn(5, 4)
    y = (model(x).argmax(-1) + 1) % 3
    x_bad = x.clone()
    x_bad[1, 0] = float("nan")
    with pytest.warns(UserWarning, match="1 of 3 edits had a non-finite"):
        report = fe.evaluate(model, (x_bad[:3], y[:3]), (x, y), editor=fe.GD(0.5), progress=False)
    assert report.num_nonfinite == 1
    assert report_summary(report).endswith(", 1 of 3 edits non-finite (NaN/inf; counted as failed)")
    clean = fe.evaluate(model, (x[:3], y[:3]), (x, y), editor=fe.GD(0.5), progress=False)
    assert "non-finite" not in report_summary(clean)


# ------------------------------------------------------------------------------------------------
# User errors: exit code 2, exactly one line on stderr, no traceback; --debug shows the traceback.


def _user_error(capsys, argv, *fragments, prog: str | None = None) -> str:
    """Run main(argv): code 2, nothing on stdout, one line 'PROG: error: ...' on stderr holding every
    fragment; returns that line. PROG: 'fastedit COMMAND' unless given."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    command = next((a for a in argv if a in ("demo", "evaluate", "tune", "sequential", "backends")), None)
    prog = prog or (f"fastedit {command}" if command else "fastedit")
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert out == ""  # nothing ran: no training log, no table
    return lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["demo", "--edits", "0"], ["argument --edits: must be a positive integer, got 0"]),
    (["demo", "--edits", "-3"], ["argument --edits: must be a positive integer, got -3"]),
    (["demo", "--edits", "many"], ["argument --edits: expected a positive integer, got 'many'"]),
    (["demo", "--epochs", "0"], ["argument --epochs"]),
    (["demo", "--threads", "0"], ["argument --threads"]),
    (["evaluate", "--max-steps", "0"], ["argument --max-steps"]),
    (["evaluate", "--limit", "-1"], ["argument --limit"]),
    (["evaluate", "--edits-per-group", "0"], ["argument --edits-per-group"]),
    (["evaluate", "--batch-size", "0"], ["argument --batch-size"]),
    (["evaluate", "--cache-budget-mb", "-1"], ["argument --cache-budget-mb: must be >= 0"]),
    (["evaluate", "--seed", "-1"], ["argument --seed"]),
    (["evaluate", "--lr", "0"], ["argument --lr: must be positive"]),
    (["evaluate", "--lr", "nan"], ["argument --lr: expected a positive number"]),
    (["tune", "--tune-edits", "0"], ["argument --tune-edits"]),
    (["tune", "--tune-pool", "0"], ["argument --tune-pool"]),
    (["tune", "--min-success", "1.5"], ["argument --min-success: must lie in [0, 1]"]),
    (["tune", "--lrs", "1e-3,,1e-2"], ["argument --lrs: item 2 of '1e-3,,1e-2' is empty"]),
    (["tune", "--lrs", "1e-3;1e-2"], ["argument --lrs: item 1 of '1e-3;1e-2'"]),
    (["tune", "--lrs", "1e-3,-1e-2"], ["item 2", "not a positive finite number"]),
    (["tune", "--lrs", ""], ["argument --lrs: expected a comma-separated list of numbers"]),
    (["tune", "--resolution", "1"], ["argument --resolution: must be > 1"]),
    (["tune", "--betas", "0.5,x"], ["argument --betas: item 2 of '0.5,x', 'x', is not a finite number"]),
    (["demo", "--model", "resnet99"], ["argument --model: invalid choice: 'resnet99'"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ([], ["no command given"]),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, fragments):
    line = _user_error(capsys, argv, *fragments)
    if argv:
        assert line.endswith("--help)")  # argparse's errors point at the help


def test_unknown_option_is_one_line(capsys):
    # argparse's top-level parser finds options no subcommand knows
    _user_error(capsys, ["demo", "--no-such-option"], "unrecognized arguments: --no-such-option", prog="fastedit")


@pytest.mark.parametrize("argv, fragments", [
    (["demo", "--editors", "gd,foo"], ["--editors: unknown editor(s) ['foo']"]),
    (["demo", "--editors", "gd,,adam"], ["--editors 'gd,,adam': an empty name"]),
    (["demo", "--editors", "gd,gd"], ["--editors names ['gd'] more than once"]),
    (["evaluate", "--params", "nope"], ["--params 'nope': no parameter of SmallCNN is named 'nope'",
                                        "['classifier', 'features', 'head']"]),
    (["evaluate", "--params", " "], ["--params is empty"]),
    (["demo", "--model", "resnet18", "--params", "layer9"], ["--params 'layer9'", "ResNet18Cifar", "layer4"]),
    (["evaluate", "--editor", "gd", "--beta", "0.5"], ["--beta: the gd editor has no hyper-parameter 'beta'"]),
    (["evaluate", "--editor", "rmsprop", "--beta", "1.5"], ["--beta 1.5: beta must lie in"]),
    (["tune", "--editor", "gd", "--betas", "0.5"], ["--betas: the gd editor has no hyper-parameter 'beta'"]),
    (["tune", "--editor", "rmsprop", "--lrs", "1e-3", "--betas", "0.5,2"], ["--betas 2: beta must lie in"]),
    (["evaluate", "--model", "resnet20"], ["--model resnet20 needs --weights"]),
])
def test_bad_choices_are_one_line_errors_before_the_run(capsys, tmp_path, argv, fragments):
    out = tmp_path / "out"
    _user_error(capsys, [*argv, "--out", str(out)], *fragments)
    assert not out.exists()  # found before the output folder is even made


def test_data_folder_errors(capsys, tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    _user_error(capsys, ["evaluate", "--data", "cifar10", "--data-dir", str(missing), "--weights", "w.th"],
                f"--data-dir {missing}: no such folder")
    _user_error(capsys, ["demo", "--data-dir", str(missing)], f"--data-dir {missing}: no such folder")
    (tmp_path / "file").write_text("x")
    _user_error(capsys, ["tune", "--data", "mnist", "--data-dir", str(tmp_path / "file")], "is not a folder")
    monkeypatch.setenv("FASTEDIT_DATA", str(missing))
    _user_error(capsys, ["evaluate", "--data", "mnist"], f"$FASTEDIT_DATA {missing}: no such folder")
    monkeypatch.delenv("FASTEDIT_DATA")
    _user_error(capsys, ["evaluate", "--data", "mnist"], "--data mnist needs --data-dir (or $FASTEDIT_DATA)")
    _user_error(capsys, ["demo", "--data", "cifar10", "--data-dir", str(tmp_path)],
                "--data cifar10 provides test images only", "pass --weights")


def test_dataset_files_missing_from_the_folder(capsys, tmp_path, shared_models_dir):
    # the folder exists, the dataset is not in it: found when the data are loaded, reported the same way
    empty = tmp_path / "data"
    empty.mkdir()
    _user_error(capsys, ["evaluate", "--model", "resnet20", "--weights", str(shared_models_dir / "resnet20-12fca82f.th"),
                         "--data", "cifar10", "--data-dir", str(empty), "--out", str(tmp_path / "out")],
                f"dataset 'cifar10' (split 'test') not found under {empty}")
    empty_mnist = tmp_path / "mnist-data"
    empty_mnist.mkdir()
    _user_error(capsys, ["demo", "--data", "mnist", "--data-dir", str(empty_mnist), "--out", str(tmp_path / "o2")],
                "MNIST file")


def _bad_checkpoints(tmp_path):
    import torch
    from torch import nn

    good = tmp_path / "good.th"
    torch.save({"w": torch.ones(3)}, good)
    blob = good.read_bytes()
    files = {
        "garbage.th": b"not a checkpoint\n" * 8,
        "empty.th": b"",
        "truncated.th": blob[: len(blob) // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(nn.Linear(2, 2), tmp_path / "module.th")
    torch.save([torch.ones(2)], tmp_path / "list.th")
    return good


@pytest.mark.parametrize("name, fragments", [
    ("garbage.th", ["is not a readable PyTorch checkpoint (corrupt, truncated or another format)"]),
    ("empty.th", ["is an empty file"]),
    ("truncated.th", ["is not a readable PyTorch checkpoint", "PytorchStreamReader failed reading zip archive"]),
    ("module.th", ["holds pickled Python objects (torch.nn.modules.linear.Linear)", "save model.state_dict()"]),
    ("list.th", ["holds a list, not a state dict"]),
    ("missing.th", ["no such file"]),
])
@pytest.mark.parametrize("command", ["demo", "evaluate", "tune"])
def test_missing_or_corrupt_weights(capsys, tmp_path, name, fragments, command):
    _bad_checkpoints(tmp_path)
    out = tmp_path / "out"
    line = _user_error(capsys, [command, "--weights", str(tmp_path / name), "--out", str(out)], *fragments)
    assert "weights_only" not in line and "Traceback" not in line  # torch's advice to unpickle code is not repeated
    assert not out.exists()


def test_weights_that_do_not_fit_the_model(capsys, tmp_path):
    # readable, but for another model: found when the model is built, still one line
    good = _bad_checkpoints(tmp_path)
    _user_error(capsys, ["evaluate", "--weights", str(good), "--out", str(tmp_path / "out")],
                f"{good} does not fit SmallCNN", "unexpected keys ['w']")
    _user_error(capsys, ["demo", "--weights", str(tmp_path), "--out", str(tmp_path / "out")], "is not a file")


@pytest.mark.parametrize("command", ["demo", "evaluate", "tune"])
def test_unwritable_out_is_found_before_the_run(capsys, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # before the fix evaluate/tune trained the model, edited, and failed only when writing
    _user_error(capsys, [command, "--out", str(blocker)], f"--out {blocker} exists and is not a folder")
    _user_error(capsys, [command, "--out", str(blocker / "sub")], f"--out {blocker / 'sub'}: cannot create the folder")


def test_read_only_out_folder(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        # root writes into read-only folders: refuse the probe as the kernel refuses everyone else
        import tempfile

        real = tempfile.mkstemp

        def refused(*args, dir=None, **kwargs):
            if dir is not None and pathlib.Path(dir) == folder:
                raise PermissionError(13, "Permission denied", str(folder))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refused)
    try:
        _user_error(capsys, ["evaluate", "--out", str(folder)], f"--out {folder}: cannot write into the folder")
    finally:
        folder.chmod(0o700)


def test_out_is_created_and_probed_without_leaving_files(tmp_path):
    from fastedit.cli import _check_out

    target = tmp_path / "a" / "b"
    assert _check_out(target) == target
    assert target.is_dir() and list(target.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    from fastedit.cli import UsageError

    with pytest.raises(UsageError, match="argument --edits: must be a positive integer"):
        main(["--debug", "demo", "--edits", "0"])
    with pytest.raises(UsageError, match="--params 'nope'"):
        main(["evaluate", "--params", "nope", "--debug"])
    good = _bad_checkpoints(tmp_path)
    with pytest.raises(ValueError, match="does not fit SmallCNN"):  # the library's own exception
        main(["evaluate", "--weights", str(good), "--out", str(tmp_path / "out"), "--debug"])


@pytest.mark.slow
def test_user_errors_in_a_real_process(tmp_path):
    cmd = [sys.executable, "-m", "fastedit", "evaluate", "--weights", str(tmp_path / "missing.th")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"fastedit evaluate: error: --weights {tmp_path / 'missing.th'}: no such file"]
    proc = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "UsageError: --weights" in proc.stderr


def test_sequential_user_errors(capsys):
    _user_error(capsys, ["sequential", "--method", "surgery", "--out", "x"], "--method surgery needs --budget")
    _user_error(capsys, ["sequential", "--trust-region", "l3:1"], "expected l2:RADIUS or linf:RADIUS")
    _user_error(capsys, ["sequential", "--trust-region", "l2:-1"], "--trust-region")
