"""Every benchmark script runs end to end at a tiny size and writes JSON with its command and machine
(a benchmark nobody runs breaks silently when the API under it moves); benchmarks.common's pieces
against hand values."""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from benchmarks import common

# (module, arguments before --out, needs the real data and models)
SCRIPTS = [
    ("benchmarks.kernels.bench_editor_step",
     ["--cases", "flat1e5", "--editors", "gd,adam", "--reps", "2", "--warmup", "1", "--no-compile"], False),
    ("benchmarks.kernels.bench_edit_metrics",
     ["--samples", "50", "--classes", "7", "--edits", "3", "--repeats", "2", "--no-compile"], False),
    ("benchmarks.kernels.bench_edit_constraint", ["--cases", "3x7,1x130", "--repeats", "2", "--no-compile"], False),
    ("benchmarks.kernels.bench_differentiable_step",
     ["--steps", "2", "--repeats", "1", "--warmup", "0", "--editors", "rmsprop"], False),
    ("benchmarks.experiments.bench_edit", ["--edits", "1", "--repeats", "1", "--modes", "naive,eager,no_prefix"], True),
    ("benchmarks.experiments.bench_editable_training",
     ["--random-init", "--batch", "4", "--repeats", "1", "--warmup", "0", "--memory-repeats", "1",
      "--methods", "plain,fastedit", "--max-load", "1000"], True),
    ("benchmarks.experiments.editable_training_digits", ["--seeds", "1", "--epochs", "1", "--edits", "3"], False),
    ("benchmarks.experiments.bench_evaluate_transformers", ["--quick", "--threads", "1"], True),
]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("module, args, real", SCRIPTS, ids=[s[0].rsplit(".", 1)[1] for s in SCRIPTS])
def test_script_runs_and_records_itself(module, args, real, tmp_path, restore_threads, request):
    if real:
        request.getfixturevalue("shared_data_dir")  # skips without the real data and models
        request.getfixturevalue("shared_models_dir")
    out = tmp_path / "result.json"
    argv = [*args, "--out", str(out)]
    importlib.import_module(module).main(argv)
    result = json.loads(out.read_text())
    script = "benchmarks/" + module.split(".", 1)[1].replace(".", "/") + ".py"
    assert result["command"].startswith(f"python {script} "), result["command"]
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["threads"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_editable_training_lm_quick_measures_every_method(preset, tmp_path, restore_threads):
    """``--quick`` (CI and the GPU dry run; with ``--preset gpu``: bf16 autocast) times and measures
    every method on a tiny GPT-2 and writes the ratios, the pass arithmetic and the targets."""
    from benchmarks.experiments import bench_editable_training_lm as bench

    out = tmp_path / "lm.json"
    bench.main(["--quick", "--preset", preset, "--device", "cpu", "--max-load", "1000", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python benchmarks/experiments/bench_editable_training_lm.py --quick ")
    assert r["machine"]["torch"] == torch.__version__ and r["machine"]["transformers"]
    c = r["config"]
    assert (c["n_layer"], c["n_embd"], c["seq"], c["k"]) == (2, 64, 16, 5)
    assert c["params"] == ["transformer.h.0", "transformer.h.1"] and c["split"] == "call-cache"
    assert c["autocast"] == ("bf16" if preset == "gpu" else "none")
    for name in ("plain", "fastedit", "fastedit_remat", "naive"):
        row = r["table"][name]
        assert row["seconds_per_step"] > 0 and row["peak_bytes"] > 0 and row["time_ratio"] > 0, (name, row)
        assert 0 <= row["mean_inner_steps"] <= 5
    assert r["table"]["plain"]["time_ratio"] == 1.0 and r["table"]["plain"]["memory_ratio"] == 1.0
    higher = r["table"]["higher"]
    assert "seconds_per_step" in higher or higher["error"]  # measured, or the reason it could not be
    assert r["arithmetic"]["floor_loc_ratio"] == pytest.approx(2.0)  # every block editable: the suffix is F
    assert set(r["arithmetic"]["expected_ratio"]) >= {"fastedit", "fastedit_remat", "naive"}
    for name in ("fastedit", "fastedit_remat"):
        d = r["breakdown_seconds"][name]
        assert d["edit_loop"] > 0 and d["loc_fwd"] > 0 and d["bwd"] > 0
    t = r["targets"]
    assert t["time_target"] == 1.5 and t["memory_target_remat"] == 1.3
    assert t["fastedit_remat_time_ratio"] == r["table"]["fastedit_remat"]["time_ratio"]
    assert isinstance(t["time_met_remat"], bool) and isinstance(t["memory_met_remat"], bool)


def test_command_line_is_portable(monkeypatch, tmp_path):
    data, models = tmp_path / "d", tmp_path / "m"
    data.mkdir()
    models.mkdir()
    monkeypatch.setenv("FASTEDIT_DATA", str(data))
    monkeypatch.setenv("FASTEDIT_MODELS", str(models))
    for var in common.ALLOCATOR_ENV:
        monkeypatch.delenv(var, raising=False)
    script = str(common.ROOT / "benchmarks" / "experiments" / "bench_edit.py")
    line = common.command_line(script, ["--weights", f"{models}/r.th", "--data-dir", str(data), "--note", "a b"])
    assert line == "python benchmarks/experiments/bench_edit.py --weights $FASTEDIT_MODELS/r.th " \
                   "--data-dir $FASTEDIT_DATA --note 'a b'"
    assert common.portable("/opt/venv/bin/python x.py") == "python x.py"
    # allocator settings change CPU timings: the command that made a result carries them
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert common.command_line(script, []) == "MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/experiments/bench_edit.py"
    assert common.machine_info()["allocator_env"] == {"MALLOC_TRIM_THRESHOLD_": "1073741824"}


def test_data_folders_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEDIT_DATA", str(tmp_path))
    assert common.data_dir() == tmp_path and common.data_dir("elsewhere") == common.pathlib.Path("elsewhere")
    monkeypatch.delenv("FASTEDIT_MODELS", raising=False)
    with pytest.raises(SystemExit, match=r"\$FASTEDIT_MODELS is not set"):
        common.models_dir()
    assert common.models_dir(tmp_path) == tmp_path


def test_bits_tell_nan_and_signed_zero_apart():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[0] = 0.0
    original = common.snapshot(model)
    assert common.changed_scalars(model, original) == 0
    with torch.no_grad():
        model.bias[0] = -0.0  # == 0.0, other bits
        model.weight[1, 2] = float("nan")
    assert common.changed_scalars(model, original) == 2
    with pytest.raises(RuntimeError, match="2 scalars"):
        common.assert_unchanged(model, original, "after the edit")
    nan = torch.tensor([float("nan")])
    assert torch.equal(common.bits(nan), common.bits(nan.clone()))  # torch.equal(nan, nan) is False


def test_write_json_is_whole_and_refuses_nan(tmp_path):
    path = tmp_path / "sub" / "r.json"
    common.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError):
        common.write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file stays, whole
    assert os.listdir(path.parent) == ["r.json"]


def test_cells_resume_and_refuse_another_setting(tmp_path):
    cells = common.Cells(tmp_path, "python x.py", max_new=1)
    assert not cells.done("c1", {"lr": 0.1}) and cells.budget_left()
    cells.save("c1", {"lr": 0.1}, {"score": 3}, seconds=2.0)
    assert not cells.budget_left() and "1 cells left" in cells.estimate(1)
    again = common.Cells(tmp_path, "python x.py")
    assert again.done("c1", {"lr": 0.1}) and again.load("c1")["score"] == 3
    with pytest.raises(SystemExit, match=r"another setting \(differs in \['lr'\]\)"):
        again.done("c1", {"lr": 0.2})


def test_timers_count_calls():
    calls = []
    times = common.time_calls(lambda: calls.append(1), 3, warmup=2)
    assert len(times) == 3 and len(calls) == 5
    cpu: dict = {}
    rr = common.time_round_robin({"a": lambda: None, "b": lambda: None}, 4, warmup=0, cpu_times=cpu)
    assert {k: len(v) for k, v in rr.items()} == {"a": 4, "b": 4} and len(cpu["b"]) == 4
    s = common.summary_ms([0.001, 0.003, 0.002])
    assert s == {"median_ms": 2.0, "min_ms": 1.0, "reps": 3}
    samples = common.Samples()
    samples.add(x=1.0, y=5.0)
    samples.add(x=3.0)
    assert samples.medians() == {"x": 2.0, "y": 5.0}


def test_peak_memory_sees_an_allocation():
    size = 64 * 2 ** 20
    peak, out, how = common.peak_memory_increase(lambda: torch.ones(size // 4).sum().item())
    assert out == size // 4 and how
    assert peak is None or peak >= size // 2  # the resident set grew by (about) the tensor


@pytest.mark.slow
@pytest.mark.real_data
def test_sequential_experiment_runs_resumes_and_checks_its_journal(tmp_path, shared_data_dir, shared_models_dir,
                                                                   restore_threads):
    from benchmarks.experiments import sequential_cifar

    argv = ["--edits", "6", "--control", "20", "--pool", "30", "--every", "3", "--configs", "gd", "surgery-b100",
            "--out-dir", str(tmp_path), "--threads", "1", "--quiet"]
    assert sequential_cifar.main(argv) == 0
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")}
    assert set(cells) == {"gd", "surgery-b100"}
    assert [c["edits"] for c in cells["gd"]["report"]["checkpoints"]] == [0, 1, 2, 3, 5, 6]
    journal = cells["surgery-b100"]["journal"]
    assert journal["entries"] == 0 or journal["exact"] is True
    assert all(n <= 100 for n in cells["surgery-b100"]["report"]["per_edit"]["nnz"])
    before = {k: v["cell_seconds"] for k, v in cells.items()}
    assert sequential_cifar.main(argv) == 0  # resumed: nothing recomputed
    again = {p.stem: json.loads(p.read_text())["cell_seconds"] for p in (tmp_path / "cells").glob("*.json")}
    assert again == before
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["config"] for r in summary["rows"]] == ["gd", "surgery-b100"] and (tmp_path / "sequential.png").exists()


def load_classifier_params(path):
    from benchmarks.experiments.minilm_rotten_tomatoes import load_classifier
    return list(load_classifier(path)[0].named_parameters())


@pytest.mark.slow
@pytest.mark.real_data
def test_minilm_scripts_fine_tune_then_edit_in_sequence(tmp_path, shared_data_dir, shared_models_dir, restore_threads):
    pytest.importorskip("transformers")
    from benchmarks.experiments import minilm_rotten_tomatoes, sequential_minilm

    saved = tmp_path / "classifier"
    assert minilm_rotten_tomatoes.main(["--train-limit", "32", "--eval-limit", "16", "--batch", "16", "--save", str(saved),
                                        "--threads", "1",
                                        "--out", str(tmp_path / "ft.json"), "--quiet"]) == 0
    ft = json.loads((tmp_path / "ft.json").read_text())
    assert ft["config"]["steps"] == 2 and 0 <= ft["accuracy"]["test"] <= 1 and (saved / "config.json").exists()
    out = tmp_path / "seq"
    assert sequential_minilm.main(["--classifier", str(saved), "--edits", "4", "--control", "12", "--tune-edits", "3",
                                   "--tune-control", "8",
                                   "--every", "2", "--configs", "rmsprop", "surgery-b1000", "--out-dir", str(out),
                                   "--threads", "1", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["config"] for r in summary["rows"]] == ["rmsprop", "surgery-b1000"]
    tuned = json.loads((out / "cells" / "tuned_rmsprop.json").read_text())
    assert tuned["chosen"]["lr"] in sequential_minilm.GRIDS["rmsprop"]

    from benchmarks.experiments import minilm_editing
    table1 = minilm_editing.main(["--classifier", str(saved), "--edits", "3", "--control", "6", "--tune-edits", "2",
                                  "--tune-control", "5", "--editors", "scaled_gd", "--parts", "last", "last2",
                                  "--out-dir", str(tmp_path / "t1"), "--threads", "1", "--quiet"])
    assert [(r["part"], r["editor"], r["num_edits"], r["num_control"]) for r in table1["rows"]] == \
        [("last", "scaled_gd", 3, 6), ("last2", "scaled_gd", 3, 6)]
    assert all(r["chosen"]["lr"] in minilm_editing.GRIDS["scaled_gd"] for r in table1["rows"])
    assert (tmp_path / "t1" / "editor_comparison_last2.png").exists()

    from benchmarks.experiments import surgery_minilm
    argv = ["--classifier", str(saved), "--inject", "4", "--clean", "4", "--test", "12", "--validation", "8",
            "--batch-size", "2", "--only", "select-grad_b10", "dense_last", "--clean-weights", "3", "--epochs", "1", "2",
            "--dense-lrs", "1e-4", "--out-dir", str(tmp_path / "surgery"), "--threads", "1", "--quiet"]
    summary = surgery_minilm.main(argv)
    by_cell = {r["cell"]: r for r in summary["rows"]}
    assert set(by_cell) == {"original", "select-grad_b10", "dense_last"}
    assert by_cell["original"]["test_consistency"] == 1.0 and by_cell["select-grad_b10"]["nnz"] <= 10
    cell = json.loads((tmp_path / "surgery" / "cells" / "select-grad_b10.json").read_text())
    assert [(t["clean_weight"], t["epochs"]) for t in cell["trials"]] == [(3.0, 1), (3.0, 2)]
    assert cell["trials"][surgery_minilm.choose(cell["trials"], 0.9)]["test"] == cell["test"]
    layer = sum(p.numel() for n, p in load_classifier_params(saved) if n.startswith(surgery_minilm.LAST_LAYER + "."))
    assert json.loads((tmp_path / "surgery" / "cells" / "dense_last.json").read_text())["trials"][0]["budget"] == layer



def _tiny_g2p_files(root, seed=0):
    """A random hidden-16 g2p checkpoint and a 240-word dictionary of random spellings: (models, data)."""
    from fastedit.models.g2p import G2P, PHONEMES

    torch.manual_seed(seed)
    (root / "models" / "g2p-en").mkdir(parents=True)
    G2P(hidden=16).save_checkpoint(root / "models" / "g2p-en" / "checkpoint20.npz")
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(240):
        stem = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (3,), generator=g))
        word = stem + "abcdefghij"[i % 10] + "klmnopqrst"[i // 10 % 10] + "uvwxy"[i // 100]  # unique
        pron = [PHONEMES[4 + int(c)] for c in torch.randint(0, 70, (int(torch.randint(1, 6, (1,), generator=g)),),
                                                            generator=g)]
        lines.append(f"{word} {' '.join(pron)}")
    (root / "data" / "g2p").mkdir(parents=True)
    (root / "data" / "g2p" / "cmudict.dict").write_text("\n".join(lines) + "\n")
    return root / "models", root / "data"


@pytest.mark.slow
def test_g2p_editing_runs_resumes_and_tabulates(tmp_path, restore_threads):
    from benchmarks.experiments import g2p_editing

    models, data = _tiny_g2p_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--models-dir", str(models), "--data-dir", str(data), "--edits", "4", "--control", "10", "--tune-edits", "3",
            "--tune-control", "8", "--tables", "1", "ranking", "--editors", "gd", "adam",
            "--only", "tokens_decoder_adam", "ranking_all_gd", "--out-dir", str(out), "--threads", "1", "--quiet"]
    tables = g2p_editing.main(argv)
    rows = {(r["constraint"], r["part"], r["editor"]): r for r in tables["rows"]}
    assert set(rows) == {("tokens", "decoder", "adam"), ("ranking", "all", "gd")}
    for r in rows.values():
        assert r["num_edits"] == 4 and 0 <= r["success_rate"] <= 1 and r["word_error"] > 0.5  # a random model
        assert r["command"].startswith("python benchmarks/experiments/g2p_editing.py ")
    ranking = json.loads((out / "cells" / "ranking_all_gd.json").read_text())
    assert ranking["chosen"]["lr"] in g2p_editing.LRS and len(ranking["tune_table"]) == len(g2p_editing.LRS)
    model = json.loads((out / "model.json").read_text())
    assert model["test_words"] == 24 and model["parameters_per_part"]["all"] == model["parameters"]
    assert model["parameters_per_part"]["decoder"] == model["parameters_per_part"]["encoder"] == 3 * (2 * 16 * 16 + 2 * 16)
    seconds = {p.stem: json.loads(p.read_text())["cell_seconds"] for p in (out / "cells").glob("*.json")}
    g2p_editing.main(argv)  # resumed: nothing recomputed
    assert {p.stem: json.loads(p.read_text())["cell_seconds"] for p in (out / "cells").glob("*.json")} == seconds
    with pytest.raises(SystemExit, match="another setting"):
        g2p_editing.main([*argv, "--edits", "3"])


@pytest.mark.slow
def test_editable_training_g2p_runs_and_pairs_seeds(tmp_path, restore_threads):
    from benchmarks.experiments import editable_training_g2p

    models, data = _tiny_g2p_files(tmp_path)
    out = tmp_path / "out"
    summary = editable_training_g2p.main([
        "--models-dir", str(models), "--data-dir", str(data), "--seeds", "0", "1", "--c-locs", "0.1", "--steps", "3",
        "--batch", "4", "--edits", "3", "--control", "6", "--tune-edits", "3", "--tune-control", "5", "--k", "2",
        "--out-dir", str(out), "--save-dir", str(tmp_path / "saved"), "--threads", "1", "--quiet"])
    assert [r["config"] for r in summary["rows"]] == ["plain", "et-c0.1"]
    assert all(r["seeds"] == [0, 1] for r in summary["rows"])
    et = summary["rows"][1]
    assert "minus_plain" in et["word_accuracy"] and 0 <= et["tuned_editor_success_rate"]["mean"] <= 1
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {"plain_s0", "et-c0.1_s0", "plain_s1", "et-c0.1_s1"}
    logs = cells["et-c0.1_s0"]["train"]["log"]
    assert logs[-1]["step"] == 2 and "loss_edit" in logs[-1] and "loss_edit" not in cells["plain_s0"]["train"]["log"][0]
    assert (tmp_path / "saved" / "et-c0.1_s1.npz").exists()


@pytest.mark.parametrize("module", ["g2p_editing", "editable_training_g2p", "minilm_editing", "surgery_minilm"])
def test_sequence_experiments_gpu_presets_parse(module):
    script = importlib.import_module(f"benchmarks.experiments.{module}")
    args = script.parse_args(["--preset", "gpu"])
    for key, value in script.PRESETS["gpu"].items():
        assert getattr(args, key) == value, key
    size = "inject" if module == "surgery_minilm" else "edits"
    assert getattr(script.parse_args(["--preset", "gpu", f"--{size}", "7"]), size) == 7  # an explicit size wins


def test_grid_edge_and_the_refined_edge():
    from benchmarks.experiments.reproduce_evaluation import chosen_edge
    grid = [1e-4, 1e-3, 1e-2]
    assert [common.grid_edge(v, grid) for v in grid] == ["low", None, "high"]
    assert chosen_edge(1e-4, grid, None) == "low"                # a plain grid: its own edge
    assert chosen_edge(1e-4, grid, 1.18) is None                 # refined and bracketed: not at an edge
    assert chosen_edge(3e-6, grid, float("inf")) == "low"        # refined past the grid, still at the edge
    assert chosen_edge(0.3, grid, float("inf")) == "high"
