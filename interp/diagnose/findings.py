"""Findings of a diagnosis as plain sentences, each with the numbers behind it and its CSV.

Each finding is ``{"text", "evidence", "csv"}``; a finding is only stated where its table exists
(no prompts → geometry findings only). Thresholds are named constants, stated in the sentence.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

EXACT = 1e-6          # relative error below which a merge is "the exact weighted sum"
ORTHOGONAL_PHI = 0.1  # mean subspace similarity φ below which experts are "nearly orthogonal"
DECODABLE_RANK = 10   # EntRec rank at or below which an entity counts as decodable


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _acc_row(acc: pd.DataFrame, variant: str, hop: str, metric: str = "first_token"):
    d = acc[(acc["variant"] == variant) & (acc["hop"] == hop) & (acc["metric"] == metric)]
    return None if d.empty else d.iloc[0]


def _acc_text(r: Any) -> str:
    k = int(round(r["accuracy"] * r["n"]))
    return f"{k}/{int(r['n'])} ({_pct(r['accuracy'])}, 95% CI {_pct(r['ci_low'])}–{_pct(r['ci_high'])})"


def patchscope_summary(ps: pd.DataFrame) -> pd.DataFrame:
    """Per variant: ``first_layer`` — the first source layer at which the bridge's median
    Patchscope rank is ≤ :data:`DECODABLE_RANK` (NaN: never), ``best_rank`` and ``best_layer``
    (lowest median rank and where), ``n`` prompts."""
    rows = []
    for v, g in ps.groupby("variant", sort=False):
        med = g.groupby("source_layer")["rank"].median().sort_index()
        ok = med[med <= DECODABLE_RANK]
        rows.append(dict(variant=v, first_layer=float(ok.index[0]) if len(ok) else math.nan,
                         best_rank=float(med.min()), best_layer=int(med.idxmin()), n=g["line"].nunique()))
    return pd.DataFrame(rows)


def backpatch_summary(bp: pd.DataFrame) -> pd.DataFrame:
    """Per variant: ``n`` prompts, ``wrong`` (answer not top-1 unpatched), ``fixed`` (of those,
    made top-1 by at least one cell ℓs > ℓt), ``best_source``/``best_target``/``best_delta`` (the
    cell with the highest mean Δ log p, nats)."""
    rows = []
    for v, g in bp.groupby("variant", sort=False):
        off = g[g["source_layer"] > g["target_layer"]]
        per = g.drop_duplicates("line")
        wrong = per[~per["was_correct"].astype(bool)]["line"]
        fixed = off[off["fixed"].astype(bool)]["line"].nunique()
        cell = off.groupby(["source_layer", "target_layer"])["delta"].mean()
        best = cell.idxmax() if len(cell) else (math.nan, math.nan)
        rows.append(dict(variant=v, n=len(per), wrong=len(wrong), fixed=fixed, best_source=best[0],
                         best_target=best[1], best_delta=float(cell.max()) if len(cell) else math.nan))
    return pd.DataFrame(rows)


def knockout_summary(ko: pd.DataFrame) -> pd.DataFrame:
    """Per variant: ``layer`` (the centre whose window, blocked, lowers the answer's mean
    log-probability most), ``first_layer``/``last_layer`` of that window, ``delta`` (mean Δ log p
    there, nats), ``n`` prompts."""
    rows = []
    for v, g in ko.groupby("variant", sort=False):
        m = g.groupby("layer")["delta"].mean()
        c = int(m.idxmin())
        w = g[g["layer"] == c].iloc[0]
        rows.append(dict(variant=v, layer=c, first_layer=int(w["first_layer"]), last_layer=int(w["last_layer"]),
                         delta=float(m.min()), n=g["line"].nunique()))
    return pd.DataFrame(rows)


def findings(t: dict[str, pd.DataFrame | None]) -> list[dict[str, str]]:
    """Sentences from the run's tables ``t`` (name → DataFrame or ``None``)."""
    out: list[dict[str, str]] = []
    faith = t.get("faithfulness")
    if faith is not None and len(faith):
        for v, g in faith.groupby("variant", sort=False):
            worst = g.loc[g["rel_error"].idxmax()]
            if worst["rel_error"] < EXACT:
                text = f"{v} is exactly the weighted sum of the experts' updates at every site."
            else:
                text = (f"{v} departs from the weighted sum of the experts' updates by up to "
                        f"{worst['rel_error']:.3g} (relative Frobenius error) at {worst['module']}.")
            out.append(dict(text=text, evidence=f"max rel_error {worst['rel_error']:.3g} over {len(g)} sites",
                            csv="faithfulness"))
    ek = t.get("energy_kept")
    if ek is not None and len(ek):
        tk = ek[ek["expert"] == "target"]
        ek = ek[ek["expert"] != "target"]
        for v, g in tk.groupby("variant", sort=False):
            kept = float((g["energy_kept"] * g["energy"]).sum() / g["energy"].sum())
            out.append(dict(text=f"{v} holds {_pct(kept)} of the target's update energy inside its own spans; "
                                 f"the other {_pct(1 - kept)} it cannot express whatever its weights.",
                            evidence=f"energy-weighted over {len(g)} sites", csv="energy_kept"))
        for v, g in ek.groupby("variant", sort=False):
            per = g.assign(w=g["energy_kept"] * g["energy"]).groupby("expert")[["w", "energy"]].sum()
            kept = (per["w"] / per["energy"]).sort_values()
            low = kept.index[0]
            out.append(dict(text=f"{v} keeps {_pct(kept.iloc[0])} of expert {low}'s update energy inside its "
                                 "row and column spans (the least kept of any expert).",
                            evidence=", ".join(f"{e}: {_pct(x)}" for e, x in kept.items()) + " (energy-weighted over sites)",
                            csv="energy_kept"))
    ov = t.get("overlap")
    if ov is not None and len(ov):
        for (a, b), g in ov.groupby(["adapter_1", "adapter_2"], sort=False):
            phi = float(g["phi_col"].mean())
            word = "nearly orthogonal" if phi < ORTHOGONAL_PHI else "overlapping"
            out.append(dict(text=f"Experts {a} and {b} write into {word} subspaces (mean column-space φ "
                                 f"{phi:.3f}; φ < {ORTHOGONAL_PHI} counts as nearly orthogonal). "
                                 "Orthogonal updates add without interference but also without composing.",
                            evidence=f"φ_col mean {phi:.3f}, φ_row mean {g['phi_row'].mean():.3f}, "
                                     f"task cosine mean {g['cosine'].mean():.3f} over {len(g)} sites",
                            csv="overlap"))
    sd = t.get("span_deficit")
    if sd is not None and len(sd):
        tot = float((sd["span_deficit"] * sd["oracle_energy"]).sum() / sd["oracle_energy"].sum())
        worst = sd.loc[sd["span_deficit"].idxmax()]
        out.append(dict(text=f"{_pct(tot)} of the target's update lies outside the joint spans of the adapters: "
                             "no merge inside those spans (averaging, task arithmetic, TIES on ΔW) can reach it.",
                        evidence=f"energy-weighted span deficit {tot:.3f}; worst site {worst['module']} "
                                 f"{worst['span_deficit']:.3f}", csv="span_deficit"))
    acc = t.get("accuracy")
    if acc is not None and len(acc):
        q = acc[(acc["hop"] == "query") & (acc["metric"] == "first_token")]
        experts = q[q["role"] == "expert"]
        combines = q[q["role"] == "combine"]
        base = _acc_row(acc, "base", "query")
        if len(experts):
            best_e = experts.loc[experts["accuracy"].idxmax()]
            ev = f"base {_acc_text(base)}; " if base is not None else ""
            for _, r in combines.iterrows():
                verdict = "beats" if r["ci_low"] > best_e["ci_high"] else (
                    "falls below" if r["ci_high"] < best_e["ci_low"] else "is within the intervals of")
                out.append(dict(text=f"On your prompts {r['variant']} answers {_acc_text(r)} and {verdict} the "
                                     f"best single expert, {best_e['variant']} {_acc_text(best_e)}.",
                                evidence=ev + "first-token accuracy, Wilson 95% intervals", csv="accuracy"))
        for v in list(dict.fromkeys(acc["variant"])):
            ch, lat = _acc_row(acc, v, "chain"), _acc_row(acc, v, "query")
            if ch is not None and lat is not None and ch["ci_low"] > lat["ci_high"]:
                out.append(dict(text=f"{v} answers when chained explicitly ({_acc_text(ch)}) but not latently "
                                     f"({_acc_text(lat)}): both facts are there, the composition is not.",
                                evidence="hop 'chain' vs 'query', first-token accuracy", csv="accuracy"))
    router = t.get("router")
    if router is not None and len(router) and router["top1_match"].notna().any():
        for v, g in router[router["variant"] != "oracle"].groupby("variant", sort=False):  # oracle: by construction
            m = g.drop_duplicates("layer")["top1_match"].mean()
            out.append(dict(text=f"{v} routes the final token to the expected expert in {_pct(m)} of "
                                 "prompts (mean over layers).",
                            evidence="top1_match of hook_router at the final position", csv="router"))
    ko = t.get("key_overlap")
    if ko is not None and len(ko):
        per = ko.groupby("adapter", sort=False)[["trigger_composed", "trigger_native"]].mean()
        parts = [f"{a} {r.trigger_composed / r.trigger_native:.2f}×" for a, r in per.iterrows() if r.trigger_native > 0]
        out.append(dict(text="On the composed queries each adapter's update is triggered at " + ", ".join(parts)
                             + " its strength on the single-hop prompts (mean ‖ΔW x‖ at the final token, base model).",
                        evidence="κ composed/native: " + ", ".join(
                            f"{a} {g['kappa_composed'].mean():.3f}/{g['kappa_native'].mean():.3f}"
                            for a, g in ko.groupby("adapter", sort=False)), csv="key_overlap"))
    lens = t.get("lens")
    if lens is not None and len(lens):
        fin = lens[(lens["position"] == "final") & (lens["target"] == "bridge")]
        best: dict[str, tuple[float, int]] = {}
        for v, g in fin.groupby("variant", sort=False):
            med = g.groupby("layer")["rank"].median()
            med = med.iloc[:-1] if len(med) > 1 else med  # before the last layer: not just the output
            best[v] = (float(med.min()), int(med.idxmin()))
        yes = [v for v, (r, _) in best.items() if r <= DECODABLE_RANK]
        no = [v for v in best if v not in yes]
        text = ("The bridge entity is decodable at the final position before the last layer (median "
                f"logit-lens rank ≤ {DECODABLE_RANK}) in " + (", ".join(yes) or "no variant")
                + ("; not in " + ", ".join(no) if no else "") + ".")
        out.append(dict(text=text, evidence="best median rank (layer): " + ", ".join(
            f"{v} {r:.0f} (ℓ{l})" for v, (r, l) in best.items()) + f"; EntRec over {fin['example_id'].nunique()} prompts",
            csv="lens"))
    ps = t.get("patchscope")
    if ps is not None and len(ps):
        sm = patchscope_summary(ps)
        yes = sm[sm["first_layer"].notna()]
        no = sm[sm["first_layer"].isna()]
        text = ("Patchscope reads the bridge out of the subject's last token (median rank ≤ "
                f"{DECODABLE_RANK} in the token-identity prompt) " + (", ".join(
                    f"in {r.variant} from layer {int(r.first_layer)}" for r in yes.itertuples()) or "in no variant")
                + ("; never in " + ", ".join(no["variant"]) if len(no) and len(yes) else "") + ".")
        out.append(dict(text=text, evidence="best median rank (layer): " + ", ".join(
            f"{r.variant} {r.best_rank:.0f} (ℓ{r.best_layer})" for r in sm.itertuples())
            + f"; {int(sm['n'].max())} prompts", csv="patchscope"))
    bp = t.get("backpatch")
    if bp is not None and len(bp):
        sm = backpatch_summary(bp)
        parts = [f"{r.variant} {r.fixed}/{r.wrong}" for r in sm.itertuples() if r.wrong]
        if parts:
            text = ("Back-patching a later layer's final-position state into an earlier layer makes the wrong "
                    "answers right in " + ", ".join(parts) + " of the prompts each variant gets wrong: "
                    "where this is high the later layers hold what the answer needs, but too late to use it "
                    "(Biran et al. 2024).")
        else:
            text = "Every variant answers every two-hop prompt correctly: back-patching has nothing to fix."
        out.append(dict(text=text, evidence="best cell ℓs→ℓt (mean Δ log p): " + ", ".join(
            f"{r.variant} {r.best_source:.0f}→{r.best_target:.0f} ({r.best_delta:+.2f} nats)" for r in sm.itertuples()),
            csv="backpatch"))
    ko = t.get("knockout")
    if ko is not None and len(ko):
        sm = knockout_summary(ko)
        hurt, safe = sm[sm["delta"] < 0], sm[sm["delta"] >= 0]
        text = ("Blocking the final token's attention to the subject hurts the answer most around "
                + ", ".join(f"layer {r.layer} in {r.variant} ({r.delta:+.2f} nats)" for r in hurt.itertuples())
                + ": where the subject's information is moved to the final position (Geva et al. 2023)"
                if len(hurt) else "Blocking the final token's attention to the subject in no window lowers "
                "the answer's mean log-probability")
        text += ("; in " + ", ".join(safe["variant"]) + " no window lowers it." if len(safe) and len(hurt)
                 else "; in " + ", ".join(safe["variant"]) + "." if len(safe) else ".")
        out.append(dict(text=text, evidence="window ℓ " + ", ".join(
            f"{r.variant} {r.first_layer}–{r.last_layer}" for r in sm.itertuples())
            + f"; mean Δ log p(answer) over {int(sm['n'].max())} prompts", csv="knockout"))
    return out
