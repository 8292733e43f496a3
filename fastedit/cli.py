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
    _record_command(f"{args.out}/results.json")  # the exact command next to the numbers it produced
    return 0 if result["rows"] else 1


def _record_command(path) -> None:
    import pathlib
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc-per-node {world} -m fastedit " if world > 1 else "fastedit "
    data["command"] = launcher + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path.write_text(json.dumps(data, indent=2))


def _editor_from_args(args, setting: str):
    from .demo import default_hparams
    from .editors import make_editor

    hp = dict(default_hparams()[setting].get(args.editor, {}))
    if args.lr is not None:
        hp["lr"] = args.lr
    if getattr(args, "beta", None) is not None:
        hp["beta"] = args.beta
    return make_editor(args.editor, **hp)


def _setting(model_name: str) -> str:
    return "small" if model_name in ("small_cnn", "mlp") else "resnet"


def _pick_edits(x, y, n: int, num_classes: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x.shape[0], generator=gen)[:min(n, x.shape[0])]
    return x[pick], torch.randint(0, num_classes, (len(pick),), generator=gen), y[pick]


def _init_distributed() -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on the CPU, NCCL on GPUs)
    so evaluate/tune shard their edits; returns this process's rank (0 without torchrun)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank()


def _speed_kwargs(args: argparse.Namespace) -> dict:
    return {"strategy": args.strategy, "edits_per_group": args.edits_per_group, "batch_size": args.batch_size,
            "cache_budget": args.cache_budget_mb * 2 ** 20}


def _evaluate(args: argparse.Namespace) -> int:
    import pathlib

    from .data import CIFAR10_CLASSES
    from .demo import DEFAULT_PARAMS, prepare_model_and_data
    from .evaluate import evaluate
    from .plots import plot_edit_tsne, plot_per_class_drawdown

    rank = _init_distributed()
    model, dataset, num_classes, _ = prepare_model_and_data(
        args.model, args.weights, args.data, args.data_dir, limit=args.limit, epochs=args.epochs, seed=args.seed)
    editor = _editor_from_args(args, _setting(args.model))
    params = args.params or DEFAULT_PARAMS.get(args.model, "layer3")
    x, y = dataset.test
    x_e, y_e, true_e = _pick_edits(x, y, args.edits, num_classes, args.seed)
    report = evaluate(model, (x_e, y_e), (x, y), editor=editor, params=params, max_steps=args.max_steps,
                      edit_labels=true_e, keep_kl_vectors=True, progress=not args.no_progress,
                      **_speed_kwargs(args))
    if rank != 0:  # every rank holds the whole report; one writes it
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "report.json")
    report.to_csv(out / "edits.csv")
    _record_command(out / "report.json")
    names = CIFAR10_CLASSES if args.data.startswith("cifar10") else None
    plot_per_class_drawdown(report, out / "per_class_drawdown.png", class_names=names)
    if report.num_edits >= 5:
        plot_edit_tsne(report, out / "edit_tsne.png", class_names=names)
    print(f"{editor!r} on {args.model}, {report.num_edits} edits of {params!r}, control {report.num_control}: "
          f"base error {100 * report.base_error:.2f}%, drawdown {100 * report.drawdown:.2f}%, success "
          f"{100 * report.success_rate:.1f}%, mean steps {report.mean_steps:.2f}, flip rate {100 * report.flip_rate:.2f}%")
    print(f"wrote {out}/report.json, edits.csv, per_class_drawdown.png" + (", edit_tsne.png" if report.num_edits >= 5 else ""))
    return 0


def _tune(args: argparse.Namespace) -> int:
    import pathlib

    from . import data as fdata
    from .demo import DEFAULT_PARAMS, prepare_model_and_data
    from .editors import make_editor
    from .tuning import tune

    rank = _init_distributed()
    model, dataset, num_classes, _ = prepare_model_and_data(
        args.model, args.weights, args.data, args.data_dir, limit=args.limit, epochs=args.epochs, seed=args.seed)
    if dataset.train is not None:
        pool, source = dataset.train, "the training split"
    else:  # pretrained CIFAR models: tuning edits from the training images, disjoint from the test set
        xt, yt = fdata.load_dataset(args.data, args.data_dir, split="train", limit=args.tune_pool)
        pool, source = (fdata.to_float_tensor(xt, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD), yt), "training images"
    x_e, y_e, _ = _pick_edits(*pool, args.tune_edits, num_classes, args.seed + 1)
    grid = {"lr": [float(v) for v in args.lrs.split(",")]}
    if args.betas:
        grid["beta"] = [float(v) for v in args.betas.split(",")]
    params = args.params or DEFAULT_PARAMS.get(args.model, "layer3")
    result = tune(model, (x_e, y_e), dataset.test, editor=make_editor(args.editor, **{"lr": grid["lr"][0]}),
                  params=params, max_steps=args.max_steps, grid=grid, min_success=args.min_success,
                  progress=not args.no_progress, **_speed_kwargs(args))
    if rank != 0:
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps({**result.to_dict(), "tuning_edits_from": source}, indent=2))
    result.to_csv(out / "tune.csv")
    _record_command(out / "tune.json")
    print(f"{len(result.table)} settings on {len(x_e)} tuning edits from {source}; chosen: {result.editor!r} "
          f"(drawdown {100 * result.report.drawdown:.2f}%, success {100 * result.report.success_rate:.1f}%"
          f"{'' if result.feasible else ', NO setting reached the success target'})")
    print(f"wrote {out}/tune.json, tune.csv")
    return 0


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


