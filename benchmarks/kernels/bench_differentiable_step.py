"""The differentiable editor step: closed-form backward (``fastedit.ops.editor_step``)
against autograd through ``Editor.step``, on the inner loop of Editable Training alone.

Workload: the editable parameters of the CIFAR ResNet-20's ``layer3`` (their shapes: 14 tensors,
~0.22 M scalars, float32), a cheap differentiable inner loss (``Σ w ⊙ tanh(θ)²``, so the editor step
is a large part of the work, unlike in a real model where the suffix forward dominates), ``k``
unrolled steps with the inner gradients from ``autograd.grad(create_graph=True)``, learnable
(tensor) hyper-parameters, then the meta-gradient w.r.t. the initial parameters and the
hyper-parameters. Per editor and method: median wall time of forward + backward over interleaved
repetitions (and of the process CPU time, steadier when other jobs share the cores), and the bytes the autograd graph keeps for backward after the forward (counted exactly
with ``saved_tensors_hooks``, each storage once): the memory the closed form is meant to save.

    python benchmarks/kernels/bench_differentiable_step.py --out benchmarks/results/bench_differentiable_step.json
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch

import fastedit as fe
from fastedit.models import resnet20
from fastedit.ops.editor_step import editor_step

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

EDITORS = {"gd": fe.GD(1e-3), "scaled_gd": fe.ScaledGD(1e-2), "rprop": fe.RProp(1e-3), "rmsprop": fe.RMSProp(1e-3),
           "momentum": fe.Momentum(1e-3), "adam": fe.Adam(1e-3)}


def learnable(editor):
    def t(v):
        return torch.tensor(float(v), dtype=torch.float64, requires_grad=True)
    hp = {k: (tuple(t(b) for b in v) if k == "betas" else t(v)) for k, v in editor.hparams().items()}
    leaves = [x for v in hp.values() for x in (v if isinstance(v, tuple) else (v,))]
    return type(editor).from_trusted(**hp), leaves


def unrolled(step, editor, theta0, weights, k, count_saved=False):
    ed, hps = learnable(editor)
    theta = [p.clone().requires_grad_() for p in theta0]
    leaves = list(theta)
    state = ed.init_state([p.detach() for p in theta])
    seen: dict[int, int] = {}

    def pack(x):
        seen[id(x.untyped_storage())] = x.untyped_storage().nbytes()
        return x
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x) if count_saved else None
    if hooks:
        hooks.__enter__()
    try:
        for _ in range(k):
            loss = sum((w * torch.tanh(p) ** 2).sum() for w, p in zip(weights, theta))
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            theta, state = step(ed, theta, grads, state)
        outer = sum((w * torch.tanh(p) ** 2).sum() for w, p in zip(weights, theta))
    finally:
        if hooks:
            hooks.__exit__(None, None, None)
    saved = sum(seen.values())
    torch.autograd.grad(outer, leaves + hps)
    return saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    theta0 = [p.detach().clone() for n, p in resnet20().named_parameters() if n.startswith("layer3")]
    weights = [torch.rand_like(p) for p in theta0]
    methods = {"closed_form": lambda e, *a: editor_step(e, *a), "autograd": lambda e, *a: e.step(*a)}
    machine = common.machine_info()
    results = {}
    for name in args.editors.split(","):
        editor = EDITORS[name]
        cpu: dict[str, list[float]] = {}
        calls = {m: (lambda step=step: unrolled(step, editor, theta0, weights, args.steps)) for m, step in methods.items()}
        times = common.time_round_robin(calls, args.repeats, warmup=args.warmup, cpu_times=cpu)
        saved = {m: unrolled(step, editor, theta0, weights, args.steps, count_saved=True) for m, step in methods.items()}
        row = {m: {"seconds": statistics.median(times[m]), "seconds_all": times[m],
                   "cpu_seconds": statistics.median(cpu[m]), "saved_bytes": saved[m]} for m in methods}
        row["time_ratio_closed_form_over_autograd"] = row["closed_form"]["seconds"] / row["autograd"]["seconds"]
        row["cpu_time_ratio_closed_form_over_autograd"] = (row["closed_form"]["cpu_seconds"]
                                                           / row["autograd"]["cpu_seconds"])
        row["saved_ratio_closed_form_over_autograd"] = saved["closed_form"] / saved["autograd"]
        results[name] = row
        print(f"{name:<10} closed form {row['closed_form']['seconds'] * 1e3:8.1f} ms  autograd "
              f"{row['autograd']['seconds'] * 1e3:8.1f} ms  (x{row['time_ratio_closed_form_over_autograd']:.2f}; "
              f"CPU time x{row['cpu_time_ratio_closed_form_over_autograd']:.2f})   "
              f"saved {saved['closed_form'] / 2**20:6.1f} vs {saved['autograd'] / 2**20:6.1f} MiB "
              f"(x{row['saved_ratio_closed_form_over_autograd']:.2f})", flush=True)
    out = {
        "config": {"params": "resnet20 layer3 shapes", "numel": sum(p.numel() for p in theta0), "k": args.steps,
                   "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
                   "dtype": "float32", "hparams": "0-dim float64 tensors requiring grad"},
        "command": common.command_line(__file__, argv), "machine": machine, "load_average_at_end": common.load_average(),
        "results": results,
    }
    if args.out:
        common.write_json(args.out, out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
