"""Latency of one edit (pretrained CIFAR ResNet-20, layer3, RMSProp, k = 10) and of one control pass.

Compared in the same run, on the same edits:
  * fastedit.edit (frozen prefix once, suffix per step, functional grads)
  * fastedit.edit with use_prefix=False (the whole model per step)
  * the official-code style: full forward + autograd on the live module, `.item()` per step,
    a copy of the parameters saved for rollback (no deepcopy of the module, to be generous)
and for the control set (1,017 images): full forward vs the suffix on cached prefix activations.

Floor (what to expect): a step costs one suffix forward + backward on one image; the prefix
(conv1, layer1, layer2) is ~2/3 of a ResNet-20 forward's FLOPs but ~90% of its CPU time (layer1
works on 32×32 maps), so the prefix should save most of a step and most of each control pass.

    python benchmarks/experiments/bench_edit.py --out benchmarks/results/bench_edit.json
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit._core import EditTarget
from fastedit.models import load_pretrained_cifar_resnet

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402


def official_style_edit(model, x, y, editor, names, max_steps):
    """One edit as the official code makes it (:func:`benchmarks.common.naive_edit`), rolled back."""
    params = [p for n, p in model.named_parameters() if n in names]
    return common.naive_edit(params, lambda: classification_loss(model(x), y), editor, max_steps)


def classification_loss(z: torch.Tensor, y: int) -> torch.Tensor:
    """The edit constraint max_i z_i − z_y of one image's logits."""
    return (z.max(-1).values - z[0, y])[0]


def timed(fn, repeats):
    """(median, all) wall seconds of ``repeats`` calls (the caller warms up)."""
    times = common.time_calls(fn, repeats, warmup=0)
    return statistics.median(times), times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="the CIFAR-10 ResNet-20 checkpoint (default: $FASTEDIT_MODELS/resnet20-12fca82f.th)")
    ap.add_argument("--data-dir", help="folder holding cifar10/ (default: $FASTEDIT_DATA)")
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    machine = common.machine_info()

    model = load_pretrained_cifar_resnet(args.weights or common.models_dir() / "resnet20-12fca82f.th")
    x, y = fdata.load_cifar10_lossless(common.data_dir(args.data_dir) / "cifar10" / "cifar10_lossless_subset.npz", "test")
    x = fdata.to_float_tensor(x, fdata.CIFAR10_MEAN, fdata.CIFAR10_STD)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[0], generator=gen)[:args.edits].tolist()
    labels = torch.randint(0, 10, (args.edits,), generator=gen).tolist()
    editor = fe.RMSProp(1e-3)
    names = {n for n, _ in model.named_parameters() if n.startswith("layer3.")}

    def run(kind):
        steps = 0
        for i, label in zip(idx, labels):
            if kind == "official":
                steps += official_style_edit(model, x[i:i + 1], label, editor, names, 10)
            else:
                r = fe.edit(model, x[i:i + 1], label, editor=editor, params="layer3", use_prefix=(kind == "prefix"))
                steps += r.steps
                r.revert()
        return steps

    rows = {}
    for kind in ("prefix", "no_prefix", "official"):
        run(kind)  # warm-up (also traces the prefix split once)
        med, times = timed(lambda: run(kind), 3)
        rows[kind] = {"seconds_per_edit": med / args.edits, "steps_total": run(kind)}
        print(f"{kind:<10} {1e3 * med / args.edits:7.2f} ms/edit  ({rows[kind]['steps_total']} steps over {args.edits} edits)")

    target = EditTarget.build(model, "layer3")
    with torch.no_grad():
        chunks = [target.prefix(x[i:i + 256]) for i in range(0, x.shape[0], 256)]
        full, _ = timed(lambda: [model(x[i:i + 256]) for i in range(0, x.shape[0], 256)], 5)
        suffix, _ = timed(lambda: [target.logits(a) for a in chunks], 5)
    print(f"control pass over {x.shape[0]} images: full {1e3 * full:.1f} ms, suffix {1e3 * suffix:.1f} ms "
          f"({full / suffix:.1f}x)")
    result = {
        "command": common.command_line(__file__, argv),
        "model": "resnet20 (pretrained)", "params": "layer3", "editor": editor.to_dict(), "edits": args.edits,
        "edit_latency": rows,
        "speedup_prefix_vs_official": rows["official"]["seconds_per_edit"] / rows["prefix"]["seconds_per_edit"],
        "speedup_prefix_vs_no_prefix": rows["no_prefix"]["seconds_per_edit"] / rows["prefix"]["seconds_per_edit"],
        "control_pass_seconds": {"full": full, "suffix": suffix, "images": int(x.shape[0]), "batch": 256},
        "machine": machine, "load_average_at_end": common.load_average(),
    }
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
