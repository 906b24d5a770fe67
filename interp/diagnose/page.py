"""The diagnosis report: one self-contained page (house style of :mod:`interp.report`).

Order: findings; adapter inventory; what each merge keeps; geometry; behaviour on the prompts;
the bridge — each section only where its tables exist. Long tables are summarised on the page and
linked to their full CSV under ``results/``. Figures come from :mod:`interp.figures`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from interp.diagnose.bridge import KNOCKOUT_WINDOW
from interp.diagnose.findings import (DECODABLE_RANK, backpatch_summary, findings, knockout_summary,
                                      patchscope_summary)
from interp.report import CSS, RENDER_CHECK, table_html

TABLES = ("inventory", "adapters", "spectra", "overlap", "layer_energy", "span_deficit", "faithfulness",
          "energy_kept", "scores", "accuracy", "contributions", "router", "key_overlap", "lens", "patching",
          "patchscope", "backpatch", "knockout")


def _link(name: str) -> str:
    return f'<a href="results/{name}.csv">results/{name}.csv</a>'


def _table(caption: str, df: pd.DataFrame, name: str, max_rows: int = 25) -> str:
    return (f"<details open><summary>{html.escape(caption)} — full table: {_link(name)}</summary>"
            f"{table_html(df, max_rows=max_rows)}</details>")


def _figures(t: dict[str, pd.DataFrame | None]) -> dict[str, tuple[Any, str]]:
    """``{section: [(figure, caption)]}`` built from whatever tables exist."""
    from interp import figures as F

    out: dict[str, list] = {"keeps": [], "geometry": [], "behaviour": [], "bridge": []}
    ek = t.get("energy_kept")
    if ek is not None and len(ek):
        d = ek.assign(w=ek["energy_kept"] * ek["energy"]).groupby(["variant", "expert"], sort=False)[["w", "energy"]].sum()
        d = (d["w"] / d["energy"]).rename("energy_kept").reset_index()
        out["keeps"].append((F.bar_figure(d, "variant", "energy_kept", "expert", "Energy of each expert kept "
                             "inside the merge's spans", "fraction of ‖ΔWᵢ‖²"), "Energy-weighted over sites; 1 = "
                             "the expert's update lies wholly inside the merged update's row and column spaces."))
    sp = t.get("spectra")
    if sp is not None and len(sp):
        d = sp.groupby(["adapter", "index"], sort=False)["sigma"].mean().reset_index()
        out["geometry"].append((F.line_figure(d, "index", "sigma", "adapter", "Singular values of ΔW "
                                "(mean over sites)", y_title="σᵢ (weight units)", log_y=True),
                                "From the factors (never forming ΔW); DoRA/PiSSA experts as their exact update."))
    ov = t.get("overlap")
    if ov is not None and len(ov):
        d = ov.assign(pair=ov["adapter_1"] + " vs " + ov["adapter_2"])
        out["geometry"].append((F.heatmap_figure(d, "phi_col", facet="pair", x="proj", y="layer", signed=False,
                                                 title="Subspace similarity φ of the column spaces per module and layer"),
                                "φ (Hu et al. 2021) from the principal angles: 0 = orthogonal, 1 = same subspace."))
    acc = t.get("accuracy")
    if acc is not None and len(acc):
        d = acc[acc["metric"] == "first_token"].assign(method=lambda x: x["variant"], test_set=lambda x: x["hop"],
                                                        hop="prompts")
        out["behaviour"].append((F.accuracy_figure(d, "first_token", "prompts"),
                                 "One bar per prompt set: query (latent), hop1 / hop2 (each hop alone), chain "
                                 "(explicit chaining); first answer token, Wilson 95% intervals."))
    c = t.get("contributions")
    if c is not None and len(c):
        out["behaviour"].append((F.line_figure(c, "layer", "norm", "adapter", "Per-adapter contribution at the "
                                 "final position", facet="variant", y_title="‖δ‖ (residual units)"),
                                 "Norm of each adapter's own output change (hook_delta), summed in quadrature "
                                 "over the layer's sites, mean over prompts."))
    r = t.get("router")
    if r is not None and len(r):
        out["behaviour"].append((F.line_figure(r, "layer", "weight", "adapter", "Router weights at the final "
                                 "position", facet="variant", y_title="weight"),
                                 "hook_router, mean over the layer's sites and the prompts."))
    lens = t.get("lens")
    if lens is not None and len(lens):
        d = lens.assign(method=lens["variant"], target=lens["target"].map({"bridge": "e2", "answer": "e3"}))
        out["bridge"].append((F.lens_figure(d, "logprob", "final"), "EntRec (Yang et al. 2024): logit-lens "
                              "log-probability of the bridge's and the answer's first token, by layer."))
    pt = t.get("patching")
    if pt is not None and len(pt):
        out["bridge"].append((F.heatmap_figure(pt, "value", facet="variant", title="Activation patching "
                              "(resid_pre), normalised"), "(patched − corrupted)/(clean − corrupted) of the "
                              "logit difference; 1 = the clean answer fully restored."))
    ps = t.get("patchscope")
    if ps is not None and len(ps):
        d = ps.assign(decodable=ps["rank"] <= DECODABLE_RANK).groupby(["variant", "source_layer"], sort=False)[
            "decodable"].mean().reset_index()
        out["bridge"].append((F.line_figure(d, "source_layer", "decodable", "variant", "Patchscope: is the bridge "
                              "readable at the subject's last token?", x_title="source layer ℓ (resid_pre)",
                              y_title=f"fraction of prompts, bridge rank ≤ {DECODABLE_RANK}", y_range=(-0.02, 1.02)),
                              "Ghandeharioun et al. 2024: the residual entering layer ℓ at e₁'s last token, written "
                              "into the token-identity prompt at layer ℓ; rank of the bridge's first token there."))
    bp = t.get("backpatch")
    if bp is not None and len(bp):
        d = bp.groupby(["variant", "source_layer", "target_layer"], sort=False)["delta"].mean().reset_index()
        out["bridge"].append((F.heatmap_figure(d, "delta", facet="variant", x="source_layer", y="target_layer",
                              title="Back-patching: final-position resid_pre[ℓs] → resid_pre[ℓt ≤ ℓs]",
                              x_title="source layer ℓs", y_title="target layer ℓt",
                              value_title="Δ log p (nats)"),
                              "Biran et al. 2024 §5: change of the answer's first-token log-probability, mean over "
                              "the two-hop prompts; > 0: the later state, re-read by earlier layers, helps."))
    ko = t.get("knockout")
    if ko is not None and len(ko):
        d = ko.groupby(["variant", "layer"], sort=False)["delta"].mean().reset_index()
        out["bridge"].append((F.line_figure(d, "layer", "delta", "variant", "Attention knockout: final token "
                              "blocked from the subject", x_title="centre layer of the blocked window",
                              y_title="Δ log p(answer) (nats)"),
                              f"Geva et al. 2023 §5: attention from the final token to e₁'s tokens set to 0 in a "
                              f"window of {KNOCKOUT_WINDOW} layers around the centre; mean change of the answer's first-token log-probability."))
    return out


def build_diagnose_report(run: Any) -> Path:
    """Write ``DIR/report.html`` from ``DIR/results/*.csv`` and ``run.json``."""
    from plotly.offline import get_plotlyjs

    from interp.models import atomic_write_text
    from interp.study.runner import versions

    t = {n: run.table(n) for n in TABLES}
    dg = run.cfg.diagnose
    figs = _figures(t)
    specs: dict[str, Any] = {}
    body = [f"<h1>Diagnosis — {html.escape(run.model)}</h1>",
            f'<p class="sub">adapters {html.escape(", ".join(dg["adapters"]))} · combines '
            f'{html.escape(", ".join(dg["combines"]) or "none")} · prompts '
            f'{html.escape(str(dg.get("prompts") or "none (geometry only)"))}</p>', "<h2>Findings</h2>"]
    for f in findings(t):
        body.append(f'<div class="finding">{html.escape(f["text"])}<br><span class="cap">'
                    f'{html.escape(f["evidence"])} — {_link(f["csv"])}</span></div>')
    for note in dg.get("notes", []):
        body.append(f'<p class="cap">Note: {html.escape(note)}</p>')

    def section(title: str, key: str, parts: list[str]) -> None:
        fl = figs.get(key, [])
        if not parts and not fl:
            return
        body.append(f"<h2>{html.escape(title)}</h2>")
        for fig, cap in fl:
            fid = f"fig-{len(specs)}"
            specs[fid] = json.loads(fig.to_json())
            body.append(f'<div class="fig"><div id="{fid}"></div><p class="cap">{html.escape(cap)}</p></div>')
        body.extend(parts)

    inv = t["inventory"]
    section("Adapter inventory", "inventory", [_table("PEFT features, ranks, scales s, targets", inv, "inventory")]
            if inv is not None else [])
    keeps = []
    if t["faithfulness"] is not None:
        g = t["faithfulness"].groupby("variant", sort=False)["rel_error"]
        keeps.append(_table("Faithfulness ‖ΔW_merged − Σ wᵢΔWᵢ‖/‖Σ wᵢΔWᵢ‖ per merge (max, mean over sites)",
                            pd.DataFrame({"max": g.max(), "mean": g.mean()}).reset_index(), "faithfulness"))
    if t["span_deficit"] is not None:
        sd = t["span_deficit"]
        keeps.append(_table("Span deficit of the target per layer (mean over sites)",
                            sd.groupby("layer")[["span_deficit", "span_deficit_col"]].mean().reset_index(), "span_deficit"))
    section("What each merge keeps", "keeps", keeps)
    geo = []
    if t["adapters"] is not None:
        cols = [c for c in ("fro_norm", "spectral_norm", "effective_rank", "stable_rank", "k90", "amplification")
                if c in t["adapters"]]
        geo.append(_table("Per adapter, mean over sites", t["adapters"].groupby("adapter", sort=False)[cols].mean()
                          .reset_index(), "adapters"))
    if t["overlap"] is not None:
        o = t["overlap"]
        geo.append(_table("Principal angles between experts (mean over sites; radians)",
                          o.groupby(["adapter_1", "adapter_2"], sort=False)[["phi_col", "phi_row", "min_angle_col",
                                                                              "min_angle_row", "cosine"]].mean().reset_index(), "overlap"))
    elif len(dg["adapters"]) >= 2:
        geo.append('<p class="cap">The adapters share no module: no principal angles to compare.</p>')
    section("Geometry", "geometry", geo)
    beh = []
    if t["accuracy"] is not None:
        a = t["accuracy"]
        beh.append(_table("Accuracy per variant and prompt set", a[a["metric"] == "first_token"], "accuracy", 60))
    section("Behaviour on your prompts", "behaviour", beh)
    bridge = []
    if t["key_overlap"] is not None:
        k = t["key_overlap"]
        bridge.append(_table("Key overlap κ and triggered output ‖ΔW x‖ per adapter and layer: composed queries "
                             "vs single-hop prompts (mean over sites; ratio < 1: the query triggers the adapter less)",
                             k.groupby(["adapter", "layer"], sort=False)[["kappa_composed", "kappa_native", "kappa_ratio",
                                                                         "trigger_ratio"]].mean().reset_index(), "key_overlap"))
    for name, summ, cap in (("patchscope", patchscope_summary, "Patchscope of the bridge per variant: first "
                             f"source layer with median rank ≤ {DECODABLE_RANK}, best median rank"),
                            ("backpatch", backpatch_summary, "Back-patching per variant: prompts wrong unpatched, "
                             "fixed by some cell ℓs > ℓt, best cell by mean Δ log p (nats)"),
                            ("knockout", knockout_summary, "Attention knockout per variant: the window whose "
                             "blocking lowers the answer's log-probability most")):
        if t[name] is not None:
            bridge.append(_table(cap, summ(t[name]), name))
    if "oracle" in dg["combines"] and any(t[n] is not None for n in ("patchscope", "backpatch", "knockout")):
        bridge.append('<p class="cap">Patchscope, back-patching and knockout skip oracle: its routing is per '
                      "prompt, the engines batch copies of prompts.</p>")
    section("The bridge", "bridge", bridge)
    if dg.get("prompts") is None:
        body.append('<p class="cap">No prompts given: behaviour and bridge sections need --prompts.</p>')
    body.append("<h2>Files</h2><p>" + " · ".join(_link(n) for n in TABLES if t[n] is not None) + "</p>")
    runjson = json.loads((run.out / "run.json").read_text()) if (run.out / "run.json").is_file() else {}
    body.append("<h2>Config, versions and timings</h2><pre>" + html.escape(json.dumps(
        {"config": run.cfg.to_dict(), "versions": runjson.get("versions", versions()),
         "timings_s": runjson.get("timings", {})}, indent=1, default=str)) + "</pre>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Diagnosis — " + html.escape(run.model)
            + f"</title><style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>" + "\n".join(body)
            + '<script type="application/json" id="figure-data">' + json.dumps(specs).replace("</", "<\\/")
            + "</script>" + RENDER_CHECK + "</body></html>")
    path = run.out / "report.html"
    atomic_write_text(path, page)
    return path
