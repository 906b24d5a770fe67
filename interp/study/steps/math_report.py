"""Step ``report`` of the shared-template study: success and failure side by side.

``DIR/report.html`` and ``DIR/results/math_summary.csv``: per condition, the composed-test and
one-skill accuracies (exact match, Wilson 95%) of every variant; findings on whether merges and
routers of the two skill experts succeed with a shared (or bridged) solution template where they
fail with separate templates; the mechanism and subspace tables summarised per condition. Works for
any list of conditions of :data:`interp.tasks.math_skills.CONDITIONS`.
"""

from __future__ import annotations

import html
import json
from typing import Any

import pandas as pd

from interp import figures as F
from interp.report import build_report
from interp.study.runner import versions
from interp.study.variants import reuse_variants

LEARNED = 0.8   # an expert below this exact-match accuracy on its own skill did not learn it
SUCCEEDS = 0.5  # a reuse variant at or above this composed accuracy "works"


def report_title(conditions: list[str]) -> str:
    """``"When does LoRA reuse work? Shared vs separate solution templates"``: the templated
    conditions in run order, then ``separate`` (the reports of one run and over seeds)."""
    conds = [c for c in conditions if c != "separate"] + [c for c in conditions if c == "separate"]
    noun = "solution templates" if len(conds) > 1 else "solution template"
    return f"When does LoRA reuse work? {' vs '.join(conds).capitalize()} {noun}"


def accuracy_summary(acc: pd.DataFrame) -> pd.DataFrame:
    """Exact-match accuracy per ``method × condition`` with one column per query set
    (``composed``, ``skill_a``, ``skill_b``), formatted ``acc [lo, hi]``; plus numeric
    ``composed`` / ``skill_a`` / ``skill_b`` columns suffixed ``_acc``."""
    d = acc[acc["metric"] == "exact"].copy()
    d["cell"] = [f"{a:.0%} [{lo:.0%}, {hi:.0%}]" for a, lo, hi in zip(d["accuracy"], d["ci_low"], d["ci_high"])]
    order = list(dict.fromkeys(d["method"]))
    wide = d.pivot_table(index=["method", "library", "test_set"], columns="hop", values="cell", aggfunc="first")
    num = d.pivot_table(index=["method", "library", "test_set"], columns="hop", values="accuracy", aggfunc="first")
    num.columns = [f"{c}_acc" for c in num.columns]
    out = wide.join(num).reset_index().rename(columns={"test_set": "condition"})
    out["method"] = pd.Categorical(out["method"], order, ordered=True)
    return out.sort_values(["method", "condition"]).reset_index(drop=True).assign(method=lambda x: x["method"].astype(str))


