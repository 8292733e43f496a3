"""The core needs torch and numpy only: with every optional package hidden, fastedit imports, edits
and evaluates, and each feature that needs an extra says which one."""
import subprocess
import sys
import textwrap

import pytest

from fastedit._optional import require

HIDDEN = ("matplotlib", "sklearn", "PIL", "safetensors", "tqdm", "transformers", "triton")


@pytest.mark.slow
def test_core_runs_without_any_extra():
    code = textwrap.dedent(f"""
        import sys
        for name in {HIDDEN!r}:
            sys.modules[name] = None  # import name -> ImportError
        import torch
        import fastedit as fe
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        x = torch.randn(6, 4)
        y = (model(x).argmax(-1) + 1) % 3
        r = fe.edit(model, x[:1], y[:1], editor=fe.GD(0.5), max_steps=50)
        assert r.success
        rep = fe.evaluate(model, (x[:2], y[:2]), (x, y), editor=fe.GD(0.5))  # progress bar: none without tqdm
        assert rep.num_edits == 2
        loaded = [m for m in {HIDDEN!r} if sys.modules.get(m) is not None]
        assert not loaded, loaded
        try:
            fe.SparseDelta.from_models({{"w": torch.zeros(2)}}, {{"w": torch.ones(2)}}).save("d.safetensors")
        except ImportError as exc:
            assert "pip install 'fastedit[io]'" in str(exc), exc
        else:
            raise AssertionError("saving a delta without safetensors did not raise")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


@pytest.mark.parametrize("module, extra", [("matplotlib", "plots"), ("PIL.Image", "data"), ("safetensors", "io"),
                                           ("transformers", "hf")])
def test_require_names_the_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    monkeypatch.setitem(sys.modules, module, None)  # PIL.Image may be imported already (tests/api/test_data.py)
    with pytest.raises(ImportError, match=rf"feature X needs .*pip install 'fastedit\[{extra}\]'"):
        require(module, "feature X")
    with pytest.raises(ImportError, match=r"pip install 'fastedit\[data\]'"):
        require(module, "feature X", "data")
