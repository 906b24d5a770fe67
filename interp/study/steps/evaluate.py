"""Step ``evaluate``: every variant answers every query set; Wilson-interval accuracy table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from interp.adapters.hooks import fold_static_update
from interp.files import is_checked
from interp.study.runner import cached_csv, read_cached_csv
from interp.study.variants import VARIANTS, evaluated_inputs


def eval_sets(run, world) -> dict[str, list]:
    """The query sets every variant answers: hop name -> examples.

    ``two_hop`` uses the training templates' first template and, with held-out templates on,
    the first held-out one (``two_hop_heldout``); one-hop sets use template 0. Keeping one or two
    templates per query bounds the CPU cost (every variant answers every set).
    """
    sets: dict[str, list] = {}
    test = world.get(split="test", kind="two_hop")
    sets["two_hop"] = [e for e in test if e.template_id == 0]
    if run.cfg.evaluation.held_out_templates:
        held = [e for e in test if e.held_out_template]
        first_held = min((e.template_id for e in held), default=None)
        sets["two_hop_heldout"] = [e for e in held if e.template_id == first_held]
    ev = world.get(split="eval")
    sets["hop1"] = [e for e in ev if e.kind == "hop1" and e.template_id == 0]
    seen: set = set()
    sets["hop2"] = []
    for e in ev:  # H and R share real cities between chains: ask each (tier, e2) fact once
        if e.kind == "hop2" and e.template_id == 0 and (e.tier, e.e2) not in seen:
            seen.add((e.tier, e.e2))
            sets["hop2"].append(e)
    retain = [e for e in world.examples if e.split == "retain" and e.template_id == 0]
    if retain:
        sets["real_r2"] = retain
    return {k: v for k, v in sets.items() if v}


def score_variant(run, variant: str, sets: dict[str, list]) -> pd.DataFrame:
    """One variant's scores on every set, plus explicit chaining (its own greedy hop-1 answer
    fed into the hop-2 template, ``hop = "chain"``)."""
    from interp.evaluate import greedy_answers, score_examples

    with run.stage(variant, "load"):
        hm = run.load_variant(variant)
    if VARIANTS[variant].merge_deltas is not None and hm.info.get("deltas") is not None:
        from interp.study.merge_cache import save_merge

        save_merge(run, variant, hm.info["deltas"])  # the subspace step reads it back (a TIES merge: ~40 s)
    bs = run.cfg.evaluation.batch_size
    frames = []
    hop1 = sets.get("hop1", [])
    with fold_static_update(hm):  # merges and single experts at the base model's cost
        with run.stage(variant, "score"):
            for hop, exs in tqdm(sets.items(), desc=f"evaluate {variant}", leave=False):
                df = score_examples(hm, exs, batch_size=bs)
                df["hop"] = hop
                frames.append(df)
        if hop1:
            from interp.tasks.two_hop import chaining_prompts

            with run.stage(variant, "chain"):
                # decode steps read every weight for one token per row: wide batches amortise that
                preds = greedy_answers(hm, hop1, max_new_tokens=5, batch_size=max(bs, 256))
                df = score_examples(hm, chaining_prompts(hop1, preds), batch_size=bs)
            df["hop"] = "chain"
            frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    if hop1:
        out.loc[out["hop"] == "hop1", "greedy_answer"] = preds
    run.release(hm)
    return out


def query_sets(run, world) -> dict[str, list]:
    """The query sets of this run's task: :func:`eval_sets`, or the world's own (math skills:
    composed, skill_a, skill_b)."""
    return world.eval_sets(run.cfg) if hasattr(world, "eval_sets") else eval_sets(run, world)


def scores_path(run, variant: str) -> Path:
    """The cache file of ``variant``'s scores under this run's config."""
    key = run.cfg.section_hash("study", "world", "training", "methods", "evaluation")
    return run.cache / "scores" / f"{variant}.{key}.csv"


def scoring_cost(run, variant: str) -> float:
    """Relative cost of scoring ``variant`` (the work queue hands out the dearest first): 0 when
    cached; a TIES/DARE/SVD merge ~2 (its dense merge), a router ~1.4 (per-token routing), else 1
    (the demo's stages: 122 s, 89-93 s and 62-73 s)."""
    if is_checked(scores_path(run, variant)):
        return 0.0
    combine = VARIANTS[variant].combine
    return 2.0 if combine in ("ties", "dare", "svd") else 1.4 if combine in ("arrow", "mixture") else 1.0


def score_cached(run, variant: str, sets: dict[str, list]) -> pd.DataFrame:
    """``variant``'s scores, from its cache file or computed (:func:`score_variant`) and cached."""
    return cached_csv(scores_path(run, variant), lambda: score_variant(run, variant, sets))


def run(run) -> None:
    """Write ``scores`` (one row per variant × query) and ``accuracy``; per-variant scores are
    cached in ``DIR/cache/scores`` (a derived variant, the oracle, from its inputs' scores).
    Sharded by variant: in a distributed run the ranks take variants from a queue
    (:meth:`World.claim`, dearest first; cached ones, e.g. those a rank scored while the
    experts step waited on another, cost nothing) and score them into their cache files, and
    rank 0 derives the oracle and writes the tables from those files."""
    from interp.evaluate import accuracy_table

    world = run.world()
    sets = query_sets(run, world)
    variants = list(run.cfg.methods.variants)
    scored = evaluated_inputs(variants)
    costs = {v: scoring_cost(run, v) for v in scored}  # before any rank writes: every rank's the same
    frames: dict[str, pd.DataFrame] = {}
    for v in tqdm(run.dist.claim(scored, costs.get, run.cache / "claims"), desc="variants"):
        frames[v] = score_cached(run, v, sets)
    run.dist.barrier()
    run.dist.release_claims()
    if not run.dist.is_main:
        return
    for v in scored:
        if v not in frames:  # another rank's: read back from its cache file, as cached_csv does
            frames[v] = read_cached_csv(scores_path(run, v))
    for v in variants:
        spec = VARIANTS[v]
        if spec.derive is not None:
            frames[v] = cached_csv(scores_path(run, v), lambda spec=spec: spec.derive(
                run, sets, [frames[u] for u in spec.scored_from], spec.scored_from))
    rows = [frames[v].assign(method=v, library=VARIANTS[v].library) for v in variants]
    scored = pd.concat(rows, ignore_index=True)
    scored["test_set"] = scored["tier"]
    run.write_csv(scored, "scores")
    run.write_csv(accuracy_table(scored), "accuracy")
