"""Editable Training on real handwritten digits: does it lower drawdown, and does the L_loc BatchNorm
mode matter?

Trains the same SmallCNN (same init, same batches) plainly and with Editable Training (RMSProp,
editable parameters "head", k = 10), with L_loc computed on the shared train-mode prefix activations
(loc_mode="shared", the default) and in eval mode (loc_mode="eval"). Each trained model is then
evaluated with fastedit.evaluate: held-out test digits with random labels, each edit applied
independently, control = the whole test set, the editor being RMSProp with the hyper-parameters that
training learned (for the plain model: the initial ones). Repeated over seeds; mean ± std.

    python benchmarks/experiments/editable_training_digits.py --c 0.1 --out benchmarks/results/editable_training_digits_c0.1.json
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastedit as fe
from fastedit import data as fdata
from fastedit.models import SmallCNN

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

CONFIGS = {  # name -> EditableTraining kwargs (None: plain training)
    "plain": None,
    "editable (loc shared)": {"loc_mode": "shared"},
    "editable (loc eval)": {"loc_mode": "eval"},
}


def train(config, seed, xtr, ytr, epochs, c, lr_editor):
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1)
    et = None if config is None else fe.EditableTraining(
        model, params="head", editor=fe.RMSProp(lr_editor, beta=0.5), max_steps=10, c_edit=c, c_loc=c, **config)
    params = list((et or model).parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(xtr.shape[0], generator=gen).split(64):
            opt.zero_grad(set_to_none=True)
            if et is None:
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            else:
                loss, _ = et(xtr[idx], ytr[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            steps += 1
    model.eval()
    editor = fe.RMSProp(lr_editor, beta=0.5) if et is None else et.editor()
    return model, editor, (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--c", type=float, default=1.0, help="c_edit = c_loc")
    ap.add_argument("--lr-editor", type=float, default=5e-3, help="initial RMSProp lr (the demo's calibrated value)")
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    machine = common.machine_info()

    xtr, ytr = fdata.load_digits("train")
    xte, yte = fdata.load_digits("test")
    xtr, xte = fdata.to_float_tensor(xtr), fdata.to_float_tensor(xte)
    runs = {name: [] for name in CONFIGS}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(1000 + seed)
        pick = torch.randperm(xte.shape[0], generator=gen)[:args.edits]
        labels = torch.randint(0, 10, (len(pick),), generator=gen)
        for name, config in CONFIGS.items():
            model, editor, step_s = train(config, seed, xtr, ytr, args.epochs, args.c, args.lr_editor)
            rep = fe.evaluate(model, (xte[pick], labels), (xte, yte), editor=editor, params="head", progress=False)
            row = {"seed": seed, "step_seconds": step_s, "editor": editor.to_dict(), **{
                k: getattr(rep, k) for k in ("base_error", "drawdown", "success_rate", "mean_steps", "flip_rate", "mean_kl")}}
            runs[name].append(row)
            print(f"seed {seed} {name:<22} test error {100 * rep.base_error:5.2f}%  drawdown {100 * rep.drawdown:6.2f}%  "
                  f"success {100 * rep.success_rate:5.1f}%  steps {rep.mean_steps:4.2f}  flip {100 * rep.flip_rate:5.2f}%  "
                  f"lr {editor.lr:.2e} beta {editor.beta:.3f}  {1e3 * step_s:.1f} ms/step", flush=True)

    summary = {}
    for name, rows in runs.items():
        summary[name] = {}
        for k in ("base_error", "drawdown", "success_rate", "mean_steps", "flip_rate", "step_seconds"):
            values = [r[k] for r in rows]
            summary[name][k] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    print("\nconfig                   test error        drawdown          success   ms/step")
    for name, s in summary.items():
        print(f"{name:<24} {100 * s['base_error']['mean']:5.2f} ± {100 * s['base_error']['std']:4.2f}%   "
              f"{100 * s['drawdown']['mean']:5.2f} ± {100 * s['drawdown']['std']:4.2f}%   "
              f"{100 * s['success_rate']['mean']:5.1f}%   {1e3 * s['step_seconds']['mean']:6.1f}")
    common.write_json(args.out, {
        "command": common.command_line(__file__, argv), "config": vars(args), "summary": summary, "runs": runs,
        "machine": machine, "load_average_at_end": common.load_average(),
    }, indent=2)


if __name__ == "__main__":
    main()
