"""Geometry of LoRA updates ΔW = s·B·A, computed from the factors.

Everything here works on one module's :class:`~interp.adapters.factors.LoraDelta` or on an
adapter as ``{module_path: LoraDelta}``. The d_out × d_in matrix ΔW is never formed unless a
function says so (``dense=True``, the TIES sign-conflict rate, intruder dimensions): the thin SVD
of ΔW comes from thin QRs of B and Aᵀ and the SVD of an r × r core (theory.md §0), cost
O((d_in + d_out)·r²) instead of O(d_out·d_in·min(d_out, d_in)).

Numerics: all results are computed in float64 on the factors' own device (CPU or GPU), so a
GPU tensor stays on the GPU; float64 gives ~1e-12 relative agreement with a dense SVD.

Groups of metrics (sources in each docstring; theory.md §6 table items in brackets):

* spectrum and ranks [1, 2]: :func:`spectrum`, :func:`effective_rank`, :func:`stable_rank`,
  :func:`energy_rank`, :func:`left_right_bases`;
* overlap between adapters [6, 9]: :func:`principal_angles`, :func:`subspace_similarity` (Hu et
  al.'s φ), :func:`grassmann_distance`, :func:`task_cosine`, :func:`sign_conflict_rate`;
* overlap with the base weight [7, 8]: :func:`amplification_factor`, :func:`intruder_dimensions`;
* merge geometry: :func:`energy_kept`, :func:`cross_term_energy`, :func:`truncation_loss`;
* span deficit [11]: :func:`span_deficit`;
* key overlap [12]: :func:`module_inputs`, :func:`key_overlap`, :func:`key_overlap_table`;
* layer placement [14]: :func:`layer_energy`, :func:`late_mass`;
* tidy tables: :func:`adapter_table`, :func:`overlap_table`, :func:`spectra_table`,
  :func:`layer_energy_table`, :func:`merge_table`, :func:`span_deficit_table`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from interp.adapters.factors import LoraDelta, layer_of, short_module

DTYPE = torch.float64
# Singular values below RANK_RTOL·σ₁ count as zero when a span (column/row space) is formed.
RANK_RTOL = 1e-10


class SubspaceError(ValueError):
    """Inputs to a subspace metric do not fit (shapes, empty adapters, zero updates)."""


# --------------------------------------------------------------------------------------------
# Thin SVD from the factors
# --------------------------------------------------------------------------------------------


def _factors(delta: LoraDelta) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(delta, LoraDelta):
        raise SubspaceError(f"expected a LoraDelta, got {type(delta).__name__}")
    A = delta.A.detach().to(DTYPE)
    B = delta.B.detach().to(device=A.device, dtype=DTYPE)
    return A, B


def factor_svd(delta: LoraDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ΔW = U diag(σ) Vᵀ of ΔW = s·B·A from the factors.

    Method (theory.md §0; the same as elias-gaeros/resize_lora ``fast_decompose``): B = Q_B R_B,
    Aᵀ = Q_A R_A (thin QR), SVD(s·R_B R_Aᵀ) = Ũ Σ Ṽᵀ, so U = Q_B Ũ and V = Q_A Ṽ.

    Args:
        delta: one module's factors, A ``[r, d_in]``, B ``[d_out, r]``.

    Returns:
        ``(U [d_out, k], sigma [k], V [d_in, k])`` in float64 on the factors' device, with
        k = min(r, d_out, d_in), σ descending and ≥ 0 (the sign of s is folded into U).

    Raises:
        SubspaceError: ``delta`` is not a LoraDelta.
    """
    if not isinstance(delta, LoraDelta):
        raise SubspaceError(f"expected a LoraDelta, got {type(delta).__name__}")
    # Tables ask for the same module's SVD many times (spectra, bases, energy kept in each merge):
    # memoised on the object, keyed by the factors' identity and in-place version counters, so
    # an edited or replaced factor is never served a stale decomposition.
    stamp = (delta.A._version, delta.B._version, float(delta.scale))
    hit = delta.__dict__.get("_svd_memo")
    if hit is not None and hit[0] is delta.A and hit[1] is delta.B and hit[2] == stamp:
        return hit[3]
    A, B = _factors(delta)
    QB, RB = torch.linalg.qr(B, mode="reduced")          # [d_out, p], [p, r]
    QA, RA = torch.linalg.qr(A.T, mode="reduced")        # [d_in, q], [q, r]
    core = float(delta.scale) * (RB @ RA.T)              # [p, q]
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    out = (QB @ Uc, S, QA @ Vch.T)
    delta.__dict__["_svd_memo"] = (delta.A, delta.B, stamp, out)
    return out


