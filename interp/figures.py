"""Plotly figure builders in one house style, and their export (interactive HTML + static PNG).

Conventions, so every mechanism figure reads the same way:

* signed effects (patching, differences between variants) use the diverging ``RdBu`` scale
  centred at 0 (blue = restores the clean answer, red = pushes away from it);
* layer is always on the y axis of heatmaps (layer 0 at the bottom), token/position labels on x;
* one facet per model variant (base, experts, merges, routers), intervals drawn wherever the
  table carries them (Wilson 95% for accuracies, ±1 s.e.m. bands for per-example means).

Every builder takes a tidy :mod:`pandas` table as written by :mod:`interp.study` and returns a
``plotly.graph_objects.Figure``; :func:`save_figures` writes ``NAME.html`` and ``NAME.png``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio

from interp.errors import FigureError

# Method colours stay fixed across figures so a reader can track a variant by colour.
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
           "#8C8C8C", "#CCB974", "#64B5CD", "#1B9E77", "#D95F02", "#7570B3", "#E7298A"]
DIVERGING = "RdBu"

pio.templates["interp"] = go.layout.Template(
    layout=go.Layout(
        font=dict(family="Inter, Helvetica, Arial, sans-serif", size=13, color="#222"),
        title=dict(font=dict(size=16), x=0.0, xanchor="left"),
        paper_bgcolor="white", plot_bgcolor="white", colorway=PALETTE,
        xaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
        yaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
        legend=dict(bgcolor="rgba(255,255,255,0.8)", borderwidth=0),
        margin=dict(l=70, r=30, t=70, b=60),
        hoverlabel=dict(font_size=12),
    ))
pio.templates.default = "plotly_white+interp"


def _color_map(methods: Iterable[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(methods))}


def _require(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise FigureError(f"{what}: table lacks columns {missing} (has {list(df.columns)})")


def accuracy_figure(acc: pd.DataFrame, metric: str = "first_token", hop: str = "two_hop") -> go.Figure:
    """Accuracy by method × test set with Wilson 95% intervals.

    Args:
        acc: ``accuracy.csv`` rows (method, library, test_set, hop, n, accuracy, ci_low, ci_high,
            metric).
        metric: which accuracy (``first_token`` or ``exact``).
        hop: which query kind to show (``two_hop``, ``hop1``, ``hop2``, ``chain``...).
    """
    _require(acc, ["method", "test_set", "hop", "accuracy", "ci_low", "ci_high"], "accuracy_figure")
    d = acc[(acc["hop"] == hop) & ((acc["metric"] == metric) if "metric" in acc else True)].copy()
    if d.empty:
        raise FigureError(f"accuracy_figure: no rows for hop={hop!r}, metric={metric!r}")
    d["err_plus"] = d["ci_high"] - d["accuracy"]
    d["err_minus"] = d["accuracy"] - d["ci_low"]
    fig = px.bar(d, x="method", y="accuracy", color="test_set", barmode="group",
                 error_y="err_plus", error_y_minus="err_minus",
                 category_orders={"test_set": sorted(d["test_set"].unique())},
                 hover_data=["n", "ci_low", "ci_high"] + (["library"] if "library" in d else []),
                 title=f"{hop} accuracy ({metric.replace('_', ' ')}) by method and test set, Wilson 95% CI")
    fig.update_yaxes(range=[0, 1.05], title="accuracy")
    fig.update_xaxes(title="method", tickangle=-30)
    return fig


def lens_figure(lens: pd.DataFrame, value: str = "logprob", position: str = "final") -> go.Figure:
    """EntRec curves: logit-lens log-prob (or rank) of e₂ and e₃ by layer, one line per method.

    Args:
        lens: rows (method, layer, position, target, logprob, rank) — one per example or
            pre-aggregated; means ± s.e.m. are drawn.
        value: ``logprob`` or ``rank`` (rank is shown on a log axis).
        position: which read-out position (``final`` or ``e1_last``).
    """
    _require(lens, ["method", "layer", "position", "target", value], "lens_figure")
    d = lens[lens["position"] == position]
    if d.empty:
        raise FigureError(f"lens_figure: no rows at position {position!r}")
    g = d.groupby(["method", "target", "layer"])[value]
    agg = g.mean().rename("mean").to_frame().join(g.sem().fillna(0).rename("sem")).reset_index()
    targets = sorted(agg["target"].unique())
    fig = go.Figure()
    colors = _color_map(agg["method"])
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(targets), shared_yaxes=True,
                        subplot_titles=[f"{t} ({'bridge entity' if t == 'e2' else 'answer'})" for t in targets])
    for j, t in enumerate(targets, start=1):
        for m, sub in agg[agg["target"] == t].groupby("method", sort=False):
            c = colors[m]
            x = sub["layer"].to_numpy()
            y, s = sub["mean"].to_numpy(), sub["sem"].to_numpy()
            fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([y + s, (y - s)[::-1]]),
                                     fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0),
                                     hoverinfo="skip", showlegend=False, legendgroup=m), row=1, col=j)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=m, line=dict(color=c),
                                     marker=dict(size=4), legendgroup=m, showlegend=(j == 1)), row=1, col=j)
    label = "EntRec log-prob (logit lens)" if value == "logprob" else "rank of entity's first token"
    fig.update_yaxes(title_text=label, row=1, col=1)
    if value == "rank":
        fig.update_yaxes(type="log", autorange="reversed")
    fig.update_xaxes(title_text="layer")
    _integer_ticks(fig, "x", agg["layer"])
    fig.update_layout(title=f"Where are the bridge entity e₂ and the answer e₃ decodable? "
                            f"({position} position, mean ± s.e.m.)")
    return fig


def _integer_ticks(fig: go.Figure, axis: str, values) -> None:
    """Layer axes show whole layers (plotly's automatic ticks fall on 0.5 steps for few layers)."""
    v = pd.Series(list(values)).dropna()
    n = int(v.max() - v.min()) + 1 if len(v) else 1
    kw = dict(tickmode="linear", tick0=0, dtick=max(1, int(np.ceil(n / 16))), tickformat="d")
    (fig.update_xaxes if axis == "x" else fig.update_yaxes)(**kw)


def heatmap_figure(df: pd.DataFrame, value: str, facet: str = "method", x: str = "position_label",
                   y: str = "layer", title: str = "", signed: bool = True,
                   x_order: list[str] | None = None, zrange: tuple[float, float] | None = None,
                   x_title: str | None = None, y_title: str | None = None,
                   value_title: str | None = None) -> go.Figure:
    """Layer × position (or any two-key) heatmaps, one facet per variant, RdBu centred at 0.

    Args:
        df: tidy rows with columns ``facet``, ``x``, ``y``, ``value``; duplicates are averaged.
        signed: diverging scale centred at 0 (effects); else sequential ``Viridis``.
        zrange: fixed colour range, e.g. ``(0, 1)`` for a fraction (else from the data).
        x_title, y_title, value_title: axis and colour-bar titles (default: the column names).
    """
    _require(df, [facet, x, y, value], "heatmap_figure")
    facets = list(dict.fromkeys(df[facet]))
    from plotly.subplots import make_subplots

    cols = min(len(facets), 4)
    rows = int(np.ceil(len(facets) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=facets, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    vmax = float(np.nanmax(np.abs(df[value].to_numpy()))) if len(df) else 1.0
    vmax = vmax if vmax > 0 else 1.0
    for k, f in enumerate(facets):
        sub = df[df[facet] == f]
        piv = sub.pivot_table(index=y, columns=x, values=value, aggfunc="mean", sort=False)
        if x_order:
            piv = piv.reindex(columns=[c for c in x_order if c in piv.columns])
        piv = piv.sort_index()
        kw = dict(colorscale=DIVERGING, zmid=0, zmin=-vmax, zmax=vmax) if signed else dict(colorscale="Viridis")
        if zrange is not None:
            kw.update(zmin=zrange[0], zmax=zrange[1])
            kw.pop("zmid", None)
        fig.add_trace(go.Heatmap(z=piv.to_numpy(), x=[str(c) for c in piv.columns], y=piv.index.tolist(),
                                 showscale=(k == 0), colorbar=dict(title=value_title or value), hovertemplate=
                                 f"{x}=%{{x}}<br>{y}=%{{y}}<br>{value}=%{{z:.3f}}<extra>{f}</extra>", **kw),
                      row=k // cols + 1, col=k % cols + 1)
    fig.update_yaxes(title_text=y_title or y, col=1)
    # every category labelled (plotly thins them, which dropped the last column's label)
    fig.update_xaxes(title_text=x_title or x, type="category", tickmode="linear", dtick=1, tickangle=-45,
                     row=rows)
    fig.update_xaxes(type="category", tickmode="linear", dtick=1, tickangle=-45)
    if pd.api.types.is_numeric_dtype(df[y]):
        _integer_ticks(fig, "y", df[y])
    if pd.api.types.is_numeric_dtype(df[x]):
        fig.update_xaxes(type="linear", tickmode="linear", tick0=0, dtick=1, tickformat="d")
    fig.update_layout(title=title, height=max(380, 320 * rows), margin=dict(b=110))
    return fig


def line_figure(df: pd.DataFrame, x: str, y: str, color: str, title: str, facet: str | None = None,
                y_title: str | None = None, log_y: bool = False, band: str | None = None,
                x_title: str | None = None, y_range: tuple[float, float] | None = None) -> go.Figure:
    """Lines (one per ``color`` value) with an optional ± ``band`` column, optional facets.
    Both axes are titled (default: the column names); a ``layer`` x axis has integer ticks."""
    _require(df, [x, y, color] + ([facet] if facet else []) + ([band] if band else []), "line_figure")
    fig = px.line(df, x=x, y=y, color=color, facet_col=facet, markers=True, log_y=log_y, title=title,
                  color_discrete_map=_color_map(df[color]))
    if band:
        for tr in list(fig.data):
            sub = df[df[color] == tr.name]
            if facet and len(df[facet].unique()) > 1:
                continue
            xs, ys, bs = sub[x].to_numpy(), sub[y].to_numpy(), sub[band].to_numpy()
            fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]), y=np.concatenate([ys + bs, (ys - bs)[::-1]]),
                                     fill="toself", fillcolor=tr.line.color, opacity=0.15, line=dict(width=0),
                                     hoverinfo="skip", showlegend=False))
    fig.update_yaxes(title_text=y_title or y, col=1)
    fig.update_xaxes(title_text=x_title or x)
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    if "layer" in x and pd.api.types.is_numeric_dtype(df[x]):
        _integer_ticks(fig, "x", df[x])
    return fig


