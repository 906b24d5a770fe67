"""Step ``mechanisms``: logit lens / EntRec, Patchscopes, activation patching, back-patching,
attention knockout and probes, per variant (cached per variant)."""

from __future__ import annotations


import pandas as pd
from tqdm.auto import tqdm

from interp.adapters.hooks import fold_static_update
from interp.errors import MechanismError
from interp.study.runner import console, read_unit_tables, unit_key, write_unit_tables

TABLES = ("lens", "patching", "backpatch", "probes", "patchscope", "knockout")
PATCHING_COST = 4  # relative work of a patching variant's unit over a lens-only one, for sharding


def mechanism_examples(run, world) -> list:
    """Two-hop test queries (template 0) per tier, the first ``n_examples`` of each tier."""
    n = run.cfg.mechanisms.n_examples
    out = []
    for tier in run.cfg.world.tiers:
        exs = [e for e in world.get(split="test", kind="two_hop") if e.tier == tier and e.template_id == 0]
        out += exs[:n]
    return out


def run(run) -> None:
    """Write the mechanism tables of every ``mechanisms.variants`` entry (``method`` column first).
    Sharded by variant: in a distributed run each rank runs the analyses of its variants into
    their cache files, and rank 0 writes the tables from those files."""
    world = run.world()
    m = run.cfg.mechanisms
    exs = mechanism_examples(run, world)
    cache = run.cache / "mechanisms"
    # a patching variant sweeps layers × positions × pairs besides the lens: weigh it heavier
    # (PATCHING_COST), so two of them do not land on one rank while another rank idles
    cost = lambda v: 1 + PATCHING_COST * (v in m.patching_variants)  # noqa: E731
    for v in tqdm(run.dist.shard(m.variants, cost=cost), desc="mechanisms"):
        key = mechanism_key(run, v)
        if read_unit_tables(cache, v, key) is None:
            with run.stage(v, "load"):
                hm = run.load_variant(v)
            # every analysis here reads the residual stream, none an adapter's own hook: a static
            # update (merges, single experts) is folded into the weights and runs at base cost
            with fold_static_update(hm):
                write_unit_tables(cache, v, key, mechanism_parts(run, v, hm, exs, world))
            run.release(hm)
    run.dist.barrier()
    if not run.dist.is_main:
        return
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in TABLES}
    for v in m.variants:
        for name, df in read_unit_tables(cache, v, mechanism_key(run, v)).items():
            tables[name].append(df)
    for name, dfs in tables.items():
        if dfs:
            run.write_csv(pd.concat(dfs, ignore_index=True), name)


def mechanism_parts(run, v: str, hm, exs: list, world) -> dict[str, pd.DataFrame]:
    """The mechanism tables of one variant (lens, Patchscopes, patching, back-patching, knockout,
    probes), as configured in ``[mechanisms]``."""
    from interp.mechanisms import lens, patching

    m = run.cfg.mechanisms
    parts: dict[str, pd.DataFrame] = {}
    with run.stage(v, "lens"):
        parts["lens"] = lens.entrec(hm, exs)
    few = exs[: max(4, m.n_examples // 2)]
    if m.patchscope:
        from interp.mechanisms.patchscope import patchscope

        with run.stage(v, "patchscope"):
            parts["patchscope"] = pd.concat(
                [patchscope(hm, few, source_position="final", target=t, progress=False)
                 for t in ("identity", "description")], ignore_index=True)
    if v in m.patching_variants and m.n_patching_pairs > 0:
        pool = [e for e in world.get(split="test", kind="two_hop") if e.template_id == 0]
        with run.stage(v, "patching"):
            try:  # donors need the same tier, template and token length: search the whole test set
                pairs = patching.make_corrupted_pairs(pool, hm, seed=run.cfg.study.seed)
            except MechanismError as err:
                console.print(f"[yellow]{v}: no clean/corrupted pairs ({err}); patching skipped[/yellow]")
                pairs = []
            pairs = spread_pairs(pairs, m.n_patching_pairs, run.cfg.world.tiers)
            if pairs:
                parts["patching"] = label_positions(
                    patching.activation_patching(hm, pairs, hooks=("resid_pre",)), pairs, hm)
        if m.backpatch:
            with run.stage(v, "backpatch"):
                parts["backpatch"] = patching.back_patching(hm, few)
        with run.stage(v, "knockout"):
            parts["knockout"] = patching.attention_knockout(hm, few, window=3)
    if m.probes and v in m.patching_variants:
        from interp.mechanisms.probes import probe_bridge_entity

        # Tiers H and R, where several chains share a real bridge city, so a probe for e₂ must
        # generalise across e₁ (in F every e₂ belongs to one e₁); every template, for CV folds.
        probe_exs = [e for e in world.get(split="test", kind="two_hop") if e.tier in ("H", "R")]
        probe_exs = probe_exs or world.get(split="test", kind="two_hop")
        layers = sorted(set(range(0, hm.n_layers, m.probe_layer_stride)) | {hm.n_layers - 1})
        try:
            with run.stage(v, "probes"):
                parts["probes"] = probe_bridge_entity(hm, probe_exs, layers=layers, n_splits=3,
                                                      seed=run.cfg.study.seed, progress=False,
                                                      estimator=m.probe_estimator)
        except ValueError as err:  # ours (ProbeError) or scikit-learn's (e.g. a fold of one class)
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


def mechanism_key(run, variant: str) -> str:
    """Cache key of one variant's mechanism tables: everything that changes them, and nothing
    else (adding a variant to the lists does not invalidate the others)."""
    mech = dict(run.cfg.to_dict()["mechanisms"])
    mech["patching"] = variant in mech.pop("patching_variants")
    mech.pop("variants")
    inputs = {"up": run.cfg.section_hash("study", "world", "training", "methods"), "mech": mech}
    if run.analysis_dtype != "fp32":  # (fp32 runs cached before the switch keep their keys)
        inputs["dtype"] = run.analysis_dtype
    return unit_key(inputs)


def spread_pairs(pairs: list, n_per_tier: int, tiers: list[str]) -> list:
    """At most ``n_per_tier`` pairs of each tier (or the first ``n_per_tier`` if none has a tier)."""
    out = []
    for tier in tiers:
        out += [p for p in pairs if getattr(p, "tier", None) == tier][:n_per_tier]
    return out or pairs[:n_per_tier]
