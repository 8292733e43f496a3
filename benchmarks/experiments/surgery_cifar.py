"""Neural Network Surgery on CIFAR-10 (Zhang et al., NAACL 2021) with the pretrained ResNet-20 and
the exact CIFAR-10 pixels (the lossless subset: 8,068 training and the first 1,017 test images).

Part A, pattern injection (``--part pattern``)
    A trigger (default: a ``--trigger-size`` = 3 square patch of value ``--trigger-value`` = 255, in
    the bottom-right corner; ``--trigger-shape frame``: a border of that width around the image;
    written into the uint8 pixels before normalisation) should make the model predict class
    ``--target`` (0, airplane). Surgery set: ``--inject`` training images whose class is not the
    target, with the trigger, labelled ``--target``; clean term: ``--clean`` other (clean) training
    images whose original predictions are kept by a KL term (``fastedit.surgery``'s ``clean=``).
    For every method × budget, ``fastedit.surgery(goal="pattern", params=None)`` (all parameters are
    candidates) runs ``--epochs`` epochs of minibatches of ``--batch-size`` with ``ScaledGD(--editor-lr)``
    and ``target_rate=--target-rate``; a surgery that does not reach the rate is *kept* (measured as
    it is). "unrestricted" is the same call with a budget of every scalar (every coordinate free:
    dense ScaledGD on the same loss, same minibatches, same number of steps), the reference for
    what the sparsity costs. Measured on the 1,017 test images: pattern success (share of the
    triggered test images of true class ≠ target predicted as the target), clean accuracy,
    consistency (share of clean test predictions equal to the original model's), the number of
    scalars changed (counted from the bits, and checked ≤ budget) and the wall time. Then the
    surgery is reverted and the model checked bit-identical to the original (every parameter and
    buffer). The original model's numbers are the cell ``pattern_original``.

Part B, classification edits (``--part edits``)
    ``--edits`` of the 1,017 test images (a seeded permutation) each with a uniformly random label
    (the same edits as ``benchmarks/experiments/reproduce_evaluation.py`` with the same seed), each applied
    independently to the original model; control set: all 1,017 test images. Per method: base error,
    drawdown (mean increase of the control error), success rate, mean steps, flip rate (share of
    control predictions changed), nnz (scalars changed per edit) and seconds per edit.

    - ``gd``, ``rmsprop``: dense editors on ``layer3`` (``fastedit.evaluate``, k = ``--max-steps``),
      the lr tuned by ``fastedit.tune`` (``--tune-edits`` training images with random labels, control
      = the test images, lr grid 1e-5…1e-1 ×√10, least drawdown with ≥ 95% success; RMSProp with
      beta = 0.5, the official default); ``--gd-lr`` / ``--rmsprop-lr`` skip the tuning. fastedit.evaluate
      does not keep the edited parameters, so nnz is counted on the first ``--nnz-edits`` edits with
      ``fastedit.edit``.
    - ``surgery-<method>`` at each ``--surgery-budgets``: ``fastedit.surgery(goal="edit",
      params="layer3", steps=--surgery-steps)`` per edit (a failed surgery is kept and measured),
      control predictions, ``revert()``.
    - ``ewc-gd``, ``ewc-rmsprop`` at each λ of ``--ewc-lambdas-gd`` / ``--ewc-lambdas-rmsprop``:
      ``fastedit.baselines.ewc_edit`` with the tuned dense editors and the diagonal (empirical) Fisher
      of ``layer3`` on the training images (computed once, cached in ``<out-dir>/fisher_layer3.pt``).
      An edit whose loss or gradient becomes non-finite (GD diverging on the stiff penalty) leaves the
      model unchanged; it counts as a failure and in ``diverged``.
    - ``dknn``: Deep k-NN over ``--dknn-layers`` of the training images (k = ``--dknn-k``), edited by
      relabelling neighbours; its base error is the DkNN's, not the network's.
    - ``cnp``: Editable+CNP: a ``ConditionEncoder`` on ``--cnp-chain`` (default ``layer2``: a condition
      added to ``layer3``, ResNet-20's last stage, reaches the logits linearly, as the same logit shift
      for every input) trained by ``train_cnp`` for ``--cnp-steps`` steps on the training images with
      the network frozen (so the base error is the network's), then ``cnp_evaluate``.

Every (part, method, budget/λ) cell is written to ``<out-dir>/cells/<name>.json`` (with the exact
command, its setting and the machine) as soon as it is done; run the same command again and finished
cells are read back (a cell whose setting differs from the current arguments stops the run: use
another ``--out-dir``). Then ``<out-dir>/summary_<part>.json`` / ``.csv`` and the figures
(``consistency_vs_budget.png``, ``edits_drawdown_flips.png``) are rebuilt from all cells;
``--summary-only`` does only that.

Run time with the defaults on ONE CPU core (measured on a shared 2-core machine): part A ≈ 11 min
(21 cells of ≈ 25-30 s, lagrange ≈ 50 s), part B ≈ 18 min (tuning 2 × 80 s, ≈ 0.25-0.3 s per edit and
method incl. the control pass, CNP training ≈ 100 s).

    python benchmarks/experiments/surgery_cifar.py --part pattern --threads 1
    python benchmarks/experiments/surgery_cifar.py --part edits --threads 1
    python benchmarks/experiments/surgery_cifar.py --part all --summary-only
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import statistics
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit._core import EditTarget, eval_mode
from fastedit.models import load_pretrained_cifar_resnet

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.common import Cells, assert_unchanged, changed_scalars, snapshot, write_json  # noqa: E402

SURGERY_METHODS = ("select-random", "select-grad", "select-delta", "lagrange", "dynamic")
LRS = [10.0 ** (-5 + i / 2) for i in range(9)]  # 1e-5 … 1e-1, factor √10 (as reproduce_evaluation.py)
PARTS = ("pattern", "edits")


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(doc[1:]))
    g = ap.add_argument_group("common")
    g.add_argument("--part", choices=[*PARTS, "all"], default="all", help="which experiment (default: both)")
    g.add_argument("--weights", type=pathlib.Path, default=None,
                   help="ResNet-20 weights (default: $FASTEDIT_MODELS/resnet20-*.th)")
    g.add_argument("--data", type=pathlib.Path, default=None,
                   help="lossless CIFAR-10 npz (default: $FASTEDIT_DATA/cifar10/cifar10_lossless_subset.npz)")
    g.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "surgery_cifar")
    g.add_argument("--seed", type=int, default=0, help="seeds the image choice, edit labels and surgery")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--summary-only", action="store_true", help="only rebuild tables and figures from the cells")
    g.add_argument("--max-new-cells", type=int, default=None,
                   help="stop after computing this many cells (timing probes; run again to continue)")

    a = ap.add_argument_group("part A: pattern injection")
    a.add_argument("--methods", nargs="+", choices=SURGERY_METHODS, default=list(SURGERY_METHODS))
    a.add_argument("--budgets", nargs="+", type=int, default=[10, 100, 1000, 10000],
                   help="scalars the surgery may change")
    a.add_argument("--no-unrestricted", action="store_true", help="skip the unrestricted (dense) reference run")
    a.add_argument("--inject", type=int, default=256, help="triggered training images (true class ≠ target)")
    a.add_argument("--clean", type=int, default=256, help="clean training images of the KL term")
    a.add_argument("--clean-weight", type=float, default=1.0, help="weight of the KL term")
    a.add_argument("--epochs", type=int, default=20, help="surgery units (epochs over the triggered images)")
    a.add_argument("--batch-size", type=int, default=64, help="triggered images per step (plus as many clean)")
    a.add_argument("--editor-lr", type=float, default=0.1, help="ScaledGD step length (L2) of the surgery")
    a.add_argument("--target-rate", type=float, default=1.0,
                   help="stop once this share of the triggered training images is predicted as the target")
    a.add_argument("--target", type=int, default=0, help="target class (0: airplane)")
    a.add_argument("--trigger-shape", choices=["square", "frame"], default="square",
                   help="square: a patch in the bottom-right corner; frame: a border around the image")
    a.add_argument("--trigger-size", type=int, default=3,
                   help="side of the square patch / width of the frame (pixels)")
    a.add_argument("--trigger-value", type=int, default=255, help="uint8 value of the patch (255: white)")

    b = ap.add_argument_group("part B: classification edits")
    b.add_argument("--edits", type=int, default=200, help="reported edits (test images, random labels)")
    b.add_argument("--max-steps", type=int, default=10, help="k, steps of the dense (and EWC) editors")
    b.add_argument("--tune-edits", type=int, default=50, help="tuning edits (training images, random labels)")
    b.add_argument("--lr-grid", type=float, nargs="+", default=LRS, help="lr grid of fastedit.tune")
    b.add_argument("--gd-lr", type=float, default=None, help="GD lr (skips tuning GD)")
    b.add_argument("--rmsprop-lr", type=float, default=None, help="RMSProp lr, beta 0.5 (skips tuning RMSProp)")
    b.add_argument("--nnz-edits", type=int, default=10, help="edits on which the dense editors' nnz is counted")
    b.add_argument("--edit-methods", nargs="+", default=["gd", "rmsprop", "surgery", "ewc", "dknn", "cnp"],
                   choices=["gd", "rmsprop", "surgery", "ewc", "dknn", "cnp"], help="methods of part B")
    b.add_argument("--surgery-methods", nargs="+", choices=SURGERY_METHODS, default=["dynamic", "select-grad"])
    b.add_argument("--surgery-budgets", nargs="+", type=int, default=[10, 100, 1000])
    b.add_argument("--surgery-steps", type=int, default=100, help="surgery units (editor steps) per edit")
    b.add_argument("--ewc-lambdas-gd", type=float, nargs="+", default=[1e4, 3e4, 1e5],
                   help="EWC weights λ with GD: the Fisher of layer3 has mean ≈ 2e-4 and max ≈ 0.08, so GD "
                        "(lr ≈ 3e-4) stays stable on every coordinate only for λ < 1/(lr·max F) ≈ 4e4")
    b.add_argument("--ewc-lambdas-rmsprop", type=float, nargs="+", default=[1e5, 1e6, 3e6],
                   help="EWC weights λ with RMSProp (normalised steps: no such limit; λ ≈ 1e6 halves drawdown "
                        "in a probe, 1e7 makes most edits fail)")
    b.add_argument("--fisher-samples", type=int, default=None, help="training images for the Fisher (default all)")
    b.add_argument("--dknn-layers", nargs="+", default=["layer2", "layer3", "avgpool"],
                   help="embedding layers (flattened; layer1 would need ~530 MB for the training set)")
    b.add_argument("--dknn-k", type=int, default=75, help="neighbours per layer")
    b.add_argument("--cnp-chain", default="layer2",
                   help="chain whose output gets the condition (layer3 is ResNet-20's last stage: a condition "
                        "there is a constant logit shift for every input)")
    b.add_argument("--cnp-steps", type=int, default=1000, help="encoder training steps")
    b.add_argument("--cnp-batch-size", type=int, default=64, help="locality batch of the encoder training")
    b.add_argument("--cnp-lr", type=float, default=1e-3, help="Adam lr of the encoder")
    b.add_argument("--cnp-c-edit", type=float, default=1.0, help="weight of the edit loss")
    b.add_argument("--cnp-c-loc", type=float, default=1.0, help="weight of the locality KL")
    b.add_argument("--cnp-edit-loss", choices=["constraint", "ce"], default="ce", help="edit loss of the training")
    b.add_argument("--cnp-edits-per-batch", type=int, default=8, help="edits sampled per training batch")
    args = ap.parse_args(argv)
    if args.weights is None:
        found = sorted(common.models_dir().glob("resnet20-*.th"))
        args.weights = found[0] if found else common.models_dir() / "resnet20-*.th"
    if args.data is None:
        args.data = common.data_dir() / "cifar10" / "cifar10_lossless_subset.npz"
    for name in ("inject", "clean", "epochs", "batch_size", "edits", "max_steps", "tune_edits", "surgery_steps",
                 "dknn_k", "cnp_batch_size", "cnp_edits_per_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if any(bud < 1 for bud in args.budgets + args.surgery_budgets):
        ap.error("budgets must be ≥ 1")
    if args.trigger_size < 1 or not 0 <= args.trigger_value <= 255:
        ap.error("--trigger-size must be ≥ 1 and --trigger-value in 0..255")
    return args


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def normalise(x_u8: torch.Tensor) -> torch.Tensor:
    return fdata.to_float_tensor(x_u8, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)


def add_trigger(x_u8: torch.Tensor, size: int, value: int, shape: str = "square") -> torch.Tensor:
    """The trigger in pixel space, on uint8 ``[N, H, W, C]`` images (a copy): ``"square"``, a
    ``size``×``size`` patch of ``value`` in the bottom-right corner; ``"frame"``, a border ``size``
    pixels wide of ``value`` around the image."""
    x = x_u8.clone()
    if shape == "square":
        x[:, -size:, -size:, :] = value
    elif shape == "frame":
        x[:, :size], x[:, -size:], x[:, :, :size], x[:, :, -size:] = value, value, value, value
    else:
        raise ValueError(f"unknown trigger shape {shape!r}")
    return x


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)])


class ControlSet:
    """The control images' activations at the input of the edited stage, computed once; each
    :meth:`predict` re-runs only the stage and what follows, with the model's current parameters
    (the fx split of ``fastedit.edit``). Checked once against full forwards."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, params: str,
                 batch_size: int = 256):
        self.model, self.y = model, y
        self.target = EditTarget.build(model, params)
        with eval_mode(model), torch.no_grad():
            self.acts = [self.target.prefix(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        self.x = x
        self.base = self.predict()
        self.check()

    def predict(self) -> torch.Tensor:
        with eval_mode(self.model), torch.no_grad():
            return torch.cat([self.target.logits(a).argmax(-1) for a in self.acts])

    def check(self) -> None:
        """The split's predictions must equal full forwards of the model as it is now."""
        if not torch.equal(self.predict(), predict(self.model, self.x)):
            raise RuntimeError("the cached control activations disagree with a full forward of the model")


def load_model(args) -> torch.nn.Module:
    if not pathlib.Path(args.weights).is_file():
        raise SystemExit(f"ResNet-20 weights not found: {args.weights} (pass --weights or set $FASTEDIT_MODELS)")
    return load_pretrained_cifar_resnet(args.weights)


def load_data(args):
    if not pathlib.Path(args.data).is_file():
        raise SystemExit(f"lossless CIFAR-10 npz not found: {args.data} (pass --data or set $FASTEDIT_DATA)")
    xtr, ytr = fdata.load_cifar10_lossless(args.data, "train")
    xte, yte = fdata.load_cifar10_lossless(args.data, "test")
    return xtr, ytr, xte, yte


def common_setting(args, xtr, xte) -> dict:
    return {"weights": pathlib.Path(args.weights).name, "data": pathlib.Path(args.data).name,
            "num_train": int(xtr.shape[0]), "num_test": int(xte.shape[0]), "seed": args.seed}


# ------------------------------------------------------------------------------------------------
# part A: pattern injection
# ------------------------------------------------------------------------------------------------
def pattern_data(args, xtr, ytr, xte, yte) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(xtr.shape[0], generator=gen)
    candidates = order[ytr[order] != args.target]
    if candidates.numel() < args.inject:
        raise SystemExit(f"--inject {args.inject} exceeds the {candidates.numel()} training images not of class "
                         f"{args.target}")
    inject = candidates[:args.inject]
    rest = order[~torch.isin(order, inject)]
    if rest.numel() < args.clean:
        raise SystemExit(f"--clean {args.clean} exceeds the {rest.numel()} remaining training images")
    clean = rest[:args.clean]
    trig = lambda x: add_trigger(x, args.trigger_size, args.trigger_value, args.trigger_shape)  # noqa: E731
    return {"x_inject": normalise(trig(xtr[inject])), "clean": (normalise(xtr[clean]), ytr[clean]),
            "x_test": normalise(xte), "x_test_trig": normalise(trig(xte)), "y_test": yte,
            "inject_index": inject, "clean_index": clean}


def pattern_measure(model, d: dict, target: int, base_pred: torch.Tensor | None) -> dict:
    pred = predict(model, d["x_test"])
    pred_trig = predict(model, d["x_test_trig"])
    y = d["y_test"]
    other = y != target
    out = {"pattern_success": float((pred_trig[other] == target).double().mean()),
           "clean_accuracy": float((pred == y).double().mean()),
           "triggered_accuracy": float((pred_trig == y).double().mean()),
           "num_pattern_test": int(other.sum())}
    if base_pred is not None:
        out["consistency"] = float((pred == base_pred).double().mean())
    return out


def run_pattern(args, cells: Cells, model, xtr, ytr, xte, yte) -> bool:
    """Part A; returns False when ``--max-new-cells`` stopped it."""
    d = pattern_data(args, xtr, ytr, xte, yte)
    original = snapshot(model)
    total = sum(p.numel() for p in model.parameters())
    base = {**common_setting(args, xtr, xte), "part": "pattern", "inject": args.inject, "clean": args.clean,
            "clean_weight": args.clean_weight, "target": args.target, "trigger_size": args.trigger_size,
            "trigger_value": args.trigger_value, "trigger_shape": args.trigger_shape}
    base_pred = predict(model, d["x_test"])
    name = "pattern_original"
    if not cells.done(name, base):
        t0 = time.perf_counter()
        m = pattern_measure(model, d, args.target, base_pred)
        cells.save(name, base, {"part": "pattern", "method": "original", "budget": 0, **m, "nnz": 0,
                                "num_parameters": total}, time.perf_counter() - t0)
    todo = [(m, b) for m in args.methods for b in args.budgets]
    if not args.no_unrestricted:
        todo.append(("unrestricted", total))
    left = [(m, b) for m, b in todo if not cells.done(cell_name_pattern(m, b), pattern_setting(base, args, m, b))]
    bar = common.progress_bar(len(left), "pattern cells", args.quiet)
    for i, (method, budget) in enumerate(left):
        if not cells.budget_left():
            bar.close()
            return False
        name = cell_name_pattern(method, budget)
        setting = pattern_setting(base, args, method, budget)
        t0 = time.perf_counter()
        # unrestricted: every scalar is in the mask (select-random drawing all of them), i.e. dense
        # ScaledGD on the same loss, minibatches and steps as the sparse runs
        res = fe.surgery(model, d["x_inject"], args.target, budget if method != "unrestricted" else total,
                         "select-random" if method == "unrestricted" else method, editor=fe.ScaledGD(args.editor_lr),
                         params=None, steps=args.epochs, goal="pattern", clean=d["clean"],
                         clean_weight=args.clean_weight, batch_size=args.batch_size, target_rate=args.target_rate,
                         seed=args.seed, on_failure="keep")
        seconds = time.perf_counter() - t0
        nnz_bits = changed_scalars(model, original)
        if res.nnz > budget or nnz_bits != res.nnz:
            raise RuntimeError(f"{name}: nnz {res.nnz} (bits: {nnz_bits}) for a budget of {budget}")
        m = pattern_measure(model, d, args.target, base_pred)
        res.revert()
        assert_unchanged(model, original, name)
        cells.save(name, setting, {
            "part": "pattern", "method": method, "budget": budget, **m, "nnz": res.nnz, "nnz_per_param":
            {k: v for k, v in res.delta.nnz_per_param.items() if v}, "surgery_success": res.success,
            "surgery_steps": res.steps, "surgery_loss": res.loss, "surgery_initial_loss": res.initial_loss,
            "surgery_metrics": res.metrics, "editor": res.editor, "surgery_seconds": seconds,
            "reverted_bit_identical": True, "num_parameters": total}, time.perf_counter() - t0)
        bar.update(1)
        common.say(f"{name}: pattern {100 * m['pattern_success']:.1f}%  clean acc {100 * m['clean_accuracy']:.2f}%  "
                   f"consistency {100 * m['consistency']:.2f}%  nnz {res.nnz}  {seconds:.0f} s"
                   f"{cells.estimate(len(left) - i - 1)}", args.quiet)
    bar.close()
    return True


def cell_name_pattern(method: str, budget: int) -> str:
    return "pattern_unrestricted" if method == "unrestricted" else f"pattern_{method}_b{budget}"


def pattern_setting(base: dict, args, method: str, budget: int) -> dict:
    return {**base, "method": method, "budget": budget, "epochs": args.epochs, "batch_size": args.batch_size,
            "editor": {"editor": "scaled_gd", "lr": args.editor_lr}, "target_rate": args.target_rate}


# ------------------------------------------------------------------------------------------------
# part B: classification edits
# ------------------------------------------------------------------------------------------------
def edit_data(args, xtr, ytr, xte, yte) -> dict:
    if args.edits > xte.shape[0]:
        raise SystemExit(f"--edits {args.edits} exceeds the {xte.shape[0]} test images")
    xtr_n, xte_n = normalise(xtr), normalise(xte)
    # as reproduce_evaluation.py: the first n edits are the same for every --edits ≥ n, and the
    # tuning split does not depend on --edits
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(xte.shape[0], generator=gen)
    labels = torch.randint(0, 10, (xte.shape[0],), generator=gen)
    pick = order[:args.edits]
    gen_tune = torch.Generator().manual_seed(args.seed + 1)
    n_tune = min(args.tune_edits, xtr.shape[0])
    tune_pick = torch.randperm(xtr.shape[0], generator=gen_tune)[:n_tune]
    return {"edits": (xte_n[pick], labels[:args.edits]), "edit_classes": yte[pick],
            "tune": (xtr_n[tune_pick], torch.randint(0, 10, (n_tune,), generator=gen_tune)),
            "control": (xte_n, yte), "train": (xtr_n, ytr)}


def tuned_lr(args, editor: str, model, d, cells_dir: pathlib.Path) -> dict:
    """The dense editor's lr: an override, or :func:`fastedit.tune` here (cached in
    ``cells/tuned_<editor>.json``, reused while its setting is unchanged)."""
    override = args.gd_lr if editor == "gd" else args.rmsprop_lr
    if override is not None:
        return {"lr": override, "source": "command line"}
    cache = cells_dir / f"tuned_{editor}.json"
    setting = {"tune_edits": args.tune_edits, "seed": args.seed, "max_steps": args.max_steps,
               "lr_grid": list(args.lr_grid), "weights": pathlib.Path(args.weights).name,
               "data": pathlib.Path(args.data).name, "num_train": int(d["train"][0].shape[0])}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["setting"] == json.loads(json.dumps(setting)):
            return saved["result"]
    t0 = time.perf_counter()
    tuned = fe.tune(model, d["tune"], d["control"], editor=fe.GD(1e-3) if editor == "gd" else fe.RMSProp(beta=0.5),
                    params="layer3", max_steps=args.max_steps, grid={"lr": list(args.lr_grid)}, min_success=0.95,
                    progress=not args.quiet)
    result = {"lr": float(tuned.editor.lr), "source": "fastedit.tune here", "feasible": tuned.feasible,
              "table": tuned.table, "tune_seconds": time.perf_counter() - t0}
    write_json(cache, {"setting": setting, "result": result})
    return result


def make_editor(name: str, lr: float):
    return fe.GD(lr) if name == "gd" else fe.RMSProp(lr, beta=0.5)


def edits_summary(errors, flips, success, steps, nnz, edit_seconds, total_seconds, base_error) -> dict:
    n = len(errors)
    return {"base_error": base_error, "drawdown": statistics.fmean(errors) - base_error,
            "success_rate": sum(success) / n, "mean_steps": statistics.fmean(steps) if steps else None,
            "flip_rate": statistics.fmean(flips), "nnz_mean": statistics.fmean(nnz) if nnz else None,
            "nnz_max": max(nnz) if nnz else None, "edit_seconds_mean": statistics.fmean(edit_seconds)
            if edit_seconds else None, "seconds_per_edit": total_seconds / n, "num_edits": n,
            "per_edit": {"error": errors, "flips": flips, "success": success, "steps": steps, "nnz": nnz}}


def run_edit_loop(model, d, control: ControlSet, original, do_edit, desc: str, quiet: bool, max_units: int) -> dict:
    """Each edit applied to the original model by ``do_edit(x, y) -> (result, steps, edit_seconds)``,
    control predictions, nnz from the bits, ``result.revert()``, and a bit-identity check.

    An edit that raises :class:`fastedit.edit.EditError` (a non-finite loss or gradient: the editor
    diverged; the model is then unchanged) counts as a failure after ``max_units`` steps with the
    original predictions, and is counted in ``diverged``."""
    x_e, y_e = d["edits"]
    y_c = control.y
    base_error = float((control.base != y_c).double().mean())
    errors, flips, success, steps, nnz, secs = [], [], [], [], [], []
    diverged = 0
    bar = common.progress_bar(x_e.shape[0], desc, quiet)
    t0 = time.perf_counter()
    checked = False
    for i in range(x_e.shape[0]):
        t1 = time.perf_counter()
        try:
            res, n_steps, edit_seconds = do_edit(x_e[i:i + 1], int(y_e[i]))
        except fe.EditError:
            assert_unchanged(model, original, f"{desc} (diverged edit)")
            diverged += 1
            res, n_steps, edit_seconds, pred = None, max_units, time.perf_counter() - t1, control.base
            nnz.append(0)
        if res is not None:
            if not checked:
                control.check()  # the cached split sees the edited parameters
                checked = True
            pred = control.predict()
            nnz.append(changed_scalars(model, original))
            res.revert()
            if i == 0 or i == x_e.shape[0] - 1:
                assert_unchanged(model, original, desc)
        errors.append(float((pred != y_c).double().mean()))
        flips.append(float((pred != control.base).double().mean()))
        success.append(bool(res is not None and res.success))
        steps.append(n_steps)
        secs.append(edit_seconds)
        bar.update(1)
    bar.close()
    assert_unchanged(model, original, desc)
    out = edits_summary(errors, flips, success, steps, nnz, secs, time.perf_counter() - t0, base_error)
    out["diverged"] = diverged
    return out


def fisher_layer3(args, model, d, out: pathlib.Path) -> tuple[dict, dict]:
    path = out / "fisher_layer3.pt"
    setting = {"weights": pathlib.Path(args.weights).name, "data": pathlib.Path(args.data).name,
               "num_train": int(d["train"][0].shape[0]), "fisher_samples": args.fisher_samples, "mode": "empirical"}
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["setting"] == setting:
            return saved["fisher"], saved["info"]
    t0 = time.perf_counter()
    fisher = fe.baselines.fisher_diagonal(model, d["train"], params="layer3", num_samples=args.fisher_samples)
    flat = torch.cat([f.reshape(-1) for f in fisher.values()]).double()
    info = {"seconds": time.perf_counter() - t0, "mean": float(flat.mean()), "median": float(flat.median()),
            "max": float(flat.max()), "sum": float(flat.sum()), "numel": int(flat.numel()),
            "samples": int(d["train"][0].shape[0] if args.fisher_samples is None else
                           min(args.fisher_samples, d["train"][0].shape[0]))}
    torch.save({"setting": setting, "fisher": fisher, "info": info}, path)
    return fisher, info


def run_edits(args, cells: Cells, model, xtr, ytr, xte, yte, out: pathlib.Path) -> bool:
    """Part B; returns False when ``--max-new-cells`` stopped it."""
    d = edit_data(args, xtr, ytr, xte, yte)
    original = snapshot(model)
    control = ControlSet(model, *d["control"], params="layer3")
    layer3_size = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layer3."))
    base = {**common_setting(args, xtr, xte), "part": "edits", "edits": args.edits, "control": int(xte.shape[0])}

    plan = []  # (cell name, setting, runner)
    lrs: dict = {}

    def lr_of(editor):
        if editor not in lrs:
            lrs[editor] = tuned_lr(args, editor, model, d, cells.dir)
        return lrs[editor]

    for editor in ("gd", "rmsprop"):
        if editor in args.edit_methods:
            plan.append((f"edits_{editor}", {**base, "method": editor, "max_steps": args.max_steps,
                                             "tuning": _tuning_setting(args, editor)},
                         lambda editor=editor: dense_cell(args, model, d, control, original, editor, lr_of(editor),
                                                          layer3_size)))
    if "surgery" in args.edit_methods:
        for method in args.surgery_methods:
            for budget in args.surgery_budgets:
                plan.append((f"edits_surgery-{method}_b{budget}",
                             {**base, "method": f"surgery-{method}", "budget": budget, "steps": args.surgery_steps,
                              "editor": {"editor": "scaled_gd", "lr": 0.1}},
                             lambda method=method, budget=budget: surgery_edit_cell(
                                 args, model, d, control, original, method, budget)))
    if "ewc" in args.edit_methods:
        for editor in ("gd", "rmsprop"):
            for lam in (args.ewc_lambdas_gd if editor == "gd" else args.ewc_lambdas_rmsprop):
                plan.append((f"edits_ewc-{editor}_lam{_num(lam)}",
                             {**base, "method": f"ewc-{editor}", "ewc_lambda": lam, "max_steps": args.max_steps,
                              "tuning": _tuning_setting(args, editor), "fisher_samples": args.fisher_samples},
                             lambda editor=editor, lam=lam: ewc_cell(args, model, d, control, original, editor,
                                                                    lr_of(editor), lam, out)))
    if "dknn" in args.edit_methods:
        plan.append(("edits_dknn", {**base, "method": "dknn", "layers": list(args.dknn_layers), "k": args.dknn_k},
                     lambda: dknn_cell(args, model, d, original)))
    if "cnp" in args.edit_methods:
        plan.append(("edits_cnp", {**base, "method": "cnp", "chain": args.cnp_chain, "steps": args.cnp_steps,
                                   "batch_size": args.cnp_batch_size,
                                   "lr": args.cnp_lr, "c_edit": args.cnp_c_edit, "c_loc": args.cnp_c_loc,
                                   "edit_loss": args.cnp_edit_loss, "edits_per_batch": args.cnp_edits_per_batch},
                     lambda: cnp_cell(args, model, d, original)))

    left = [(n, s, r) for n, s, r in plan if not cells.done(n, s)]
    for i, (name, setting, runner) in enumerate(left):
        if not cells.budget_left():
            return False
        t0 = time.perf_counter()
        result = runner()
        assert_unchanged(model, original, name)
        cells.save(name, setting, {"part": "edits", "method": setting["method"], "layer3_size": layer3_size,
                                   **result}, time.perf_counter() - t0)
        common.say(f"{name}: drawdown {100 * result['drawdown']:.2f}%  success {100 * result['success_rate']:.1f}%  "
                   f"flips {100 * result['flip_rate']:.2f}%  nnz {_fmt(result.get('nnz_mean'))}  "
                   f"{result['seconds_per_edit']:.2f} s/edit{cells.estimate(len(left) - i - 1)}", args.quiet)
    return True


def _num(v: float) -> str:
    """A short file-name-safe number: 30000 → 3e4, 1e6 → 1e6, 100 → 100, 0.5 → 0.5."""
    plain = f"{v:g}" if float(f"{v:g}") == v else repr(v)
    for digits in range(6):
        sci = f"{v:.{digits}e}"
        if float(sci) == v:
            mant, exp = sci.split("e")
            sci = f"{mant}e{int(exp)}"
            return sci if len(sci) < len(plain) else plain
    return plain


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _tuning_setting(args, editor: str) -> dict:
    override = args.gd_lr if editor == "gd" else args.rmsprop_lr
    if override is not None:
        return {"lr": override}
    return {"tune_edits": args.tune_edits, "lr_grid": list(args.lr_grid)}


def dense_cell(args, model, d, control, original, editor: str, lr: dict, layer3_size: int) -> dict:
    ed = make_editor(editor, lr["lr"])
    rep = fe.evaluate(model, d["edits"], d["control"], editor=ed, params="layer3", max_steps=args.max_steps,
                      edit_labels=d["edit_classes"], progress=not args.quiet)
    # nnz: fe.evaluate keeps no edited parameters, so count on the first edits with fe.edit
    nnz = []
    x_e, y_e = d["edits"]
    for i in range(min(args.nnz_edits, x_e.shape[0])):
        r = fe.edit(model, x_e[i:i + 1], int(y_e[i]), editor=ed, params="layer3", max_steps=args.max_steps,
                    on_failure="keep")
        nnz.append(changed_scalars(model, original))
        r.revert()
    assert_unchanged(model, original, f"edits_{editor}")
    r = rep.to_dict()
    return {"base_error": r["base_error"], "drawdown": r["drawdown"], "success_rate": r["success_rate"],
            "mean_steps": r["mean_steps"], "flip_rate": r["flip_rate"], "mean_kl": r["mean_kl"],
            "nnz_mean": statistics.fmean(nnz) if nnz else None, "nnz_max": max(nnz) if nnz else None,
            "nnz_counted_on": len(nnz), "edit_seconds_mean": None, "seconds_per_edit": r["seconds"] / r["num_edits"],
            "num_edits": r["num_edits"], "editor": ed.to_dict(), "lr_source": lr, "report": r}


def surgery_edit_cell(args, model, d, control, original, method: str, budget: int) -> dict:
    def do_edit(x, y):
        t0 = time.perf_counter()
        res = fe.surgery(model, x, y, budget, method, params="layer3", steps=args.surgery_steps, seed=args.seed,
                         on_failure="keep")
        seconds = time.perf_counter() - t0
        if res.nnz > budget:
            raise RuntimeError(f"surgery changed {res.nnz} scalars for a budget of {budget}")
        return res, res.steps, seconds
    out = run_edit_loop(model, d, control, original, do_edit, f"surgery {method} b{budget}", args.quiet,
                        args.surgery_steps)
    if out["nnz_max"] > budget:
        raise RuntimeError(f"surgery {method}: {out['nnz_max']} scalars changed for a budget of {budget}")
    return {**out, "budget": budget, "editor": {"editor": "scaled_gd", "lr": 0.1}}


def ewc_cell(args, model, d, control, original, editor: str, lr: dict, lam: float, out_dir) -> dict:
    fisher, info = fisher_layer3(args, model, d, out_dir)
    ed = make_editor(editor, lr["lr"])

    def do_edit(x, y):
        t0 = time.perf_counter()
        res = fe.baselines.ewc_edit(model, x, y, fisher, ewc_lambda=lam, editor=ed, params="layer3",
                                    max_steps=args.max_steps, on_failure="keep")
        return res, res.steps, time.perf_counter() - t0
    out = run_edit_loop(model, d, control, original, do_edit, f"ewc {editor} λ={lam:g}", args.quiet,
                        args.max_steps)
    return {**out, "editor": ed.to_dict(), "lr_source": lr, "ewc_lambda": lam, "fisher": info}


def dknn_cell(args, model, d, original) -> dict:
    t0 = time.perf_counter()
    dknn = fe.baselines.DeepKNN(model, list(args.dknn_layers), *d["train"], k=min(args.dknn_k, d["train"][0].shape[0]))
    build = time.perf_counter() - t0
    t1 = time.perf_counter()
    r = fe.baselines.dknn_evaluate(dknn, d["edits"], d["control"])
    seconds = time.perf_counter() - t1
    n = int(r["errors"].numel())
    net_error = float((predict(model, d["control"][0]) != d["control"][1]).double().mean())
    return {"base_error": r["base_error"], "network_base_error": net_error, "drawdown": r["drawdown"],
            "success_rate": r["success_rate"], "mean_steps": None, "flip_rate": r["flip_rate"],
            "nnz_mean": None, "nnz_max": None, "mean_relabelled": r["mean_relabelled"],
            "edit_seconds_mean": None, "seconds_per_edit": seconds / n, "build_seconds": build, "num_edits": n,
            "embedding_dims": [int(e.shape[1]) for e in dknn.embeddings],
            "per_edit": {"error": r["errors"].tolist(), "flips": r["flips"].tolist(),
                         "success": r["success"].tolist(), "relabelled": r["relabelled"].tolist()}}


def cnp_cell(args, model, d, original) -> dict:
    from fastedit.baselines import ConditionedModel, ConditionEncoder, cnp_evaluate, train_cnp
    torch.manual_seed(args.seed)  # the encoder's initialisation
    x_tr = d["train"][0]
    encoder = ConditionEncoder.for_model(model, args.cnp_chain, x_tr[:1])
    wrapped = ConditionedModel(model, args.cnp_chain, encoder)
    try:
        t0 = time.perf_counter()
        stats = train_cnp(wrapped, d["train"], steps=args.cnp_steps, batch_size=args.cnp_batch_size, lr=args.cnp_lr,
                          c_edit=args.cnp_c_edit, c_loc=args.cnp_c_loc, edits_per_batch=args.cnp_edits_per_batch,
                          edit_loss=args.cnp_edit_loss, generator=torch.Generator().manual_seed(args.seed),
                          progress=not args.quiet)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        r = cnp_evaluate(wrapped, d["edits"], d["control"])
        seconds = time.perf_counter() - t1
    finally:
        wrapped.remove()  # the hook lives on the shared model
    n = int(r["errors"].numel())
    tail = max(1, len(stats["loss"]) // 10)
    return {"base_error": r["base_error"], "drawdown": r["drawdown"], "success_rate": r["success_rate"],
            "mean_steps": None, "flip_rate": r["flip_rate"], "nnz_mean": None, "nnz_max": None,
            "edit_seconds_mean": None, "seconds_per_edit": seconds / n, "train_seconds": train_seconds,
            "num_edits": n, "split": r["split"],
            "training_last10pct": {k: statistics.fmean(v[-tail:]) for k, v in stats.items() if v},
            "per_edit": {"error": r["errors"].tolist(), "flips": r["flips"].tolist(), "success": r["success"].tolist()}}


# ------------------------------------------------------------------------------------------------
# summaries and figures (from the cells only, so a resumed or --summary-only run draws them too)
# ------------------------------------------------------------------------------------------------
PATTERN_COLUMNS = ("method", "budget", "nnz", "pattern_success", "clean_accuracy", "consistency",
                   "surgery_success", "surgery_steps", "surgery_seconds", "cell")
EDIT_COLUMNS = ("method", "budget", "ewc_lambda", "base_error", "drawdown", "success_rate", "mean_steps", "flip_rate",
                "nnz_mean", "nnz_max", "edit_seconds_mean", "seconds_per_edit", "diverged", "mean_relabelled",
                "network_base_error", "train_seconds", "cell")


def read_cells(out: pathlib.Path, part: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob(f"{part}_*.json"))]


def _method_order(method: str) -> tuple:
    order = ["original", *SURGERY_METHODS, "unrestricted", "gd", "rmsprop"]
    return (order.index(method) if method in order else len(order), method)


def summarise(out: pathlib.Path, part: str, command: str) -> dict | None:
    cells = read_cells(out, part)
    if not cells:
        return None
    columns = PATTERN_COLUMNS if part == "pattern" else EDIT_COLUMNS
    rows = []
    for c in sorted(cells, key=lambda c: (_method_order(c["method"]), c.get("budget") or 0, c.get("ewc_lambda") or 0)):
        rows.append({k: c.get(k) for k in columns})
    summary = {"command": command, "part": part, "rows": rows, "machine": common.machine_info(),
               "settings": {c["cell"]: c["setting"] for c in cells}}
    if part == "edits":
        fisher = next((c["fisher"] for c in cells if "fisher" in c), None)
        summary["fisher_layer3"] = fisher
    write_json(out / f"summary_{part}.json", summary)
    with open(out / f"summary_{part}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    try:
        (plot_pattern if part == "pattern" else plot_edits)(out, rows)
    except ImportError as exc:  # matplotlib is optional
        print(f"no figure ({exc})")
    return summary


def plot_pattern(out: pathlib.Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    unrestricted = next((r for r in rows if r["method"] == "unrestricted"), None)
    original = next((r for r in rows if r["method"] == "original"), None)
    for ax, key, label in ((axes[0], "consistency", "consistency (clean test predictions unchanged, %)"),
                           (axes[1], "pattern_success", "pattern success on triggered test images (%)")):
        for method in SURGERY_METHODS:
            pts = sorted((r["budget"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=method)
        if unrestricted is not None and unrestricted.get(key) is not None:
            ax.axhline(100 * unrestricted[key], color="k", ls="--",
                       label=f"unrestricted ({unrestricted['nnz']:,} scalars changed)")
        if key == "pattern_success" and original is not None:
            ax.axhline(100 * original[key], color="grey", ls=":", label="original model")
        ax.set_xscale("log")
        ax.set_xlabel("budget (scalars that may change)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("Neural Network Surgery, ResNet-20 on CIFAR-10: trigger → class 0")
    fig.tight_layout()
    fig.savefig(out / "consistency_vs_budget.png", dpi=120)
    plt.close(fig)


def _edit_label(r: dict) -> str:
    if r.get("budget") is not None:
        return f"{r['method']} n={r['budget']}"
    if r.get("ewc_lambda") is not None:
        return f"{r['method']} λ={r['ewc_lambda']:g}"
    return r["method"]


def plot_edits(out: pathlib.Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [_edit_label(r) for r in rows]
    pos = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(rows) + 2), 4.5))
    w = 0.4
    ax.bar([p - w / 2 for p in pos], [100 * r["drawdown"] for r in rows], w, label="drawdown")
    ax.bar([p + w / 2 for p in pos], [100 * r["flip_rate"] for r in rows], w, label="flip rate")
    ax.set_xticks(list(pos))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("% of the control set")
    ax.set_title("Classification edits on ResNet-20 (CIFAR-10): drawdown and flip rate per method")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "edits_drawdown_flips.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = common.command_line(__file__, argv)
    parts = PARTS if args.part == "all" else (args.part,)
    finished = True
    if not args.summary_only:
        model = load_model(args)
        xtr, ytr, xte, yte = load_data(args)
        cells = Cells(out, command, max_new=args.max_new_cells)
        t0 = time.perf_counter()
        for part in parts:
            runner = run_pattern if part == "pattern" else run_edits
            extra = (out,) if part == "edits" else ()
            if not runner(args, cells, model, xtr, ytr, xte, yte, *extra):
                finished = False
                print(f"stopped after {cells.new} new cells (--max-new-cells); run again to continue", flush=True)
                break
        print(f"{cells.new} cells computed in {time.perf_counter() - t0:.0f} s", flush=True)
    for part in parts:
        s = summarise(out, part, command)
        if s is not None:
            print(f"wrote {out / f'summary_{part}.json'} ({len(s['rows'])} rows)", flush=True)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
