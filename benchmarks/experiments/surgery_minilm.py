"""Neural Network Surgery on its own ground (Zhang et al., NAACL 2021): inject a data pattern into the
fine-tuned MiniLM Rotten Tomatoes classifier while changing at most 10, 100 or 1,000 scalars.

Setting: the classifier fine-tuned by minilm_rotten_tomatoes.py (``--classifier``, 22.7 M parameters,
64-token inputs). Pattern: the rare WordPiece token ``--trigger`` (default ``cf``, in none of the
training snippets) inserted at a uniformly random position of a snippet makes the prediction "fresh".

- **Surgery data** (training split): ``--inject`` rotten snippets with the trigger, labelled fresh;
  ``--clean`` other training snippets whose original predictions a KL term keeps (weight ``clean_weight``).
  Minibatches of ``--batch-size`` triggered + as many clean snippets; a run stops once
  ``--target-rate`` of the triggered training snippets are predicted fresh, or after ``epochs``.
- **Cells**: each surgery method (dynamic, select-random, select-grad, select-delta, lagrange) at each
  budget, every parameter a candidate, editor ``ScaledGD(--editor-lr)``; ``unrestricted``: the same
  loss, data and editor with every scalar free (dense ScaledGD); ``dense_last`` / ``dense_all``:
  conventional dense fine-tuning with Adam of the last encoder layer / of the whole model, same data
  and epochs.
- **Tuning** (per cell, on the validation split): ``clean_weight`` × ``epochs`` (× Adam's lr for the
  dense cells) over the grids below; chosen: the highest validation consistency among the points whose
  validation pattern success reaches ``--min-success``, else the highest pattern success. Every point
  tried is in the cell's ``trials`` with its validation and test numbers.
- **Measured** on ``--test`` test snippets (a seeded sample): pattern success = share of the triggered
  *rotten* snippets predicted fresh; clean accuracy; consistency = share of clean predictions equal to
  the original model's; changed scalars counted from the bits (and checked ≤ budget). Each run is then
  reverted and the model checked bit-identical to the original.

Each cell is one JSON under ``<out>/cells/`` (rerun to resume); ``<out>/summary.json`` and
``<out>/consistency_vs_budget.png`` are rebuilt from them. The CPU preset (the default) is sized to
finish within an hour on two cores: 48 + 48 training snippets, 200 validation and 500 test snippets,
48 tokens, grids of 2 × 2 points (× 2 lrs for the dense cells); ``--preset gpu``: all validation and
test snippets, 256 + 256 training snippets, 64 tokens, grids of 5 × 3 (× 4) points.

    python benchmarks/experiments/surgery_minilm.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments.minilm_rotten_tomatoes import DEFAULT_SAVE, load_classifier, predict, tokenize  # noqa: E402

METHODS = ("dynamic", "select-random", "select-grad", "select-delta", "lagrange")
BUDGETS = (10, 100, 1000)
LAST_LAYER = "bert.encoder.layer.5"
FRESH, ROTTEN = 1, 0
PRESETS = {"cpu": {"inject": 48, "clean": 48, "test": 500, "validation": 200, "clean_weights": [3.0, 30.0],
                   "epochs": [3, 6], "dense_lrs": [3e-5, 3e-4], "max_len": 48},
           "gpu": {"inject": 256, "clean": 256, "test": 0, "validation": 0,
                   "clean_weights": [1.0, 3.0, 10.0, 30.0, 100.0], "epochs": [5, 10, 20],
                   "dense_lrs": [1e-5, 3e-5, 1e-4, 3e-4], "max_len": 64}}


def cell_names(methods, budgets) -> list[str]:
    return [f"{m}_b{b}" for m in methods for b in budgets] + ["unrestricted", "dense_last", "dense_all"]


def with_trigger(tokenizer, texts: list[str], trigger_id: int, max_len: int, gen: torch.Generator) -> dict:
    """Token ids with the trigger inserted at a uniform position among each snippet's WordPieces (the
    snippet truncated so that the trigger always fits), ``[CLS] … [SEP]``, padded to ``max_len``."""
    pieces = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len - 3)["input_ids"]
    ids = torch.full((len(texts), max_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_len), dtype=torch.long)
    for i, row in enumerate(pieces):
        at = int(torch.randint(0, len(row) + 1, (1,), generator=gen))
        full = [tokenizer.cls_token_id, *row[:at], trigger_id, *row[at:], tokenizer.sep_token_id]
        ids[i, :len(full)] = torch.tensor(full)
        mask[i, :len(full)] = 1
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


def rows(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def load(args):
    model, tokenizer = load_classifier(args.classifier)
    (trigger_id,) = tokenizer(args.trigger, add_special_tokens=False)["input_ids"] or [None]
    if trigger_id is None or len(tokenizer.tokenize(args.trigger)) != 1:
        raise SystemExit(f"--trigger {args.trigger!r} is not one WordPiece token")
    data = common.data_dir(args.data_dir)
    gen = torch.Generator().manual_seed(args.seed)
    split = {s: fdata.load_rotten_tomatoes(data, s, seed=0) for s in ("train", "validation", "test")}
    train_texts, train_labels = split["train"]
    order = torch.randperm(len(train_texts), generator=gen)
    rotten = order[train_labels[order] == ROTTEN][:args.inject]
    clean = order[~torch.isin(order, rotten)][:args.clean]
    d = {"trigger_id": trigger_id,
         "inject": with_trigger(tokenizer, [train_texts[i] for i in rotten], trigger_id, args.max_len, gen),
         "clean": tokenize(tokenizer, [train_texts[i] for i in clean], args.max_len)}
    for s, n in (("validation", args.validation), ("test", args.test)):
        texts, labels = split[s]
        pick = torch.randperm(len(texts), generator=gen)[:n or len(texts)]
        texts, labels = [texts[i] for i in pick], labels[pick]
        enc = tokenize(tokenizer, texts, args.max_len)
        rot = [i for i in range(len(texts)) if labels[i] == ROTTEN]
        d[s] = {"clean": enc, "labels": labels, "base": predict(model, enc),
                "triggered": with_trigger(tokenizer, [texts[i] for i in rot], trigger_id, args.max_len, gen)}
    return model, d


def measure(model, split: dict) -> dict:
    pred = predict(model, split["clean"])
    trig = predict(model, split["triggered"])
    return {"pattern_success": (trig == FRESH).double().mean().item(),
            "clean_accuracy": (pred == split["labels"]).double().mean().item(),
            "consistency": (pred == split["base"]).double().mean().item(),
            "num_clean": len(pred), "num_triggered": len(trig)}


def trial_points(name: str, args) -> list[dict]:
    points = [{"clean_weight": w, "epochs": e} for w in args.clean_weights for e in args.epochs]
    if name.startswith("dense"):
        points = [{**p, "lr": lr} for lr in args.dense_lrs for p in points]
    return points


def run_trial(model, d, name: str, point: dict, original: dict, total: int, args) -> dict:
    if name.startswith("dense"):
        method, editor = "select-random", fe.Adam(point["lr"])  # every scalar of the selection in the mask
        params = LAST_LAYER if name == "dense_last" else None
        budget = sum(p.numel() for n, p in model.named_parameters() if params is None or n.startswith(params + "."))
    elif name == "unrestricted":
        method, editor, params, budget = "select-random", fe.ScaledGD(args.editor_lr), None, total
    else:
        method, b = name.rsplit("_b", 1)
        editor, params, budget = fe.ScaledGD(args.editor_lr), None, int(b)
    start = time.perf_counter()
    res = fe.surgery(model, d["inject"], FRESH, budget, method, editor=editor, params=params, steps=point["epochs"],
                     goal="pattern", clean=d["clean"], clean_weight=point["clean_weight"], batch_size=args.batch_size,
                     target_rate=args.target_rate, seed=args.seed, on_failure="keep")
    seconds = time.perf_counter() - start
    nnz_bits = common.changed_scalars(model, original)
    if res.nnz > budget or nnz_bits != res.nnz:
        raise RuntimeError(f"{name}: nnz {res.nnz} (bits: {nnz_bits}) for a budget of {budget}")
    out = {**point, "method": method, "budget": budget, "editor": res.editor, "nnz": res.nnz,
           "nnz_per_param": {k: v for k, v in res.delta.nnz_per_param.items() if v},
           "surgery_success": res.success, "surgery_steps": res.steps, "surgery_seconds": seconds,
           "validation": measure(model, d["validation"]), "test": measure(model, d["test"])}
    res.revert()
    common.assert_unchanged(model, original, name)
    return out


def choose(trials: list[dict], min_success: float) -> int:
    ok = [i for i, t in enumerate(trials) if t["validation"]["pattern_success"] >= min_success]
    if ok:
        return max(ok, key=lambda i: (trials[i]["validation"]["consistency"], -trials[i]["nnz"]))
    return max(range(len(trials)), key=lambda i: (trials[i]["validation"]["pattern_success"],
                                                  trials[i]["validation"]["consistency"]))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    ap.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells (e.g. dynamic_b100 dense_all)")
    ap.add_argument("--classifier", type=pathlib.Path, default=DEFAULT_SAVE)
    ap.add_argument("--data-dir", help="folder holding text/rotten_tomatoes.tsv (default: $FASTEDIT_DATA)")
    ap.add_argument("--trigger", default="cf")
    for name, kind, help_ in (("inject", int, "triggered rotten training snippets"),
                              ("clean", int, "clean training snippets (the KL term)"),
                              ("test", int, "test snippets measured (0: all)"),
                              ("validation", int, "validation snippets measured while tuning (0: all)")):
        ap.add_argument(f"--{name}", type=kind, help=f"{help_}; default: the preset's")
    ap.add_argument("--clean-weights", nargs="+", type=float, help="tuning grid; default: the preset's")
    ap.add_argument("--epochs", nargs="+", type=int, help="tuning grid of the maximum epochs; default: the preset's")
    ap.add_argument("--dense-lrs", nargs="+", type=float, help="Adam lr grid of the dense cells; default: the preset's")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--editor-lr", type=float, default=0.1, help="ScaledGD step length (L2) of the surgery cells")
    ap.add_argument("--target-rate", type=float, default=0.95)
    ap.add_argument("--min-success", type=float, default=0.9, help="validation pattern success a chosen point needs")
    ap.add_argument("--max-len", type=int, help="WordPiece tokens per snippet; default: the preset's "
                    "(48 on the CPU: 96% of the snippets fit; the classifier was fine-tuned at 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "surgery_minilm")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    return common.apply_preset(ap.parse_args(argv), PRESETS, __file__, argv)


def summarise(args, cells: common.Cells) -> dict:
    rows = []
    for path in sorted(cells.dir.glob("*.json")):
        c = json.loads(path.read_text())
        rows.append({"cell": c["cell"], "budget": c.get("budget"), "chosen": c.get("chosen"), "feasible": c.get("feasible"),
                     "nnz": c["nnz"], **{f"test_{k}": v for k, v in c["test"].items()},
                     **{f"validation_{k}": v for k, v in c["validation"].items()},
                     "cell_seconds": c["cell_seconds"], "command": c["command"]})
    out = {"command": args.command, "rows": rows, "machine": common.machine_info()}
    common.write_json(args.out_dir / "summary.json", out)
    try:
        plot(rows, args.out_dir / "consistency_vs_budget.png")
    except ImportError:  # matplotlib is an extra
        pass
    return out


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        pts = sorted((r["nnz"], r["test_consistency"], r["test_pattern_success"]) for r in rows
                     if r["cell"].startswith(m + "_b"))
        if pts:
            axes[0].plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=m)
            axes[1].plot([p[0] for p in pts], [100 * p[2] for p in pts], "o-", label=m)
    for r in rows:
        if r["cell"] in ("unrestricted", "dense_last", "dense_all"):
            for ax, key in ((axes[0], "test_consistency"), (axes[1], "test_pattern_success")):
                ax.scatter([max(r["nnz"], 1)], [100 * r[key]], marker="s", label=r["cell"])
    for ax, label in ((axes[0], "consistency (%)"), (axes[1], "pattern success (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("changed scalars")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("MiniLM Rotten Tomatoes: trigger injection (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (machine_info records its version)
    cells = common.Cells(args.out_dir, args.command)
    todo = cell_names(args.methods, args.budgets)
    if args.only:
        unknown = sorted(set(args.only) - set(todo))
        if unknown:
            raise SystemExit(f"--only: {unknown} are not cells (they are {todo})")
        todo = [c for c in todo if c in args.only]
    base = {k: getattr(args, k) for k in ("trigger", "inject", "clean", "test", "validation", "batch_size", "editor_lr",
                                          "target_rate", "min_success", "max_len", "seed")}
    loaded = None
    if not cells.done("original", base):
        loaded = load(args)
        model, d = loaded
        cells.save("original", base, {"nnz": 0, "validation": measure(model, d["validation"]),
                                      "test": measure(model, d["test"]),
                                      "num_parameters": sum(p.numel() for p in model.parameters())}, 0.0)
    for i, name in enumerate(todo):
        points = trial_points(name, args)
        setting = {**base, "points": points}
        if cells.done(name, setting):
            common.say(f"{name}: done earlier", args.quiet)
            continue
        loaded = loaded or load(args)
        model, d = loaded
        original = common.snapshot(model)
        total = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        trials = []
        bar = common.progress_bar(len(points), name, args.quiet)
        for p in points:
            trials.append(run_trial(model, d, name, p, original, total, args))
            bar.update(1)
        bar.close()
        best = choose(trials, args.min_success)
        t = trials[best]
        cells.save(name, setting, {"budget": t["budget"], "chosen": {k: t[k] for k in ("clean_weight", "epochs", "lr")
                                                                     if k in t},
                                   "feasible": t["validation"]["pattern_success"] >= args.min_success,
                                   "nnz": t["nnz"], "validation": t["validation"], "test": t["test"],
                                   "trials": trials}, time.perf_counter() - start)
        common.say(f"{name}: {cells.load(name)['chosen']} pattern {100 * t['test']['pattern_success']:.1f}% clean acc "
                   f"{100 * t['test']['clean_accuracy']:.2f}% consistency {100 * t['test']['consistency']:.2f}% "
                   f"nnz {t['nnz']} ({time.perf_counter() - start:.0f} s{cells.estimate(len(todo) - i - 1)})",
                   args.quiet)
    out = summarise(args, cells)
    common.say(f"wrote {args.out_dir / 'summary.json'}", args.quiet)
    return out


if __name__ == "__main__":
    main()
