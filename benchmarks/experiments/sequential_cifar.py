"""Sequential editing of the pretrained CIFAR-10 ResNet-20: 500 edits applied one after another to one
model, with each method and each option that keeps a long sequence local (fastedit.evaluate_sequential).

Setting: the pretrained ResNet-20, editing ``layer3``; the first ``--pool`` CIFAR-10 test images of the
JPEG copy (all 10,000 are there; the lossless subset has only 1,017), of which ``--edits`` (a seeded
permutation) are edited to uniformly random labels, in that order, and ``--control`` others form the
control set. At every ``--every`` edits: drawdown and flip rate on the control set against the original
model, retention of the earlier successful edits, success and steps so far, parameters changed.

Cells (one per configuration, resumable: a finished cell is read back):
  gd, rmsprop        dense editors, the learning rates the paper's protocol chose for this model and
                     layer (``fastedit.tune``, benchmarks/results/surgery_cifar/cells/tuned_*.json)
  rmsprop-recheck2   after each edit, re-edit up to 2 broken earlier edits
  rmsprop-linf, rmsprop-l2
                     a trust region around the original parameters (``--linf``, ``--l2`` radii)
  ewc-rmsprop        EWC anchored at the original model (Fisher of 1,000 training images, λ ``--ewc-lambda``)
  surgery-b1000, surgery-b100
                     Neural Network Surgery (dynamic) changing at most 1,000 / 100 scalars per edit, every
                     change in an EditJournal (one fix rolled back in the middle, checked exactly)

With ``--trained DIR --trained-config NAME`` the edited model is one that editable_training_cifar.py
trained (``DIR/ckpt/NAME_seed0.pt``: e.g. ``plain`` and ``et-c0.01``, Editable Training's Table 3
pair), and RMSProp uses the hyper-parameters ``fastedit.tune`` chose for that model there.

Writes ``<out>/cells/<config>.json``, ``<out>/summary.json`` and ``<out>/sequential.png``.

    python benchmarks/experiments/sequential_cifar.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit.baselines import fisher_diagonal
from fastedit.models import load_pretrained_cifar_resnet

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

TUNED = common.RESULTS / "surgery_cifar" / "cells"
CONFIGS = ("gd", "rmsprop", "rmsprop-recheck2", "rmsprop-linf", "rmsprop-l2", "ewc-rmsprop", "surgery-b1000",
           "surgery-b100")


def config_name(text: str) -> str:
    base, at, value = text.partition("@")
    if base not in CONFIGS or (at and base not in ("rmsprop-linf", "rmsprop-l2", "ewc-rmsprop")):
        raise argparse.ArgumentTypeError(f"unknown configuration {text!r}")
    if at:
        float(value)
    return text


def parameter(name: str, args) -> float:
    """The radius or λ of a configuration: after its @, else the option's value."""
    base, at, value = name.partition("@")
    if at:
        return float(value)
    return {"rmsprop-linf": args.linf, "rmsprop-l2": args.l2, "ewc-rmsprop": args.ewc_lambda}[base]


def tuned_lr(editor: str) -> float:
    """The learning rate the paper's protocol chose for ResNet-20 ``layer3`` (surgery_cifar's tuning)."""
    return float(json.loads((TUNED / f"tuned_{editor}.json").read_text())["result"]["lr"])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), type=config_name,
                    help=f"default: {' '.join(CONFIGS)}; rmsprop-linf, rmsprop-l2 and ewc-rmsprop take their radius "
                         "or λ after an @ (rmsprop-linf@0.01, ewc-rmsprop@1e4) instead of --linf, --l2, --ewc-lambda")
    ap.add_argument("--edits", type=int, default=500)
    ap.add_argument("--control", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=1500, help="test images loaded (edits + control)")
    ap.add_argument("--every", type=int, default=25, help="edits between checkpoints (and 1, 2, 5, 10, 15 before)")
    ap.add_argument("--linf", type=float, default=0.002, help="rmsprop-linf: the L∞ radius (one edit moves a scalar by about 1e-3)")
    ap.add_argument("--l2", type=float, default=1.0, help="rmsprop-l2: the L2 radius (all of layer3 as one vector; one edit moves it by about 0.5)")
    ap.add_argument("--ewc-lambda", type=float, default=1e6, help="ewc-rmsprop: the penalty weight")
    ap.add_argument("--targets", choices=("random", "true"), default="random",
                    help="random: edit to uniformly random labels (the paper's edits); true: fix the model's "
                         "mistakes, the images it misclassifies edited to their true labels (at most --edits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", help="the CIFAR-10 ResNet-20 checkpoint (default: $FASTEDIT_MODELS/resnet20-12fca82f.th)")
    ap.add_argument("--data", help="the CIFAR-10 JPEG zip (default: $FASTEDIT_DATA/cifar10/cifar10-jpeg.zip)")
    ap.add_argument("--trained", type=pathlib.Path, default=None,
                    help="a folder of editable_training_cifar.py: edit its trained model --trained-config (seed 0) "
                         "instead of the pretrained one, with the RMSProp editor tuned for it there")
    ap.add_argument("--trained-config", default="plain", help="with --trained: the configuration (plain, et-c0.01, …)")
    ap.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "sequential_cifar")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.edits + args.control > args.pool:
        ap.error("--edits + --control must not exceed --pool")
    return args