def spectrum(delta: LoraDelta, dense: bool = False) -> torch.Tensor:
    """Singular values σ₁ ≥ … ≥ σ_r ≥ 0 of ΔW = s·B·A (units of the weight).

    From the factors by :func:`factor_svd` (thin QR + r × r SVD, theory.md §0); ``dense=True``
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


def _check_sigma(sigma: torch.Tensor, name: str) -> torch.Tensor:
    sigma = torch.as_tensor(sigma).detach().to(DTYPE).flatten()
    if sigma.numel() == 0:
        raise SubspaceError(f"{name}: empty spectrum")
    if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
        raise SubspaceError(f"{name}: singular values must be finite and >= 0")
    if float(sigma.max()) == 0.0:
        raise SubspaceError(f"{name}: all singular values are zero (a zero update has no rank shape)")
    return torch.sort(sigma, descending=True).values


def effective_rank(sigma: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007): exp(−Σ p_k log p_k), p_k = σ_k / Σσ.

    Args:
        sigma: singular values ``[k]`` (any order, ≥ 0; zeros contribute nothing).

    Returns:
        erank ∈ [1, number of non-zero σ] (dimensionless).

    Raises:
        SubspaceError: empty, negative, non-finite or all-zero ``sigma``.
    """
    s = _check_sigma(sigma, "effective_rank")
    p = s[s > 0] / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def stable_rank(sigma: torch.Tensor) -> float:
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖₂² = Σσ_k² / σ₁² (theory.md §3.3; e.g. Rudelson & Vershynin 2007).

    Args:
        sigma: singular values ``[k]``, ≥ 0.

    Returns:
        srank ∈ [1, rank] (dimensionless).

    Raises:
        SubspaceError: empty, negative, non-finite or all-zero ``sigma``.
    """
    s = _check_sigma(sigma, "stable_rank")
    return float((s ** 2).sum() / s[0] ** 2)


def participation_ratio(sigma: torch.Tensor) -> float:
    """Participation ratio (Σσ_k²)² / Σσ_k⁴ (theory.md §3.3), ∈ [1, rank].

    Raises:
        SubspaceError: empty, negative, non-finite or all-zero ``sigma``.
    """
    s = _check_sigma(sigma, "participation_ratio")
    e = s ** 2
    return float(e.sum() ** 2 / (e ** 2).sum())


def energy_rank(sigma: torch.Tensor, tau: float = 0.9) -> int:
    """Energy rank k_τ = min{k : Σ_{i≤k} σ_i² ≥ τ Σ_i σ_i²} (theory.md §3.3; Biderman et al. 2024
    use τ = 0.9, "rank needed to explain 90% of the variance").

    A relative tolerance of 1e-12 absorbs rounding, so a flat spectrum of k equal values gives
    k_τ = ⌈τ·k⌉ exactly.

    Args:
        sigma: singular values ``[k]``, ≥ 0.
        tau: energy fraction in (0, 1].

    Returns:
        k_τ, an int in [1, number of non-zero σ].

    Raises:
        SubspaceError: bad ``sigma``; ValueError: ``tau`` outside (0, 1].
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"energy_rank: tau must be in (0, 1], got {tau}")
    s = _check_sigma(sigma, "energy_rank")
    e = s ** 2
    c = torch.cumsum(e, 0)
    total = c[-1]
    k = int(torch.searchsorted(c, tau * total * (1 - 1e-12)).item()) + 1
    return min(k, int((s > 0).sum()))


