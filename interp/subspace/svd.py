"""Thin SVD of ΔW = s·B·A from the factors, spectra, bases and spans."""

from __future__ import annotations

from typing import Iterable

import torch

from interp.adapters.factors import LoraDelta
from interp.adapters.merge import factored_svd, weighted_sum as _weighted_sum
from interp.errors import SubspaceError

DTYPE = torch.float64
# Singular values below RANK_RTOL·σ₁ count as zero when a span (column/row space) is formed.
RANK_RTOL = 1e-10


def _factors(delta: LoraDelta) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(delta, LoraDelta):
        raise SubspaceError(f"expected a LoraDelta, got {type(delta).__name__}")
    A = delta.A.detach().to(DTYPE)
    B = delta.B.detach().to(device=A.device, dtype=DTYPE)
    return A, B


# ONE factored SVD and ONE exact weighted sum serve merging and geometry alike; they live with
# the merges (the lower layer) and are re-exported here under this package's names.
factor_svd = factored_svd
weighted_sum = _weighted_sum


def spectrum(delta: LoraDelta, dense: bool = False) -> torch.Tensor:
    """Singular values σ₁ ≥ … ≥ σ_r ≥ 0 of ΔW = s·B·A (units of the weight).

    From the factors by :func:`factor_svd` (thin QR + r × r SVD); ``dense=True``
    instead forms ΔW (``[d_out, d_in]``) and calls ``torch.linalg.svdvals`` — only for checks.

    Args:
        delta: factors A ``[r, d_in]``, B ``[d_out, r]``.
        dense: form the full matrix (slow, O(d_out·d_in·min(d_out, d_in))).

    Returns:
        ``[r]`` float64 on the factors' device; entries beyond min(d_out, d_in) are 0.

    Raises:
        SubspaceError: ``delta`` is not a LoraDelta.
    """
    A, B = _factors(delta)
    r = A.shape[0]
    if dense:
        s = torch.linalg.svdvals(float(delta.scale) * (B @ A))
    else:
        s = factor_svd(delta)[1]
    out = torch.zeros(r, dtype=DTYPE, device=A.device)
    k = min(r, s.shape[0])
    out[:k] = s[:k]
    return out


def _numerical_rank(S: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > rtol * S[0]).sum())


def left_right_bases(delta: LoraDelta, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of ΔW's top-k left and right singular subspaces, from the factors.

    Args:
        delta: factors A ``[r, d_in]``, B ``[d_out, r]``.
        k: number of directions; default the numerical rank of ΔW (σ > 1e-10·σ₁), i.e. bases of
            the column space col(ΔW) and the row space row(ΔW).

    Returns:
        ``(U_k [d_out, k], V_k [d_in, k])`` float64, orthonormal columns, ordered by σ.

    Raises:
        SubspaceError: k < 0 or k larger than min(r, d_out, d_in).
    """
    U, S, V = factor_svd(delta)
    if k is None:
        k = _numerical_rank(S)
    if k < 0 or k > S.shape[0]:
        raise SubspaceError(f"left_right_bases: k={k} outside [0, {S.shape[0]}] for ΔW of rank ≤ {S.shape[0]}")
    return U[:, :k], V[:, :k]


def _span(deltas: Iterable[LoraDelta]) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of Σ_i col(ΔW_i) and Σ_i row(ΔW_i)."""
    Us, Vs = [], []
    dev = None
    for d in deltas:
        U, V = left_right_bases(d)
        dev = dev or U.device
        Us.append(U.to(dev))
        Vs.append(V.to(dev))
    out = []
    for Q in (torch.cat(Us, 1), torch.cat(Vs, 1)):
        if Q.shape[1] == 0:
            out.append(Q)
            continue
        Uq, Sq, _ = torch.linalg.svd(Q, full_matrices=False)
        out.append(Uq[:, :_numerical_rank(Sq, 1e-8)])
    return out[0], out[1]


def _proj_sq(delta: LoraDelta, QC: torch.Tensor | None, QR: torch.Tensor | None) -> float:
    """‖P_C ΔW P_R‖_F² = s²‖(Q_Cᵀ B)(A Q_R)‖_F² (None = identity on that side)."""
    A, B = _factors(delta)
    Bp = B if QC is None else QC.T @ B
    Ap = A if QR is None else A @ QR
    return float(delta.scale ** 2 * ((Bp.T @ Bp) * (Ap @ Ap.T)).sum())
