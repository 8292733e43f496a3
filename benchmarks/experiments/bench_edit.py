"""Latency of one edit (CIFAR ResNet-20, single images, ``layer3``, RMSProp, k = 10): eager, compiled
and CUDA-graph edits against a naive loop, with the floor from the model's own passes.

Compared in the same run, on the same edits (each applied to the original model, then reverted),
interleaved edit pass by edit pass so that a load spike hits every method alike:
  * ``naive``: the official-code style: full forward + autograd on the live module, ``.item()`` per
    step, a copy of the parameters saved for rollback (:func:`benchmarks.common.naive_edit`);
  * ``eager``: ``fe.edit`` (frozen prefix once, suffix per step, fused editor step);
  * ``no_prefix``: ``fe.edit(use_prefix=False)``, the whole model per step;
  * ``compiled``: ``fe.edit(compile=True)``, prefix and suffix through ``torch.compile`` (its compile
    time and the number of edits after which it pays off are reported);
  * ``cudagraph``: ``fe.edit(cuda_graph=True)`` (CUDA only: the masked loop replayed as one graph).
Every fastedit mode must agree with ``eager`` on every edit's success and step count (``agrees``).

The floor (what the arithmetic allows): the eager passes of the model measured here, an edit with
``s`` steps costing one prefix forward + ``s`` suffix forward-and-backward + one suffix forward (the
check that finds it satisfied). ``floor_ratio`` = floor / measured (1.0 = no overhead left).
The naive loop's own floor: ``s`` full forward-and-backward (to ``layer3``) + one full forward.
On CUDA the loop runs every masked step (no early exit), so its floor uses ``k`` steps.

    python benchmarks/experiments/bench_edit.py --out benchmarks/results/bench_edit.json
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit._core import EditTarget, clear_split_cache
from fastedit.models import load_pretrained_cifar_resnet, resnet20

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

MODES = ("naive", "eager", "no_prefix", "compiled", "cudagraph")
PARAMS = "layer3"


def classification_loss(z: torch.Tensor, y: int) -> torch.Tensor:
    """The edit constraint max_i z_i − z_y of one image's logits."""
    return (z.max(-1).values - z[0, y])[0]


def load_setup(args, device: torch.device):
    """(model, images [N, 3, 32, 32], labels [N], what was loaded): the pretrained ResNet-20 and the
    1,017 lossless CIFAR-10 test images, or with ``--synthetic`` (or when either is missing) a seeded
    random ResNet-20 and 1,017 random images and labels of the same shapes."""
    weights = pathlib.Path(args.weights) if args.weights else None
    data = None
    if not args.synthetic:
        try:
            weights = weights or common.models_dir() / "resnet20-12fca82f.th"
            data = common.data_dir(args.data_dir) / "cifar10" / "cifar10_lossless_subset.npz"
        except (OSError, ValueError, KeyError):
            weights = data = None
    if not args.synthetic and weights is not None and weights.exists() and data is not None and data.exists():
        model = load_pretrained_cifar_resnet(weights)
        x, y = fdata.load_cifar10_lossless(data, "test")
        x, y = fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD), torch.as_tensor(y, dtype=torch.int64)
        what = "pretrained ResNet-20, CIFAR-10 test images"
    else:
        torch.manual_seed(0)
        model = resnet20()
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(1017, 3, 32, 32, generator=gen), torch.randint(0, 10, (1017,), generator=gen)
        what = "random-init ResNet-20, random images (synthetic)"
    return model.to(device).eval(), x.to(device), y.to(device), what