def bar_figure(df: pd.DataFrame, x: str, y: str, color: str | None, title: str, y_title: str | None = None,
               error: str | None = None, barmode: str = "group") -> go.Figure:
    """Grouped bars with optional symmetric error column."""
    _require(df, [x, y] + ([color] if color else []), "bar_figure")
    fig = px.bar(df, x=x, y=y, color=color, barmode=barmode, error_y=error, title=title)
    if y_title:
        fig.update_yaxes(title_text=y_title)
    fig.update_xaxes(tickangle=-30, title=None)
    return fig


def matrix_figure(mat: pd.DataFrame, title: str, value_name: str, zmin: float = 0.0, zmax: float = 1.0,
                  signed: bool = False) -> go.Figure:
    """A labelled square matrix (e.g. subspace similarity φ between adapters), values annotated."""
    kw = dict(colorscale=DIVERGING, zmid=0) if signed else dict(colorscale="Blues")
    fig = go.Figure(go.Heatmap(z=mat.to_numpy(), x=list(mat.columns), y=list(mat.index), zmin=zmin, zmax=zmax,
                               colorbar=dict(title=value_name), text=np.round(mat.to_numpy(), 2),
                               texttemplate="%{text}", **kw))
    fig.update_layout(title=title, yaxis=dict(autorange="reversed"), height=420 + 20 * len(mat))
    return fig


