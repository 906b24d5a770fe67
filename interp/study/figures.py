"""The study's figures: tables in ``DIR/results`` → ``DIR/figures`` (HTML, PNG, and JSON for
the report), one plotly house style (:mod:`interp.figures`)."""

from __future__ import annotations

import json

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from interp import figures as F
from interp.models import atomic_write_text


def build_figures(run) -> dict[str, go.Figure]:
    """Every figure the tables allow; writes HTML + PNG + JSON (for the report) per figure."""
    figs: dict[str, tuple[go.Figure, str]] = {}
    acc = run.table("accuracy")
    if acc is not None:
        order = [m for m in run.cfg.methods.variants if m in set(acc["method"])]
        for hop in ("two_hop", "two_hop_heldout"):
            if (acc["hop"] == hop).any():
                f = F.accuracy_figure(acc, metric="first_token", hop=hop)
                f.update_xaxes(categoryorder="array", categoryarray=order)
                figs[f"accuracy_{hop}"] = (f, "Two-hop accuracy (first answer token) by method and "
                                              "familiarity tier (F invented, H mixed, R real names); bars "
                                              "are Wilson 95% intervals.")
        ctrl = acc[(acc["metric"] == "first_token") & acc["hop"].isin(["hop1", "hop2", "chain", "real_r2"])].copy()
        if len(ctrl):
            ctrl["err_plus"] = ctrl["ci_high"] - ctrl["accuracy"]
            ctrl["err_minus"] = ctrl["accuracy"] - ctrl["ci_low"]
            f = px.bar(ctrl, x="method", y="accuracy", color="test_set", facet_row="hop", barmode="group",
                       error_y="err_plus", error_y_minus="err_minus", height=260 * ctrl["hop"].nunique() + 120,
                       category_orders={"method": order, "test_set": sorted(ctrl["test_set"].unique())},
                       title="Controls: one-hop accuracy kept by each method, explicit chaining, real r₂ facts")
            f.update_yaxes(range=[0, 1.05])
            figs["accuracy_controls"] = (f, "Does each method keep each expert's facts (hop1, hop2)? Can it "
                                            "compose when the hop-1 answer is given explicitly (chain)? Does it "
                                            "keep the base model's real city→country facts (real_r2)?")
    lens = run.table("lens")
    if lens is not None and len(lens):
        for pos in ("final", "e1_last"):
            if (lens["position"] == pos).any():
                figs[f"lens_{pos}"] = (F.lens_figure(lens, "logprob", pos),
                                       f"EntRec: logit-lens log-probability of the bridge entity e₂ and the answer "
                                       f"e₃ at the {pos} position, by layer, per variant (mean ± s.e.m.).")
        if (lens["position"] == "final").any():
            figs["lens_rank_final"] = (F.lens_figure(lens, "rank", "final"),
                                       "Rank of e₂'s and e₃'s first token under the logit lens at the final "
                                       "position (log axis, top = rank 0).")
    pat = run.table("patching")
    if pat is not None and len(pat):
        val = "value"
        xcol = "display_position" if "display_position" in pat.columns else "position_label"
        xo = (list(pat.groupby(xcol)["position_order"].mean().sort_values().index)
              if "position_order" in pat.columns else None)
        for hook, sub in pat.groupby("hook"):
            figs[f"patching_{hook}"] = (
                F.heatmap_figure(sub, value=val, facet="method", x=xcol, y="layer", x_order=xo,
                                 title=f"Activation patching ({hook}): normalised logit difference "
                                       f"(1 = clean answer restored)",
                                 x_title="position (relative to e₁; final = last prompt token)",
                                 y_title="layer", value_title="normalised<br>logit diff."),
                "Layer × position activation patching on clean/corrupted pairs (e₁ swapped); where does "
                "information about e₁ flow to produce the answer?")
    bp = run.table("backpatch")
    if bp is not None and len(bp):
        ycol = "fixed" if "fixed" in bp.columns else ("correct" if "correct" in bp.columns else None)
        if ycol and {"source_layer", "target_layer"} <= set(bp.columns):
            g = bp.groupby(["method", "source_layer", "target_layer"])[ycol].mean().reset_index()
            figs["backpatch"] = (F.heatmap_figure(g, value=ycol, facet="method", x="target_layer", y="source_layer",
                                                  signed=False, zrange=(0.0, 1.0), x_title="target layer ℓt",
                                                  y_title="source layer ℓs", value_title=f"fraction<br>{ycol}",
                                                  title=f"Back-patching (Biran et al. 2024): "
                                                        f"fraction {ycol}"),
                                 "Final-position state of source layer ℓs written into earlier layer ℓt of the "
                                 "same prompt: does more depth let the second hop finish?")
    ko = run.table("knockout")
    if ko is not None and len(ko) and "layer" in ko.columns:
        val = next((c for c in ("delta", "delta_logprob", "value") if c in ko.columns), None)
        if val:
            g = ko.groupby(["method", "layer"])[val].mean().reset_index()
            figs["knockout"] = (F.line_figure(g, x="layer", y=val, color="method",
                                              y_title="Δ log-prob of the answer",
                                              title="Attention knockout: final token → e₁ span (window 3)"),
                                "Change in the answer's log-probability when the final token cannot attend to "
                                "e₁ around each layer: where is e₁ read?")
    pr = run.table("probes")
    if pr is not None and len(pr):
        val = "selectivity" if "selectivity" in pr.columns else "accuracy"
        est = run.cfg.mechanisms.probe_estimator  # the caption names the estimator actually used
        kind = {"ridge": "ridge-classifier", "logistic": "logistic-regression"}.get(est, est)
        figs["probes"] = (F.line_figure(pr, x="layer", y=val, color="method",
                                        facet="position" if "position" in pr.columns else None,
                                        y_title=f"probe {val}",
                                        title=f"Linear ({est}) probes for the bridge entity e₂ (selectivity = "
                                              "accuracy − control)"),
                          f"Cross-validated {kind} probes ({est}, mechanisms.probe_estimator) decoding e₂ from "
                          "the residual stream, minus a random-relabelling control (Hewitt & Liang 2019).")
    ps = run.table("patchscope")
    if ps is not None and len(ps):
        val = next((c for c in ("top1", "hit", "logprob") if c in ps.columns), None)
        lay = next((c for c in ("source_layer", "layer") if c in ps.columns), None)
        if val and lay:
            keys = ["method", lay] + [c for c in ("target", "target_prompt") if c in ps.columns][:1]
            g = ps.groupby(keys)[val].mean().reset_index()
            figs["patchscope"] = (F.line_figure(g, x=lay, y=val, color="method", facet=keys[2] if len(keys) > 2 else None,
                                                x_title="source layer", y_title=f"e₂ decoded ({val})",
                                                title="Patchscopes: is e₂ decoded from the hidden state?"),
                                  "Hidden state at the final position patched into identity / description "
                                  "prompts; fraction (or log-prob) of e₂ decoded, per source layer.")
    spec = run.table("subspace_spectra")
    if spec is not None and len(spec):
        sig = "sigma" if "sigma" in spec.columns else spec.columns[-1]
        idx = "index" if "index" in spec.columns else "i"
        g = spec.groupby(["adapter", idx])[sig].mean().reset_index()
        figs["spectra"] = (F.line_figure(g, x=idx, y=sig, color="adapter", log_y=True,
                                         x_title="singular value index", y_title="σ (mean over modules)",
                                         title="ΔW singular spectra (mean over modules), experts and merges"),
                           "Singular values of ΔW = s·B·A computed from the factors; merges held as "
                           "concatenated-rank LoRAs have up to the summed rank.")
    ov = run.table("subspace_overlap")
    if ov is not None and len(ov):
        for col, label in (("phi_row", "input (row) space"), ("phi_col", "output (column) space"), ("cosine", "task vector")):
            if col in ov.columns:
                names = sorted(set(ov["adapter_1"]) | set(ov["adapter_2"]))
                mat = pd.DataFrame(1.0, index=names, columns=names)
                g = ov.groupby(["adapter_1", "adapter_2"])[col].mean()
                for (a, b), v in g.items():
                    mat.loc[a, b] = mat.loc[b, a] = v
                figs[f"overlap_{col}"] = (F.matrix_figure(mat, f"Subspace overlap between adapters: {label} "
                                                               f"({col}, mean over modules)", col,
                                                          zmin=-1 if col == "cosine" else 0, signed=(col == "cosine")),
                                          "Hu et al. (2021) subspace similarity φ / Frobenius cosine of ΔW, averaged "
                                          "over adapted modules.")
    le = run.table("subspace_layer_energy")
    if le is not None and len(le):
        val = "energy_fraction"
        f = F.line_figure(le, x="layer", y=val, color="adapter", y_title="share of ‖ΔW‖²_F", y_range=(0, 1.02),
                          title="Where each adapter writes: ΔW energy by layer, beside the bridge layer ℓ*")
        bl = _bridge(le)
        if bl is not None:
            f.add_vline(x=bl, line_dash="dash", line_color="#444", annotation_text=f"ℓ* = {bl}")
        figs["layer_energy"] = (f, "Normalised ‖ΔW‖_F² per layer; the dashed line is the layer where e₂ is best "
                                   "decodable at the final position (EntRec peak of the Uniform merge).")
    sd = run.table("subspace_span_deficit")
    if sd is not None and len(sd):
        val = "span_deficit"
        if val in sd.columns and "layer" in sd.columns:
            g = sd.groupby(["oracle", "layer"])[[c for c in ("span_deficit", "span_deficit_col") if c in sd.columns]].mean().reset_index()
            g = g.melt(id_vars=["oracle", "layer"], var_name="measure", value_name="deficit")
            g["series"] = g["oracle"] + " · " + g["measure"]
            figs["span_deficit"] = (F.line_figure(g, x="layer", y="deficit", color="series",
                                                  y_title="span deficit (fraction)", y_range=(0, 1.02),
                                                  title="Span deficit: fraction of the composing update outside "
                                                        "the library's row/column spans"),
                                    "No merge inside the spans of {expert_ab, expert_bc} can reach this fraction "
                                    "of the A→C expert's (or the joint model's) update.")
    ko2 = run.table("subspace_key_overlap")
    if ko2 is not None and len(ko2) and "layer" in ko2.columns:
        # κ only: the composed/native ratio (≈ 1) would flatten κ (≈ 0.05) on a shared axis
        cols = [c for c in ko2.columns if c.startswith("kappa") and c != "kappa_ratio"]
        if cols:
            g = ko2.groupby("layer")[cols].mean().reset_index().melt(id_vars="layer", var_name="prompts",
                                                                     value_name="kappa")
            figs["key_overlap"] = (F.line_figure(g, x="layer", y="kappa", color="prompts",
                                                 y_title="κ = ‖P_R x‖² / ‖x‖²",
                                                 title="Key overlap κ: share of the module input inside the B→C "
                                                       "expert's row space"),
                                   "Two-hop queries vs the B→C expert's own training prompts: does the second "
                                   "hop's expert even see its key on a composed query?")
    out = run.out / "figures"
    F.save_figures({k: v[0] for k, v in figs.items()}, out, png=True)
    atomic_write_text(out / "index.json", json.dumps({k: v[1] for k, v in figs.items()}, indent=1))
    for k, (fig, _) in figs.items():
        atomic_write_text(out / f"{k}.json", fig.to_json())
    return {k: v[0] for k, v in figs.items()}


def _bridge(le: pd.DataFrame) -> int | None:
    if "bridge_layer" in le.columns and le["bridge_layer"].notna().any():
        return int(le["bridge_layer"].dropna().iloc[0])
    return None
