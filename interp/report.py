"""One self-contained HTML page per run: findings, tables, figures, config, versions.

The page inlines plotly.js once and every figure's JSON, so it opens offline from a file and can
be mailed as one file. A tiny script records rendering errors and the number of drawn figures on
``<body data-figures-rendered=... data-errors=...>``, which the browser test reads.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from interp.models import atomic_write_text

CSS = """
body{font-family:Inter,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.5}
h1{font-size:1.7em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666} table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.finding{background:#f6f9fc;border-left:4px solid #4C72B0;padding:.5em 1em;margin:.6em 0}
.verdict-yes{color:#2a7d2a;font-weight:600}.verdict-no{color:#b03030;font-weight:600}.verdict-mixed{color:#a07000;font-weight:600}.verdict-disagree{color:#7a3aa0;font-weight:600}
.fig{margin:1em 0 2em} .cap{color:#555;font-size:.9em} pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.8em}
details{margin:.5em 0}
.banner{background:#fff4e5;border:1px solid #e0a040;border-left:6px solid #d08000;padding:.5em 1em;margin:1em 0}
"""

RENDER_CHECK = """
<script>
window.__errors = [];
window.addEventListener('error', function(e){ window.__errors.push(String(e.message)); document.body.dataset.errors = window.__errors.join(' | '); });
document.addEventListener('DOMContentLoaded', function(){
  var specs = JSON.parse(document.getElementById('figure-data').textContent);
  var done = 0, n = Object.keys(specs).length;
  document.body.dataset.figuresTotal = n;
  Object.keys(specs).forEach(function(id){
    try {
      Plotly.newPlot(id, specs[id].data, specs[id].layout, {responsive: true}).then(function(){
        done += 1; document.body.dataset.figuresRendered = done;
      });
    } catch(err) { window.__errors.push(String(err)); document.body.dataset.errors = window.__errors.join(' | '); }
  });
  if (n === 0) { document.body.dataset.figuresRendered = 0; }
});
</script>
"""


def table_html(df: pd.DataFrame, max_rows: int = 60, floatfmt: str = "{:.3f}") -> str:
    """An HTML table of at most ``max_rows`` rows (the CSV has them all)."""
    d = df.head(max_rows)
    out = d.to_html(index=False, float_format=lambda v: floatfmt.format(v), border=0, escape=True)
    if len(df) > max_rows:
        out += f'<p class="cap">first {max_rows} of {len(df)} rows; full table in the CSV.</p>'
    return out


def build_report(out_dir: str | Path, title: str, findings: list[dict[str, str]],
                 sections: list[dict[str, Any]], config: dict, versions: dict, timings: dict,
                 warnings: list[str] | None = None) -> Path:
    """Write ``out_dir/report.html``.

    Args:
        warnings: HTML sentences on what limits the evidence (random-init model, experts that
            missed their facts), shown in a banner above the findings.
        findings: ``{"claim", "verdict" ("yes"|"no"|"mixed"|"disagree"), "evidence"}`` items, shown
            first; ``"disagree"`` (a run over seeds whose seeds' verdicts differ) reads "seeds disagree".
        sections: ``{"title", "text" (HTML), "figures": [(fig_id, plotly JSON str, caption)],
            "tables": [(caption, DataFrame)]}`` in page order.
    """
    from plotly.offline import get_plotlyjs

    out = Path(out_dir)
    specs: dict[str, Any] = {}
    body: list[str] = [f"<h1>{html.escape(title)}</h1>",
                       f'<p class="sub">interp {html.escape(versions.get("interp", ""))} · model '
                       f'{html.escape(str(config.get("study", {}).get("model", "")))} · total step time '
                       f'{sum(v for k, v in timings.items() if k != "total_this_invocation"):.0f} s</p>']
    if warnings:
        body.append('<div class="banner" id="evidence-warning"><b>Read these results with care.</b><ul>'
                    + "".join(f"<li>{w}</li>" for w in warnings) + "</ul></div>")
    body.append("<h2>Findings</h2>")
    for f in findings:
        v = f.get("verdict", "mixed")
        label = {"yes": "supported by our data", "no": "not supported by our data", "mixed": "mixed by our data",
                 "disagree": "seeds disagree"}.get(v, v)
        body.append(f'<div class="finding"><b>{html.escape(f["claim"])}</b> — '
                    f'<span class="verdict-{v}">{label}</span><br>{f["evidence"]}</div>')
    for sec in sections:
        body.append(f"<h2>{html.escape(sec['title'])}</h2>")
        if sec.get("text"):
            body.append(f"<p>{sec['text']}</p>")
        for fig_id, fig_json, caption in sec.get("figures", []):
            specs[fig_id] = json.loads(fig_json)
            body.append(f'<div class="fig"><div id="{fig_id}"></div><p class="cap">{html.escape(caption)}</p></div>')
        for caption, df in sec.get("tables", []):
            body.append(f'<details open><summary>{html.escape(caption)}</summary>{table_html(df)}</details>')
    body.append("<h2>Config</h2><pre>" + html.escape(json.dumps(config, indent=1)) + "</pre>")
    body.append("<h2>Versions and timings</h2><pre>" + html.escape(json.dumps({"versions": versions,
                                                                             "timings_s": timings}, indent=1)) + "</pre>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(body)
            + '<script type="application/json" id="figure-data">'
            + json.dumps(specs).replace("</", "<\\/") + "</script>" + RENDER_CHECK + "</body></html>")
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
