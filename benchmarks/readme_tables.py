"""Print the README's result tables (markdown) from the committed JSON results.

    python benchmarks/readme_tables.py
"""
from __future__ import annotations

import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


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


def bench_table() -> str:
    data = json.loads((RESULTS / "bench_edit.json").read_text())
    lat = data["edit_latency"]
    ctl = data["control_pass_seconds"]
    return "\n".join([
        f"`{data['command']}` ({data['edits']} edits of `layer3`, RMSProp, {data['machine']['threads']} threads):", "",
        "| one edit (pretrained ResNet-20) | ms per edit | steps (total) |", "|---|---|---|",
        f"| `fastedit.edit` (frozen prefix) | {1e3 * lat['prefix']['seconds_per_edit']:.2f} | {lat['prefix']['steps_total']} |",
        f"| `fastedit.edit(use_prefix=False)` | {1e3 * lat['no_prefix']['seconds_per_edit']:.2f} | {lat['no_prefix']['steps_total']} |",
        f"| official-code style (full forwards, `.item()` per step) | {1e3 * lat['official']['seconds_per_edit']:.2f} | {lat['official']['steps_total']} |",
        "", f"Control pass over {ctl['images']} images: full model {1e3 * ctl['full']:.0f} ms, suffix on cached prefix "
        f"activations {1e3 * ctl['suffix']:.0f} ms ({ctl['full'] / ctl['suffix']:.1f}×)."])


if __name__ == "__main__":
    print(demo_table("demo_digits"), end="\n\n")
    print(demo_table("demo_resnet20"), end="\n\n")
    print(bench_table())
