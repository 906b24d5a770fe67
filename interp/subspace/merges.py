"""Merge geometry: energy of each expert kept, cross terms, truncation loss, span deficit."""

from __future__ import annotations

from typing import Sequence

from interp.adapters.factors import LoraDelta
from interp.errors import SubspaceError
from interp.subspace.overlap import _same_shape
from interp.subspace.ranks import _check_sigma
from interp.subspace.svd import _proj_sq, _span, factor_svd, left_right_bases, weighted_sum


def energy_kept(expert: LoraDelta, merged: LoraDelta) -> float:
    """Fraction of an expert's energy inside a merge's spans: ‖P_C ΔW_i P_R‖_F² / ‖ΔW_i‖_F²,
    P_C, P_R the orthogonal projectors onto col(ΔW_merged) and row(ΔW_merged).

    The two-sided analogue of Iso-C's subspace alignment ratio (Marczak et al. 2025, SAR uses the
    left side only), from the factors.

    Returns:
        fraction ∈ [0, 1].

    Raises:
        SubspaceError: shape mismatch or a zero expert/merge.
    """
    _same_shape(expert, merged, "energy_kept")
    total = expert.frobenius_sq()
    if total == 0:
        raise SubspaceError("energy_kept: the expert's update is zero")
    QC, QR = left_right_bases(merged)
    if QC.shape[1] == 0:
        raise SubspaceError("energy_kept: the merged update is zero")
    QC, QR = QC.to(expert.A.device), QR.to(expert.A.device)
    return min(1.0, max(0.0, _proj_sq(expert, QC, QR) / total))


def cross_term_energy(merged: LoraDelta, experts: Sequence[LoraDelta],
                      weights: Sequence[float] | None = None) -> float:
    """Relative energy of a factor-space merge's cross terms:
    ‖ΔW_merged − Σ w_i ΔW_i‖_F² / ‖Σ w_i ΔW_i‖_F² (0 for an exact ΔW-space merge).

    Merges that average A and B separately (peft ``add_weighted_adapter`` ``linear``/``ties``/
    ``dare_*``, DESIGN.md) produce Σ_{i≠j} w_i w_j B_i A_j cross terms; this measures them exactly
    from the factors (the difference is itself a low-rank product).

    Raises:
        SubspaceError: shape mismatch, no experts, or Σ w_i ΔW_i = 0.
    """
    target = weighted_sum(experts, weights)
    den = target.frobenius_sq()
    if den == 0:
        raise SubspaceError("cross_term_energy: the weighted sum of the experts is zero")
    diff = weighted_sum([merged, target], [1.0, -1.0])
    return max(0.0, diff.frobenius_sq()) / den


def truncation_loss(delta: LoraDelta, k: int) -> float:
    """Relative energy lost by the best rank-k approximation (Eckart–Young):
    Σ_{i>k} σ_i² / Σ_i σ_i² (e.g. for peft's ``*svd`` merges, exact-then-truncated to rank k).

    Args:
        delta: the exact update (e.g. :func:`weighted_sum` of the experts); k ≥ 0.

    Raises:
        SubspaceError: zero update; SubspaceError: k < 0.
    """
    if k < 0:
        raise SubspaceError(f"truncation_loss: k must be >= 0, got {k}")
    s = _check_sigma(factor_svd(delta)[1], "truncation_loss")
    e = s ** 2
    return float(e[k:].sum() / e.sum())


# --------------------------------------------------------------------------------------------
# Span deficit
# --------------------------------------------------------------------------------------------


def span_deficit(oracle: LoraDelta, library: Sequence[LoraDelta], one_sided: bool = False) -> float:
    """Span deficit (derived for this toolkit and checked numerically in tests/test_subspace.py):
    ‖O − P_C O P_R‖_F² / ‖O‖_F², P_C / P_R the projectors onto the joint column / row spans
    Σ_i col(ΔW_i), Σ_i row(ΔW_i) of the library. It is the fraction of the oracle update O that no
    merge whose column space lies in C and row space in R (averaging, task arithmetic, CAT, TSV,
    KnOTS-linear) can reach: ‖O − M‖_F² ≥ deficit·‖O‖_F² for every such M.

    ``one_sided=True``: ‖(I − P_C) O‖_F² / ‖O‖_F², the bound for merges constrained only in their
    column space (KnOTS with TIES/DARE on the V_i).

    Args:
        oracle: O, e.g. a LoRA trained on the composed (two-hop) target, ``[d_out, d_in]``.
        library: the experts' updates at the same module.

    Returns:
        deficit ∈ [0, 1]: 0 when O lies inside the spans, 1 when orthogonal to them.

    Raises:
        SubspaceError: empty library, shape mismatch, or a zero oracle.
    """
    if not library:
        raise SubspaceError("span_deficit: empty library")
    for d in library:
        _same_shape(oracle, d, "span_deficit")
    total = oracle.frobenius_sq()
    if total == 0:
        raise SubspaceError("span_deficit: the oracle update is zero")
    QC, QR = _span(library)
    dev = oracle.A.device
    QC, QR = QC.to(dev), QR.to(dev)
    inside = _proj_sq(oracle, QC, None if one_sided else QR)
    return min(1.0, max(0.0, 1.0 - inside / total))
