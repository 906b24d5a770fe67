"""The study's figures and report: tables in ``DIR/results`` → ``DIR/figures`` and ``DIR/report.html``.

Findings are computed from the tables with explicit, documented rules, so the report says
plainly where our data agrees with the paper's claims and where it does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from interp import figures as F

TWO_COMB = ["uniform", "task_arithmetic", "ties", "peft_linear", "arrow", "mixture"]
WITH_AC = ["uniform+ac", "arrow+ac", "expert_ac"]


def _opt(run, name: str) -> pd.DataFrame | None:
    p = run.results / f"{name}.csv"
    return pd.read_csv(p) if p.is_file() else None


def build_figures(run) -> dict[str, go.Figure]:
    """Every figure the tables allow; writes HTML + PNG + JSON (for the report) per figure."""
    figs: dict[str, tuple[go.Figure, str]] = {}
    acc = _opt(run, "accuracy")
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
    lens = _opt(run, "lens")
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
    pat = _opt(run, "patching")
    if pat is not None and len(pat):
        val = "value"
        xcol = "display_position" if "display_position" in pat.columns else "position_label"
        xo = (list(pat.groupby(xcol)["position_order"].mean().sort_values().index)
              if "position_order" in pat.columns else None)
        for hook, sub in pat.groupby("hook"):
            figs[f"patching_{hook}"] = (
                F.heatmap_figure(sub, value=val, facet="method", x=xcol, y="layer", x_order=xo,
                                 title=f"Activation patching ({hook}): normalised logit difference "
                                       f"(1 = clean answer restored)"),
                "Layer × position activation patching on clean/corrupted pairs (e₁ swapped); where does "
                "information about e₁ flow to produce the answer?")
    bp = _opt(run, "backpatch")
    if bp is not None and len(bp):
        ycol = "fixed" if "fixed" in bp.columns else ("correct" if "correct" in bp.columns else None)
        if ycol and {"source_layer", "target_layer"} <= set(bp.columns):
            g = bp.groupby(["method", "source_layer", "target_layer"])[ycol].mean().reset_index()
            figs["backpatch"] = (F.heatmap_figure(g, value=ycol, facet="method", x="target_layer", y="source_layer",
                                                  signed=False, title=f"Back-patching (Biran et al. 2024): "
                                                                      f"fraction {ycol}"),
                                 "Final-position state of source layer ℓs written into earlier layer ℓt of the "
                                 "same prompt: does more depth let the second hop finish?")
    ko = _opt(run, "knockout")
    if ko is not None and len(ko) and "layer" in ko.columns:
        val = next((c for c in ("delta", "delta_logprob", "value") if c in ko.columns), None)
        if val:
            g = ko.groupby(["method", "layer"])[val].mean().reset_index()
            figs["knockout"] = (F.line_figure(g, x="layer", y=val, color="method",
                                              title="Attention knockout: final token → e₁ span (window 3)"),
                                "Change in the answer's log-probability when the final token cannot attend to "
                                "e₁ around each layer: where is e₁ read?")
    pr = _opt(run, "probes")
    if pr is not None and len(pr):
        val = "selectivity" if "selectivity" in pr.columns else "accuracy"
        figs["probes"] = (F.line_figure(pr, x="layer", y=val, color="method",
                                        facet="position" if "position" in pr.columns else None,
                                        title="Linear probes for the bridge entity e₂ (selectivity = accuracy − "
                                              "control)"),
                          "Cross-validated logistic probes decoding e₂ from the residual stream, minus a "
                          "random-relabelling control (Hewitt & Liang 2019).")
    ps = _opt(run, "patchscope")
    if ps is not None and len(ps):
        val = next((c for c in ("top1", "hit", "logprob") if c in ps.columns), None)
        lay = next((c for c in ("source_layer", "layer") if c in ps.columns), None)
        if val and lay:
            keys = ["method", lay] + [c for c in ("target", "target_prompt") if c in ps.columns][:1]
            g = ps.groupby(keys)[val].mean().reset_index()
            figs["patchscope"] = (F.line_figure(g, x=lay, y=val, color="method", facet=keys[2] if len(keys) > 2 else None,
                                                title="Patchscopes: is e₂ decoded from the hidden state?"),
                                  "Hidden state at the final position patched into identity / description "
                                  "prompts; fraction (or log-prob) of e₂ decoded, per source layer.")
    spec = _opt(run, "subspace_spectra")
    if spec is not None and len(spec):
        sig = "sigma" if "sigma" in spec.columns else spec.columns[-1]
        idx = "index" if "index" in spec.columns else "i"
        g = spec.groupby(["adapter", idx])[sig].mean().reset_index()
        figs["spectra"] = (F.line_figure(g, x=idx, y=sig, color="adapter", log_y=True,
                                         title="ΔW singular spectra (mean over modules), experts and merges"),
                           "Singular values of ΔW = s·B·A computed from the factors; merges held as "
                           "concatenated-rank LoRAs have up to the summed rank.")
    ov = _opt(run, "subspace_overlap")
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
    le = _opt(run, "subspace_layer_energy")
    if le is not None and len(le):
        val = "energy_fraction"
        f = F.line_figure(le, x="layer", y=val, color="adapter",
                          title="Where each adapter writes: ΔW energy by layer, beside the bridge layer ℓ*")
        bl = _bridge(le)
        if bl is not None:
            f.add_vline(x=bl, line_dash="dash", line_color="#444", annotation_text=f"ℓ* = {bl}")
        figs["layer_energy"] = (f, "Normalised ‖ΔW‖_F² per layer; the dashed line is the layer where e₂ is best "
                                   "decodable at the final position (EntRec peak of the Uniform merge).")
    sd = _opt(run, "subspace_span_deficit")
    if sd is not None and len(sd):
        val = "span_deficit"
        if val in sd.columns and "layer" in sd.columns:
            g = sd.groupby(["oracle", "layer"])[[c for c in ("span_deficit", "span_deficit_col") if c in sd.columns]].mean().reset_index()
            g = g.melt(id_vars=["oracle", "layer"], var_name="measure", value_name="deficit")
            g["series"] = g["oracle"] + " · " + g["measure"]
            figs["span_deficit"] = (F.line_figure(g, x="layer", y="deficit", color="series",
                                                  title="Span deficit: fraction of the composing update outside "
                                                        "the library's row/column spans"),
                                    "No merge inside the spans of {expert_ab, expert_bc} can reach this fraction "
                                    "of the A→C expert's (or the joint model's) update.")
    ko2 = _opt(run, "subspace_key_overlap")
    if ko2 is not None and len(ko2) and "layer" in ko2.columns:
        cols = [c for c in ko2.columns if c.startswith("kappa")]
        if cols:
            g = ko2.groupby("layer")[cols].mean().reset_index().melt(id_vars="layer", var_name="prompts",
                                                                     value_name="kappa")
            figs["key_overlap"] = (F.line_figure(g, x="layer", y="kappa", color="prompts",
                                                 title="Key overlap κ: share of the module input inside the B→C "
                                                       "expert's row space"),
                                   "Two-hop queries vs the B→C expert's own training prompts: does the second "
                                   "hop's expert even see its key on a composed query?")
    out = run.out / "figures"
    F.save_figures({k: v[0] for k, v in figs.items()}, out, png=True)
    from interp.models import atomic_write_text

    atomic_write_text(out / "index.json", json.dumps({k: v[1] for k, v in figs.items()}, indent=1))
    for k, (fig, _) in figs.items():
        atomic_write_text(out / f"{k}.json", fig.to_json())
    return {k: v[0] for k, v in figs.items()}


def _bridge(le: pd.DataFrame) -> int | None:
    if "bridge_layer" in le.columns and le["bridge_layer"].notna().any():
        return int(le["bridge_layer"].dropna().iloc[0])
    return None


# ----------------------------------------------------------------------------------------------
# findings
# ----------------------------------------------------------------------------------------------


def _acc(acc: pd.DataFrame, method: str, hop: str, tier: str | None = None) -> tuple[float, float, float, int] | None:
    d = acc[(acc["method"] == method) & (acc["hop"] == hop) & (acc["metric"] == "first_token")]
    if tier is not None:
        d = d[d["test_set"] == tier]
    if d.empty:
        return None
    n = int(d["n"].sum())
    k = float((d["accuracy"] * d["n"]).sum())
    from interp.evaluate import wilson_interval

    lo, hi = wilson_interval(int(round(k)), n)
    return k / n, lo, hi, n


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    a, lo, hi, n = x
    return f"{a:.0%} [{lo:.0%}, {hi:.0%}], n={n}"


def findings(acc: pd.DataFrame, lens: pd.DataFrame | None = None) -> list[dict[str, str]]:
    """The paper's claims checked against our accuracy (and lens) tables.

    Rules (first-answer-token accuracy, pooled over tiers unless said):
      1. *2-comb fails*: supported if the best 2-comb method's two-hop accuracy is < 50% while the
         experts' own one-hop accuracies are ≥ 80%; not supported if it is ≥ 80%; else mixed.
      2. *target-task expert needed*: supported if the best "with A→C" variant beats the best 2-comb
         method by ≥ 20 points with non-overlapping Wilson intervals; not supported if by < 5.
      3. *familiarity matters*: for the best 2-comb method, supported if H or R beats F by ≥ 10 points
         with non-overlapping intervals; not supported if all tiers are within 5 points.
      4. *knowledge present, composition missing*: explicit chaining vs latent two-hop accuracy.
    """
    out: list[dict[str, str]] = []
    methods = set(acc["method"])
    comb = [m for m in TWO_COMB if m in methods]
    if comb:
        best = max(comb, key=lambda m: (_acc(acc, m, "two_hop") or (0,))[0])
        b = _acc(acc, best, "two_hop")
        e1, e2 = _acc(acc, "expert_ab", "hop1"), _acc(acc, "expert_bc", "hop2")
        experts_ok = e1 is not None and e2 is not None and min(e1[0], e2[0]) >= 0.8
        verdict = "yes" if (b and b[0] < 0.5 and experts_ok) else ("no" if b and b[0] >= 0.8 else "mixed")
        out.append({"claim": "Merging or routing the 2-combination library {A→B, B→C} does not answer A→C",
                    "verdict": verdict,
                    "evidence": f"best 2-comb method <b>{best}</b>: two-hop {_fmt(b)}; expert A→B on its hop-1 facts "
                                f"{_fmt(e1)}; expert B→C on its hop-2 facts {_fmt(e2)}."
                                + ("" if experts_ok else " (The experts did not reach 80% on their own facts, so a "
                                                          "failure to compose is confounded with missing knowledge.)")})
        ac = [m for m in WITH_AC + ["joint_all"] if m in methods]
        if ac:
            best_ac = max(ac, key=lambda m: (_acc(acc, m, "two_hop") or (0,))[0])
            a = _acc(acc, best_ac, "two_hop")
            gap = a[0] - b[0]
            sep = a[1] > b[2]
            verdict = "yes" if gap >= 0.2 and sep else ("no" if gap < 0.05 else "mixed")
            detail = "; ".join(f"{m}: {_fmt(_acc(acc, m, 'two_hop'))}" for m in ac)
            out.append({"claim": "Including an expert trained on the target A→C task is necessary",
                        "verdict": verdict,
                        "evidence": f"best with A→C data <b>{best_ac}</b> {_fmt(a)} vs best 2-comb {best} {_fmt(b)} "
                                    f"(gap {gap:+.0%}). {detail}."})
        tiers = sorted(set(acc["test_set"]))
        per = {t: _acc(acc, best, "two_hop", t) for t in tiers}
        per = {t: v for t, v in per.items() if v}
        if "F" in per and len(per) > 1:
            f = per["F"]
            better = [t for t, v in per.items() if t != "F" and v[0] - f[0] >= 0.1 and v[1] > f[2]]
            spread = max(v[0] for v in per.values()) - min(v[0] for v in per.values())
            verdict = "yes" if better else ("no" if spread < 0.05 else "mixed")
            out.append({"claim": "Reuse fails most for entities unseen in pretraining (familiarity matters)",
                        "verdict": verdict,
                        "evidence": f"{best} two-hop accuracy by tier: " + "; ".join(f"{t}: {_fmt(v)}" for t, v in per.items())
                                    + ". F = invented names throughout, H = invented e₁ with real e₂/e₃, "
                                      "R = real names linked by new relations."})
        ch = _acc(acc, best, "chain")
        if ch and b:
            verdict = "yes" if ch[0] - b[0] >= 0.2 and ch[1] > b[2] else ("no" if ch[0] - b[0] < 0.05 else "mixed")
            out.append({"claim": "The merged model holds both facts but does not compose them latently",
                        "verdict": verdict,
                        "evidence": f"{best}: explicit chaining (own hop-1 answer fed to the hop-2 prompt) {_fmt(ch)} vs "
                                    f"latent two-hop {_fmt(b)}."})
    if lens is not None and len(lens):
        d = lens[(lens["target"] == "e2") & (lens["position"] == "final")]
        if len(d):
            parts = []
            for m, sub in d.groupby("method"):
                prof = sub.groupby("layer")["rank"].median()
                parts.append(f"{m}: best median rank {int(prof.min())} at layer {int(prof.idxmin())}")
            comp = [m for m in set(d["method"]) if m in TWO_COMB]
            best_rank = {m: d[d["method"] == m].groupby("layer")["rank"].median().min() for m in set(d["method"])}
            verdict = "mixed"
            if comp:
                verdict = "yes" if all(best_rank[m] > 10 for m in comp) else "no"
            out.append({"claim": "In merged models the bridge entity e₂ is not made explicit at the final position",
                        "verdict": verdict,
                        "evidence": "Logit lens (EntRec) rank of e₂'s first token at the final position: "
                                    + "; ".join(parts) + ". (Rank ≤ 10 counts as decodable.)"})
    return out


def build_run_report(run) -> Path:
    """``DIR/report.html`` from the run's tables, figures and ``run.json``."""
    from interp.report import build_report
    from interp.study import versions

    acc = _opt(run, "accuracy")
    lens = _opt(run, "lens")
    fig_dir = run.out / "figures"
    captions = json.loads((fig_dir / "index.json").read_text()) if (fig_dir / "index.json").is_file() else {}

    def figs(*names: str) -> list[tuple[str, str, str]]:
        out = []
        for n in names:
            for key in sorted(k for k in captions if k == n or k.startswith(n + "_")):
                p = fig_dir / f"{key}.json"
                if p.is_file():
                    out.append((f"fig-{key}", p.read_text(), captions[key]))
        return out

    runjson = json.loads((run.out / "run.json").read_text()) if (run.out / "run.json").is_file() else {}
    sections: list[dict[str, Any]] = []
    tables = []
    if acc is not None:
        two = acc[(acc["hop"] == "two_hop") & (acc["metric"] == "first_token")]
        tables.append(("Two-hop accuracy (first answer token), Wilson 95% CI", two))
        tables.append(("All accuracies (every hop and metric)", acc))
    ex = _opt(run, "experts")
    if ex is not None:
        tables.append(("Experts: training data, steps, final loss, training accuracy", ex))
    fam = _opt(run, "familiarity")
    if fam is not None and len(fam):
        tables.append(("Familiarity measured on the base model", fam))
    sections.append({"title": "Reuse accuracy", "text": "Every variant answers the same queries: latent two-hop "
                     "queries (training and held-out templates), each hop alone, explicit chaining, and the real "
                     "facts of tier H.", "figures": figs("accuracy"), "tables": tables})
    sections.append({"title": "Bridge-entity mechanisms", "text": "Is e₂ computed, where, and can the second hop use it?",
                     "figures": figs("lens", "patching", "backpatch", "knockout", "patchscope", "probes"),
                     "tables": []})
    sub_tables = []
    for name, cap in (("subspace_merges", "Merge geometry: energy of each expert kept, cross terms"),
                      ("subspace_span_deficit", "Span deficit per module"),
                      ("subspace_adapters", "Per-adapter, per-module ranks and norms")):
        t = _opt(run, name)
        if t is not None:
            sub_tables.append((cap, t))
    sections.append({"title": "LoRA update subspaces against the theory", "text": "",
                     "figures": figs("spectra", "overlap", "layer_energy", "span_deficit", "key_overlap"),
                     "tables": sub_tables})
    found = findings(acc, lens) if acc is not None else []
    return build_report(run.out, f"Two-hop LoRA reuse study — {run.model}", found, sections,
                        runjson.get("config", run.cfg.to_dict()), runjson.get("versions", versions()),
                        runjson.get("timings", {}))
