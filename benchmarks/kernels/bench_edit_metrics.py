"""Benchmark of the fused ``edit_metrics`` op against its PyTorch formulation.

For ``E`` edits, ``N`` control samples and ``C`` classes (default: E = 32, N = 10,000, C = 10 and
1000, float32), times (median of --repeats) every backend usable here: the fused compiled op (CPU
or CUDA), the Triton kernel (GPU only), the PyTorch reference (``fastedit.ops.edit_metrics.reference``, the
formulation ``fastedit.evaluate`` used: it materialises [E, N, C] log-softmaxes) and
``torch.compile`` of that reference. Reported per method: time, bytes read by a one-pass method
(ref + edited + labels) and the achieved GB/s against a ``copy_`` bandwidth measured in the same
run (read + write of the edited tensor), the speed-up over the fastest PyTorch path (by wall time, and by
process CPU time, which a machine shared with other jobs distorts less), and the peak
extra memory of a call (CPU: growth of the process's peak RSS, reset before each call through
/proc/self/clear_refs, measured after all timings with glibc's mmap threshold set to 64 KiB and the
heap trimmed before each call, so that the call's allocations show in the RSS; GPU: torch.cuda.max_memory_allocated above the inputs).

    python benchmarks/kernels/bench_edit_metrics.py --out benchmarks/results/bench_edit_metrics.json
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch

from fastedit.ops import _extension as extension
from fastedit.ops.edit_metrics import reference

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402


def _copy_bandwidth(x: torch.Tensor, device: torch.device, repeats: int) -> float:
    out = torch.empty_like(x)
    times = common.time_calls(lambda: out.copy_(x), repeats, device=device)
    return 2 * x.numel() * x.element_size() / statistics.median(times) / 1e9


def _methods(ref, labels, edited, device: torch.device, no_compile: bool) -> tuple[dict, dict]:
    """The timed callables on these inputs (bound here: the memory phase runs them later)."""
    methods: dict[str, object] = {}
    skipped: dict[str, str] = {}
    if extension.load() is not None and (device.type == "cpu" or extension.has_cuda_ops()):
        methods["fused_" + device.type] = lambda: torch.ops.fastedit.edit_metrics(ref, labels, edited, False)
    else:
        skipped["fused_" + device.type] = extension.unavailable_reason() or "no CUDA kernels in this build"
    if device.type == "cuda":
        from fastedit.ops.triton.edit_metrics import edit_metrics_triton
        methods["triton"] = lambda: edit_metrics_triton(ref, labels, edited, False)
    else:
        skipped["triton"] = "Triton needs a GPU (the CPU interpreter has no timing value)"
    methods["pytorch_reference"] = lambda: reference(ref, labels, edited)
    if not no_compile:
        compiled = torch.compile(reference)
        methods["pytorch_compiled"] = lambda: compiled(ref, labels, edited)
    return methods, skipped


def run(args, argv=None) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    machine = common.machine_info(device)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    results = []
    for C in args.classes:
        E, N = args.edits, args.samples
        ref = (torch.randn(N, C, device=device) * 3).to(dtype)
        edited = (ref.float() + torch.randn(E, N, C, device=device)).to(dtype)
        labels = torch.randint(0, C, (N,), device=device)
        bytes_read = (ref.numel() + edited.numel()) * ref.element_size() + labels.numel() * 8
        copy_gbs = _copy_bandwidth(edited, device, args.repeats)

        methods, skipped = _methods(ref, labels, edited, device, args.no_compile)

        rows = {}
        for name, fn in methods.items():
            cpu_times: list[float] = []
            times = common.time_calls(fn, args.repeats, device=device, cpu_times=cpu_times)
            median = statistics.median(times)
            rows[name] = {
                "median_s": median, "min_s": min(times), "times_s": times,
                "cpu_time_median_s": statistics.median(cpu_times),
                "gb_per_s": bytes_read / median / 1e9,
                "fraction_of_copy_bandwidth": bytes_read / median / 1e9 / copy_gbs,
            }
            print(f"C={C:5d} {name:18s} {median * 1e3:10.2f} ms (min {min(times) * 1e3:.2f})  "
                  f"{rows[name]['gb_per_s']:7.2f} GB/s  "
                  f"({rows[name]['fraction_of_copy_bandwidth']:.2f} of copy_)  "
                  f"cpu {rows[name]['cpu_time_median_s'] * 1e3:.1f} ms", flush=True)
        torch_paths = [rows[k]["median_s"] for k in ("pytorch_reference", "pytorch_compiled") if k in rows]
        fastest_torch = min(torch_paths)
        fastest_torch_cpu = min(rows[k]["cpu_time_median_s"] for k in ("pytorch_reference", "pytorch_compiled")
                                if k in rows)
        for row in rows.values():
            row["speedup_vs_fastest_pytorch"] = fastest_torch / row["median_s"]
            row["min_time_speedup_vs_fastest_pytorch"] = min(
                rows[k]["min_s"] for k in ("pytorch_reference", "pytorch_compiled") if k in rows) / row["min_s"]
            row["cpu_time_speedup_vs_fastest_pytorch"] = fastest_torch_cpu / row["cpu_time_median_s"]
        # what the fused op allocates besides its outputs: predictions (int32) and per-row KL
        # (float32) of every (edit, sample) pair, and the original predictions
        fused_temporaries = 8 * E * N + 4 * N
        results.append({"E": E, "N": N, "C": C, "dtype": args.dtype, "bytes_read_one_pass": bytes_read,
                        "fused_temporaries_bytes_by_design": fused_temporaries,
                        "edited_logits_bytes": edited.numel() * edited.element_size(),
                        "copy_bandwidth_gb_per_s": copy_gbs, "methods": rows, "skipped": skipped,
                        "_methods": methods})
    if device.type == "cpu" and not common.mmap_big_allocations():
        print("could not set glibc's mmap threshold: peak memory may read low", file=sys.stderr)
    for entry in results:
        for name, fn in entry.pop("_methods").items():
            fn()  # once more after the allocator change, then the larger of two readings
            readings = [r for r in (common.peak_memory_increase(fn, device)[0] for _ in range(2)) if r is not None]
            peak = max(readings) if readings else None
            entry["methods"][name]["peak_extra_bytes"] = peak
            print(f"C={entry['C']:5d} {name:18s} peak extra memory {peak}", flush=True)
    return {"command": common.command_line(__file__, argv), "machine": machine, "results": results}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=32, help="E, edits (default 32)")
    p.add_argument("--samples", type=int, default=10_000, help="N, control samples (default 10000)")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 1000], help="C values (default 10 1000)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method (default 5; median)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--out", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    report = run(args, argv)
    if args.out:
        common.write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
