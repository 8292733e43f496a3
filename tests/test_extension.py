"""The compiled extension fastedit._C: build description, op registration, the edit_constraint op.

Tests that need the extension skip when it is not built, except in CI (CI=true) where a missing
extension is a failure unless it was switched off on purpose (FASTEDIT_SKIP_EXTENSION or
FASTEDIT_NO_EXTENSION set).
"""
from __future__ import annotations

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

from fastedit.kernels import extension as ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _require_extension() -> None:
    if ext.load() is not None:
        return
    reason = ext.unavailable_reason()
    switched_off = any(_flag(var) for var in ext.DISABLE_ENV_VARS)
    if os.environ.get("CI", "").lower() == "true" and not switched_off:
        pytest.fail(f"fastedit._C not built in CI (a missing extension must not skip here): {reason}")
    pytest.skip(f"fastedit._C not built: {reason}")


@pytest.fixture
def op():
    _require_extension()
    return torch.ops.fastedit.edit_constraint


def reference(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch: max_i z_i - z_target, in float32 (float64 for float64), cast back."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    return (z.amax(1) - z.gather(1, target[:, None])[:, 0]).to(logits.dtype)


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
# Without the extension


def test_extension_absent_path():
    result = _run_python("""
        import json, sys
        import fastedit
        from fastedit.kernels import extension as e
        out = {"none": e.load() is None, "reason": e.unavailable_reason(), "info": e.build_info(),
               "cpu": e.has_cpu_ops(), "cuda": e.has_cuda_ops(),
               "imported": "fastedit._C" in sys.modules}
        try:
            import torch
            e.edit_constraint(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
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
                     "parallel_backend", "intra_op_parallel", "num_threads", "ops"}
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


def test_importing_the_module_registers_the_ops_and_their_fake():
    _require_extension()
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
    assert result.stdout.split("\n")[-2] == "(3,) (6,) torch.float32 fastedit.kernels.extension"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("C", [1, 3, 10, 1001])
def test_matches_reference(op, dtype, B, C):
    logits = (torch.randn(B, C, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, C, (B,))
    out = op(logits, target)
    assert out.dtype == dtype and out.shape == (B,)
    torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(ext.edit_constraint(logits, target), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_and_sign(op, dtype):
    B, C = 300, 13
    logits = torch.randint(0, 3, (B, C)).to(dtype)  # many ties of the maximum
    target = torch.randint(0, C, (B,))
    target[::3] = logits[::3].float().argmax(1)  # make a third of the targets argmaxes
    out = op(logits, target)
    torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0)
    is_argmax = logits.gather(1, target[:, None])[:, 0] == logits.amax(1)
    assert torch.equal(out <= 0, is_argmax)
    assert torch.equal(out == 0, is_argmax)
    assert (out >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 5, 37])
def test_nan_and_inf_rows(op, dtype, C):
    B = 12
    logits = torch.randn(B, C).to(dtype)
    target = torch.randint(0, C, (B,))
    logits[0, 0] = float("nan")
    logits[1, C - 1] = float("nan")
    logits[2, target[2]] = float("nan")
    logits[3, :] = float("nan")
    logits[4, C // 2] = float("inf")
    logits[5, target[5]] = float("inf")
    logits[6, :] = float("-inf")
    logits[7, target[7]] = float("-inf")
    logits[8, C // 2] = float("-inf")
    logits[9, :] = float("inf")
    out = op(logits, target)
    expected = reference(logits, target)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out[:4].isnan().all(), "a NaN in a row must give NaN"
    assert not out[10:].isnan().any()


def test_non_contiguous_inputs_and_empty_batch(op):
    logits = torch.randn(40, 33).t()  # [33, 40], not contiguous
    target = torch.randint(0, 40, (66,))[::2]
    assert not logits.is_contiguous() and not target.is_contiguous()
    torch.testing.assert_close(op(logits, target), reference(logits, target), rtol=0, atol=0)
    empty = op(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("threads", [1, 2])
def test_large_batch_uses_parallel_rows(op, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = torch.randn(5000, 97)
        target = torch.randint(0, 97, (5000,))
        torch.testing.assert_close(op(logits, target), reference(logits, target), rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 3), torch.zeros(4, dtype=torch.int32)), "target must be int64"),
        (lambda: (torch.randn(4, 3), torch.zeros(4)), "target must be int64"),
        (lambda: (torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "shape mismatch"),
        (lambda: (torch.randn(4, 3), torch.tensor([0, 1, 3, 0])), r"target\[2\] = 3 is out of range"),
        (lambda: (torch.randn(4, 3), torch.tensor([0, -1, 2, 0])), r"target\[1\] = -1 is out of range"),
        (lambda: (torch.randn(12), torch.zeros(12, dtype=torch.long)), "logits must be 2-D"),
        (lambda: (torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long)), "logits must be 2-D"),
        (lambda: (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)), "target must be 1-D"),
        (lambda: (torch.randint(0, 5, (4, 3)), torch.zeros(4, dtype=torch.long)),
         "logits must be float32, float64, float16 or bfloat16"),
        (lambda: (torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), r"at least one class"),
    ],
    ids=["target-int32", "target-float", "shape-mismatch", "target-too-large", "target-negative",
         "logits-1d", "logits-3d", "target-2d", "logits-int", "no-classes"],
)
def test_bad_inputs_raise(op, make, message):
    logits, target = make()
    with pytest.raises(RuntimeError, match=message):
        op(logits, target)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(op, dtype):
    logits = torch.randn(9, 11).to(dtype)
    target = torch.randint(0, 11, (9,))
    torch.library.opcheck(op, (logits, target))
    torch.library.opcheck(op, (logits.clone().requires_grad_(), target))


def test_gradient_matches_reference(op):
    # Without ties: the exact gradient; with ties: the maximum's gradient shared like torch.amax.
    for logits in (torch.randn(17, 6, dtype=torch.float64),
                   torch.randint(0, 2, (17, 6)).to(torch.float64)):
        target = torch.randint(0, 6, (17,))
        weights = torch.randn(17, dtype=torch.float64)
        mine = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()
        (op(mine, target) * weights).sum().backward()
        (reference(theirs, target) * weights).sum().backward()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: op(z, torch.tensor([0, 3, 1, 2, 2])), (logits,))


def test_wrapper_under_torch_func(op):
    target = torch.tensor([0, 3, 1, 2, 2])
    weights = torch.randn(5, dtype=torch.float64)

    def mine(z):
        return (ext.edit_constraint(z, target) * weights).sum()

    def theirs(z):
        return (reference(z, target) * weights).sum()

    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(mine)(z), torch.func.grad(theirs)(z))
    batch = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(torch.func.grad(mine))(batch),
                               torch.vmap(torch.func.grad(theirs))(batch))
    torch.testing.assert_close(torch.vmap(lambda b: ext.edit_constraint(b, target))(batch),
                               torch.stack([reference(b, target) for b in batch]))
    both_batched = torch.randint(0, 4, (3, 5))
    torch.testing.assert_close(torch.vmap(ext.edit_constraint)(batch, both_batched),
                               torch.stack([reference(b, t) for b, t in zip(batch, both_batched)]))
    torch.testing.assert_close(torch.vmap(ext.edit_constraint, in_dims=(None, 0))(z, both_batched),
                               torch.stack([reference(z, t) for t in both_batched]))
    torch.testing.assert_close(torch.vmap(op, in_dims=(2, None))(batch.permute(1, 2, 0), target),
                               torch.stack([reference(b, target) for b in batch]))
    with pytest.raises(RuntimeError, match="per sample"):
        torch.vmap(op)(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.long))
    # second order: the gradient is piecewise constant, its own gradient is zero
    hess = torch.func.grad(lambda z: (torch.func.grad(mine)(z) * z).sum())(z)
    torch.testing.assert_close(hess, torch.func.grad(mine)(z))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(op, backend):
    def loss(logits, target):
        l_e = ext.edit_constraint(logits.log_softmax(1), target)  # the autograd.Function wrapper
        raw = torch.ops.fastedit.edit_constraint(logits, target)  # the op itself
        return torch.relu(l_e).mean() + 0.5 * raw.mean(), l_e

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    for B in (8, 9):
        logits = torch.randn(B, 10)
        target = torch.randint(0, 10, (B,))
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        value, l_e = compiled(x1, target)
        ref_value, ref_l_e = loss(x2, target)
        torch.testing.assert_close(l_e, ref_l_e)
        torch.testing.assert_close(value, ref_value)
        torch.testing.assert_close(l_e, reference(logits.log_softmax(1), target), rtol=1e-5, atol=1e-5)
        value.backward()
        ref_value.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(op, dtype):
    if not ext.has_cuda_ops():
        pytest.skip("fastedit._C was built without its CUDA sources")
    for B, C in [(1, 1), (7, 3), (129, 1001), (3000, 37)]:
        logits = (torch.randn(B, C, device="cuda", dtype=torch.float64) * 4).to(dtype)
        target = torch.randint(0, C, (B,), device="cuda")
        logits[0, 0] = float("nan") if B > 1 else logits[0, 0]
        out = op(logits, target)
        torch.testing.assert_close(out, reference(logits, target), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match=r"target\[1\] = 5 is out of range"):
        op(torch.randn(2, 5, device="cuda"), torch.tensor([0, 5], device="cuda"))
    torch.library.opcheck(op, (torch.randn(9, 11, device="cuda", dtype=dtype),
                               torch.randint(0, 11, (9,), device="cuda")))


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


_OPS = ("editor_step_", "edit_constraint", "edit_metrics")


def _spy_on_compiled_ops(monkeypatch) -> dict:
    """Count the calls of every ``torch.ops.fastedit`` op (the callers look the op up at each call)
    and make the pure-PyTorch fallbacks raise, so a path that stopped using the compiled kernel
    fails instead of passing quietly."""
    from fastedit.kernels import editor_step as es
    from fastedit.kernels import reference

    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    calls = {name: 0 for name in _OPS}
    for name in _OPS:
        # the dispatcher's CPU entry is the C++ kernel of csrc/cpu/ (not a Python registration)
        table = torch._C._dispatch_dump_table(f"fastedit::{name}")
        source = {"editor_step_": "editor_step", "edit_constraint": "edit_constraint", "edit_metrics": "edit_metrics"}
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
    monkeypatch.setattr(reference, "edit_constraint", fallback)
    monkeypatch.setattr(reference, "edit_metrics", fallback)
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
    inner steps are the differentiable editor step (pure torch ops, fastedit.kernels.differentiable);
    the compiled op it runs is the edit constraint."""
    _require_extension()
    calls = _spy_on_compiled_ops(monkeypatch)
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
    _require_extension()
    _spy_on_compiled_ops(monkeypatch)
    fe, model, x, y = _spy_model()
    from fastedit.kernels import dispatch

    monkeypatch.setenv("FASTEDIT_BACKEND", "reference")
    monkeypatch.setattr(dispatch, "_CHOICE_CACHE", {})
    with pytest.raises(AssertionError, match="fallback ran"):
        fe.edit(model, x[:2], y[:2], editor=fe.GD(0.1), max_steps=5)
