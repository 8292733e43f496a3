"""Benchmark of the fused in-place editor step ``editor_step_`` against PyTorch's own ways of
writing the same step, with the machine's copy bandwidth measured in the same run as the limit.

Cases (float32 parameters, float32 state):
  layer3      the 15 parameter tensors of ResNet-18 (CIFAR) ``layer3`` (2,099,712 values), one edit
  flat1e5     one flat buffer of 1e5 values
  flat1e7     one flat buffer of 1e7 values
  layer3_E32  layer3 with a leading edit dimension E = 32 (batched, 67.2 M values, all active)

Methods:
  fastedit_<backend>  fastedit.ops.editor_step_ (public API, Python checks included)
                      on each usable backend for the device (cpu here; cuda and triton on a GPU)
  torch_loop          the rule with in-place torch ops, tensor by tensor (what torch.optim's
                      single-tensor path does)
  torch_foreach       the same with torch._foreach_* (torch.optim's foreach path)
  torch_compile       torch.compile (inductor) of the reference math on one flat buffer, written
                      back in place (inductor fuses it into one pass: the strongest baseline)
  torch_compile_functional
                      torch.compile of Editor.step itself on the flat buffer (new tensors out)
  copy                torch copy_ of as many bytes as the step moves (read + write): the limit

Byte floor (what any implementation must move per parameter value; 4-byte float32 everywhere):
  GD, sign (RProp):   read g, θ; write θ                               = 3 × 4 = 12 bytes
  RMSProp, Momentum:  read g, θ, s; write θ, s                         = 5 × 4 = 20 bytes
  Adam:               read g, θ, m, v; write θ, m, v                    = 7 × 4 = 28 bytes
so one RMSProp step over layer3 moves 2,099,712 × 20 B = 42.0 MB. Achieved GB/s below is these
bytes over the measured time; "of copy" is the time copy_ needs for the same bytes divided by the
method's time (1.0 = as fast as a copy of the same traffic). The PyTorch paths move more (they
make several passes and temporaries); the fused kernel makes one pass.

    python benchmarks/kernels/bench_editor_step.py --quick --out benchmarks/results/bench_editor_step.json
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

import fastedit as fe
from fastedit.models import resnet18_cifar
from fastedit.ops import _extension as extension
from fastedit.ops import dispatch
from fastedit.ops.editor_step import _editor_step

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

BYTES_PER_VALUE = {"gd": 12, "rprop": 12, "rmsprop": 20, "momentum": 20, "adam": 28}
HP = dict(lr=1e-3, beta=0.5, eps=1e-6, b1=0.5, b2=0.999, adam_eps=1e-8)


def make_editor(name: str):
    return {"gd": fe.GD(HP["lr"]), "rprop": fe.RProp(HP["lr"]),
            "rmsprop": fe.RMSProp(HP["lr"], beta=HP["beta"], eps=HP["eps"]),
            "momentum": fe.Momentum(HP["lr"], momentum=0.9),
            "adam": fe.Adam(HP["lr"], betas=(HP["b1"], HP["b2"]), eps=HP["adam_eps"])}[name]


# ------------------------------------------------------------------------------------------------
# PyTorch baselines: the rule in place, after the first step (t = 5: no RMSProp first step)


def loop_step(name, ps, gs, s1, s2, t=5.0):
    lr = HP["lr"]
    for i, (p, g) in enumerate(zip(ps, gs)):
        if name == "gd":
            p.add_(g, alpha=-lr)
        elif name == "rprop":
            p.add_(torch.sign(g), alpha=-lr)
        elif name == "rmsprop":
            s = s1[i]
            s.mul_(HP["beta"]).addcmul_(g, g, value=1 - HP["beta"])
            p.addcdiv_(g, (s + HP["eps"]).sqrt_(), value=-lr)
        elif name == "momentum":
            v = s1[i]
            v.mul_(0.9).add_(g, alpha=lr)
            p.sub_(v)
        elif name == "adam":
            m, v = s1[i], s2[i]
            bc1, bc2 = 1 - HP["b1"] ** t, 1 - HP["b2"] ** t
            m.mul_(HP["b1"]).add_(g, alpha=1 - HP["b1"])
            v.mul_(HP["b2"]).addcmul_(g, g, value=1 - HP["b2"])
            denom = (v / bc2).sqrt_().add_(HP["adam_eps"])
            p.addcdiv_(m, denom, value=-lr / bc1)


def foreach_step(name, ps, gs, s1, s2, t=5.0):
    lr = HP["lr"]
    if name == "gd":
        torch._foreach_add_(ps, gs, alpha=-lr)
    elif name == "rprop":
        torch._foreach_add_(ps, torch._foreach_sign(gs), alpha=-lr)
    elif name == "rmsprop":
        torch._foreach_mul_(s1, HP["beta"])
        torch._foreach_addcmul_(s1, gs, gs, value=1 - HP["beta"])
        denom = torch._foreach_add(s1, HP["eps"])
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(ps, gs, denom, value=-lr)
    elif name == "momentum":
        torch._foreach_mul_(s1, 0.9)
        torch._foreach_add_(s1, gs, alpha=lr)
        torch._foreach_sub_(ps, s1)
    elif name == "adam":
        bc1, bc2 = 1 - HP["b1"] ** t, 1 - HP["b2"] ** t
        torch._foreach_mul_(s1, HP["b1"])
        torch._foreach_add_(s1, gs, alpha=1 - HP["b1"])
        torch._foreach_mul_(s2, HP["b2"])
        torch._foreach_addcmul_(s2, gs, gs, value=1 - HP["b2"])
        denom = torch._foreach_div(s2, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, HP["adam_eps"])
        torch._foreach_addcdiv_(ps, s1, denom, value=-lr / bc1)


def flat_math(name, p, g, s1, s2, t=5.0):
    """The reference math on one flat buffer, written back in place (what torch.compile fuses)."""
    lr = HP["lr"]
    if name == "gd":
        p.copy_(p - lr * g)
    elif name == "rprop":
        p.copy_(p - lr * torch.sign(g))
    elif name == "rmsprop":
        s = HP["beta"] * s1 + (1 - HP["beta"]) * g * g
        s1.copy_(s)
        p.copy_(p - lr * g / torch.sqrt(s + HP["eps"]))
    elif name == "momentum":
        v = lr * g + 0.9 * s1
        s1.copy_(v)
        p.copy_(p - v)
    elif name == "adam":
        m = HP["b1"] * s1 + (1 - HP["b1"]) * g
        v = HP["b2"] * s2 + (1 - HP["b2"]) * g * g
        s1.copy_(m)
        s2.copy_(v)
        m_hat = m / (1 - HP["b1"] ** t)
        v_hat = v / (1 - HP["b2"] ** t)
        p.copy_(p - lr * m_hat / (torch.sqrt(v_hat) + HP["adam_eps"]))


# ------------------------------------------------------------------------------------------------


def layer3_shapes():
    return [tuple(p.shape) for p in resnet18_cifar().layer3.parameters()]


def time_blocked(fns: dict, reps: int, warmup: int) -> dict:
    """Each method timed on its own, back to back: the steady state of repeated steps (warm caches
    when the data fit the last-level cache, as layer3's 25 MB do on a 32 MB L3)."""
    return {k: common.summary_ms(common.time_calls(fn, reps, warmup=warmup)) for k, fn in fns.items()}


def time_cold(fns: dict, reps: int, warmup: int, flush: torch.Tensor | None) -> dict:
    """The methods interleaved call by call. All of them update the SAME tensors, so without
    ``flush`` a method finds in the cache what the previous one left there; with ``flush`` (a buffer
    larger than the last-level cache, overwritten untimed before every call) every call starts cold,
    as an editor step does inside an edit loop, where a forward and backward pass run between steps."""
    before = (lambda: flush.add_(1.0)) if flush is not None else None
    times = common.time_round_robin(fns, reps, warmup=warmup, before_each=before)
    return {k: common.summary_ms(v) for k, v in times.items()}


def run_case(case: str, editors: list[str], device: torch.device, args, compiled: dict) -> list[dict]:
    shapes = layer3_shapes()
    if case == "layer3":
        shapes_used, batched = shapes, False
    elif case == "flat1e5":
        shapes_used, batched = [(100_000,)], False
    elif case == "flat1e7":
        shapes_used, batched = [(10_000_000,)], False
    elif case == "layer3_E32":
        shapes_used, batched = [(32,) + s for s in shapes], True
    else:
        raise ValueError(case)
    numel = sum(torch.Size(s).numel() for s in shapes_used)
    reps = args.reps if numel < 5e7 else max(5, args.reps // 4)
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes_used]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes_used]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name in editors:
        editor = make_editor(name)
        moved = BYTES_PER_VALUE[name] * numel
        fns = {}

        state = editor.init_state(params, batched=batched)
        state["t"].fill_(4.0)  # past the first step, as the baselines
        for slot in editor.slots:
            for x in state[slot]:
                x.uniform_(0.5, 1.0)
        s1 = state[editor.slots[0]] if editor.slots else []
        s2 = state[editor.slots[1]] if len(editor.slots) > 1 else []
        active = torch.ones(state["t"].shape, dtype=torch.bool, device=device) if batched else None

        backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
        for backend in backends:
            st = dispatch._status(backend)
            if not st.usable or "editor_step" not in st.ops:
                continue

            def fused(backend=backend):
                with torch.no_grad():
                    _editor_step(editor, params, grads, state, active, batched, None, backend=backend)
                sync()
            fns[f"fastedit_{backend}"] = fused

        def loop():
            loop_step(name, params, grads, s1, s2)
            sync()
        fns["torch_loop"] = loop

        def foreach():
            foreach_step(name, params, grads, s1, s2)
            sync()
        fns["torch_foreach"] = foreach

        if not args.no_compile:
            flat_p = torch.cat([p.reshape(-1) for p in params])
            flat_g = torch.cat([g.reshape(-1) for g in grads])
            flat_s1 = torch.cat([x.reshape(-1) for x in s1]) if s1 else flat_p
            flat_s2 = torch.cat([x.reshape(-1) for x in s2]) if s2 else flat_p
            if name not in compiled:
                compiled[name] = torch.compile(lambda p, g, a, b, _n=name: flat_math(_n, p, g, a, b), dynamic=True)
            fn = compiled[name]

            def comp():
                fn(flat_p, flat_g, flat_s1, flat_s2)
                sync()
            fns["torch_compile"] = comp

            # torch.compile of the functional reference itself (Editor.step on the flat buffer,
            # new tensors out, as a user of fastedit without the kernels would write it)
            key = name + "/functional"
            if key not in compiled:
                compiled[key] = torch.compile(lambda p, g, st, _e=editor: _e.step(p, g, st), dynamic=True)
            fstate = {"t": state["t"].new_full((), 4.0),
                      **{slot: [x] for slot, x in zip(editor.slots, (flat_s1, flat_s2))}}
            ffn = compiled[key]

            def comp_functional():
                ffn(flat_p, flat_g, fstate)
                sync()
            fns["torch_compile_functional"] = comp_functional

        src = torch.empty(moved // 2 // 4, device=device)
        dst = torch.empty_like(src)
        src.uniform_()

        def copy():
            dst.copy_(src)
            sync()
        fns["copy"] = copy
        if args.cache == "warm":
            results = time_blocked(fns, reps, args.warmup)
        else:
            flush = torch.empty(args.flush_mb * 2 ** 20 // 4, device=device) if device.type == "cpu" else None
            results = time_cold(fns, reps, args.warmup, flush)
        fns.clear()
        src = dst = None  # frees the buffers before the next size allocates its own

        copy_ms = results["copy"]["median_ms"]
        torch_paths = [k for k in results if k.startswith("torch_")]
        fastest_torch = min(torch_paths, key=lambda k: results[k]["median_ms"])
        for method, r in results.items():
            r["gb_per_s"] = moved / (r["median_ms"] * 1e-3) / 1e9
            r["fraction_of_copy"] = copy_ms / r["median_ms"]
            r["speedup_vs_fastest_torch"] = results[fastest_torch]["median_ms"] / r["median_ms"]
        rows.append({"case": case, "editor": name, "numel": numel, "tensors": len(shapes_used),
                     "batched": batched, "bytes_moved": moved, "fastest_torch": fastest_torch,
                     "results": results})
        line = " ".join(f"{k}={v['median_ms']:.3f}ms({v['speedup_vs_fastest_torch']:.2f}x)" for k, v in results.items())
        print(f"{case:11s} {name:8s} {line}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="layer3,flat1e5,flat1e7,layer3_E32",
                        help="comma-separated cases: layer3, flat1e5, flat1e7, layer3_E32")
    parser.add_argument("--editors", default="rmsprop,rprop,gd,adam",
                        help="comma-separated editors: gd, rprop, rmsprop, momentum, adam")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (at most 40, 5 warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold",
                        help="cold: every call starts with the data evicted (round robin, a large buffer "
                             "written before each call; as inside an edit loop); warm: each method "
                             "timed back to back on its own (steady state)")
    parser.add_argument("--flush-mb", type=int, default=128, help="size of the eviction buffer (cold)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 40)
        args.warmup = min(args.warmup, 5)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    extension.load()
    machine = common.machine_info(device)  # before the run: its load average is the one at the start
    compiled: dict = {}
    rows = []
    for case in args.cases.split(","):
        rows += run_case(case.strip(), [e.strip() for e in args.editors.split(",")], device, args, compiled)
    report = {"command": common.command_line(__file__, argv), "machine": machine,
              "settings": dict(vars(args)), "hyperparameters": HP, "rows": rows,
              "load_average_at_end": common.load_average()}
    if args.out:
        common.write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