def separation_figure(sep: pd.DataFrame, title: str = "AUC by layer (95% CI)",
                      y_title: str = "AUC (95% CI)") -> go.Figure:
    """AUC by layer with its interval, one line per measurement × position; dashed 0.5 = no
    separation.

    Args:
        sep: :func:`interp.mechanisms.separation.separation_table` rows (measurement, layer,
            position, auc, lo, hi); rows whose layer is not an integer (``"max"``) are left out.
    """
    _require(sep, ["measurement", "layer", "position", "auc", "lo", "hi"], "separation_figure")
    d = sep[pd.to_numeric(sep["layer"], errors="coerce").notna()].copy()
    if d.empty:
        raise FigureError("separation_figure: no per-layer rows")
    d["layer"] = d["layer"].astype(int)
    fig = go.Figure()
    for k, ((m, p), g) in enumerate(d.groupby(["measurement", "position"], sort=False)):
        g = g.sort_values("layer")
        fig.add_trace(go.Scatter(
            x=g["layer"], y=g["auc"], mode="lines+markers", name=f"{m} @ {p}",
            line=dict(color=PALETTE[k % len(PALETTE)]),
            error_y=dict(type="data", array=g["hi"] - g["auc"], arrayminus=g["auc"] - g["lo"],
                         thickness=1, width=2)))
    fig.add_hline(y=0.5, line_dash="dash", line_color="#888")
    fig.update_yaxes(title_text=y_title, range=[0, 1])
    fig.update_xaxes(title_text="layer")
    _integer_ticks(fig, "x", d["layer"])
    fig.update_layout(title=title, height=560)
    return fig


