"""Editable Training on a sequence model (Sinitsin et al. 2020, the machine-translation experiment, on
the pretrained g2p-en GRU seq2seq): fine-tune it on CMUdict plainly and with ``fe.EditableTraining``,
then compare word accuracy and how well real mistakes can be edited.

- **Training**: from the pretrained checkpoint, ``--steps`` Adam steps (lr ``--lr``) on minibatches of
  ``--batch`` training-split words (teacher-forced token cross-entropy on the dictionary
  pronunciation), the same batches for every configuration of a seed. ``plain``: that loss alone.
  ``et-c<c_loc>``: ``EditableTraining(params=--params, RMSProp(1e-3, beta=0.5), k=--k, c_edit=0.01,
  c_loc)``; each step's edit is built as in the official MT code: one word of the batch, the desired
  output one of the current model's own samples (``G2P.sample``; the first of 8 that differs from
  the beam's best, so that the edit has something to do), the alternatives its beam n-best (beam 5,
  the first 4 that differ from the sample), a :class:`fastedit.SequenceRanking`.
- **Evaluation** of every model: greedy word accuracy on all test-split words; ``--edits`` of the
  model's own mistakes on test-split words (a seeded sample; desired = the dictionary pronunciation,
  :class:`fastedit.TokenTargets`) against ``--control`` other test words (a fixed sample, the same for
  every model): word drawdown (increase of greedy word error, exact), success, steps, phoneme flip
  rate; once with one shared editor (``RMSProp(--shared-lr, beta=0.5)``) and once with the editor
  tuned for that model by :func:`fastedit.tune` on validation-split mistakes.

Each (configuration, seed) is one resumable cell (``<out>/cells/<config>_s<seed>.json``; the trained
model in ``--save-dir``, outside the results); ``<out>/summary.json`` has the mean ± std over seeds and the paired
differences to ``plain``.

    python benchmarks/experiments/editable_training_g2p.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import statistics
import sys
import time

import torch

import fastedit as fe
from fastedit.data import load_cmudict
from fastedit.models.g2p import G2P, encode_words, load_g2p

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.experiments.g2p_editing import ALTERNATIVES, BEAM, PARTS, teacher_forced  # noqa: E402

PRESETS = {"cpu": {"steps": 400, "batch": 32, "edits": 150, "control": 500, "tune_edits": 24, "tune_control": 200},
           "gpu": {"steps": 2000, "batch": 128, "edits": 1000, "control": 1000, "tune_edits": 100, "tune_control": 1000}}
TUNE_GRID = {"lr": [10.0 ** (-4 + i / 2) for i in range(6)], "beta": [0.5, 0.9]}  # 1e-4 … 3e-2


def config_names(c_locs) -> list[str]:
    return ["plain"] + [f"et-c{c:g}" for c in c_locs]


def training_edit(model: G2P, word: str, gen: torch.Generator, draws: int = 8):
    """The official MT edit of one word: desired = one of the model's samples, alternatives = its beam
    n-best other than the sample. A sample equal to the beam's best would be an edit already satisfied
    (no inner step, nothing for Editable Training to learn from), so the first of ``draws`` samples
    that differs from it is taken, or the beam's second hypothesis if none does."""
    src = encode_words([word])
    beam = [h for h, _ in model.beam_search(src, beam_size=BEAM)[0]]
    samples = model.sample(src.expand(draws, -1), generator=gen)
    desired = next((smp for smp in samples if smp != beam[0]), beam[1])
    alternatives = [h for h in beam if h != desired][:ALTERNATIVES]
    inputs, labels = teacher_forced([word] * (1 + len(alternatives)), [desired] + alternatives)
    return inputs, fe.SequenceRanking(labels, 1 + len(alternatives))


