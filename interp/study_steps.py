"""The steps of :mod:`interp.study`, one function each: what is computed, and where it is written.

Each ``step_NAME(run)`` reads upstream results from the run directory and writes its own tables
(``DIR/results/*.csv``) atomically; long steps cache per unit in ``DIR/cache`` so a killed run
resumes without redoing finished units.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from interp.adapters.hooks import fold_static_update
from interp.models import atomic_write_text
from interp.study import console, csv_text


def _free(*objs: Any) -> None:
    del objs
    gc.collect()


# ----------------------------------------------------------------------------------------------
# world
# ----------------------------------------------------------------------------------------------


def step_world(run) -> None:
    """The synthetic world (chains, datasets, familiarity measured on the base model)."""
    from interp.tasks.two_hop import make_world

    w = run.cfg.world
    base = run.base() if w.verify_familiarity else None
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


# ----------------------------------------------------------------------------------------------
# experts
# ----------------------------------------------------------------------------------------------


def needed_experts(run) -> list[str]:
    from interp.study import VARIANTS

    names: list[str] = []
    for v in run.cfg.methods.variants + run.cfg.mechanisms.variants:
        for e in VARIANTS[v][1]:
            if e not in names:
                names.append(e)
    if "oracle" in run.cfg.methods.variants:
        names += [e for e in ("ab", "bc") if e not in names]
    if "ac" not in names:
        names.append("ac")  # the span-deficit oracle of the subspace step
    return names


def step_experts(run) -> None:
    """Train every expert the variants need (cached per expert; resumable mid-training)."""
    from interp.adapters.train import train_expert
    from interp.study import EXPERT_DATA

    t = run.cfg.training
    world = run.world()
    tc = t  # the [training] section is a TrainConfig
    rows = []
    for name in needed_experts(run):
        pairs = [p for split in EXPERT_DATA[name] for p in world.train_pairs(split)]
        run.base()  # make sure a registered model exists (and is converted) before training
        meta = train_expert(run.model, pairs, run.expert_dir(name), tc, progress=True, device=run.cfg.study.device)
        rows.append({"expert": name, "data": "+".join(EXPERT_DATA[name]), "n_examples": meta["n_examples"],
                     "steps": meta["steps"], "final_loss": meta["final_loss"],
                     "train_first_token_acc": meta["train_first_token_acc"],
                     "train_exact_match": meta["train_exact_match"], "wall_time_s": meta["wall_time_s"],
                     "steps_per_s": meta.get("steps_per_s")})
    run.write_csv(pd.DataFrame(rows), "experts")


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


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


def _score_variant(run, variant: str, world) -> pd.DataFrame:
    from interp.evaluate import greedy_answers, score_examples
    from interp.tasks.two_hop import chaining_prompts

    hm = run.load_variant(variant)
    bs = run.cfg.evaluation.batch_size
    frames = []
    sets = eval_sets(run, world)
    hop1 = sets.get("hop1", [])
    with fold_static_update(hm):  # merges and single experts at the base model's cost
        for hop, exs in tqdm(sets.items(), desc=f"evaluate {variant}", leave=False):
            df = score_examples(hm, exs, batch_size=bs)
            df["hop"] = hop
            frames.append(df)
        # explicit chaining: the variant's own greedy hop-1 answer fed into the hop-2 template
        if hop1:
            # decode steps read every weight for one token per row: wide batches amortise that
            preds = greedy_answers(hm, hop1, max_new_tokens=5, batch_size=max(bs, 256))
            chained = chaining_prompts(hop1, preds)
            df = score_examples(hm, chained, batch_size=bs)
            df["hop"] = "chain"
            frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    if hop1:
        out.loc[out["hop"] == "hop1", "greedy_answer"] = preds
    if hm is not run._base:
        _free(hm)
    return out


def _oracle_chain(run, world, ab: pd.DataFrame) -> pd.DataFrame:
    """Explicit chaining under oracle routing: expert ab's own hop-1 answers, fed into the hop-2
    prompts, answered by expert bc."""
    from interp.evaluate import score_examples
    from interp.tasks.two_hop import chaining_prompts

    hop1 = eval_sets(run, world).get("hop1", [])
    if not hop1:
        return pd.DataFrame()
    preds = ab.loc[ab["hop"] == "hop1", "greedy_answer"].fillna("").astype(str).tolist()
    hm = run.load_variant("expert_bc")
    with fold_static_update(hm):
        df = score_examples(hm, chaining_prompts(hop1, preds), batch_size=run.cfg.evaluation.batch_size)
    _free(hm)
    return df.assign(hop="chain")


def step_evaluate(run) -> None:
    """Score every variant on every query set; Wilson-interval accuracy table."""
    from interp.evaluate import accuracy_table
    from interp.study import VARIANTS

    world = run.world()
    variants = list(run.cfg.methods.variants)
    scored_dir = run.cache / "scores"
    needed = [v for v in variants if v != "oracle"]
    if "oracle" in variants:
        needed += [v for v in ("expert_ab", "expert_bc") if v not in needed]
    key = run.cfg.section_hash("study", "world", "training", "methods", "evaluation")
    frames: dict[str, pd.DataFrame] = {}
    for v in tqdm(needed, desc="variants"):
        path = scored_dir / f"{v}.{key}.csv"
        if path.is_file():
            frames[v] = pd.read_csv(path)
            continue
        df = _score_variant(run, v, world)
        atomic_write_text(path, csv_text(df))
        frames[v] = pd.read_csv(path)  # as a resumed run sees it: tables are byte-identical either way
    if "oracle" in variants:
        path = scored_dir / f"oracle.{key}.csv"
        if not path.is_file():
            oracle = oracle_scores(frames["expert_ab"], frames["expert_bc"])
            chain = _oracle_chain(run, world, frames["expert_ab"])
            oracle = pd.concat([oracle[oracle["hop"] != "chain"], chain], ignore_index=True)
            atomic_write_text(path, csv_text(oracle))
        frames["oracle"] = pd.read_csv(path)
    rows = []
    for v in variants:
        df = frames[v].copy()
        df["method"] = v
        df["library"] = VARIANTS[v][0]
        rows.append(df)
    scored = pd.concat(rows, ignore_index=True)
    scored["test_set"] = scored["tier"]
    run.write_csv(scored, "scores")
    run.write_csv(accuracy_table(scored), "accuracy")


def oracle_scores(ab: pd.DataFrame, bc: pd.DataFrame) -> pd.DataFrame:
    """Routing's upper bound from the two experts' per-query scores.

    hop1 → expert ab's row, hop2 / real_r2 → expert bc's, two-hop queries → per query the better
    of the two (correct if either expert is). Chained queries differ per variant (they embed the
    variant's own hop-1 answer) and are built by :func:`_oracle_chain` instead.
    """
    key = ["hop", "prompt", "answer"]
    ab, bc = ab[ab["hop"] != "chain"], bc[bc["hop"] != "chain"]
    a = ab.set_index(key)
    b = bc.set_index(key).reindex(a.index)
    if b.isna().all(axis=1).any():
        raise ValueError("oracle_scores: the two experts were scored on different queries")
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


# ----------------------------------------------------------------------------------------------
# mechanisms
# ----------------------------------------------------------------------------------------------


def mechanism_examples(run, world) -> list:
    """Two-hop test queries (template 0) per tier, the first ``n_examples`` of each tier."""
    n = run.cfg.mechanisms.n_examples
    out = []
    for tier in run.cfg.world.tiers:
        exs = [e for e in world.get(split="test", kind="two_hop") if e.tier == tier and e.template_id == 0]
        out += exs[:n]
    return out


def step_mechanisms(run) -> None:
    """Logit lens / EntRec, Patchscopes, activation patching, back-patching, probes per variant."""
    world = run.world()
    m = run.cfg.mechanisms
    exs = mechanism_examples(run, world)
    cache = run.cache / "mechanisms"
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in
                                             ("lens", "patching", "backpatch", "probes", "patchscope", "knockout")}
    for v in tqdm(m.variants, desc="mechanisms"):
        key = _mechanism_key(run, v)
        done = cache / f"{v}.{key}.json"
        if done.is_file():
            for name in json.loads(done.read_text()):
                tables[name].append(pd.read_csv(cache / f"{v}.{name}.{key}.csv"))
            continue
        hm = run.load_variant(v)
        # every analysis here reads the residual stream, none an adapter's own hook: a static
        # update (merges, single experts) is folded into the weights and runs at base cost
        with fold_static_update(hm):
            parts = _mechanism_parts(run, v, hm, exs, world)
        for name, df in parts.items():
            df = df.copy()
            df.insert(0, "method", v)
            atomic_write_text(cache / f"{v}.{name}.{key}.csv", csv_text(df))
            tables[name].append(pd.read_csv(cache / f"{v}.{name}.{key}.csv"))  # same as on resume
        atomic_write_text(done, json.dumps(sorted(parts)))
        if hm is not run._base:
            _free(hm)
    for name, dfs in tables.items():
        if dfs:
            run.write_csv(pd.concat(dfs, ignore_index=True), name)


def _mechanism_parts(run, v: str, hm, exs: list, world) -> dict[str, pd.DataFrame]:
    """The mechanism tables of one variant (lens, Patchscopes, patching, back-patching, knockout,
    probes), as configured in ``[mechanisms]``."""
    from interp.mechanisms import lens, patching

    m = run.cfg.mechanisms
    parts: dict[str, pd.DataFrame] = {}
    parts["lens"] = lens.entrec(hm, exs)
    if m.patchscope:
        from interp.mechanisms.patchscope import patchscope

        few = exs[: max(4, m.n_examples // 2)]
        parts["patchscope"] = pd.concat(
            [patchscope(hm, few, source_position="final", target=t, progress=False)
             for t in ("identity", "description")], ignore_index=True)
    if v in m.patching_variants and m.n_patching_pairs > 0:
        pool = [e for e in world.get(split="test", kind="two_hop") if e.template_id == 0]
        try:  # donors need the same tier, template and token length: search the whole test set
            pairs = patching.make_corrupted_pairs(pool, hm, seed=run.cfg.study.seed)
        except ValueError as err:
            console.print(f"[yellow]{v}: no clean/corrupted pairs ({err}); patching skipped[/yellow]")
            pairs = []
        pairs = _spread_pairs(pairs, m.n_patching_pairs, run.cfg.world.tiers)
        if pairs:
            parts["patching"] = label_positions(
                patching.activation_patching(hm, pairs, hooks=("resid_pre",)), pairs, hm)
        if m.backpatch:
            parts["backpatch"] = patching.back_patching(hm, exs[: max(4, m.n_examples // 2)])
        parts["knockout"] = patching.attention_knockout(hm, exs[: max(4, m.n_examples // 2)], window=3)
    if m.probes and v in m.patching_variants:
        from interp.mechanisms.probes import probe_bridge_entity

        # Tiers H and R, where several chains share a real bridge city, so a probe for e₂ must
        # generalise across e₁ (in F every e₂ belongs to one e₁); every template, for CV folds.
        probe_exs = [e for e in world.get(split="test", kind="two_hop") if e.tier in ("H", "R")]
        probe_exs = probe_exs or world.get(split="test", kind="two_hop")
        layers = sorted(set(range(0, hm.n_layers, m.probe_layer_stride)) | {hm.n_layers - 1})
        try:
            parts["probes"] = probe_bridge_entity(hm, probe_exs, layers=layers, n_splits=3,
                                                  seed=run.cfg.study.seed, progress=False,
                                                  estimator=m.probe_estimator)
        except ValueError as err:
            console.print(f"[yellow]{v}: probes skipped ({err})[/yellow]")
    return parts


def label_positions(df: pd.DataFrame, pairs: list, hm) -> pd.DataFrame:
    """Add ``token`` (the clean prompt's token) and ``display_position``, a label that aligns
    prompts whose entity names differ in length: ``e1-k`` / ``e1+k`` count tokens before / after
    the e₁ mention, e₁'s own tokens and ``final`` keep their names; ``order`` sorts them."""
    info = {}
    for p in pairs:
        ids = hm.encode(p.clean_prompt)
        a, b = p.spans.get("e1", (0, 0))
        info[p.example_id] = (ids, a, b)
    tokens, labels, order = [], [], []
    for ex, pos, lab in zip(df["example_id"], df["position"], df["position_label"]):
        ids, a, b = info[ex]
        tok = hm.tokenizer.decode([ids[pos]]) if pos < len(ids) else ""
        tokens.append(tok)
        if lab == "final":
            labels.append("final"); order.append(1e6)
        elif lab.startswith("e1"):
            labels.append(lab); order.append(pos - a + (500 if lab == "e1_last" else 0))
        elif pos < a:
            labels.append(f"e1-{a - pos}{tok!r}"); order.append(-(a - pos) - 1000)
        else:
            labels.append(f"e1+{pos - b + 1}{tok!r}"); order.append(1000 + pos - b)
    return df.assign(token=tokens, display_position=labels, position_order=order)


def _mechanism_key(run, variant: str) -> str:
    """Cache key of one variant's mechanism tables: everything that changes them, and nothing
    else (adding a variant to the lists does not invalidate the others)."""
    import hashlib

    mech = dict(run.cfg.to_dict()["mechanisms"])
    mech["patching"] = variant in mech.pop("patching_variants")
    mech.pop("variants")
    blob = json.dumps({"up": run.cfg.section_hash("study", "world", "training", "methods"), "mech": mech},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _spread_pairs(pairs: list, n_per_tier: int, tiers: list[str]) -> list:
    out = []
    for tier in tiers:
        out += [p for p in pairs if getattr(p, "tier", None) == tier][:n_per_tier]
    return out or pairs[:n_per_tier]


# ----------------------------------------------------------------------------------------------
# subspace
# ----------------------------------------------------------------------------------------------


def step_subspace(run) -> None:
    """ΔW geometry of experts and merges against the theory's bounds."""
    from interp import subspace as S
    from interp.adapters import merge as M
    from interp.adapters.factors import read_adapter

    experts = {e: read_adapter(run.expert_dir(e)) for e in needed_experts(run)}
    lib = {e: experts[e] for e in ("ab", "bc") if e in experts}
    deltas: dict[str, dict] = {f"expert_{k}" if k in ("ab", "bc", "ac") else k: v for k, v in experts.items()}
    merges: dict[str, dict] = {}
    if len(lib) == 2:
        pair = [lib["ab"], lib["bc"]]
        merges["uniform"] = M.weighted_average(pair, [0.5, 0.5])
        merges["task_arithmetic"] = M.task_arithmetic(pair, run.cfg.methods.task_arithmetic_lambda)
        merges["ties"] = M.ties(pair, run.cfg.methods.ties_density, [1.0, 1.0])
        if "peft_linear" in run.cfg.methods.variants:
            hm = run.load_variant("peft_linear")
            merges["peft_linear"] = hm.info["deltas"]
            _free(hm)
    base_hf = run.base().hf_model
    all_deltas = {**deltas, **merges}
    run.write_csv(S.adapter_table(all_deltas, base_hf=base_hf), "subspace_adapters")
    run.write_csv(S.spectra_table(all_deltas), "subspace_spectra")
    names = list(deltas)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    run.write_csv(S.overlap_table(deltas, pairs=pairs), "subspace_overlap")
    if merges and lib:
        ex = {f"expert_{k}": v for k, v in lib.items()}
        lam = run.cfg.methods.task_arithmetic_lambda
        # cross terms are measured against each merge's own target: λ·Σ ΔWᵢ for task arithmetic,
        # the 1/n average for the others
        run.write_csv(pd.concat([S.merge_table({k: v}, ex, weights={n: lam for n in ex} if k == "task_arithmetic" else None)
                                 for k, v in merges.items()], ignore_index=True), "subspace_merges")
    if "ac" in experts and lib:
        sd = [S.span_deficit_table(experts["ac"], {f"expert_{k}": v for k, v in lib.items()}).assign(oracle="expert_ac")]
        if "joint_all" in experts:
            sd.append(S.span_deficit_table(experts["joint_all"], {f"expert_{k}": v for k, v in lib.items()})
                      .assign(oracle="joint_all"))
        run.write_csv(pd.concat(sd, ignore_index=True), "subspace_span_deficit")
    bridge_layer = _bridge_layer(run)
    energy = S.layer_energy_table({**deltas, **merges}, n_layers=run.base().n_layers, bridge_layer=bridge_layer)
    run.write_csv(energy.assign(bridge_layer=bridge_layer), "subspace_layer_energy")
    if "bc" in experts:
        world = run.world()
        composed = [e.prompt for e in world.get(split="test", kind="two_hop") if e.template_id == 0]
        native = [p for p, _ in world.train_pairs("d2")]
        hm = run.base()
        run.write_csv(S.key_overlap_table(hm, experts["bc"], composed[:64], native[:64]), "subspace_key_overlap")


def _bridge_layer(run) -> int | None:
    """ℓ*: the block after which the bridge entity e₂ is best decodable (highest mean EntRec of e₂
    at the final position) in the Uniform merge (else the first mechanism variant); ``None``
    without a lens table."""
    p = run.results / "lens.csv"
    if not p.is_file():
        return None
    df = pd.read_csv(p)
    d = df[(df["target"] == "e2") & (df["position"] == "final")]
    if d.empty:
        return None
    method = "uniform" if "uniform" in set(d["method"]) else d["method"].iloc[0]
    prof = d[d["method"] == method].groupby("layer")["logprob"].mean()
    # lens layer ℓ reads resid_pre of block ℓ (ℓ = n_layers: the final residual), i.e. the state
    # after blocks 0..ℓ-1: the bridge is computed by block ℓ-1, and late mass counts blocks ≥ ℓ.
    return int(min(max(int(prof.idxmax()) - 1, -1), run.base().n_layers - 1))


# ----------------------------------------------------------------------------------------------
# figures and report
# ----------------------------------------------------------------------------------------------


def step_figures(run) -> None:
    from interp.study_figures import build_figures

    build_figures(run)


def step_report(run) -> None:
    from interp.study_figures import build_run_report

    build_run_report(run)