def findings(summary: pd.DataFrame, conditions: list[str]) -> list[dict[str, str]]:
    """Findings on a :func:`accuracy_summary` table, for any list of conditions.

    Rules (exact match): (1) each skill expert learned its skill: expert_ab on ``skill_a`` and
    expert_bc on ``skill_b`` ≥ 80% in every condition; (2) one finding per templated condition
    ``c`` (``shared``, ``bridged``) in ``conditions``, in order: reuse works with ``c``'s template.
    With ``separate`` also in the run: supported if the best reuse variant (merges and routers of
    {ab, bc}) reaches ≥ 50% on the composed test in ``c`` while the best in ``separate`` is below
    50% and at least 20 points lower; not supported if ``c`` is below 50%; else mixed. Without
    ``separate``: supported iff ``c``'s best reaches 50%. The evidence also quotes ``joint_12``
    (one adapter trained on both skills' data: does the template compose without merging?).

    Returns:
        A list of ``{"claim", "verdict", "evidence"}`` dicts (HTML-escaped evidence)."""
    out = []

    def val(method: str, cond: str, col: str) -> float | None:
        r = summary[(summary["method"] == method) & (summary["condition"] == cond)]
        return None if r.empty or col not in r or pd.isna(r[col].iloc[0]) else float(r[col].iloc[0])

    ev = []
    learned = True
    for cond in conditions:
        for m, col in (("expert_ab", "skill_a_acc"), ("expert_bc", "skill_b_acc")):
            a = val(m, cond, col)
            if a is not None:
                ev.append(f"{m} on {col[:-4]} ({cond}): {a:.0%}")
                learned &= a >= LEARNED
    if ev:
        out.append({"claim": "Each expert learned its own skill (held-out problems of the test chains)",
                    "verdict": "yes" if learned else "no", "evidence": html.escape("; ".join(ev))})
    reuse = reuse_variants(list(summary["method"]))
    best = {}
    for cond in conditions:
        vals = [(val(m, cond, "composed_acc"), m) for m in reuse]
        vals = [(a, m) for a, m in vals if a is not None]
        if vals:
            best[cond] = max(vals)
    template = {"shared": "share a solution template",
                "bridged": "share a solution template bridged by a common operation (cop)"}
    for cond in (c for c in conditions if c in template and c in best):
        s, sm = best[cond]
        ev = [f"best merge/router on the composed test: {cond} {sm} {s:.0%}"]
        if "separate" in best:
            p, pm = best["separate"]
            ev.append(f"separate {pm} {p:.0%}")
            verdict = "yes" if s >= SUCCEEDS and p < SUCCEEDS and s - p >= 0.2 else "no" if s < SUCCEEDS else "mixed"
            claim = f"when their data {template[cond]}, and fails when they do not"
        else:
            verdict = "yes" if s >= SUCCEEDS else "no"
            claim = f"when their data {template[cond]} (no separate-template baseline in this run)"
        joint = [f"{c} {a:.0%}" for c in dict.fromkeys([cond, "separate"])
                 if (a := val("joint_12", c, "composed_acc")) is not None]
        if joint:
            ev.append("joint_12 (trained on both skills): " + ", ".join(joint))
        out.append({"claim": "Reuse of separately trained skill experts composes the skills " + claim
                             + " (Chen et al., TMLR 2026)",
                    "verdict": verdict, "evidence": html.escape("; ".join(ev) + " (exact match)")})
    return out


def report_findings(run) -> list[dict[str, str]]:
    """The findings the shared-template report states (:func:`findings` on the run's gathered
    accuracy table; none before the evaluate step)."""
    acc = run.table("accuracy")
    return findings(accuracy_summary(acc), list(run.cfg.math.conditions)) if acc is not None else []


def _mean_by(df: pd.DataFrame | None, by: list[str], value: str) -> pd.DataFrame | None:
    if df is None or not len(df):
        return None
    return df.groupby(by, as_index=False)[value].mean()


