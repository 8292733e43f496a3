"""The compiled extension fastedit._C: build description, op registration, the one op table
(fastedit/ops/_table.py) against the C++ side, and the compiled kernels really running. The
edit_constraint op itself is tested in tests/ops/test_edit_constraint.py.

Tests that need the extension skip when it is not built, except in CI (CI=true) where a missing
extension is a failure unless it was switched off on purpose (FASTEDIT_SKIP_EXTENSION or
FASTEDIT_NO_EXTENSION set).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ROOT, require_extension

from fastedit.ops import _extension as ext
from fastedit.ops._table import BACKEND_OPS, OPS, RULE_IDS, SCHEMA


@pytest.fixture
def op():
    require_extension()
    return torch.ops.fastedit.edit_constraint


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------
# Build description (no extension needed)


def _read_sources() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"\[(\w+)\]", line)
        if match:
            current = match.group(1)
            sections.setdefault(current, [])
        else:
            assert current is not None, f"{line} before any section"
            sections[current].append(line)
    return sections


def test_source_list_is_complete():
    sources = _read_sources()
    assert set(sources) == {"common", "cpu", "cuda_kernels", "cuda_binding"}
    listed = [path for paths in sources.values() for path in paths]
    assert len(listed) == len(set(listed)), "a source is listed twice"
    on_disk = sorted(str(p.relative_to(ROOT)) for ext_ in ("*.cpp", "*.cu")
                     for p in (ROOT / "csrc").rglob(ext_))
    assert sorted(listed) == on_disk, "csrc/sources.txt and the files under csrc/ differ"
    assert ";" not in (ROOT / "csrc" / "sources.txt").read_text()
    for path in sources["cpu"]:
        assert path.startswith("csrc/cpu/")
    for path in sources["cuda_kernels"] + sources["cuda_binding"]:
        assert path.startswith("csrc/cuda/")
    assert all(path.endswith(".cu") for path in sources["cuda_kernels"])


def test_cuda_kernels_include_no_torch_header():
    forbidden = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11)/')
    for path in _read_sources()["cuda_kernels"]:
        todo, seen = [ROOT / path], set()
        while todo:  # the .cu file and the project headers it includes
            file = todo.pop()
            if file in seen:
                continue
            seen.add(file)
            text = file.read_text()
            assert not forbidden.search(text), f"{file.relative_to(ROOT)} includes a torch header"
            for name in re.findall(r'#\s*include\s*"([^"]+)"', text):
                for base in (file.parent, ROOT / "csrc"):
                    if (base / name).is_file():
                        todo.append(base / name)


def test_setup_and_cmake_read_the_same_list():
    setup_py = (ROOT / "setup.py").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "sources.txt" in setup_py and "sources.txt" in cmake
    assert "build_config.h.in" in setup_py and "build_config.h.in" in cmake
    for path in (p for paths in _read_sources().values() for p in paths):
        name = pathlib.PurePosixPath(path).name
        assert name not in setup_py and name not in cmake, f"{name} hard-coded outside sources.txt"


# ------------------------------------------------------------------------------------------------
# The one op table (fastedit/ops/_table.py) and the files named after the ops


def test_op_table_names_the_files_of_each_op():
    """One op, one name: fastedit/ops/<op>.py, csrc/cpu/<op>.cpp, csrc/cuda/<op>.{cu,h} and
    <op>_binding.cpp, tests/ops/test_<op>.py; every compiled C++/CUDA op source belongs to an op."""
    assert len(set(OPS)) == len(OPS) and set(SCHEMA) == set(OPS)
    sources = [p for paths in _read_sources().values() for p in paths]
    for op in OPS:
        for path in (f"fastedit/ops/{op}.py", f"csrc/cpu/{op}.cpp", f"csrc/cuda/{op}.cu", f"csrc/cuda/{op}.h",
                     f"csrc/cuda/{op}_binding.cpp", f"tests/ops/test_{op}.py"):
            assert (ROOT / path).is_file(), f"{path} is missing for the op {op!r}"
        assert SCHEMA[op].rstrip("_") == op
    for path in sources:
        if path.startswith(("csrc/cpu/", "csrc/cuda/")):
            stem = pathlib.PurePosixPath(path).stem.removesuffix("_binding")
            assert stem in OPS, f"{path} is not named after an op of fastedit/ops/_table.py"
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text())
    assert sorted(schemas) == sorted(SCHEMA.values()), "csrc/ops.cpp defines other ops than the table"
    assert set(BACKEND_OPS) == {"cuda", "triton", "cpu", "reference"}
    assert all(set(ops) <= set(OPS) for ops in BACKEND_OPS.values())


def test_rule_table_matches_the_editors():
    import fastedit as fe

    es = importlib.import_module("fastedit.ops.editor_step")
    assert sorted(RULE_IDS.values()) == list(range(len(RULE_IDS)))
    assert {cls.name for cls in es.RULES} == set(RULE_IDS)
    for cls, rule in es.RULES.items():
        assert fe.EDITORS[cls.name] is cls and RULE_IDS[cls.name] == rule
    assert es.rule_id(fe.SignGD(0.1)) == RULE_IDS["rprop"]


def test_op_table_matches_the_extension():
    """The extension's own description (csrc/module.cpp) lists the same ops and rule ids as the table:
    ``build_info()["ops"]`` the schemas of csrc/ops.cpp, ``["rules"]`` the step::Rule enum of
    csrc/editor_step_math.h."""
    require_extension()
    info = ext.build_info()
    assert sorted(info["ops"]) == sorted(SCHEMA.values())
    assert dict(info["rules"]) == RULE_IDS
    for schema in SCHEMA.values():
        assert ext.op_exists(schema)


# ------------------------------------------------------------------------------------------------
# Without the extension


@pytest.mark.slow
def test_extension_absent_path():
    result = _run_python("""
        import json, sys
        import fastedit
        from fastedit.ops import _extension as e
        from fastedit.ops.edit_constraint import compiled
        out = {"none": e.load() is None, "reason": e.unavailable_reason(), "info": e.build_info(),
               "cpu": e.has_cpu_ops(), "cuda": e.has_cuda_ops(),
               "imported": "fastedit._C" in sys.modules}
        try:
            import torch
            compiled(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
        except RuntimeError as error:
            out["error"] = str(error)
        print(json.dumps(out))
        """, FASTEDIT_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["none"] is True
    assert "FASTEDIT_NO_EXTENSION" in out["reason"]
    assert out["info"] == {} and out["cpu"] is False and out["cuda"] is False
    assert out["imported"] is False, "fastedit._C was imported although disabled"
    assert "unavailable" in out["error"] and "FASTEDIT_NO_EXTENSION" in out["error"]


# ------------------------------------------------------------------------------------------------
# The extension itself


def test_build_info(op):
    info = ext.build_info()
    expected_keys = {"version", "torch_version", "compiler", "cxx_standard", "build_system", "debug",
                     "with_cuda", "cuda_version", "cuda_archs", "openmp", "openmp_version",
                     "parallel_backend", "intra_op_parallel", "num_threads", "ops", "rules"}
    assert expected_keys <= set(info)
    try:
        version = importlib.metadata.version("fastedit")
    except importlib.metadata.PackageNotFoundError:
        version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                            re.MULTILINE).group(1)
    assert info["version"] == version
    assert info["torch_version"] == torch.__version__.split("+")[0], "built against another torch"
    assert info["build_system"] == "setuptools"
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["cxx_standard"] >= 201703
    assert "edit_constraint" in info["ops"]
    assert isinstance(info["cuda_archs"], list)
    if info["with_cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None
    if torch.version.cuda is None:
        assert info["with_cuda"] is False
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert info["parallel_backend"] == "OpenMP"
        assert info["openmp"] and info["intra_op_parallel"], "at::parallel_for would run serially"
    assert ext.has_cpu_ops() is True
    assert ext.has_cuda_ops() == bool(info["with_cuda"])
    assert ext.unavailable_reason() is None


@pytest.mark.slow
def test_importing_the_module_registers_the_ops_and_their_fake():
    require_extension()
    result = _run_python("""
        import torch
        import fastedit._C  # registers the ops and their Python parts, without extension.load()
        from torch._subclasses.fake_tensor import FakeTensorMode
        z, t = torch.randn(3, 5), torch.tensor([0, 4, 2])
        eager = torch.ops.fastedit.edit_constraint(z, t)
        # csrc/ops.cpp names the module with the ops' Python parts (torch's error messages say so)
        stub = torch._C._dispatch_pystub("fastedit::edit_constraint", "")
        with FakeTensorMode():
            fake = torch.ops.fastedit.edit_constraint(torch.empty(6, 4), torch.zeros(6, dtype=torch.long))
        print(tuple(eager.shape), tuple(fake.shape), fake.dtype, stub[0])
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "(3,) (6,) torch.float32 fastedit.ops"


def test_cmake_built_module():
    """The module built by CMakeLists.txt (.ci/run sets FASTEDIT_CMAKE_BUILD_DIR) works too."""
    build_dir = os.environ.get("FASTEDIT_CMAKE_BUILD_DIR")
    if not build_dir:
        pytest.skip("FASTEDIT_CMAKE_BUILD_DIR not set (.ci/run sets it after building with CMake)")
    found = sorted((ROOT / build_dir).glob("_C*.so")) + sorted((ROOT / build_dir).glob("_C*.pyd"))
    assert found, f"no _C module in {build_dir}"
    result = _run_python(f"""
        import importlib.util, json, torch
        spec = importlib.util.spec_from_file_location("_C", {str(found[0])!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        z, t = torch.randn(33, 17), torch.randint(0, 17, (33,))
        out = torch.ops.fastedit.edit_constraint(z, t)
        ok = torch.equal(out, z.amax(1) - z.gather(1, t[:, None])[:, 0])
        print(json.dumps({{"info": module.build_info(), "ok": ok}}))
        """, FASTEDIT_NO_EXTENSION="1")  # a second copy of the ops in one process would abort
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ok"]
    assert out["info"]["build_system"] == "cmake"
    assert out["info"]["torch_version"] == torch.__version__.split("+")[0]
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert out["info"]["intra_op_parallel"]


# ------------------------------------------------------------------------------------------------
# The compiled CPU kernels are what runs (not a quiet fallback to the reference)


_OPS = tuple(SCHEMA.values())  # editor_step_, edit_constraint, edit_metrics


def _spy_on_compiled_ops(monkeypatch) -> dict:
    """Count the calls of every ``torch.ops.fastedit`` op (the callers look the op up at each call)
    and make the pure-PyTorch fallbacks raise, so a path that stopped using the compiled kernel
    fails instead of passing quietly."""
    es = importlib.import_module("fastedit.ops.editor_step")
    ec = importlib.import_module("fastedit.ops.edit_constraint")
    em = importlib.import_module("fastedit.ops.edit_metrics")

    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    calls = {name: 0 for name in _OPS}
    for name in _OPS:
        # the dispatcher's CPU entry is the C++ kernel of csrc/cpu/ (not a Python registration)
        table = torch._C._dispatch_dump_table(f"fastedit::{name}")
        source = {schema: op for op, schema in SCHEMA.items()}  # editor_step_ -> csrc/cpu/editor_step.cpp
        assert re.search(rf"^CPU: registered at \S*csrc/cpu/{source[name]}\.cpp:\d+ \[kernel\]", table, re.M), table
        real = getattr(torch.ops.fastedit, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            tensors = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(x, torch.Tensor)]
            assert all(x.device.type == "cpu" for x in tensors)  # so the dispatcher picks the CPU kernel
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.ops.fastedit, name, counted)

    def fallback(*args, **kwargs):
        raise AssertionError("a pure-PyTorch fallback ran instead of the compiled kernel")

    monkeypatch.setattr(es, "_reference_", fallback)
    monkeypatch.setattr(es, "_triton_", fallback)
    monkeypatch.setattr(ec, "reference", fallback)
    monkeypatch.setattr(em, "reference", fallback)
    return calls


