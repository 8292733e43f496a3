#!/usr/bin/env bash
# The GPU check of fastedit, in one run: build the CUDA extension in place, run the CUDA and Triton
# tests, run the benchmarks on the GPU, and write everything into one folder.
#
#   bash benchmarks/gpu/check.sh "$OUT"             # one CUDA GPU (an H200: < 9 minutes from a bare machine)
#   bash benchmarks/gpu/check.sh --cpu-dry-run DIR  # every step end to end on the CPU at tiny sizes (CI, ~1-2 min)
#
# The folder is the first positional argument, else $OUT. Needs: torch with CUDA, Triton, nvcc,
# pybind11, ninja, setuptools, pytest (pytest-xdist is used when present); no network. Data and
# checkpoints: when $FASTEDIT_DATA/cifar10/cifar10_lossless_subset.npz and
# $FASTEDIT_MODELS/resnet20-12fca82f.th exist the ResNet-20 benchmarks use them, else they run
# --synthetic (random weights and images of the same shapes; each JSON says which).
#
# Steps (time budget on one H200, seconds; a step may also use what earlier steps left unused, and
# none can push the whole past the total, 530 s):
#   build                       140  FASTEDIT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace
#   build_info                   20  fastedit._C imports, was built with CUDA, registers CPU and CUDA kernels
#   tests_cuda                   70  pytest tests/ops, tests/api/test_compile.py, tests/packaging/test_extension.py
#                                    with the GPU and compiled Triton (TRITON_INTERPRET=0)
#   tests_triton                 35  pytest of the Triton kernels under the interpreter (TRITON_INTERPRET=1)
#   bench_editor_step            55  fused editor step, GB/s and fraction of the same run's copy_ (target >= 0.85)
#   bench_edit_metrics           25  fused edit_metrics (CUDA, Triton) vs PyTorch
#   bench_evaluate               40  fe.evaluate: loop vs vmap vs naive vs the official protocol
#   bench_edit                   75  edit latency: naive, eager, compiled, CUDA graph
#   bench_editable_training      35  Editable Training step / plain step, ResNet-20
#   bench_editable_training_lm   35  Editable Training step / plain step, GPT-2 small
# Each step runs under `timeout`; a failing step does not stop the others; the script exits 1 at
# the end if any step failed (a dry run's skipped build does not count).
#
# Written to the folder: check_summary.json (the command, the device, torch / Triton / nvcc versions,
# build_info(), every step with its status, seconds and limit, test counts, the benchmarks' key
# ratios, the end of each failed step's log, total seconds), one JSON per benchmark
# (bench_*.json, each with its command and machine), and logs.tar.gz (every step's log and the tests'
# JUnit XML; the logs/ folder is removed once packed, so the folder holds 8 files; CHECK_KEEP_LOGS=1
# keeps it).
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST (default 9.0),
# CHECK_TOTAL_S (the total budget; default 530, dry run 300).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT="$PWD"

DRY=0
DEST="${OUT:-}"
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) DEST="$arg" ;;
  esac
done
if [ -z "$DEST" ]; then
  echo "check.sh: no output folder: give it as the first argument or set \$OUT (see --help)" >&2
  exit 2
fi
mkdir -p "$DEST/logs" || exit 2
DEST="$(cd "$DEST" && pwd)"
LOGS="$DEST/logs"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's fastedit (and its in-place extension) first
export PYTHONUNBUFFERED=1                           # complete logs even when a step is stopped
export TRITON_INTERPRET=0                           # compiled Triton; only tests_triton sets 1 (tests/conftest.py defaults to 1)
unset FASTEDIT_BACKEND                              # the dispatcher's own choice everywhere
START=$SECONDS
DEADLINE=0                                          # cumulative: step k must end by the sum of budgets 1..k
TOTAL="${CHECK_TOTAL_S:-$([ "$DRY" -eq 1 ] && echo 300 || echo 530)}"
: >"$LOGS/steps.tsv"

# step NAME BUDGET_S COMMAND...: runs COMMAND (stdout and stderr to logs/NAME.log) under a timeout of
# BUDGET_S plus whatever earlier steps left unused, never past TOTAL; appends a line to steps.tsv.
step() {
  local name="$1" budget="$2"; shift 2
  DEADLINE=$((DEADLINE + budget))
  [ "$DEADLINE" -gt "$TOTAL" ] && DEADLINE=$TOTAL
  local t0=$SECONDS limit=$((DEADLINE - (SECONDS - START))) rc status
  if [ "$limit" -lt 5 ]; then
    printf '%s\tnot_run\t\t0\t%s\t%s\n' "$name" "$limit" "$*" >>"$LOGS/steps.tsv"
    echo "--- $name: not run (no time left of the $TOTAL s total)"
    return
  fi
  echo "--- $name (limit ${limit} s): $*"
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$*" >>"$LOGS/steps.tsv"
  echo "    $status in $((SECONDS - t0)) s"
  [ "$status" = ok ] || tail -n 8 "$LOGS/$name.log" | sed 's/^/    | /'
}
skip() {  # skip NAME REASON
  printf '%s\tskipped\t\t0\t0\t%s\n' "$1" "$2" >>"$LOGS/steps.tsv"
  echo "--- $1: skipped ($2)"
}

