"""Editable Training on real CIFAR-10 (JPEG): does it lower drawdown at the same test error, and at
what cost? (Sinitsin et al. 2020, Table 3.)

For every seed, the same model is trained for the same number of steps on the same augmented batches
(random crop with padding 4, horizontal flip) plainly and with :class:`fastedit.EditableTraining`
(RMSProp editor on ``layer3``, k = 10 steps, ``c_edit`` = 0.01, ``c_loc`` ∈ {0.01, 0.1}). Each trained
model is then measured the same way:

- test error on all 10,000 JPEG test images;
- an RMSProp editor tuned for *that* model by :func:`fastedit.tune` (least drawdown with ≥ 95% success
  over an lr grid; ``beta`` as trained: 0.5 for plain models, the learned value for editable ones) on
  ``--tune-edits`` training images with random labels against ``--tune-control`` test images;
- :func:`fastedit.evaluate` with the tuned editor: ``--edits`` test images with uniformly random labels
  (the same edits, labels and control set for every model and seed: a fixed evaluation seed), control =
  ``--control`` other test images, disjoint from the edits and from the tuning control.

Each model is also evaluated with one *shared* editor, the plain model's tuned editor of the same seed
(``fixed_reports["shared editor"]``): a comparison free of each model's own lr choice.

Presets: ``scratch`` trains CIFAR ResNet-20 from scratch for 2 epochs (SGD with Nesterov momentum and a
cosine schedule, lr 0.1, chosen over the paper's Adam because it reaches the lower error in a short budget)
in the four configurations plain, c_loc 0.01 and 0.1 (``loc_mode="shared"``) and c_loc 0.01 with
``loc_mode="eval"``, and tunes every editor with :func:`fastedit.tune`'s refinement (×1.2 in lr);
``cpu`` fine-tunes the pretrained CIFAR-10 ResNet-20 (``$FASTEDIT_MODELS``; trained on the
original pixels) for 600 steps on the JPEG training set — about 15 minutes per model on one core;
``gpu`` is the paper's setting, a CIFAR ResNet-18 trained from scratch (15 epochs, shortened from the
paper's schedule to fit a 30-minute device session), for a GPU.

Every (configuration, seed) cell checkpoints its training (``<out>/ckpt``, every ``--ckpt-every``
steps, with all random states: a resumed run is bit-identical to an uninterrupted one) and writes
``<out>/cells/<config>_seed<k>.json`` when done; finished cells are skipped, so run the same command
again to resume. ``--time-limit`` stops cleanly (checkpoint, exit code 3) before a time budget runs
out (the device's per-call limit), keeping ``--eval-reserve`` seconds for a cell's evaluation. Finally the summary (mean ± std over seeds, and the per-seed
difference to plain training) goes to ``<out>/summary.json`` and the figures to ``<out>/*.png``.

    python benchmarks/experiments/editable_training_cifar.py --preset cpu --out-dir benchmarks/results/editable_training_cifar
    python benchmarks/experiments/editable_training_cifar.py --preset scratch --seeds 0 --threads 1 \
        --out-dir benchmarks/results/editable_training_scratch   # and --seeds 1 in a second process
    python benchmarks/experiments/editable_training_cifar.py --preset gpu --device cuda --seeds 0 --time-limit 540 \\
        --data .data/cifar10-jpeg.zip --out-dir runs/editable_training_cifar_gpu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastedit as fe
from fastedit import data as fdata
from fastedit.models import get_model

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

PRESETS = {
    # fine-tune the pretrained ResNet-20 on the JPEG copy: ~1.5 epochs, fits a 2-core CPU
    "cpu": dict(model="resnet20", init="pretrained", steps=600, batch_size=128, lr=0.01, weight_decay=1e-4,
                editor_lr=3e-4, edits=1000, control=1000, tune_edits=40, tune_control=1000,
                lr_grid=[10.0 ** (-5 + i / 2) for i in range(7)]),      # 1e-5 … 1e-2, ×√10
    # from scratch on a 2-core CPU: CIFAR ResNet-20, 2 epochs of 390 steps (SGD, cosine), sized so that the
    # four configurations of two seeds with their evaluations (one process per seed, one thread each) fit 2.5 hours
    "scratch": dict(model="resnet20", init="scratch", steps=2 * 390, batch_size=128, lr=0.1, weight_decay=5e-4,
                    editor_lr=1e-3, edits=1000, control=1000, tune_edits=100, tune_control=1000,
                    lr_grid=[10.0 ** (-5 + i / 2) for i in range(9)], refine=True),  # 1e-5 … 1e-1, refined to ×1.2
    # the paper's setting, CIFAR ResNet-18 from scratch, shortened to 15 epochs of 390 steps so that the
    # three configurations of one seed fit a 30-minute device session (estimated, never run here)
    "gpu": dict(model="resnet18", init="scratch", steps=15 * 390, batch_size=128, lr=0.1, weight_decay=5e-4,
                editor_lr=1e-3, edits=1000, control=8000, tune_edits=100, tune_control=1000,
                lr_grid=[10.0 ** (-5 + i / 2) for i in range(9)], refine=True),  # 1e-5 … 1e-1, refined to ×1.2
}
# name -> c_loc (None: plain training). Diagnostics beyond the paper's values (--configs ...): et-c1, and
# et-c0.01-eval with the locality term in eval mode (LOC_MODES; the default is "shared")
CONFIGS = {"plain": None, "et-c0.01": 0.01, "et-c0.1": 0.1, "et-c1": 1.0, "et-c0.01-eval": 0.01}
LOC_MODES = {"et-c0.01-eval": "eval"}
DEFAULT_CONFIGS = {"cpu": ["plain", "et-c0.01", "et-c0.1"],  # per preset; from scratch both loc_modes
                   "scratch": ["plain", "et-c0.01", "et-c0.1", "et-c0.01-eval"],
                   "gpu": ["plain", "et-c0.01", "et-c0.1", "et-c0.01-eval"]}
SHARED_KEY = "shared editor"  # the plain model's tuned editor, for every model of its seed
C_EDIT = 0.01
EVAL_SEED = 1234  # edits, labels and control split: the same for every model
EXIT_TIME_LIMIT = 3


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def find_zip(arg: str | None) -> pathlib.Path:
    path = pathlib.Path(arg) if arg else common.data_dir() / "cifar10" / fdata.cifar.JPEG_ZIP_NAME
    if not path.is_file():
        raise SystemExit(f"CIFAR-10 JPEG zip not found at {path}: pass --data or set $FASTEDIT_DATA")
    return path


def normalise(x_unit: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(fdata.CIFAR10_MEAN, device=x_unit.device).view(1, 3, 1, 1)
    std = torch.tensor(fdata.CIFAR10_STD, device=x_unit.device).view(1, 3, 1, 1)
    return (x_unit - mean) / std


def eval_split(xte: torch.Tensor, yte: torch.Tensor, xtr: torch.Tensor, cfg: dict) -> dict:
    """The fixed evaluation split: reported edits, control, tuning edits and tuning control."""
    n_edit, n_ctl, n_tctl = cfg["edits"], cfg["control"], cfg["tune_control"]
    if n_edit + n_ctl + n_tctl > xte.shape[0]:
        raise SystemExit(f"--edits + --control + --tune-control = {n_edit + n_ctl + n_tctl} exceeds the "
                         f"{xte.shape[0]} test images")
    gen = torch.Generator().manual_seed(EVAL_SEED)
    order = torch.randperm(xte.shape[0], generator=gen)
    labels = torch.randint(0, 10, (n_edit,), generator=gen)
    e, c, t = order[:n_edit], order[n_edit:n_edit + n_ctl], order[n_edit + n_ctl:n_edit + n_ctl + n_tctl]
    tune_pick = torch.randperm(xtr.shape[0], generator=gen)[:cfg["tune_edits"]]
    tune_labels = torch.randint(0, 10, (cfg["tune_edits"],), generator=gen)
    return {"edits": (xte[e], labels), "edit_classes": yte[e], "control": (xte[c], yte[c]),
            "tune_edits": (xtr[tune_pick], tune_labels), "tune_control": (xte[t], yte[t])}


# ------------------------------------------------------------------------------------------------
# training (resumable)
# ------------------------------------------------------------------------------------------------
def build(cfg: dict, c_loc: float | None, seed: int, device: torch.device, weights: pathlib.Path | None,
          loc_mode: str = "shared"):
    torch.manual_seed(seed)  # initialisation of a scratch model
    if cfg["init"] == "pretrained":
        model = get_model(cfg["model"], weights=weights)
    else:
        model = get_model(cfg["model"])
    model.to(device).train()
    et = None
    if c_loc is not None:
        et = fe.EditableTraining(model, params="layer3", editor=fe.RMSProp(cfg["editor_lr"], beta=0.5),
                                 max_steps=10, c_edit=C_EDIT, c_loc=c_loc, loc_mode=loc_mode).to(device)
    groups = [{"params": list(model.parameters()), "weight_decay": cfg["weight_decay"]}]
    if et is not None:  # the editor's learnable hyper-parameters: no weight decay
        groups.append({"params": list(et.learned_editor.parameters()), "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=0.9, nesterov=True)
    total = cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    return model, et, opt, sched


def train(name: str, c_loc, seed: int, cfg: dict, xtr, ytr, device, weights, ckpt: pathlib.Path, args,
          deadline: float | None):
    """Train one cell to ``cfg["steps"]`` steps, resuming from ``ckpt``; returns (model, et, log) or
    None when the time limit stopped it (after a checkpoint)."""
    model, et, opt, sched = build(cfg, c_loc, seed, device, weights, LOC_MODES.get(name, "shared"))
    gen = torch.Generator().manual_seed(10_000 + seed)  # batch order and augmentation
    state = {"step": 0, "log": [], "step_seconds": [], "loadavg": []}
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        if et is not None:
            et.learned_editor.load_state_dict(saved["editor"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        state = saved["state"]
    n = xtr.shape[0]
    steps_per_epoch = n // cfg["batch_size"]
    xtr, ytr = xtr.to(device), ytr.to(device)  # uint8: 150 MB for CIFAR-10, indexed on the device

    def checkpoint():
        common.save_torch({"model": model.state_dict(), "editor": et.learned_editor.state_dict() if et else None,
                      "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                      "torch_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                      "state": state}, ckpt)

    from tqdm import tqdm
    bar = tqdm(total=cfg["steps"], initial=state["step"], desc=f"train {name} seed {seed}", unit="step",
               disable=args.quiet, dynamic_ncols=True)
    window: list[dict] = []
    model.train()
    stopped_this_call = 0
    while state["step"] < cfg["steps"]:
        step = state["step"]
        if step % steps_per_epoch == 0 or "perm" not in state:
            # a fresh permutation at each epoch start (drawn from gen, so resuming replays it)
            state["perm"] = torch.randperm(n, generator=gen)
        pos = step % steps_per_epoch
        idx = state["perm"][pos * cfg["batch_size"]:(pos + 1) * cfg["batch_size"]].to(device)
        t0 = time.perf_counter()
        x = normalise(fdata.augment_cifar(fdata.to_float_tensor(xtr[idx]), gen))
        y = ytr[idx]
        opt.zero_grad(set_to_none=True)
        if et is None:
            loss = F.cross_entropy(model(x), y)
            stats = {"loss_base": loss.detach()}
        else:
            loss, stats = et(x, y)
        loss.backward()
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["step_seconds"].append(time.perf_counter() - t0)
        window.append({k: float(v) for k, v in stats.items()})
        state["step"] += 1
        stopped_this_call += 1
        bar.update(1)
        if state["step"] % 25 == 0 or state["step"] == cfg["steps"]:
            avg = {k: statistics.fmean(w[k] for w in window) for k in window[0]}
            state["log"].append({"step": state["step"], **avg})
            state["loadavg"].append(os.getloadavg()[0])
            bar.set_postfix({k.replace("loss_", "L_"): f"{v:.3g}" for k, v in avg.items()
                             if k in ("loss_base", "loss_loc", "edit_success", "edit_steps")})
            window = []
        done = state["step"] == cfg["steps"]
        out_of_time = deadline is not None and time.monotonic() > deadline
        hit_call_cap = args.max_steps_per_call is not None and stopped_this_call >= args.max_steps_per_call
        if done or state["step"] % args.ckpt_every == 0 or out_of_time or hit_call_cap:
            checkpoint()
        if not done and (out_of_time or hit_call_cap):
            bar.close()
            return None
    bar.close()
    model.eval()
    return model, et, state


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_error(model, xte, yte, device, batch_size: int = 1000) -> float:
    wrong = 0
    for i in range(0, xte.shape[0], batch_size):
        xb = xte[i:i + batch_size].to(device)
        wrong += int((model(xb).argmax(-1).cpu() != yte[i:i + batch_size]).sum())
    return wrong / xte.shape[0]


def evaluate_edits(model, editor, split: dict, device, args):
    """The reported evaluation: ``editor`` on the fixed edits against the fixed control set."""
    to = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
    return fe.evaluate(model, to(split["edits"]), to(split["control"]), editor=editor, params="layer3",
                       max_steps=10, edit_labels=split["edit_classes"].to(device), progress=not args.quiet)


def evaluate_cell(model, et, split: dict, xte, yte, cfg, device, args) -> dict:
    to = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
    beta = 0.5 if et is None else float(et.editor().beta)
    start = time.perf_counter()
    tuned = fe.tune(model, to(split["tune_edits"]), to(split["tune_control"]), editor=fe.RMSProp(beta=beta),
                    params="layer3", max_steps=10, grid={"lr": cfg["lr_grid"]}, refine=cfg.get("refine", False),
                    min_success=0.95, progress=not args.quiet)
    tune_seconds = time.perf_counter() - start
    report = evaluate_edits(model, tuned.editor, split, device, args)
    return {"test_error": test_error(model, xte, yte, device), "learned_editor": None if et is None else et.editor().to_dict(),
            "tuned_editor": tuned.editor.to_dict(), "tune_feasible": tuned.feasible, "tune_table": tuned.table,
            "tune_lr_resolution": tuned.lr_resolution,
            "tune_seconds": tune_seconds, "report": report.to_dict()}


def fixed_key(lr: float) -> str:
    return f"rmsprop lr={lr:g}"


def evaluate_fixed_editor(out: pathlib.Path, lr: float, split: dict, cfg: dict, device, args) -> None:
    """Add ``fixed_reports[<editor>]`` to every finished cell that lacks it: the trained weights
    (from the cell's checkpoint) evaluated on the same edits and control with RMSProp(lr, β as tuned)."""
    for path in sorted((out / "cells").glob("*_seed*.json")):
        cell = json.loads(path.read_text())
        key = fixed_key(lr)
        if key in cell.get("fixed_reports", {}):
            continue
        ckpt = out / "ckpt" / f"{cell['config']}_seed{cell['seed']}.pt"
        if not ckpt.exists():
            print(f"{path.name}: no checkpoint, no fixed-editor evaluation", flush=True)
            continue
        model = get_model(cfg["model"]).to(device)
        model.load_state_dict(torch.load(ckpt, map_location=device, weights_only=False)["model"])
        model.eval()
        editor = fe.RMSProp(lr, beta=cell["tuned_editor"]["beta"])
        report = evaluate_edits(model, editor, split, device, args)
        cell.setdefault("fixed_reports", {})[key] = report.to_dict()
        common.write_json(path, cell)
        print(f"{cell['config']} seed {cell['seed']} with {key}: drawdown {100 * report.drawdown:.2f}%  "
              f"success {100 * report.success_rate:.1f}%  flip {100 * report.flip_rate:.2f}%", flush=True)


# ------------------------------------------------------------------------------------------------
# summary and figures
# ------------------------------------------------------------------------------------------------
METRICS = ("test_error", "drawdown", "success_rate", "mean_steps", "flip_rate", "step_seconds")


def cell_metrics(cell: dict) -> dict:
    r = cell["report"]
    return {"test_error": cell["test_error"], "drawdown": r["drawdown"], "success_rate": r["success_rate"],
            "mean_steps": r["mean_steps"], "flip_rate": r["flip_rate"],
            "step_seconds": cell["training"]["median_step_seconds"]}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(cells: dict) -> dict:
    """mean ± std over seeds per configuration, and per-seed differences to plain training."""
    summary = {}
    for name in CONFIGS:
        rows = [cell_metrics(c) for (n, _), c in sorted(cells.items()) if n == name]
        if rows:
            summary[name] = {k: _mean_std([r[k] for r in rows]) for k in METRICS}
    paired = {}
    for name in CONFIGS:
        if name == "plain":
            continue
        seeds = sorted(s for (n, s) in cells if n == name and ("plain", s) in cells)
        if seeds:
            diffs = {k: [cell_metrics(cells[(name, s)])[k] - cell_metrics(cells[("plain", s)])[k] for s in seeds]
                     for k in ("test_error", "drawdown", "success_rate", "flip_rate")}
            ratio = [cell_metrics(cells[(name, s)])["step_seconds"] / cell_metrics(cells[("plain", s)])["step_seconds"]
                     for s in seeds]
            paired[name] = {**{f"{k}_minus_plain": _mean_std(v) for k, v in diffs.items()},
                            "step_time_ratio": _mean_std(ratio), "seeds": seeds}
    fixed = {}
    keys = sorted({k for c in cells.values() for k in c.get("fixed_reports", {})})
    for key in keys:
        fixed[key] = {}
        for name in CONFIGS:
            reps = {s: c["fixed_reports"][key] for (n, s), c in cells.items() if n == name and key in c.get("fixed_reports", {})}
            if not reps:
                continue
            entry = {m: _mean_std([r[m] for r in reps.values()]) for m in ("drawdown", "success_rate", "mean_steps",
                                                                            "flip_rate")}
            plain = {s: cells[("plain", s)]["fixed_reports"][key] for s in reps
                     if key in cells.get(("plain", s), {}).get("fixed_reports", {})}
            if name != "plain" and plain:
                entry["drawdown_minus_plain"] = _mean_std([reps[s]["drawdown"] - plain[s]["drawdown"] for s in plain])
                entry["flip_rate_minus_plain"] = _mean_std([reps[s]["flip_rate"] - plain[s]["flip_rate"] for s in plain])
            fixed[key][name] = entry
    return {"per_config": summary, "vs_plain": paired, "fixed_editor": fixed}


def mean_per_class(cells: dict, name: str) -> torch.Tensor:
    mats = [torch.tensor([[math.nan if v is None else v for v in row] for row in c["report"]["per_class_drawdown"]],
                         dtype=torch.float64) for (n, _), c in cells.items() if n == name]
    return torch.stack(mats).mean(0)


def draw_figures(out_dir: pathlib.Path, cells: dict, reference: dict | None) -> None:
    from fastedit import plots
    points = {name: [] for name in CONFIGS}
    for (name, seed), c in sorted(cells.items()):
        m = cell_metrics(c)
        points[name].append((m["test_error"], m["drawdown"]))
    if reference is not None:
        points["pretrained (no fine-tuning)"] = [(reference["test_error"], reference["report"]["drawdown"])]
    plots.plot_drawdown_vs_error(points, out_dir / "drawdown_vs_test_error.png",
                                 title="Editable Training on CIFAR-10 (JPEG): drawdown vs test error")
    for key in sorted({k for c in cells.values() for k in c.get("fixed_reports", {})}):
        fixed = {name: [] for name in CONFIGS}
        for (name, seed), c in sorted(cells.items()):
            if key in c.get("fixed_reports", {}):
                fixed[name].append((c["test_error"], c["fixed_reports"][key]["drawdown"]))
        plots.plot_drawdown_vs_error(fixed, out_dir / f"drawdown_vs_test_error_{key.replace(' ', '_').replace('=', '')}.png",
                                     title=f"Every model with the same editor ({key})")
    names = [n for n in CONFIGS if any(k[0] == n for k in cells)]
    if names:
        plots.plot_per_class_drawdowns({n: mean_per_class(cells, n) for n in names},
                                       out_dir / "per_class_drawdown.png", fdata.CIFAR10_CLASSES,
                                       title="Per-class drawdown (%), mean over seeds")


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu: fine-tune ResNet-20 (default); "
                    "scratch: ResNet-20 from scratch; gpu: ResNet-18 from scratch")
    ap.add_argument("--out-dir", required=True, type=pathlib.Path)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                    help="default: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in DEFAULT_CONFIGS.items()))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", help="the CIFAR-10 JPEG zip (default: in $FASTEDIT_DATA/cifar10)")
    ap.add_argument("--weights", help="pretrained weights for the cpu preset (default: $FASTEDIT_MODELS/resnet20-*.th)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    for key in ("steps", "batch_size", "edits", "control", "tune_edits", "tune_control"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"override the preset's {key}")
    ap.add_argument("--lr", type=float, default=None, help="override the preset's training lr")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=None, help="override the editor lr grid of fe.tune")
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (tests)")
    ap.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (tests)")
    ap.add_argument("--model", default=None, help="override the preset's model (tests)")
    ap.add_argument("--init", choices=("pretrained", "scratch"), default=None)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: checkpoint and exit with code 3 before this much time has passed")
    ap.add_argument("--eval-reserve", type=float, default=120.0,
                    help="seconds of --time-limit kept for evaluating a cell after its training (default 120)")
    ap.add_argument("--max-steps-per-call", type=int, default=None, help="stop (checkpointed) after this many "
                    "training steps in this call (tests of resumption)")
    ap.add_argument("--fixed-lr", type=float, nargs="*", default=[],
                    help="also evaluate every finished cell's model with RMSProp at these fixed lrs (β as tuned), "
                         "the same editor for every model: a comparison free of the tuning's lr choice")
    ap.add_argument("--train-only", action="store_true", help="train (and checkpoint) every cell, evaluate none")
    ap.add_argument("--no-reference", action="store_true", help="skip measuring the untrained starting model")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.configs is None:
        args.configs = DEFAULT_CONFIGS[args.preset]
    t_start = time.monotonic()
    # training stops (checkpointed) at the deadline; a cell's evaluation starts only before it
    deadline = None if args.time_limit is None else t_start + args.time_limit - args.eval_reserve
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (convolutions use TF32 by default)
    cfg = dict(PRESETS[args.preset])
    for key in ("steps", "batch_size", "edits", "control", "tune_edits", "tune_control", "lr", "model", "init"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.lr_grid:
        cfg["lr_grid"] = args.lr_grid
    weights = None
    if cfg["init"] == "pretrained":
        weights = pathlib.Path(args.weights) if args.weights else next(
            iter(sorted(common.models_dir().glob(f"{cfg['model']}-*.th"))), None)
        if weights is None or not weights.is_file():
            raise SystemExit(f"no pretrained weights for {cfg['model']}; pass --weights")

    zpath = find_zip(args.data)
    xtr_u8, ytr = fdata.load_cifar10_jpeg_zip(zpath, "train", limit=args.train_limit, progress=not args.quiet)
    xte_u8, yte = fdata.load_cifar10_jpeg_zip(zpath, "test", limit=args.test_limit, progress=not args.quiet)
    xte = normalise(fdata.to_float_tensor(xte_u8))
    split = eval_split(xte, yte, normalise(fdata.to_float_tensor(xtr_u8)), cfg)

    out = args.out_dir
    for sub in ("cells", "ckpt"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    command = common.command_line(__file__, argv)
    machine = common.machine_info(device)

    ref_path = out / "cells" / "reference.json"
    if not args.no_reference and not args.train_only and not ref_path.exists():
        model, _, _, _ = build(cfg, None, args.seeds[0], device, weights)
        model.eval()
        ref = {"command": command, "what": f"the starting model ({cfg['init']}), not trained",
               **evaluate_cell(model, None, split, xte, yte, cfg, device, args)}
        common.write_json(ref_path, ref)
        print(f"reference: test error {100 * ref['test_error']:.2f}%  drawdown {100 * ref['report']['drawdown']:.2f}%",
              flush=True)

    for seed in args.seeds:
        for name in args.configs:
            path = out / "cells" / f"{name}_seed{seed}.json"
            if path.exists():
                continue
            if deadline is not None and time.monotonic() > deadline:
                print("time limit reached; run the same command again to resume", flush=True)
                return EXIT_TIME_LIMIT
            trained = train(name, CONFIGS[name], seed, cfg, xtr_u8, ytr, device, weights,
                            out / "ckpt" / f"{name}_seed{seed}.pt", args, deadline)
            if trained is None:
                print("stopped after a checkpoint; run the same command again to resume", flush=True)
                return EXIT_TIME_LIMIT
            model, et, state = trained
            if args.train_only:
                continue
            if deadline is not None and time.monotonic() > deadline:
                print("time limit reached before evaluation; run the same command again to resume", flush=True)
                return EXIT_TIME_LIMIT
            result = evaluate_cell(model, et, split, xte, yte, cfg, device, args)
            plain_path = out / "cells" / f"plain_seed{seed}.json"
            if name == "plain":  # the shared editor is this model's own tuned editor
                result["fixed_reports"] = {SHARED_KEY: result["report"]}
            elif plain_path.exists():
                spec = dict(json.loads(plain_path.read_text())["tuned_editor"])
                shared = fe.make_editor(spec.pop("editor"), **spec)
                result["fixed_reports"] = {SHARED_KEY: evaluate_edits(model, shared, split, device, args).to_dict()}
            else:
                print(f"{name} seed {seed}: no plain cell of this seed yet, so no shared-editor evaluation "
                      f"(train plain first)", flush=True)
            times = state["step_seconds"]
            cell = {"command": command, "config": name, "c_edit": None if CONFIGS[name] is None else C_EDIT,
                    "c_loc": CONFIGS[name], "loc_mode": None if CONFIGS[name] is None else LOC_MODES.get(name, "shared"),
                    "seed": seed, "preset": args.preset, "setting": {
                        k: v for k, v in cfg.items() if k != "lr_grid"} | {"lr_grid": cfg["lr_grid"]},
                    "training": {"steps": state["step"], "median_step_seconds": statistics.median(times),
                                 "mean_step_seconds": statistics.fmean(times), "log": state["log"],
                                 "mean_loadavg": statistics.fmean(state["loadavg"]) if state["loadavg"] else None},
                    **result, "machine": machine}
            common.write_json(path, cell)
            r = result["report"]
            print(f"{name} seed {seed}: test error {100 * result['test_error']:.2f}%  drawdown "
                  f"{100 * r['drawdown']:.2f}%  success {100 * r['success_rate']:.1f}%  steps {r['mean_steps']:.2f}  "
                  f"flip {100 * r['flip_rate']:.2f}%  {1e3 * statistics.median(times):.0f} ms/step", flush=True)

    if args.train_only:
        return 0
    for lr in args.fixed_lr:
        evaluate_fixed_editor(out, lr, split, cfg, device, args)

    cells = {}
    for p in sorted((out / "cells").glob("*_seed*.json")):
        c = json.loads(p.read_text())
        cells[(c["config"], c["seed"])] = c
    reference = json.loads(ref_path.read_text()) if ref_path.exists() else None
    summary = summarise(cells)
    common.write_json(out / "summary.json", {
        "command": command, "preset": args.preset, "setting": cfg, "eval_seed": EVAL_SEED,
        "reference": None if reference is None else {"test_error": reference["test_error"], **{
            k: reference["report"][k] for k in ("drawdown", "success_rate", "mean_steps", "flip_rate")}},
        **summary, "machine": machine})
    draw_figures(out, cells, reference)
    print("\nconfig      seeds  test error        drawdown          success    steps   flip      ms/step")
    for name, s in summary["per_config"].items():
        print(f"{name:<11} {s['test_error']['n']:>5}  {100 * s['test_error']['mean']:5.2f} ± {100 * s['test_error']['std']:4.2f}%"
              f"   {100 * s['drawdown']['mean']:5.2f} ± {100 * s['drawdown']['std']:4.2f}%"
              f"   {100 * s['success_rate']['mean']:5.1f}%   {s['mean_steps']['mean']:5.2f}"
              f"   {100 * s['flip_rate']['mean']:5.2f}%   {1e3 * s['step_seconds']['mean']:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
