"""Evaluation throughput (edits/s) of the paper's protocol on a transformer: fastedit.evaluate against a
naive loop, on the same edits, in one run.

Setting: the MiniLM sentiment classifier (``BertForSequenceClassification`` from the local
all-MiniLM-L6-v2 with a fresh, seeded 2-class head, as bench_edit_transformers.py builds it; or, with
``--classifier``, the one fine-tuned by minilm_rotten_tomatoes.py), editing ``bert.encoder.layer.5``
(the last layer) with RMSProp (lr 2e-5: about 3-4 steps), k = 10. Control set: ``--control`` Rotten
Tomatoes test snippets (split by film, seed 0; a seeded permutation) with their true labels,
tokenised to ``--seq-len`` tokens (padding, truncation, attention masks); edits: ``--edits`` other test
snippets, each edited to the class the model does not predict (every edit flips a prediction).
``--synthetic`` (or missing files): random weights of MiniLM's shapes, random token ids with random
lengths, random labels (the JSON's ``setup.source`` says which).

Compared:
  * ``fastedit``: ``fe.evaluate(model, edits, control, editor, params="bert.encoder.layer.5")``
    (strategy loop): the control set's frozen prefix computed once and cached (HF models are split
    by cached module calls, "call-cache"), per edit the editor steps through layer 5 only and one
    layer-5 (+ pooler + classifier) pass over the cached control activations;
  * ``naive``: per edit ``copy.deepcopy(model)``, ``fe.edit(copy, use_prefix=False)`` (full-model
    forwards), full forwards over the control set in batches of 256, errors and flips in PyTorch (the
    original predictions computed once, inside the timing, as evaluate does).

Both must give identical per-edit steps, control errors and flips (checked and reported).

Floor (written down before optimising), per edit: one layer-5 + pooler + classifier pass over the
cached control hidden states (the bare modules on the inputs layer 5 receives, chunks of 256 rows;
layer 5 computing only the [CLS] position the pooler reads, keys and values at every position, as
``fastedit.rows`` does; the whole layer's pass is timed too and is the naive loop's),
plus the edit's own passes (its prefix on one review, per step one layer-5 forward + backward through
the split, one last forward; ``bench_edit_transformers.passes``), plus the control set's prefix
(embeddings and layers 0-4, once) amortised over the edits. All measured in the same run, in two
rounds, because the cores are shared and the load drifts: before the first evaluate run, and between
the two evaluate runs (``--evaluate-runs``, median; the naive loop follows), each pass the median of
both rounds' samples. ``fraction_of_floor`` = floor / measured seconds per edit. The first round also
times evaluate's own control pass (the call-cache replay) interleaved with the bare one, and builds
evaluate's ``ControlSet`` (its cached bytes, against the bytes of layer 5's inputs). The naive
loop's floor: per edit one full forward over the control set (the same prefix and layer-5 passes) and
the edit's full-model passes (``fraction_of_floor_naive``). ``--profile-edits N`` adds a cProfile of
evaluate (fastedit's functions by cumulative time, every function by own time, ms per edit).

    python benchmarks/experiments/bench_evaluate_transformers.py --out benchmarks/results/bench_evaluate_transformers.json
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pathlib
import pstats
import statistics
import sys
import time

import torch

import fastedit as fe
from fastedit import data as fdata
from fastedit._core import EditTarget, eval_mode
from fastedit.evaluate import DEFAULT_CACHE_BUDGET, ControlSet
from fastedit.rows import RowPruned

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments import bench_edit_transformers as bet  # noqa: E402
from benchmarks.experiments.minilm_rotten_tomatoes import load_classifier, predict, tokenize  # noqa: E402

PARAMS = "bert.encoder.layer.5"
CHUNK = 256  # control rows per forward: evaluate's default batch_size, and the naive loop's


def rows(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def nbytes(tree) -> int:
    return int(sum(t.nbytes for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)))


# ------------------------------------------------------------------------------------------------
# the setting
# ------------------------------------------------------------------------------------------------
def load_setup(args, device: torch.device):
    """(model, (edit inputs, targets), (control inputs, labels), what was loaded)."""
    n_e, n_c = args.edits, args.control
    missing = None
    if not args.synthetic:
        models = common.models_dir(args.models_dir)
        texts_file = common.data_dir(args.data_dir) / "text" / "rotten_tomatoes.tsv"
        if args.classifier is None and not (models / "all-MiniLM-L6-v2").is_dir():
            missing = str(models / "all-MiniLM-L6-v2")
        elif not texts_file.is_file():
            missing = str(texts_file)
    synthetic = args.synthetic or missing is not None
    if missing:
        print(f"{missing} not found: random weights and random tokens (as --synthetic)", flush=True)
    if args.classifier is not None and not synthetic:
        model, tok = load_classifier(args.classifier)
        source = f"fine-tuned classifier from {common.portable(str(args.classifier))}"
    else:
        model, tok, source = bet.minilm_model(None if synthetic else models, synthetic=synthetic)
        if missing:
            source = source.replace("--synthetic", f"{common.portable(missing)} not found")
    if synthetic:
        batch = bet.random_token_batch(n_e + n_c, args.seq_len, seed=1, ragged=True)
        labels = torch.randint(0, 2, (n_e + n_c,), generator=torch.Generator().manual_seed(2))
        pick, rest = torch.arange(n_e), torch.arange(n_e, n_e + n_c)
        data = "random token ids (lengths 8-seq_len, padded), random labels"
    else:
        texts, labels = fdata.load_rotten_tomatoes(common.data_dir(args.data_dir), "test", seed=0)
        if n_e + n_c > len(texts):
            raise SystemExit(f"{n_e} edits + {n_c} control > {len(texts)} test snippets")
        batch = tokenize(tok, texts, args.seq_len)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed))
        pick, rest = order[:n_e], order[n_e:n_e + n_c]
        data = "Rotten Tomatoes test split (by film, seed 0), seeded permutation: edits first, control after"
    model = model.to(device)
    x_e, x_c = ({k: v.to(device) for k, v in rows(batch, i).items()} for i in (pick, rest))
    y_e = (1 - predict(model, x_e, CHUNK)).to(device)  # flip every edit's prediction
    y_c = labels[rest].to(device)
    pad = float(1 - x_c["attention_mask"].double().mean())
    setup = {"source": source, "synthetic": synthetic, "data": data, "edits": n_e, "control": n_c,
             "seq_len": args.seq_len, "control_padding_share": pad, "params": PARAMS}
    return model, (x_e, y_e), (x_c, y_c), setup


# ------------------------------------------------------------------------------------------------
# the naive loop
# ------------------------------------------------------------------------------------------------
def naive_loop(model, edits, control, editor, max_steps: int) -> list[dict]:
    x_e, y_e = edits
    x_c, y_c = control
    base = predict(model, x_c, CHUNK)
    out = []
    for i in range(y_e.shape[0]):
        m = copy.deepcopy(model)
        r = fe.edit(m, rows(x_e, slice(i, i + 1)), y_e[i:i + 1], editor=editor, params=PARAMS, max_steps=max_steps,
                    on_failure="keep", use_prefix=False)
        pred = predict(m, x_c, CHUNK)
        out.append({"steps": int(r.steps), "success": bool(r.success), "errors": int((pred != y_c).sum()),
                    "flips": int((pred != base).sum())})
    return out


def report_rows(rep) -> list[dict]:
    pe = rep.per_edit
    return [{"steps": int(s), "success": bool(ok), "errors": int(e), "flips": int(f)}
            for s, ok, e, f in zip(pe["steps"].tolist(), pe["success"].tolist(), pe["errors"].tolist(),
                                   pe["flips"].tolist())]


# ------------------------------------------------------------------------------------------------
# the floor's passes
# ------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def layer_inputs(model, x_c: dict, device) -> tuple[list, float]:
    """The calls layer 5 receives on each control chunk, from forwards stopped there (embeddings,
    mask, layers 0-4: the control set's prefix, once), and the seconds they took."""
    layer = model.get_submodule(PARAMS)
    got: list = []

    def hook(_module, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    n = x_c["input_ids"].shape[0]
    try:
        with torch.no_grad():
            common.sync(device)
            t0 = time.perf_counter()
            for lo in range(0, n, CHUNK):
                try:
                    model(**rows(x_c, slice(lo, lo + CHUNK)))
                except _Stop:
                    pass
            common.sync(device)
            seconds = time.perf_counter() - t0
    finally:
        handle.remove()
    return got, seconds


def bare_suffix(model, calls: list, layer=None) -> list[torch.Tensor]:
    """Layer 5 (or ``layer``, e.g. a :class:`fastedit.rows.RowPruned` of it), the pooler and the
    classifier, as modules, on the recorded calls (no graph)."""
    run = model.get_submodule(PARAMS) if layer is None else layer
    out = []
    with torch.no_grad():
        for args, kwargs in calls:
            h = run(*args, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
            out.append(model.classifier(model.dropout(model.bert.pooler(h))))
    return out


def evaluate_control_set(model, x_e: dict, x_c: dict, y_c, device):
    """What evaluate caches: its ControlSet, built as evaluate builds it; and the seconds it took."""
    target = EditTarget.build(model, PARAMS).for_inputs(rows(x_e, slice(0, 1)))
    common.sync(device)
    t0 = time.perf_counter()
    cs = ControlSet(target.for_inputs(x_c), x_c, y_c, None, DEFAULT_CACHE_BUDGET)
    common.sync(device)
    return cs, time.perf_counter() - t0


def replay_fn(cs: ControlSet):
    """The control pass evaluate runs: the call-cache replay over every cached chunk, with copies of
    the editable parameters swapped in."""
    ct = cs.target
    theta = [p.detach().clone() for p in ct.params]

    def replay():
        with torch.no_grad():
            return [ct.logits(acts, theta) for acts, *_ in cs]
    return replay


def floor_round(model, edits, control, repeats: int, device, replay: bool = False) -> dict:
    """One round of the floor's passes: the control set's prefix once (forwards stopped at layer 5's
    inputs), the bare layer-5 pass over those inputs (``repeats`` times), the edit's own passes (on
    the first edit). With ``replay``, also evaluate's ControlSet, and its replayed control pass timed
    call by call against the bare one (the same arithmetic: interleaved, so that load drift hits
    both alike)."""
    x_e, y_e = edits
    x_c, y_c = control
    out = {}
    with eval_mode(model):
        calls, out["control_prefix_once_s"] = layer_inputs(model, x_c, device)
        out["layer5_input_bytes"] = nbytes(calls)
        bare = lambda: bare_suffix(model, calls)  # noqa: E731
        # layer 5 computing only the [CLS] position the pooler reads (keys and values at every position:
        # the arithmetic of fastedit's replay), traced once per chunk shape before the timing
        at_cls = RowPruned(model.get_submodule(PARAMS), 0, 1)
        first = lambda: bare_suffix(model, calls, at_cls)  # noqa: E731
        first()
        if replay:
            cs, out["control_set_build_s"] = evaluate_control_set(model, x_e, x_c, y_c, device)
            rep = replay_fn(cs)
            times = common.time_round_robin({"bare": bare, "first": first, "replay": rep}, repeats, device=device)
            out["control_suffix_bare_all_s"], out["control_suffix_replay_all_s"] = times["bare"], times["replay"]
            out["control_suffix_first_all_s"] = times["first"]
            out["bare_vs_replay_logits_max_abs_diff"] = float((torch.cat(bare()) - torch.cat(rep())).abs().max())
            out["rows_pruned"] = [n for n, m in model.named_modules() if any(r.module is m for r in cs.target.split.rows)]
            first = cs.chunks[0][2]
            out["control_cached_bytes"], out["prefix_method"] = int(cs.cached_bytes), cs.target.split.method
            out["control_cached_first_chunk"] = {
                "rows": cs.chunks[0][1] - cs.chunks[0][0],
                "cached_calls": len(first.plan) if hasattr(first, "plan") else None,
                "tensors": len([t for t in torch.utils._pytree.tree_leaves(first) if isinstance(t, torch.Tensor)]),
                "bytes": nbytes(first)}
        else:
            times = common.time_round_robin({"bare": bare, "first": first}, repeats, device=device)
            out["control_suffix_bare_all_s"], out["control_suffix_first_all_s"] = times["bare"], times["first"]
    out["edit_passes_ms"] = bet.passes(model, rows(x_e, slice(0, 1)), fe.Classification(y_e[:1]), PARAMS,
                                       max(3, repeats))
    out["load_average"] = common.load_average()
    return out


def combine_rounds(rounds: list[dict]) -> dict:
    """The floor's passes over all rounds (the machine is shared: a round next to each timed run):
    medians of every sample, each round's values kept."""
    passes = rounds[0]["edit_passes_ms"]
    out = {
        "control_prefix_once_s": statistics.median(r["control_prefix_once_s"] for r in rounds),
        "control_suffix_bare_s": statistics.median(t for r in rounds for t in r["control_suffix_bare_all_s"]),
        "control_suffix_first_s": statistics.median(t for r in rounds for t in r["control_suffix_first_all_s"]),
        "edit_passes_ms": {k: statistics.median(r["edit_passes_ms"][k] for r in rounds) if isinstance(v, float) else v
                           for k, v in passes.items()},
        "rounds": rounds,
    }
    for r in rounds:  # what only the replay round measured
        out.update({k: v for k, v in r.items() if k not in out and not k.endswith("_all_s") and k != "load_average"})
        if "control_suffix_replay_all_s" in r:
            out["control_suffix_replay_s"] = statistics.median(r["control_suffix_replay_all_s"])
            out["control_suffix_bare_same_round_s"] = statistics.median(r["control_suffix_bare_all_s"])
    return out


# ------------------------------------------------------------------------------------------------
# where evaluate's time goes
# ------------------------------------------------------------------------------------------------
def profile_evaluate(run, n_edits: int, top: int = 25) -> dict:
    """cProfile of ``run()`` (an evaluate call), in ms per edit: fastedit's own functions by
    cumulative time (where evaluate's time goes: the control set's construction, the edit loops, the
    control passes, the metrics), and every function by own time (which operations)."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    root = str(common.ROOT) + "/"

    def name(key):
        file, line, fn = key
        return f"{file.replace(root, '')}:{line}({fn})"

    entries = [(name(k), v[2], v[3], v[1]) for k, v in stats.stats.items()]  # own, cumulative, calls

    def table(chosen, i):
        return [{"function": e[0], "cumulative_ms_per_edit": 1e3 * e[2] / n_edits,
                 "own_ms_per_edit": 1e3 * e[1] / n_edits, "calls": e[3]}
                for e in sorted(chosen, key=lambda e: -e[i])[:top]]

    return {"edits": n_edits, "total_ms_per_edit": 1e3 * max(e[2] for e in entries) / n_edits,
            "fastedit_by_cumulative_time": table([e for e in entries if e[0].startswith("fastedit/")], 2),
            "by_own_time": table(entries, 1)}


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models-dir", help="folder holding all-MiniLM-L6-v2/ (default: $FASTEDIT_MODELS)")
    ap.add_argument("--data-dir", help="folder holding text/rotten_tomatoes.tsv (default: $FASTEDIT_DATA)")
    ap.add_argument("--classifier", type=pathlib.Path, default=None,
                    help="a classifier saved by minilm_rotten_tomatoes.py (default: MiniLM with a fresh head)")
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--control", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5, help="RMSProp lr (about 3-4 steps per edit)")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the floor's passes (median)")
    ap.add_argument("--evaluate-runs", type=int, default=2,
                    help="timed evaluate runs, a floor round between them (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny: 3 edits, 64 control rows, 1 repeat and run (tests)")
    ap.add_argument("--synthetic", action="store_true",
                    help="random weights of MiniLM's shapes and random token ids (no files needed)")
    ap.add_argument("--profile-edits", type=int, default=0,
                    help="after the timings, cProfile evaluate on this many edits and add the top functions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.quick:
        args.edits, args.control, args.repeats, args.evaluate_runs = 3, 64, 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (machine_info records its version)
    device = torch.device(args.device)
    out = {"command": common.command_line(__file__, argv), "machine": common.machine_info(device),
           "load_average_before": common.load_average()}
    wall0 = time.perf_counter()
    model, edits, control, setup = load_setup(args, device)
    editor = fe.RMSProp(args.lr)
    n = args.edits
    print(f"{setup['source']}; {n} edits, {args.control} control rows of {args.seq_len} tokens", flush=True)

    def evaluate(e=edits):
        return fe.evaluate(model, e, control, editor, params=PARAMS, max_steps=args.max_steps, progress=False,
                           strategy="loop")


    first = (rows(edits[0], slice(0, 1)), edits[1][:1])
    fe.evaluate(model, first, (rows(control[0], slice(0, 8)), control[1][:8]), editor, params=PARAMS,
                max_steps=args.max_steps, progress=False)  # warm-up: the split, lazy initialisations

    rounds = [floor_round(model, edits, control, args.repeats, device, replay=True)]
    r0 = rounds[0]
    print(f"control prefix once {r0['control_prefix_once_s']:.2f} s; layer-5 pass over the control set "
          f"{statistics.median(r0['control_suffix_bare_all_s']):.2f} s bare, "
          f"{statistics.median(r0['control_suffix_first_all_s']):.2f} s bare at [CLS] only, "
          f"{statistics.median(r0['control_suffix_replay_all_s']):.2f} s through the replay (interleaved, pruned: "
          f"{r0['rows_pruned']}); cached "
          f"{r0['control_cached_bytes'] / 2 ** 20:.0f} MiB ({r0['prefix_method']}), layer-5 inputs "
          f"{r0['layer5_input_bytes'] / 2 ** 20:.0f} MiB", flush=True)

    runs = []  # evaluate, twice by default: before and after the second floor round
    for i in range(args.evaluate_runs):
        if i:
            rounds.append(floor_round(model, edits, control, args.repeats, device))
        peak, (rep, secs), how = common.peak_memory_increase(lambda: common.wall(evaluate, device), device)
        runs.append({"seconds": secs, "peak_memory_increase_bytes": peak, "memory_measured_by": how,
                     "load_average_after": common.load_average(), "report": rep.to_dict(), "per_edit": report_rows(rep)})
        print(f"fastedit  {n / secs:7.3f} edits/s ({secs / n:6.2f} s/edit), mean steps {rep.mean_steps:.2f}, "
              f"prefix {rep.prefix_method}", flush=True)
    if len(rounds) == 1:
        rounds.append(floor_round(model, edits, control, args.repeats, device))  # next to the naive loop's run
    secs = statistics.median(r["seconds"] for r in runs)
    results = {"fastedit": {"seconds": secs, "seconds_per_edit": secs / n, "edits_per_s": n / secs,
                            "seconds_all_runs": [r["seconds"] for r in runs],
                            "peak_memory_increase_bytes": max(r["peak_memory_increase_bytes"] or 0 for r in runs),
                            "memory_measured_by": runs[0]["memory_measured_by"],
                            "report": runs[0]["report"], "per_edit": runs[0]["per_edit"],
                            "runs_identical": all(r["per_edit"] == runs[0]["per_edit"] for r in runs),
                            "runs": [{k: v for k, v in r.items() if k not in ("report", "per_edit")} for r in runs]}}
    peak, (naive_rows, secs), how = common.peak_memory_increase(
        lambda: common.wall(lambda: naive_loop(model, edits, control, editor, args.max_steps), device), device)
    results["naive"] = {"seconds": secs, "seconds_per_edit": secs / n, "edits_per_s": n / secs,
                        "peak_memory_increase_bytes": peak, "memory_measured_by": how,
                        "load_average_after": common.load_average(), "per_edit": naive_rows}
    print(f"naive     {n / secs:7.3f} edits/s ({secs / n:6.2f} s/edit)", flush=True)

    fast_rows = results["fastedit"]["per_edit"]
    same = {k: [r[k] for r in fast_rows] == [r[k] for r in naive_rows] for k in ("steps", "success", "errors", "flips")}

    floor = combine_rounds(rounds)
    steps = rep.per_edit["steps"].double()
    p = floor["edit_passes_ms"]
    mean_steps = float(steps.mean()) if device.type == "cpu" else float(args.max_steps)  # no early exit on GPUs
    changed = float((steps > 0).double().mean()) if device.type == "cpu" else 1.0  # edits needing a control pass
    edit_s = 1e-3 * (p["prefix_ms"] + mean_steps * p["suffix_forward_backward_ms"] + p["suffix_forward_ms"])
    parts = {"control_prefix_amortised": floor["control_prefix_once_s"] / n,
             "control_suffix_pass": changed * floor["control_suffix_first_s"], "edit_passes": edit_s}
    floor_s = sum(parts.values())
    naive_floor = (floor["control_prefix_once_s"] + floor["control_suffix_bare_s"]
                   + 1e-3 * (mean_steps * p["full_forward_backward_ms"] + p["full_forward_ms"]))
    fast_s = results["fastedit"]["seconds_per_edit"]
    summary = {
        "edits_per_s": {k: v["edits_per_s"] for k, v in results.items()},
        "seconds_per_edit": {k: v["seconds_per_edit"] for k, v in results.items()},
        "speedup_vs_naive": results["naive"]["seconds_per_edit"] / fast_s,
        "floor_seconds_per_edit": floor_s, "floor_parts_seconds_per_edit": parts,
        "edits_changing_the_model": changed, "floor_mean_steps": mean_steps,
        "fraction_of_floor": floor_s / fast_s,
        "naive_floor_seconds_per_edit": naive_floor,
        "fraction_of_floor_naive": naive_floor / results["naive"]["seconds_per_edit"],
        "floor_speedup": naive_floor / floor_s,
        "prefix_method": rep.prefix_method, "control_cached_bytes": floor["control_cached_bytes"],
        "layer5_input_bytes": floor["layer5_input_bytes"],
        "peak_memory_increase_bytes": {k: v["peak_memory_increase_bytes"] for k, v in results.items()},
        "mean_steps": rep.mean_steps, "success_rate": rep.success_rate, "base_error": rep.base_error,
        "drawdown": rep.drawdown, "identical_per_edit": same, "identical": all(same.values()),
        "evaluate_runs_identical": results["fastedit"]["runs_identical"],
    }
    for k, v in summary.items():
        print(f"{k}: {v}", flush=True)
    if args.profile_edits:
        k = min(args.profile_edits, n)
        sub = (rows(edits[0], slice(0, k)), edits[1][:k])
        out["profile"] = profile_evaluate(lambda: evaluate(sub), k)
        for e in out["profile"]["fastedit_by_cumulative_time"][:15]:
            print(f"  {e['cumulative_ms_per_edit']:9.1f} ms/edit cumulative {e['own_ms_per_edit']:9.1f} own  "
                  f"{e['function']}", flush=True)
    out.update({"setup": setup, "device": str(device), "editor": editor.to_dict(), "max_steps": args.max_steps,
                "results": results, "floor": floor, "summary": summary,
                "wall_seconds": time.perf_counter() - wall0, "load_average_after": common.load_average()})
    common.write_json(args.out, out)
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)", flush=True)
    return out


if __name__ == "__main__":
    main()
