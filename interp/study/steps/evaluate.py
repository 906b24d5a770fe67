"""Step ``evaluate``: every variant answers every query set; Wilson-interval accuracy table."""

from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from interp.adapters.hooks import fold_static_update
from interp.study.runner import cached_csv
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


def run(run) -> None:
    """Write ``scores`` (one row per variant × query) and ``accuracy``; per-variant scores are
    cached in ``DIR/cache/scores`` (a derived variant, the oracle, from its inputs' scores).
    Sharded by variant: in a distributed run each rank scores its variants into their cache
    files, and rank 0 derives the oracle and writes the tables from those files."""
    from interp.evaluate import accuracy_table

    world = run.world()
    # a task's world may bring its own query sets (math skills: composed, skill_a, skill_b)
    sets = world.eval_sets(run.cfg) if hasattr(world, "eval_sets") else eval_sets(run, world)
    variants = list(run.cfg.methods.variants)
    scored_dir = run.cache / "scores"
    key = run.cfg.section_hash("study", "world", "training", "methods", "evaluation")
    scored = evaluated_inputs(variants)
    frames: dict[str, pd.DataFrame] = {}
    for v in tqdm(run.dist.shard(scored), desc="variants"):
        frames[v] = cached_csv(scored_dir / f"{v}.{key}.csv", lambda v=v: score_variant(run, v, sets))
    run.dist.barrier()
    if not run.dist.is_main:
        return
    for v in scored:
        if v not in frames:  # another rank's: read back from its cache file, as cached_csv does
            frames[v] = pd.read_csv(scored_dir / f"{v}.{key}.csv")
    for v in variants:
        spec = VARIANTS[v]
        if spec.derive is not None:
            frames[v] = cached_csv(scored_dir / f"{v}.{key}.csv", lambda spec=spec: spec.derive(
                run, sets, [frames[u] for u in spec.scored_from], spec.scored_from))
    rows = [frames[v].assign(method=v, library=VARIANTS[v].library) for v in variants]
    scored = pd.concat(rows, ignore_index=True)
    scored["test_set"] = scored["tier"]
    run.write_csv(scored, "scores")
    run.write_csv(accuracy_table(scored), "accuracy")
