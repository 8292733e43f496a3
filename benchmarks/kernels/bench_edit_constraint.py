"""Benchmark of the ``edit_constraint`` op (``max_i z[b, i] − z[b, target[b]]`` per row) against its
PyTorch formulation, forward and forward + backward (what an edit step runs).

Cases ``B × C`` (float32): one row of 10 classes (an image edit: the op's call overhead is all
there is), 256 × 10, 8,192 × 1,000, and rows of GPT-2's vocabulary (1 × 50,257 and 64 × 50,257:
a language-model edit). Methods: ``fused`` (``fastedit.ops.edit_constraint``, the compiled op
with its autograd formula), ``reference`` (``fastedit.ops.edit_constraint.reference``: ``amax``
minus ``gather``) and ``torch.compile`` of the reference. Floor: a one-pass method reads the logits
once (B·C·4 bytes, plus the labels); GB/s below is those bytes over the time, and "of copy_" the
fraction of the bandwidth ``copy_`` reaches on the same logits in the same run (read + write).

    python benchmarks/kernels/bench_edit_constraint.py --out benchmarks/results/bench_edit_constraint.json
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch

from fastedit.ops import _extension as extension
from fastedit.ops.edit_constraint import edit_constraint, reference

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

CASES = ((1, 10), (256, 10), (8192, 1000), (1, 50257), (64, 50257))


def methods(no_compile: bool) -> dict:
    out = {"reference": reference}
    if extension.load() is not None:
        out["fused"] = lambda z, t: edit_constraint(z, t, backend="cpu")
    if not no_compile:
        out["torch_compile"] = torch.compile(reference, dynamic=False)
    return out


def run_case(b: int, c: int, fns: dict, repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(b * 100_003 + c)
    logits = (3 * torch.randn(b, c, generator=gen)).to(device)
    target = torch.randint(0, c, (b,), generator=gen).to(device)
    bytes_read = logits.numel() * logits.element_size() + target.numel() * target.element_size()
    scratch = torch.empty_like(logits)
    copy_s = statistics.median(common.time_calls(lambda: scratch.copy_(logits), repeats, warmup=3, device=device))
    copy_gbs = 2 * logits.numel() * logits.element_size() / copy_s / 1e9
    leaf = logits.clone().requires_grad_()
    expected = reference(logits, target)
    calls = {}
    for name, fn in fns.items():
        torch.testing.assert_close(fn(logits, target), expected, rtol=0, atol=0)  # exact: max and a pick
        calls[f"{name}/forward"] = lambda fn=fn: fn(logits, target)
        calls[f"{name}/forward_backward"] = lambda fn=fn: torch.autograd.grad(fn(leaf, target).sum(), leaf)
    times = common.time_round_robin(calls, repeats, warmup=3, device=device)
    rows = {}
    for key, t in times.items():
        median = statistics.median(t)
        rows[key] = {"median_us": 1e6 * median, "min_us": 1e6 * min(t), "reps": len(t),
                     "gb_per_s": bytes_read / median / 1e9, "fraction_of_copy": bytes_read / median / 1e9 / copy_gbs}
    for kind in ("forward", "forward_backward"):
        torch_paths = [k for k in rows if k.endswith(kind) and not k.startswith("fused")]
        fastest = min(torch_paths, key=lambda k: rows[k]["median_us"])
        for k in rows:
            if k.endswith(kind):
                rows[k]["speedup_vs_fastest_torch"] = rows[fastest]["median_us"] / rows[k]["median_us"]
    line = "  ".join(f"{k}={v['median_us']:.1f}us" for k, v in rows.items())
    print(f"{b:>5} x {c:<6} {line}", flush=True)
    return {"B": b, "C": c, "bytes_read_one_pass": bytes_read, "copy_bandwidth_gb_per_s": copy_gbs, "methods": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cases", default=",".join(f"{b}x{c}" for b, c in CASES), help="comma-separated BxC")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per method (default 200; median)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    machine = common.machine_info(device)
    fns = methods(args.no_compile)
    skipped = {} if "fused" in fns else {"fused": extension.unavailable_reason()}
    results = []
    for case in args.cases.split(","):
        b, c = (int(v) for v in case.lower().split("x"))
        results.append(run_case(b, c, fns, args.repeats, device))
    report = {"command": common.command_line(__file__, argv), "machine": machine, "skipped": skipped,
              "results": results, "load_average_at_end": common.load_average()}
    if args.out:
        common.write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
