"""Ranks of a singular spectrum: effective (Roy & Vetterli 2007), stable, participation ratio,
energy ranks."""

from __future__ import annotations

import torch

from interp.errors import SubspaceError
from interp.subspace.svd import DTYPE


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
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖₂² = Σσ_k² / σ₁² (e.g. Rudelson & Vershynin 2007).

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
    """Participation ratio (Σσ_k²)² / Σσ_k⁴, ∈ [1, rank].

    Raises:
        SubspaceError: empty, negative, non-finite or all-zero ``sigma``.
    """
    s = _check_sigma(sigma, "participation_ratio")
    e = s ** 2
    return float(e.sum() ** 2 / (e ** 2).sum())


def energy_rank(sigma: torch.Tensor, tau: float = 0.9) -> int:
    """Energy rank k_τ = min{k : Σ_{i≤k} σ_i² ≥ τ Σ_i σ_i²} (Biderman et al. 2024
    use τ = 0.9, "rank needed to explain 90% of the variance").

    A relative tolerance of 1e-12 absorbs rounding, so a flat spectrum of k equal values gives
    k_τ = ⌈τ·k⌉ exactly.

    Args:
        sigma: singular values ``[k]``, ≥ 0.
        tau: energy fraction in (0, 1].

    Returns:
        k_τ, an int in [1, number of non-zero σ].

    Raises:
        SubspaceError: bad ``sigma``; SubspaceError: ``tau`` outside (0, 1].
    """
    if not 0.0 < tau <= 1.0:
        raise SubspaceError(f"energy_rank: tau must be in (0, 1], got {tau}")
    s = _check_sigma(sigma, "energy_rank")
    e = s ** 2
    c = torch.cumsum(e, 0)
    total = c[-1]
    k = int(torch.searchsorted(c, tau * total * (1 - 1e-12)).item()) + 1
    return min(k, int((s > 0).sum()))


def tail_energy_rank(sigma: torch.Tensor, eps: float) -> int:
    """r_need(ε) = min{k : Σ_{i>k} σ_i² ≤ ε² Σ_i σ_i²} (Iso-C's k_M uses
    ε = 0.05). Equals :func:`energy_rank` with τ = 1 − ε²; returns 0 when ε ≥ 1.

    Raises:
        SubspaceError: bad ``sigma``; SubspaceError: ε < 0.
    """
    if eps < 0:
        raise SubspaceError(f"eps must be >= 0, got {eps}")
    if eps >= 1:
        _check_sigma(sigma, "tail_energy_rank")
        return 0
    return energy_rank(sigma, 1.0 - eps ** 2)


