"""benchmarks/gpu/check.sh, the one-command GPU check, runs end to end on the CPU (``--cpu-dry-run``,
tiny sizes, synthetic data), so that a change breaking one of its steps shows in CI and not first on
a GPU machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import common

SCRIPT = common.ROOT / "benchmarks" / "gpu" / "check.sh"
STEPS = ["build", "build_info", "tests_cuda", "tests_triton", "bench_editor_step", "bench_edit_metrics",
         "bench_evaluate", "bench_edit", "bench_editable_training", "bench_editable_training_lm"]
BENCHMARKS = {  # step: the script it runs
    "bench_editor_step": "benchmarks/kernels/bench_editor_step.py",
    "bench_edit_metrics": "benchmarks/kernels/bench_edit_metrics.py",
    "bench_evaluate": "benchmarks/experiments/bench_evaluate.py",
    "bench_edit": "benchmarks/experiments/bench_edit.py",
    "bench_editable_training": "benchmarks/experiments/bench_editable_training.py",
    "bench_editable_training_lm": "benchmarks/experiments/bench_editable_training_lm.py",
}
needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")


def _env(**extra) -> dict:
    """The environment without $OUT, and without the real data: the dry run takes the synthetic
    path a bare GPU machine takes."""
    drop = {"OUT", "FASTEDIT_DATA", "FASTEDIT_MODELS", "TRITON_INTERPRET", "FASTEDIT_BACKEND"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHON": sys.executable, **extra}


@pytest.mark.slow
@needs_shell
def test_cpu_dry_run_runs_every_step_and_writes_the_summary_and_json(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", str(tmp_path)], cwd=common.ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    summary_path = tmp_path / "check_summary.json"
    assert summary_path.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == STEPS, list(steps)
    problems = {name: s.get("problem") or s.get("log_tail") for name, s in steps.items()
                if s["status"] not in ("ok", "skipped")}
    assert not problems, json.dumps(problems, indent=1)
    assert run.returncode == 0 and summary["passed"] and summary["failed"] == [], run.stdout[-3000:]

    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert summary["command"] == f"bash benchmarks/gpu/check.sh --cpu-dry-run {tmp_path}"
    assert summary["torch"] and "triton" in summary and "nvcc" in summary and summary["seconds"] > 0
    assert steps["build"]["status"] == "skipped" and "dry run" in steps["build"]["command"]
    assert summary["build_check"]["backends"]["order"][-1] == "reference"
    for name in ("tests_cuda", "tests_triton"):
        tests = steps[name]["tests"]
        assert tests["passed"] > 0 and tests["failures"] == tests["errors"] == 0, (name, tests)
    for name, script in BENCHMARKS.items():
        if not (common.ROOT / script).is_file():
            continue
        assert steps[name]["json"] == f"{name}.json", steps[name]
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["command"].startswith(f"python {script} --device cpu"), result["command"]
        assert result["machine"]["torch"], name
        assert steps[name]["highlights"] and not isinstance(steps[name]["highlights"], str), steps[name]
    # synthetic inputs where the real data are absent, and the JSON says so
    assert "synthetic" in json.loads((tmp_path / "bench_evaluate.json").read_text())["setup"]
    assert "synthetic" in json.loads((tmp_path / "bench_editable_training.json").read_text())["config"]["data"]
    # at most 8 files come back from a device run: the summary, the benchmarks' JSON, one archive of the logs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["check_summary.json", "logs.tar.gz", *(f"{n}.json" for n in BENCHMARKS)])


@needs_shell
def test_no_output_folder_is_a_one_line_error(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "output folder" in run.stderr and "$OUT" in run.stderr, run.stderr


@needs_shell
def test_without_a_gpu_the_gpu_run_refuses_and_names_the_dry_run(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    if probe.stdout.strip() != "False":
        pytest.skip("a CUDA device is visible: the GPU run would start")
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=common.ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--cpu-dry-run" in run.stderr, run.stderr