def pass_times(model, x1: torch.Tensor, repeats: int, device) -> dict:
    """Median ms of the model's own eager passes on one image: full forward, full forward + backward
    to ``layer3``, prefix forward, suffix forward (with grad) and suffix forward + backward."""
    target = EditTarget.build(model, PARAMS, inputs=x1)
    acts = target.prefix(x1)
    theta = [p.detach().clone().requires_grad_() for p in target.params]
    params = [p for n, p in model.named_parameters() if n.startswith(PARAMS + ".")]

    def full_fb():
        torch.autograd.grad(model(x1)[0, 0], params)

    def suffix_fb():
        torch.autograd.grad(target.logits(acts, theta)[0, 0], theta)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run
    fns = {"full_forward": no_grad(lambda: model(x1)), "full_forward_backward": full_fb,
           "prefix_forward": no_grad(lambda: target.prefix(x1)),
           "suffix_forward": lambda: target.logits(acts, theta), "suffix_forward_backward": suffix_fb}
    times = common.time_round_robin(fns, repeats, warmup=5, device=device)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def control_pass(model, x: torch.Tensor, device, batch: int = 256) -> dict:
    """Seconds of one pass over the control images: the full model vs the suffix on cached prefix
    activations (what fe.evaluate runs per edit)."""
    target = EditTarget.build(model, PARAMS)
    with torch.no_grad():
        chunks = [target.prefix(x[i:i + batch]) for i in range(0, x.shape[0], batch)]
        times = common.time_round_robin({
            "full": lambda: [model(x[i:i + batch]) for i in range(0, x.shape[0], batch)],
            "suffix": lambda: [target.logits(a) for a in chunks]}, 5, warmup=1, device=device)
    return {"full": statistics.median(times["full"]), "suffix": statistics.median(times["suffix"]),
            "images": int(x.shape[0]), "batch": batch}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="the CIFAR-10 ResNet-20 checkpoint (default: $FASTEDIT_MODELS/resnet20-12fca82f.th)")
    ap.add_argument("--data-dir", help="folder holding cifar10/ (default: $FASTEDIT_DATA)")
    ap.add_argument("--synthetic", action="store_true", help="random weights and images (no data needed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3, help="RMSProp lr")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes over the edits per mode (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="8 edits, 2 repeats (a smoke run)")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="reuse torch.compile's on-disk caches (default: a fresh cache folder, the compile time a "
                         "new user sees)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.quick:
        args.edits, args.repeats = min(args.edits, 8), min(args.repeats, 2)
    torch.set_num_threads(args.threads)
    if not args.warm_compile_cache:  # inductor and triton read their cache folder when they compile
        cold = tempfile.mkdtemp(prefix="fastedit-bench-compile-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cold, "triton")
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    skipped = {}
    if "cudagraph" in modes and device.type != "cuda":
        modes.remove("cudagraph")
        skipped["cudagraph"] = "needs a CUDA device"

    model, x, _, what = load_setup(args, device)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[0], generator=gen)[:args.edits].tolist()
    labels = torch.randint(0, 10, (len(idx),), generator=gen).tolist()
    editor = fe.RMSProp(args.lr)
    names = {n for n, _ in model.named_parameters() if n.startswith(PARAMS + ".")}
    params = [p for n, p in model.named_parameters() if n in names]
    options = {"eager": {}, "no_prefix": {"use_prefix": False}, "compiled": {"compile": True},
               "cudagraph": {"cuda_graph": True}}

    def run(mode) -> list[tuple[bool, int]]:
        out = []
        for i, label in zip(idx, labels):
            xi = x[i:i + 1]
            if mode == "naive":
                steps = common.naive_edit(params, lambda: classification_loss(model(xi), label), editor, args.max_steps)
                out.append((None, steps))
            else:
                r = fe.edit(model, xi, label, editor=editor, params=PARAMS, max_steps=args.max_steps, **options[mode])
                out.append((r.success, r.steps))
                r.revert()
        return out

    # first pass of each mode: compilation and captures happen here and are timed
    first, outcomes, compile_seconds = {}, {}, None
    for mode in modes:
        clear_split_cache(model)
        times = common.time_calls(lambda: outcomes.__setitem__(mode, run(mode)), 1, warmup=0, device=device)
        first[mode] = times[0]
        if mode == "compiled":
            probe = fe.edit(model, x[idx[0]:idx[0] + 1], labels[0], editor=editor, params=PARAMS,
                            max_steps=args.max_steps, compile=True)
            probe.revert()
            assert probe.compiled, probe.compile_reason
    peak = {}
    for mode in modes:
        peak[mode], _, how = common.peak_memory_increase(lambda: run(mode), device)
    times = common.time_round_robin({m: (lambda m=m: run(m)) for m in modes}, args.repeats, warmup=0, device=device)
    per_edit = {m: 1e3 * statistics.median(t) / len(idx) for m, t in times.items()}

    passes = pass_times(model, x[idx[0]:idx[0] + 1], max(20, 3 * args.repeats), device)
    control = control_pass(model, x, device)
    steps = [s for _, s in outcomes.get("eager", outcomes[modes[0]])]
    early_exit = device.type == "cpu"
    mean_steps = statistics.mean(steps) if early_exit else float(args.max_steps)
    floor_ms = passes["prefix_forward"] + mean_steps * passes["suffix_forward_backward"] + passes["suffix_forward"]
    naive_floor_ms = (statistics.mean(steps) * passes["full_forward_backward"] + passes["full_forward"])

    rows = {}
    for mode in modes:
        row = {"ms_per_edit": per_edit[mode], "first_pass_ms_per_edit": 1e3 * first[mode] / len(idx),
               "steps_total": sum(s for _, s in outcomes[mode]), "peak_memory_bytes": peak[mode],
               "speedup_vs_naive": per_edit["naive"] / per_edit[mode] if "naive" in per_edit else None}
        if mode != "naive":
            row["floor_ratio"] = floor_ms / per_edit[mode]
            if "eager" in outcomes:
                row["agrees_with_eager"] = outcomes[mode] == outcomes["eager"]
        else:
            row["floor_ratio"] = naive_floor_ms / per_edit[mode]
        rows[mode] = row
    if "compiled" in rows:
        compile_s = first["compiled"] - per_edit["compiled"] * len(idx) / 1e3
        saved_ms = per_edit.get("eager", float("nan")) - per_edit["compiled"]
        rows["compiled"]["compile_seconds"] = compile_s
        rows["compiled"]["pays_off_after_edits"] = (1e3 * compile_s / saved_ms) if saved_ms > 0 else None
        compile_seconds = compile_s
    for mode, row in rows.items():
        extra = f"  ×{row['speedup_vs_naive']:.2f} naive" if row["speedup_vs_naive"] else ""
        print(f"{mode:<10} {row['ms_per_edit']:7.2f} ms/edit  {row['floor_ratio']:5.0%} of floor{extra}"
              f"  ({row['steps_total']} steps over {len(idx)} edits)")
    print(f"floor {floor_ms:.2f} ms/edit (naive loop's floor {naive_floor_ms:.2f}); {what}")
    print(f"control pass over {control['images']} images: full {1e3 * control['full']:.1f} ms, suffix "
          f"{1e3 * control['suffix']:.1f} ms ({control['full'] / control['suffix']:.1f}x)")
    result = {
        "command": common.command_line(__file__, argv),
        "setup": what, "device": str(device), "params": PARAMS, "editor": editor.to_dict(), "edits": len(idx),
        "max_steps": args.max_steps, "early_exit": early_exit, "mean_steps": statistics.mean(steps),
        "modes": rows, "skipped": skipped, "passes_ms": passes, "floor_ms_per_edit": floor_ms,
        "naive_floor_ms_per_edit": naive_floor_ms, "compile_seconds": compile_seconds or None,
        "control_pass_seconds": control,
        "peak_memory_measured_by": how, "repeats": args.repeats, "compile_cache": "warm" if args.warm_compile_cache else "cold",
        "machine": common.machine_info(device), "load_average_at_end": common.load_average(),
    }
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
