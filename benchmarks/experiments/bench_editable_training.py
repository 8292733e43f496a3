"""Editable Training: time and peak memory of one training step, against a plain step, same run.

Configuration (defaults): the pretrained CIFAR ResNet-20 (``--random-init``: a fresh one), a batch
of 128 real CIFAR-10 training images (the lossless subset, normalised), editable parameters
``layer3``, RMSProp(lr = 1e-3, β = 0.5, learnable lr and β), k = 10, c_edit = c_loc = 0.01, one edit
per batch (an image of the batch, a uniformly random target class; fixed seed, passed explicitly, so
every method sees the same edits), float32, model in train mode, Adam (lr 1e-4) over the model and
the learnable hyper-parameters. One training step = forward + backward + optimizer step.

Methods, each with its own copy of the model and its own optimizer, run interleaved (one step of each
per repetition, on the same batch and edit), median over the repetitions after warm-up:
  1. plain:            cross_entropy(model(x), y), backward, Adam step;
  2. fastedit:         ``fe.EditableTraining(..., rematerialize=False)``;
  3. fastedit_remat:   ``fe.EditableTraining(..., rematerialize=True)``;
  3b. fastedit_autograd_step, fastedit_remat_autograd_step: the same with ``closed_form=False``: each
                       editor step is ``Editor.step``'s chain of elementwise ops recorded by autograd
                       instead of one node with a closed-form backward (``fastedit.ops.editor_step``);
  4. naive:            written here, like the official code: every inner step a full-model forward of
                       the edit image with ``torch.func.functional_call`` (eval mode), the gradient by
                       ``torch.autograd.grad(create_graph=True)``, ``.item()`` per step for early
                       stopping; ``L_loc`` from a full second forward of the batch with the edited
                       parameters (train mode, copies of the BatchNorm buffers);
  5. higher:           ``higher.innerloop_ctx(model, RMSprop(layer3), copy_initial_weights=False)``, the
                       same loop with ``diffopt.step``; lr and α (β) given as differentiable overrides.
                       higher's RMSprop is torch's, not the paper's: s₀ = 0 (so its first step is
                       ≈ lr/√(1−β)·sign(g), not lr·sign(g)) and eps outside the root. It is the
                       "paper-style with a library" comparison, not the same editor; its step counts
                       may differ.

The floor (written before measuring). Beyond a plain step, Editable Training must at least (i) run
the suffix (layer3 + pooling + linear) a second time on the batch with the edited parameters, forward
and backward, for L_loc — about one extra suffix forward + backward on the batch — and (ii) run k
single-image inner steps (suffix forward + vjp on one image) and their backward, tiny next to a
batch of 128. So the floor ratio is ≈ (plain + suffix_fwd_bwd) / plain, with suffix_fwd_bwd measured
here in the same run (the suffix on detached prefix activations of the batch, train mode). The
issue's targets: ≤ 1.5× a plain step in time, and ≤ 1.3× a plain step's peak memory with
rematerialisation. The paper reports ≈ 2.5× a plain step for Editable Training of ResNet-18 chain 3.

Time: wall-clock seconds per step (``time.perf_counter``), median over the repetitions; the process
CPU time per step (all threads, ``time.process_time``) is recorded too, as a check when other jobs
share the cores (the JSON records the load average before, during and after).

Peak memory (CPU). Per method, in separate repetitions after the timed ones (the measurement trims
the allocator, which would perturb timing): ``gc.collect()``, glibc ``malloc_trim(0)`` (free heap
pages go back to the kernel, so the step must fault in what it uses), reset the kernel's resident
high-water mark (``echo 5 > /proc/self/clear_refs``), read the resident set (``/proc/self/statm``),
run the step, read ``VmHWM`` from ``/proc/self/status``. Peak = VmHWM − resident before the step:
the largest resident-memory increase during the step, exact (kernel-tracked, no sampling), which
includes allocator fragmentation and non-tensor memory. Where clear_refs is not writable, a thread
samples ``/proc/self/statm`` every 0.5 ms instead (the JSON says which method was used). Second
measure, torch's own count: one step per method under ``torch.profiler`` (``profile_memory=True``),
exported with ``export_memory_timeline(device="cpu")``: the peak of live tensor bytes above the level
at the step's start (no allocator or library overhead, so its ratios are the larger ones).

A breakdown of the fastedit step (rematerialize on and off) is timed by re-running the phases of
``EditableTraining.forward`` with timers (private methods ``_split``/``_run_edit``/``_kl_to_edited``;
benchmark only): base forward, the edit (prefix of the edit image + k inner steps), the L_loc forward,
backward, optimizer step; and the plain step's forward / backward / optimizer step, so
``extra backward = fastedit backward − plain backward``.

Options: ``--batch``, ``--steps`` (k), ``--repeats``, ``--warmup``, ``--memory-repeats``,
``--editor-lr``, ``--threads``, ``--methods`` (a subset, e.g. without naive and higher), ``--model resnet18`` (``fastedit.models.resnet18_cifar()``, random
init, editable ``layer3``, suffix layer3 + layer4 + linear: ~0.56 GFLOP per image forward, ~14× a
ResNet-20, so a default run takes far longer than the ~2 minutes of ResNet-20 on 2 cores; use a
smaller ``--batch``/``--repeats``), ``--out JSON``.

``--device cuda`` (default: CUDA when available) runs the same on a GPU: every timer waits for the
device (``torch.cuda.synchronize``), peak memory is the caching allocator's peak above the level
before the step (``torch.cuda.max_memory_allocated``), the profiler count is skipped (CPU only, as with
``--alloc-profile 0``), and the load average is not waited for. ``--synthetic``: a fresh ResNet-20 and
random images and labels of CIFAR-10's shapes, for machines without the data (the JSON's
``config.data`` says which was used).

    python benchmarks/experiments/bench_editable_training.py --out benchmarks/results/bench_editable_training.json
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

import fastedit as fe
from fastedit import data as fdata
from fastedit._core import EditTarget, eval_mode
from fastedit.model_io import ModelInputs
from fastedit.models import load_pretrained_cifar_resnet, resnet18_cifar, resnet20

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

METHODS = ("plain", "fastedit", "fastedit_remat", "fastedit_autograd_step", "fastedit_remat_autograd_step",
           "naive", "higher")


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------
def constraint(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l_e = max_i z_i − z_y, max over the edit's samples (one here)."""
    return (logits.max(-1).values - logits.gather(-1, y[:, None]).squeeze(-1)).max()