def _spy_model():
    import fastedit as fe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(10, 6)
    with torch.no_grad():
        y = model(x).topk(2, dim=1).indices[:, 1]  # runner-up classes: edits that need a few steps
    return fe, model, x, y


def test_compiled_cpu_kernels_run_in_edit_evaluate_and_training(monkeypatch):
    """fe.edit, fe.evaluate (loop and vmap) and an Editable Training step on the CPU call the compiled
    ops, and the dispatcher's CPU kernel for them is the C++ one (csrc/cpu/). Editable Training's
    inner steps are the differentiable editor step (pure torch ops, fastedit.ops.editor_step);
    the compiled op it runs is the edit constraint (on logits of any size here: by default small CPU
    logits take the faster reference, tests/ops/test_edit_constraint.py)."""
    require_extension()
    calls = _spy_on_compiled_ops(monkeypatch)
    monkeypatch.setattr(importlib.import_module("fastedit.ops.edit_constraint"), "CPU_FUSED_MIN_LOGITS", 0)
    fe, model, x, y = _spy_model()
    editor = fe.RMSProp(0.05, beta=0.7)

    r = fe.edit(model, x[:2], y[:2], editor=editor, max_steps=20)
    assert r.success and r.steps > 0
    assert calls["editor_step_"] == r.steps  # one fused step per editor step (early exit on the CPU)
    assert calls["edit_constraint"] >= r.steps + 1
    r.revert()

    for strategy in ("loop", "vmap"):
        calls.update({k: 0 for k in calls})
        rep = fe.evaluate(model, (x[:3], y[:3]), (x, y), editor=editor, max_steps=20, progress=False,
                          strategy=strategy, edits_per_group=3)
        assert rep.strategy == strategy and rep.strategy_fallback is None
        steps = int(rep.per_edit["steps"].sum())
        assert steps > 0
        # the loop: one call per step of each edit; vmap: one batched call per step of the group
        want = steps if strategy == "loop" else int(rep.per_edit["steps"].max())
        assert calls["editor_step_"] == want, (strategy, calls)
        assert calls["edit_metrics"] >= 1 and calls["edit_constraint"] >= 1

    calls.update({k: 0 for k in calls})
    et = fe.EditableTraining(model.train(), params=None, editor=editor, max_steps=3)
    loss, _ = et(x, y, x[:2], y[:2])
    loss.backward()
    assert calls["edit_constraint"] >= 1
    assert calls["editor_step_"] == 0  # the differentiable step is not the in-place kernel


def test_spy_sees_a_fallback(monkeypatch):
    """The spy above can fail: with the dispatcher forced to the reference, the fallback is caught."""
    require_extension()
    _spy_on_compiled_ops(monkeypatch)
    fe, model, x, y = _spy_model()
    from fastedit.ops import dispatch

    monkeypatch.setenv("FASTEDIT_BACKEND", "reference")
    monkeypatch.setattr(dispatch, "_CHOICE_CACHE", {})
    with pytest.raises(AssertionError, match="fallback ran"):
        fe.edit(model, x[:2], y[:2], editor=fe.GD(0.1), max_steps=5)
