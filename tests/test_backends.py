"""Backend dispatch: FASTEDIT_BACKEND governs fastedit.edit; every backend explains itself."""
import pytest
import torch

import fastedit as fe
from fastedit.kernels import dispatch, extension
from test_edit import assert_identical, make_model, snapshot, wrong_label


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
