"""Edit latency on transformers: the MiniLM sentiment classifier and a GPT-2-small-shaped language model.

Compared in the same run, on the same edits (each applied to the original model, then reverted):
  * ``fe.edit`` with the frozen prefix (HF models cannot be traced by fx: the prefix is the cached
    module calls of :mod:`fastedit.call_cache`);
  * ``fe.edit(use_prefix=False)``: the whole model at every step;
  * a naive loop: the full model forward, ``.item()`` on the constraint, autograd and the same
    editor update on the live module, every step (the official Editable code's pattern).

Models:
  * MiniLM (``all-MiniLM-L6-v2``, 6 layers, hidden 384) as ``BertForSequenceClassification`` with a
    fresh 2-class head, editing ``bert.encoder.layer.5`` (the last layer) on 64-token inputs (runs of
    Rotten Tomatoes snippets when the data are there); each edit flips the prediction. Without the
    pretrained files, the same shapes with random weights (the JSON says which).
  * GPT-2 small shapes (12 layers, hidden 768, vocabulary 50,257; random weights) editing
    ``transformer.h.11.mlp`` with ``fe.TokenTargets(causal=True)``: 60 prompt tokens must be continued
    by 4 given tokens (64 in all). The edit's steps compute the head at the 4 labelled positions
    (``logits_kept``, :mod:`fastedit.kept_logits`); the naive loop computes all 64.

The floor of an edit with the prefix, from the model's own passes measured here: one prefix run,
then per step one suffix forward + backward, and one last suffix forward that finds the edit
satisfied (for GPT-2 with the head at the labelled positions, as the edit runs them; the passes with
the whole head are reported beside them). The naive loop's floor: per step a full forward + backward to the edited layer, plus one
last full forward. Their ratio is the most the prefix can give; ``efficiency`` = floor / measured.

    python benchmarks/experiments/bench_edit_transformers.py --out benchmarks/results/bench_edit_transformers.json
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import pathlib
import resource
import statistics
import sys
import time

import torch

import fastedit as fe
from fastedit._core import EditTarget, clear_split_cache, eval_mode
from fastedit.kept_logits import keep_labelled_logits

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the naive loop
# ------------------------------------------------------------------------------------------------
def naive_edit(model, inputs: dict, constraint, names, editor, max_steps: int) -> int:
    """:func:`benchmarks.common.naive_edit` on an HF model (full forwards, ``.item()`` per step)."""
    params = [p for n, p in model.named_parameters() if n in names]
    return common.naive_edit(params, lambda: constraint.per_sample(model(**inputs).logits).amax(), editor, max_steps)


# ------------------------------------------------------------------------------------------------
# the model's own passes (the floor)
# ------------------------------------------------------------------------------------------------
def median_ms(fn, repeats: int) -> float:
    return common.summary_ms(common.time_calls(fn, repeats))["median_ms"]


def passes(model, inputs: dict, constraint, params: str, repeats: int) -> dict:
    """Milliseconds of the passes an edit is made of, and the prefix's cached bytes."""
    target = EditTarget.build(model, params, inputs=inputs)
    names, theta = target.names, [p.detach().clone() for p in target.params]
    editable = [p for n, p in model.named_parameters() if n in set(names)]

    def full_forward():
        with torch.no_grad():
            model(**inputs)

    def full_forward_backward():
        loss = constraint.per_sample(model(**inputs).logits).amax()
        torch.autograd.grad(loss, editable)

    acts = target.prefix(inputs)
    # the steps of a token edit compute the head at the labelled positions only (fastedit.kept_logits)
    kept, _ = keep_labelled_logits(model, constraint, target.entry, target.params,
                                   lambda: target.logits(acts, theta).detach())
    steps_constraint = kept.constraint if kept is not None else constraint

    def suffix_forward_backward(whole: bool = False):
        leaves = [t.requires_grad_() for t in theta]
        with contextlib.nullcontext() if whole or kept is None else kept.installed(frozen=True):
            loss = (constraint if whole else steps_constraint).per_sample(target.logits(acts, leaves)).amax()
            torch.autograd.grad(loss, leaves)

    def suffix_forward(whole: bool = False):
        leaves = [t.requires_grad_() for t in theta]
        with contextlib.nullcontext() if whole or kept is None else kept.installed(frozen=True):
            (constraint if whole else steps_constraint).per_sample(target.logits(acts, leaves)).amax()

    cached = sum(t.nbytes for t in torch.utils._pytree.tree_leaves(acts) if isinstance(t, torch.Tensor))
    with eval_mode(model):
        return {
            "full_forward_ms": median_ms(full_forward, repeats),
            "full_forward_backward_ms": median_ms(full_forward_backward, repeats),
            "prefix_ms": median_ms(lambda: target.prefix(inputs), repeats),
            "suffix_forward_backward_ms": median_ms(suffix_forward_backward, repeats),
            "suffix_forward_ms": median_ms(suffix_forward, repeats),
            "logits_kept": kept.index.numel() if kept is not None else 0,
            **({"suffix_forward_backward_whole_head_ms": median_ms(lambda: suffix_forward_backward(True), repeats),
                "suffix_forward_whole_head_ms": median_ms(lambda: suffix_forward(True), repeats)}
               if kept is not None else {}),
            "prefix_method": target.split.method,
            "prefix_cached_bytes": int(cached),
        }


