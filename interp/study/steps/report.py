"""Step ``report``: ``DIR/report.html`` from the run's tables, figures, findings and ``run.json``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from interp.report import build_report
from interp.study.findings import findings
from interp.study.runner import versions


def run(run) -> None:
    """Write ``DIR/report.html``."""
    build_run_report(run)


def build_run_report(run) -> Path:
    """``DIR/report.html`` from the run's tables, figures and ``run.json``."""
    acc = run.table("accuracy")
    lens = run.table("lens")
    fig_dir = run.out / "figures"
    captions = json.loads((fig_dir / "index.json").read_text()) if (fig_dir / "index.json").is_file() else {}

    def figs(*names: str) -> list[tuple[str, str, str]]:
        out = []
        for n in names:
            # index.json keeps the order the figures were built in: main results before controls
            for key in [k for k in captions if k == n or k.startswith(n + "_")]:
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
    ex = run.table("experts")
    if ex is not None:
        tables.append(("Experts: training data, steps, final loss, training accuracy", ex))
    fam = run.table("familiarity")
    if fam is not None and len(fam):
        tables.append(("Familiarity measured on the base model", fam))
    sections.append({"title": "Reuse accuracy", "text": "Every variant answers the same queries: latent two-hop "
                     "queries (training and held-out templates), each hop alone, explicit chaining, and the real "
                     "facts of tier H.", "figures": figs("accuracy"), "tables": tables})
    sections.append({"title": "Bridge-entity mechanisms", "text": mechanisms_finding(run),
                     "figures": figs("lens", "patching", "backpatch", "knockout", "patchscope", "probes"),
                     "tables": []})
    sub_tables = []
    for name, cap in (("subspace_merges", "Merge geometry: energy of each expert kept, cross terms"),
                      ("subspace_span_deficit", "Span deficit per module"),
                      ("subspace_adapters", "Per-adapter, per-module ranks and norms")):
        t = run.table(name)
        if t is not None:
            sub_tables.append((cap, t))
    sections.append({"title": "LoRA update subspaces against the theory", "text": subspace_finding(run),
                     "figures": figs("spectra", "overlap", "layer_energy", "span_deficit", "key_overlap"),
                     "tables": sub_tables})
    found = report_findings(run)
    return build_report(run.out, f"Two-hop LoRA reuse study — {run.model}", found, sections,
                        runjson.get("config", run.cfg.to_dict()), runjson.get("versions", versions()),
                        runjson.get("timings", {}), warnings=evidence_warnings(run))


def report_findings(run) -> list[dict[str, str]]:
    """The findings the two-hop report states (:func:`interp.study.findings.findings` on the run's
    accuracy and lens tables; none before the evaluate step)."""
    acc = run.table("accuracy")
    return findings(acc, run.table("lens")) if acc is not None else []


FACTS_LEARNED = 0.9  # an expert below this training accuracy did not learn its facts


def evidence_warnings(run) -> list[str]:
    """What limits the page's evidence, shown above the findings: a random-init model (its
    numbers test the machinery, not the paper), unverified familiarity tiers, experts that did
    not learn their facts (a failure to compose is then confounded with missing knowledge)."""
    from interp.models import REGISTRY

    out = []
    spec = REGISTRY.get(run.model)
    if spec is not None and spec.kind == "random-init":
        out.append(f"The base model <b>{html.escape(run.model)}</b> is random-init: these numbers check the "
                   "machinery end to end and say nothing about the paper's claims.")
    if not run.cfg.world.verify_familiarity:
        out.append("Familiarity was not verified on the base model (<code>world.verify_familiarity = false</code>): "
                   "the F / H / R tiers are as designed, not as measured.")
    ex = run.table("experts")
    if ex is not None and "train_first_token_acc" in ex.columns:
        low = ex[ex["train_first_token_acc"] < FACTS_LEARNED]
        if len(low):
            names = ", ".join(f"{r.expert} ({r.train_first_token_acc:.0%})" for r in low.itertuples())
            out.append(f"Expert(s) {html.escape(names)} reached less than {FACTS_LEARNED:.0%} training accuracy "
                       "(first answer token) on their own facts: reuse failures below are confounded with "
                       "facts never learned.")
        if "retrained" in ex.columns:
            again = ex[ex["retrained"].astype(bool)]
            if len(again):
                names = ", ".join(f"{r.expert} ({r.first_attempt_acc:.0%} at {r.steps // 2} steps)"
                                  for r in again.itertuples())
                out.append(f"Expert(s) {html.escape(names)} fell short of the floor "
                           f"<code>training.min_accuracy = {run.cfg.training.min_accuracy:.0%}</code> at first "
                           "and were trained as many epochs again, continuing from where they stood; the "
                           "table shows the kept expert.")
    return out