def tail_energy_rank(sigma: torch.Tensor, eps: float) -> int:
    """r_need(ε) = min{k : Σ_{i>k} σ_i² ≤ ε² Σ_i σ_i²} (theory.md §1.5 item 1; Iso-C's k_M uses
    ε = 0.05). Equals :func:`energy_rank` with τ = 1 − ε²; returns 0 when ε ≥ 1.

    Raises:
        SubspaceError: bad ``sigma``; ValueError: ε < 0.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if eps >= 1:
        _check_sigma(sigma, "tail_energy_rank")
        return 0
    return energy_rank(sigma, 1.0 - eps ** 2)


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


# --------------------------------------------------------------------------------------------
# Subspace comparison
# --------------------------------------------------------------------------------------------


def _check_bases(Q1: torch.Tensor, Q2: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if Q1.dim() != 2 or Q2.dim() != 2 or Q1.shape[0] != Q2.shape[0]:
        raise SubspaceError(f"{name}: bases must be [d, k1] and [d, k2] with the same d, got "
                            f"{tuple(Q1.shape)} and {tuple(Q2.shape)}")
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        raise SubspaceError(f"{name}: a basis has no columns (zero subspace)")
    Q2 = Q2.detach().to(device=Q1.device, dtype=DTYPE)
    return Q1.detach().to(DTYPE), Q2


def principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Principal angles between span(Q1) and span(Q2), radians, ascending (Björck & Golub 1973).

    cos θ_i are the singular values of Q1ᵀQ2 (theory.md §3.2). Small angles are taken from the
    sines, σ((I − Q_bQ_bᵀ) Q_a) (Knyazev & Argentati 2002), so identical subspaces give angles
    ~1e-15 rather than the ~1e-8 of arccos.

    Args:
        Q1: ``[d, k1]`` orthonormal columns; Q2: ``[d, k2]`` orthonormal columns.

    Returns:
        ``[min(k1, k2)]`` angles in [0, π/2].

    Raises:
        SubspaceError: mismatched d or an empty basis.
    """
    Q1, Q2 = _check_bases(Q1, Q2, "principal_angles")
    Qa, Qb = (Q1, Q2) if Q1.shape[1] <= Q2.shape[1] else (Q2, Q1)
    cos = torch.linalg.svdvals(Qb.T @ Qa).clamp(0.0, 1.0)             # descending
    sin = torch.linalg.svdvals(Qa - Qb @ (Qb.T @ Qa)).clamp(0.0, 1.0)  # descending
    sin = torch.flip(sin, [0])                                          # ascending, pairs with cos
    theta = torch.where(cos ** 2 < 0.5, torch.arccos(cos), torch.arcsin(sin))
    return theta


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int | None = None,
                        j: int | None = None) -> float:
    """Normalised subspace similarity φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j).

    Hu et al. 2021 (LoRA, arXiv 2106.09685, §7.2 eq. 4). Equals the mean squared cosine of the
    principal angles, and 1 − d_P²/min(i, j) with d_P the projection distance (theory.md §3.1).

    Args:
        U1: ``[d, k1]``, U2: ``[d, k2]`` orthonormal columns ordered by importance (singular vectors).
        i, j: numbers of leading columns used (default all).

    Returns:
        φ ∈ [0, 1]: 1 when one span contains the other, 0 when orthogonal.

    Raises:
        SubspaceError: mismatched d, empty bases, or i/j out of range.
    """
    U1, U2 = _check_bases(U1, U2, "subspace_similarity")
    i = U1.shape[1] if i is None else i
    j = U2.shape[1] if j is None else j
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise SubspaceError(f"subspace_similarity: i={i}, j={j} outside [1, {U1.shape[1]}] × [1, {U2.shape[1]}]")
    M = U1[:, :i].T @ U2[:, :j]
    return float(min(1.0, (M ** 2).sum() / min(i, j)))


def grassmann_distance(Q1: torch.Tensor, Q2: torch.Tensor, kind: str = "geodesic") -> float:
    """Distance between subspaces from principal angles θ (theory.md §3.2; Edelman et al. 1998).

    ``kind="geodesic"``: d_G = (Σθ_i²)^{1/2} (arc length on the Grassmannian, radians);
    ``kind="projection"``: d_P = (Σ sin²θ_i)^{1/2} (= ‖Q1Q1ᵀ − Q2Q2ᵀ‖_F/√2 for equal dimensions).

    Raises:
        SubspaceError: bad bases; ValueError: unknown ``kind``.
    """
    theta = principal_angles(Q1, Q2)
    if kind == "geodesic":
        return float(torch.sqrt((theta ** 2).sum()))
    if kind == "projection":
        return float(torch.sqrt((torch.sin(theta) ** 2).sum()))
    raise ValueError(f"grassmann_distance: kind must be 'geodesic' or 'projection', got {kind!r}")


