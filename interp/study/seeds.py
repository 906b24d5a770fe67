"""Claims over seeds: a study's tables and findings aggregated over its per-seed runs.

With ``[study] seeds = [0, 1, 2]`` the study runs once per seed ``S`` in ``DIR/seed-S`` (the same
world and queries; ``study.seed`` — the mechanisms' sampling — and ``training.seed`` — LoRA init
and batch order — set to ``S``), and :mod:`interp.study.steps.seeds` gathers them with the pure
functions here:

* :func:`accuracy_over_seeds` — per variant × query set: mean, sample standard deviation, min and
  max of the accuracy across seeds, and each seed's own Wilson interval;
* :func:`findings_over_seeds` — each claim the report states, with its verdict on each seed and
  ``agree`` (False when the seeds' verdicts differ, or a seed does not state the claim);
* :func:`merged_findings` — the report's findings: the common verdict where the seeds agree, else
  ``"disagree"`` (shown as "seeds disagree").
"""

from __future__ import annotations

import copy
import html
from typing import Mapping

import pandas as pd

from interp.errors import StudyError

#: the per-seed columns of an accuracy table that are values, not keys of a cell
ACC_VALUES = ("n", "accuracy", "ci_low", "ci_high")
NOT_STATED = "n/a"  # a seed's verdict on a claim its findings do not state
DISAGREE = "disagree"


def seed_dir_name(seed: int) -> str:
    """``seed-S``: the sub-run directory of seed ``S`` inside the run directory."""
    return f"seed-{int(seed)}"


def seed_config(cfg, seed: int):
    """The config of seed ``seed``'s sub-run: a copy of ``cfg`` with ``study.seed`` and
    ``training.seed`` set to ``seed`` and ``study.seeds`` emptied, so each sub-run is an ordinary
    one-seed run (its cache keys are those of a one-seed run with that seed).

    Args:
        cfg: an :class:`interp.config.Config` (not modified).
    """
    sub = copy.deepcopy(cfg)
    sub.study.seeds = []
    sub.study.seed = int(seed)
    sub.training.seed = int(seed)
    return sub


def _check_seeds(per_seed: Mapping[int, object], what: str) -> list[int]:
    if not per_seed:
        raise StudyError(f"{what}: no seed's table to aggregate")
    return sorted(per_seed)


def accuracy_over_seeds(per_seed: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """Accuracy across seeds, one row per cell (variant × query set × metric).

    Args:
        per_seed: ``{seed: accuracy table}``, each with the columns ``n, accuracy, ci_low,
            ci_high`` (:data:`ACC_VALUES`) and key columns (every other column: ``method, library,
            test_set, hop, metric``, and ``condition`` for the shared-template study). A cell may
            be missing from some seeds.

    Returns:
        The key columns, then ``n_seeds`` (seeds that have the cell), ``mean``, ``std`` (sample
        standard deviation, ddof = 1, across seeds; NaN with one seed), ``min``, ``max`` of the
        accuracy (a fraction), then per seed ``S``: ``accuracy_seed_S, ci_low_seed_S,
        ci_high_seed_S`` (that seed's Wilson 95% interval, as its table states it) and
        ``n_seed_S``. Rows keep the first seed's order.

    Raises:
        StudyError: no seeds, or tables whose key columns differ.
    """
    seeds = _check_seeds(per_seed, "accuracy_over_seeds")
    keys = [c for c in per_seed[seeds[0]].columns if c not in ACC_VALUES]
    frames = []
    for s in seeds:
        df = per_seed[s]
        other = [c for c in df.columns if c not in ACC_VALUES]
        if sorted(other) != sorted(keys) or not set(ACC_VALUES) <= set(df.columns):
            raise StudyError(f"seed {s}'s accuracy table has columns {list(df.columns)}; seed {seeds[0]}'s "
                             f"has {list(per_seed[seeds[0]].columns)}")
        frames.append(df[keys + list(ACC_VALUES)].assign(seed=s))
    long = pd.concat(frames, ignore_index=True)
    # NaN keys (a library-less variant) must still group: dropna=False
    g = long.groupby(keys, sort=False, dropna=False)["accuracy"]
    out = g.agg(n_seeds="count", mean="mean", std=lambda a: a.std(ddof=1), min="min", max="max").reset_index()
    for s in seeds:  # merge matches NaN keys with NaN keys, as groupby(dropna=False) grouped them
        own = {v: f"{v}_seed_{s}" for v in ("accuracy", "ci_low", "ci_high", "n")}
        out = out.merge(per_seed[s][keys + list(own)].rename(columns=own), on=keys, how="left")
    return out


def findings_over_seeds(per_seed: Mapping[int, list[dict[str, str]]]) -> pd.DataFrame:
    """Each finding, as evaluated on each seed.

    Args:
        per_seed: ``{seed: findings}``, each a list of ``{"claim", "verdict", "evidence"}`` as
            :func:`interp.study.findings.findings` returns (the report's findings of that seed).

    Returns:
        One row per claim × seed: ``claim, seed, verdict, evidence, agree``. A claim some seed
        does not state gets verdict ``"n/a"`` there. ``agree`` (the same on every row of a
        claim) is True iff every seed gives the claim the same verdict. Claims keep the order in
        which the seeds first state them.

    Raises:
        StudyError: no seeds.
    """
    seeds = _check_seeds(per_seed, "findings_over_seeds")
    claims = list(dict.fromkeys(f["claim"] for s in seeds for f in per_seed[s]))
    rows = []
    for claim in claims:
        got = {s: next((f for f in per_seed[s] if f["claim"] == claim), None) for s in seeds}
        verdicts = {s: (f["verdict"] if f else NOT_STATED) for s, f in got.items()}
        agree = len(set(verdicts.values())) == 1
        rows += [{"claim": claim, "seed": s, "verdict": verdicts[s],
                  "evidence": got[s]["evidence"] if got[s] else "", "agree": agree} for s in seeds]
    return pd.DataFrame(rows, columns=["claim", "seed", "verdict", "evidence", "agree"])


def merged_findings(table: pd.DataFrame) -> list[dict[str, str]]:
    """The report's findings over seeds from :func:`findings_over_seeds`'s table.

    Returns:
        Per claim ``{"claim", "verdict", "evidence"}``: the seeds' common verdict where they
        agree, else ``"disagree"`` (:data:`DISAGREE`; the report shows "seeds disagree");
        the evidence lists each seed's verdict and its own evidence (HTML).
    """
    out = []
    for claim, g in table.groupby("claim", sort=False):
        agree = bool(g["agree"].iloc[0])
        label = {"yes": "supported", "no": "not supported"}
        per = "".join(f"<li>seed {int(r.seed)}: <b>{html.escape(label.get(r.verdict, r.verdict))}</b>"
                      + (f" — {r.evidence}" if isinstance(r.evidence, str) and r.evidence else "") + "</li>"
                      for r in g.itertuples())
        head = (f"All {len(g)} seeds agree." if agree
                else f"Seeds disagree: {', '.join(f'{int(r.seed)} → {r.verdict}' for r in g.itertuples())}.")
        out.append({"claim": claim, "verdict": g["verdict"].iloc[0] if agree else DISAGREE,
                    "evidence": f"{head}<ul>{per}</ul>"})
    return out
