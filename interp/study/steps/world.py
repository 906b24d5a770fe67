"""Step ``world``: the synthetic world (chains, datasets, familiarity measured on the base model)."""

from __future__ import annotations


def run(run) -> None:
    """Write ``world.json``, ``dataset_summary``, ``familiarity`` (and ``familiarity_names``)."""
    from interp.tasks.two_hop import make_world

    import torch

    w = run.cfg.world
    # familiarity is measured in float32 whatever evaluation.dtype says (the world's cache key
    # does not depend on it)
    base = run.base(torch.float32) if w.verify_familiarity else None
    # Without verification (random-init models) names are not checked against a tokenizer:
    # first-answer-token uniqueness is then not enforced (tiny tokenizers have few first tokens).
    world = make_world(seed=w.seed, n_chains_per_tier=w.n_chains_per_tier, base=base,
                       n_dac_chains_per_tier=w.n_ac_chains_per_tier)
    keep = set(w.tiers)
    world.examples = [e for e in world.examples if e.tier in keep]
    world.chains = world.chains[world.chains["tier"].isin(keep)].reset_index(drop=True)
    world.to_json(run.out / "world.json")
    run.write_csv(world.summary(), "dataset_summary")
    run.write_csv(world.familiarity_summary(), "familiarity")
    if len(world.familiarity):
        run.write_csv(world.familiarity, "familiarity_names")