def load(args):
    weights = args.weights or common.models_dir() / "resnet20-12fca82f.th"
    zpath = args.data or common.data_dir() / "cifar10" / fdata.cifar.JPEG_ZIP_NAME
    norm = lambda x: fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)  # noqa: E731
    x, y = fdata.load_cifar10_jpeg_zip(zpath, "test", limit=args.pool, progress=not args.quiet)
    xtr, ytr = fdata.load_cifar10_jpeg_zip(zpath, "train", limit=1000, progress=not args.quiet)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(x.shape[0], generator=gen)
    x = norm(x)
    if args.targets == "random":
        pick, rest = order[:args.edits], order[args.edits:args.edits + args.control]
        edits = (x[pick], torch.randint(0, 10, (args.edits,), generator=gen))
    else:  # the model's mistakes, in the permutation's order, fixed to their true labels
        model = pretrained_or_trained(args, weights)
        with torch.no_grad():
            wrong = torch.cat([model(x[order[i:i + 256]]).argmax(-1) != y[order[i:i + 256]]
                               for i in range(0, len(order), 256)])
        pick = order[wrong][:args.edits]
        rest = order[~torch.isin(order, pick)][:args.control]
        edits = (x[pick], y[pick])
    return pretrained_or_trained(args, weights), edits, (x[rest], y[rest]), (norm(xtr), ytr)


def pretrained_or_trained(args, weights) -> torch.nn.Module:
    if args.trained is None:
        return load_pretrained_cifar_resnet(weights)
    from fastedit.models import get_model
    model = get_model("resnet20")
    ckpt = args.trained / "ckpt" / f"{args.trained_config}_seed0.pt"
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    return model.eval()


def trained_editor(args) -> dict | None:
    """With --trained: the RMSProp hyper-parameters fastedit.tune chose for that model there."""
    if args.trained is None:
        return None
    cell = json.loads((args.trained / "cells" / f"{args.trained_config}_seed0.json").read_text())
    return {k: v for k, v in cell["tuned_editor"].items() if k != "editor"}


def options(name: str, args, model, train) -> dict:
    if name.startswith("surgery"):
        return {"method": "surgery", "budget": int(name.split("-b")[1]), "editor": None}
    editor = "gd" if name == "gd" else "rmsprop"
    hp = trained_editor(args) if editor == "rmsprop" and args.trained is not None else {"lr": tuned_lr(editor)}
    base = {"editor": fe.make_editor(editor, **hp)}
    if name == "rmsprop-recheck2":
        base["recheck"] = 2
    elif name.startswith("rmsprop-linf"):
        base["trust_region"] = ("linf", parameter(name, args))
    elif name.startswith("rmsprop-l2"):
        base["trust_region"] = ("l2", parameter(name, args))
    elif name.startswith("ewc-rmsprop"):
        base.update(method="ewc", fisher=fisher_diagonal(model, train, params="layer3"),
                    ewc_lambda=parameter(name, args))
    return base


def checkpoints(args, n: int) -> list[int]:
    """Every ``--every`` of the ``n`` edits, and more often at the start, where dense edits go wrong fastest."""
    return sorted({c for c in (1, 2, 5, 10, 15) if c <= n} | set(range(0, n + 1, args.every)) | {n})


