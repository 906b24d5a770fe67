"""Step ``experts``: train every expert the configured variants need (cached per expert)."""

from __future__ import annotations

import pandas as pd

from interp.study.variants import EXPERT_DATA, needed_experts


def run(run) -> None:
    """Train (or reuse) each expert of :func:`needed_experts`; write the ``experts`` table.
    Training itself resumes mid-way (``train_expert`` checkpoints). Sharded: in a distributed
    run each rank trains its experts (one directory each) on its own device, and rank 0 then
    reads every expert's metadata back (``train_expert`` returns a finished expert's as is)."""
    import torch

    from interp.adapters.train import train_expert

    tc = run.cfg.training  # the [training] section is a TrainConfig (precision resolved by the runner)
    world = run.world()
    names = needed_experts(run.cfg)

    def train(name: str) -> dict:
        pairs = [p for split in EXPERT_DATA[name] for p in world.train_pairs(split)]
        run.base(torch.float32)  # make sure a registered model exists (and is converted) before training
        # seeds from the config and the expert's name: its weights do not depend on which rank trains it
        return train_expert(run.model, pairs, run.expert_dir(name), tc, progress=True, device=run.device,
                            expert=name)

    def timed(name: str) -> dict:
        with run.stage(name, "train"):  # load, steps, training accuracy, save (a cached expert: a read)
            return train(name)

    # cost: training examples (steps scale with them at a fixed number of epochs)
    n_pairs = {n: sum(len(world.train_pairs(s)) for s in EXPERT_DATA[n]) for n in names}
    metas = {name: timed(name) for name in run.dist.shard(names, cost=n_pairs.get)}
    run.dist.barrier()
    if not run.dist.is_main:
        return
    rows = []
    for name in names:
        meta = metas[name] if name in metas else train(name)
        rows.append({"expert": name, "data": "+".join(EXPERT_DATA[name]), "n_examples": meta["n_examples"],
                     "init_seed": meta["init_seed"], "steps": meta["steps"], "final_loss": meta["final_loss"],
                     "train_first_token_acc": meta["train_first_token_acc"],
                     "train_exact_match": meta["train_exact_match"], "wall_time_s": meta["wall_time_s"],
                     "steps_per_s": meta.get("steps_per_s")})
    run.write_csv(pd.DataFrame(rows), "experts")
