"""Evaluation throughput (edits/s) of the paper's protocol: fastedit.evaluate against the official
implementation's protocol and a naive loop, on the same edits, in one run.

Setting: pretrained CIFAR ResNet-20, editing ``layer3`` with RMSProp (k = 10), control set = the 1,017
exact CIFAR-10 test images, edits = test images with random labels (seeded).

Compared:
  * ``official``: the official code's protocol: for each edit, edit the live module with full-model
    forwards and a ``.item()`` check per step, classify the whole control set with full-model forwards
    (``--official-batch`` images per forward; one batch by default), roll the parameters back;
  * ``naive``: for each edit, ``copy.deepcopy`` the model, ``fastedit.edit(use_prefix=False)``, full
    forwards over the control set in batches of 256, metrics in PyTorch;
  * ``fastedit``: ``fastedit.evaluate`` (frozen prefix of the control set computed once, suffix-only
    edit steps and control passes, satisfied edits skip the control pass), with ``strategy="loop"``
    and ``strategy="vmap"`` (edits side by side under torch.func.vmap).

Floor (written down before optimising): every edit must at least classify the control set with the
edited model; only the suffix after the editable stage depends on the edit, so the floor per edit is
one suffix forward over the 1,017 cached prefix activations (measured in the same run, ~0.07 s on
this CPU with 2 threads), plus the edit's own steps (one suffix forward+backward on one image each).
Expected: evaluate ≈ floor + steps·(~10 ms); official ≈ full forward (~0.5–1 s) + steps·full fwd/bwd.
``fraction_of_floor`` compares with that control pass alone; ``fraction_of_floor_full`` with all the
work an evaluation must do: the control set's prefix and its reference logits once (one full forward
over the control set, amortised over the edits), one control suffix pass per edit that changed the
model, and the edit's own passes (as in bench_edit.py). The floor pass is timed in each of
``--rounds`` rounds, between runs of ``fastedit.evaluate``: medians of both.

All methods must give identical per-edit steps, successes and error counts (checked and reported).

    python benchmarks/experiments/bench_evaluate.py --out benchmarks/results/bench_evaluate.json
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys

import torch

import fastedit as fe
from fastedit._core import EditTarget

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments.bench_edit import classification_loss, load_setup, pass_times  # noqa: E402


def official_protocol(model, x_e, y_e, x_c, y_c, editor, names, max_steps, control_batch):
    """Per edit: steps, errors on the control set (the official code's structure)."""
    params = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for i in range(x_e.shape[0]):
        backup = [p.detach().clone() for p in params]
        x, y = x_e[i:i + 1], int(y_e[i])
        steps = common.naive_edit(params, lambda: classification_loss(model(x), y), editor, max_steps,
                                  roll_back=False)
        with torch.no_grad():
            pred = torch.cat([model(x_c[lo:lo + control_batch]).argmax(-1) for lo in range(0, x_c.shape[0], control_batch)])
            for p, b in zip(params, backup):
                p.copy_(b)
        rows.append((steps, int((pred != y_c).sum())))
    return rows


def naive_loop(model, x_e, y_e, x_c, y_c, editor, max_steps):
    rows = []
    for i in range(x_e.shape[0]):
        m = copy.deepcopy(model)
        r = fe.edit(m, x_e[i:i + 1], y_e[i:i + 1], editor=editor, params="layer3", max_steps=max_steps,
                    on_failure="keep", use_prefix=False)
        with torch.no_grad():
            pred = torch.cat([m(x_c[lo:lo + 256]).argmax(-1) for lo in range(0, x_c.shape[0], 256)])
        rows.append((r.steps, int((pred != y_c).sum())))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--weights", help="the CIFAR-10 ResNet-20 checkpoint (default: $FASTEDIT_MODELS/resnet20-12fca82f.th)")
    ap.add_argument("--data-dir", help="folder holding cifar10/ (default: $FASTEDIT_DATA)")
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--official-edits", type=int, default=20, help="the official protocol is slow: fewer edits")
    ap.add_argument("--official-batch", type=int, default=1017, help="control images per forward (official)")
    ap.add_argument("--lr", type=float, default=None, help="RMSProp lr (default: the calibrated demo value)")
    ap.add_argument("--vmap-groups", default="4,16", help="edits per group for the vmap strategy")
    ap.add_argument("--chunk-sizes", default="64,128,256,512,1017", help="control chunk sizes to time")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the floor pass interleaved with fastedit.evaluate (loop); medians reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true", help="random weights, images and labels (no data needed)")
    ap.add_argument("--control", type=int, default=None, help="use the first N control images (default: all 1,017)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = common.machine_info(device)

    model, x, y, setup = load_setup(args, device)
    if args.control is not None:
        x, y = x[:args.control], y[:args.control]
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[0], generator=gen)[:args.edits].to(device)
    x_e, y_e = x[idx], torch.randint(0, 10, (len(idx),), generator=gen).to(device)
    args.edits = len(idx)
    if args.lr is None:
        from fastedit.demo import HPARAMS_FILE
        args.lr = json.loads(HPARAMS_FILE.read_text())["settings"]["resnet"]["rmsprop"]["lr"]
    editor = fe.RMSProp(args.lr)
    names = {n for n, _ in model.named_parameters() if n.startswith("layer3.")}
    results: dict = {}

    def record(name, seconds, n, rows=None):
        results[name] = {"seconds": seconds, "edits": n, "seconds_per_edit": seconds / n, "edits_per_s": n / seconds}
        if rows is not None:
            results[name]["per_edit"] = rows
        print(f"{name:<16} {n / seconds:7.2f} edits/s  ({1000 * seconds / n:7.1f} ms/edit)", flush=True)

    # floor: one suffix forward over the cached control activations, at several chunk sizes (the
    # best one is the floor; evaluate's default batch_size is 256), then timed again in every round
    # between runs of fastedit.evaluate, so that both see the same state of this shared machine
    target = EditTarget.build(model, "layer3")
    chunk_seconds = {}
    with torch.no_grad():
        for bs in [int(v) for v in args.chunk_sizes.split(",")]:
            acts = [target.prefix(x[lo:lo + bs]) for lo in range(0, x.shape[0], bs)]
            times = common.time_calls(lambda acts=acts: [target.logits(a) for a in acts], 5, device=device)
            chunk_seconds[bs] = statistics.median(times)
            print(f"suffix forward over {x.shape[0]} images in chunks of {bs}: {1000 * chunk_seconds[bs]:.1f} ms", flush=True)
        best = min(chunk_seconds, key=chunk_seconds.get)
        best_acts = [target.prefix(x[lo:lo + best]) for lo in range(0, x.shape[0], best)]
        chunks = [x[lo:lo + 256] for lo in range(0, x.shape[0], 256)]
        prefix_once = statistics.median(common.time_calls(lambda: [target.prefix(c) for c in chunks], 3, device=device))
        # evaluate's set-up: the prefix and the original logits (the reference predictions) of every chunk
        reference_once = statistics.median(common.time_calls(
            lambda: [target.logits(target.prefix(c)) for c in chunks], 3, device=device))

    fe.evaluate(model, (x_e[:2], y_e[:2]), (x, y), editor=editor, params="layer3", progress=False)  # warm-up
    floor_rounds, loop_rounds = [], []
    for _ in range(args.rounds):
        with torch.no_grad():
            floor_rounds.append(statistics.median(common.time_calls(
                lambda: [target.logits(a) for a in best_acts], 3, warmup=0, device=device)))
        rep, secs = common.wall(lambda: fe.evaluate(model, (x_e, y_e), (x, y), editor=editor, params="layer3",
                                                    progress=False, strategy="loop"), device)
        loop_rounds.append(secs)
    floor = statistics.median(floor_rounds)
    print(f"floor: suffix forward over {x.shape[0]} control images = {1000 * floor:.1f} ms "
          f"(chunks of {best}, median of {args.rounds} rounds)", flush=True)
    record("fastedit_loop", statistics.median(loop_rounds), args.edits)
    results["fastedit_loop"]["seconds_all_rounds"] = loop_rounds
    fast_rows = list(zip(rep.per_edit["steps"].tolist(), rep.per_edit["errors"].tolist()))
    same = {}
    for g in [int(v) for v in args.vmap_groups.split(",") if v]:
        rv, secs = common.wall(lambda g=g: fe.evaluate(model, (x_e, y_e), (x, y), editor=editor, params="layer3",
                                                       progress=False, strategy="vmap", edits_per_group=g), device)
        record(f"fastedit_vmap{g}", secs, args.edits)
        same[f"fastedit_vmap{g}"] = list(zip(rv.per_edit["steps"].tolist(), rv.per_edit["errors"].tolist())) == fast_rows

    rows, secs = common.wall(lambda: naive_loop(model, x_e, y_e, x, y, editor, 10), device)
    record("naive", secs, args.edits)
    same["naive"] = rows == fast_rows
    n_off = min(args.official_edits, args.edits)
    rows, secs = common.wall(lambda: official_protocol(model, x_e[:n_off], y_e[:n_off], x, y, editor, names, 10,
                                                       args.official_batch), device)
    record("official", secs, n_off)
    same["official"] = rows == fast_rows[:n_off]

    # the whole floor: the control set's prefix and reference logits once (amortised), one control
    # suffix pass per edit that changed the model, and the edit's own passes (prefix, suffix forward
    # and backward per step, one last suffix forward; every masked step where the loop does not exit
    # early)
    steps = rep.per_edit["steps"].double()
    passes = pass_times(model, x_e[:1], 20, device)
    edit_steps = float(steps.mean()) if device.type == "cpu" else 10.0
    edit_floor = 1e-3 * (passes["prefix_forward"] + edit_steps * passes["suffix_forward_backward"]
                         + passes["suffix_forward"])
    changed = float((steps > 0).double().mean())
    floor_full = reference_once / args.edits + changed * floor + edit_floor
    fast = results["fastedit_loop"]["seconds_per_edit"]
    summary = {
        "speedup_vs_official": results["official"]["seconds_per_edit"] / fast,
        "speedup_vs_naive": results["naive"]["seconds_per_edit"] / fast,
        "floor_seconds_per_edit": floor,
        "suffix_seconds_by_chunk_size": chunk_seconds,
        "floor_chunk_size": best,
        "floor_seconds_all_rounds": floor_rounds,
        "fraction_of_floor": floor / fast,
        "floor_full_seconds_per_edit": floor_full,
        "fraction_of_floor_full": floor_full / fast,
        "floor_parts_seconds": {"control_prefix_once": prefix_once, "control_reference_once": reference_once,
                                "control_suffix_pass": floor,
                                "edits_changing_the_model": changed, "edit_passes": edit_floor,
                                "passes_ms": passes},
        "mean_steps": rep.mean_steps,
        "identical_steps_and_errors": same,
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    out = {"command": common.command_line(__file__, argv), "setup": setup, "device": str(device),
           "editor": editor.to_dict(),
           "control_images": int(x.shape[0]), "results": results, "summary": summary,
           "machine": machine, "load_average_at_end": common.load_average()}
    common.write_json(args.out, out)


if __name__ == "__main__":
    main()
