"""Routing's upper bound (the ``oracle`` variant), scored from the two experts' own scores."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd


def oracle_scores(ab: pd.DataFrame, bc: pd.DataFrame) -> pd.DataFrame:
    """Routing's upper bound from the two experts' per-query scores.

    hop1 → expert ab's row, hop2 / real_r2 → expert bc's, two-hop queries → per query the better
    of the two (correct if either expert is). Chained queries differ per variant (they embed the
    variant's own hop-1 answer) and are built by :func:`oracle_chain` instead.

    Raises:
        EvaluationError: the two tables were scored on different queries.
    """
    from interp.errors import EvaluationError

    key = ["hop", "prompt", "answer"]
    ab, bc = ab[ab["hop"] != "chain"], bc[bc["hop"] != "chain"]
    a = ab.set_index(key)
    b = bc.set_index(key).reindex(a.index)
    if b.isna().all(axis=1).any():
        raise EvaluationError("oracle_scores: the two experts were scored on different queries")
    out = a.copy()
    metric_cols = [c for c in a.columns if a[c].dtype == bool or c in ("first_token_correct", "exact_match")]
    for hop in a.index.get_level_values("hop").unique():
        sel = a.index.get_level_values("hop") == hop
        if hop in ("hop2", "real_r2"):
            out.loc[sel] = b.loc[sel]
        elif hop != "hop1":
            for c in metric_cols:
                out.loc[sel, c] = a.loc[sel, c].astype(bool) | b.loc[sel, c].astype(bool)
    return out.reset_index()


def oracle_chain(run: Any, hop1: list, ab: pd.DataFrame, second: str) -> pd.DataFrame:
    """Explicit chaining under oracle routing: expert ab's own greedy hop-1 answers, fed into the
    hop-2 prompts, answered by the variant ``second`` (expert bc)."""
    from interp.adapters.hooks import fold_static_update
    from interp.evaluate import score_examples
    from interp.tasks.two_hop import chaining_prompts

    if not hop1:
        return pd.DataFrame()
    preds = ab.loc[ab["hop"] == "hop1", "greedy_answer"].fillna("").astype(str).tolist()
    hm = run.load_variant(second)
    with fold_static_update(hm):
        df = score_examples(hm, chaining_prompts(hop1, preds), batch_size=run.cfg.evaluation.batch_size)
    run.release(hm)
    return df.assign(hop="chain")


def score_oracle(run: Any, sets: dict[str, list], inputs: Sequence[pd.DataFrame],
                 names: Sequence[str]) -> pd.DataFrame:
    """The oracle's score table from its inputs' (``names`` = the hop-1 expert's variant, then
    the hop-2 expert's; ``inputs`` their scores): :func:`oracle_scores` on every set but
    ``chain``, which :func:`oracle_chain` builds."""
    ab, bc = inputs
    oracle = oracle_scores(ab, bc)
    chain = oracle_chain(run, sets.get("hop1", []), ab, names[1])
    return pd.concat([oracle[oracle["hop"] != "chain"], chain], ignore_index=True)