def kl_batchmean(ref_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(edited_logits, -1), F.log_softmax(ref_logits.detach(), -1),
                    log_target=True, reduction="batchmean")


# ------------------------------------------------------------------------------------------------
# the methods: each owns a model copy and an optimizer; step(x, y, ex, ey) -> inner steps taken
# ------------------------------------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Plain:
    def __init__(self, model, cfg):
        self.model, self.device = model, _device(model)
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg["adam_lr"])

    def step(self, x, y, ex, ey, timer=None):
        def now():  # a phase ends when the device's queued work does (CUDA runs asynchronously)
            if timer is not None:
                common.sync(self.device)
            return time.perf_counter()

        t = now()
        loss = F.cross_entropy(self.model(x), y)
        t1 = now()
        loss.backward()
        t2 = now()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if timer is not None:
            timer.add(fwd=t1 - t, bwd=t2 - t1, opt=now() - t2)
        return 0


class FastEdit:
    def __init__(self, model, cfg, rematerialize, closed_form=True):
        self.et = fe.EditableTraining(model, params=cfg["params"], editor=fe.RMSProp(cfg["lr"], beta=cfg["beta"]),
                                      max_steps=cfg["k"], c_edit=cfg["c_edit"], c_loc=cfg["c_loc"],
                                      learn=("lr", "beta"), rematerialize=rematerialize, closed_form=closed_form)
        self.device = _device(model)
        self.et.to(self.device)  # the learnable lr and β are created on the CPU
        self.opt = torch.optim.Adam(self.et.parameters(), lr=cfg["adam_lr"])

    def step(self, x, y, ex, ey):
        loss, stats = self.et(x, y, edit_x=ex, edit_y=ey)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(stats["edit_steps"])

    def step_breakdown(self, x, y, ex, ey, timer):
        """The phases of EditableTraining.forward (loc_mode="shared"), timed one by one."""
        et = self.et

        def now():
            common.sync(self.device)
            return time.perf_counter()

        t0 = now()
        mi, mi_e = ModelInputs.of(x), ModelInputs.of(ex)
        base = fe.Classification(y)
        split = et._split(mi)
        acts, out = split.prefix_and_output(mi)
        logits = et._read(out)
        loss_base = F.cross_entropy(logits, y)
        t1 = now()
        with eval_mode(et.model):
            split_e = et._split(mi_e)
            acts_e = split_e.prefix(mi_e)
            theta, final, steps = et._run_edit(et._entry(mi_e), acts_e, fe.Classification(ey), et.learned_editor)
        t2 = now()
        if int(steps) > 0:
            loss_loc = et._kl_to_edited(split, acts, logits, theta, base)
        else:
            loss_loc = loss_base.new_zeros(())
        objective = loss_base + et.c_edit * F.relu(final) + et.c_loc * loss_loc
        for p in et.learned_editor.parameters():
            objective = objective + (0.0 * p.sum()).to(objective.dtype)
        t3 = now()
        objective.backward()
        t4 = now()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t5 = now()
        timer.add(base_fwd=t1 - t0, edit_fwd=t2 - t1, loc_fwd=t3 - t2, bwd=t4 - t3, opt=t5 - t4,
                     inner_steps=float(steps))
        return float(steps)


