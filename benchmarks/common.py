"""What every benchmark and experiment script shares: where the real data are, the command and the
machine a result came from, timers, peak memory, JSON files written whole, resumable cells, and
bit-exact snapshots of a model.

Scripts run from the repository root, as files (``python benchmarks/kernels/bench_editor_step.py``)
or as modules (``python -m benchmarks.kernels.bench_editor_step``).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import pathlib
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository root
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------
# where the real data and checkpoints are
# ------------------------------------------------------------------------------------------------
def _env_dir(var: str, given: str | os.PathLike | None) -> pathlib.Path:
    if given is not None:
        return pathlib.Path(given)
    value = os.environ.get(var)
    if not value:
        raise SystemExit(f"${var} is not set: point it at the folder (or pass the script's option)")
    return pathlib.Path(value)


def data_dir(given: str | os.PathLike | None = None) -> pathlib.Path:
    """``given``, else ``$FASTEDIT_DATA`` (the folder holding cifar10/, mnist/, text/ …)."""
    return _env_dir("FASTEDIT_DATA", given)


def models_dir(given: str | os.PathLike | None = None) -> pathlib.Path:
    """``given``, else ``$FASTEDIT_MODELS`` (the folder holding the checkpoints)."""
    return _env_dir("FASTEDIT_MODELS", given)


_INTERPRETER = re.compile(r"(?<![\w./-])/\S*/bin/python3?(?=\s|$)")


def portable(text: str) -> str:
    """``text`` with this machine's paths replaced: the data and model folders by
    ``$FASTEDIT_DATA`` and ``$FASTEDIT_MODELS``, an interpreter's path by ``python``, the checkout's
    root by nothing (paths relative to it)."""
    for var in ("FASTEDIT_DATA", "FASTEDIT_MODELS"):
        if os.environ.get(var):
            folder = pathlib.Path(os.environ[var])
            for spelling in sorted({str(folder), str(folder.resolve())}, key=len, reverse=True):
                text = text.replace(spelling, "$" + var)
    text = text.replace(str(ROOT) + os.sep, "")
    return _INTERPRETER.sub("python", text)


def command_line(script: str | os.PathLike, argv: list[str] | None = None) -> str:
    """The command that made a result, as a user would type it from the repository root:
    ``python <script> <arguments>`` (``script``: the script's ``__file__``; ``argv``: its arguments,
    default ``sys.argv[1:]``)."""
    path = pathlib.Path(script).resolve()
    shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(script)
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in allocator_env().items())
    return portable(env + "python " + " ".join(shlex.quote(a) for a in [shown, *args]))


#: environment variables that change how the C allocator hands out memory (glibc's tunables, a
#: preloaded jemalloc or tcmalloc): they change CPU timings, so a result names the ones that were set
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES",
                 "LD_PRELOAD", "MALLOC_CONF")


def allocator_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ALLOCATOR_ENV if os.environ.get(k)}


# ------------------------------------------------------------------------------------------------
# the machine
# ------------------------------------------------------------------------------------------------
def apply_preset(args, presets: dict, script: str | os.PathLike, argv: list[str] | None):
    """Fill the arguments left unset (None) from ``presets[args.preset]`` and record the portable
    command line as ``args.command``; returns ``args``."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.command = command_line(script, argv)
    return args


