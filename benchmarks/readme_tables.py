"""The result tables of the README and of docs/ (markdown), made from the committed JSON results.

    python benchmarks/readme_tables.py            # print every table
    python benchmarks/readme_tables.py --write    # rewrite each table where its marker is
    python benchmarks/readme_tables.py --check    # exit 1 if a written table differs from the JSON
    python benchmarks/readme_tables.py --list     # which file holds which table

A table lives between the markers ``<!-- table:NAME -->`` and ``<!-- end -->`` in README.md or in
any ``docs/**/*.md`` file; the files are searched for markers, so a table can move from one file to
another without a change here. Every table of :data:`TABLES` must have at least one marker, and every
marker must name a table of :data:`TABLES`; ``--write`` and ``--check`` fail otherwise.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, ROOT, portable  # noqa: E402

README = ROOT / "README.md"
DOCS = ROOT / "docs"

MARKER = re.compile(r"(<!-- table:([A-Za-z0-9_-]+) -->\n)(.*?)(<!-- end -->)", re.S)
# Tables pass through ``portable``: a result made with real data from a folder of this machine shows
# ``$FASTEDIT_DATA`` / ``$FASTEDIT_MODELS`` and a plain ``python``, as the README's commands do.


def demo_table(name: str) -> str:
    data = json.loads((RESULTS / name / "results.json").read_text())
    lines = [f"`{data['command']}`: {data['model']}, {data['num_edits']} edits of `{data['params']}`, "
             f"control set {data['num_control']} images ({data['data']}), base error "
             f"{100 * data['base_error']:.2f}%, k = {data['max_steps']}.", "",
             "| editor | lr | drawdown | success | mean steps | flip rate | correct→wrong | wrong→correct | KL | edits/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['label']} | {r['lr']:g} | {100 * r['drawdown']:.2f}% | {100 * r['success_rate']:.1f}% | "
                     f"{r['mean_steps']:.2f} | {100 * r['flip_rate']:.2f}% | {100 * r['flip_rate_correct_to_wrong']:.2f}% | "
                     f"{100 * r['flip_rate_wrong_to_correct']:.2f}% | {r['mean_kl']:.3f} | {r['edits_per_s']:.1f} |")
    return "\n".join(lines)


def _threads_cpu(machine: dict) -> str:
    """"2 threads" and, where the JSON records it, the CPU model."""
    return f"{machine['threads']} threads" + (f", {machine['cpu']}" if machine.get("cpu") else "")


BENCH_EDIT_MODES = {"naive": "naive loop (full forwards, `.item()` per step)", "eager": "`fe.edit`",
                    "no_prefix": "`fe.edit(use_prefix=False)`", "compiled": "`fe.edit(compile=True)`",
                    "cudagraph": "`fe.edit(cuda_graph=True)`"}


def bench_table() -> str:
    data = json.loads((RESULTS / "bench_edit.json").read_text())
    modes, ctl, passes = data["modes"], data["control_pass_seconds"], data["passes_ms"]
    lines = [f"`{data['command']}` ({data['edits']} single-image edits of `{data['params']}`, RMSProp "
             f"{data['editor']['lr']:g}, {data['mean_steps']:.2f} steps per edit, {data['setup']}, "
             f"{_threads_cpu(data['machine'])}, {data['device']}):", "",
             "| one edit | ms per edit | × naive loop | of its floor | steps (total) | first pass, ms per edit | "
             "peak memory |", "|---|---|---|---|---|---|---|"]
    for key, row in modes.items():
        mem = f"{row['peak_memory_bytes'] / 2**20:.1f} MiB" if row.get("peak_memory_bytes") is not None else "—"
        lines.append(f"| {BENCH_EDIT_MODES[key]} | {row['ms_per_edit']:.2f} | {row['speedup_vs_naive']:.2f}× | "
                     f"{100 * row['floor_ratio']:.0f}% | {row['steps_total']} | {row['first_pass_ms_per_edit']:.1f} | {mem} |")
    lines += ["", f"Floor of an edit: prefix forward {passes['prefix_forward']:.2f} ms + per step suffix forward and "
              f"backward {passes['suffix_forward_backward']:.2f} ms + one suffix forward {passes['suffix_forward']:.2f} ms "
              f"= {data['floor_ms_per_edit']:.2f} ms; the naive loop's floor (full forward and backward "
              f"{passes['full_forward_backward']:.2f} ms per step + one full forward {passes['full_forward']:.2f} ms) = "
              f"{data['naive_floor_ms_per_edit']:.2f} ms, so eager arithmetic alone allows at most "
              f"{data['naive_floor_ms_per_edit'] / data['floor_ms_per_edit']:.2f}× the naive loop's floor."]
    if "compiled" in modes:
        c = modes["compiled"]
        pays = (f"pays off after {c['pays_off_after_edits']:,.0f} edits" if c.get("pays_off_after_edits")
                else "does not pay off (not faster than eager here)")
        cache = {"cold": ", empty compile caches", "warm": ", compile caches warm"}.get(data.get("compile_cache"), "")
        lines.append(f"Compilation: {c['compile_seconds']:.1f} s (first pass minus a timed pass{cache}), {pays}; "
                     f"every compiled edit agrees with eager on success and steps: {c.get('agrees_with_eager')}.")
    if data.get("skipped"):
        lines.append("Not run here: " + "; ".join(f"{BENCH_EDIT_MODES[k]} ({v})" for k, v in data["skipped"].items()) + ".")
    lines += ["", f"Control pass over {ctl['images']} images: full model {1e3 * ctl['full']:.0f} ms, suffix on cached "
              f"prefix activations {1e3 * ctl['suffix']:.0f} ms ({ctl['full'] / ctl['suffix']:.1f}×)."]
    return "\n".join(lines)


def bench_edit_transformers_table() -> str:
    data = json.loads((RESULTS / "bench_edit_transformers.json").read_text())
    m = data["machine"]
    lines = [f"`{data['command']}` ({m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}; "
             f"load average {data['load_average_before'][0]:.2f} before):", "",
             "| model, edited part | `fe.edit` (prefix) | `use_prefix=False` | naive loop | speed-up (range) | floor | "
             "of floor | steps | prefix cached | split built in |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"minilm": "MiniLM classifier, `bert.encoder.layer.5`", "gpt2": "GPT-2-small LM, `transformer.h.11.mlp`"}
    for key, r in data["models"].items():
        lat, split = r["latency"], r["split"]
        export = f" (torch.export: {split['torch_export_s']:.1f} s per shape)" if "torch_export_s" in split else ""
        lines.append(f"| {names.get(key, key)} | {lat['prefix']['ms_per_edit']:.0f} ms | "
                     f"{lat['no_prefix']['ms_per_edit']:.0f} ms | {lat['naive']['ms_per_edit']:.0f} ms | "
                     f"{r['speedup_vs_naive']:.2f}× ({r['speedup_vs_naive_range'][0]:.2f}–{r['speedup_vs_naive_range'][1]:.2f}) | "
                     f"{r['floor_speedup']:.2f}× | {100 * r['efficiency_prefix']:.0f}% | "
                     f"{lat['prefix']['mean_steps']:.1f} | {r['passes']['prefix_cached_bytes'] / 2**20:.1f} MiB | "
                     f"{split['split_build_s']:.2f} s{export} |")
    return "\n".join(lines)


def editable_training_bench_table() -> str:
    data = json.loads((RESULTS / "bench_editable_training.json").read_text())
    names = {"plain": "plain training step", "fastedit": "`fe.EditableTraining`",
             "fastedit_remat": "`fe.EditableTraining(rematerialize=True)`",
             "naive": "naive unrolled autograd (official-code style)", "higher": "`higher` (innerloop_ctx)",
             "fastedit_autograd_step": "`fe.EditableTraining(closed_form=False)`",
             "fastedit_remat_autograd_step": "`fe.EditableTraining(closed_form=False, rematerialize=True)`"}
    cfg = data["config"]
    lines = [f"`{data['command']}`: {cfg['model']}, batch {cfg['batch']}, `{cfg['params']}`, RMSProp, k = {cfg['k']}, "
             f"{data['machine']['threads']} threads; floor (plain + suffix forward/backward) = "
             f"{data['floor_time_ratio']:.2f}× a plain step.", "",
             "| training step | s/step | × plain | peak RSS × plain | torch allocations × plain | inner steps |",
             "|---|---|---|---|---|---|"]
    for key, row in data["table"].items():
        if "seconds_per_step" not in row:
            lines.append(f"| {names.get(key, key)} | failed: {data['errors'].get(key, '?')} | | | | |")
            continue
        lines.append(f"| {names.get(key, key)} | {row['seconds_per_step']:.3f} | {row['time_ratio']:.2f} | "
                     f"{row['memory_ratio']:.2f} | {row.get('torch_alloc_memory_ratio', float('nan')):.2f} | "
                     f"{row['mean_inner_steps']:.2f} |")
    return "\n".join(lines)


def editable_training_digits_table() -> str:
    lines = ["| c_edit = c_loc | training | test error | drawdown | success | mean steps |", "|---|---|---|---|---|---|"]
    commands = []
    for path in sorted(RESULTS.glob("editable_training_digits_c*.json"), key=lambda p: float(p.stem.split("_c")[-1])):
        data = json.loads(path.read_text())
        commands.append(f"`{data['command']}`")
        for name, s in data["summary"].items():
            pm = lambda k, scale=100: f"{scale * s[k]['mean']:.2f} ± {scale * s[k]['std']:.2f}"  # noqa: E731
            lines.append(f"| {data['config']['c']:g} | {name} | {pm('base_error')}% | {pm('drawdown')}% | "
                         f"{100 * s['success_rate']['mean']:.1f}% | {s['mean_steps']['mean']:.2f} |")
    return "\n".join(lines + ["", "Commands: " + "; ".join(commands) + "."])


def editable_training_cifar_table(folder: str = "editable_training_cifar") -> str:
    data = json.loads((RESULTS / folder / "summary.json").read_text())
    pc, vs = data["per_config"], data["vs_plain"]
    lines = ["| training | seeds | test error | Δ test error vs plain (paired) | drawdown | Δ drawdown vs plain (paired) "
             "| success | steps | flip rate | tuned lr | step time vs plain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = data.get("reference")
    if ref:
        lines.append(f"| starting model (no training) | – | {100 * ref['test_error']:.2f}% | | {100 * ref['drawdown']:.2f}% "
                     f"| | {100 * ref['success_rate']:.1f}% | {ref['mean_steps']:.2f} | {100 * ref['flip_rate']:.2f}% | | |")
    cells, commands = {}, set()
    for path in sorted((RESULTS / folder / "cells").glob("*_seed*.json")):
        c = json.loads(path.read_text())
        cells.setdefault(c["config"], []).append(c)
        commands.add(c["command"])
    for name, s in pc.items():
        pm = lambda k, scale=100, d=2: f"{scale * s[k]['mean']:.{d}f} ± {scale * s[k]['std']:.{d}f}"  # noqa: E731
        paired = vs.get(name, {})
        delta = lambda k: "" if k not in paired else \
            f"{100 * paired[k]['mean']:+.2f} ± {100 * paired[k]['std']:.2f}"  # noqa: E731
        ratio = f"{paired['step_time_ratio']['mean']:.2f}×" if "step_time_ratio" in paired else ""
        lrs = ", ".join(_tuned_lr(c) for c in cells.get(name, []))
        lines.append(f"| {name} | {s['test_error']['n']} | {pm('test_error')}% | {delta('test_error_minus_plain')} | "
                     f"{pm('drawdown')}% | {delta('drawdown_minus_plain')} | {pm('success_rate', d=1)}% | "
                     f"{s['mean_steps']['mean']:.2f} | {pm('flip_rate')}% | {lrs} | {ratio} |")
    fixed = data.get("fixed_editor", {})
    for key, per in fixed.items():
        lines += ["", f"Every model with the same editor ({key}, β as tuned), the same 1,000 edits:", "",
                  "| training | seeds | drawdown | Δ drawdown vs plain (paired) | success | steps | flip rate | "
                  "Δ flip rate vs plain |", "|---|---|---|---|---|---|---|---|"]
        for name, e in per.items():
            pm = lambda k, d=2: f"{100 * e[k]['mean']:.{d}f} ± {100 * e[k]['std']:.{d}f}"  # noqa: E731
            dd = f"{100 * e['drawdown_minus_plain']['mean']:+.2f} ± {100 * e['drawdown_minus_plain']['std']:.2f}" \
                if "drawdown_minus_plain" in e else ""
            df = f"{100 * e['flip_rate_minus_plain']['mean']:+.2f} ± {100 * e['flip_rate_minus_plain']['std']:.2f}" \
                if "flip_rate_minus_plain" in e else ""
            lines.append(f"| {name} | {e['drawdown']['n']} | {pm('drawdown')}% | {dd} | {pm('success_rate', 1)}% | "
                         f"{e['mean_steps']['mean']:.2f} | {pm('flip_rate')}% | {df} |")
    if any("tune_seconds" in c for per in cells.values() for c in per):
        lines += ["", _cell_costs({name: cells[name] for name in pc if name in cells}, data["setting"])]
    timing = RESULTS / f"{folder}_timing" / "summary.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        per = t["per_config"]
        base = per["plain"]["step_seconds"]["mean"]
        lines += ["", "Wall time per training step on a quiet machine (batch 128, data pipeline included, "
                  f"{t['machine']['threads']} thread): " + ", ".join(
                      f"{name} {1e3 * v['step_seconds']['mean']:.0f} ms ({v['step_seconds']['mean'] / base:.2f}× plain)"
                      for name, v in per.items()) + f". Command: `{t['command']}`."]
    return "\n".join(lines + ["", "Cells made by (the runs split over the two cores): " + "; ".join(
        f"`{c}`" for c in sorted(commands)) + f"; tables and figures: `{data['command']}`."])


CIFAR10_TRAIN_IMAGES = 50_000


def _tuned_lr(cell: dict) -> str:
    """The tuned lr of one cell, with the resolution the refinement reached (×1.18: both neighbours
    measured within that factor; ×inf: best at the edge of the searched range)."""
    lr = f"{cell['tuned_editor']['lr']:.1e}"
    res = cell.get("tune_lr_resolution")
    return lr if res is None else f"{lr} (×{res:.2f})"


def _cell_costs(cells: dict, setting: dict) -> str:
    """Epochs and wall time per configuration (mean over seeds): training, tuning, evaluation."""
    epoch_steps = CIFAR10_TRAIN_IMAGES // setting["batch_size"]
    parts = []
    for name, per in cells.items():
        mean = lambda f: sum(map(f, per)) / len(per)  # noqa: E731
        train = mean(lambda c: c["training"]["mean_step_seconds"] * c["training"]["steps"])
        evaluate = mean(lambda c: c["report"]["seconds"] + sum(
            r["seconds"] for r in c.get("fixed_reports", {}).values() if r != c["report"]))  # plain: shared = own
        parts.append(f"{name} {train / 60:.0f} min training ({1e3 * mean(lambda c: c['training']['median_step_seconds']):.0f}"
                     f" ms/step), {mean(lambda c: c['tune_seconds']) / 60:.0f} min tuning, {evaluate / 60:.0f} min evaluating "
                     "(every editor)")
    steps = setting["steps"]
    return (f"Training {steps} steps of batch {setting['batch_size']} ({steps / epoch_steps:.1f} epochs); wall time per "
            "configuration and seed (mean over seeds, step times as measured in the run): " + "; ".join(parts) + ".")


def surgery_pattern_table(folder: str) -> str:
    """Pattern injection: pattern success / consistency per method (columns) and budget (rows)."""
    data = json.loads((RESULTS / folder / "summary_pattern.json").read_text())
    rows = data["rows"]
    methods = [m for m in ("select-random", "select-grad", "select-delta", "lagrange", "dynamic")
               if any(r["method"] == m for r in rows)]
    budgets = sorted({r["budget"] for r in rows if r["method"] in methods})
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| changed scalars ≤ | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for b in budgets:
        cells = []
        for m in methods:
            r = next((r for r in rows if r["method"] == m and r["budget"] == b), None)
            cells.append("" if r is None else f"{pct(r['pattern_success'])} / {pct(r['consistency'])} "
                                                 f"({pct(r['clean_accuracy'])})")
        lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    for name in ("unrestricted", "original"):
        r = next((r for r in rows if r["method"] == name), None)
        if r is not None:
            lines.append(f"| {name} ({r['nnz']:,} changed) | {pct(r['pattern_success'])} / {pct(r['consistency'])} "
                         f"({pct(r['clean_accuracy'])}) |" + " |" * (len(methods) - 1))
    commands = sorted({c for c in _cell_commands(folder, "pattern")})
    return "\n".join(lines + ["", "Each entry: pattern success % / consistency % (clean accuracy %). Command: "
                              + "; ".join(f"`{c}`" for c in commands) + "."])


def _cell_commands(folder: str, part: str) -> list[str]:
    return [json.loads(p.read_text()).get("command", "?") for p in (RESULTS / folder / "cells").glob(f"{part}_*.json")]


def surgery_edits_table(folder: str = "surgery_cifar") -> str:
    data = json.loads((RESULTS / folder / "summary_edits.json").read_text())
    pct = lambda v, d=2: "–" if v is None else f"{100 * v:.{d}f}%"  # noqa: E731
    num = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    lines = ["| method | budget / λ | base error | drawdown | success | flip rate | steps | changed scalars (mean) "
             "| s / edit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        knob = f"≤ {r['budget']:,}" if r.get("budget") else (f"λ = {r['ewc_lambda']:g}" if r.get("ewc_lambda") else "")
        lines.append(f"| {r['method']} | {knob} | {pct(r['base_error'])} | {pct(r['drawdown'])} | "
                     f"{pct(r['success_rate'], 1)} | {pct(r['flip_rate'])} | {num(r['mean_steps'])} | "
                     f"{num(r['nnz_mean'], '{:,.0f}')} | {num(r['seconds_per_edit'], '{:.3f}')} |")
    commands = sorted(set(_cell_commands(folder, "edits")))
    return "\n".join(lines + ["", "Command: " + "; ".join(f"`{c}`" for c in commands) + "."])


def _hp(chosen: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in chosen.items() if k in ("lr", "beta"))


def evaluation_table(table: str) -> str:
    data = json.loads((RESULTS / "evaluation" / "tables.json").read_text())
    proto = data["protocol"]
    if table == "1":
        editors = ["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"]
        rows = sorted((r for r in data["rows"] if r["stage"] == "layer3"),
                      key=lambda r: (int(r["model"][6:]), editors.index(r["editor"])))
        head = ["| model | editor | tuned (lr, β) | drawdown | success | mean steps | flip rate | edits |",
                "|---|---|---|---|---|---|---|---|"]
        fmt = lambda r: (f"| {r['model']} | {r['editor']} | {_hp(r['chosen'])}{'' if r['feasible'] else ' (<95%)'}"  # noqa: E731
                         f"{' (grid edge)' if r['chosen_at_grid_edge'] else ''} | {100 * r['drawdown']:.2f}% | "
                         f"{100 * r['success_rate']:.1f}% | {r['mean_steps']:.2f} | {100 * r['flip_rate']:.2f}% | {r['num_edits']} |")
    else:
        order = {"layer1": 0, "layer2": 1, "layer3": 2, "all": 3}
        rows = sorted((r for r in data["rows"] if r["editor"] in ("gd", "rmsprop") and r["model"] == "resnet20"),
                      key=lambda r: (order[r["stage"]], r["editor"]))
        if len({r["stage"] for r in rows}) < 2:
            return "(Table 2 not run yet)"
        head = ["| stage edited | editor | tuned (lr, β) | drawdown | success | mean steps | flip rate | edits |",
                "|---|---|---|---|---|---|---|---|"]
        fmt = lambda r: (f"| {r['stage']} | {r['editor']} | {_hp(r['chosen'])}{'' if r['feasible'] else ' (<95%)'}"  # noqa: E731
                         f"{' (grid edge)' if r['chosen_at_grid_edge'] else ''} | {100 * r['drawdown']:.2f}% | "
                         f"{100 * r['success_rate']:.1f}% | {r['mean_steps']:.2f} | {100 * r['flip_rate']:.2f}% | {r['num_edits']} |")
    base = {r["model"]: r["base_error"] for r in rows}
    commands = sorted({f"`{r['command']}`" for r in rows if r.get("command")})
    note = (f"Base error on {proto['control']}: " + ", ".join(f"{m} {100 * e:.2f}%" for m, e in sorted(base.items()))
            + f"; k = {proto['max_steps']}; editors tuned by `fastedit.tune` (least drawdown with ≥ 95% success on "
            f"tuning edits from training images, random labels) over lr ×√10 from {proto['lr_grid'][0]:g} to "
            f"{proto['lr_grid'][-1]:g} (Scaled GD: {proto['scaled_gd_lr_grid'][0]:g}–{proto['scaled_gd_lr_grid'][-1]:g}) "
            "and RMSProp β ∈ {0.5, 0.9}; \"(<95%)\": no grid point reached 95% on the tuning edits. Commands: "
            + "; ".join(commands) + ".")
    return "\n".join(head + [fmt(r) for r in rows] + ["", note])


def evaluation_refined_table() -> str:
    """Table 1 (ResNet-20, layer3) with fe.tune's refinement next to the ×√10 grid, editor by editor."""
    path = RESULTS / "evaluation_refined" / "tables.json"
    if not path.exists():
        return "(not run yet)"
    grid = {r["editor"]: r for r in json.loads((RESULTS / "evaluation" / "tables.json").read_text())["rows"]
            if r["model"] == "resnet20" and r["stage"] == "layer3"}
    refined = json.loads(path.read_text())
    editors = ["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"]
    rows = sorted((r for r in refined["rows"] if r["stage"] == "layer3" and r["editor"] in grid),
                  key=lambda r: editors.index(r["editor"]))
    lines = ["| editor | grid (×√10): lr, β | drawdown | success | steps | refined (×1.2): lr, β | drawdown | success "
             "| steps | lr resolution | tuning s (grid → refined) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = grid[r["editor"]]
        lines.append(f"| {r['editor']} | {_hp(g['chosen'])} | {100 * g['drawdown']:.2f}% | {100 * g['success_rate']:.1f}% "
                     f"| {g['mean_steps']:.2f} | {_hp(r['chosen'])}{'' if r['feasible'] else ' (<95%)'} "
                     f"| {100 * r['drawdown']:.2f}% | {100 * r['success_rate']:.1f}% | {r['mean_steps']:.2f} "
                     f"| ×{r['lr_resolution']:.3g} | {g['tune_seconds']:.0f} → {r['tune_seconds']:.0f} |")
    commands = sorted({f"`{r['command']}`" for r in rows if r.get("command")})
    return "\n".join(lines + ["", f"{rows[0]['num_edits'] if rows else 0} reported edits, "
                              f"{refined['protocol']['tune_edits']} tuning edits, the same for both searches. "
                              "Commands: " + "; ".join(commands) + "."])


def bench_evaluate_table() -> str:
    data = json.loads((RESULTS / "bench_evaluate.json").read_text())
    res, s = data["results"], data["summary"]
    names = {"fastedit_loop": "`fastedit.evaluate` (loop)", "naive": "naive loop (deepcopy, full forwards)",
             "official": "official protocol (full forwards, `.item()` per step)"}
    lines = [f"`{data['command']}` ({data['control_images']} control images, RMSProp on `layer3`, "
             f"{_threads_cpu(data['machine'])}):", "",
             "| method | edits/s | ms per edit | × official | identical steps & errors |", "|---|---|---|---|---|"]
    off = res["official"]["seconds_per_edit"]
    for key, r in res.items():
        name = names.get(key, f"`fastedit.evaluate(strategy=\"vmap\", edits_per_group={key[len('fastedit_vmap'):]})`"
                         if key.startswith("fastedit_vmap") else key)
        same = "reference" if key == "fastedit_loop" else ("yes" if s["identical_steps_and_errors"].get(key) else "NO")
        lines.append(f"| {name} | {r['edits_per_s']:.2f} | {1e3 * r['seconds_per_edit']:.0f} | "
                     f"{off / r['seconds_per_edit']:.1f} | {same} |")
    lines += ["", f"Floor (one suffix forward over the control set per edit): {1e3 * s['floor_seconds_per_edit']:.0f} ms; "
              f"`fastedit.evaluate` reaches {100 * s['fraction_of_floor']:.0f}% of it (mean {s['mean_steps']:.2f} edit steps)."]
    if "floor_full_seconds_per_edit" in s:
        parts = s["floor_parts_seconds"]
        once = ("the control set's prefix and reference logits once", parts["control_reference_once"]) \
            if "control_reference_once" in parts else ("the control set's prefix once", parts["control_prefix_once"])
        lines[-1] += (f" The whole floor, {1e3 * s['floor_full_seconds_per_edit']:.0f} ms, adds {once[0]} "
                      f"({1e3 * once[1]:.0f} ms, spread over the edits) and the edit's own passes "
                      f"({1e3 * parts['edit_passes']:.1f} ms): {100 * s['fraction_of_floor_full']:.0f}% of it.")
        if "floor_seconds_all_rounds" in s:
            lines[-1] += (f" Both are medians of {len(s['floor_seconds_all_rounds'])} rounds, the floor pass timed "
                          "between runs of `fastedit.evaluate`.")
    return "\n".join(lines)


def bench_evaluate_transformers_table() -> str:
    data = json.loads((RESULTS / "bench_evaluate_transformers.json").read_text())
    st, s, res = data["setup"], data["summary"], data["results"]
    parts = s["floor_parts_seconds_per_edit"]
    mib = 2 ** 20
    lines = [f"`{data['command']}` ({st['source']}, `{st['params']}`, {st['edits']} edits, {st['control']:,} control "
             f"reviews of {st['seq_len']} tokens, {_threads_cpu(data['machine'])}):", "",
             "| method | edits/s | s per edit | speed-up | of its floor | peak memory increase | identical steps, errors, flips |",
             "|---|---|---|---|---|---|---|"]
    floors = {"fastedit": s["fraction_of_floor"], "naive": s["fraction_of_floor_naive"]}
    names = {"fastedit": "`fastedit.evaluate` (loop, cached control prefix)",
             "naive": "naive loop (deepcopy, full forwards)"}
    for key in ("fastedit", "naive"):
        r = res[key]
        lines.append(f"| {names[key]} | {r['edits_per_s']:.3f} | {r['seconds_per_edit']:.2f} | "
                     f"{res['naive']['seconds_per_edit'] / r['seconds_per_edit']:.1f}× | {100 * floors[key]:.0f}% | "
                     f"{r['peak_memory_increase_bytes'] / mib:.0f} MiB | "
                     f"{'reference' if key == 'fastedit' else ('yes' if s['identical'] else 'NO')} |")
    lines += ["", f"Floor of `fastedit.evaluate` per edit: {s['floor_seconds_per_edit']:.3f} s = one pass of the edited "
              f"layer at the [CLS] position the pooler reads (keys and values at every position) and the head over "
              f"the cached control states ({parts['control_suffix_pass']:.3f} s; the whole layer: "
              f"{data['floor']['control_suffix_bare_s']:.3f} s) + the control "
              f"set's prefix once, amortised ({parts['control_prefix_amortised']:.3f} s) + the edit's own passes "
              f"({parts['edit_passes']:.3f} s, {s['mean_steps']:.2f} steps). The control cache holds "
              f"{s['control_cached_bytes'] / mib:.0f} MiB (the edited layer's inputs alone: "
              f"{s['layer5_input_bytes'] / mib:.0f} MiB)."]
    return "\n".join(lines)


def editor_step_table() -> str:
    data = json.loads((RESULTS / "bench_editor_step.json").read_text())
    lines = [f"`{data['command']}` ({data['settings']['threads']} threads, {data['machine'].get('cpu', '')}; "
             "ms = median):", "",
             "| case | editor | fastedit (C++ CPU) | loop | foreach | torch.compile (in place) | fastest PyTorch | "
             "fastedit speed-up | fastedit GB/s | of copy_ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        res = r["results"]
        f = res["fastedit_cpu"]
        ms = lambda k: f"{res[k]['median_ms']:.3f}" if k in res else "–"  # noqa: E731
        lines.append(f"| {r['case']} ({r['numel'] / 1e6:.2g} M) | {r['editor']} | {ms('fastedit_cpu')} | {ms('torch_loop')} | "
                     f"{ms('torch_foreach')} | {ms('torch_compile')} | {r['fastest_torch']} | "
                     f"{f['speedup_vs_fastest_torch']:.2f}× | {f['gb_per_s']:.0f} | {f['fraction_of_copy']:.2f} |")
    return "\n".join(lines)


def edit_metrics_table() -> str:
    data = json.loads((RESULTS / "bench_edit_metrics.json").read_text())
    lines = [f"`{data['command']}` ({data['machine']['threads']} threads; median of the repeats):", "",
             "| E × N × C | fused (C++ CPU) | torch.compile(reference) | PyTorch reference | speed-up vs fastest PyTorch | "
             "fused GB/s | extra memory: fused / compiled / reference |", "|---|---|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    for r in data["results"]:
        m = r["methods"]
        f, c, ref = m["fused_cpu"], m.get("pytorch_compiled", {}), m["pytorch_reference"]
        lines.append(f"| {r['E']} × {r['N']} × {r['C']} | {1e3 * f['median_s']:.1f} ms | "
                     f"{1e3 * c['median_s']:.1f} ms | {1e3 * ref['median_s']:.1f} ms | {f['speedup_vs_fastest_pytorch']:.2f}× | "
                     f"{f['gb_per_s']:.1f} | {mib(f['peak_extra_bytes'])} / {mib(c.get('peak_extra_bytes', 0))} / "
                     f"{mib(ref['peak_extra_bytes'])} |")
    return "\n".join(lines)


def edit_constraint_table() -> str:
    data = json.loads((RESULTS / "bench_edit_constraint.json").read_text())
    m = data["machine"]
    lines = [f"`{data['command']}` ({m['threads']} threads, {m['cpu']}; µs = median):", "",
             "| B × C | pass | fused (C++ CPU) | PyTorch reference | torch.compile(reference) | fused speed-up | "
             "fused GB/s | of copy_ |", "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        res = r["methods"]
        for kind in ("forward", "forward_backward"):
            us = lambda name: f"{res[f'{name}/{kind}']['median_us']:.0f}" if f"{name}/{kind}" in res else "–"  # noqa: E731
            f = res.get(f"fused/{kind}")
            lines.append(f"| {r['B']} × {r['C']} | {kind.replace('_', ' + ')} | {us('fused')} | {us('reference')} | "
                         f"{us('torch_compile')} | {f['speedup_vs_fastest_torch']:.2f}× | {f['gb_per_s']:.1f} | "
                         f"{f['fraction_of_copy']:.2f} |" if f else f"| {r['B']} × {r['C']} | {kind} | – |")
    return "\n".join(lines)


def _sequential_name(cell: dict) -> str:
    s = cell["setting"]
    base = s["config"].partition("@")[0]
    if base == "rmsprop-linf":
        return f"RMSProp, L∞ trust region r = {s['linf']:g}"
    if base == "rmsprop-l2":
        return f"RMSProp, L2 trust region r = {s['l2']:g}"
    if base == "ewc-rmsprop":
        return f"RMSProp + EWC at the original, λ = {s['ewc_lambda']:g}"
    return {"gd": "GD", "rmsprop": "RMSProp", "rmsprop-recheck2": "RMSProp, re-edit ≤ 2 broken edits",
            "surgery-b1000": "surgery, ≤ 1,000 scalars per edit",
            "surgery-b100": "surgery, ≤ 100 scalars per edit"}.get(base, s["config"])


def sequential_table(folder: str = "sequential_cifar") -> str:
    data = json.loads((RESULTS / folder / "summary.json").read_text())
    cells = {r["config"]: json.loads((RESULTS / folder / "cells" / f"{r['config']}.json").read_text())
             for r in data["rows"]}
    first = next(iter(cells.values()))
    s = first["setting"]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    at = lambda cell, n: next((c for c in cell["report"]["checkpoints"] if c["edits"] == n), None)  # noqa: E731
    text = "max_len" in s  # the MiniLM experiment
    source = ("the fine-tuned MiniLM classifier" if text else
              f"the model trained as `{s['trained']}`" if s.get("trained") else "pretrained ResNet-20")
    what = {("true", False): "the test images it misclassifies, fixed to their true labels",
            ("random", False): "CIFAR-10 JPEG test images, random labels",
            ("flip", True): "test snippets, each edited to the opposite of its prediction",
            ("true", True): "the test snippets it misclassifies, fixed to their true labels"}[
        (s.get("targets", "flip" if text else "random"), text)]
    lines = [f"{source}, `{s['params']}`, {first['report']['num_edits']} sequential edits ({what}), control "
             f"{first['report']['num_control']} other {'snippets' if text else 'test images'}, base error "
             f"{100 * first['report']['base_error']:.2f}%:", "",
             "| method | edits until −1 pt or < 95% retention | drawdown after 10 / 100 / all edits | "
             "retention after 10 / 100 / all | success | scalars changed | re-edits | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in cells.values():
        final = cell["report"]["checkpoints"][-1]
        points = [at(cell, 10), at(cell, 100), final]
        dd = " / ".join(pct(c["drawdown"]) if c else "–" for c in points)
        rt = " / ".join(pct(c["retention"]) if c else "–" for c in points)
        journal = cell.get("journal")
        note = f" (journal: {journal['entries']} entries, one rolled back {'exactly' if journal['exact'] else 'NOT exactly'})" \
            if journal and journal.get("entries") else ""
        lines.append(f"| {_sequential_name(cell)}{note} | {cell['edits_until']} | {dd} | {rt} | "
                     f"{pct(final['success_rate'])} | {final['changed_scalars']:,} | {final['reedits']} | "
                     f"{cell['cell_seconds'] / 60:.1f} |")
    commands = sorted({c["command"] for c in cells.values()})
    return "\n".join(lines + ["", "Commands: " + "; ".join(f"`{c}`" for c in commands) + "."])


def sequential_trained_table(folder: str = "sequential_cifar_trained") -> str:
    """Editable Training against its plain twin: the same sequential RMSProp edits on both models."""
    lines = ["| model (600 steps from the pretrained ResNet-20) | editor (tuned for it) | control error before | edits until −1 pt "
             "or < 95% retention | drawdown after 10 / 100 / all edits | retention after 10 / 100 / all | success |",
             "|---|---|---|---|---|---|---|"]
    commands = set()
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for sub in sorted(p for p in (RESULTS / folder).iterdir() if (p / "cells").is_dir()):
        for path in sorted((sub / "cells").glob("*.json")):
            cell = json.loads(path.read_text())
            cps = cell["report"]["checkpoints"]
            at = lambda n: next((c for c in cps if c["edits"] == n), None)  # noqa: E731,B023
            points = [at(10), at(100), cps[-1]]
            ed = cell["setting"].get("editor", {})
            lines.append(f"| `{sub.name}` | RMSProp lr {ed.get('lr', 0):.2g}, β {ed.get('beta', 0):.2g} | "
                         f"{100 * cell['report']['base_error']:.2f}% | {cell['edits_until']} | "
                         + " / ".join(pct(c["drawdown"]) if c else "–" for c in points) + " | "
                         + " / ".join(pct(c["retention"]) if c else "–" for c in points) + " | "
                         f"{pct(cps[-1]['success_rate'])} |")
            commands.add(cell["command"])
    return "\n".join(lines + ["", "Commands: " + "; ".join(f"`{c}`" for c in sorted(commands)) + "."])


def _pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _tuned(r: dict) -> str:
    return (f"{_hp(r['chosen'])}{'' if r['feasible'] else ' (<95%)'}"
            f"{' (grid edge: ' + r['chosen_at_grid_edge'] + ')' if r['chosen_at_grid_edge'] else ''}")


def g2p_model_table() -> str:
    m = json.loads((RESULTS / "g2p_editing" / "model.json").read_text())
    return "\n".join([
        f"| g2p-en (pretrained, {m['parameters']:,} parameters) | words | word accuracy |", "|---|---|---|",
        f"| greedy, CMUdict test split (a–z words, first pronunciation, stress kept) | {m['test_words']:,} | "
        f"{_pct(m['greedy_accuracy_test_split'], 1)} |",
        f"| greedy, the fixed 500-word sample of `fastedit/models/g2p.py` | 500 | {_pct(m['greedy_accuracy_docstring_sample'], 1)} |",
        f"| beam 5, best hypothesis, test split | {m['test_words']:,} | {_pct(m['beam5_top1_accuracy_test_split'], 1)} |",
        f"| beam 5, dictionary pronunciation among the 5 (oracle), test split | {m['test_words']:,} | "
        f"{_pct(m['beam5_oracle_accuracy_test_split'], 1)} |",
        "", f"Command: `{m['command']}`."])


def _split_runs(command: str, rows: list[dict]) -> str:
    """The command that makes every cell, and a note when the cells were computed by parallel runs
    split with ``--only`` (each cell's JSON records its own command)."""
    split = any(r["command"] != command for r in rows)
    return f"Command: `{command.split(' --only ')[0]}`" + (
        " (the cells were computed by parallel runs of it split with `--only`; each cell's JSON records its "
        "command)." if split else ".")


def g2p_editing_table(which: str) -> str:
    data = json.loads((RESULTS / "g2p_editing" / "tables.json").read_text())
    proto, parts = data["protocol"], ["decoder", "output", "encoder", "all"]
    editors = ["gd", "scaled_gd", "rprop", "rmsprop", "momentum", "adam"]
    if which == "1":
        rows = [r for r in data["rows"] if r["constraint"] == "tokens" and r["part"] == "decoder"]
    else:
        constraint = "tokens" if which == "2" else "ranking"
        rows = [r for r in data["rows"] if r["constraint"] == constraint and r["editor"] in ("gd", "rmsprop")]
    rows.sort(key=lambda r: (parts.index(r["part"]), editors.index(r["editor"])))
    if not rows:
        return "(not run yet)"
    lines = ["| part edited | editor | tuned (lr, β) | word drawdown | phoneme drawdown | success | mean steps | "
             "phoneme flip rate | edits | s / cell |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['editor']} | {_tuned(r)} | {_pct(r['word_drawdown'])} | "
                     f"{_pct(r['phoneme_drawdown'])} | {_pct(r['success_rate'], 1)} | {r['mean_steps']:.2f} | "
                     f"{_pct(r['flip_rate'])} | {r['num_edits']} | {r['cell_seconds']:.0f} |")
    base = rows[0]
    lines += ["", f"Control: {proto['control']:,} test-split words, word error {_pct(base['word_error'])}, phoneme "
              f"error {_pct(base['phoneme_error'])} (teacher-forced); k = {proto['max_steps']}; tuned on "
              f"{proto['tune_edits']} validation mistakes against {proto['tune_control']} validation words. "
              + _split_runs(data["command"], rows)]
    return "\n".join(lines)


def minilm_editing_table() -> str:
    if not (RESULTS / "minilm_editing" / "tables.json").exists():
        return "(not run yet: `python benchmarks/experiments/minilm_editing.py --threads 1 --quiet`)"
    data = json.loads((RESULTS / "minilm_editing" / "tables.json").read_text())
    proto = data["protocol"]
    lines = ["| layers edited | editor | tuned (lr, β) | drawdown | success | mean steps | flip rate | edits | s / cell |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['part']} | {r['editor']} | {_tuned(r)} | {_pct(r['drawdown'])} | "
                     f"{_pct(r['success_rate'], 1)} | {r['mean_steps']:.2f} | {_pct(r['flip_rate'])} | "
                     f"{r['num_edits']} | {r['cell_seconds']:.0f} |")
    base = data["rows"][0]["base_error"] if data["rows"] else None
    lines += ["", f"Control: {proto['control']} test snippets, error {_pct(base)}; {proto['max_len']} tokens; "
              f"k = {proto['max_steps']}; tuned on {proto['tune_edits']} validation flips against "
              f"{proto['tune_control']} validation snippets. Command: `{data['command']}`."]
    return "\n".join(lines)


def surgery_minilm_table() -> str:
    if not (RESULTS / "surgery_minilm" / "summary.json").exists():
        return "(not run yet: `python benchmarks/experiments/surgery_minilm.py --threads 1 --quiet`)"
    data = json.loads((RESULTS / "surgery_minilm" / "summary.json").read_text())
    order = ["original"] + [f"{m}_b{b}" for b in (10, 100, 1000) for m in
                            ("dynamic", "select-random", "select-grad", "select-delta", "lagrange")] \
        + ["unrestricted", "dense_last", "dense_all"]
    rows = sorted(data["rows"], key=lambda r: order.index(r["cell"]) if r["cell"] in order else len(order))
    lines = ["| cell | tuned | changed scalars | pattern success | clean accuracy | consistency | "
             "validation pattern / consistency | s / cell |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chosen = r.get("chosen") or {}
        tuned = ", ".join(f"{k} {v:g}" for k, v in chosen.items()) + (" (<90%)" if r.get("feasible") is False else "")
        lines.append(f"| {r['cell']} | {tuned} | {r['nnz']:,} | {_pct(r['test_pattern_success'], 1)} | "
                     f"{_pct(r['test_clean_accuracy'], 1)} | {_pct(r['test_consistency'], 1)} | "
                     f"{_pct(r['validation_pattern_success'], 1)} / {_pct(r['validation_consistency'], 1)} | "
                     f"{r['cell_seconds']:.0f} |")
    commands = sorted({f"`{r['command']}`" for r in rows})
    return "\n".join(lines + ["", "Test numbers of the point chosen on the validation split. Commands: "
                               + "; ".join(commands) + "."])


def editable_training_g2p_table() -> str:
    data = json.loads((RESULTS / "editable_training_g2p" / "summary.json").read_text())
    ms = lambda v: "–" if v is None else (f"{100 * v['mean']:.2f}" + (f" ± {100 * v['std']:.2f}" if v.get("std") is not None else ""))  # noqa: E731
    diff = lambda v: ms(v.get("minus_plain")) if v.get("minus_plain") else ""  # noqa: E731
    lines = ["| model | seeds | word accuracy % | shared editor: word drawdown % | success % | tuned editor: word "
             "drawdown % | success % | phoneme flips % | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        cells = [r[k] for k in ("word_accuracy", "shared_editor_word_drawdown", "shared_editor_success_rate",
                                "tuned_editor_word_drawdown", "tuned_editor_success_rate", "tuned_editor_flip_rate")]
        lines.append(f"| {r['config']} | {len(r['seeds'])} | " + " | ".join(
            ms(c) + (f" (Δ {diff(c)})" if diff(c) else "") for c in cells) + f" | {r['train_seconds']:.0f} |")
    return "\n".join(lines + ["", "Mean ± std over seeds; Δ: the paired difference to `plain` (same seed, same "
                               f"batches). Command: `{data['command']}`."])


def headline_table() -> str:
    """The README's headline numbers, one row per experiment family, each with its command and a
    link to the report that holds the full table (the links are relative to README.md)."""
    pct = lambda v, d=2: f"{100 * v:.{d}f}%"  # noqa: E731
    load = lambda *parts: json.loads(RESULTS.joinpath(*parts).read_text())  # noqa: E731
    rows = []

    demo = load("demo_digits", "results.json")
    full = [r for r in demo["rows"] if r["success_rate"] == 1.0] or demo["rows"]
    best = min(full, key=lambda r: r["drawdown"])
    rows.append((f"The main job: six editors, {demo['num_edits']} edits each, small CNN on digits",
                 f"least drawdown at {pct(best['success_rate'], 0)} success: {best['label']}, "
                 f"{pct(best['drawdown'])} ({best['mean_steps']:.2f} steps)", demo["command"],
                 "docs/results/editing-cifar.md"))

    ev = load("evaluation", "tables.json")
    t1 = {r["editor"]: r for r in ev["rows"] if r["model"] == "resnet20" and r["stage"] == "layer3"}
    gd, rms = t1["gd"], t1["rmsprop"]
    rows.append((f"Paper Table 1: pretrained ResNet-20, CIFAR-10, `layer3`, {gd['num_edits']:,} edits, tuned editors",
                 f"drawdown GD {pct(gd['drawdown'])} ({pct(gd['success_rate'], 1)} success), RMSProp "
                 f"{pct(rms['drawdown'])} ({pct(rms['success_rate'], 1)})", gd["command"],
                 "docs/results/editing-cifar.md"))

    be = load("bench_edit.json")
    lat = be["modes"]
    rows.append(("One edit of ResNet-20 `layer3` (RMSProp)",
                 f"{lat['eager']['ms_per_edit']:.2f} ms eager, {lat['compiled']['ms_per_edit']:.2f} ms compiled, "
                 f"{lat['naive']['ms_per_edit']:.2f} ms naive loop ({lat['eager']['speedup_vs_naive']:.2f}× / "
                 f"{lat['compiled']['speedup_vs_naive']:.2f}×; floor {be['floor_ms_per_edit']:.2f} ms)", be["command"],
                 "docs/results/latency.md"))

    bt = load("bench_edit_transformers.json")
    m = bt["models"]
    rows.append(("One edit of a transformer: MiniLM classifier / GPT-2-small-shaped LM",
                 f"{m['minilm']['latency']['prefix']['ms_per_edit']:.0f} ms / "
                 f"{m['gpt2']['latency']['prefix']['ms_per_edit']:.0f} ms, {m['minilm']['speedup_vs_naive']:.2f}× / "
                 f"{m['gpt2']['speedup_vs_naive']:.2f}× faster than the naive loop", bt["command"],
                 "docs/results/latency.md"))

    bv = load("bench_evaluate.json")
    loop, off = bv["results"]["fastedit_loop"], bv["results"]["official"]
    rows.append((f"The paper's evaluation protocol, {bv['control_images']:,} control images",
                 f"{loop['edits_per_s']:.2f} edits/s, {off['seconds_per_edit'] / loop['seconds_per_edit']:.1f}× "
                 "the official protocol", bv["command"], "docs/results/latency.md"))
    bvt = load("bench_evaluate_transformers.json")
    rows.append((f"Evaluating MiniLM edits of `{bvt['setup']['params']}` on {bvt['setup']['control']:,} control reviews",
                 f"{bvt['summary']['edits_per_s']['fastedit']:.3f} edits/s, {bvt['summary']['speedup_vs_naive']:.1f}× "
                 f"the naive loop, {100 * bvt['summary']['fraction_of_floor']:.0f}% of its floor", bvt["command"],
                 "docs/results/latency.md"))

    et = load("bench_editable_training.json")
    fe_row, naive = et["table"]["fastedit"], et["table"]["naive"]
    rows.append((f"An Editable Training step ({et['config']['model'].split(' (')[0]}, batch {et['config']['batch']}, k = {et['config']['k']})",
                 f"{fe_row['time_ratio']:.2f}× a plain step, {fe_row['memory_ratio']:.2f}× its peak memory "
                 f"(naive unrolled autograd: {naive['time_ratio']:.2f}×, {naive['memory_ratio']:.2f}×)", et["command"],
                 "docs/results/editable-training.md"))

    se = load("surgery_cifar", "summary_edits.json")
    dyn = [r for r in se["rows"] if r["method"] == "surgery-dynamic" and r.get("budget")]
    sparse = max(dyn, key=lambda r: r["budget"])
    dense = next(r for r in se["rows"] if r["method"] == "rmsprop")
    commands = sorted(set(_cell_commands("surgery_cifar", "edits")))
    rows.append(("Neural Network Surgery: ResNet-20 edits changing ≤ "
                 f"{sparse['budget']:,} scalars of `layer3` (dynamic)",
                 f"{pct(sparse['success_rate'], 0)} success, {pct(sparse['drawdown'])} drawdown; dense tuned "
                 f"RMSProp {pct(dense['drawdown'])} ({dense['nnz_mean']:,.0f} scalars changed)",
                 "; ".join(commands), "docs/results/surgery.md"))

    sq = {p.stem: json.loads(p.read_text()) for p in (RESULTS / "sequential_cifar" / "cells").glob("*.json")}
    final = lambda name: sq[name]["report"]["checkpoints"][-1]  # noqa: E731
    n_seq = sq["rmsprop"]["report"]["num_edits"]
    rows.append((f"Sequential editing: {n_seq} edits one after another, pretrained ResNet-20 `layer3`",
                 f"tuned RMSProp loses {pct(final('rmsprop')['drawdown'], 1)} of accuracy, retention "
                 f"{pct(final('rmsprop')['retention'], 1)}; EWC at the original keeps the accuracy "
                 f"({pct(final('ewc-rmsprop')['drawdown'], 1)}) but only {pct(final('ewc-rmsprop')['success_rate'], 1)} "
                 "of the edits succeed", sq["rmsprop"]["command"], "docs/results/sequential.md"))

    g2p = load("g2p_editing", "tables.json")
    t1 = [r for r in g2p["rows"] if r["constraint"] == "tokens" and r["part"] == "decoder"]
    lo, hi = min(t1, key=lambda r: r["word_drawdown"]), max(t1, key=lambda r: r["word_drawdown"])
    rows.append((f"Editing a pretrained seq2seq: g2p-en, {t1[0]['num_edits']} real mispronunciations, decoder, "
                 f"{len(t1)} tuned editors",
                 f"{pct(min(r['success_rate'] for r in t1), 1)}–{pct(max(r['success_rate'] for r in t1), 1)} fixed "
                 f"within 10 steps; word-accuracy drawdown {100 * lo['word_drawdown']:.2f} ({lo['editor']}) to "
                 f"{100 * hi['word_drawdown']:.2f} points ({hi['editor']})", g2p["command"].split(" --only ")[0],
                 "docs/results/sequence-models.md"))

    es = load("bench_editor_step.json")
    step = next(r for r in es["rows"] if r["case"] == "layer3" and r["editor"] == "rmsprop")
    f = step["results"]["fastedit_cpu"]
    rows.append((f"Fused RMSProp step over a ResNet-18 `layer3` ({step['numel'] / 1e6:.1f} M values, C++ CPU)",
                 f"{f['median_ms']:.3f} ms, {f['fraction_of_copy']:.2f} of `copy_`'s bandwidth, "
                 f"{f['speedup_vs_fastest_torch']:.2f}× the fastest PyTorch path", es["command"], "docs/kernels.md"))

    em = load("bench_edit_metrics.json")
    big = max(em["results"], key=lambda r: r["C"])
    fused, ref = big["methods"]["fused_cpu"], big["methods"]["pytorch_reference"]
    rows.append((f"Fused per-edit metrics, {big['E']} edits × {big['N']:,} samples × {big['C']:,} classes",
                 f"{fused['speedup_vs_fastest_pytorch']:.2f}× the fastest PyTorch path, "
                 f"{fused['peak_extra_bytes'] / 2**20:.1f} MiB extra memory instead of "
                 f"{ref['peak_extra_bytes'] / 2**30:.1f} GiB", em["command"], "docs/kernels.md"))

    lines = ["| result | headline | command | details |", "|---|---|---|---|"]
    for what, number, command, report in rows:
        lines.append(f"| {what} | {number} | `{command}` | [{pathlib.PurePosixPath(report).stem}]({report}) |")
    return "\n".join(lines)


TABLES = {
    "demo_digits": lambda: demo_table("demo_digits"),
    "demo_resnet20": lambda: demo_table("demo_resnet20"),
    "bench_edit": bench_table,
    "bench_edit_transformers": bench_edit_transformers_table,
    "editable_training_bench": editable_training_bench_table,
    "editable_training_digits": editable_training_digits_table,
    "editable_training_cifar": editable_training_cifar_table,
    "editable_training_scratch": lambda: editable_training_cifar_table("editable_training_scratch"),
    "surgery_pattern": lambda: surgery_pattern_table("surgery_cifar"),
    "surgery_pattern_frame": lambda: surgery_pattern_table("surgery_cifar_frame"),
    "surgery_edits": surgery_edits_table,
    "evaluation_table1": lambda: evaluation_table("1"),
    "evaluation_table2": lambda: evaluation_table("2"),
    "evaluation_table1_refined": evaluation_refined_table,
    "bench_evaluate": bench_evaluate_table,
    "bench_evaluate_transformers": bench_evaluate_transformers_table,
    "kernels_editor_step": editor_step_table,
    "kernels_edit_metrics": edit_metrics_table,
    "kernels_edit_constraint": edit_constraint_table,
    "sequential_cifar": sequential_table,
    "sequential_cifar_fixes": lambda: sequential_table("sequential_cifar_fixes"),
    "sequential_cifar_trained": sequential_trained_table,
    "sequential_minilm": lambda: sequential_table("sequential_minilm"),
    "g2p_model": g2p_model_table,
    "g2p_editing_table1": lambda: g2p_editing_table("1"),
    "g2p_editing_table2": lambda: g2p_editing_table("2"),
    "g2p_editing_ranking": lambda: g2p_editing_table("ranking"),
    "minilm_editing": minilm_editing_table,
    "surgery_minilm": surgery_minilm_table,
    "editable_training_g2p": editable_training_g2p_table,
    "headline": headline_table,
}


def marker_files() -> list[pathlib.Path]:
    """README.md and every markdown file under docs/, in a fixed order."""
    files = [README] if README.exists() else []
    if DOCS.is_dir():
        files += sorted(DOCS.rglob("*.md"))
    return files


def _where() -> dict[str, list[pathlib.Path]]:
    """Table name -> the files holding its marker."""
    found: dict[str, list[pathlib.Path]] = {}
    for path in marker_files():
        for m in MARKER.finditer(path.read_text()):
            found.setdefault(m.group(2), []).append(path)
    return found


def _problems(found: dict[str, list[pathlib.Path]]) -> list[str]:
    out = [f"no marker <!-- table:{name} --> in README.md or docs/" for name in TABLES if name not in found]
    out += [f"{_rel(p)}: marker <!-- table:{name} --> names no table of benchmarks/readme_tables.py"
            for name, paths in found.items() if name not in TABLES for p in paths]
    return out


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def render() -> dict[pathlib.Path, tuple[str, str, list[str]]]:
    """For each file with markers: (current text, text with every table regenerated, the names of
    the tables that differ)."""
    made: dict[str, str] = {}
    out = {}
    for path in marker_files():
        text = path.read_text()
        stale: list[str] = []

        def fill(m: re.Match) -> str:
            name = m.group(2)
            if name not in TABLES:
                return m.group(0)
            if name not in made:
                made[name] = portable(TABLES[name]())
            new = m.group(1) + made[name] + "\n" + m.group(4)
            if new != m.group(0):
                stale.append(name)
            return new

        new_text = MARKER.sub(fill, text)
        if new_text != text or MARKER.search(text):
            out[path] = (text, new_text, stale)
    return out


def write() -> None:
    problems = _problems(_where())
    if problems:
        raise SystemExit("\n".join(problems))
    for path, (old, new, stale) in render().items():
        if new != old:
            path.write_text(new)
            print(f"{_rel(path)}: rewrote {', '.join(stale)}")


def check() -> int:
    """0 if every table is where a marker is and equal to what the JSON gives, else 1 (with a list)."""
    problems = _problems(_where())
    for path, (_, _, stale) in render().items():
        problems += [f"{_rel(path)}: table {name} differs from the JSON results "
                     "(python benchmarks/readme_tables.py --write)" for name in stale]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if "--write" in argv:
        write()
    elif "--check" in argv:
        return check()
    elif "--list" in argv:
        for name, paths in sorted(_where().items()):
            print(f"{name}: {', '.join(_rel(p) for p in paths)}")
    else:
        for make in TABLES.values():
            print(portable(make()), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
