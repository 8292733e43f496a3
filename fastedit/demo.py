"""The main job: edit a real model with each of the six editors and print the paper's Table 1.

Default (no download, ~1 minute on 2 CPU cores): the handwritten digits bundled with scikit-learn, a
small CNN trained on them in seconds, then ``num_edits`` held-out digits, each with a random target
label, edited independently with GD, Scaled GD, RProp, RMSProp, Momentum and Adam. For each editor:
drawdown, success rate, mean steps and flip rate on the held-out set (``fastedit.evaluate``).

With ``model="resnet20", weights=PATH, data="cifar10", data_dir=PATH`` the same runs on a pretrained
CIFAR-10 ResNet and real CIFAR-10 test images, editing ``layer3``.
"""
from __future__ import annotations

import csv
import json
import pathlib
import platform
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import data as fdata
from . import models as fmodels
from .editors import Editor, make_editor
from .evaluate import EvalReport, evaluate

EDITOR_ORDER = ("gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam")
EDITOR_LABELS = {"gd": "GD", "scaled_gd": "Scaled GD", "rprop": "RProp", "rmsprop": "RMSProp",
                 "momentum": "Momentum", "adam": "Adam"}

# Hyper-parameters per editor and setting, chosen by benchmarks/experiments/calibrate_demo.py (the paper's
# protocol on tuning edits disjoint from the demo's: least drawdown with ≥ 95% success in k steps)
# and stored, with the command that produced them, in demo_hparams.json beside this file.
HPARAMS_FILE = pathlib.Path(__file__).with_name("demo_hparams.json")


def default_hparams() -> dict:
    """``{setting: {editor: {hyper-parameter: value}}}`` from demo_hparams.json."""
    return json.loads(HPARAMS_FILE.read_text())["settings"]


DEFAULT_PARAMS = {"small_cnn": "head", "mlp": "classifier", "resnet18": "layer3"}


@dataclass
class DemoData:
    train: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    description: str


def load_demo_data(name: str, data_dir=None, limit: int | None = None) -> DemoData:
    """Float NCHW tensors for the demo: digits (train + test) or CIFAR-10/MNIST test images."""
    if name == "digits":
        train = fdata.load_digits("train")
        test = fdata.load_digits("test")
        return DemoData((fdata.to_float_tensor(train[0]), train[1]),
                        (fdata.to_float_tensor(test[0]), test[1]), "scikit-learn digits (8x8), 75/25 split")
    if name.startswith("cifar10"):
        x, y, info = fdata.load_dataset(name, data_dir, split="test", limit=limit, return_info=True)
        x = fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)
        return DemoData(None, (x, y), f"CIFAR-10 test images from {info['source']} ({info['path']})")
    if name == "mnist":
        train = fdata.load_dataset("mnist", data_dir, split="train")
        test = fdata.load_dataset("mnist", data_dir, split="test", limit=limit)
        return DemoData((fdata.to_float_tensor(train[0]), train[1]),
                        (fdata.to_float_tensor(test[0]), test[1]), "MNIST")
    raise ValueError(f"unknown demo data {name!r}; choose digits, cifar10, cifar10-jpeg, cifar10-lossless or mnist")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Plain Adam training (the demo's model is trained in seconds); returns seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


def build_editors(setting: str, names=EDITOR_ORDER, lr: float | None = None) -> list[Editor]:
    editors = []
    for name in names:
        hp = dict(default_hparams()[setting][name])
        if lr is not None:
            hp["lr"] = lr
        editors.append(make_editor(name, **hp))
    return editors


def format_table(rows: list[dict]) -> str:
    head = f"{'editor':<10} {'lr':>8} {'drawdown':>9} {'success':>8} {'steps':>6} {'flip rate':>9} {'c→w':>7} {'w→c':>7} {'KL':>8} {'edits/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<10} {r['lr']:>8.2g} {100 * r['drawdown']:>8.2f}% {100 * r['success_rate']:>7.1f}% "
                     f"{r['mean_steps']:>6.2f} {100 * r['flip_rate']:>8.2f}% {100 * r['flip_rate_correct_to_wrong']:>6.2f}% "
                     f"{100 * r['flip_rate_wrong_to_correct']:>6.2f}% {r['mean_kl']:>8.4f} {r['edits_per_s']:>8.1f}")
    return "\n".join(lines)