def seeds_accuracy_figure(over: pd.DataFrame, metric: str, hops: Sequence[str], facet: str = "test_set",
                          order: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Accuracy over seeds: per method a bar at the mean over seeds, whiskers from the lowest to
    the highest seed, and one marker per seed (hover: that seed's Wilson 95% interval).

    Args:
        over: :func:`interp.study.seeds.accuracy_over_seeds` rows (key columns ``method``,
            ``hop``, ``metric``, ``facet``; ``mean, min, max``; ``accuracy_seed_S``,
            ``ci_low_seed_S``, ``ci_high_seed_S`` per seed S). Accuracies are fractions.
        metric: which accuracy (``first_token`` or ``exact``).
        hops: one facet row per query kind, in this order (``two_hop``, ``hop1``... or
            ``composed``, ``skill_a``...); kinds absent from ``over`` are skipped.
        facet: the column of the facet columns (familiarity tier ``test_set``, or ``condition``).
        order: method order on the x axis (default: first appearance).

    Raises:
        FigureError: missing columns, no per-seed columns, no rows for ``metric`` and ``hops``, or
            several rows for one method, hop and facet value.
    """
    from plotly.subplots import make_subplots

    _require(over, ["method", "hop", "metric", facet, "mean", "min", "max"], "seeds_accuracy_figure")
    seeds = sorted(int(c.rsplit("_", 1)[1]) for c in over.columns if c.startswith("accuracy_seed_"))
    if not seeds:
        raise FigureError("seeds_accuracy_figure: no accuracy_seed_S columns")
    d = over[(over["metric"] == metric) & over["hop"].isin(list(hops))]
    if d.empty:
        raise FigureError(f"seeds_accuracy_figure: no rows for metric={metric!r}, hops={list(hops)}")
    if d.duplicated(["method", "hop", facet]).any():
        raise FigureError(f"seeds_accuracy_figure: several rows per method, hop and {facet}")
    rows = [h for h in hops if (d["hop"] == h).any()]
    cols = sorted(d[facet].dropna().astype(str).unique())
    methods = [m for m in (order or dict.fromkeys(d["method"])) if m in set(d["method"])]
    fig = make_subplots(rows=len(rows), cols=len(cols), shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[f"{h} · {c}" for h in rows for c in cols],
                        vertical_spacing=min(0.12, 0.35 / len(rows)), horizontal_spacing=0.03)
    symbols = ["circle", "diamond", "square", "triangle-up", "x", "star", "cross", "pentagon"]
    for i, h in enumerate(rows):
        for j, c in enumerate(cols):
            sub = d[(d["hop"] == h) & (d[facet].astype(str) == c)].set_index("method")
            sub = sub.reindex([m for m in methods if m in sub.index])
            first = i == 0 and j == 0
            fig.add_trace(go.Bar(
                x=list(sub.index), y=sub["mean"], marker_color="#c9d4e8", name="mean over seeds (whiskers: min–max)",
                legendgroup="mean", showlegend=first, width=0.8, offset=-0.4,  # not grouped with the markers
                error_y=dict(type="data", symmetric=False, array=sub["max"] - sub["mean"],
                             arrayminus=sub["mean"] - sub["min"], thickness=1.2, width=4, color="#555"),
                hovertemplate="%{x}: mean %{y:.3f}<extra></extra>"), row=i + 1, col=j + 1)
            for k, s in enumerate(seeds):
                lo, hi = sub.get(f"ci_low_seed_{s}"), sub.get(f"ci_high_seed_{s}")
                custom = np.stack([lo, hi], axis=-1) if lo is not None and hi is not None else None
                fig.add_trace(go.Scatter(
                    x=list(sub.index), y=sub[f"accuracy_seed_{s}"], mode="markers", name=f"seed {s}",
                    legendgroup=f"seed {s}", showlegend=first, customdata=custom, offsetgroup=f"seed {s}",
                    marker=dict(symbol=symbols[k % len(symbols)], size=8, color=PALETTE[k % len(PALETTE)],
                                line=dict(width=0.5, color="white")),
                    hovertemplate=f"%{{x}}, seed {s}: %{{y:.3f}}"
                                  + (" (Wilson 95%: %{customdata[0]:.3f}–%{customdata[1]:.3f})" if custom is not None
                                     else "") + "<extra></extra>"), row=i + 1, col=j + 1)
    fig.update_yaxes(range=[0, 1.05])
    for i in range(len(rows)):
        fig.update_yaxes(title_text="accuracy", row=i + 1, col=1)
    # every variant labelled (plotly thins crowded category ticks)
    fig.update_xaxes(tickangle=-40, categoryorder="array", categoryarray=methods, tickmode="array",
                     tickvals=methods, tickfont=dict(size=10))
    fig.update_layout(title=title or f"Accuracy ({metric.replace('_', ' ')}) over seeds {', '.join(map(str, seeds))}",
                      height=250 * len(rows) + 200, barmode="overlay",
                      scattermode="group", scattergap=0.55)  # seeds side by side within a variant
    return fig


def png_export_possible() -> bool:
    """Whether kaleido can find a headless Chromium for PNG export: ``$BROWSER_PATH`` (which
    kaleido's browser finder honours) or ``chromium`` / ``chromium-browser`` / ``google-chrome``
    on the PATH (Debian's ``chromium``: ``make browser``)."""
    import shutil

    env = os.environ.get("BROWSER_PATH", "")
    return bool(env and os.path.isfile(env)) or any(
        shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))


def write_png(fig: go.Figure, path: str | os.PathLike, attempts: int = 3, **kw) -> None:
    """``fig.write_image(path, format="png", **kw)``, retried: kaleido (1.x) now and then fails on a
    page that has not finished loading ("kaleido_scopes is not defined"); the last error is raised."""
    for i in range(attempts):
        try:
            pio.write_image(fig, path, format="png", **kw)
            return
        except Exception:  # noqa: BLE001
            if i == attempts - 1:
                raise


def save_figures(figs: dict[str, go.Figure], out_dir: str | os.PathLike, png: bool = True,
                 scale: float = 2.0) -> dict[str, list[str]]:
    """Write each figure as ``NAME.html`` (interactive; ``plotly.min.js`` written once beside it) and
    ``NAME.png`` (static, via kaleido + headless Chromium), each file written atomically.

    Returns ``{name: [paths]}``. If PNG export is impossible (no Chromium), the HTML files are
    still written and the error is re-raised with what to install.
    """
    from interp.models import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    js = out / "plotly.min.js"
    if figs and not js.is_file():  # "directory" mode expects it beside the pages; offline, no CDN
        from plotly.offline import get_plotlyjs

        atomic_write_text(js, get_plotlyjs())
    for name, fig in figs.items():
        path = out / f"{name}.html"
        atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True))
        written[name] = [str(path)]
    if png and figs:
        names = list(figs)
        tmps = [out / f".{n}.png.tmp-{os.getpid()}" for n in names]
        try:
            # one headless-Chromium session for all figures (seconds each otherwise)
            heights = [int(figs[n].layout.height or 520) for n in names]
            try:
                pio.write_images([figs[n] for n in names], tmps, format="png", scale=scale, width=1100,
                                 height=heights)
            except Exception:  # noqa: BLE001  (retried below, figure by figure)
                pass
            # kaleido's batch call has skipped a figure without an error, or failed on a page that
            # had not finished loading ("kaleido_scopes is not defined"), each seen once in a
            # `make demo`: write each missing figure on its own (its error, if any, is raised)
            for n, tmp, h in zip(names, tmps, heights):
                if not tmp.exists():
                    write_png(figs[n], tmp, scale=scale, width=1100, height=h)
            for n, tmp in zip(names, tmps):
                os.replace(tmp, out / f"{n}.png")
                written[n].append(str(out / f"{n}.png"))
        except Exception as e:  # noqa: BLE001
            for tmp in tmps:
                if tmp.exists():
                    tmp.unlink()
            raise RuntimeError(f"static PNG export failed ({e}); install Chromium (Debian: apt-get install "
                               "chromium) for kaleido, or pass png=False") from e
    return written