# the real data and checkpoint, else --synthetic for the ResNet-20 benchmarks
SYNTHETIC=(--synthetic)
if [ -f "${FASTEDIT_DATA:-/nonexistent}/cifar10/cifar10_lossless_subset.npz" ] \
   && [ -f "${FASTEDIT_MODELS:-/nonexistent}/resnet20-12fca82f.th" ]; then
  SYNTHETIC=()
fi
XDIST=()
if [ "$DRY" -eq 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then
  XDIST=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
fi
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)

# ------------------------------------------------------------------------------------------------
# sizes: the GPU run, or the dry run (device cpu, one thread, tiny sizes)
if [ "$DRY" -eq 1 ]; then
  DEV=cpu
  B_BUILD_INFO=20 B_TESTS_CUDA=30 B_TESTS_TRITON=30
  B_EDITOR_STEP=20 B_METRICS=20 B_EVALUATE=30 B_EDIT=90 B_ET=30 B_ET_LM=60
  TESTS_CUDA=(tests/ops/test_backends.py -k "not bit_identical")
  TESTS_TRITON=(tests/packaging/test_triton_interpreter_compat.py "tests/ops/test_edit_metrics.py::test_triton_chunk_edges"
                "tests/ops/test_editor_step.py::test_triton_one_launch_per_dtype_group")
  EDITOR_STEP=(--cases flat1e5 --editors rmsprop,adam --reps 3 --warmup 1 --no-compile --flush-mb 8 --threads 1)
  METRICS=(--samples 64 --classes 7 --edits 3 --repeats 2 --no-compile --threads 1)
  EVALUATE=(--edits 2 --official-edits 1 --vmap-groups 2 --chunk-sizes 64 --control 64 --threads 1)
  EDIT=(--quick --threads 1 --warm-compile-cache)  # a warm cache: compiling costs ~40 s on 2 cores, ~7 s warm
  ET=(--batch 4 --repeats 1 --warmup 0 --memory-repeats 1 --methods plain,fastedit --alloc-profile 0
      --threads 1 --max-wait 0)
  LM=(--quick --max-wait 0)
else
  DEV=cuda
  B_BUILD=140 B_BUILD_INFO=20 B_TESTS_CUDA=70 B_TESTS_TRITON=35
  B_EDITOR_STEP=55 B_METRICS=25 B_EVALUATE=40 B_EDIT=75 B_ET=35 B_ET_LM=35
  TESTS_CUDA=(tests/ops tests/api/test_compile.py tests/packaging/test_extension.py)
  TESTS_TRITON=(tests/ops tests/api/test_memory_formats.py tests/packaging/test_triton_interpreter_compat.py
                -k "triton and not cuda")
  EDITOR_STEP=(--quick)
  METRICS=(--repeats 5)
  EVALUATE=(--edits 40 --official-edits 10)
  EDIT=()
  ET=(--repeats 10 --warmup 3 --memory-repeats 3)
  LM=()
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "check.sh: torch sees no CUDA device here; on a CPU machine use --cpu-dry-run" >&2
    exit 2
  fi
fi
echo "check.sh: $([ "$DRY" -eq 1 ] && echo "CPU dry run" || echo "GPU run") into $DEST (python: $PY, total budget $TOTAL s)"

# ------------------------------------------------------------------------------------------------
# 1. the extension, built in place (fastedit/_C*.so beside the sources, found through PYTHONPATH)
if [ "$DRY" -eq 1 ]; then
  skip build "dry run: no CUDA build (the extension already in the tree, if any, is used)"
else
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    # the toolkit nvcc belongs to (nvcc on the PATH may be a wrapper outside it), as in .ci/run
    top="$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    if [ -n "$top" ] && [ -f "$top/include/cuda_runtime_api.h" ]; then
      export CUDA_HOME="$(cd "$top" && pwd)"
    fi
  fi
  step build "$B_BUILD" env FASTEDIT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
