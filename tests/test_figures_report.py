"""Figures keep the house conventions; the report is one self-contained page."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from interp import figures as F
from interp.report import build_report


def _patching_table():
    rows = []
    for m in ("base", "uniform"):
        for layer in range(3):
            for p, lab in enumerate(["e1_0", "e1_last", "final"]):
                rows.append({"method": m, "layer": layer, "position": p, "position_label": lab,
                             "value": (layer - 1) * (p - 1) * (1 if m == "base" else -0.5)})
    return pd.DataFrame(rows)


def test_heatmap_is_diverging_and_centred():
    df = _patching_table()
    fig = F.heatmap_figure(df, value="value", x_order=["e1_0", "e1_last", "final"])
    hm = fig.data[0]
    assert hm.zmid == 0 and hm.zmin == -hm.zmax
    assert list(hm.x) == ["e1_0", "e1_last", "final"] and list(hm.y) == [0, 1, 2]  # layer on y
    base = df[df.method == "base"].pivot(index="layer", columns="position_label", values="value")
    np.testing.assert_allclose(np.asarray(hm.z), base[["e1_0", "e1_last", "final"]].to_numpy())


def test_accuracy_figure_intervals():
    acc = pd.DataFrame({"method": ["a", "b"], "library": "x", "test_set": "F", "hop": "two_hop", "n": 10,
                        "accuracy": [0.5, 0.2], "ci_low": [0.3, 0.05], "ci_high": [0.7, 0.5],
                        "metric": "first_token"})
    fig = F.accuracy_figure(acc)
    bar = fig.data[0]
    np.testing.assert_allclose(bar.error_y.array, [0.2, 0.3])
    np.testing.assert_allclose(bar.error_y.arrayminus, [0.2, 0.15])
    with pytest.raises(ValueError, match="no rows"):
        F.accuracy_figure(acc, hop="hop1")
    with pytest.raises(ValueError, match="lacks columns"):
        F.accuracy_figure(acc.drop(columns=["ci_low"]))


def test_save_figures_html_and_png(tmp_path):
    paths = F.save_figures({"p": F.heatmap_figure(_patching_table(), value="value")}, tmp_path)
    html = (tmp_path / "p.html").read_text()
    assert "plotly.min.js" in html and (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(paths["p"]) == 2


def test_report_embeds_figures_and_escapes(tmp_path):
    fig = F.heatmap_figure(_patching_table(), value="value")
    path = build_report(tmp_path, "T <x>", [{"claim": "c", "verdict": "yes", "evidence": "e"}],
                        [{"title": "S", "text": "", "figures": [("fig-a", fig.to_json(), "cap")],
                          "tables": [("t", pd.DataFrame({"a": [1.0]}))]}], {"study": {"model": "m"}},
                        {"interp": "0"}, {"x": 1.0})
    page = path.read_text()
    assert "T &lt;x&gt;" in page and 'id="fig-a"' in page and "supported by our data" in page
    data = page.split('id="figure-data">')[1].split("</script>")[0]
    assert json.loads(data.replace("<\\/", "</"))["fig-a"]["data"][0]["type"] == "heatmap"


def test_fraction_heatmap_keeps_its_range_and_layers_are_integers():
    """A fraction in [0, 1] is drawn on a 0-1 scale even when every value is 0 (plotly's own
    range was -0.5..0.5), layer ticks fall on whole layers, and both axes are titled."""
    import pandas as pd

    from interp.figures import heatmap_figure, line_figure

    df = pd.DataFrame({"method": "m", "source_layer": [0, 0, 1, 1], "target_layer": [0, 1, 0, 1], "fixed": 0.0})
    fig = heatmap_figure(df, value="fixed", x="target_layer", y="source_layer", signed=False, zrange=(0, 1),
                         x_title="target layer", y_title="source layer")
    tr = fig.data[0]
    assert (tr.zmin, tr.zmax) == (0, 1)
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.tickformat == "d"
    assert fig.layout.xaxis.title.text == "target layer" and fig.layout.yaxis.title.text == "source layer"
    lines = line_figure(pd.DataFrame({"layer": [0, 1, 2], "v": [0.1, 0.2, 0.3], "m": "a"}), x="layer", y="v",
                        color="m", title="t")
    assert lines.layout.xaxis.dtick == 1 and lines.layout.xaxis.title.text == "layer"
    assert lines.layout.yaxis.title.text == "v"


def test_save_figures_writes_a_png_the_batch_export_skipped(tmp_path, monkeypatch):
    """kaleido's batch export has skipped a figure, or failed part-way; each missing PNG is then
    written on its own instead of failing the run."""
    import plotly.io as pio

    fig = F.heatmap_figure(_patching_table(), value="value")
    single = []

    def batch(figs, paths, **kw):  # writes every file but the first, then fails
        for p in list(paths)[1:]:
            Path(p).write_bytes(b"\x89PNG batch")
        raise RuntimeError("kaleido_scopes is not defined")

    def one(fig, path, **kw):
        single.append(Path(path).name)
        Path(path).write_bytes(b"\x89PNG single")

    monkeypatch.setattr(pio, "write_images", batch)
    monkeypatch.setattr(pio, "write_image", one)
    paths = F.save_figures({"a": fig, "b": fig}, tmp_path)
    assert len(single) == 1 and single[0].startswith(".a.png.tmp")
    assert (tmp_path / "a.png").read_bytes() == b"\x89PNG single"
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG batch"
    assert paths["a"][-1].endswith("a.png") and not list(tmp_path.glob(".*tmp*"))
