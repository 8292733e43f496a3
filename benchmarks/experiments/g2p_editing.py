"""Editing the pretrained g2p-en seq2seq the machine-translation way (Editable Neural Networks, Sinitsin
et al. 2020, Tables 1-2 on a sequence model): fix the words the model mispronounces.

Setting: the pretrained g2p-en GRU encoder-decoder (:class:`fastedit.models.G2P`) and CMUdict's a-z
words, each with its first pronunciation, in the seeded 80/10/10 split of :func:`fastedit.data.load_cmudict`.

- **Edits**: ``--edits`` test-split words that greedy decoding gets wrong (a seeded sample of them;
  pronunciations of at most 19 phonemes, so that ``</s>`` fits the 20 decoding steps); the desired
  output is the dictionary pronunciation. Two constraints:
  ``tokens``: :class:`fastedit.TokenTargets` on the teacher-forced pronunciation + ``</s>`` (every
  position's argmax right, which is exactly "greedy decoding now spells the word right");
  ``ranking``: :class:`fastedit.SequenceRanking`, the dictionary pronunciation against the model's own
  beam n-best (beam 5, the first 4 hypotheses that differ from it), mean log-probability, as the
  official MT edit.
- **Control**: ``--control`` other test-split words (a seeded sample, right and wrong ones), teacher-
  forced with their dictionary pronunciations. Its ``sequence_drawdown`` is exactly the increase of
  greedy word error (a word is right under teacher forcing iff greedy decoding spells it; checked
  below against ``greedy_decode``), ``flip_rate`` the share of phoneme positions whose argmax changed.
- **Tuning**: every editor is tuned by :func:`fastedit.tune` (least *phoneme* drawdown with ≥ 95%
  success within ``--max-steps``) on ``--tune-edits`` mistakes of the validation split, against
  ``--tune-control`` other validation words; lr on a ×√10 grid, RMSProp's beta in {0.5, 0.9}.
- **Parts** (``params``): ``decoder`` = the decoder GRU, ``output`` = the output layer ``fc``,
  ``encoder`` = the encoder GRU, ``all`` = every parameter.

Tables (``--tables``): ``1`` the six editors editing the decoder, token edits (the paper's Table 1);
``2`` GD and RMSProp editing each part, token edits (Table 2); ``ranking`` GD and RMSProp editing each
part with ranking edits. ``--preset gpu`` runs the six editors on every part with both constraints
and 1,000 edits. Each cell is one JSON under ``<out>/cells/`` written when done (rerun to resume);
``<out>/tables.json`` gathers them, ``<out>/model.json`` holds the model's greedy and beam word
accuracy on the test split and on the fixed 500-word sample of the model's docstring.

    python benchmarks/experiments/g2p_editing.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

import torch

import fastedit as fe
from fastedit.data import load_cmudict
from fastedit.demo import EDITOR_ORDER
from fastedit.models.g2p import PHONEMES, encode_phonemes, encode_words, load_g2p

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

PARTS = {"decoder": "decoder", "output": "fc", "encoder": "encoder", "all": None}
CONSTRAINTS = ("tokens", "ranking")
LRS = [10.0 ** (-5 + i / 2) for i in range(9)]            # 1e-5 … 1e-1, factor √10
SCALED_GD_LRS = [10.0 ** (-3 + i / 2) for i in range(9)]  # an L2 step length: 1e-3 … 10
BEAM, ALTERNATIVES = 5, 4
PRESETS = {"cpu": {"edits": 500, "tables": ["1", "2", "ranking"]},
           "gpu": {"edits": 1000, "tables": ["full"]}}


def grid_for(editor: str) -> dict:
    grid = {"lr": SCALED_GD_LRS if editor == "scaled_gd" else LRS}
    if editor == "rmsprop":
        grid["beta"] = [0.5, 0.9]
    return grid


def cells_of(tables: list[str], editors: list[str]) -> list[tuple[str, str, str]]:
    """(constraint, part, editor) in run order, without repeats."""
    todo: list[tuple[str, str, str]] = []
    for t in tables:
        if t == "1":
            todo += [("tokens", "decoder", e) for e in editors]
        elif t == "2":
            todo += [("tokens", p, e) for p in PARTS for e in ("gd", "rmsprop")]
        elif t == "ranking":
            todo += [("ranking", p, e) for p in PARTS for e in ("gd", "rmsprop")]
        else:  # full
            todo += [(c, p, e) for c in CONSTRAINTS for p in PARTS for e in editors]
    return list(dict.fromkeys(todo))


def teacher_forced(words: list[str], prons: list[list[str]]):
    """``((src, dec_in), labels)`` for teacher forcing the given pronunciations."""
    dec_in, labels = encode_phonemes(prons)
    return (encode_words(words), dec_in), labels


def token_edits(words, prons):
    inputs, labels = teacher_forced(words, prons)
    return inputs, fe.TokenTargets(labels)


def ranking_edits(model, words, prons):
    """Per word ``BEAM`` rows: the desired pronunciation, then the first ``ALTERNATIVES`` beam hypotheses
    that differ from it."""
    nbest = model.beam_search(encode_words(words), beam_size=BEAM)
    rows_w, rows_p = [], []
    for word, pron, hyps in zip(words, prons, nbest):
        alternatives = [h for h, _ in hyps if h != pron][:ALTERNATIVES]
        rows_w += [word] * (1 + ALTERNATIVES)
        rows_p += [pron] + alternatives
    inputs, labels = teacher_forced(rows_w, rows_p)
    return inputs, fe.SequenceRanking(labels, 1 + ALTERNATIVES)


class Setting:
    """The model, the edits of each split and the control sets, built once per run."""

    def __init__(self, args):
        self.model = load_g2p(common.models_dir(args.models_dir) / "g2p-en" / "checkpoint20.npz")
        data = common.data_dir(args.data_dir)
        rng = random.Random(args.seed)
        self.splits = {}
        for split, n_edits, n_control in (("test", args.edits, args.control),
                                          ("validation", args.tune_edits, args.tune_control)):
            words, prons = load_cmudict(data, split)
            greedy = self.model.greedy_decode(encode_words(words))
            wrong = [i for i in range(len(words)) if greedy[i] != prons[i] and len(prons[i]) <= 19]
            if len(wrong) < n_edits:
                raise SystemExit(f"the {split} split has {len(wrong)} mistakes, fewer than the {n_edits} edits asked for")
            edits = rng.sample(wrong, n_edits)
            rest = sorted(set(range(len(words))) - set(edits))
            control = rng.sample(rest, min(n_control, len(rest)))
            self.splits[split] = {
                "words": words, "prons": prons, "greedy": greedy, "edits": edits, "control": control,
                "accuracy": sum(g == p for g, p in zip(greedy, prons)) / len(words)}
        self.controls = {s: self._control(s) for s in self.splits}

    def _control(self, split):
        d = self.splits[split]
        inputs, labels = teacher_forced([d["words"][i] for i in d["control"]], [d["prons"][i] for i in d["control"]])
        return inputs, fe.TokenTargets(labels)

    def edits(self, split: str, constraint: str):
        d = self.splits[split]
        words, prons = [d["words"][i] for i in d["edits"]], [d["prons"][i] for i in d["edits"]]
        return token_edits(words, prons) if constraint == "tokens" else ranking_edits(self.model, words, prons)

    def check_control(self, split: str) -> None:
        """A control word is right under teacher forcing iff greedy decoding spells it right, so the
        control's sequence error is the greedy word error: check it, word by word."""
        d = self.splits[split]
        (src, dec_in), target = self.controls[split]
        with torch.no_grad():
            pred = self.model(src, dec_in).argmax(-1)
        forced = ((pred == target.labels) | (target.labels == -100)).all(-1).tolist()
        greedy = [d["greedy"][i] == d["prons"][i] for i in d["control"]]
        if forced != greedy:
            raise AssertionError(f"{split}: teacher-forced exact match differs from greedy decoding on "
                                 f"{sum(a != b for a, b in zip(forced, greedy))} control words")


