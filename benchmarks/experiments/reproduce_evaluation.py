"""Reproduce the editor comparison of Editable Neural Networks (Sinitsin et al. 2020, Tables 1-2)
on the pretrained CIFAR-10 ResNets, with fastedit's evaluation protocol.

Table 1: the six editors on ResNet-20 and ResNet-56 editing the last stage (``layer3``).
Table 2: GD and RMSProp editing each stage (``layer1``, ``layer2``, ``layer3``) and the whole model.

Protocol (docs/design.md):
- reported edits: ``--edits`` of the 1,017 exact CIFAR-10 test images (a seeded permutation), each with
  a label drawn uniformly from the 10 classes (seeded); control set: all 1,017 exact test images;
- every editor is tuned by :func:`fastedit.tune` on a disjoint tuning split (``--tune-edits`` exact
  *training* images with random labels): least drawdown subject to ≥ 95% success within k steps,
  over ``lr`` (×√10 grid) and, for RMSProp, ``beta ∈ {0.5, 0.9}``;
- the tuned editor is then evaluated on the reported edits (``fastedit.evaluate``).

Each (model, stage, editor) cell is written to ``<out-dir>/cells/`` as soon as it is done, so the
script is resumable: run it again and finished cells are read back. Then the tables are assembled
into ``<out-dir>/tables.json`` and the figures drawn (per-class drawdown heatmap, t-SNE of edits,
editor comparison bars) from the ResNet-20 / layer3 cells.

    python benchmarks/experiments/reproduce_evaluation.py --table 1 --models resnet20 resnet56
    python benchmarks/experiments/reproduce_evaluation.py --table 2 --models resnet20 --edits 200 --tune-edits 30
    python benchmarks/experiments/reproduce_evaluation.py --table 1 --refine --out-dir benchmarks/results/evaluation_refined
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit.demo import EDITOR_ORDER
from fastedit.models import load_pretrained_cifar_resnet

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

LRS = [10.0 ** (-5 + i / 2) for i in range(9)]         # 1e-5 … 1e-1, factor √10
SCALED_GD_LRS = [10.0 ** (-3 + i / 2) for i in range(9)]  # an L2 step length: 1e-3 … 10
STAGES = ("layer1", "layer2", "layer3", "all")


def grid_for(editor: str) -> dict:
    grid = {"lr": SCALED_GD_LRS if editor == "scaled_gd" else LRS}
    if editor == "rmsprop":
        grid["beta"] = [0.5, 0.9]
    return grid


def load_setting(model_name: str, models: pathlib.Path, data: pathlib.Path, edits: int, tune_edits: int, seed: int):
    weights = sorted(models.glob(f"{model_name}-*.th"))
    if not weights:
        raise SystemExit(f"no weights for {model_name} in {models}")
    model = load_pretrained_cifar_resnet(weights[0])
    npz = data / "cifar10" / "cifar10_lossless_subset.npz"
    norm = lambda x: fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)  # noqa: E731
    xtr, _ = fdata.load_cifar10_lossless(npz, "train")
    xte, yte = fdata.load_cifar10_lossless(npz, "test")
    xtr, xte = norm(xtr), norm(xte)
    # separate generators: the first n reported edits are the same for every --edits ≥ n, and the
    # tuning split does not depend on --edits
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(xte.shape[0], generator=gen)
    labels = torch.randint(0, 10, (xte.shape[0],), generator=gen)
    pick = order[:edits]
    report_edits = (xte[pick], labels[:edits])
    gen_tune = torch.Generator().manual_seed(seed + 1)
    tune_pick = torch.randperm(xtr.shape[0], generator=gen_tune)[:tune_edits]
    tuning_edits = (xtr[tune_pick], torch.randint(0, 10, (tune_edits,), generator=gen_tune))
    return model, report_edits, yte[pick], tuning_edits, (xte, yte)


def chosen_edge(lr: float, grid: list[float], lr_resolution: float | None) -> str | None:
    """Whether the choice may lie beyond the search: the grid's edge, or after a refinement (which
    steps past the grid) a choice still at the edge of the points tried (``lr_resolution`` inf)."""
    if lr_resolution is None:
        return common.grid_edge(lr, grid)
    return None if math.isfinite(lr_resolution) else "low" if lr <= grid[0] else "high"


def run_cell(path: pathlib.Path, model, stage: str, editor: str, report_edits, edit_classes, tuning_edits,
             control, args, keep_kl: bool) -> dict:
    params = None if stage == "all" else stage
    start = time.perf_counter()
    tuned = fe.tune(model, tuning_edits, control, editor=editor, params=params, max_steps=args.max_steps,
                    grid=grid_for(editor), refine=args.refine, min_success=0.95, progress=not args.quiet)
    tune_seconds = time.perf_counter() - start
    report = fe.evaluate(model, report_edits, control, editor=tuned.editor, params=params,
                         max_steps=args.max_steps, edit_labels=edit_classes, keep_kl_vectors=keep_kl,
                         progress=not args.quiet)
    cell = {"command": args.command,
            "stage": stage, "editor": editor, "chosen": tuned.editor.to_dict(), "feasible": tuned.feasible,
            "chosen_at_grid_edge": chosen_edge(float(tuned.editor.lr), grid_for(editor)["lr"], tuned.lr_resolution),
            "refined": args.refine, "lr_resolution": tuned.lr_resolution,
            "tune_table": tuned.table,
            "tune_seconds": tune_seconds, "report": report.to_dict()}
    common.write_json(path, cell)
    if keep_kl:  # the figures' data; KL vectors in float16 keep the file small (E × N values)
        torch.save({"per_class_drawdown": report.per_class_drawdown, "edit_class": report.per_edit["edit_class"],
                    "kl_vector": report.per_edit["kl_vector"].half()}, path.with_suffix(".figure.pt"))
    return cell


def assemble(out_dir: pathlib.Path, cells: dict, meta: dict) -> dict:
    rows = []
    for (model_name, stage, editor), cell in sorted(cells.items()):
        r = cell["report"]
        rows.append({"model": model_name, "stage": stage, "editor": editor, "chosen": cell["chosen"],
                     "feasible": cell["feasible"], "chosen_at_grid_edge": cell["chosen_at_grid_edge"],
                     "lr_resolution": cell.get("lr_resolution"),
                     "base_error": r["base_error"], "drawdown": r["drawdown"], "success_rate": r["success_rate"],
                     "mean_steps": r["mean_steps"], "flip_rate": r["flip_rate"], "mean_kl": r["mean_kl"],
                     "num_edits": r["num_edits"], "eval_seconds": r["seconds"],
                     "tune_seconds": cell["tune_seconds"], "command": cell.get("command")})
    out = {**meta, "rows": rows}
    common.write_json(out_dir / "tables.json", out)
    return out


def draw_figures(out_dir: pathlib.Path, cells: dict) -> None:
    """Figures from the stored cells (so a resumed run draws them too)."""
    from types import SimpleNamespace

    from fastedit import plots
    classes = fdata.CIFAR10_CLASSES
    for model_name in sorted({m for m, _, _ in cells}):
        layer3 = {e: SimpleNamespace(**cells[(model_name, "layer3", e)]["report"]) for e in EDITOR_ORDER
                  if (model_name, "layer3", e) in cells}
        if layer3:
            plots.plot_editor_comparison(layer3, out_dir / f"editor_comparison_{model_name}.png",
                                         title=f"{model_name}, editing layer3 (tuned editors)")
    figure_data = out_dir / "cells" / "resnet20_layer3_rmsprop.figure.pt"
    if figure_data.exists():
        data = torch.load(figure_data)
        report = SimpleNamespace(per_class_drawdown=data["per_class_drawdown"], num_classes=len(classes),
                                 per_edit={"kl_vector": data["kl_vector"].float(), "edit_class": data["edit_class"]})
        plots.plot_per_class_drawdown(report, out_dir / "per_class_drawdown_resnet20_rmsprop.png", classes,
                                      title="ResNet-20, RMSProp on layer3: drawdown (%) by class")
        plots.plot_edit_tsne(report, out_dir / "tsne_edits_resnet20_rmsprop.png", classes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--table", choices=["1", "2", "all"], default="1")
    ap.add_argument("--models", nargs="+", default=["resnet20"], choices=["resnet20", "resnet32", "resnet44", "resnet56"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES), help="Table 2 stages")
    ap.add_argument("--editors", nargs="+", default=list(EDITOR_ORDER), help="Table 1 editors")
    ap.add_argument("--edits", type=int, default=1000, help="reported edits (test images, random labels)")
    ap.add_argument("--tune-edits", type=int, default=50, help="tuning edits (training images, random labels)")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--models-dir", help="folder holding the resnet*.th checkpoints (default: $FASTEDIT_MODELS)")
    ap.add_argument("--data-dir", help="folder holding cifar10/ (default: $FASTEDIT_DATA)")
    ap.add_argument("--out-dir", default=str(common.RESULTS / "evaluation"))
    ap.add_argument("--refine", action="store_true", help="refine each tuned lr (per beta) to ×1.2 after the "
                    "×√10 grid (fe.tune's bracketing search); cells go to <out-dir>/cells as usual, so use a new --out-dir")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    args.command = common.command_line(__file__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = pathlib.Path(args.out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)

    todo = []  # (model, stage, editor)
    for m in args.models:
        if args.table in ("1", "all"):
            todo += [(m, "layer3", e) for e in args.editors]
        if args.table in ("2", "all"):
            todo += [(m, s, e) for s in args.stages for e in ("gd", "rmsprop") if (m, s, e) not in todo]
    cells: dict = {}
    for path in (out_dir / "cells").glob("*.json"):  # earlier runs, also of other tables
        cell = json.loads(path.read_text())
        cells[(path.stem.split("_")[0], cell["stage"], cell["editor"])] = cell
    loaded = {}
    for key in todo:
        model_name, stage, editor = key
        path = out_dir / "cells" / f"{model_name}_{stage}_{editor}.json"
        if key in cells and cells[key]["report"]["num_edits"] >= args.edits:  # same seed: a superset
            print(f"{path.name}: done earlier", flush=True)
            continue
        if model_name not in loaded:
            loaded = {model_name: load_setting(model_name, common.models_dir(args.models_dir),
                                               common.data_dir(args.data_dir), args.edits, args.tune_edits, args.seed)}
        model, report_edits, edit_classes, tuning_edits, control = loaded[model_name]
        keep_kl = (model_name, stage, editor) == ("resnet20", "layer3", "rmsprop")
        cell = run_cell(path, model, stage, editor, report_edits, edit_classes, tuning_edits, control, args, keep_kl)
        cells[key] = cell
        r = cell["report"]
        print(f"{model_name} {stage:<6} {editor:<9} {cell['chosen']} drawdown={100 * r['drawdown']:.2f}% "
              f"success={100 * r['success_rate']:.1f}% steps={r['mean_steps']:.2f} "
              f"flips={100 * r['flip_rate']:.2f}% ({r['seconds']:.0f} s)", flush=True)

    meta = {"command": args.command,
            "protocol": {"edits": args.edits, "tune_edits": args.tune_edits, "max_steps": args.max_steps,
                         "seed": args.seed, "lr_grid": LRS, "refined": args.refine, "scaled_gd_lr_grid": SCALED_GD_LRS,
                         "rmsprop_beta_grid": [0.5, 0.9], "min_success": 0.95,
                         "edits_from": "exact CIFAR-10 test images (seeded permutation), uniform random labels",
                         "tuning_edits_from": "exact CIFAR-10 training images, uniform random labels",
                         "control": "all 1,017 exact CIFAR-10 test images"},
            "machine": common.machine_info()}
    assemble(out_dir, cells, meta)
    draw_figures(out_dir, cells)
    print(f"wrote {out_dir / 'tables.json'}")


if __name__ == "__main__":
    main()