class Naive:
    """Full-model forwards per inner step, autograd.grad(create_graph=True), .item() per step."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.names = [n for n, _ in model.named_parameters() if n == cfg["params"] or n.startswith(cfg["params"] + ".")]
        self.hp = common.RawHParams(cfg["lr"], cfg["beta"]).to(_device(model))
        self.opt = torch.optim.Adam([*model.parameters(), *self.hp.parameters()], lr=cfg["adam_lr"])

    def step(self, x, y, ex, ey):
        cfg, model = self.cfg, self.model
        logits = model(x)                                  # train mode: batch statistics
        loss_base = F.cross_entropy(logits, y)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        theta = [params[n] for n in self.names]
        lr, beta = self.hp.values()
        eps = cfg["eps"]
        s = None
        steps = 0
        model.eval()                                       # the edit in eval mode (running statistics)
        try:
            for _ in range(cfg["k"]):
                z = functional_call(model, {**params, **buffers, **dict(zip(self.names, theta))}, (ex,))
                le = constraint(z, ey)
                if le.item() <= 0:                         # host sync per step, as the official code
                    break
                grads = torch.autograd.grad(le, theta, create_graph=True)
                s = ([g * g for g in grads] if s is None
                     else [beta * si + (1 - beta) * g * g for si, g in zip(s, grads)])
                theta = [t - lr * g / torch.sqrt(si + eps) for t, g, si in zip(theta, grads, s)]
                steps += 1
            else:
                z = functional_call(model, {**params, **buffers, **dict(zip(self.names, theta))}, (ex,))
                le = constraint(z, ey)
        finally:
            model.train()
        loss_edit = F.relu(le)
        if steps:                                          # L_loc: a full second forward of the batch
            copies = {n: b.clone() for n, b in buffers.items()}
            edited = functional_call(model, {**params, **copies, **dict(zip(self.names, theta))}, (x,))
            loss_loc = kl_batchmean(logits, edited)
        else:
            loss_loc = loss_base.new_zeros(())
        obj = self.hp.objective(cfg, loss_base, loss_edit, loss_loc)
        obj.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return steps


class Higher:
    def __init__(self, model, cfg):
        import higher  # noqa: F401  (an ImportError is recorded by the caller)

        self.model, self.cfg = model, cfg
        layer = model.get_submodule(cfg["params"])
        self.inner_opt = torch.optim.RMSprop(layer.parameters(), lr=cfg["lr"], alpha=cfg["beta"], eps=cfg["eps"])
        self.hp = common.RawHParams(cfg["lr"], cfg["beta"]).to(_device(model))
        self.opt = torch.optim.Adam([*model.parameters(), *self.hp.parameters()], lr=cfg["adam_lr"])

    def step(self, x, y, ex, ey):
        import higher

        cfg, model = self.cfg, self.model
        logits = model(x)
        loss_base = F.cross_entropy(logits, y)
        lr, beta = self.hp.values()
        steps = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")               # "Differentiable RMSprop suffers from ..."
            with higher.innerloop_ctx(model, self.inner_opt, copy_initial_weights=False,
                                      override={"lr": [lr], "alpha": [beta]}) as (fmodel, diffopt):
                fmodel.eval()
                for _ in range(cfg["k"]):
                    le = constraint(fmodel(ex), ey)
                    if le.item() <= 0:
                        break
                    diffopt.step(le)
                    steps += 1
                else:
                    le = constraint(fmodel(ex), ey)
                fmodel.train()
                # L_loc: a full second forward (higher's functional model updates BatchNorm running
                # statistics once more here; irrelevant for timing)
                loss_loc = kl_batchmean(logits, fmodel(x)) if steps else loss_base.new_zeros(())
                obj = self.hp.objective(cfg, loss_base, F.relu(le), loss_loc)
                obj.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return steps


class SuffixFloor:
    """The floor's extra work: the suffix alone, forward + backward, on the batch's prefix activations."""

    def __init__(self, model, cfg):
        self.model = model
        self.target = EditTarget.build(model, cfg["params"])

    def step(self, x, y, ex, ey):
        device = _device(self.model)
        with torch.no_grad():
            acts = self.target.prefix(x)
        common.sync(device)
        t = time.perf_counter()
        F.cross_entropy(self.target.logits(acts), y).backward()
        common.sync(device)
        elapsed = time.perf_counter() - t
        for p in self.model.parameters():
            p.grad = None
        return elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("resnet20", "resnet18"), default="resnet20")
    ap.add_argument("--weights", help="the CIFAR-10 ResNet-20 checkpoint (default: $FASTEDIT_MODELS/resnet20-12fca82f.th)")
    ap.add_argument("--random-init", action="store_true", help="a fresh ResNet-20 instead of the pretrained one")
    ap.add_argument("--data", help="the lossless CIFAR-10 subset (default: $FASTEDIT_DATA/cifar10/cifar10_lossless_subset.npz)")
    ap.add_argument("--synthetic", action="store_true",
                    help="a fresh ResNet-20 and random images and labels of CIFAR-10's shapes (no data or weights needed)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="k: the editor's maximum inner steps")
    ap.add_argument("--repeats", type=int, default=15, help="timed repetitions (each: one step per method)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-repeats", type=int, default=5, help="repetitions measuring resident memory")
    ap.add_argument("--editor-lr", type=float, default=1e-3, help="RMSProp lr of the edits (smaller: more inner steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="wait (up to --max-wait seconds) for the 1-minute load average to drop below this")
    ap.add_argument("--max-wait", type=float, default=120.0)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of the methods to run (plain and fastedit always run)")
    ap.add_argument("--alloc-profile", type=int, choices=(0, 1), default=1,
                    help="1: also torch's own count of tensor bytes, one profiled step per method (CPU only; slow)")
    args = ap.parse_args(argv)
    if args.synthetic:
        args.random_init = True
    elif args.model == "resnet20" and not args.random_init:
        args.weights = str(args.weights or common.models_dir() / "resnet20-12fca82f.th")
    if not args.synthetic:
        args.data = str(args.data or common.data_dir() / "cifar10" / "cifar10_lossless_subset.npz")
    if args.repeats < 1:
        ap.error("--repeats must be ≥ 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # the load of the CPU cores matters to CPU timings only
    waited = common.wait_for_load(args.max_load, args.max_wait) if device.type == "cpu" else 0.0
    load_before = common.load_average()
    machine = common.machine_info(device)
    torch.manual_seed(args.seed)
    if args.model == "resnet18":
        base, model_desc = resnet18_cifar(), "resnet18_cifar (random init; editable layer3, suffix layer3+layer4+linear)"
    elif args.random_init:
        base, model_desc = resnet20(), "resnet20 (random init)"
    else:
        if not pathlib.Path(args.weights).is_file():
            sys.exit(f"{args.weights} not found: give --weights, or --random-init for a fresh ResNet-20")
        base, model_desc = load_pretrained_cifar_resnet(args.weights), f"resnet20 (pretrained, {args.weights})"
    base = base.float().train().to(device)

    n_steps = args.warmup + args.repeats + args.memory_repeats + 1
    if args.synthetic:
        gen = torch.Generator().manual_seed(args.seed + 1)
        xs = torch.randn(n_steps * args.batch, 3, 32, 32, generator=gen)
        ys = torch.randint(0, 10, (n_steps * args.batch,), generator=gen)
        data_desc = "synthetic: random N(0, 1) images [3, 32, 32] and uniform labels (no CIFAR-10 data)"
    else:
        xs, ys = fdata.load_cifar10_lossless(args.data, "train")
        xs = fdata.to_float_tensor(xs, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)
        ys = torch.as_tensor(ys, dtype=torch.int64)
        data_desc = common.portable(args.data)
    if n_steps * args.batch > xs.shape[0]:
        sys.exit(f"{n_steps} batches of {args.batch} need more than the {xs.shape[0]} training images")
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(xs.shape[0], generator=gen)
    batches = []
    for i in range(n_steps):
        idx = perm[i * args.batch:(i + 1) * args.batch]
        j = int(torch.randint(0, args.batch, (1,), generator=gen))
        ey = torch.randint(0, 10, (1,), generator=gen)
        batch = (xs[idx], ys[idx], xs[idx][j:j + 1], ey)
        batches.append(tuple(t.to(device) for t in batch))

    cfg = dict(params="layer3", lr=args.editor_lr, beta=0.5, eps=1e-6, k=args.steps, c_edit=0.01, c_loc=0.01, adam_lr=1e-4)
    methods: dict[str, object] = {}
    errors: dict[str, str] = {}
    builders = {
        "plain": lambda m: Plain(m, cfg),
        "fastedit": lambda m: FastEdit(m, cfg, rematerialize=False),
        "fastedit_remat": lambda m: FastEdit(m, cfg, rematerialize=True),
        "fastedit_autograd_step": lambda m: FastEdit(m, cfg, rematerialize=False, closed_form=False),
        "fastedit_remat_autograd_step": lambda m: FastEdit(m, cfg, rematerialize=True, closed_form=False),
        "naive": lambda m: Naive(m, cfg),
        "higher": lambda m: Higher(m, cfg),
    }
    wanted = set(args.methods.split(",")) | {"plain", "fastedit", "fastedit_remat"}
    unknown = wanted - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    for name, build in builders.items():
        if name not in wanted:
            errors[name] = "not selected (--methods)"
            continue
        try:
            methods[name] = build(copy.deepcopy(base))
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON (e.g. higher not installed)
            errors[name] = f"{type(exc).__name__}: {exc}"
    floor = SuffixFloor(copy.deepcopy(base), cfg)
    breakdown = {"plain": common.Samples(), "fastedit": common.Samples(), "fastedit_remat": common.Samples()}
    breakdown_models = {  # separate copies so the breakdown does not move the measured models
        "plain": Plain(copy.deepcopy(base), cfg),
        "fastedit": FastEdit(copy.deepcopy(base), cfg, rematerialize=False),
        "fastedit_remat": FastEdit(copy.deepcopy(base), cfg, rematerialize=True),
    }

    times = {name: [] for name in methods}
    cpu_times = {name: [] for name in methods}
    steps_taken = {name: [] for name in methods}
    floor_times = []
    load_during = []

    def run(name, batch):
        try:
            return methods[name].step(*batch)
        except Exception as exc:  # noqa: BLE001 - e.g. higher failing with this torch: recorded
            errors[name] = f"{type(exc).__name__}: {exc}"
            errors[name + "_traceback"] = traceback.format_exc(limit=6)
            del methods[name]
            return None

    print(f"load average before: {load_before}")
    bar = tqdm(range(args.warmup + args.repeats), desc="timed repetitions", unit="rep")
    for rep in bar:
        batch = batches[rep]
        measured = rep >= args.warmup
        for name in list(methods):
            s, elapsed, cpu = common.timed(lambda: run(name, batch), device)
            if s is not None and measured:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
                steps_taken[name].append(s)
        ft = floor.step(*batch)
        breakdown_models["plain"].step(*batch, timer=breakdown["plain"] if measured else common.Samples())
        for name in ("fastedit", "fastedit_remat"):
            breakdown_models[name].step_breakdown(*batch, breakdown[name] if measured else common.Samples())
        if measured:
            floor_times.append(ft)
        load_during.append(common.load_average()[0])

    mem_method = None
    peaks = {name: [] for name in methods}
    floor_peaks = []
    for rep in tqdm(range(args.memory_repeats), desc="memory repetitions", unit="rep"):
        batch = batches[args.warmup + args.repeats + rep]
        for name in list(methods):
            peak, s, mem_method = common.peak_memory_increase(lambda: run(name, batch), device)
            if s is not None:
                peaks[name].append(peak)
        peak, _, _ = common.peak_memory_increase(lambda: floor.step(*batch), device)
        floor_peaks.append(peak)
    # torch's own count of live tensor bytes (one profiled step each: the allocations are deterministic
    # given the inner steps taken, and profiling with stacks is slow)
    alloc_peaks, alloc_errors = {}, {}
    batch = batches[-1]
    profiled = list(methods) if device.type == "cpu" and args.alloc_profile else []  # CUDA: the allocator's peak is that count
    for name in tqdm(profiled, desc="torch allocation peaks", unit="method"):
        peak, s, err = common.torch_alloc_peak(lambda: run(name, batch))
        if err is not None:
            alloc_errors[name] = err
        if s is not None and peak is not None:
            alloc_peaks[name] = (peak, s)
    load_after = common.load_average()

    # ---- table ----------------------------------------------------------------------------------
    plain_t = statistics.median(times["plain"])
    plain_m = statistics.median(peaks["plain"])
    plain_a = alloc_peaks.get("plain", (None,))[0]
    floor_t = statistics.median(floor_times)
    table = {}
    for name in METHODS:
        if name not in methods or not times.get(name):
            table[name] = {"error": errors.get(name, "not run")}
            continue
        t = statistics.median(times[name])
        m = statistics.median(peaks[name]) if peaks[name] else None
        table[name] = {
            "seconds_per_step": t, "time_ratio": t / plain_t,
            "seconds_all": times[name],
            "cpu_seconds_per_step": statistics.median(cpu_times[name]),
            "cpu_time_ratio": statistics.median(cpu_times[name]) / statistics.median(cpu_times["plain"]),
            "peak_bytes": m, "memory_ratio": (m / plain_m) if m is not None else None,
            "peak_bytes_all": peaks[name],
            "torch_alloc_peak_bytes": alloc_peaks.get(name, (None,))[0],
            "torch_alloc_memory_ratio": (alloc_peaks[name][0] / plain_a) if name in alloc_peaks and plain_a else None,
            "torch_alloc_inner_steps": alloc_peaks.get(name, (None, None))[1],
            "mean_inner_steps": statistics.fmean(steps_taken[name]),
        }
    bd = {name: timer.medians() for name, timer in breakdown.items()}
    for name in ("fastedit", "fastedit_remat"):
        d = bd[name]
        d["sum"] = d["base_fwd"] + d["edit_fwd"] + d["loc_fwd"] + d["bwd"] + d["opt"]
        d["extra_bwd_vs_plain"] = d["bwd"] - bd["plain"]["bwd"]
        d["inner_fwd_per_step"] = d["edit_fwd"] / max(d["inner_steps"], 1.0)
    floor_ratio = (plain_t + floor_t) / plain_t
    remat = table.get("fastedit_remat", {})
    noremat = table.get("fastedit", {})
    targets = {
        "time_target": 1.5, "memory_target_remat": 1.3,
        "fastedit_time_ratio": noremat.get("time_ratio"),
        "fastedit_remat_time_ratio": remat.get("time_ratio"),
        "fastedit_remat_memory_ratio_rss": remat.get("memory_ratio"),
        "fastedit_remat_memory_ratio_torch_alloc": remat.get("torch_alloc_memory_ratio"),
        "floor_time_ratio": floor_ratio,
    }
    targets["time_met_remat"] = bool(remat.get("time_ratio") is not None and remat["time_ratio"] <= 1.5)
    targets["time_met_no_remat"] = bool(noremat.get("time_ratio") is not None and noremat["time_ratio"] <= 1.5)
    targets["memory_met_remat"] = bool(
        remat.get("memory_ratio") is not None and remat["memory_ratio"] <= 1.3
        and (remat.get("torch_alloc_memory_ratio") is None or remat["torch_alloc_memory_ratio"] <= 1.3))

    analysis = analyse(table, bd, plain_t, floor_t)
    print()
    nan = float("nan")
    print(f"{'method':<16}{'s/step':>9}{'× plain':>9}{'RSS MiB':>9}{'× plain':>9}{'alloc MiB':>11}{'× plain':>9}"
          f"{'inner steps':>13}")
    for name, row in table.items():
        if "error" in row:
            print(f"{name:<16}  error: {row['error']}")
            continue
        mib = row["peak_bytes"] / 2**20 if row["peak_bytes"] is not None else nan
        amib = row["torch_alloc_peak_bytes"] / 2**20 if row["torch_alloc_peak_bytes"] is not None else nan
        print(f"{name:<16}{row['seconds_per_step']:>9.4f}{row['time_ratio']:>9.2f}{mib:>9.1f}"
              f"{row['memory_ratio'] or nan:>9.2f}{amib:>11.1f}{row['torch_alloc_memory_ratio'] or nan:>9.2f}"
              f"{row['mean_inner_steps']:>13.2f}")
    print(f"suffix fwd+bwd on the batch: {floor_t:.4f} s (peak {statistics.median(floor_peaks) / 2**20:.1f} MiB); "
          f"floor ratio (plain + suffix) / plain = {floor_ratio:.2f}")
    for name in ("plain", "fastedit", "fastedit_remat"):
        print(f"breakdown {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in bd[name].items()))
    ok = {True: "met", False: "MISSED"}
    print(f"targets: time ≤ 1.5× with remat {ok[targets['time_met_remat']]}, without {ok[targets['time_met_no_remat']]}; "
          f"memory ≤ 1.3× with remat {ok[targets['memory_met_remat']]}")
    print(f"load average after: {load_after}")
    for line in analysis:
        print("  - " + line)

    result = {
        "command": common.command_line(__file__, argv),
        "machine": {**machine, "load_average_before": load_before, "load_average_after": load_after,
                    "load_average_1min_per_repetition": load_during, "waited_for_load_seconds": waited,
                    "note": ("2 cores shared with other jobs: a load above ~2 means other processes competed "
                             "for the cores during the measurement (interleaving spreads that over all methods)"
                             if device.type == "cpu" else "CUDA: timers synchronise the device; the load average "
                             "is of the host's cores")},
        "config": {**cfg, "model": model_desc, "device": str(device), "synthetic": args.synthetic,
                   "batch": args.batch, "dtype": "float32", "mode": "train",
                   "optimizer": f"Adam(lr={cfg['adam_lr']}) over the model and the learnable lr, beta",
                   "learn": ["lr", "beta"], "edits": "one per batch: an image of the batch, uniform random target",
                   "warmup": args.warmup, "repeats": args.repeats, "memory_repeats": args.memory_repeats,
                   "seed": args.seed, "data": data_desc},
        "memory_method": {
            "peak_bytes": (f"{mem_method}: peak increase during one step over the level before it (CUDA: the "
                           "caching allocator's peak; CPU: the resident set, after gc.collect() and malloc_trim(0)); "
                           "median over the memory repetitions, after the timed ones"),
            "torch_alloc_peak_bytes": ("torch.profiler(profile_memory=True, record_shapes=True, with_stack=True) "
                                       ".export_memory_timeline(device='cpu'): peak of live torch CPU tensor bytes "
                                       "above the level at the step's start, one profiled step per method"
                                       if profiled else "not measured (CUDA, or --alloc-profile 0)"),
            "torch_alloc_errors": alloc_errors,
        },
        "table": table,
        "suffix_fwd_bwd": {"seconds": floor_t, "seconds_all": floor_times,
                           "peak_bytes": statistics.median(floor_peaks)},
        "floor_time_ratio": floor_ratio,
        "breakdown_seconds": bd,
        "targets": targets,
        "analysis": analysis,
        "errors": errors,
        "packages": {"higher": common.package_version("higher")},
    }
    if args.out:
        common.write_json(args.out, result, indent=2)
        print(f"wrote {args.out}")


def analyse(table: dict, bd: dict, plain_t: float, floor_t: float) -> list[str]:
    """Where the time of the fastedit steps goes, relative to a plain step, and the targets' status."""
    lines = []
    p = bd["plain"]
    for name in ("fastedit", "fastedit_remat"):
        row = table.get(name, {})
        if "time_ratio" not in row:
            continue
        d = bd[name]
        extra = d["sum"] - (p["fwd"] + p["bwd"] + p["opt"])
        lines.append(
            f"{name}: {row['time_ratio']:.2f}x a plain step in time ({'within' if row['time_ratio'] <= 1.5 else 'over'}"
            f" the 1.5x target by {abs(row['time_ratio'] - 1.5):.2f}), {row['memory_ratio']:.2f}x in peak memory; "
            f"breakdown (medians, s): base forward {d['base_fwd']:.3f} (plain forward {p['fwd']:.3f}), "
            f"edit = prefix of 1 image + {d['inner_steps']:.1f} inner steps {d['edit_fwd']:.3f} "
            f"({d['inner_fwd_per_step']:.3f} per step), L_loc forward (suffix on the batch) {d['loc_fwd']:.3f}, "
            f"backward {d['bwd']:.3f} (plain {p['bwd']:.3f}: {d['extra_bwd_vs_plain']:+.3f}), optimizer {d['opt']:.3f}; "
            f"extra over plain {extra:+.3f} s = {extra / plain_t:+.2f} of a plain step "
            f"(floor: suffix fwd+bwd {floor_t:.3f} s = {floor_t / plain_t:+.2f})")
    remat = table.get("fastedit_remat", {})
    if remat.get("memory_ratio") is not None:
        lines.append(f"memory with rematerialisation: {remat['memory_ratio']:.2f}x plain in resident memory, "
                     f"{remat['torch_alloc_memory_ratio'] or float('nan'):.2f}x in torch tensor bytes (target 1.3x)")
    for name, ref in (("fastedit_autograd_step", "fastedit"), ("fastedit_remat_autograd_step", "fastedit_remat")):
        row, base = table.get(name, {}), table.get(ref, {})
        if "time_ratio" in row and "time_ratio" in base:
            lines.append(f"closed-form editor step ({ref}) vs autograd through Editor.step ({name}): "
                         f"{base['seconds_per_step'] / row['seconds_per_step']:.3f}x time, "
                         f"{base['peak_bytes'] / row['peak_bytes']:.3f}x RSS peak, "
                         f"torch tensor peak {(base['torch_alloc_peak_bytes'] or 0) / 2**20:.1f} vs "
                         f"{(row['torch_alloc_peak_bytes'] or 0) / 2**20:.1f} MiB")
    for name in ("naive", "higher"):
        row = table.get(name, {})
        if "time_ratio" in row and "time_ratio" in table.get("fastedit", {}):
            lines.append(f"{name}: {row['time_ratio']:.2f}x plain, {row['memory_ratio']:.2f}x memory; fastedit is "
                         f"{row['seconds_per_step'] / table['fastedit']['seconds_per_step']:.2f}x faster and uses "
                         f"{row['peak_bytes'] / table['fastedit']['peak_bytes']:.2f}x less peak memory")
    return lines


if __name__ == "__main__":
    main()