def _same_shape(d1: LoraDelta, d2: LoraDelta, name: str) -> None:
    if (d1.d_out, d1.d_in) != (d2.d_out, d2.d_in):
        raise SubspaceError(f"{name}: updates have different shapes {(d1.d_out, d1.d_in)} and {(d2.d_out, d2.d_in)}")


def frobenius_inner(d1: LoraDelta, d2: LoraDelta) -> float:
    """⟨ΔW₁, ΔW₂⟩_F = s₁s₂ tr((B₁ᵀB₂)(A₂A₁ᵀ)) from the factors (r₁ × r₂ work only).

    Raises:
        SubspaceError: different (d_out, d_in).
    """
    _same_shape(d1, d2, "frobenius_inner")
    A1, B1 = _factors(d1)
    A2, B2 = _factors(d2)
    A2, B2 = A2.to(A1.device), B2.to(A1.device)
    return float(d1.scale * d2.scale * ((B1.T @ B2) * (A1 @ A2.T)).sum())


def task_cosine(d1: LoraDelta, d2: LoraDelta) -> float:
    """Task-vector cosine ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F ‖ΔW₂‖_F) (Ilharco et al. 2023, task
    arithmetic; per matrix as in theory.md §3.4), from the factors.

    Returns:
        cosine ∈ [−1, 1].

    Raises:
        SubspaceError: different shapes or a zero update.
    """
    n1, n2 = d1.frobenius_sq(), d2.frobenius_sq()
    if n1 == 0 or n2 == 0:
        raise SubspaceError("task_cosine: a zero update has no direction")
    return max(-1.0, min(1.0, frobenius_inner(d1, d2) / math.sqrt(n1 * n2)))


def sign_conflict_rate(d1: LoraDelta, d2: LoraDelta, sample: int | None = None, seed: int = 0,
                       chunk_rows: int = 256) -> float:
    """TIES sign-conflict rate of two updates (Yadav et al., NeurIPS 2023; theory.md §3.4):
    the fraction of entries (p, q) with ΔW₁[p,q] ≠ 0 and ΔW₂[p,q] ≠ 0 whose signs disagree.

    Untrimmed: TIES's top-k% trimming step is not applied, so every co-supported entry counts
    (for dense products B·A, almost all entries).

    Args:
        d1, d2: factors of the same shape ``[d_out, d_in]``.
        sample: ``None`` for the exact rate (forms ΔW in row chunks of ``chunk_rows``: O(d_out·d_in·r)
            time, O(chunk_rows·d_in) memory); an int n to estimate it from n entries drawn
            uniformly with replacement (seeded; standard error ≤ 0.5/√n), O(n·r).
        seed: seed of the entry sample.
        chunk_rows: rows of ΔW formed at once in the exact mode.

    Returns:
        conflict rate ∈ [0, 1] (``nan`` if no entry is non-zero in both).

    Raises:
        SubspaceError: different shapes; ValueError: ``sample`` < 1 or ``chunk_rows`` < 1.
    """
    _same_shape(d1, d2, "sign_conflict_rate")
    A1, B1 = _factors(d1)
    A2, B2 = _factors(d2)
    A2, B2 = A2.to(A1.device), B2.to(A1.device)
    s1, s2 = float(d1.scale), float(d2.scale)
    if sample is not None:
        if sample < 1:
            raise ValueError(f"sign_conflict_rate: sample must be >= 1, got {sample}")
        g = torch.Generator().manual_seed(seed)
        p = torch.randint(0, d1.d_out, (sample,), generator=g).to(A1.device)
        q = torch.randint(0, d1.d_in, (sample,), generator=g).to(A1.device)
        x1 = s1 * torch.einsum("nr,nr->n", B1.index_select(0, p), A1.T.contiguous().index_select(0, q))
        x2 = s2 * torch.einsum("nr,nr->n", B2.index_select(0, p), A2.T.contiguous().index_select(0, q))
        both = (x1 != 0) & (x2 != 0)
        n = int(both.sum())
        return float("nan") if n == 0 else float(((x1 * x2) < 0).sum()) / n
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    conflicts = 0
    both_n = 0
    for lo in range(0, d1.d_out, chunk_rows):
        x1 = s1 * (B1[lo:lo + chunk_rows] @ A1)
        x2 = s2 * (B2[lo:lo + chunk_rows] @ A2)
        both_n += int(((x1 != 0) & (x2 != 0)).sum())
        conflicts += int(((x1 * x2) < 0).sum())
    return float("nan") if both_n == 0 else conflicts / both_n