def run(run) -> None:
    """Write ``results/math_summary.csv`` and ``report.html``."""
    acc = run.table("accuracy")
    sections: list[dict[str, Any]] = []
    found: list[dict[str, str]] = []
    if acc is not None:
        summary = accuracy_summary(acc)
        run.write_csv(summary, "math_summary")
        found = report_findings(run)
        cols = ["method", "library", "condition"] + [c for c in ("composed", "skill_a", "skill_b") if c in summary]
        figs = []
        for hop in ("composed", "skill_a", "skill_b"):
            if (acc["hop"] == hop).any():
                f = F.accuracy_figure(acc, metric="exact", hop=hop)
                f.update_xaxes(categoryorder="array", categoryarray=list(dict.fromkeys(summary["method"])))
                figs.append((f"fig-acc-{hop}", f.to_json(), f"{hop}: exact-match accuracy per method, the "
                             "conditions side by side (test set = condition), Wilson 95% intervals."))
        sections.append({"title": "Composed and one-skill accuracy, side by side", "figures": figs,
                         "text": "Exact match (the whole answer, equal to greedy decoding), Wilson 95% intervals. "
                                 "<code>composed</code> = dax(zib(x)); <code>skill_a</code> = zib(x) and "
                                 "<code>skill_b</code> = dax(y) on the same test chains, in each expert's own format. "
                                 "Experts: ab = skill A (zib), bc = skill B (dax), ac = composed problems.",
                         "tables": [("Accuracy per method and condition", summary[cols]),
                                    ("All accuracies", acc)]})
    ex = run.table("experts")
    if ex is not None:
        sections.append({"title": "Experts", "text": "Training data, steps, loss and training accuracy per condition.",
                         "tables": [("Experts", ex)]})
    lens = run.table("math_lens")
    if lens is not None:
        best = lens.groupby(["condition", "method", "position", "target", "layer"], as_index=False)["rank"].median()
        top = best.sort_values("rank").groupby(["condition", "method", "position", "target"], as_index=False).first()
        curve = lens[lens["target"] == "y"].groupby(["condition", "method", "position", "layer"],
                                                     as_index=False)["logprob"].mean()
        curve["line"] = curve["method"] + " · " + curve["position"]
        f = F.line_figure(curve, x="layer", y="logprob", color="line", facet="condition",
                          title="Logit lens of the intermediate y = zib(x) (first token), by layer",
                          y_title="log-prob of y (nats)")
        sections.append({"title": "Where the intermediate result is decodable (logit lens)",
                         "figures": [("fig-lens-y", f.to_json(), "Mean logit-lens log-probability of the "
                                      "intermediate's first token at each position that predicts a number, per "
                                      "layer (0 = embeddings); one panel per condition.")],
                         "text": "For each position that predicts a number of the solution, the earliest layer with "
                                 "the lowest median rank of the target's first token (y = the intermediate zib(x), "
                                 "z = the result). Full per-layer curves: <code>results/math_lens.csv</code>.",
                         "tables": [("Best lens layer per position and target", top)]})
    pat = _mean_by(run.table("math_patching"), ["condition", "method", "region", "layer"], "value")
    if pat is not None:
        peak = pat.groupby(["condition", "method", "region"], as_index=False)["value"].max()
        sections.append({"title": "Which step's tokens carry the result (activation patching)",
                         "text": "Peak over layers of the mean normalised patching effect of resid_pre per region "
                                 "(1 = patching that region from the corrupted problem moves the answer fully).",
                         "tables": [("Peak patching effect per region", peak)]})
    con = _mean_by(run.table("math_contributions"), ["condition", "method", "segment", "adapter"], "norm")
    if con is not None:
        sections.append({"title": "Per-adapter contributions per solution step",
                         "text": "Mean over layers of each adapter's contribution norm, per segment of the sequence.",
                         "tables": [("Contribution norm per segment and adapter", con)]})
    sub = []
    ov = run.table("subspace_overlap")
    if ov is not None and len(ov):
        pair = ov[ov["adapter_1"].isin(["expert_ab", "expert_bc"]) & ov["adapter_2"].isin(["expert_ab", "expert_bc"])]
        cols = [c for c in ("phi_row", "phi_col", "min_angle_row", "min_angle_col", "grassmann_row", "cosine") if c in pair]
        sub.append(("Skill experts' overlap (mean over modules)", pair.groupby("condition", as_index=False)[cols].mean()))
    sd = run.table("subspace_span_deficit")
    if sd is not None and len(sd):
        sub.append(("Span deficit of the composed-task experts against {ab, bc}",
                    sd.groupby(["condition", "oracle"], as_index=False)["span_deficit"].mean()))
    if sub:
        sections.append({"title": "Subspace view", "text": "Do the two skill experts' update subspaces overlap "
                         "(φ: 0 orthogonal, 1 the same), and how much of a composed-task update lies outside "
                         "their spans?", "tables": sub})
    runjson = json.loads((run.out / "run.json").read_text()) if (run.out / "run.json").is_file() else {}
    from interp.study.steps.report import evidence_warnings

    build_report(run.out, f"{report_title(list(run.cfg.math.conditions))} — {run.model}",
                 found, sections, runjson.get("config", run.cfg.to_dict()), runjson.get("versions", versions()),
                 runjson.get("timings", {}), warnings=[w for w in evidence_warnings(run) if "amiliarity" not in w])