fi
# what was built: written to logs/build_info.json (check_summary.json takes it over); on the GPU the
# CUDA kernels must be there, else every CUDA test would skip
step build_info "$B_BUILD_INFO" "$PY" - "$LOGS/build_info.json" "$DRY" <<'EOF'
import json, sys
import torch
import fastedit
from fastedit.ops import _extension as extension
from fastedit.ops._table import SCHEMA
info = extension.build_info()
keys = ("CPU", "CUDA") if torch.cuda.is_available() else ("CPU",)
registered = {key: [op for op in SCHEMA.values() if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastedit::{op}", key)]
              for key in keys} if info else {}
out = {"fastedit": fastedit.__file__, "build_info": info, "unavailable_reason": None if info else extension.unavailable_reason(),
       "kernels_registered": registered, "backends": fastedit.backends()}
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
print(json.dumps(out, indent=1, default=str))
if sys.argv[2] != "1":  # the GPU run: a CUDA build, every op with a CUDA kernel
    assert info, f"fastedit._C does not import: {out['unavailable_reason']}"
    assert info["with_cuda"], f"fastedit._C was built without CUDA: {info}"
    missing = sorted(set(SCHEMA.values()) - set(registered["CUDA"]))
    assert not missing, f"no CUDA kernel registered for {missing}"
EOF

# ------------------------------------------------------------------------------------------------
# 2. tests. With a GPU, the CUDA tests run (each skips without one) next to the CPU ones in the same
# files; CI=true turns a missing extension into a failure instead of a skip
step tests_cuda "$B_TESTS_CUDA" env CI=true TRITON_INTERPRET=0 "${PYTEST[@]}" "${XDIST[@]}" "${TESTS_CUDA[@]}" \
  --junitxml "$LOGS/tests_cuda.xml"
step tests_triton "$B_TESTS_TRITON" env CI=true TRITON_INTERPRET=1 "${PYTEST[@]}" "${XDIST[@]}" "${TESTS_TRITON[@]}" \
  --junitxml "$LOGS/tests_triton.xml"

# ------------------------------------------------------------------------------------------------
# 3. benchmarks, each writing its JSON (with its command and machine) into the folder
step bench_editor_step "$B_EDITOR_STEP" "$PY" benchmarks/kernels/bench_editor_step.py --device "$DEV" \
  "${EDITOR_STEP[@]}" --out "$DEST/bench_editor_step.json"
step bench_edit_metrics "$B_METRICS" "$PY" benchmarks/kernels/bench_edit_metrics.py --device "$DEV" \
  "${METRICS[@]}" --out "$DEST/bench_edit_metrics.json"
step bench_evaluate "$B_EVALUATE" "$PY" benchmarks/experiments/bench_evaluate.py --device "$DEV" \
  "${EVALUATE[@]}" "${SYNTHETIC[@]}" --out "$DEST/bench_evaluate.json"
step bench_edit "$B_EDIT" "$PY" benchmarks/experiments/bench_edit.py --device "$DEV" \
  --modes naive,eager,compiled,cudagraph "${EDIT[@]}" "${SYNTHETIC[@]}" --out "$DEST/bench_edit.json"
step bench_editable_training "$B_ET" "$PY" benchmarks/experiments/bench_editable_training.py --device "$DEV" \
  "${ET[@]}" "${SYNTHETIC[@]}" --out "$DEST/bench_editable_training.json"
step bench_editable_training_lm "$B_ET_LM" "$PY" benchmarks/experiments/bench_editable_training_lm.py \
  --device "$DEV" "${LM[@]}" --out "$DEST/bench_editable_training_lm.json"

# ------------------------------------------------------------------------------------------------
# 4. check_summary.json, logs.tar.gz, the exit status
"$PY" - "$DEST" "$DRY" "$((SECONDS - START))" "bash benchmarks/gpu/check.sh $*" <<'EOF'
import json, os, pathlib, platform, re, subprocess, sys
import xml.etree.ElementTree as ET

dest, dry, seconds, command = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
logs = dest / "logs"


def read_json(path):
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"invalid JSON: {exc}"


def junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None][:50]
    return counts