# --------------------------------------------------------------------------------------------
# Overlap with the base weight
# --------------------------------------------------------------------------------------------


def _check_weight(W: torch.Tensor, delta: LoraDelta, name: str) -> torch.Tensor:
    W = torch.as_tensor(W).detach()
    if W.dim() != 2 or tuple(W.shape) != (delta.d_out, delta.d_in):
        raise SubspaceError(f"{name}: base weight {tuple(W.shape)} does not match ΔW {(delta.d_out, delta.d_in)}")
    return W.to(device=delta.A.device, dtype=DTYPE)


def amplification_factor(delta: LoraDelta, W: torch.Tensor, k: int | None = None) -> float:
    """Hu et al. 2021's amplification factor ‖ΔW‖_F / ‖U_kᵀ W V_k‖_F (LoRA paper §7.3;
    theory.md §3.1), U_k, V_k the top-k left/right singular vectors of ΔW (default k = rank r).

    Large values mean ΔW amplifies directions that W does not emphasise (GPT-3 W_q, r = 4: ≈ 21.5).

    Args:
        delta: factors; W: base weight ``[d_out, d_in]``.
        k: number of singular directions (default min(r, numerical rank of ΔW)).

    Returns:
        the ratio (dimensionless, ≥ 0; ``inf`` if W has no energy in ΔW's subspace).

    Raises:
        SubspaceError: W's shape differs from ΔW's.
    """
    W = _check_weight(W, delta, "amplification_factor")
    U, V = left_right_bases(delta, k)
    proj = torch.linalg.matrix_norm(U.T @ W @ V)
    num = math.sqrt(delta.frobenius_sq())
    return float("inf") if float(proj) == 0 else num / float(proj)


def intruder_dimensions(W: torch.Tensor, delta: LoraDelta, k: int = 10,
                        eps: float | Sequence[float] = 0.5, side: str = "left") -> dict[float, int]:
    """Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
    Equivalence", arXiv 2410.21228; theory.md §3.3): among the top-k singular vectors y_j of
    W + ΔW, the number whose max_i |cos(y_j, x_i)| over all singular vectors x_i of W is < ε.

    Dense: two SVDs of ``[d_out, d_in]`` matrices (O(d_out·d_in·min) each).

    Args:
        W: base weight ``[d_out, d_in]``; delta: the update.
        k: number of top singular vectors of the tuned weight examined (authors' default 10).
        eps: threshold(s) on the cosine, each in (0, 1].
        side: ``"left"`` (output-space singular vectors) or ``"right"`` (input space).

    Returns:
        ``{eps: count}``, counts in [0, k].

    Raises:
        SubspaceError: shape mismatch; ValueError: bad k, eps or side.
    """
    if side not in ("left", "right"):
        raise ValueError(f"intruder_dimensions: side must be 'left' or 'right', got {side!r}")
    epss = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if any(not 0 < e <= 1 for e in epss):
        raise ValueError(f"intruder_dimensions: eps must be in (0, 1], got {epss}")
    W = _check_weight(W, delta, "intruder_dimensions")
    kmax = min(W.shape)
    if not 1 <= k <= kmax:
        raise ValueError(f"intruder_dimensions: k must be in [1, {kmax}], got {k}")
    U0, _, V0h = torch.linalg.svd(W, full_matrices=False)
    U1, _, V1h = torch.linalg.svd(W + delta.dense().to(W.device), full_matrices=False)
    X, Y = (U0, U1[:, :k]) if side == "left" else (V0h.T, V1h[:k].T)
    maxcos = (Y.T @ X).abs().max(dim=1).values
    return {e: int((maxcos < e).sum()) for e in epss}


