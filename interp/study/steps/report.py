"""Step ``report``: ``DIR/report.html`` from the run's tables, figures, findings and ``run.json``."""

from __future__ import annotations

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
    ex = run.table("experts")
    if ex is not None:
        tables.append(("Experts: training data, steps, final loss, training accuracy", ex))
    fam = run.table("familiarity")
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
        t = run.table(name)
        if t is not None:
            sub_tables.append((cap, t))
    sections.append({"title": "LoRA update subspaces against the theory", "text": "",
                     "figures": figs("spectra", "overlap", "layer_energy", "span_deficit", "key_overlap"),
                     "tables": sub_tables})
    found = findings(acc, lens) if acc is not None else []
    return build_report(run.out, f"Two-hop LoRA reuse study — {run.model}", found, sections,
                        runjson.get("config", run.cfg.to_dict()), runjson.get("versions", versions()),
                        runjson.get("timings", {}))