def highlights(name, r):
    """The numbers to read first in each benchmark's JSON."""
    if name == "bench_editor_step":
        rows = []
        for row in r["rows"]:
            for method, v in row["results"].items():
                if method.startswith("fastedit_"):
                    rows.append({"case": row["case"], "editor": row["editor"], "method": method,
                                 "gb_per_s": round(v["gb_per_s"], 1), "fraction_of_copy": round(v["fraction_of_copy"], 3),
                                 "speedup_vs_fastest_torch": round(v["speedup_vs_fastest_torch"], 2)})
        below = [f"{x['case']}/{x['editor']}/{x['method']}: {x['fraction_of_copy']}" for x in rows if x["fraction_of_copy"] < 0.85]
        return {"target_fraction_of_copy": 0.85, "fused": rows, "below_target": below,
                "min_fraction_of_copy": min((x["fraction_of_copy"] for x in rows), default=None)}
    if name == "bench_evaluate":
        s = r["summary"]
        return {"setup": r.get("setup"), "edits_per_s": {k: round(v["edits_per_s"], 2) for k, v in r["results"].items()},
                "speedup_vs_official": s.get("speedup_vs_official"), "speedup_vs_naive": s.get("speedup_vs_naive"),
                "identical_steps_and_errors": s.get("identical_steps_and_errors")}
    if name == "bench_edit":
        return {"setup": r.get("setup"), "skipped": r.get("skipped"),
                "modes": {k: {f: v.get(f) for f in ("ms_per_edit", "speedup_vs_naive", "floor_ratio", "agrees_with_eager")}
                          for k, v in r.get("modes", {}).items()}}
    if name in ("bench_editable_training", "bench_editable_training_lm"):
        return {"data": r.get("config", {}).get("data"), "targets": r.get("targets"),
                "time_ratio": {k: v.get("time_ratio") for k, v in r.get("table", {}).items()},
                "memory_ratio": {k: v.get("memory_ratio") for k, v in r.get("table", {}).items()}}
    if name == "bench_edit_metrics":
        return [{"E": row["E"], "N": row["N"], "C": row["C"], "skipped": row.get("skipped"),
                 "methods": {m: {"fraction_of_copy_bandwidth": round(v["fraction_of_copy_bandwidth"], 3),
                                 "speedup_vs_fastest_pytorch": round(v["speedup_vs_fastest_pytorch"], 2)}
                             for m, v in row["methods"].items()}} for row in r["results"]]
    return None


def version_of(cmd, pattern):
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"
    found = re.search(pattern, text)
    return found.group(0) if found else (text.strip().splitlines() or ["?"])[-1]


steps = []
for line in (logs / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, limit, cmd = line.split("\t", 5)
    row = {"step": name, "status": status, "seconds": int(secs), "limit_seconds": int(limit), "command": cmd}
    if rc:
        row["exit_code"] = int(rc)
    if (logs / f"{name}.log").exists():
        row["log"] = f"logs.tar.gz:logs/{name}.log"
    if name.startswith("tests_"):
        row["tests"] = junit(logs / f"{name}.xml")
    if name.startswith("bench_"):
        result, problem = read_json(dest / f"{name}.json")
        row["json"] = f"{name}.json" if result is not None else problem
        if result is not None:
            missing = [k for k in ("command", "machine") if k not in result]
            if missing:
                problem = f"no {', '.join(missing)} in {name}.json"
            else:
                try:
                    row["highlights"] = highlights(name, result)
                except (KeyError, TypeError, ValueError) as exc:
                    row["highlights"] = f"unreadable: {type(exc).__name__}: {exc}"
        if status == "ok" and problem:  # exit 0 is not enough: its JSON must be there and complete
            row["status"], row["problem"] = "failed", problem
    if row["status"] not in ("ok", "skipped") and (logs / f"{name}.log").exists():
        row["log_tail"] = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
    steps.append(row)

import torch  # noqa: E402 (after the steps: the summary never waits for CUDA before them)
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
build_info, _ = read_json(logs / "build_info.json")
failed = [s["step"] for s in steps if s["status"] not in ("ok", "skipped")]
summary = {
    "command": command.strip(), "dry_run": dry,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not dry else "cpu",
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton_version,
    "nvcc": version_of(["nvcc", "--version"], r"release [^\s,]+(, V[^\s]+)?"),
    "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
    "build": (build_info or {}).get("build_info"), "build_check": build_info,
    "steps": steps, "failed": failed, "passed": not failed, "seconds": seconds,
}
(dest / "check_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
width = max(len(s["step"]) for s in steps)
for s in steps:
    extra = s.get("problem") or ""
    if isinstance(s.get("tests"), dict) and "tests" in s["tests"]:
        t = s["tests"]
        extra = f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
    print(f"  {s['step']:<{width}}  {s['status']:<8} {s['seconds']:>4} s  {extra}")
print(f"check.sh: {len(steps) - len(failed)} of {len(steps)} steps ok in {seconds} s"
      + (f"; failed: {', '.join(failed)}" if failed else "") + f"; results in {dest}")
sys.exit(1 if failed else 0)
EOF
rc=$?
if [ ! -s "$DEST/check_summary.json" ]; then
  echo "check.sh: the summary could not be written" >&2
  rc=1
fi
if tar -czf "$DEST/logs.tar.gz" -C "$DEST" logs && [ "${CHECK_KEEP_LOGS:-0}" != 1 ]; then
  rm -rf "$LOGS"
fi
echo "check.sh: total $((SECONDS - START)) s"
exit "$rc"