def subspace_finding(run) -> str:
    """One sentence on what the subspace tables show: overlap of the two experts' input spaces,
    and how much of the A→C update lies outside the library's spans."""
    parts = []
    ov = run.table("subspace_overlap")
    if ov is not None and len(ov) and "phi_row" in ov.columns:
        pair = ov[(ov["adapter_1"].isin(["expert_ab", "expert_bc"])) & (ov["adapter_2"].isin(["expert_ab", "expert_bc"]))]
        if len(pair):
            parts.append(f"the A→B and B→C experts' input (row) spaces overlap with mean φ = "
                         f"{pair['phi_row'].mean():.2f} over modules (0 = orthogonal, 1 = the same)")
    sd = run.table("subspace_span_deficit")
    if sd is not None and len(sd) and "span_deficit" in sd.columns:
        for oracle, g in sd.groupby("oracle"):
            parts.append(f"a mean {g['span_deficit'].mean():.0%} of {html.escape(str(oracle))}'s update lies "
                         "outside the library's row spans, out of reach of any merge inside them")
    ko = run.table("subspace_key_overlap")
    if ko is not None and len(ko) and {"kappa_composed", "kappa_native"} <= set(ko.columns):
        parts.append(f"two-hop queries put κ = {ko['kappa_composed'].mean():.3f} of their module input in the "
                     f"B→C expert's row space, against {ko['kappa_native'].mean():.3f} for its own prompts")
    if not parts:
        return "No subspace tables were written for this run."
    return "In this run " + "; ".join(parts) + "."


def mechanisms_finding(run) -> str:
    """Sentences on what the mechanism tables show, per analysed variant: whether the bridge e₂ is
    decodable (EntRec rank 0 = top-1 under the logit lens) at the final position of two-hop
    queries and from which layer; how many wrong answers back-patching fixes; the best probe
    selectivity for e₂ (probe accuracy minus its control task's)."""
    parts = []
    lens = run.table("lens")
    if lens is not None and len(lens):
        fin = lens[(lens["target"] == "e2") & (lens["position"] == "final") & (lens["kind"] == "two_hop")]
        for method, g in fin.groupby("method", sort=False):
            top1 = g.groupby("layer")["rank"].apply(lambda r: float((r == 0).mean()))
            best = int(top1.idxmax())
            if top1.max() == 0:
                parts.append(f"<b>{html.escape(str(method))}</b>: e₂ is never the top logit-lens token at the final "
                             f"position (best median rank {int(g.groupby('layer')['rank'].median().min())})")
            else:
                first = int(top1[top1 > 0].index.min())
                parts.append(f"<b>{html.escape(str(method))}</b>: e₂ is decodable (top-1) at the final position from "
                             f"layer {first}, most often at layer {best} ({top1.max():.0%} of queries)")
    bp = run.table("backpatch")
    if bp is not None and len(bp) and {"was_correct", "fixed"} <= set(bp.columns):
        counts = []
        for method, g in bp.groupby("method", sort=False):
            wrong = g[~g["was_correct"].astype(bool)]
            if wrong["example_id"].nunique():
                fixed = wrong[wrong["fixed"].astype(bool)]["example_id"].nunique()
                counts.append(f"{fixed} of {wrong['example_id'].nunique()} for <b>{html.escape(str(method))}</b>")
        if counts:
            parts.append("back-patching a later layer's final-position state into an earlier layer (any layer "
                         "pair) fixes " + ", ".join(counts) + " of the two-hop queries answered wrongly")
    pr = run.table("probes")
    if pr is not None and len(pr) and "selectivity" in pr.columns:
        i = pr["selectivity"].idxmax()
        r = pr.loc[i]
        parts.append(f"the most selective e₂ probe ({html.escape(str(r['estimator']))}) is on "
                     f"<b>{html.escape(str(r['method']))}</b> at layer {int(r['layer'])}, {r['position']} position: "
                     f"accuracy {r['accuracy']:.0%} against control {r['control_accuracy']:.0%} (chance {r['chance']:.0%})")
    if not parts:
        return "No mechanism tables were written for this run."
    return "Is e₂ computed, where, and can the second hop use it? In this run " + "; ".join(parts) + "."
