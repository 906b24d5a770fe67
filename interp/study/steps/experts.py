"""Step ``experts``: train every expert the configured variants need (cached per expert)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from interp.files import atomic_write_text, verify_manifest
from interp.study.variants import EXPERT_DATA, needed_experts


def retrained_meta(out: Path, tc) -> dict | None:
    """The metadata of an expert in ``out`` that was trained again under the floor (complete,
    manifest verified): continued from its first attempt with ``tc`` (a warm restart, the current
    rule) or, in runs made before that, retrained from its init with ``tc.longer()``. Carries
    ``retrained``, ``first_attempt_acc`` and, for a continued expert, ``steps`` and
    ``wall_time_s`` of both trainings together; else ``None``."""
    from interp.adapters.train import META

    first = out.parent / f"{out.name}.first_attempt.json"
    if not (first.is_file() and (out / META).is_file() and verify_manifest(out)[0]):
        return None
    meta = json.loads((out / META).read_text())
    attempt = json.loads(first.read_text())
    continued = meta.get("config_identity") == tc.identity() and meta.get("start_from") is not None
    if not continued and meta.get("config_identity") != tc.longer().identity():
        return None
    if continued:
        meta = {**meta, "steps": meta["steps"] + attempt["steps"],
                "wall_time_s": meta["wall_time_s"] + attempt.get("wall_time_s", 0.0)}
    return {**meta, "retrained": True, "first_attempt_acc": attempt["train_first_token_acc"]}


def finished(run, name: str, tc) -> bool:
    """Expert ``name`` is trained for good: complete in its directory, and over the floor or
    already trained again under it (one still in training, or being trained on, is not)."""
    from interp.adapters.train import META

    out = run.expert_dir(name)
    if not ((out / META).is_file() and verify_manifest(out)[0]):
        return False
    acc = json.loads((out / META).read_text()).get("train_first_token_acc", 0.0)
    return acc >= tc.min_accuracy or retrained_meta(out, tc) is not None


def score_while_waiting(run, names: list[str], tc) -> list[str]:
    """In a distributed run, a rank whose queue of experts ran dry while another still trains
    scores, for the evaluate step, the variants whose experts are all trained (the base model
    first: it needs none), cheapest first, until every expert is trained. The scores go to the
    evaluate step's cache files (the same key and computation; that step's queue then hands
    out only the rest), so the wait at the end of this step is spent on work of the next one.
    Returns the variants it scored."""
    from interp.devices import analysis_precision
    from interp.study.steps import evaluate
    from interp.study.variants import VARIANTS, evaluated_inputs

    done: list[str] = []
    if not any(not finished(run, n, tc) for n in names):
        return done
    world = run.world()
    sets = evaluate.query_sets(run, world)
    todo = sorted(evaluated_inputs(list(run.cfg.methods.variants)), key=lambda v: evaluate.scoring_cost(run, v))
    for v in todo:
        pending = [n for n in names if not finished(run, n, tc)]
        if not pending:
            break
        if evaluate.scoring_cost(run, v) == 0 or set(VARIANTS[v].experts) & set(pending):
            continue  # cached, or waiting for an expert still in training
        # as the evaluate step runs it: in the analysis precision (evaluation.dtype)
        with run.stage(v, "score_while_waiting"), analysis_precision(run.analysis_dtype, run.device):
            evaluate.score_cached(run, v, sets)
        done.append(v)
    return done


def run(run) -> None:
    """Train (or reuse) each expert of :func:`needed_experts`; write the ``experts`` table.
    Training itself resumes mid-way (``train_expert`` checkpoints). Sharded: in a distributed
    run the ranks take experts from a queue (:meth:`World.claim`), each training its experts (one
    directory each) on its own device, and rank 0 then reads every expert's metadata back
    (``train_expert`` returns a finished expert's as is)."""
    import torch

    from interp.adapters.train import train_expert

    tc = run.cfg.training  # the [training] section is a TrainConfig (precision resolved by the runner)
    world = run.world()
    names = needed_experts(run.cfg)

    def train(name: str) -> dict:
        pairs = [p for split in EXPERT_DATA[name] for p in world.train_pairs(split)]
        run.base(torch.float32)  # make sure a registered model exists (and is converted) before training
        out = run.expert_dir(name)
        # an expert retrained under the floor already sits in its directory: keep it (a resumed run
        # must not train the first attempt again and overwrite it)
        done = retrained_meta(out, tc) if tc.min_accuracy else None
        if done is not None:
            return done
        # seeds from the config and the expert's name: its weights do not depend on which rank trains it
        meta = train_expert(run.model, pairs, out, tc, progress=True, device=run.device, expert=name)
        if meta["train_first_token_acc"] >= tc.min_accuracy:
            return {**meta, "retrained": False, "first_attempt_acc": meta["train_first_token_acc"]}
        print(f"expert {name}: {meta['train_first_token_acc']:.1%} on its own facts, below the floor "
              f"min_accuracy = {tc.min_accuracy:.0%}: trained {tc.epochs} epochs more from where it stands")
        first = {k: meta[k] for k in ("steps", "train_first_token_acc", "wall_time_s")}
        atomic_write_text(out.parent / f"{name}.first_attempt.json", json.dumps(first))
        # a warm restart from the first attempt: twice the epochs in all, at the cost of one more run
        # of the recipe (retraining from the init with twice the epochs cost two)
        train_expert(run.model, pairs, out, tc, progress=True, device=run.device, expert=name, start_from=out)
        return retrained_meta(out, tc)

    def timed(name: str) -> dict:
        with run.stage(name, "train"):  # load, steps, training accuracy, save (a cached expert: a read)
            return train(name)

    # a work queue, longest first (cost: the first attempt's optimiser steps; a small set still
    # gets min_steps): an expert trained again under the floor is known to cost twice only then
    steps = {n: tc.total_steps(sum(len(world.train_pairs(s)) for s in EXPERT_DATA[n])) for n in names}
    metas = {name: timed(name) for name in run.dist.claim(names, steps.get, run.out / "cache" / "claims")}
    if run.dist.size > 1:
        score_while_waiting(run, names, tc)
    run.dist.barrier()
    run.dist.release_claims()
    if not run.dist.is_main:
        return
    rows = []
    for name in names:
        meta = metas[name] if name in metas else train(name)
        rows.append({"expert": name, "data": "+".join(EXPERT_DATA[name]), "n_examples": meta["n_examples"],
                     "init_seed": meta["init_seed"], "steps": meta["steps"], "final_loss": meta["final_loss"],
                     "train_first_token_acc": meta["train_first_token_acc"],
                     "train_exact_match": meta["train_exact_match"], "wall_time_s": meta["wall_time_s"],
                     "steps_per_s": meta.get("steps_per_s"), "retrained": meta.get("retrained", False),
                     "first_attempt_acc": meta.get("first_attempt_acc", meta["train_first_token_acc"])})
    run.write_csv(pd.DataFrame(rows), "experts")
