"""Step ``subspace``: ΔW geometry of the experts and merges against the theory's bounds."""

from __future__ import annotations

import pandas as pd

from interp.study.variants import LIBRARY, SPAN_DEFICIT_ORACLES, VARIANTS, expert_label, needed_experts


def merged_deltas(run, lib: dict) -> dict[str, dict]:
    """ΔW of every merge the registry can analyse: rebuilt from the library's factors
    (``Variant.merge_deltas``, always) or read from the loaded model (``deltas_from_model``,
    when the variant is evaluated)."""
    merges: dict[str, dict] = {}
    if len(lib) != len(LIBRARY):
        return merges
    pair = [lib[e] for e in LIBRARY]
    for v in VARIANTS.values():
        if v.merge_deltas is not None:
            merges[v.name] = v.merge_deltas(pair, run.cfg.methods)
        elif v.deltas_from_model and v.name in run.cfg.methods.variants:
            hm = run.load_variant(v.name)
            # factor geometry is small float64 algebra done on the CPU beside the experts read
            # from their files; the model itself ran on cfg.study.device
            merges[v.name] = {m: d.to("cpu") for m, d in hm.info["deltas"].items()}
            run.release(hm)
    return merges


def run(run) -> None:
    """Write ``subspace_adapters``, ``_spectra``, ``_overlap``, ``_merges``, ``_span_deficit``,
    ``_layer_energy`` and ``_key_overlap``."""
    from interp import subspace as S
    from interp.adapters.factors import read_adapter

    experts = {e: read_adapter(run.expert_dir(e)) for e in needed_experts(run.cfg)}
    lib = {e: experts[e] for e in LIBRARY if e in experts}
    deltas: dict[str, dict] = {expert_label(k): v for k, v in experts.items()}
    merges = merged_deltas(run, lib)
    base_hf = run.base().hf_model
    all_deltas = {**deltas, **merges}
    run.write_csv(S.adapter_table(all_deltas, base_hf=base_hf), "subspace_adapters")
    run.write_csv(S.spectra_table(all_deltas), "subspace_spectra")
    names = list(deltas)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    run.write_csv(S.overlap_table(deltas, pairs=pairs), "subspace_overlap")
    ex = {expert_label(k): v for k, v in lib.items()}
    if merges and lib:
        # cross terms are measured against each merge's own target: λ·Σ ΔWᵢ for task arithmetic,
        # the 1/n average for the others
        tables = []
        for k, v in merges.items():
            tw = VARIANTS[k].target_weights
            tables.append(S.merge_table({k: v}, ex, weights={n: tw(run.cfg.methods) for n in ex} if tw else None))
        run.write_csv(pd.concat(tables, ignore_index=True), "subspace_merges")
    oracles = [o for o in SPAN_DEFICIT_ORACLES if o in experts]
    if SPAN_DEFICIT_ORACLES[0] in experts and lib:
        sd = [S.span_deficit_table(experts[o], ex).assign(oracle=expert_label(o)) for o in oracles]
        run.write_csv(pd.concat(sd, ignore_index=True), "subspace_span_deficit")
    bridge_layer = bridge_layer_of(run)
    energy = S.layer_energy_table(all_deltas, n_layers=run.base().n_layers, bridge_layer=bridge_layer)
    run.write_csv(energy.assign(bridge_layer=bridge_layer), "subspace_layer_energy")
    if "bc" in experts:
        # key overlap of the second hop's expert: its own training prompts (D₂) vs composed queries
        world = run.world()
        kind = getattr(world, "composed_kind", "two_hop")  # math skills: "composed"
        composed = [e.prompt for e in world.get(split="test", kind=kind) if e.template_id == 0]
        native = [p for p, _ in world.train_pairs("d2")]
        hm = run.base()
        run.write_csv(S.key_overlap_table(hm, experts["bc"], composed[:64], native[:64]), "subspace_key_overlap")


def bridge_layer_of(run) -> int | None:
    """ℓ*: the block after which the bridge entity e₂ is best decodable (highest mean EntRec of e₂
    at the final position) in the Uniform merge (else the first mechanism variant); ``None``
    without a lens table."""
    df = run.table("lens")
    if df is None:
        return None
    d = df[(df["target"] == "e2") & (df["position"] == "final")]
    if d.empty:
        return None
    method = "uniform" if "uniform" in set(d["method"]) else d["method"].iloc[0]
    prof = d[d["method"] == method].groupby("layer")["logprob"].mean()
    # lens layer ℓ reads resid_pre of block ℓ (ℓ = n_layers: the final residual), i.e. the state
    # after blocks 0..ℓ-1: the bridge is computed by block ℓ-1, and late mass counts blocks ≥ ℓ.
    return int(min(max(int(prof.idxmax()) - 1, -1), run.base().n_layers - 1))