def model_summary(setting: Setting, data: pathlib.Path) -> dict:
    """Greedy and beam word accuracy of the pretrained model (the check of the model's layout)."""
    model = setting.model
    test = setting.splits["test"]
    words, prons = load_cmudict(data, "all")  # sorted a-z words: the population of the docstring's sample
    cmu = dict(zip(words, prons))
    sample = random.Random(0).sample(words, min(500, len(words)))  # the sample quoted in fastedit/models/g2p.py
    greedy = model.greedy_decode(encode_words(sample))
    start = time.perf_counter()
    beams = model.beam_search(encode_words(test["words"]), beam_size=BEAM)
    beam_seconds = time.perf_counter() - start
    return {
        "greedy_accuracy_test_split": test["accuracy"], "test_words": len(test["words"]),
        "greedy_accuracy_docstring_sample": sum(g == cmu[w] for g, w in zip(greedy, sample)) / len(sample),
        f"beam{BEAM}_top1_accuracy_test_split": sum(b[0][0] == p for b, p in zip(beams, test["prons"])) / len(beams),
        f"beam{BEAM}_oracle_accuracy_test_split": sum(any(h == p for h, _ in b) for b, p in zip(beams, test["prons"]))
        / len(beams),
        "beam_seconds": beam_seconds, "phonemes": len(PHONEMES),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_per_part": {part: sum(p.numel() for n, p in model.named_parameters()
                                          if name is None or n.startswith(name + "."))
                                for part, name in PARTS.items()},
    }


