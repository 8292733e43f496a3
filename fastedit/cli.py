"""The ``fastedit`` command line: ``fastedit demo``, ``fastedit backends``."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import EDITOR_ORDER, run_demo

    editors = EDITOR_ORDER if args.editors == "all" else tuple(e.strip() for e in args.editors.split(","))
    unknown = set(editors) - set(EDITOR_ORDER)
    if unknown:
        raise SystemExit(f"fastedit demo: unknown editor(s) {sorted(unknown)}; choose from {', '.join(EDITOR_ORDER)}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = run_demo(model_name=args.model, weights=args.weights, data=args.data, data_dir=args.data_dir,
                      num_edits=args.edits, max_steps=args.max_steps, params=args.params, editors=editors,
                      lr=args.lr, out=args.out, seed=args.seed, epochs=args.epochs, limit=args.limit,
                      progress=not args.no_progress)
    # record the exact command next to the numbers it produced
    import pathlib
    path = pathlib.Path(args.out) / "results.json"
    data = json.loads(path.read_text())
    data["command"] = "fastedit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path.write_text(json.dumps(data, indent=2))
    return 0 if result["rows"] else 1


def _backends(args: argparse.Namespace) -> int:
    from .kernels import backends

    info = backends()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    forced = info["forced"]
    print(f"fastedit {__version__}; backend priority: {' > '.join(info['order'])}"
          + (f"; forced by FASTEDIT_BACKEND={forced}" if forced else ""))
    for name, st in info["backends"].items():
        state = "usable" if st["usable"] else f"unusable: {st['reason']}"
        ops = f" (ops: {', '.join(st['ops'])})" if st["ops"] else ""
        print(f"  {name:<10} {state}{ops}")
    if info["extension"]:
        print("extension build: " + ", ".join(f"{k}={v}" for k, v in info["extension"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastedit",
        description="fastedit: fast, exact editing of trained PyTorch models (Editable Neural Networks, "
                    "Sinitsin et al. 2020). Subcommands print tables and write JSON/CSV/PNG results.")
    parser.add_argument("--version", action="version", version=f"fastedit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="edit a model with all six editors and print the paper's Table 1",
        description="Train (or load) a classifier, apply N independent edits (held-out images with random "
                    "target labels) with GD, Scaled GD, RProp, RMSProp, Momentum and Adam, and report for each: "
                    "drawdown (increase of test error), success rate within k steps, mean steps, flip rate "
                    "(share of test predictions changed). Default: scikit-learn digits and a small CNN, no "
                    "download. Example on real CIFAR-10: fastedit demo --model resnet20 --weights "
                    "../shared/models/resnet20-12fca82f.th --data cifar10 --data-dir ../shared/data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--model", default="small_cnn",
                      choices=["small_cnn", "mlp", "resnet18", "resnet20", "resnet32", "resnet44", "resnet56"],
                      help="model architecture")
    demo.add_argument("--weights", default=None, help="checkpoint to load (required for resnet20..56); "
                      "without it the model is trained on the data's training split")
    demo.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10", "cifar10-lossless", "cifar10-jpeg"],
                      help="dataset; cifar10 picks the first available of the pickle folder, the lossless "
                      "1,017-image npz and the JPEG zip")
    demo.add_argument("--data-dir", default=None, help="folder with the dataset files (default: $FASTEDIT_DATA)")
    demo.add_argument("--edits", type=int, default=200, help="number of independent edits")
    demo.add_argument("--max-steps", type=int, default=10, help="editor steps per edit (the paper's k)")
    demo.add_argument("--params", default=None, help="editable parameters: a module-name prefix "
                      "(default: 'head' for small_cnn, 'classifier' for mlp, 'layer3' for ResNets)")
    demo.add_argument("--editors", default="all", help="comma-separated subset of gd,scaled_gd,rprop,rmsprop,momentum,adam")
    demo.add_argument("--lr", type=float, default=None, help="one learning rate for every editor "
                      "(default: per-editor values in fastedit/demo.py)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs when no --weights are given")
    demo.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    demo.add_argument("--seed", type=int, default=0, help="seed for training, edit choice and labels")
    demo.add_argument("--out", default="runs/demo", help="output folder for results.json, results.csv, editors.png")
    demo.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)

    be = sub.add_parser("backends", help="show which kernel backends are usable here, and why not",
                        description="List the kernel backends (cuda, triton, cpu, reference) in priority order, "
                                    "whether each is usable on this machine and why not, and the compiled "
                                    "extension's build information. FASTEDIT_BACKEND forces one backend.")
    be.add_argument("--json", action="store_true", help="print JSON")
    be.set_defaults(func=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
