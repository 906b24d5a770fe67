"""Step ``subspace``: ΔW geometry of the experts and merges against the theory's bounds."""

from __future__ import annotations

from typing import Callable

import pandas as pd

from interp import subspace as S
from interp.errors import SubspaceError
from interp.study.merge_cache import cached_merge
from interp.study.variants import LIBRARY, SPAN_DEFICIT_ORACLES, VARIANTS, expert_label, needed_experts


def merged_deltas(run, lib: dict) -> dict[str, dict]:
    """ΔW of every merge the registry can analyse: rebuilt from the library's factors
    (``Variant.merge_deltas``, always; read from :mod:`interp.study.merge_cache` where the
    evaluate step cached it) or read from the loaded model (``deltas_from_model``, when the
    variant is evaluated)."""
    merges: dict[str, dict] = {}
    if len(lib) != len(LIBRARY):
        return merges
    dev = run.device
    # the merges (TIES: a dense ΔW and its re-factoring per module) and all the geometry after
    # them stay on the study's device: a TIES merge is near full rank, and its QRs, projections
    # and Gram products in float64 took minutes on the host at Qwen2.5-1.5B widths
    pair = [{m: d.to(dev) for m, d in lib[e].items()} for e in LIBRARY]
    for v in VARIANTS.values():
        if v.merge_deltas is not None:  # as the evaluate step loaded it, when it did
            merged = cached_merge(run, v.name, lambda v=v: v.merge_deltas(pair, run.cfg.methods))
            merges[v.name] = {m: d.to(dev) for m, d in merged.items()}
        elif v.deltas_from_model and v.name in run.cfg.methods.variants:
            hm = run.load_variant(v.name)
            merges[v.name] = {m: d.to(dev) for m, d in hm.info["deltas"].items()}
            run.release(hm)
    return merges


def load_experts(run) -> dict[str, dict]:
    """``{expert: {module: LoraDelta}}`` of every expert the step analyses, read from its files
    and moved to the study's device (:attr:`Run.device`), where every table is computed."""
    from interp.adapters.factors import read_adapter

    return {e: {m: d.to(run.device) for m, d in read_adapter(run.expert_dir(e)).items()}
            for e in needed_experts(run.cfg)}


def run(run) -> None:
    """Write ``subspace_adapters``, ``_spectra``, ``_overlap``, ``_merges``, ``_span_deficit``,
    ``_layer_energy`` and ``_key_overlap``. Sharded by module: in a distributed run each rank
    computes the per-module tables (adapters, spectra, overlap, merges, span deficit) on its share
    of the modules, and rank 0 puts the rows back in one-process order (:func:`in_order`) and
    writes every table; the layer profiles and key overlap, which need every module, are rank 0's."""
    with run.stage("all", "load_experts"):
        experts = load_experts(run)
    lib = {e: experts[e] for e in LIBRARY if e in experts}
    deltas: dict[str, dict] = {expert_label(k): v for k, v in experts.items()}
    with run.stage("all", "merges"):
        merges = merged_deltas(run, lib)  # every rank: merges are built from whole adapters
    all_deltas = {**deltas, **merges}
    if run.dist.size == 1:
        tables = module_tables(run, experts, merges, None)
    else:
        modules = list(dict.fromkeys(m for mods in all_deltas.values() for m in mods))
        mine = set(run.dist.shard(modules))
        parts = run.dist.gather(module_tables(run, experts, merges, mine.__contains__))
        if not run.dist.is_main:
            return
        tables = {name: in_order(name, [p[name] for p in parts if name in p], experts, merges)
                  for name in dict.fromkeys(n for p in parts for n in p)}
    for name, df in tables.items():
        run.write_csv(df, name)
    bridge_layer = bridge_layer_of(run)
    with run.stage("all", "layer_energy"):
        energy = S.layer_energy_table(all_deltas, n_layers=run.base().n_layers, bridge_layer=bridge_layer)
    run.write_csv(energy.assign(bridge_layer=bridge_layer), "subspace_layer_energy")
    if "bc" in experts:
        # key overlap of the second hop's expert: its own training prompts (D₂) vs composed queries
        world = run.world()
        kind = getattr(world, "composed_kind", "two_hop")  # math skills: "composed"
        composed = [e.prompt for e in world.get(split="test", kind=kind) if e.template_id == 0]
        native = [p for p, _ in world.train_pairs("d2")]
        with run.stage("all", "key_overlap"):
            hm = run.base()
            kappa = S.key_overlap_table(hm, experts["bc"], composed[:64], native[:64])
        run.write_csv(kappa, "subspace_key_overlap")


