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

    python benchmarks/bench_edit.py --out benchmarks/results/bench_edit.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shlex
import statistics
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit._core import EditTarget
from fastedit.models import load_pretrained_cifar_resnet


def official_style_steps(model, x, y, editor, params, max_steps) -> int:
    """The official code's edit loop on the live module (full forwards, ``.item()`` per step); the
    parameters stay edited. Returns the number of steps taken."""
    state = editor.init_state([p.detach() for p in params])
    steps = 0
    for _ in range(max_steps):
        z = model(x)
        loss = (z.max(-1).values - z[0, y])[0]
        if loss.item() <= 0:
            break
        grads = torch.autograd.grad(loss, params)
        new, state = editor.step([p.detach() for p in params], list(grads), state)
        with torch.no_grad():
            for p, v in zip(params, new):
                p.copy_(v)
        steps += 1
    return steps


def official_style_edit(model, x, y, editor, names, max_steps):
    params = [p for n, p in model.named_parameters() if n in names]
    backup = [p.detach().clone() for p in params]
    steps = official_style_steps(model, x, y, editor, params, max_steps)
    with torch.no_grad():  # roll back, as the protocol applies every edit to the original model
        for p, b in zip(params, backup):
            p.copy_(b)
    return steps


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="../shared/models/resnet20-12fca82f.th")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    model = load_pretrained_cifar_resnet(args.weights)
    x, y = fdata.load_cifar10_lossless(pathlib.Path(args.data_dir) / "cifar10" / "cifar10_lossless_subset.npz", "test")
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
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": "resnet20 (pretrained)", "params": "layer3", "editor": editor.to_dict(), "edits": args.edits,
        "edit_latency": rows,
        "speedup_prefix_vs_official": rows["official"]["seconds_per_edit"] / rows["prefix"]["seconds_per_edit"],
        "speedup_prefix_vs_no_prefix": rows["no_prefix"]["seconds_per_edit"] / rows["prefix"]["seconds_per_edit"],
        "control_pass_seconds": {"full": full, "suffix": suffix, "images": int(x.shape[0]), "batch": 256},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