def run_cell(setting: Setting, constraint: str, part: str, editor: str, args) -> dict:
    params = PARTS[part]
    start = time.perf_counter()
    tuned = fe.tune(setting.model, setting.edits("validation", constraint), setting.controls["validation"],
                    editor=editor, params=params, max_steps=args.max_steps, grid=grid_for(editor),
                    min_success=0.95, progress=not args.quiet)
    tune_seconds = time.perf_counter() - start
    report = fe.evaluate(setting.model, setting.edits("test", constraint), setting.controls["test"],
                         editor=tuned.editor, params=params, max_steps=args.max_steps, progress=not args.quiet)
    return {"chosen": tuned.editor.to_dict(), "feasible": tuned.feasible,
            "chosen_at_grid_edge": common.grid_edge(float(tuned.editor.lr), grid_for(editor)["lr"]),
            "tune_table": tuned.table, "tune_seconds": tune_seconds, "report": report.to_dict()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu",
                    help="cpu: Tables 1, 2 and ranking, 500 edits; gpu: every editor × part × constraint, 1,000 edits")
    ap.add_argument("--tables", nargs="+", choices=["1", "2", "ranking", "full"], help="default: the preset's")
    ap.add_argument("--editors", nargs="+", default=list(EDITOR_ORDER), choices=list(EDITOR_ORDER))
    ap.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells (<constraint>_<part>_<editor>)")
    ap.add_argument("--edits", type=int, help="reported edits (test-split mistakes); default: the preset's")
    ap.add_argument("--control", type=int, default=1000, help="control words (test split)")
    ap.add_argument("--tune-edits", type=int, default=40, help="tuning edits (validation-split mistakes)")
    ap.add_argument("--tune-control", type=int, default=300, help="control words while tuning (validation split)")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", help="folder holding g2p-en/checkpoint20.npz (default: $FASTEDIT_MODELS)")
    ap.add_argument("--data-dir", help="folder holding g2p/cmudict.dict (default: $FASTEDIT_DATA)")
    ap.add_argument("--out-dir", type=pathlib.Path, default=common.RESULTS / "g2p_editing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    return common.apply_preset(ap.parse_args(argv), PRESETS, __file__, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = common.Cells(args.out_dir, args.command)
    todo = cells_of(args.tables, args.editors)
    if args.only:
        unknown = sorted(set(args.only) - {"_".join(c) for c in todo})
        if unknown:
            raise SystemExit(f"--only: {unknown} are not cells of --tables {args.tables}")
        todo = [c for c in todo if "_".join(c) in args.only]
    setting_of = lambda c: {"constraint": c[0], "part": c[1], "editor": c[2], "edits": args.edits,  # noqa: E731
                            "control": args.control, "tune_edits": args.tune_edits, "tune_control": args.tune_control,
                            "max_steps": args.max_steps, "seed": args.seed}
    setting = None
    for i, cell in enumerate(todo):
        name = "_".join(cell)
        if cells.done(name, setting_of(cell)):
            common.say(f"{name}: done earlier", args.quiet)
            continue
        if setting is None:
            setting = Setting(args)
            for split in setting.splits:
                setting.check_control(split)
        start = time.perf_counter()
        result = run_cell(setting, *cell, args)
        cells.save(name, setting_of(cell), result, time.perf_counter() - start)
        r = result["report"]
        common.say(f"{name}: {result['chosen']} word drawdown {100 * r['sequence_drawdown']:.2f}% "
                   f"success {100 * r['success_rate']:.1f}% steps {r['mean_steps']:.2f} "
                   f"flips {100 * r['flip_rate']:.2f}% ({time.perf_counter() - start:.0f} s"
                   f"{cells.estimate(len(todo) - i - 1)})", args.quiet)
    out_dir = pathlib.Path(args.out_dir)
    if setting is not None or not (out_dir / "model.json").exists():
        setting = setting or Setting(args)
        common.write_json(out_dir / "model.json", {"command": args.command, **model_summary(
            setting, common.data_dir(args.data_dir)), "machine": common.machine_info()})
    rows = []
    for path in sorted(cells.dir.glob("*.json")):
        cell = json.loads(path.read_text())
        r = cell["report"]
        rows.append({**{k: cell["setting"][k] for k in ("constraint", "part", "editor")},
                     "chosen": cell["chosen"], "feasible": cell["feasible"],
                     "chosen_at_grid_edge": cell["chosen_at_grid_edge"],
                     "word_error": r["sequence_base_error"], "word_drawdown": r["sequence_drawdown"],
                     "phoneme_error": r["base_error"], "phoneme_drawdown": r["drawdown"],
                     "success_rate": r["success_rate"], "mean_steps": r["mean_steps"], "flip_rate": r["flip_rate"],
                     "mean_kl": r["mean_kl"], "num_edits": r["num_edits"], "eval_seconds": r["seconds"],
                     "tune_seconds": cell["tune_seconds"], "cell_seconds": cell["cell_seconds"],
                     "command": cell["command"]})
    tables = {"command": args.command, "protocol": {
        "edits": args.edits, "control": args.control, "tune_edits": args.tune_edits,
        "tune_control": args.tune_control, "max_steps": args.max_steps, "seed": args.seed, "lr_grid": LRS,
        "scaled_gd_lr_grid": SCALED_GD_LRS, "rmsprop_beta_grid": [0.5, 0.9], "min_success": 0.95,
        "beam": BEAM, "alternatives": ALTERNATIVES, "parts": PARTS}, "rows": rows, "machine": common.machine_info()}
    common.write_json(out_dir / "tables.json", tables)
    common.say(f"wrote {out_dir / 'tables.json'}", args.quiet)
    return tables


if __name__ == "__main__":
    main()
