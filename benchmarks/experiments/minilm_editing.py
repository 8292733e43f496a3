"""Table 1 of Editable Neural Networks (Sinitsin et al. 2020) on a transformer: the six editors, tuned,
on the fine-tuned MiniLM Rotten Tomatoes classifier.

Setting: the classifier fine-tuned by minilm_rotten_tomatoes.py (``--classifier``) on 64-token inputs,
editing its last encoder layer (``last``: ``bert.encoder.layer.5``) or its last two (``last2``: layers 4
and 5; the classifier head is not edited).

- **Edits**: ``--edits`` test snippets (a seeded permutation), each edited to the class the model does
  not predict (a flip, so every edit changes a prediction).
- **Control**: ``--control`` other test snippets, with their true labels.
- **Tuning**: every editor is tuned by :func:`fastedit.tune` (least drawdown with ≥ 95% success within
  ``--max-steps``) on ``--tune-edits`` flips of validation snippets against ``--tune-control`` other
  validation snippets, over lr on a ×√10 grid of 7 points placed per editor (``GRIDS``; RMSProp also
  beta in {0.5, 0.9}). A choice at the edge of its grid is flagged.

Each (part, editor) cell is one JSON under ``<out>/cells/`` (rerun to resume); ``<out>/tables.json``
gathers them and ``<out>/editor_comparison_<part>.png`` draws them. The CPU preset (the default:
150 edits, 300 control snippets, 48 tokens, tuning on 16 edits against 100 snippets) fits an hour on
one of two cores; ``--preset gpu``: 1,000 edits, 1,000 control snippets, 64 tokens, tuning on 50
edits against 500 snippets.

    python benchmarks/experiments/minilm_editing.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from types import SimpleNamespace

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit.demo import EDITOR_LABELS, EDITOR_ORDER

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments.minilm_rotten_tomatoes import DEFAULT_SAVE, load_classifier, predict, tokenize  # noqa: E402

PARTS = {"last": ["bert.encoder.layer.5"], "last2": ["bert.encoder.layer.4", "bert.encoder.layer.5"]}


def _grid(low: float) -> list[float]:
    return [low * 10.0 ** (i / 2) for i in range(7)]  # low … 1000·low, factor √10


GRIDS = {"gd": _grid(1e-3), "scaled_gd": _grid(1e-2), "rprop": _grid(1e-6), "rmsprop": _grid(1e-6),
         "momentum": _grid(1e-4), "adam": _grid(1e-6)}
# The CPU preset fits an hour on one core of two: each edit's control pass runs one or two encoder
# layers over every control snippet (≈ 0.9 s per 256 snippets and layer at 48 tokens).
PRESETS = {"cpu": {"edits": 150, "control": 300, "tune_edits": 16, "tune_control": 100, "max_len": 48},
           "gpu": {"edits": 1000, "control": 1000, "tune_edits": 50, "tune_control": 500, "max_len": 64}}


def grid_for(editor: str) -> dict:
    grid = {"lr": GRIDS[editor]}
    if editor == "rmsprop":
        grid["beta"] = [0.5, 0.9]
    return grid


def rows(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def load(args):
    """The classifier, the reported edits and control, and the tuning edits and control."""
    model, tokenizer = load_classifier(args.classifier)
    data = common.data_dir(args.data_dir)
    test, val = (fdata.load_rotten_tomatoes(data, s, seed=0) for s in ("test", "validation"))
    sets = {}
    for name, (texts, labels), n_edits, n_control in (("test", test, args.edits, args.control),
                                                      ("validation", val, args.tune_edits, args.tune_control)):
        if n_edits + n_control > len(texts):
            raise SystemExit(f"{name}: {n_edits} edits + {n_control} control > {len(texts)} snippets")
        enc = tokenize(tokenizer, texts, args.max_len)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed))
        pick, rest = order[:n_edits], order[n_edits:n_edits + n_control]
        edit_inputs = rows(enc, pick)
        sets[name] = ((edit_inputs, 1 - predict(model, edit_inputs)), (rows(enc, rest), labels[rest]))
    return model, sets


def run_cell(model, sets, part: str, editor: str, args) -> dict:
    params = PARTS[part]
    start = time.perf_counter()
    tuned = fe.tune(model, *sets["validation"], editor=editor, params=params, max_steps=args.max_steps,
                    grid=grid_for(editor), min_success=0.95, progress=not args.quiet)
    tune_seconds = time.perf_counter() - start
    report = fe.evaluate(model, *sets["test"], editor=tuned.editor, params=params, max_steps=args.max_steps,
                         progress=not args.quiet)
    return {"chosen": tuned.editor.to_dict(), "feasible": tuned.feasible,
            "chosen_at_grid_edge": common.grid_edge(float(tuned.editor.lr), GRIDS[editor]),
            "tune_table": tuned.table, "tune_seconds": tune_seconds, "report": report.to_dict()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="sizes (see above)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--editors", nargs="+", default=list(EDITOR_ORDER), choices=list(EDITOR_ORDER))
    ap.add_argument("--classifier", type=pathlib.Path, default=DEFAULT_SAVE)
    ap.add_argument("--data-dir", help="folder holding text/rotten_tomatoes.tsv (default: $FASTEDIT_DATA)")
    ap.add_argument("--edits", type=int, help="reported edits (test snippets)")
    ap.add_argument("--control", type=int, help="control snippets (test split)")
    ap.add_argument("--tune-edits", type=int, help="tuning edits (validation snippets)")
    ap.add_argument("--tune-control", type=int, help="validation snippets measured while tuning")
    ap.add_argument("--max-len", type=int, help="WordPiece tokens per snippet (the classifier was fine-tuned at 64)")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "minilm_editing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    return common.apply_preset(ap.parse_args(argv), PRESETS, __file__, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (machine_info records its version)
    cells = common.Cells(args.out_dir, args.command)
    todo = [(p, e) for p in args.parts for e in args.editors]
    setting_of = lambda c: {"part": c[0], "editor": c[1], "edits": args.edits, "control": args.control,  # noqa: E731
                            "tune_edits": args.tune_edits, "tune_control": args.tune_control,
                            "max_steps": args.max_steps, "max_len": args.max_len, "seed": args.seed,
                            "grid": grid_for(c[1])}
    loaded = None
    for i, cell in enumerate(todo):
        name = "_".join(cell)
        if cells.done(name, setting_of(cell)):
            common.say(f"{name}: done earlier", args.quiet)
            continue
        loaded = loaded or load(args)
        start = time.perf_counter()
        result = run_cell(*loaded, *cell, args)
        cells.save(name, setting_of(cell), result, time.perf_counter() - start)
        r = result["report"]
        common.say(f"{name}: {result['chosen']} drawdown {100 * r['drawdown']:.2f}% success "
                   f"{100 * r['success_rate']:.1f}% steps {r['mean_steps']:.2f} flips {100 * r['flip_rate']:.2f}% "
                   f"({time.perf_counter() - start:.0f} s{cells.estimate(len(todo) - i - 1)})", args.quiet)
    table = []
    for path in sorted(cells.dir.glob("*.json")):
        cell = json.loads(path.read_text())
        r = cell["report"]
        table.append({"part": cell["setting"]["part"], "editor": cell["setting"]["editor"], "chosen": cell["chosen"],
                      "feasible": cell["feasible"], "chosen_at_grid_edge": cell["chosen_at_grid_edge"],
                      **{k: r[k] for k in ("base_error", "drawdown", "success_rate", "mean_steps", "flip_rate",
                                           "mean_kl", "num_edits", "num_control")},
                      "eval_seconds": r["seconds"], "tune_seconds": cell["tune_seconds"],
                      "cell_seconds": cell["cell_seconds"], "command": cell["command"]})
    table.sort(key=lambda r: (list(PARTS).index(r["part"]), EDITOR_ORDER.index(r["editor"])))
    out = {"command": args.command, "protocol": {
        "edits": args.edits, "control": args.control, "tune_edits": args.tune_edits, "tune_control": args.tune_control,
        "max_steps": args.max_steps, "max_len": args.max_len, "seed": args.seed, "grids": GRIDS,
        "rmsprop_beta_grid": [0.5, 0.9], "min_success": 0.95, "parts": PARTS,
        "edits_from": "test snippets (seeded permutation), target = the class the model does not predict",
        "control_from": "other test snippets, true labels"}, "rows": table, "machine": common.machine_info()}
    common.write_json(args.out_dir / "tables.json", out)
    from fastedit import plots
    for part in PARTS:
        reports = {EDITOR_LABELS[r["editor"]]: SimpleNamespace(**r) for e in EDITOR_ORDER for r in table
                   if r["part"] == part and r["editor"] == e}
        if reports:
            plots.plot_editor_comparison(reports, args.out_dir / f"editor_comparison_{part}.png",
                                         title=f"MiniLM Rotten Tomatoes, editing {'+'.join(PARTS[part])} (tuned)")
    common.say(f"wrote {args.out_dir / 'tables.json'}", args.quiet)
    return out


if __name__ == "__main__":
    main()