def split_costs(model, inputs: dict, params: str) -> dict:
    """Seconds to build the frozen-prefix split (fx attempt, then the cached-call split and its bit-for-bit
    verification), against ``torch.export`` of the same model at this one input shape (another length
    needs another export, or declared dynamic dimensions)."""
    clear_split_cache(model)
    t0 = time.perf_counter()
    target = EditTarget.build(model, params, inputs=inputs)
    build = time.perf_counter() - t0
    out = {"split_build_s": build, "method": target.split.method}
    t0 = time.perf_counter()
    try:
        torch.export.export(model, (), kwargs=dict(inputs), strict=False)
        out["torch_export_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported, not needed
        out["torch_export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


# ------------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------------
def bench_model(name: str, model, edits: list, params: str, editor, max_steps: int, repeats: int,
                compiled: bool = False) -> dict:
    model.eval()
    names = {n for n, _ in model.named_parameters() if n == params or n.startswith(params + ".")}
    rows: dict[str, dict] = {}

    def run(kind: str) -> list[int]:
        steps = []
        for inputs, target in edits:
            if kind == "naive":
                steps.append(naive_edit(model, inputs, target, names, editor, max_steps))
            else:
                r = fe.edit(model, inputs, target, editor=editor, params=params, max_steps=max_steps,
                            use_prefix=(kind != "no_prefix"), compile=(kind == "compiled"))
                compile_info[kind] = compile_info.get(kind, 0.0) + r.compile_seconds
                kept_info[kind] = (r.logits_kept, r.logits_reason)
                if kind == "compiled" and not r.compiled:
                    raise SystemExit(f"{name}: compile=True ran eager: {r.compile_reason}")
                steps.append(r.steps)
                if not r.success:
                    print(f"  {name} {kind}: an edit failed in {max_steps} steps", flush=True)
                r.revert()
        return steps

    kinds = ("prefix", "no_prefix", "naive") + (("compiled",) if compiled else ())
    compile_info: dict[str, float] = {}
    kept_info: dict[str, tuple] = {}
    steps = {kind: run(kind) for kind in kinds}  # warm-up (also builds the split once, and compiles)
    compile_seconds = compile_info.get("compiled", 0.0)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(repeats):  # interleaved, in a rotating order: drift hits every method alike
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            t0 = time.perf_counter()
            run(kind)
            times[kind].append(time.perf_counter() - t0)
    for kind in kinds:
        per_edit = 1e3 * statistics.median(times[kind]) / len(edits)
        rows[kind] = {"ms_per_edit": per_edit, "mean_steps": statistics.mean(steps[kind]), "steps": steps[kind],
                      "ms_per_edit_all_repeats": [1e3 * t / len(edits) for t in times[kind]]}
        print(f"  {name:<8} {kind:<10} {per_edit:9.1f} ms/edit  mean steps {statistics.mean(steps[kind]):.2f}",
              flush=True)

    inputs0, target0 = edits[0]
    floor = passes(model, inputs0, target0, params, max(3, repeats))
    build = split_costs(model, inputs0, params)
    s = rows["prefix"]["mean_steps"]
    floor_prefix = floor["prefix_ms"] + s * floor["suffix_forward_backward_ms"] + floor["suffix_forward_ms"]
    floor_naive = s * floor["full_forward_backward_ms"] + floor["full_forward_ms"]
    # speed-ups per repeat (the methods of one repeat ran back to back): robust to slow phases of the machine
    ratios = [n / p for n, p in zip(times["naive"], times["prefix"])]
    no_prefix_ratios = [n / p for n, p in zip(times["no_prefix"], times["prefix"])]
    speedup = statistics.median(ratios)
    out = {
        "params": params, "editor": editor.to_dict(), "max_steps": max_steps, "edits": len(edits),
        "latency": rows, "passes": floor, "split": build,
        "logits_kept": {kind: {"positions": k, "reason": why} for kind, (k, why) in kept_info.items()},
        "speedup_vs_naive": speedup, "speedup_vs_naive_range": [min(ratios), max(ratios)],
        "speedup_vs_no_prefix": statistics.median(no_prefix_ratios),
        "floor_ms_per_edit": {"prefix": floor_prefix, "naive": floor_naive},
        "floor_speedup": floor_naive / floor_prefix,
        "efficiency_prefix": floor_prefix / rows["prefix"]["ms_per_edit"],
        "efficiency_naive": floor_naive / rows["naive"]["ms_per_edit"],
    }
    if compiled:
        out["compile_seconds"] = compile_seconds
        out["speedup_compiled_vs_naive"] = statistics.median(n / c for n, c in zip(times["naive"], times["compiled"]))
        out["speedup_compiled_vs_eager"] = statistics.median(p / c for p, c in zip(times["prefix"], times["compiled"]))
        print(f"  {name:<8} compiled: {out['speedup_compiled_vs_naive']:.2f}x the naive loop, "
              f"{out['speedup_compiled_vs_eager']:.2f}x eager; compiled in {compile_seconds:.1f} s", flush=True)
    print(f"  {name:<8} speed-up over the naive loop {speedup:.2f}x (repeats {min(ratios):.2f}-{max(ratios):.2f}x; "
          f"floor {out['floor_speedup']:.2f}x, "
          f"prefix at {100 * out['efficiency_prefix']:.0f}% of its floor)", flush=True)
    return out


def minilm_model(models_dir: pathlib.Path | None, synthetic: bool = False):
    """``(model, tokenizer, source)``: ``BertForSequenceClassification`` from the pretrained
    all-MiniLM-L6-v2 in ``models_dir`` with a fresh 2-class head (seeded), in eval mode; with random
    weights of MiniLM's shapes and no tokenizer when ``synthetic`` or the files are missing
    (``source`` says which)."""
    import transformers as tf
    path = None if models_dir is None else models_dir / "all-MiniLM-L6-v2"
    torch.manual_seed(0)  # the fresh classification head
    if not synthetic and path is not None and path.is_dir():
        tf.logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected
        model = tf.BertForSequenceClassification.from_pretrained(path, num_labels=2)
        tok = tf.AutoTokenizer.from_pretrained(path)
        source = "pretrained all-MiniLM-L6-v2, fresh 2-class head"
    else:
        cfg = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            num_labels=2)
        model, tok = tf.BertForSequenceClassification(cfg), None
        source = "random weights with MiniLM's shapes (" + (
            "--synthetic" if synthetic else "pretrained files not found") + ")"
    return model.eval(), tok, source


def random_token_batch(n: int, seq_len: int, seed: int, ragged: bool = False) -> dict:
    """A tokenizer-like batch of ``n`` rows of random WordPiece ids (1000-29999): full rows, or with
    ``ragged`` a random length in [8, seq_len] per row, padded with id 0 and masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if ragged:
        lengths = torch.randint(min(8, seq_len), seq_len + 1, (n, 1), generator=g)
        mask = (torch.arange(seq_len) < lengths).to(ids.dtype)
        ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def minilm_setup(models_dir: pathlib.Path, data_dir: pathlib.Path, n_edits: int, seq_len: int):
    model, tok, source = minilm_model(models_dir)
    texts = _texts(data_dir, n_edits)
    if tok is not None:
        batch = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    else:
        batch = random_token_batch(n_edits, seq_len, seed=1)
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    edits = [({k: v[i:i + 1] for k, v in batch.items()}, fe.Classification(1 - pred[i:i + 1])) for i in range(n_edits)]
    return model, edits, source


def _texts(data_dir: pathlib.Path, n: int) -> list[str]:
    """``n`` texts of at least 64 tokens: runs of consecutive Rotten Tomatoes snippets (truncated to
    64 tokens by the tokenizer), or a fixed sentence without the data."""
    path = data_dir / "text" / "rotten_tomatoes.tsv"
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            snippets = [r["text"] for r in csv.DictReader(f, delimiter="\t")]
        return [" ".join(snippets[6 * i:6 * i + 6]) for i in range(n)]
    return [" ".join(["the film is a quiet triumph of craft and feeling"] * 8)] * n


def gpt2_setup(n_edits: int, seq_len: int, continuation: int):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    model = tf.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(2)
    edits = []
    for _ in range(n_edits):
        ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -continuation:] = ids[:, -continuation:]  # the prompt must be continued by these tokens
        edits.append(({"input_ids": ids}, fe.TokenTargets(labels, causal=True)))
    return model, edits, "random weights, GPT-2 small shapes"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", help="folder holding all-MiniLM-L6-v2/ (default: $FASTEDIT_MODELS)")
    ap.add_argument("--data-dir", help="folder holding text/rotten_tomatoes.tsv (default: $FASTEDIT_DATA)")
    ap.add_argument("--models", default="minilm,gpt2", help="comma-separated: minilm, gpt2")
    ap.add_argument("--minilm-edits", type=int, default=10)
    ap.add_argument("--gpt2-edits", type=int, default=4)
    ap.add_argument("--minilm-lr", type=float, default=2e-5, help="RMSProp lr of the MiniLM edits (about 4 steps)")
    ap.add_argument("--gpt2-lr", type=float, default=3e-4, help="RMSProp lr of the GPT-2 edits")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes over the edits per method (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compiled", action="store_true",
                    help="also time fe.edit(compile=True) (the edited layer compiled; compilation is timed apart)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (machine_info records its version)
    result = {"command": common.command_line(__file__, argv), "machine": common.machine_info(),
              "load_average_before": common.load_average(), "models": {}}
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in wanted:
        if name == "minilm":
            model, edits, source = minilm_setup(common.models_dir(args.models_dir), common.data_dir(args.data_dir),
                                                args.minilm_edits, 64)
            params, editor = "bert.encoder.layer.5", fe.RMSProp(args.minilm_lr)
        elif name == "gpt2":
            model, edits, source = gpt2_setup(args.gpt2_edits, 64, 4)
            params, editor = "transformer.h.11.mlp", fe.RMSProp(args.gpt2_lr)
        else:
            raise SystemExit(f"unknown model {name!r}: choose minilm, gpt2")
        print(f"{name}: {source}", flush=True)
        repeats = args.repeats if name == "minilm" else max(1, args.repeats // 2)
        result["models"][name] = {"source": source, "tokens": 64, "repeats": repeats,
                                  **bench_model(name, model, edits, params, editor, 10, repeats, args.compiled)}
    result["load_average_after"] = common.load_average()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    common.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