def resolve_linear(root: torch.nn.Module, module: str) -> torch.nn.Module:
    """The innermost ``nn.Linear`` at ``module`` in a plain, bridged, or PEFT (+bridged) model.

    Resolution: ``root.get_submodule(module)`` (a PEFT ``PeftModel`` is entered through
    ``base_model.model``), then down through TransformerBridge wrappers (``_original_component``)
    and PEFT LoRA layers (``base_layer``) to the base ``nn.Linear``.

    Raises:
        KeyError: no module at that path; SubspaceError: the path does not end in a linear layer.
    """
    cands = [root]
    inner = getattr(getattr(root, "base_model", None), "model", None)
    if inner is not None and inner is not root:
        cands.append(inner)
    m = None
    for c in cands:
        try:
            m = c.get_submodule(module)
            break
        except AttributeError:
            continue
    if m is None:
        raise KeyError(f"no module {module!r} in {type(root).__name__}")
    for _ in range(8):
        if isinstance(m, torch.nn.Linear):
            return m
        nxt = getattr(m, "_original_component", None)
        if nxt is None:
            nxt = getattr(m, "base_layer", None)
        if nxt is None:
            break
        m = nxt
    if isinstance(m, torch.nn.Linear):
        return m
    raise SubspaceError(f"module {module!r} resolves to {type(m).__name__}, not a linear layer")


def base_weight(hf_model: torch.nn.Module, module: str) -> torch.Tensor:
    """The frozen base weight ``[d_out, d_in]`` (a detached view) of a linear module.

    Raises:
        KeyError / SubspaceError: as :func:`resolve_linear`.
    """
    return resolve_linear(hf_model, module).weight.detach()


# --------------------------------------------------------------------------------------------
# Low-rank sums (exact, in factor form)
# --------------------------------------------------------------------------------------------


def weighted_sum(deltas: Sequence[LoraDelta], weights: Sequence[float] | None = None) -> LoraDelta:
    """Σ_i w_i ΔW_i as one LoraDelta (factors concatenated along the rank: the exact ΔW-space
    sum, i.e. task arithmetic / CAT with fixed weights; rank ≤ Σ r_i), scale 1, float64.

    Raises:
        SubspaceError: empty list, mismatched shapes or weights length.
    """
    if not deltas:
        raise SubspaceError("weighted_sum: no updates")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise SubspaceError(f"weighted_sum: {len(weights)} weights for {len(deltas)} updates")
    for d in deltas[1:]:
        _same_shape(deltas[0], d, "weighted_sum")
    dev = deltas[0].A.device
    As, Bs = [], []
    for d, w in zip(deltas, weights):
        A, B = _factors(d)
        As.append(A.to(dev))
        Bs.append(float(w) * float(d.scale) * B.to(dev))
    return LoraDelta(torch.cat(As, 0), torch.cat(Bs, 1), 1.0)


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


# --------------------------------------------------------------------------------------------
# Merge geometry
# --------------------------------------------------------------------------------------------


def energy_kept(expert: LoraDelta, merged: LoraDelta) -> float:
    """Fraction of an expert's energy inside a merge's spans: ‖P_C ΔW_i P_R‖_F² / ‖ΔW_i‖_F²,
    P_C, P_R the orthogonal projectors onto col(ΔW_merged) and row(ΔW_merged).

    The two-sided analogue of Iso-C's subspace alignment ratio (Marczak et al. 2025, SAR uses the
    left side only; theory.md §3.8), from the factors.

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
        SubspaceError: zero update; ValueError: k < 0.
    """
    if k < 0:
        raise ValueError(f"truncation_loss: k must be >= 0, got {k}")
    s = _check_sigma(factor_svd(delta)[1], "truncation_loss")
    e = s ** 2
    return float(e[k:].sum() / e.sum())


# --------------------------------------------------------------------------------------------
# Span deficit
# --------------------------------------------------------------------------------------------


