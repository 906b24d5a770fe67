"""Overlap between adapters (principal angles, Hu et al.'s φ, Grassmann distance, task cosine,
TIES sign conflicts) and with the base weight (amplification, intruder dimensions)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from interp.adapters.factors import LoraDelta
from interp.errors import SubspaceError
from interp.subspace.svd import DTYPE, _factors, left_right_bases
from interp.surgery import peft_inner_model, unwrap


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

    cos θ_i are the singular values of Q1ᵀQ2. Small angles are taken from the
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
    principal angles, and 1 − d_P²/min(i, j) with d_P the projection distance.

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
    """Distance between subspaces from principal angles θ (Edelman et al. 1998).

    ``kind="geodesic"``: d_G = (Σθ_i²)^{1/2} (arc length on the Grassmannian, radians);
    ``kind="projection"``: d_P = (Σ sin²θ_i)^{1/2} (= ‖Q1Q1ᵀ − Q2Q2ᵀ‖_F/√2 for equal dimensions).

    Raises:
        SubspaceError: bad bases; SubspaceError: unknown ``kind``.
    """
    theta = principal_angles(Q1, Q2)
    if kind == "geodesic":
        return float(torch.sqrt((theta ** 2).sum()))
    if kind == "projection":
        return float(torch.sqrt((torch.sin(theta) ** 2).sum()))
    raise SubspaceError(f"grassmann_distance: kind must be 'geodesic' or 'projection', got {kind!r}")


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
    arithmetic; per matrix), from the factors.

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
    """TIES sign-conflict rate of two updates (Yadav et al., NeurIPS 2023):
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
        SubspaceError: different shapes; SubspaceError: ``sample`` < 1 or ``chunk_rows`` < 1.
    """
    _same_shape(d1, d2, "sign_conflict_rate")
    A1, B1 = _factors(d1)
    A2, B2 = _factors(d2)
    A2, B2 = A2.to(A1.device), B2.to(A1.device)
    s1, s2 = float(d1.scale), float(d2.scale)
    if sample is not None:
        if sample < 1:
            raise SubspaceError(f"sign_conflict_rate: sample must be >= 1, got {sample}")
        g = torch.Generator().manual_seed(seed)
        p = torch.randint(0, d1.d_out, (sample,), generator=g).to(A1.device)
        q = torch.randint(0, d1.d_in, (sample,), generator=g).to(A1.device)
        x1 = s1 * torch.einsum("nr,nr->n", B1.index_select(0, p), A1.T.contiguous().index_select(0, q))
        x2 = s2 * torch.einsum("nr,nr->n", B2.index_select(0, p), A2.T.contiguous().index_select(0, q))
        both = (x1 != 0) & (x2 != 0)
        n = int(both.sum())
        return float("nan") if n == 0 else float(((x1 * x2) < 0).sum()) / n
    if chunk_rows < 1:
        raise SubspaceError(f"chunk_rows must be >= 1, got {chunk_rows}")
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
    """Hu et al. 2021's amplification factor ‖ΔW‖_F / ‖U_kᵀ W V_k‖_F (LoRA paper §7.3), U_k, V_k the top-k left/right singular vectors of ΔW (default k = rank r).

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
    Equivalence", arXiv 2410.21228): among the top-k singular vectors y_j of
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
        SubspaceError: shape mismatch; SubspaceError: bad k, eps or side.
    """
    if side not in ("left", "right"):
        raise SubspaceError(f"intruder_dimensions: side must be 'left' or 'right', got {side!r}")
    epss = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if any(not 0 < e <= 1 for e in epss):
        raise SubspaceError(f"intruder_dimensions: eps must be in (0, 1], got {epss}")
    W = _check_weight(W, delta, "intruder_dimensions")
    kmax = min(W.shape)
    if not 1 <= k <= kmax:
        raise SubspaceError(f"intruder_dimensions: k must be in [1, {kmax}], got {k}")
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
    inner = peft_inner_model(root)
    if inner is not None:
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
        nxt = unwrap(m)
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