def train(model: G2P, words, prons, config: str, seed: int, args) -> dict:
    """Fine-tune ``model`` in place; the batches depend on ``seed`` only."""
    batches = torch.Generator().manual_seed(seed)
    edits = torch.Generator().manual_seed(seed + 1000)
    et = None
    if config != "plain":
        et = fe.EditableTraining(model, params=PARTS[args.params], editor=fe.RMSProp(1e-3, beta=0.5),
                                 max_steps=args.k, c_edit=0.01, c_loc=float(config[len("et-c"):]))
    opt = torch.optim.Adam((et or model).parameters(), lr=args.lr)
    log, start = [], time.perf_counter()
    bar = common.progress_bar(args.steps, config, args.quiet)
    model.train()  # G2P has no dropout or batch norm: the mode changes nothing, it is the convention
    for step in range(args.steps):
        idx = torch.randint(0, len(words), (args.batch,), generator=batches).tolist()
        inputs, labels = teacher_forced([words[i] for i in idx], [prons[i] for i in idx])
        if et is None:
            logits = model(*inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            stats = {"loss_base": loss.detach()}
        else:
            edit_inputs, edit_target = training_edit(model, words[idx[0]], edits)
            loss, stats = et(inputs, fe.TokenTargets(labels), edit_inputs, edit_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            log.append({"step": step, **{k: float(v) for k, v in stats.items()}})
        bar.update(1)
    bar.close()
    model.eval()
    return {"seconds": time.perf_counter() - start, "log": log}


class Evaluation:
    """The held-out words, the control sample (the same for every model) and the tuning words."""

    def __init__(self, args):
        data = common.data_dir(args.data_dir)
        self.train = load_cmudict(data, "train")
        self.test = load_cmudict(data, "test")
        self.val = load_cmudict(data, "validation")
        rng = random.Random(args.seed_data)
        self.control_idx = rng.sample(range(len(self.test[0])), args.control)
        self.args = args

    def _mistakes(self, model, split, n: int, exclude=(), seed: int = 0) -> list[int]:
        words, prons = split
        greedy = model.greedy_decode(encode_words(words))
        wrong = [i for i in range(len(words)) if greedy[i] != prons[i] and len(prons[i]) <= 19 and i not in exclude]
        return random.Random(seed).sample(wrong, min(n, len(wrong))), greedy

    def run(self, model) -> dict:
        a = self.args
        edits_idx, greedy = self._mistakes(model, self.test, a.edits, set(self.control_idx), a.seed_data)
        words, prons = self.test
        accuracy = sum(g == p for g, p in zip(greedy, prons)) / len(words)
        pick = lambda split, idx: teacher_forced([split[0][i] for i in idx], [split[1][i] for i in idx])  # noqa: E731
        ei, el = pick(self.test, edits_idx)
        ci, cl = pick(self.test, self.control_idx)
        edits, control = (ei, fe.TokenTargets(el)), (ci, fe.TokenTargets(cl))
        params = PARTS[a.params]
        out = {"word_accuracy": accuracy, "test_words": len(words), "num_mistakes_edited": len(edits_idx)}
        shared = fe.evaluate(model, edits, control, editor=fe.RMSProp(a.shared_lr, beta=0.5), params=params,
                             max_steps=a.max_steps, progress=False)
        tune_idx, _ = self._mistakes(model, self.val, a.tune_edits, seed=a.seed_data)
        tuning = set(tune_idx)
        rest = [i for i in range(len(self.val[0])) if i not in tuning]
        tune_ctl = random.Random(a.seed_data).sample(rest, a.tune_control)
        ti, tl = pick(self.val, tune_idx)
        vi, vl = pick(self.val, tune_ctl)
        tuned = fe.tune(model, (ti, fe.TokenTargets(tl)), (vi, fe.TokenTargets(vl)), editor="rmsprop", params=params,
                        max_steps=a.max_steps, grid=TUNE_GRID, min_success=0.95, progress=False)
        own = fe.evaluate(model, edits, control, editor=tuned.editor, params=params, max_steps=a.max_steps,
                          progress=False)
        for name, rep in (("shared_editor", shared), ("tuned_editor", own)):
            out[name] = {"word_drawdown": rep.sequence_drawdown, "word_error_control": rep.sequence_base_error,
                         "phoneme_drawdown": rep.drawdown, "success_rate": rep.success_rate,
                         "mean_steps": rep.mean_steps, "flip_rate": rep.flip_rate, "editor": rep.editor}
        out["tuned_editor"]["feasible"] = tuned.feasible
        return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--c-locs", nargs="+", type=float, default=[0.01, 0.1])
    ap.add_argument("--params", choices=list(PARTS), default="decoder", help="the editable part")
    ap.add_argument("--k", type=int, default=10, help="editor steps per training edit")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the fine-tuning")
    for name in ("steps", "batch", "edits", "control", "tune_edits", "tune_control"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, help="default: the preset's")
    ap.add_argument("--shared-lr", type=float, default=1e-3, help="lr of the shared RMSProp editor")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--seed-data", type=int, default=0, help="seeds the edit and control samples")
    ap.add_argument("--models-dir", help="folder holding g2p-en/checkpoint20.npz (default: $FASTEDIT_MODELS)")
    ap.add_argument("--data-dir", help="folder holding g2p/cmudict.dict (default: $FASTEDIT_DATA)")
    ap.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "editable_training_g2p")
    ap.add_argument("--save-dir", type=pathlib.Path, default=common.ROOT / "runs" / "editable_training_g2p",
                    help="where the trained models go (g2p-en .npz checkpoints)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    return common.apply_preset(ap.parse_args(argv), PRESETS, __file__, argv)


def summarise(args, cells: common.Cells) -> dict:
    by = {}
    for path in sorted(cells.dir.glob("*.json")):
        c = json.loads(path.read_text())
        by[(c["setting"]["config"], c["setting"]["seed"])] = c
    keys = [("word_accuracy",), ("shared_editor", "word_drawdown"), ("shared_editor", "success_rate"),
            ("tuned_editor", "word_drawdown"), ("tuned_editor", "success_rate"), ("tuned_editor", "flip_rate")]
    get = lambda c, k: c["evaluation"][k[0]] if len(k) == 1 else c["evaluation"][k[0]][k[1]]  # noqa: E731
    rows = []
    for config in config_names(args.c_locs):
        seeds = sorted(s for c, s in by if c == config)
        if not seeds:
            continue
        row = {"config": config, "seeds": seeds, "train_seconds": statistics.fmean(by[(config, s)]["train"]["seconds"]
                                                                                  for s in seeds)}
        for k in keys:
            vals = [get(by[(config, s)], k) for s in seeds]
            name = "_".join(k)
            row[name] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}
            paired = [get(by[(config, s)], k) - get(by[("plain", s)], k) for s in seeds if ("plain", s) in by]
            if config != "plain" and paired:
                row[name]["minus_plain"] = {"mean": statistics.fmean(paired),
                                            "std": statistics.stdev(paired) if len(paired) > 1 else None}
        rows.append(row)
    out = {"command": args.command, "rows": rows, "machine": common.machine_info()}
    common.write_json(args.out_dir / "summary.json", out)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = common.Cells(args.out_dir, args.command)
    args.save_dir.mkdir(parents=True, exist_ok=True)
    pretrained = load_g2p(common.models_dir(args.models_dir) / "g2p-en" / "checkpoint20.npz")
    evaluation = None
    todo = [(c, s) for s in args.seeds for c in config_names(args.c_locs)]
    for i, (config, seed) in enumerate(todo):
        name = f"{config}_s{seed}"
        setting = {"config": config, "seed": seed, **{k: getattr(args, k) for k in (
            "params", "k", "lr", "steps", "batch", "edits", "control", "tune_edits", "tune_control", "shared_lr",
            "max_steps", "seed_data")}}
        if cells.done(name, setting):
            common.say(f"{name}: done earlier", args.quiet)
            continue
        evaluation = evaluation or Evaluation(args)
        start = time.perf_counter()
        model = copy.deepcopy(pretrained)
        torch.manual_seed(seed)
        words, prons = evaluation.train
        keep = [j for j in range(len(words)) if len(prons[j]) <= 19]
        trained = train(model, [words[j] for j in keep], [prons[j] for j in keep], config, seed, args)
        model.save_checkpoint(args.save_dir / f"{name}.npz")
        result = {"train": trained, "evaluation": evaluation.run(model)}
        cells.save(name, setting, result, time.perf_counter() - start)
        ev = result["evaluation"]
        common.say(f"{name}: word accuracy {100 * ev['word_accuracy']:.2f}%, shared editor drawdown "
                   f"{100 * ev['shared_editor']['word_drawdown']:.2f}% success {100 * ev['shared_editor']['success_rate']:.1f}%, "
                   f"tuned {100 * ev['tuned_editor']['word_drawdown']:.2f}% / {100 * ev['tuned_editor']['success_rate']:.1f}% "
                   f"(train {trained['seconds']:.0f} s{cells.estimate(len(todo) - i - 1)})", args.quiet)
    out = summarise(args, cells)
    common.say(f"wrote {args.out_dir / 'summary.json'}", args.quiet)
    return out


if __name__ == "__main__":
    main()