def plot_table(rows: list[dict], path: pathlib.Path, title: str) -> None:
    from .plots import _pyplot
    plt = _pyplot()

    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, name in zip(axes, ("drawdown", "flip_rate", "success_rate"),
                             ("drawdown (%)", "flip rate (%)", "success rate (%)")):
        values = [100 * r[key] for r in rows]
        bars = ax.bar(labels, values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_ylim(0, 1.15 * max(max(values), 1e-9))  # headroom for the value labels
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_model_and_data(model_name: str, weights=None, data: str = "digits", data_dir=None, *,
                           limit: int | None = None, epochs: int = 30, seed: int = 0, log=print):
    """The model (loaded from ``weights`` or trained on the data's training split) and the data, as
    the CLI's subcommands use them: ``(model in eval mode, DemoData, num_classes, train_seconds)``."""
    torch.manual_seed(seed)
    dataset = load_demo_data(data, data_dir, limit)
    x_test, y_test = dataset.test
    num_classes = int(y_test.max()) + 1 if dataset.train is None else int(dataset.train[1].max()) + 1
    is_cifar_resnet = model_name in ("resnet20", "resnet32", "resnet44", "resnet56")
    if is_cifar_resnet and weights is None:
        raise ValueError(f"{model_name} needs --weights (a pretrained checkpoint such as resnet20-12fca82f.th)")
    kwargs = {"in_channels": x_test.shape[1]} if model_name in ("small_cnn", "resnet18") else {}
    if model_name == "mlp":
        kwargs = {"in_features": x_test[0].numel()}
    model = fmodels.get_model(model_name, num_classes=10 if is_cifar_resnet else num_classes, weights=weights, **kwargs)
    train_seconds = 0.0
    if weights is None:
        if dataset.train is None:
            raise ValueError(f"{data} provides no training split here; pass --weights for a trained model")
        log(f"training {model_name} on {dataset.description} ({dataset.train[0].shape[0]} images, {epochs} epochs)")
        train_seconds = train_classifier(model, *dataset.train, epochs=epochs, seed=seed)
    model.eval()
    return model, dataset, num_classes, train_seconds


def run_demo(model_name: str = "small_cnn", weights=None, data: str = "digits", data_dir=None,
             num_edits: int = 200, max_steps: int = 10, params: str | None = None, editors=EDITOR_ORDER,
             lr: float | None = None, out: str | pathlib.Path = "runs/demo", seed: int = 0, epochs: int = 30,
             limit: int | None = None, progress: bool = True, log=print) -> dict:
    """Run the demo; writes ``results.json``, ``results.csv`` and ``editors.png`` to ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, dataset, num_classes, train_seconds = prepare_model_and_data(
        model_name, weights, data, data_dir, limit=limit, epochs=epochs, seed=seed, log=log)
    x_test, y_test = dataset.test
    params = params or DEFAULT_PARAMS.get(model_name, "layer3")
    setting = "small" if model_name in ("small_cnn", "mlp") else "resnet"

    gen = torch.Generator().manual_seed(seed)
    num_edits = min(num_edits, x_test.shape[0])
    pick = torch.randperm(x_test.shape[0], generator=gen)[:num_edits]
    edit_labels = torch.randint(0, num_classes, (num_edits,), generator=gen)
    log(f"{num_edits} edits: test images with random labels (seed {seed}); control set: all "
        f"{x_test.shape[0]} test images; editable parameters: {params!r}")

    rows, reports = [], {}
    for editor in build_editors(setting, editors, lr):
        report: EvalReport = evaluate(model, (x_test[pick], edit_labels), (x_test, y_test), editor=editor,
                                      params=params, max_steps=max_steps, progress=progress)
        reports[editor.name] = report
        summary = report.to_dict()
        summary["hparams"] = summary.pop("editor")
        row = {"editor": editor.name, "label": EDITOR_LABELS[editor.name], "lr": float(editor.lr),
               **summary, "edits_per_s": report.num_edits / report.seconds}
        rows.append(row)
    base_error = rows[0]["base_error"]
    table = format_table(rows)
    log(f"\nbase test error {100 * base_error:.2f}% on {x_test.shape[0]} images; k = {max_steps}\n{table}")

    result = {
        "command": None,  # filled by the CLI
        "model": model_name, "weights": str(weights) if weights else None, "data": dataset.description,
        "params": params, "num_edits": num_edits, "num_control": int(x_test.shape[0]), "max_steps": max_steps,
        "seed": seed, "train_seconds": train_seconds, "base_error": base_error, "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        keys = ["editor", "lr", "drawdown", "success_rate", "mean_steps", "flip_rate",
                "flip_rate_correct_to_wrong", "flip_rate_wrong_to_correct", "mean_kl", "edits_per_s"]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_table(rows, out / "editors.png",
               f"{model_name} on {data}: {num_edits} edits of {params!r}, k = {max_steps}, "
               f"base error {100 * base_error:.1f}%")
    log(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'editors.png'}")
    result["table"] = table
    return result
