"""Fine-tune the pretrained MiniLM (all-MiniLM-L6-v2, 6 layers, hidden 384) into a Rotten Tomatoes
sentiment classifier (fresh / rotten), the model the text experiments edit.

``BertForSequenceClassification`` from the sentence-transformers checkpoint with a fresh 2-class
head; the training split of :func:`fastedit.data.load_rotten_tomatoes` (split by movie, seed 0),
snippets truncated / padded to ``--max-len`` WordPiece tokens; AdamW with a linear decay over
``--epochs`` epochs; dropout on while training. Reports validation and test accuracy and the wall and
CPU time of the training, and saves the classifier (``save_pretrained``, with its tokenizer) to
``--save`` for the experiments that load it.

    python benchmarks/experiments/minilm_rotten_tomatoes.py --out benchmarks/results/minilm_rotten_tomatoes.json
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from fastedit import data as fdata

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

DEFAULT_SAVE = common.ROOT / "runs" / "minilm_rotten_tomatoes"


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"))


@torch.no_grad()
def predict(model, batch: dict[str, torch.Tensor], size: int = 128) -> torch.Tensor:
    was = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    out = torch.cat([model(**{k: v[i:i + size] for k, v in batch.items()}).logits.argmax(-1) for i in range(0, n, size)])
    model.train(was)
    return out


def load_classifier(path: str | pathlib.Path = DEFAULT_SAVE):
    """The fine-tuned classifier and its tokenizer, saved by this script (eval mode)."""
    import transformers as tf
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise SystemExit(f"no fine-tuned classifier in {path}: run benchmarks/experiments/minilm_rotten_tomatoes.py first")
    return tf.BertForSequenceClassification.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models-dir", help="folder holding all-MiniLM-L6-v2/ (default: $FASTEDIT_MODELS)")
    ap.add_argument("--data-dir", help="folder holding text/rotten_tomatoes.tsv (default: $FASTEDIT_DATA)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training snippets (tests)")
    ap.add_argument("--eval-limit", type=int, default=None, help="measure accuracy on the first N snippets of each split (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save", type=pathlib.Path, default=DEFAULT_SAVE, help="where the classifier is saved")
    ap.add_argument("--out", required=True, help="the JSON report")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as tf
    tf.logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected
    torch.manual_seed(args.seed)
    source = common.models_dir(args.models_dir) / "all-MiniLM-L6-v2"
    model = tf.BertForSequenceClassification.from_pretrained(source, num_labels=2)
    tokenizer = tf.AutoTokenizer.from_pretrained(source)
    data = common.data_dir(args.data_dir)
    splits = {s: fdata.load_rotten_tomatoes(data, s, seed=args.seed) for s in ("train", "validation", "test")}
    for name, limit in (("train", args.train_limit), ("validation", args.eval_limit), ("test", args.eval_limit)):
        if limit:
            splits[name] = (splits[name][0][:limit], splits[name][1][:limit])
    enc = {s: tokenize(tokenizer, t, args.max_len) for s, (t, _) in splits.items()}
    n = len(splits["train"][0])
    steps = max(1, int(args.epochs * n / args.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(int(args.epochs) + 1)])
    model.train()
    bar = common.progress_bar(steps, "fine-tune MiniLM", args.quiet)
    wall, cpu = time.perf_counter(), time.process_time()
    losses = []
    for step in range(steps):
        idx = order[step * args.batch:(step + 1) * args.batch]
        out = model(**{k: v[idx] for k, v in enc["train"].items()}, labels=splits["train"][1][idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        bar.update(1)
        bar.set_postfix_str(f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.eval()
    acc = {s: float((predict(model, enc[s]) == splits[s][1]).double().mean()) for s in ("validation", "test")}
    args.save.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.save)
    tokenizer.save_pretrained(args.save)
    report = {"command": common.command_line(__file__, argv), "machine": common.machine_info(),
              "config": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "max_len": args.max_len,
                         "steps": steps, "seed": args.seed, "train_snippets": n, "optimizer": "AdamW (weight decay 0.01), linear decay"},
              "accuracy": acc, "sizes": {s: len(t) for s, (t, _) in splits.items()},
              "fresh_share_test": float(splits["test"][1].double().mean()),
              "train_wall_seconds": wall, "train_cpu_seconds": cpu, "loss_first_last_20": [
                  sum(losses[:20]) / len(losses[:20]), sum(losses[-20:]) / len(losses[-20:])]}
    common.write_json(args.out, report)
    common.say(f"validation accuracy {100 * acc['validation']:.2f}%, test {100 * acc['test']:.2f}% after {steps} steps "
               f"({wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU); saved to {args.save}", args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
