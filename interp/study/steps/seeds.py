"""Step ``seeds`` of a run over several seeds: ``DIR/results/accuracy_seeds.csv``,
``DIR/results/findings_seeds.csv``, ``DIR/figures/accuracy_seeds.{html,png}`` and
``DIR/report.html`` from the sub-runs ``DIR/seed-S``.

Runs after every seed's pipeline (:func:`interp.study.runner.run_over_seeds`); reads only their
tables, so it takes seconds and is recomputed on every invocation.
"""

from __future__ import annotations

import html
import json
from typing import Any

from interp.figures import png_export_possible, save_figures, seeds_accuracy_figure
from interp.report import build_report
from interp.study import seeds as S
from interp.study.runner import Run, versions


def seed_run(run: Run, seed: int) -> Run:
    """The sub-run of ``seed`` inside the run over seeds ``run`` (``DIR/seed-S``), for reading
    its tables (as :func:`interp.study.open_run` on that directory would)."""
    return Run(S.seed_config(run.cfg, seed), run.out / S.seed_dir_name(seed), timings={})


def _report_findings(run: Run) -> list[dict[str, str]]:
    """The findings that run's own report states (the two-hop or the shared-template study's)."""
    if run.cfg.study_kind == "math":
        from interp.study.steps.math_report import report_findings
    else:
        from interp.study.steps.report import report_findings
    return report_findings(run)


def run(run: Run) -> None:
    """Write the tables over seeds and the report (findings marked where the seeds disagree)."""
    seeds = list(run.cfg.study.seeds)
    subs = {s: seed_run(run, s) for s in seeds}
    acc = {s: r.table("accuracy") for s, r in subs.items()}
    acc = {s: a for s, a in acc.items() if a is not None}
    sections: list[dict[str, Any]] = []
    found: list[dict[str, str]] = []
    missing = [s for s in seeds if s not in acc]
    if acc:
        over = S.accuracy_over_seeds(acc)
        run.write_csv(over, "accuracy_seeds")
        fs = S.findings_over_seeds({s: _report_findings(subs[s]) for s in acc})
        run.write_csv(fs, "findings_seeds")
        found = S.merged_findings(fs)
        main = (over[over["metric"] == "exact"] if run.cfg.study_kind == "math"
                else over[(over["hop"] == "two_hop") & (over["metric"] == "first_token")])
        what = "exact match" if run.cfg.study_kind == "math" else "two-hop, first answer token"
        fig = seeds_figure(run, over)
        save_figures({"accuracy_seeds": fig}, run.out / "figures", png=png_export_possible())
        sections.append({
            "title": "Accuracy over seeds",
            "figures": [("fig-accuracy_seeds", fig.to_json(), SEEDS_CAPTION)],
            "text": f"Per variant and query set: mean, sample standard deviation (ddof 1), min and max of the "
                    f"accuracy over seeds {', '.join(map(str, sorted(acc)))}, then each seed's accuracy with its "
                    "own Wilson 95% interval. Every seed answers the same queries; a seed changes the LoRA "
                    "init and batch order of every expert and the mechanisms' sampling. Full table: "
                    "<code>results/accuracy_seeds.csv</code>.",
            "tables": [(f"Accuracy over seeds ({what})", main), ("Every hop and metric", over)]})
        sections.append({"title": "Findings on each seed",
                         "text": "Each finding above as the report of each seed states it; <code>agree</code> "
                                 "is false where the seeds' verdicts differ (<code>results/findings_seeds.csv</code>).",
                         "tables": [("Findings per seed", fs[["claim", "seed", "verdict", "agree"]])]})
    links = ", ".join(f'<a href="{S.seed_dir_name(s)}/report.html">seed {s}</a>' for s in seeds)
    sections.append({"title": "Each seed's run", "text": f"Full reports, tables and figures per seed: {links}."
                     + (f" No accuracy table yet for seed(s) {', '.join(map(str, missing))}." if missing else ""),
                     "tables": []})
    runjson = json.loads((run.out / "run.json").read_text()) if (run.out / "run.json").is_file() else {}
    if run.cfg.study_kind == "math":
        from interp.study.steps.math_report import report_title

        title = report_title(list(run.cfg.math.conditions))
    else:
        title = "Two-hop LoRA reuse study"
    build_report(run.out, f"{title} — {run.model}, over seeds {', '.join(map(str, seeds))}", found, sections,
                 runjson.get("config", run.cfg.to_dict()), runjson.get("versions", versions()),
                 _seed_timings(subs), warnings=_warnings(run, subs))


SEEDS_CAPTION = ("Accuracy per variant: bar = mean over seeds, whiskers = lowest to highest seed, "
                 "one marker per seed (hover: that seed's Wilson 95% interval).")


def seeds_figure(run: Run, over) -> Any:
    """The accuracy-over-seeds figure of a run over seeds (the step writes it to
    ``DIR/figures/accuracy_seeds.html``, and ``.png`` where headless Chromium is installed): the
    two-hop study's first-token accuracy of the two-hop query and both single hops per
    familiarity tier, or the shared-template study's exact match on the composed test and each
    skill per condition (:func:`interp.figures.seeds_accuracy_figure`).

    Args:
        over: :func:`interp.study.seeds.accuracy_over_seeds`'s table of this run.
    """
    order = list(run.cfg.methods.variants)
    if run.cfg.study_kind == "math":
        fig = seeds_accuracy_figure(over, "exact", ["composed", "skill_a", "skill_b"], facet="condition",
                                    order=order, title="Shared-template study over seeds: exact match")
    else:
        fig = seeds_accuracy_figure(over, "first_token", ["two_hop", "hop1", "hop2"], facet="test_set",
                                    order=order, title="Two-hop study over seeds: first-token accuracy")
    return fig


def _seed_timings(subs: dict[int, Run]) -> dict[str, float]:
    """Seconds per step summed over the seeds' ``run.json`` (``seed-S/STEP`` keys)."""
    out = {}
    for s, r in subs.items():
        p = r.out / "run.json"
        if p.is_file():
            for k, v in json.loads(p.read_text()).get("timings", {}).items():
                if k != "total_this_invocation":
                    out[f"{S.seed_dir_name(s)}/{k}"] = v
    return out


def _warnings(run: Run, subs: dict[int, Run]) -> list[str]:
    """Every seed's evidence warnings, once each; a warning not shared by all seeds names its seeds."""
    from interp.study.steps.report import evidence_warnings

    per = {s: [w for w in evidence_warnings(r) if run.cfg.study_kind != "math" or "amiliarity" not in w]
           for s, r in subs.items()}
    order = list(dict.fromkeys(w for ws in per.values() for w in ws))
    out = []
    for w in order:
        have = [s for s, ws in per.items() if w in ws]
        out.append(w if len(have) == len(per) else f"{w} (seed {html.escape(', '.join(map(str, have)))})")
    return out
