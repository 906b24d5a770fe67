"""Tidy per-module tables of the subspace metrics, as the study writes them."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from interp.adapters.factors import LoraDelta, layer_of, short_module
from interp.errors import SubspaceError
from interp.subspace.layers import late_mass, layer_energy
from interp.subspace.merges import cross_term_energy, energy_kept, span_deficit, truncation_loss
from interp.subspace.overlap import base_weight, intruder_dimensions, principal_angles, sign_conflict_rate, subspace_similarity, task_cosine
from interp.subspace.ranks import effective_rank, energy_rank, participation_ratio, stable_rank
from interp.subspace.svd import DTYPE, _numerical_rank, factor_svd, left_right_bases, spectrum, weighted_sum


def _check_adapters(deltas: Mapping[str, Mapping[str, LoraDelta]]) -> None:
    if not deltas:
        raise SubspaceError("no adapters given")
    for name, mods in deltas.items():
        if not isinstance(mods, Mapping) or not mods:
            raise SubspaceError(f"adapter {name!r} must be a non-empty {{module: LoraDelta}} dict")


def adapter_table(deltas: Mapping[str, Mapping[str, LoraDelta]], base_hf: Any = None,
                  intruders: bool = False, intruder_k: int = 10,
                  intruder_eps: float = 0.5) -> pd.DataFrame:
    """Per adapter × module: shape and spectrum statistics, from the factors.

    Columns: ``adapter, module, layer, proj, rank, d_out, d_in, fro_norm, spectral_norm,
    effective_rank, stable_rank, participation_ratio, k90, k99`` (see :func:`effective_rank`,
    :func:`stable_rank`, :func:`energy_rank`), plus ``amplification`` (Hu et al. 2021) when
    ``base_hf`` (the base transformers model, plain/bridged/PEFT) is given, plus ``intruders``
    (Shuttleworth et al. 2024, dense SVDs: slow, off by default) when ``intruders=True``.
    Zero updates (an untrained B = 0) get NaN rank statistics.

    Raises:
        SubspaceError: an empty adapter; KeyError: a module missing from ``base_hf``.
    """
    _check_adapters(deltas)
    rows = []
    for name, mods in deltas.items():
        for m, d in mods.items():
            U, S, V = factor_svd(d)
            row = dict(adapter=name, module=m, layer=layer_of(m), proj=short_module(m), rank=d.rank,
                       d_out=d.d_out, d_in=d.d_in, fro_norm=float(torch.sqrt((S ** 2).sum())),
                       spectral_norm=float(S[0]) if S.numel() else 0.0)
            if S.numel() and float(S[0]) > 0:
                row.update(effective_rank=effective_rank(S), stable_rank=stable_rank(S),
                           participation_ratio=participation_ratio(S),
                           k90=energy_rank(S, 0.9), k99=energy_rank(S, 0.99))
            else:
                row.update(effective_rank=float("nan"), stable_rank=float("nan"),
                           participation_ratio=float("nan"), k90=float("nan"), k99=float("nan"))
            if base_hf is not None:
                W = base_weight(base_hf, m).to(device=U.device, dtype=DTYPE)
                if tuple(W.shape) != (d.d_out, d.d_in):
                    raise SubspaceError(f"adapter_table: base weight of {m} is {tuple(W.shape)}, "
                                        f"ΔW is {(d.d_out, d.d_in)}")
                k = _numerical_rank(S)
                if k:
                    p = float(torch.linalg.matrix_norm(U[:, :k].T @ W @ V[:, :k]))
                    row["amplification"] = row["fro_norm"] / p if p > 0 else float("inf")
                else:
                    row["amplification"] = float("nan")
                if intruders:
                    row["intruders"] = intruder_dimensions(W, d, intruder_k, intruder_eps)[intruder_eps]
            rows.append(row)
    return pd.DataFrame(rows)


def spectra_table(deltas: Mapping[str, Mapping[str, LoraDelta]]) -> pd.DataFrame:
    """Long table of singular values: ``adapter, module, layer, proj, index (1-based), sigma``.

    Raises:
        SubspaceError: an empty adapter.
    """
    _check_adapters(deltas)
    cols: dict[str, list] = dict(adapter=[], module=[], layer=[], proj=[], index=[], sigma=[])
    for name, mods in deltas.items():
        for m, d in mods.items():
            s = spectrum(d).cpu().tolist()
            n = len(s)
            cols["adapter"] += [name] * n
            cols["module"] += [m] * n
            cols["layer"] += [layer_of(m)] * n
            cols["proj"] += [short_module(m)] * n
            cols["index"] += list(range(1, n + 1))
            cols["sigma"] += s
    return pd.DataFrame(cols)


def overlap_table(deltas: Mapping[str, Mapping[str, LoraDelta]],
                  pairs: Sequence[tuple[str, str]] | None = None,
                  sign_conflict: str | None = "sample", sign_sample: int = 4096,
                  seed: int = 0) -> pd.DataFrame:
    """Per adapter pair × shared module: subspace overlaps of column and row spaces.

    Columns: ``adapter_1, adapter_2, module, layer, proj, phi_col, phi_row`` (Hu et al. 2021 φ
    over the full numerical-rank spans), ``grassmann_col, grassmann_row`` (geodesic distance,
    radians), ``min_angle_col, min_angle_row`` (smallest principal angle), ``cosine`` (task-vector
    cosine, Ilharco et al. 2023), and ``sign_conflict`` (TIES, Yadav et al. 2023): estimated from
    ``sign_sample`` seeded entries with ``"sample"``, exact (dense, chunked) with ``"exact"``,
    omitted with ``None``.

    Args:
        deltas: ``{adapter: {module: LoraDelta}}``.
        pairs: adapter-name pairs (default all unordered pairs).

    Raises:
        SubspaceError: unknown adapter names in pairs, fewer than two adapters, or a pair with no
            module in common; SubspaceError: bad ``sign_conflict``.
    """
    _check_adapters(deltas)
    if sign_conflict not in (None, "sample", "exact"):
        raise SubspaceError(f"overlap_table: sign_conflict must be None, 'sample' or 'exact', got {sign_conflict!r}")
    names = list(deltas)
    pairs = list(itertools.combinations(names, 2)) if pairs is None else [tuple(p) for p in pairs]
    if not pairs:
        raise SubspaceError("overlap_table: needs at least two adapters or one pair")
    for a, b in pairs:
        for n in (a, b):
            if n not in deltas:
                raise SubspaceError(f"overlap_table: unknown adapter {n!r} (have {names})")
    bases: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(n, m):
        if (n, m) not in bases:
            bases[(n, m)] = left_right_bases(deltas[n][m])
        return bases[(n, m)]

    rows = []
    for a, b in pairs:
        shared = [m for m in deltas[a] if m in deltas[b]]
        if not shared:
            raise SubspaceError(f"overlap_table: adapters {a!r} and {b!r} share no module")
        for m in shared:
            d1, d2 = deltas[a][m], deltas[b][m]
            (U1, V1), (U2, V2) = get(a, m), get(b, m)
            row = dict(adapter_1=a, adapter_2=b, module=m, layer=layer_of(m), proj=short_module(m))
            if U1.shape[1] and U2.shape[1]:
                tc, tr = principal_angles(U1, U2), principal_angles(V1, V2)
                row.update(phi_col=subspace_similarity(U1, U2), phi_row=subspace_similarity(V1, V2),
                           grassmann_col=float(torch.sqrt((tc ** 2).sum())),
                           grassmann_row=float(torch.sqrt((tr ** 2).sum())),
                           min_angle_col=float(tc.min()), min_angle_row=float(tr.min()),
                           cosine=task_cosine(d1, d2))
            else:
                row.update(phi_col=float("nan"), phi_row=float("nan"), grassmann_col=float("nan"),
                           grassmann_row=float("nan"), min_angle_col=float("nan"),
                           min_angle_row=float("nan"), cosine=float("nan"))
            if sign_conflict == "sample":
                row["sign_conflict"] = sign_conflict_rate(d1, d2, sample=sign_sample, seed=seed)
            elif sign_conflict == "exact":
                row["sign_conflict"] = sign_conflict_rate(d1, d2)
            rows.append(row)
    return pd.DataFrame(rows)


def layer_energy_table(deltas: Mapping[str, Mapping[str, LoraDelta]], n_layers: int | None = None,
                       bridge_layer: int | None = None) -> pd.DataFrame:
    """Tidy layer profiles: ``adapter, layer, energy_fraction`` (:func:`layer_energy`), plus
    ``late_mass`` (same value on each of the adapter's rows) when ``bridge_layer`` ℓ* is given.

    Raises:
        SubspaceError: as :func:`layer_energy`.
    """
    _check_adapters(deltas)
    if n_layers is None:
        n_layers = 1 + max(layer_of(m) or 0 for mods in deltas.values() for m in mods)
    frames = []
    for name, mods in deltas.items():
        e = layer_energy(mods, n_layers).numpy()
        f = pd.DataFrame(dict(adapter=name, layer=range(n_layers), energy_fraction=e))
        if bridge_layer is not None:
            f["late_mass"] = late_mass(torch.as_tensor(e), bridge_layer)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def merge_table(merged: Mapping[str, Mapping[str, LoraDelta]],
                experts: Mapping[str, Mapping[str, LoraDelta]],
                weights: Mapping[str, float] | None = None,
                truncate_rank: int | None = None) -> pd.DataFrame:
    """Merge geometry per merge × module (column ``merged`` names the merge): each expert's ``energy_kept_<expert>``
    (:func:`energy_kept`), ``cross_term_energy`` against Σ w_i ΔW_i (:func:`cross_term_energy`;
    weights default uniform 1/n, i.e. Uniform averaging), ``merged_rank`` (numerical rank), and
    ``truncation_loss`` of Σ w_i ΔW_i at ``truncate_rank`` (default: the merge's own LoRA rank).

    Args:
        merged: ``{merge_name: {module: LoraDelta}}``; experts: ``{expert: {module: LoraDelta}}``.
        weights: expert weights w_i.

    Raises:
        SubspaceError: a merged module absent from an expert, or empty inputs.
    """
    _check_adapters(merged)
    _check_adapters(experts)
    names = list(experts)
    w = {n: 1.0 / len(names) for n in names} if weights is None else dict(weights)
    missing_w = [n for n in names if n not in w]
    if missing_w:
        raise SubspaceError(f"merge_table: no weight for experts {missing_w}")
    rows = []
    for mname, mods in merged.items():
        for m, d in mods.items():
            have = [n for n in names if m in experts[n]]
            if len(have) != len(names):
                raise SubspaceError(f"merge_table: module {m} of {mname!r} is missing from experts "
                                    f"{sorted(set(names) - set(have))}")
            exp = [experts[n][m] for n in names]
            total = weighted_sum(exp, [w[n] for n in names])
            S = factor_svd(d)[1]
            row = dict(merged=mname, module=m, layer=layer_of(m), proj=short_module(m),
                       merged_rank=_numerical_rank(S))
            for n, e in zip(names, exp):
                row[f"energy_kept_{n}"] = energy_kept(e, d) if row["merged_rank"] else 0.0
            row["cross_term_energy"] = cross_term_energy(d, exp, [w[n] for n in names])
            row["truncation_loss"] = truncation_loss(total, d.rank if truncate_rank is None else truncate_rank)
            rows.append(row)
    return pd.DataFrame(rows)


def span_deficit_table(oracle: Mapping[str, LoraDelta],
                       library: Mapping[str, Mapping[str, LoraDelta]]) -> pd.DataFrame:
    """Span deficit per module (:func:`span_deficit`): ``module, layer, proj, oracle_energy,
    span_deficit, span_deficit_col`` (two-sided and column-only), for the modules the oracle and
    every library adapter share.

    Raises:
        SubspaceError: empty inputs or no shared module.
    """
    _check_adapters(library)
    if not oracle:
        raise SubspaceError("span_deficit_table: empty oracle")
    rows = []
    for m, o in oracle.items():
        lib = [mods[m] for mods in library.values() if m in mods]
        if len(lib) != len(library) or o.frobenius_sq() == 0:
            continue
        rows.append(dict(module=m, layer=layer_of(m), proj=short_module(m), oracle_energy=o.frobenius_sq(),
                         span_deficit=span_deficit(o, lib), span_deficit_col=span_deficit(o, lib, one_sided=True)))
    if not rows:
        raise SubspaceError("span_deficit_table: the oracle shares no module with every library adapter")
    return pd.DataFrame(rows)
