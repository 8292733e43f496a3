"""Why does (or doesn't) Editable Training lower drawdown here? Compare what its locality term sees
during training with what the evaluation measures, on the models trained by
``editable_training_cifar.py``.

For every finished cell (configuration, seed) of ``--out-dir``, with the cell's trained weights:

- ``L_loc`` as Editable Training computes it: KL(original ‖ edited) after an edit made by the
  training-time editor (the learned one, k = 10), on augmented *training* batches, BatchNorm in
  *train* mode on shared activations (``loc_mode="shared"``, the default), and the same with
  ``loc_mode="eval"``; both averaged over ``--batches`` batches (the model is restored afterwards);
- ``fastedit.evaluate`` with the editor tuned for that model, on the first ``--edits`` reported edits,
  with two control sets in eval mode: ``--control`` clean *training* images and as many held-out
  *test* images: mean KL, flip rate and drawdown on each.

The ratio between these says whether the locality term is too weak (c_loc · L_loc against L_base),
looks at the wrong data (training images the model fits, against held-out images), or in the wrong
BatchNorm mode.

    python benchmarks/experiments/editable_training_cifar_diagnose.py --out-dir benchmarks/results/editable_training_cifar
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit.models import get_model

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments import editable_training_cifar as experiment  # noqa: E402


def editor_from_dict(d: dict) -> fe.Editor:
    """The editor of ``Editor.to_dict()``'s output."""
    return fe.make_editor(d["editor"], **{k: v for k, v in d.items() if k != "editor"})


def training_locality(exp, model, editor, xtr_u8, ytr, batches: int, batch_size: int, seed: int, loc_mode: str) -> dict:
    """Editable Training's own L_loc / edit statistics on augmented training batches (no update)."""
    work = copy.deepcopy(model).train()   # train-mode BatchNorm moves running statistics: use a copy
    et = fe.EditableTraining(work, params="layer3", editor=editor, max_steps=10, loc_mode=loc_mode)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = []
    for _ in range(batches):
        idx = torch.randint(0, xtr_u8.shape[0], (batch_size,), generator=gen)
        x = exp.normalise(fdata.augment_cifar(fdata.to_float_tensor(xtr_u8[idx]), gen))
        _, stats = et(x, ytr[idx])
        rows.append({k: float(v) for k, v in stats.items()})
    return {k: statistics.fmean(r[k] for r in rows) for k in ("loss_base", "loss_loc", "edit_success", "edit_steps")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out-dir", required=True, type=pathlib.Path, help="the experiment's folder (cells, ckpt)")
    ap.add_argument("--data", help="the CIFAR-10 JPEG zip")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="only the cells of these seeds")
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--control", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = experiment
    zpath = exp.find_zip(args.data)
    xtr_u8, ytr = fdata.load_cifar10_jpeg_zip(zpath, "train", progress=not args.quiet)
    xte_u8, yte = fdata.load_cifar10_jpeg_zip(zpath, "test", progress=not args.quiet)
    xtr = exp.normalise(fdata.to_float_tensor(xtr_u8))
    xte = exp.normalise(fdata.to_float_tensor(xte_u8))

    results = []
    for cell_path in sorted((args.out_dir / "cells").glob("*_seed*.json")):
        cell = json.loads(cell_path.read_text())
        if args.seeds is not None and cell["seed"] not in args.seeds:
            continue
        ckpt = args.out_dir / "ckpt" / f"{cell['config']}_seed{cell['seed']}.pt"
        if not ckpt.exists():
            print(f"skipping {cell_path.name}: no checkpoint {ckpt}", flush=True)
            continue
        cfg = dict(exp.PRESETS[cell["preset"]])
        cfg.update({k: v for k, v in cell["setting"].items()})
        model = get_model(cfg["model"])
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
        model.eval()
        split = exp.eval_split(xte, yte, xtr, cfg)
        edits = tuple(t[:args.edits] for t in split["edits"])
        gen = torch.Generator().manual_seed(7)
        train_pick = torch.randperm(xtr.shape[0], generator=gen)[:args.control]
        tuned = editor_from_dict(cell["tuned_editor"])
        controls = {"train images": (xtr[train_pick], ytr[train_pick]),
                    "test images": tuple(t[:args.control] for t in split["control"])}
        row = {"config": cell["config"], "seed": cell["seed"], "c_loc": cell["c_loc"], "tuned_editor": cell["tuned_editor"]}
        for name, control in controls.items():
            rep = fe.evaluate(model, edits, control, editor=tuned, params="layer3", max_steps=10, progress=not args.quiet)
            row[f"eval on {name}"] = {k: getattr(rep, k) for k in ("base_error", "drawdown", "flip_rate", "mean_kl",
                                                                    "success_rate", "mean_steps")}
        learned = editor_from_dict(cell["learned_editor"]) if cell.get("learned_editor") else \
            fe.RMSProp(cfg["editor_lr"], beta=0.5)  # plain models: the editor Editable Training starts from
        for mode in ("shared", "eval"):
            row[f"training L_loc ({mode})"] = training_locality(exp, model, learned, xtr_u8, ytr, args.batches,
                                                               args.batch_size, cell["seed"], mode)
        results.append(row)
        tl, te = row["eval on train images"], row["eval on test images"]
        print(f"{cell['config']} seed {cell['seed']}: L_loc shared {row['training L_loc (shared)']['loss_loc']:.4f} "
              f"eval {row['training L_loc (eval)']['loss_loc']:.4f} | eval-mode KL train {tl['mean_kl']:.4f} "
              f"test {te['mean_kl']:.4f} | flips train {100 * tl['flip_rate']:.2f}% test {100 * te['flip_rate']:.2f}% "
              f"| drawdown train {100 * tl['drawdown']:.2f}% test {100 * te['drawdown']:.2f}%", flush=True)
    common.write_json(args.out_dir / "diagnose.json", {"command": common.command_line(__file__, argv),
                                                       "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
