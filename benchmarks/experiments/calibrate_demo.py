"""Choose the demo's per-editor learning rates by the paper's protocol, and record the search.

For each editor: a learning-rate grid; each value is evaluated on tuning edits made from *training*
images (disjoint from the demo's edits, which come from the test set) with random labels; the chosen
value minimises drawdown among those with ≥ 95% success within k steps (if none reaches 95%, the one
with the highest success): ``fastedit.tune``, once per editor. The search is written as JSON with the command; with
--update-defaults the chosen values also go into fastedit/demo_hparams.json, which the demo reads.

    python benchmarks/experiments/calibrate_demo.py --setting small --out benchmarks/results/calibrate_small.json --update-defaults
    python benchmarks/experiments/calibrate_demo.py --setting resnet --tune-edits 40 \
        --out benchmarks/results/calibrate_resnet.json --update-defaults
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit.demo import DEFAULT_PARAMS, EDITOR_ORDER, HPARAMS_FILE, train_classifier
from fastedit.models import SmallCNN, load_pretrained_cifar_resnet

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

GRIDS = {  # ×2–×2.5 steps, wide enough that the low end fails and the high end clearly over-shoots
    "small": {  # SmallCNN on digits, editing "head"
        "gd": [2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1],
        "scaled_gd": [0.05, 0.1, 0.2, 0.5, 1.0],
        "rprop": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2],
        "rmsprop": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2],
        "momentum": [1e-3, 2e-3, 5e-3, 1e-2, 2e-2],
        "adam": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2],
    },
    "resnet": {  # pretrained CIFAR ResNets, layer3: every rule succeeds at smaller steps
        "gd": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
        "scaled_gd": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
        "rprop": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
        "rmsprop": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
        "momentum": [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4],
        "adam": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
    },
}


def setting_small(seed: int):
    xtr, ytr = fdata.load_digits("train")
    xte, yte = fdata.load_digits("test")
    xtr, xte = fdata.to_float_tensor(xtr), fdata.to_float_tensor(xte)
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1)
    train_classifier(model, xtr, ytr, epochs=30, seed=seed)  # the demo's model, same seed
    return model, (xtr, ytr), (xte, yte), DEFAULT_PARAMS["small_cnn"]


def setting_resnet(weights: str | None, data_dir: str | None):
    weights = weights or common.models_dir() / "resnet20-12fca82f.th"
    npz = common.data_dir(data_dir) / "cifar10" / "cifar10_lossless_subset.npz"
    xtr, ytr = fdata.load_cifar10_lossless(npz, "train")
    xte, yte = fdata.load_cifar10_lossless(npz, "test")
    norm = lambda x: fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)  # noqa: E731
    return load_pretrained_cifar_resnet(weights), (norm(xtr), ytr), (norm(xte), yte), "layer3"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=["small", "resnet"], default="small")
    ap.add_argument("--weights", help="resnet: the CIFAR-10 ResNet-20 checkpoint (default: $FASTEDIT_MODELS/resnet20-12fca82f.th)")
    ap.add_argument("--data-dir", help="resnet: folder holding cifar10/ (default: $FASTEDIT_DATA)")
    ap.add_argument("--tune-edits", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--update-defaults", action="store_true",
                    help="write the chosen learning rates into fastedit/demo_hparams.json")
    args = ap.parse_args(argv)

    if args.setting == "small":
        model, train, test, params = setting_small(args.seed)
    else:
        model, train, test, params = setting_resnet(args.weights, args.data_dir)
    gen = torch.Generator().manual_seed(args.seed + 1)
    pick = torch.randperm(train[0].shape[0], generator=gen)[:args.tune_edits]
    labels = torch.randint(0, 10, (len(pick),), generator=gen)
    edits = (train[0][pick], labels)

    table, chosen = [], {}
    for name in EDITOR_ORDER:  # fastedit.tune: least drawdown among the settings with ≥ 95% success
        result = fe.tune(model, edits, test, editor=name, params=params, max_steps=args.max_steps,
                         grid={"lr": GRIDS[args.setting][name]}, min_success=0.95, progress=False)
        for row in result.table:
            print(f"{name:<10} lr={row['lr']:<8g} drawdown={100 * row['drawdown']:6.2f}% "
                  f"success={100 * row['success_rate']:5.1f}% steps={row['mean_steps']:4.2f}", flush=True)
            table.append({"editor": name, **row})
        chosen[name] = {"lr": float(result.editor.lr), "met_95_percent": result.feasible}
    result = {"command": common.command_line(__file__, argv), "setting": args.setting,
              "params": params, "tune_edits": len(pick), "max_steps": args.max_steps, "chosen": chosen,
              "table": table, "machine": common.machine_info()}
    out = pathlib.Path(args.out)
    common.write_json(out, result, indent=2)
    print(json.dumps(chosen, indent=2))
    if args.update_defaults:
        defaults = json.loads(HPARAMS_FILE.read_text()) if HPARAMS_FILE.exists() else {"settings": {}, "sources": {}}
        defaults["settings"][args.setting] = {name: {"lr": c["lr"]} for name, c in chosen.items()}
        defaults["sources"][args.setting] = {"file": common.portable(str(out.resolve())), "command": result["command"]}
        HPARAMS_FILE.write_text(json.dumps(defaults, indent=2) + "\n")
        print(f"updated {HPARAMS_FILE}")


if __name__ == "__main__":
    main()