def grid_edge(value: float, grid: list[float]) -> str | None:
    """``"low"`` / ``"high"`` when a tuned value is the first / last point of its grid, else None: a
    choice at the edge of the grid may lie beyond it."""
    return "low" if value == grid[0] else "high" if value == grid[-1] else None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device | str | None = None) -> dict:
    """The machine and software a result was measured on, with the load average at the call (two
    cores are easily saturated: a loaded machine explains a slow run)."""
    from fastedit.ops import _extension as extension

    device = torch.device(device) if device is not None else None
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average": load_average(),
            "extension": extension.build_info(), "git_commit": _git_commit()}
    allocator = allocator_env()
    if allocator:
        info["allocator_env"] = allocator
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    if device is not None:
        info["device"] = str(device)
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------
# timers
# ------------------------------------------------------------------------------------------------
def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA is asynchronous; a timer must not stop before it ends)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device=None) -> tuple[object, float, float]:
    """``(fn(), wall seconds, process CPU seconds)``, the device synchronised before and after."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def wall(fn: Callable[[], object], device=None) -> tuple[object, float]:
    """``(fn(), wall seconds)``, the device synchronised before and after."""
    out, seconds, _cpu = timed(fn, device)
    return out, seconds


def time_calls(fn: Callable[[], object], repeats: int, *, warmup: int = 1, device=None,
               cpu_times: list[float] | None = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (compilation,
    caches); each call's process CPU seconds are appended to ``cpu_times`` when given."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1, device=None,
                     before_each: Callable[[], object] | None = None,
                     cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each function, the functions interleaved call by call so that a load spike
    on a shared machine hits all of them alike. ``before_each`` runs untimed before every call
    (e.g. overwriting a buffer larger than the last-level cache, so that every call starts cold);
    each call's process CPU seconds go to ``cpu_times[name]`` when given."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
                sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - c0)
    return times


def summary_ms(times: list[float]) -> dict:
    """Median and minimum of wall times in milliseconds, and their count."""
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "reps": len(times)}


class Samples(dict):
    """Named lists of measurements: ``add(forward=0.1, backward=0.2)``, then ``medians()``."""

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.setdefault(name, []).append(value)

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(v) for name, v in self.items()}


# ------------------------------------------------------------------------------------------------
# the baseline every edit benchmark compares against
# ------------------------------------------------------------------------------------------------
def naive_edit(params: list[torch.Tensor], loss_of: Callable[[], torch.Tensor], editor, max_steps: int,
               roll_back: bool = True) -> int:
    """The official Editable code's edit loop on the live module: every step a full forward
    (``loss_of()``, the edit's constraint as a scalar), ``.item()`` to stop once it holds, autograd,
    and the editor's update written into ``params``; at most ``max_steps`` steps, each followed by
    the forward that checks it. Returns the steps taken; ``roll_back`` restores the parameters
    (the protocol applies every edit to the original model)."""
    backup = [p.detach().clone() for p in params] if roll_back else None
    state = editor.init_state([p.detach() for p in params])
    steps = 0
    while True:
        loss = loss_of()
        if loss.item() <= 0 or steps == max_steps:
            break
        grads = torch.autograd.grad(loss, params)
        new, state = editor.step([p.detach() for p in params], list(grads), state)
        with torch.no_grad():
            for p, v in zip(params, new):
                p.copy_(v)
        steps += 1
    if roll_back:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    return steps


# ------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def trim_heap() -> None:
    """glibc: give free heap memory back to the system (malloc_trim), so that a later reuse of it
    shows in the resident set."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def mmap_big_allocations() -> bool:
    """glibc: serve every allocation of at least 64 KiB by mmap (returned to the system on free), so
    that the resident set follows the live memory of repeated calls. Changes allocation costs: call
    it only after the timings."""
    return bool(_LIBC is not None and _LIBC.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set (VmHWM) restarts from the current one
        return True
    except OSError:
        return False


def peak_memory_increase(fn: Callable[[], object], device=None) -> tuple[int | None, object, str]:
    """(peak memory during ``fn()`` above the level before it in bytes, fn's result, how it was
    measured). CUDA: the caching allocator's peak; CPU: the peak resident set (VmHWM reset by
    ``clear_refs``), or where that is refused, the resident set sampled every 0.5 ms."""
    if device is not None and torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, out, "torch.cuda.max_memory_allocated"
    trim_heap()
    before = _status_bytes("VmRSS")
    if before is None:
        return None, fn(), "unavailable (no /proc/self/status)"
    if _reset_peak_rss():
        out = fn()
        return max(0, _status_bytes("VmHWM") - before), out, "VmHWM after clear_refs=5"
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _status_bytes("VmRSS") or 0)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak, _status_bytes("VmRSS") or 0) - before), out, "VmRSS sampled every 0.5 ms"