def _add_model_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small_cnn",
                   choices=["small_cnn", "mlp", "resnet18", "resnet20", "resnet32", "resnet44", "resnet56"],
                   help="model architecture")
    p.add_argument("--weights", default=None, help="checkpoint to load (required for resnet20..56); "
                   "without it the model is trained on the data's training split")
    p.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10", "cifar10-lossless", "cifar10-jpeg"],
                   help="dataset; cifar10 picks the first available of the pickle folder, the lossless "
                   "1,017-image npz and the JPEG zip")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: $FASTEDIT_DATA)")
    p.add_argument("--params", default=None, help="editable parameters: a module-name prefix "
                   "(default: 'head' for small_cnn, 'classifier' for mlp, 'layer3' for ResNets)")
    p.add_argument("--max-steps", type=int, default=10, help="editor steps per edit (the paper's k)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs when no --weights are given")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--seed", type=int, default=0, help="seed for training, edit choice and labels")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="auto", choices=["auto", "loop", "vmap", "measure"],
                   help="edits one after another (loop), side by side under torch.func.vmap, or measure both "
                        "on the first group; auto: loop on the CPU, measure elsewhere")
    p.add_argument("--edits-per-group", type=int, default=None, help="edits processed together (default: 1 for "
                   "loop, 16 for vmap)")
    p.add_argument("--batch-size", type=int, default=256, help="control images per forward pass")
    p.add_argument("--cache-budget-mb", type=float, default=2048,
                   help="memory for the control set's cached prefix activations; beyond it they are recomputed")


def _add_editor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--editor", default="rmsprop", choices=["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"],
                   help="update rule")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the calibrated demo value)")
    p.add_argument("--beta", type=float, default=None, help="RMSProp's beta")


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
    _add_model_data_args(demo)
    demo.add_argument("--edits", type=int, default=200, help="number of independent edits")
    demo.add_argument("--editors", default="all", help="comma-separated subset of gd,scaled_gd,rprop,rmsprop,momentum,adam")
    demo.add_argument("--lr", type=float, default=None, help="one learning rate for every editor "
                      "(default: per-editor values in fastedit/demo.py)")
    demo.add_argument("--out", default="runs/demo", help="output folder for results.json, results.csv, editors.png")
    demo.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser(
        "evaluate", help="the paper's protocol for one editor, with per-class drawdown and t-SNE figures",
        description="Apply N independent edits (test images with random target labels) with one editor; report "
                    "drawdown, success rate, mean steps, flip rates and KL on the whole test set; write report.json, "
                    "edits.csv, the per-class drawdown heatmap (paper Figure 2) and a t-SNE of the edits' "
                    "per-sample KL vectors.",
        epilog="Under torchrun (e.g. `torchrun --nproc-per-node 2 -m fastedit evaluate ...`) the edits are "
               "sharded across the processes and rank 0 writes the same report a single process would.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_data_args(ev)
    _add_editor_args(ev)
    ev.add_argument("--edits", type=int, default=200, help="number of independent edits")
    ev.add_argument("--out", default="runs/evaluate", help="output folder")
    _add_speed_args(ev)
    ev.set_defaults(func=_evaluate)

    tu = sub.add_parser(
        "tune", help="search an editor's learning rate (and beta) by the paper's protocol",
        description="Evaluate a grid of hyper-parameters on tuning edits taken from TRAINING images (disjoint from "
                    "the test images that evaluate/demo edit) and choose the least drawdown among the settings whose "
                    "success rate within --max-steps reaches --min-success. Writes tune.json and tune.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_data_args(tu)
    tu.add_argument("--editor", default="rmsprop", choices=["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"],
                    help="the editor to tune")
    tu.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", help="comma-separated learning rates")
    tu.add_argument("--betas", default=None, help="comma-separated betas to search too (RMSProp)")
    tu.add_argument("--tune-edits", type=int, default=100, help="number of tuning edits")
    tu.add_argument("--tune-pool", type=int, default=None, help="load at most this many training images for tuning edits")
    tu.add_argument("--min-success", type=float, default=0.95, help="required success rate within --max-steps")
    tu.add_argument("--out", default="runs/tune", help="output folder")
    _add_speed_args(tu)
    tu.set_defaults(func=_tune)

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
