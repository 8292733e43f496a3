"""Sequential editing of the MiniLM Rotten Tomatoes classifier: 300 edits applied one after another to
one model (fastedit.evaluate_sequential), with each method and option of the CIFAR experiment.

Setting: the classifier fine-tuned by minilm_rotten_tomatoes.py (``--classifier``), editing its last
encoder layer ``bert.encoder.layer.5`` on 64-token inputs. Edits: ``--edits`` test snippets (a seeded
permutation), each edited to the opposite of the model's prediction (``--targets flip``) or, with
``--targets true``, the snippets it misclassifies fixed to their true labels; control: ``--control``
other snippets of the test and validation splits. The dense editors' learning rates are chosen by the
paper's protocol (:func:`fastedit.tune`: least drawdown with ≥ 95% success) on ``--tune-edits``
validation snippets, disjoint from the edits and the control set.

Cells: gd, rmsprop, rmsprop-recheck2, rmsprop-linf (``--linf``), ewc-rmsprop (Fisher of the classifier
on 256 training snippets, λ ``--ewc-lambda``), surgery-b1000 (≤ 1,000 scalars per edit, journal).
Writes ``<out>/cells/<config>.json``, ``<out>/summary.json`` and ``<out>/sequential.png``.

    python benchmarks/experiments/sequential_minilm.py --threads 2
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit.baselines import fisher_diagonal

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments.minilm_rotten_tomatoes import DEFAULT_SAVE, load_classifier, predict, tokenize  # noqa: E402
from benchmarks.experiments.sequential_cifar import run_cell, summarise  # noqa: E402

PARAMS = "bert.encoder.layer.5"
CONFIGS = ("gd", "rmsprop", "rmsprop-recheck2", "rmsprop-linf", "ewc-rmsprop", "surgery-b1000")
GRIDS = {"gd": [1e-2, 3e-2, 1e-1, 3e-1, 1.0], "rmsprop": [3e-6, 1e-5, 3e-5, 1e-4, 3e-4]}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--classifier", type=pathlib.Path, default=DEFAULT_SAVE)
    ap.add_argument("--data-dir", help="folder holding text/rotten_tomatoes.tsv (default: $FASTEDIT_DATA)")
    ap.add_argument("--edits", type=int, default=300)
    ap.add_argument("--control", type=int, default=1000)
    ap.add_argument("--targets", choices=("flip", "true"), default="flip")
    ap.add_argument("--tune-edits", type=int, default=20)
    ap.add_argument("--tune-control", type=int, default=200, help="validation snippets measured while tuning")
    ap.add_argument("--every", type=int, default=25, help="edits between checkpoints (and 1, 2, 5, 10, 15 before)")
    ap.add_argument("--linf", type=float, default=1e-4, help="rmsprop-linf: the L∞ radius")
    ap.add_argument("--ewc-lambda", type=float, default=1e6)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "sequential_minilm")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def rows(batch: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def load(args):
    model, tokenizer = load_classifier(args.classifier)
    data = common.data_dir(args.data_dir)
    test, val, train = (fdata.load_rotten_tomatoes(data, s, seed=0) for s in ("test", "validation", "train"))
    enc = {"test": tokenize(tokenizer, test[0], args.max_len), "val": tokenize(tokenizer, val[0], args.max_len),
           "train": tokenize(tokenizer, train[0][:256], args.max_len)}
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(test[0]), generator=gen)
    if args.targets == "flip":
        pick, rest = order[:args.edits], order[args.edits:]
        labels = 1 - predict(model, rows(enc["test"], pick))
    else:
        wrong = predict(model, rows(enc["test"], order)) != test[1][order]
        pick, rest = order[wrong][:args.edits], order[~wrong]
        labels = test[1][pick]
    edits = (rows(enc["test"], pick), labels)
    n_val_control = max(0, args.control - len(rest))
    tune_from = n_val_control  # validation snippets after those in the control set tune the editors
    control_inputs = {k: torch.cat([enc["test"][k][rest][:args.control], enc["val"][k][:n_val_control]])
                      for k in enc["test"]}
    control = (control_inputs, torch.cat([test[1][rest][:args.control], val[1][:n_val_control]]))
    tune_idx = torch.arange(tune_from, min(tune_from + args.tune_edits + args.tune_control, len(val[0])))
    tune_inputs = rows(enc["val"], tune_idx)
    tune_pred = predict(model, tune_inputs)
    k = args.tune_edits
    tuning = ((rows(tune_inputs, torch.arange(k)), 1 - tune_pred[:k]),
              (rows(tune_inputs, torch.arange(k, len(tune_idx))), val[1][tune_idx[k:]]))
    return model, edits, control, tuning, (enc["train"], train[1][:256])


def tuned(editor: str, model, tuning, cells: common.Cells, quiet: bool) -> dict:
    """The paper's protocol on the validation edits, cached as a cell."""
    name, setting = f"tuned_{editor}", {"grid": GRIDS[editor], "params": PARAMS, "max_steps": 10}
    if cells.done(name, setting):
        return cells.load(name)["chosen"]
    t0 = time.perf_counter()
    result = fe.tune(model, tuning[0], tuning[1], editor=editor, params=PARAMS, max_steps=10,
                     grid={"lr": GRIDS[editor]}, min_success=0.95, progress=not quiet)
    chosen = {k: v for k, v in result.editor.to_dict().items() if k != "editor"}
    cells.save(name, setting, {"chosen": chosen, "feasible": result.feasible, "table": result.table},
               time.perf_counter() - t0)
    return chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (machine_info records its version)
    command = common.command_line(__file__, argv)
    cells = common.Cells(args.out_dir, command)
    model, edits, control, tuning, train = load(args)
    for name in args.configs:
        editor = "gd" if name == "gd" else "rmsprop"
        opts: dict = {"method": "surgery", "budget": 1000, "editor": None} if name == "surgery-b1000" else {}
        setting = {"config": name, "edits": args.edits, "control": args.control, "targets": args.targets,
                   "every": args.every, "seed": args.seed, "params": PARAMS, "max_len": args.max_len}
        if name != "surgery-b1000":
            hp = tuned(editor, model, tuning, cells, args.quiet)
            opts["editor"] = fe.make_editor(editor, **hp)
            setting["editor"] = hp
        if name == "rmsprop-recheck2":
            opts["recheck"] = 2
        elif name == "rmsprop-linf":
            opts["trust_region"] = ("linf", args.linf)
            setting["linf"] = args.linf
        elif name == "ewc-rmsprop":
            setting["ewc_lambda"] = args.ewc_lambda
        if cells.done(name, setting):
            common.say(f"{name}: done earlier", args.quiet)
            continue
        if name == "ewc-rmsprop":  # the Fisher only for a cell still to run
            opts.update(method="ewc", fisher=fisher_diagonal(model, train, params=PARAMS), ewc_lambda=args.ewc_lambda)
        run_cell(cells, name, setting, model, edits, control, PARAMS, args, **opts)
    summarise(args.out_dir, command, skip=("tuned_",), title="MiniLM, Rotten Tomatoes: sequential edits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
