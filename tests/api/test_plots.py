"""fastedit.plots: each figure is written as a non-empty PNG from a small real evaluation."""
import pytest
import torch
from helpers import make_model

import fastedit as fe
from fastedit import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports():
    model = make_model()
    torch.manual_seed(0)
    x_e, y_e = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    x_c, y_c = torch.randn(50, 1, 8, 8), torch.arange(50) % 10
    out = {}
    for name, editor in (("GD", fe.GD(0.3)), ("RMSProp", fe.RMSProp(0.05))):
        out[name] = fe.evaluate(model, (x_e, y_e), (x_c, y_c), editor=editor, params="block", max_steps=5,
                                progress=False, keep_kl_vectors=(name == "GD"),
                                edit_labels=torch.arange(16) % 7)  # classes 7..9: NaN rows
    return out


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


def test_per_class_drawdown_heatmap(reports, tmp_path):
    path = tmp_path / "heat.png"
    assert plots.plot_per_class_drawdown(reports["GD"], path) == path
    assert _is_png(path)
    names = [f"class {i}" for i in range(10)]
    p2 = plots.plot_per_class_drawdown(reports["RMSProp"], tmp_path / "heat2.png", class_names=names, title="x")
    assert _is_png(p2)
    with pytest.raises(ValueError, match="class_names"):
        plots.plot_per_class_drawdown(reports["GD"], tmp_path / "bad.png", class_names=["a", "b"])


def test_edit_tsne(reports, tmp_path):
    path = plots.plot_edit_tsne(reports["GD"], tmp_path / "tsne.png", perplexity=30)  # clamped below 16
    assert _is_png(path)


def test_edit_tsne_needs_kl_vectors(reports, tmp_path):
    with pytest.raises(ValueError, match="keep_kl_vectors=True"):
        plots.plot_edit_tsne(reports["RMSProp"], tmp_path / "tsne.png")
    assert not (tmp_path / "tsne.png").exists()


def test_editor_comparison(reports, tmp_path):
    path = plots.plot_editor_comparison(reports, tmp_path / "cmp.png", title="editors")
    assert _is_png(path)
    with pytest.raises(ValueError, match="empty"):
        plots.plot_editor_comparison({}, tmp_path / "none.png")


def test_drawdown_vs_error(tmp_path):
    points = {"plain": [(0.1, 0.02), (0.11, 0.025), (0.105, 0.022)], "editable": [(0.1, 0.01)], "empty": []}
    assert _is_png(plots.plot_drawdown_vs_error(points, tmp_path / "dd.png", title="t"))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_drawdown_vs_error({"a": []}, tmp_path / "none.png")


def test_per_class_drawdowns_side_by_side(reports, tmp_path):
    mats = {name: r.per_class_drawdown for name, r in reports.items()}  # with NaN rows
    path = plots.plot_per_class_drawdowns(mats, tmp_path / "grid.png", [f"c{i}" for i in range(10)])
    assert _is_png(path)
    with pytest.raises(ValueError, match="one size"):
        plots.plot_per_class_drawdowns({"a": torch.zeros(3, 3), "b": torch.zeros(4, 4)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_per_class_drawdowns({}, tmp_path / "bad.png")
