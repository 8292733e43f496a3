"""Backend dispatch: FASTEDIT_BACKEND governs fastedit.edit; every backend explains itself."""
import pytest
import torch
from helpers import assert_identical, make_model, snapshot, wrong_label

import fastedit as fe
from fastedit.ops import _extension as extension
from fastedit.ops import dispatch


def test_backends_report_every_backend_with_a_reason():
    info = fe.backends()
    assert info["order"] == ["cuda", "triton", "cpu", "reference"]
    for name, st in info["backends"].items():
        assert st["usable"] or st["reason"], name
    assert info["backends"]["reference"]["usable"]
    assert info["backends"]["cpu"]["usable"] == (extension.load() is not None)


@pytest.mark.skipif(extension.load() is None, reason=f"fastedit._C not built: {extension.unavailable_reason()}")
def test_edit_is_bit_identical_on_reference_and_cpu_backends(monkeypatch):
    snaps = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("FASTEDIT_BACKEND", backend)
        assert dispatch.choose_backend("edit_constraint", torch.device("cpu")) == backend
        model = make_model(torch.float64)
        x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
        r = fe.edit(model, x, wrong_label(model, x), editor=fe.RMSProp(0.02), params="block", max_steps=10)
        snaps[backend] = (r.steps, r.loss, snapshot(model))
    assert snaps["reference"][:2] == snaps["cpu"][:2]
    for k, v in snaps["reference"][2].items():
        assert torch.equal(v, snaps["cpu"][2][k]), k


def test_default_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    expected = "cpu" if extension.has_cpu_ops() else "reference"
    assert dispatch.choose_backend("edit_constraint", torch.device("cpu")) == expected


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_forcing_an_unusable_backend_fails_loudly_and_leaves_model_identical(monkeypatch, forced):
    monkeypatch.setenv("FASTEDIT_BACKEND", forced)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=f"FASTEDIT_BACKEND={forced}"):
        fe.edit(model, torch.randn(1, 1, 8, 8), 3, editor=fe.GD(0.1), params="out")
    assert_identical(model, before)


def test_unknown_forced_backend(monkeypatch):
    monkeypatch.setenv("FASTEDIT_BACKEND", "tpu")
    with pytest.raises(RuntimeError, match="not a backend"):
        fe.backends()


# ------------------------------------------------------------------------------------------------
# Forcing a backend per call (backend=) and per block (fastedit.ops.use_backend)


def test_use_backend_forces_restores_and_nests(monkeypatch):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    cpu = torch.device("cpu")
    default = dispatch.choose_backend("edit_metrics", cpu)
    assert fe.backends()["override"] is None
    with fe.ops.use_backend("reference"):
        assert fe.backends()["override"] == "reference"
        for op in ("edit_constraint", "editor_step", "edit_metrics"):
            assert dispatch.choose_backend(op, cpu) == "reference"
        with fe.ops.use_backend(None):  # the dispatcher's own choice again
            assert dispatch.choose_backend("edit_metrics", cpu) == default
        assert dispatch.choose_backend("edit_metrics", cpu) == "reference"
    assert dispatch.choose_backend("edit_metrics", cpu) == default
    assert fe.backends()["override"] is None
    with pytest.raises(KeyError):
        with fe.ops.use_backend("reference"):
            raise KeyError("restored on an exception too")
    assert dispatch.choose_backend("edit_metrics", cpu) == default


def test_precedence_keyword_over_use_backend_over_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTEDIT_BACKEND", "cuda")  # unusable here: only reaching it would fail
    with fe.ops.use_backend("reference"):
        assert dispatch.choose_backend("edit_constraint", cpu) == "reference"
        if extension.has_cpu_ops():
            assert dispatch.choose_backend("edit_constraint", cpu, "cpu") == "cpu"
    assert dispatch.choose_backend("edit_constraint", cpu, "reference") == "reference"
    with pytest.raises(dispatch.BackendError, match="FASTEDIT_BACKEND=cuda"):
        dispatch.choose_backend("edit_constraint", cpu)


def test_unknown_backend_names_are_refused():
    with pytest.raises(ValueError, match="not a backend"):
        with fe.ops.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="not a backend"):
        fe.ops.edit_constraint(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="tpu")


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_forcing_an_unusable_backend_per_block_fails_loudly_and_leaves_model_identical(monkeypatch, forced):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    model = make_model()
    before = snapshot(model)
    with fe.ops.use_backend(forced), pytest.raises(dispatch.BackendError, match=rf"use_backend\('{forced}'\)"):
        fe.edit(model, torch.randn(1, 1, 8, 8), 3, editor=fe.GD(0.1), params="out")
    assert_identical(model, before)
    with pytest.raises(dispatch.BackendError, match=rf"backend='{forced}'"):
        p = [torch.randn(3)]
        fe.ops.editor_step_(fe.GD(0.1), p, [torch.randn(3)], fe.GD(0.1).init_state(p), backend=forced)


@pytest.mark.skipif(extension.load() is None, reason=f"fastedit._C not built: {extension.unavailable_reason()}")
def test_edit_is_bit_identical_under_use_backend_and_the_environment(monkeypatch):
    """use_backend("reference") around fe.edit gives what FASTEDIT_BACKEND=reference gives, and
    use_backend("cpu") what the compiled CPU kernels give."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    runs = {}
    for how, backend in (("env", "reference"), ("block", "reference"), ("env", "cpu"), ("block", "cpu")):
        model = make_model(torch.float64)
        if how == "env":
            monkeypatch.setenv("FASTEDIT_BACKEND", backend)
            r = fe.edit(model, x, wrong_label(model, x), editor=fe.RMSProp(0.02), params="block", max_steps=10)
            monkeypatch.delenv("FASTEDIT_BACKEND")
        else:
            with fe.ops.use_backend(backend):
                r = fe.edit(model, x, wrong_label(model, x), editor=fe.RMSProp(0.02), params="block", max_steps=10)
        runs[how, backend] = (r.steps, r.loss, snapshot(model))
    for backend in ("reference", "cpu"):
        env, block = runs["env", backend], runs["block", backend]
        assert env[:2] == block[:2]
        for k, v in env[2].items():
            assert torch.equal(v, block[2][k]), (backend, k)


@pytest.mark.skipif(extension.load() is None, reason=f"fastedit._C not built: {extension.unavailable_reason()}")
def test_backend_keyword_of_each_op(monkeypatch):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(0)
    # editor_step_: GD is bit-identical on every backend
    params = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    out = {}
    for backend in ("reference", "cpu"):
        editor = fe.Momentum(0.1, momentum=0.9)
        mine = [p.clone() for p in params]
        state = editor.init_state(mine)
        fe.ops.editor_step_(editor, mine, grads, state, backend=backend)
        out[backend] = mine
    for a, b in zip(out["reference"], out["cpu"]):
        assert torch.equal(a, b)
    # edit_metrics: the backends agree to rounding
    ref = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (20,), generator=gen)
    edited = ref + 0.5 * torch.randn(3, 20, 4, generator=gen, dtype=torch.float64)
    a = fe.ops.edit_metrics(ref, labels, edited, backend="reference")
    b = fe.ops.edit_metrics(ref, labels, edited, backend="cpu")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