def module_tables(run, experts: dict, merges: dict, keep: Callable[[str], bool] | None) -> dict[str, pd.DataFrame]:
    """The per-module tables (``subspace_adapters``, ``_spectra``, ``_overlap``, ``_merges``,
    ``_span_deficit``) of the modules ``keep`` accepts (``None``: all). Every row depends on one
    module alone, so the tables of a partition of the modules are the whole tables' rows.

    Raises:
        SubspaceError: as the :mod:`interp.subspace` tables, for the whole set of modules only
        (a share with no module an analysis needs contributes no rows).
    """
    def part(d: dict) -> dict:
        if keep is None:
            return d
        cut = {name: {m: x for m, x in mods.items() if keep(m)} for name, mods in d.items()}
        return {name: mods for name, mods in cut.items() if mods}

    out: dict[str, pd.DataFrame] = {}
    experts = part(experts)
    lib = {e: experts[e] for e in LIBRARY if e in experts}
    deltas = {expert_label(k): v for k, v in experts.items()}
    merges = part(merges)
    all_deltas = {**deltas, **merges}
    if not all_deltas:
        return out
    with run.stage("modules", "adapters"):
        out["subspace_adapters"] = S.adapter_table(all_deltas, base_hf=run.base().hf_model)
    with run.stage("modules", "spectra"):
        out["subspace_spectra"] = S.spectra_table(all_deltas)
    names = list(deltas)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if keep is not None:  # a share of the modules: the pairs with a module in it
        pairs = [(a, b) for a, b in pairs if any(m in deltas[b] for m in deltas[a])]
    if pairs or keep is None:
        with run.stage("modules", "overlap"):
            out["subspace_overlap"] = S.overlap_table(deltas, pairs=pairs)
    ex = {expert_label(k): v for k, v in lib.items()}
    if merges and lib:
        # cross terms are measured against each merge's own target: λ·Σ ΔWᵢ for task arithmetic,
        # the 1/n average for the others
        tables = []
        for k, v in merges.items():
            tw = VARIANTS[k].target_weights
            with run.stage("modules", f"merge_table {k}"):
                tables.append(S.merge_table({k: v}, ex, weights={n: tw(run.cfg.methods) for n in ex} if tw else None))
        out["subspace_merges"] = pd.concat(tables, ignore_index=True)
    oracles = [o for o in SPAN_DEFICIT_ORACLES if o in experts]
    if SPAN_DEFICIT_ORACLES[0] in experts and lib:
        sd = []
        for o in oracles:
            try:
                with run.stage("modules", f"span_deficit {o}"):
                    sd.append(S.span_deficit_table(experts[o], ex).assign(oracle=expert_label(o)))
            except SubspaceError:
                if keep is None:
                    raise
        if sd:
            out["subspace_span_deficit"] = pd.concat(sd, ignore_index=True)
    return out


# the columns that order each per-module table's rows, outermost first (the module comes last)
ROW_ORDER = {"subspace_adapters": ("adapter",), "subspace_spectra": ("adapter",),
             "subspace_overlap": ("adapter_1", "adapter_2"), "subspace_merges": ("merged",),
             "subspace_span_deficit": ("oracle",)}


def in_order(name: str, parts: list[pd.DataFrame], experts: dict, merges: dict) -> pd.DataFrame:
    """The rows of a per-module table computed in shards, in the order a one-process run writes
    them: by adapter (pair, merge, oracle) as the step lists them, then by module as that
    adapter's file lists them; rows of one module (a spectrum's σ₁, σ₂…) keep their order.

    Raises:
        SubspaceError: no shard had a row (the one-process step raises the reason).
    """
    frames = [p for p in parts if len(p)]
    if not frames:
        raise SubspaceError(f"{name}: no module of any rank gave a row")
    df = pd.concat(frames, ignore_index=True)
    labelled = {expert_label(k): v for k, v in experts.items()}
    outer_mods = {**labelled, **merges}  # the step's order: experts, then merges
    names = list(labelled)
    outer = {"subspace_overlap": [(a, b) for i, a in enumerate(names) for b in names[i + 1:]],
             "subspace_merges": [(k,) for k in merges],
             "subspace_span_deficit": [(expert_label(o),) for o in SPAN_DEFICIT_ORACLES]}.get(
                 name, [(k,) for k in outer_mods])
    rank_outer = {k: i for i, k in enumerate(outer)}
    cols = ROW_ORDER[name]
    keys = [tuple(r) for r in df[list(cols)].itertuples(index=False)]
    first = [k[0] for k in keys]  # a module's position in the (first) adapter's own list
    pos = {o: {m: i for i, m in enumerate(outer_mods[o])} for o in set(first)}
    order = sorted(range(len(df)), key=lambda i: (rank_outer[keys[i]], pos[first[i]][df["module"].iat[i]], i))
    return df.iloc[order].reset_index(drop=True)


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