def span_deficit(oracle: LoraDelta, library: Sequence[LoraDelta], one_sided: bool = False) -> float:
    """Span deficit (theory.md §2.4 and summary item 11, derived there and numerically checked):
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


# --------------------------------------------------------------------------------------------
# Key overlap (activations)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def module_inputs(hm: Any, prompts: Sequence[str], modules: Sequence[str],
                  position: str = "final") -> dict[str, torch.Tensor]:
    """Input activations of linear modules, captured with forward pre-hooks.

    Hooks sit on the base ``nn.Linear`` found by :func:`resolve_linear`, so plain, bridged and
    bridged+PEFT models all work (the LoRA branch of a PEFT layer reads the same input). The
    prompts are run through the bridge (``hm.logits``) when ``hm`` has one, else through
    ``hm.hf_model`` directly.

    Args:
        hm: an :class:`interp.models.HookedModel` (needs ``tokenize`` and ``hf_model``).
        prompts: texts (right-padded batch; pads are never read).
        modules: module paths (``model.layers.3.mlp.down_proj``).
        position: ``"final"`` — each prompt's last real token (``[n_prompts, d_in]``); ``"all"`` —
            every real token, prompts concatenated in order (``[Σ lengths, d_in]``).

    Returns:
        ``{module: Tensor[n, d_in]}`` float32 on CPU.

    Raises:
        ValueError: empty prompts/modules or an unknown ``position``; KeyError / SubspaceError:
            a module path that does not resolve to a linear layer; RuntimeError: a hooked module
            never ran (e.g. bypassed by a fused projection).
    """
    if position not in ("final", "all"):
        raise ValueError(f"module_inputs: position must be 'final' or 'all', got {position!r}")
    if not prompts:
        raise ValueError("module_inputs: no prompts")
    if not modules:
        raise ValueError("module_inputs: no modules")
    tokens, lengths = hm.tokenize(list(prompts))
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            captured[name] = x.detach()
        return hook

    try:
        for m in modules:
            lin = resolve_linear(hm.hf_model, m)
            handles.append(lin.register_forward_pre_hook(make_hook(m)))
        if getattr(hm, "bridge", None) is not None:
            hm.logits(tokens)
        else:
            hm.hf_model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if m not in captured]
    if missing:
        raise RuntimeError(f"module_inputs: modules never ran in the forward pass: {missing[:3]}")
    out = {}
    lengths = lengths.to("cpu")
    for m, x in captured.items():
        x = x.float().cpu()
        if x.dim() != 3 or x.shape[0] != len(prompts):
            raise RuntimeError(f"module_inputs: unexpected input shape {tuple(x.shape)} at {m}")
        if position == "final":
            out[m] = x[torch.arange(len(prompts)), lengths - 1]
        else:
            out[m] = torch.cat([x[i, : int(n)] for i, n in enumerate(lengths)], 0)
    return out


def key_overlap(x: torch.Tensor, delta: LoraDelta, k: int | None = None) -> torch.Tensor:
    """Key overlap κ = ‖P_R x‖² / ‖x‖² per activation (theory.md §2.5 item 1, κ₂, derived there
    from the one-layer key-value analysis of Chen et al. 2025): the energy fraction of a module's
    input that lies in the adapter's input (row) space row(ΔW) (top-k right singular directions if k).

    Args:
        x: activations ``[n, d_in]`` (e.g. from :func:`module_inputs`).
        delta: the expert's update at that module.
        k: restrict to the top-k right singular vectors (default: the whole row space).

    Returns:
        ``[n]`` float64 in [0, 1].

    Raises:
        SubspaceError: x not ``[n, d_in]`` or a zero activation row.
    """
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[1] != delta.d_in:
        raise SubspaceError(f"key_overlap: activations {tuple(x.shape)} are not [n, d_in={delta.d_in}]")
    _, V = left_right_bases(delta, k)
    x = x.detach().to(device=V.device, dtype=DTYPE)
    nx = (x ** 2).sum(1)
    if bool((nx == 0).any()):
        raise SubspaceError("key_overlap: an activation is exactly zero")
    return ((x @ V) ** 2).sum(1) / nx


def key_overlap_table(hm: Any, expert: Mapping[str, LoraDelta], composed_prompts: Sequence[str],
                      native_prompts: Sequence[str], modules: Sequence[str] | None = None,
                      position: str = "final") -> pd.DataFrame:
    """κ₂ per adapted module on composed (two-hop) prompts against the expert's native prompts,
    plus output triggering ‖ΔW x‖ (theory.md §2.5 items 1 and 3).

    Args:
        hm: HookedModel (base or merged); expert: ``{module: LoraDelta}`` of the B→C expert.
        composed_prompts: two-hop queries; native_prompts: the expert's own training prompts.
        modules: subset of the expert's modules (default all).
        position: as in :func:`module_inputs`.

    Returns:
        DataFrame, one row per module: ``module, layer, proj, kappa_composed, kappa_native,
        kappa_ratio, trigger_composed, trigger_native, trigger_ratio`` (means over prompts;
        trigger = mean ‖ΔW x‖₂ in the module's output units).

    Raises:
        ValueError / KeyError / SubspaceError: as :func:`module_inputs` and :func:`key_overlap`.
    """
    modules = list(expert) if modules is None else list(modules)
    unknown = [m for m in modules if m not in expert]
    if unknown:
        raise KeyError(f"key_overlap_table: modules not in the expert: {unknown[:3]}")
    xc = module_inputs(hm, composed_prompts, modules, position)
    xn = module_inputs(hm, native_prompts, modules, position)
    rows = []
    for m in modules:
        d = expert[m]
        kc, kn = key_overlap(xc[m], d).mean().item(), key_overlap(xn[m], d).mean().item()
        tc = d.apply(xc[m].to(d.A.device).double()).norm(dim=1).mean().item()
        tn = d.apply(xn[m].to(d.A.device).double()).norm(dim=1).mean().item()
        rows.append(dict(module=m, layer=layer_of(m), proj=short_module(m), kappa_composed=kc,
                         kappa_native=kn, kappa_ratio=kc / kn if kn > 0 else float("nan"),
                         trigger_composed=tc, trigger_native=tn,
                         trigger_ratio=tc / tn if tn > 0 else float("nan")))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Layer placement
# --------------------------------------------------------------------------------------------


def layer_energy(deltas: Mapping[str, LoraDelta], n_layers: int | None = None) -> torch.Tensor:
    """Layer energy profile e(ℓ) = Σ_{modules at ℓ} ‖ΔW‖_F² / Σ_{all modules} ‖ΔW‖_F²
    (theory.md §5.5 item 1), from the factors.

    Args:
        deltas: ``{module_path: LoraDelta}``; module paths must carry a layer index.
        n_layers: profile length (default 1 + the largest layer index).

    Returns:
        ``[n_layers]`` float64, summing to 1.

    Raises:
        SubspaceError: no modules, a module without a layer index, a layer ≥ n_layers, or a zero
            adapter.
    """
    if not deltas:
        raise SubspaceError("layer_energy: no modules")
    layers = {}
    for m in deltas:
        ell = layer_of(m)
        if ell is None:
            raise SubspaceError(f"layer_energy: module {m!r} has no layer index")
        layers[m] = ell
    n = max(layers.values()) + 1 if n_layers is None else n_layers
    if max(layers.values()) >= n:
        raise SubspaceError(f"layer_energy: layer {max(layers.values())} >= n_layers={n}")
    e = torch.zeros(n, dtype=DTYPE)
    for m, d in deltas.items():
        e[layers[m]] += d.frobenius_sq()
    if float(e.sum()) == 0:
        raise SubspaceError("layer_energy: the adapter is zero everywhere")
    return e / e.sum()


def late_mass(profile: torch.Tensor, bridge_layer: int) -> float:
    """Late mass m₂ = Σ_{ℓ > ℓ*} e(ℓ) (theory.md §5.5 item 2): the share of an expert's update
    after the layer ℓ* where the bridge entity becomes decodable.

    Args:
        profile: ``[n_layers]`` from :func:`layer_energy`; bridge_layer: ℓ* (−1 → all mass).

    Raises:
        ValueError: ℓ* outside [−1, n_layers − 1].
    """
    profile = torch.as_tensor(profile, dtype=DTYPE)
    if not -1 <= bridge_layer < profile.shape[0]:
        raise ValueError(f"late_mass: bridge_layer {bridge_layer} outside [-1, {profile.shape[0] - 1}]")
    return float(profile[bridge_layer + 1:].sum())


# --------------------------------------------------------------------------------------------
# Tidy tables
# --------------------------------------------------------------------------------------------


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
            module in common; ValueError: bad ``sign_conflict``.
    """
    _check_adapters(deltas)
    if sign_conflict not in (None, "sample", "exact"):
        raise ValueError(f"overlap_table: sign_conflict must be None, 'sample' or 'exact', got {sign_conflict!r}")
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