def torch_alloc_peak(fn: Callable[[], object]) -> tuple[int | None, object, str | None]:
    """(peak of live torch CPU allocations during ``fn()`` above the level at its start, in bytes,
    fn's result, error): ``torch.profiler`` with ``profile_memory=True``, exported as a memory timeline
    (per-category live bytes at every allocation/free) and summed over categories. No allocator or
    library overhead: torch's own count of tensor bytes, a check on the resident-set peak."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = fn()
    try:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export_memory_timeline is marked deprecated (CUDA snapshots replace it)
            path = os.path.join(d, "timeline.json")
            prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)
        return max(max(sum(row) for row in sizes), 0), out, None
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        return None, out, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------
# shared by the Editable Training benchmarks
# ------------------------------------------------------------------------------------------------
def wait_for_load(max_load: float, max_wait: float, poll: float = 10.0) -> float:
    """Wait (at most ``max_wait`` seconds) for the 1-minute load average to drop to ``max_load``;
    returns the seconds waited (the cores are shared: a loaded machine perturbs every timing)."""
    t0 = time.monotonic()
    while (load_average() or [0.0])[0] > max_load and time.monotonic() - t0 < max_wait:
        print(f"load average {load_average()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(poll)
    return time.monotonic() - t0


def package_version(pkg: str) -> str | None:
    """The installed version of ``pkg``, None when it is not installed."""
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


class RawHParams(torch.nn.Module):
    """A hand-written editor's learnable lr (log space) and β (logit), as fastedit's LearnableEditor
    parametrises them, for the naive and ``higher`` baselines."""

    def __init__(self, lr: float, beta: float):
        super().__init__()
        self.log_lr = torch.nn.Parameter(torch.tensor(float(torch.tensor(lr).log())))
        self.logit_beta = torch.nn.Parameter(torch.tensor(float(torch.tensor(beta).logit())))

    def values(self):
        return self.log_lr.exp(), torch.sigmoid(self.logit_beta)

    def objective(self, cfg: dict, loss_base, loss_edit, loss_loc):
        """The Editable Training objective ``L_base + c_edit L_edit + c_loc L_loc``; the 0-weighted
        hyper-parameters keep them in the graph when the edit took no step."""
        return (loss_base + cfg["c_edit"] * loss_edit + cfg["c_loc"] * loss_loc
                + 0.0 * (self.log_lr + self.logit_beta))


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON (NaN refused) through a temporary file: the file is complete or absent."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file: a checkpoint is complete or absent."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Cells:
    """The resumable cells of one experiment, one JSON file each under ``<out>/cells``.

    ``done(name, setting)`` says whether the cell exists and stops with a message when it was made
    with another setting; ``save`` writes one with its command, seconds and machine;
    ``budget_left()`` honours ``max_new`` (cells to compute in this run; None: all);
    ``estimate(remaining)`` is a time estimate from this run's cells."""

    def __init__(self, out: str | os.PathLike, command: str, max_new: int | None = None):
        self.dir = pathlib.Path(out) / "cells"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.command, self.max_new = command, max_new
        self.new = 0
        self.seconds: list[float] = []

    def path(self, name: str) -> pathlib.Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> dict | None:
        path = self.path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def done(self, name: str, setting: dict) -> bool:
        old = self.load(name)
        if old is None:
            return False
        want, have = json.loads(json.dumps(setting)), old.get("setting", {})
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise SystemExit(f"{self.path(name)} was computed with another setting (differs in {diff}); "
                             "use another output folder or delete the cell")
        return True

    def budget_left(self) -> bool:
        return self.max_new is None or self.new < self.max_new

    def save(self, name: str, setting: dict, result: dict, seconds: float) -> dict:
        cell = {"command": self.command, "cell": name, "setting": setting, **result,
                "cell_seconds": seconds, "machine": machine_info()}
        write_json(self.path(name), cell)
        self.new += 1
        self.seconds.append(seconds)
        return cell

    def estimate(self, remaining: int) -> str:
        if not self.seconds or remaining <= 0:
            return ""
        mean = statistics.fmean(self.seconds)
        return f"; {remaining} cells left, ≈ {remaining * mean / 60:.1f} min more at {mean:.0f} s/cell"


def progress_bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar, disabled by ``quiet``."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


def say(message: str, quiet: bool = False) -> None:
    """Print a line without breaking a progress bar."""
    if quiet:
        print(message, flush=True)
    else:
        from tqdm import tqdm
        tqdm.write(message)


# ------------------------------------------------------------------------------------------------
# bit-exact snapshots of a model
# ------------------------------------------------------------------------------------------------
_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as integers (NaN equals itself, −0.0 differs from 0.0); others as they are."""
    return t.view(_INT_OF[t.dtype]) if t.dtype in _INT_OF else t


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_scalars(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> int:
    """Scalars of the state dict whose bits differ from ``original``."""
    state = model.state_dict()
    return int(sum(int((bits(state[k]) != bits(v)).sum()) for k, v in original.items()))


def assert_unchanged(model: torch.nn.Module, original: dict[str, torch.Tensor], where: str) -> None:
    """Stop when the model's bits differ from ``original`` (after a revert, say)."""
    n = changed_scalars(model, original)
    if n:
        raise RuntimeError(f"{where}: the model differs from the original in {n} scalars")