def setting(name: str, args) -> dict:
    s = {"config": name, "edits": args.edits, "control": args.control, "pool": args.pool, "every": args.every,
         "seed": args.seed, "params": "layer3", "max_steps": 10, "data": "cifar10-jpeg test images"}
    if args.targets != "random":
        s["targets"] = args.targets
    for prefix, key in (("rmsprop-linf", "linf"), ("rmsprop-l2", "l2"), ("ewc-rmsprop", "ewc_lambda")):
        if name.startswith(prefix):
            s[key] = parameter(name, args)
    if args.trained is not None:
        s["trained"] = f"{args.trained.name}/{args.trained_config}"
    if not name.startswith("surgery") and args.trained is not None and name != "gd":
        s["editor"] = trained_editor(args)
    elif not name.startswith("surgery"):
        s["lr"] = tuned_lr("gd" if name == "gd" else "rmsprop")
    else:
        s["budget"] = int(name.split("-b")[1])
    return s


def journal_check(rep, original) -> dict:
    """Roll back the middle entry of the journal and check the model equals the original with every
    other entry applied in order (bit for bit)."""
    entries = list(rep.journal.entries)
    if not entries:
        return {"entries": 0}
    mid = entries[len(entries) // 2]
    rep.journal.rollback(mid.id)
    expected = copy.deepcopy(original)
    for e in entries:
        if e.id != mid.id:
            e.delta.apply(expected, check=False)
    same = all(torch.equal(common.bits(p), common.bits(q)) for p, q in zip(rep.model.parameters(), expected.parameters()))
    return {"entries": len(entries), "rolled_back": mid.name, "exact": bool(same),
            "total_nnz": sum(e.delta.nnz for e in entries)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = common.command_line(__file__, argv)
    cells = common.Cells(args.out_dir, command)
    model, edits, control, train = load(args)
    for name in args.configs:
        s = setting(name, args)
        if cells.done(name, s):
            common.say(f"{name}: done earlier", args.quiet)
            continue
        run_cell(cells, name, s, model, edits, control, "layer3", args, **options(name, args, model, train))
    summarise(args.out_dir, command)
    return 0


def run_cell(cells: common.Cells, name: str, setting: dict, model, edits, control, params: str, args, **options) -> None:
    """One configuration: the sequential run, its journal checked (surgery), the cell saved, a line printed."""
    t0 = time.perf_counter()
    rep = fe.evaluate_sequential(model, edits, control, params=params, max_steps=10,
                                 checkpoints=checkpoints(args, len(edits[1])), progress=not args.quiet, **options)
    result = {"report": rep.to_dict(), "edits_until": rep.edits_until()}
    if rep.journal is not None:
        result["journal"] = journal_check(rep, model)
    cells.save(name, setting, result, time.perf_counter() - t0)
    f = rep.final
    common.say(f"{name}: drawdown {100 * f['drawdown']:.2f}%  retention {100 * f['retention']:.1f}%  success "
               f"{100 * f['success_rate']:.1f}%  changed {f['changed_scalars']}  until {rep.edits_until()}  "
               f"({time.perf_counter() - t0:.0f} s)", args.quiet)


def _order(path: pathlib.Path) -> tuple:
    base, _, value = path.stem.partition("@")
    return (CONFIGS.index(base) if base in CONFIGS else len(CONFIGS), float(value) if value else 0.0)


def summarise(out: pathlib.Path, command: str, skip: tuple[str, ...] = (),
              title: str = "ResNet-20 layer3, CIFAR-10: sequential edits") -> None:
    """``summary.json`` and the figure from the cells of ``out`` (names starting with ``skip`` left out)."""
    rows, reports = [], {}
    for path in sorted((out / "cells").glob("*.json"), key=_order):
        if path.stem.startswith(skip):
            continue
        name, cell = path.stem, json.loads(path.read_text())
        rep = cell["report"]
        final = rep["checkpoints"][-1]
        rows.append({"config": name, "edits_until": cell["edits_until"], "final": final,
                     "journal": cell.get("journal"), "seconds": cell["cell_seconds"]})
        if "@" not in name:  # the figure: the default configurations (a sweep's curves would crowd it)
            reports[name] = _Curve(rep["checkpoints"])
    common.write_json(out / "summary.json", {"command": command, "rows": rows, "machine": common.machine_info()})
    if reports:
        from fastedit.plots import plot_sequential
        plot_sequential(reports, out / "sequential.png", title=title)


class _Curve:
    """A stored checkpoint curve, as plot_sequential reads a SequentialReport (NaN for null)."""

    def __init__(self, checkpoints: list[dict]):
        self.checkpoints = [{k: (float("nan") if v is None else v) for k, v in row.items()} for row in checkpoints]


if __name__ == "__main__":
    sys.exit(main())
