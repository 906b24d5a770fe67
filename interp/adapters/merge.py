"""Parameter-space merges of LoRA experts, exact in ΔW space, plus peft's factor-space variants.

Every function here works on adapters as ``dict[module_path, LoraDelta]`` (see
:mod:`interp.adapters.factors`), one dict per expert. Write ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` for expert ``i``
at one module (``Aᵢ`` ``[rᵢ, d_in]``, ``Bᵢ`` ``[d_out, rᵢ]``).

Two families:

* **Exact ΔW-space linear merges** (:func:`weighted_average`, :func:`uniform`,
  :func:`task_arithmetic`) are held *losslessly* as a concatenated-rank LoRA::

      ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ | … | wₙsₙBₙ] · [A₁; …; Aₙ]      (rank Σ rᵢ, scale 1)

  so nothing is approximated and no dense ``d_out × d_in`` matrix is ever formed.
* **Non-linear ΔW-space merges** (:func:`ties`, :func:`dare`) act entrywise on the dense ΔWᵢ, so
  they are computed densely per module (float64) and re-factored *exactly* by SVD, keeping every
  singular value above ``rtol·σ_max`` (default 1e-7: below float32 resolution). The result is again
  a :class:`LoraDelta` (often near full rank — trimming destroys low rank) whose dense product
  reproduces the merged ΔW to float32 precision.

peft's ``add_weighted_adapter`` types ``linear/ties/dare_*/magnitude_prune`` instead combine the A
and B factors *separately* (``A' = Σ √(wᵢsᵢ) Aᵢ``, ``B' = Σ √(wᵢsᵢ) Bᵢ``), so their ΔW carries cross
terms ``Bᵢ Aⱼ``; they are offered as named variants (:data:`PEFT_COMBINATIONS`) and measured with
:func:`faithfulness_report`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import pandas as pd
import torch

from interp.adapters.factors import LoraDelta, layer_of, short_module
from interp.errors import InterpError
from interp.surgery import clean_module_path

Adapter = dict[str, LoraDelta]

#: our combine name -> peft ``add_weighted_adapter(combination_type=...)``
PEFT_COMBINATIONS = {
    "peft_linear": "linear",
    "peft_ties": "ties",
    "peft_dare_linear": "dare_linear",
    "peft_dare_ties": "dare_ties",
    "peft_magnitude_prune": "magnitude_prune",
    "peft_svd": "svd",
    "peft_cat": "cat",
}


class MergeError(InterpError, ValueError):
    """Merge inputs do not fit (no experts, weight count mismatch, shape mismatch, bad density)."""


def _check(deltas_list: Sequence[Adapter], weights: Sequence[float] | None) -> list[float]:
    if not deltas_list:
        raise MergeError("no adapters to merge")
    if weights is None:
        weights = [1.0 / len(deltas_list)] * len(deltas_list)
    weights = [float(w) for w in weights]
    if len(weights) != len(deltas_list):
        raise MergeError(f"{len(weights)} weights for {len(deltas_list)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite, got {weights}")
    return weights


def _modules(deltas_list: Sequence[Adapter]) -> list[str]:
    mods: dict[str, tuple[int, int]] = {}
    for i, ad in enumerate(deltas_list):
        for m, d in ad.items():
            shape = (d.d_out, d.d_in)
            if m in mods and mods[m] != shape:
                raise MergeError(f"module {m}: adapter {i} has ΔW shape {shape}, another has {mods[m]}")
            mods[m] = shape
    return sorted(mods)


def weighted_average(deltas_list: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Exact weighted sum of LoRA updates, as a concatenated-rank LoRA (no approximation).

    Per module: ``ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ`` represented as ``A = vstack(Aᵢ)`` ``[Σrᵢ, d_in]``,
    ``B = hstack(wᵢ sᵢ Bᵢ)`` ``[d_out, Σrᵢ]``, ``scale = 1``; output-bias changes add alike
    (``Δb = Σᵢ wᵢ Δbᵢ``). A module missing from an expert
    contributes zero for that expert. With ``weights=None`` this is **Uniform** parameter averaging
    (wᵢ = 1/n; Chen et al. 2025 / Ostapenko et al. 2024's "uniform" baseline); it is model soups'
    average (Wortsman et al. 2022) applied to ΔW rather than to the factors.

    Args:
        deltas_list: one ``{module: LoraDelta}`` per expert.
        weights: one float per expert (default ``1/n`` each).

    Returns:
        ``{module: LoraDelta}`` with scale 1.

    Raises:
        MergeError: empty list, wrong number of weights, non-finite weights, or two experts with
            different ΔW shapes at one module.
    """
    weights = _check(deltas_list, weights)
    return {m: weighted_sum([ad[m] for ad in deltas_list if m in ad],
                            [w for w, ad in zip(weights, deltas_list) if m in ad], dtype=torch.float32)
            for m in _modules(deltas_list)}  # biases: Σ wᵢ bᵢ inside weighted_sum


def weighted_sum(deltas: Sequence[LoraDelta], weights: Sequence[float] | None = None,
                 dtype: torch.dtype = torch.float64) -> LoraDelta:
    """Σᵢ wᵢ ΔWᵢ of one module as one LoraDelta, exact: ``A = vstack(Aᵢ)`` ``[Σrᵢ, d_in]``,
    ``B = hstack(wᵢ sᵢ Bᵢ)`` ``[d_out, Σrᵢ]``, scale 1, in ``dtype`` on the first factor's device;
    output-bias changes summed the same way (``Σ wᵢ bᵢ``, accumulated in float64; ``None`` if no
    update carries one).

    The one exact weighted sum of ``interp`` (:func:`weighted_average` applies it per module;
    ``interp.subspace.weighted_sum`` is this function). ``weights=None``: every wᵢ = 1.

    Raises:
        MergeError: no updates, a weight count that differs from the updates', or two updates
            with different ΔW shapes.
    """
    if not deltas:
        raise MergeError("weighted_sum: no updates")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise MergeError(f"weighted_sum: {len(weights)} weights for {len(deltas)} updates")
    shapes = {(d.d_out, d.d_in) for d in deltas}
    if len(shapes) > 1:
        raise MergeError(f"weighted_sum: ΔW shapes differ: {sorted(shapes)}")
    dev = deltas[0].A.device
    A = torch.cat([d.A.detach().to(device=dev, dtype=dtype) for d in deltas], 0)
    B = torch.cat([d.B.detach().to(device=dev, dtype=dtype) * (w * float(d.scale))
                   for d, w in zip(deltas, weights)], 1)
    biased = [(w, d.bias) for d, w in zip(deltas, weights) if d.bias is not None]
    bias = sum(w * b.detach().to(device=dev, dtype=torch.float64) for w, b in biased).to(dtype) if biased else None
    return LoraDelta(A, B, 1.0, bias)


def _bias_combine(deltas_list: Sequence[Adapter], m: str, fn) -> torch.Tensor | None:
    """``fn`` of the stacked output-bias changes ``[n, d_out]`` at module ``m`` (float64; zeros for
    experts without one), as float32; ``None`` if no expert changes the bias there."""
    if not any(m in ad and ad[m].bias is not None for ad in deltas_list):
        return None
    d_out = next(ad[m].d_out for ad in deltas_list if m in ad)
    dev = next(ad[m].A.device for ad in deltas_list if m in ad)
    stack = torch.stack([ad[m].bias.to(dev, torch.float64) if m in ad and ad[m].bias is not None
                         else torch.zeros(d_out, dtype=torch.float64, device=dev) for ad in deltas_list])
    return fn(stack).float()


def uniform(deltas_list: Sequence[Adapter]) -> Adapter:
    """Uniform parameter averaging ``ΔW = (1/n) Σᵢ sᵢ Bᵢ Aᵢ``, exact (see :func:`weighted_average`)."""
    return weighted_average(deltas_list, None)


def task_arithmetic(deltas_list: Sequence[Adapter], lam: float = 1.0) -> Adapter:
    """Task arithmetic (Ilharco et al., ICLR 2023, eq. 1): ``θ = θ₀ + λ Σᵢ τᵢ`` with ``τᵢ = ΔWᵢ``.

    Exact, as a concatenated-rank LoRA: :func:`weighted_average` with every weight ``λ``.

    Raises:
        MergeError: as :func:`weighted_average`.
    """
    return weighted_average(deltas_list, [float(lam)] * len(deltas_list))


# --------------------------------------------------------------------------------------------
# Exact spectra from factors
# --------------------------------------------------------------------------------------------


def factored_svd(delta: LoraDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ΔW = U diag(σ) Vᵀ of ΔW = s·B·A from the factors, never forming ΔW.

    The one factored SVD of ``interp`` (``interp.subspace.factor_svd`` is this function). With
    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), ``ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ``; the core's
    SVD ``U' S V'ᵀ`` gives ``ΔW = (Q_B U') S (Q_A V')ᵀ`` (elias-gaeros/resize_lora
    ``fast_decompose``). Cost O((d_in+d_out) r²), in float64 on the factors' device.

    Returns:
        ``U`` ``[d_out, k]``, ``S`` ``[k]`` (descending, ≥ 0; the sign of s folded into U),
        ``V`` ``[d_in, k]`` with ``ΔW = U diag(S) Vᵀ``, k = min(r, d_out, d_in).

    Raises:
        MergeError: ``delta`` is not a LoraDelta.
    """
    if not isinstance(delta, LoraDelta):
        raise MergeError(f"expected a LoraDelta, got {type(delta).__name__}")
    # Tables ask for the same module's SVD many times (spectra, bases, energy kept in each merge):
    # memoised on the object, keyed by the factors' identity and in-place version counters, so
    # an edited or replaced factor is never served a stale decomposition.
    stamp = (delta.A._version, delta.B._version, float(delta.scale))
    hit = delta.__dict__.get("_svd_memo")
    if hit is not None and hit[0] is delta.A and hit[1] is delta.B and hit[2] == stamp:
        return hit[3]
    A = delta.A.detach().double()
    B = delta.B.detach().to(device=A.device, dtype=torch.float64)
    QB, RB = torch.linalg.qr(B, mode="reduced")          # [d_out, p], [p, r]
    QA, RA = torch.linalg.qr(A.T, mode="reduced")        # [d_in, q], [q, r]
    Uc, S, Vch = torch.linalg.svd(float(delta.scale) * (RB @ RA.T), full_matrices=False)
    out = (QB @ Uc, S, QA @ Vch.T)
    delta.__dict__["_svd_memo"] = (delta.A, delta.B, stamp, out)
    return out


def svd_truncate(delta: LoraDelta, k: int) -> tuple[LoraDelta, float]:
    """Best rank-``k`` approximation of ΔW (Eckart–Young), from the factors.

    ``ΔW_k = U[:, :k] diag(S[:k]) V[:, :k]ᵀ`` held as ``B = U_k diag(S_k)`` ``[d_out, k]``,
    ``A = V_kᵀ`` ``[k, d_in]``, scale 1 (see :func:`factored_svd`).

    Returns:
        ``(delta_k, energy_kept)`` with ``energy_kept = Σ_{j<k} σⱼ² / Σ σⱼ² ∈ [0, 1]`` (1.0 for ΔW = 0).

    Raises:
        MergeError: ``k < 1``.
    """
    if k < 1:
        raise MergeError(f"SVD truncation rank must be >= 1, got {k}")
    U, S, V = factored_svd(delta)
    k = min(k, S.numel())
    total = float((S ** 2).sum())
    kept = float((S[:k] ** 2).sum())
    trunc = LoraDelta(V[:, :k].T.float().contiguous(), (U[:, :k] * S[:k]).float().contiguous(), 1.0)
    return trunc, (kept / total if total > 0 else 1.0)


def svd_merge(deltas_list: Sequence[Adapter], weights: Sequence[float] | None = None,
              k: int | None = None) -> tuple[Adapter, dict[str, float]]:
    """Exact weighted average (:func:`weighted_average`) truncated to rank ``k`` per module.

    ``k`` defaults to the largest expert rank (peft's ``svd`` default). Output-bias changes are
    summed exactly (``Σᵢ wᵢ Δbᵢ``), not truncated. Returns the merged adapter and
    ``{module: energy_kept}``.

    Raises:
        MergeError: as :func:`weighted_average` and :func:`svd_truncate`.
    """
    avg = weighted_average(deltas_list, weights)
    if k is None:
        k = max(d.rank for ad in deltas_list for d in ad.values())
    out, energy = {}, {}
    for m, d in avg.items():
        out[m], energy[m] = svd_truncate(d, k)
        out[m].bias = d.bias  # a bias is not low-rank: carried exactly beside the truncated ΔW
    return out, energy


def gram_svd(W: torch.Tensor, rtol: float = 1e-7) -> LoraDelta:
    """Exact re-factoring of a dense ``[d_out, d_in]`` ΔW as a LoRA through the Gram matrix of
    its smaller side (float64, on ``W``'s device): the GPU path of :func:`dense_to_delta`.

    With ``d_in ≤ d_out``: ``WᵀW = V diag(σ²) Vᵀ`` (``torch.linalg.eigh``), ``B = W V`` (= U diag σ,
    no division by σ), ``A = Vᵀ``; else the same on ``W Wᵀ = U diag(σ²) Uᵀ`` with ``B = U``,
    ``A = Uᵀ W``. The singular values are read back as the column (row) norms of ``W V`` (``Uᵀ W``),
    accurate to float64 rounding of ``σ_max`` rather than of ``σ_max²``, and directions with
    ``σⱼ ≤ rtol·σ_max`` are dropped (at least one kept). ``B·A = W·V_k·V_kᵀ``: the dropped part is
    below ``rtol·σ_max`` per direction, so the product reproduces ΔW to float32 precision as the
    plain SVD does. One matmul and one symmetric eigenproblem of size min(d_out, d_in) instead of
    a full SVD: on CUDA, ``eigh`` is much cheaper than cuSOLVER's SVD of a tall float64 matrix.

    Returns:
        LoraDelta ``A [k, d_in]``, ``B [d_out, k]`` (float32, scale 1), directions ordered by σ
        descending.

    Raises:
        MergeError: ``W`` is not a 2-D tensor.
    """
    if W.dim() != 2:
        raise MergeError(f"gram_svd: expected a [d_out, d_in] matrix, got shape {tuple(W.shape)}")
    W = W.double()
    tall = W.shape[1] <= W.shape[0]
    G = W.T @ W if tall else W @ W.T
    _, Q = torch.linalg.eigh((G + G.T) / 2)                 # ascending eigenvalues
    Q = Q.flip(1)
    P = W @ Q if tall else Q.T @ W                          # [d_out, n] = U diag σ  |  [n, d_in] = diag σ Vᵀ
    S = torch.linalg.vector_norm(P, dim=0 if tall else 1)
    order = torch.argsort(S, descending=True)
    S, Q, P = S[order], Q[:, order], (P[:, order] if tall else P[order])
    keep = max(1, int((S > rtol * S[0]).sum())) if S.numel() and S[0] > 0 else 1
    if tall:
        return LoraDelta(Q[:, :keep].T.float().contiguous(), P[:, :keep].float().contiguous(), 1.0)
    return LoraDelta(P[:keep].float().contiguous(), Q[:, :keep].float().contiguous(), 1.0)


def dense_to_delta(W: torch.Tensor, rtol: float = 1e-7) -> LoraDelta:
    """Exact re-factoring of a dense ``[d_out, d_in]`` ΔW as a LoRA by SVD (float64).

    Keeps singular values ``σⱼ > rtol·σ_max`` (at least one): ``B = U diag(σ)``, ``A = Vᵀ``, scale 1.
    On a CPU: ``torch.linalg.svd``. On a GPU: :func:`gram_svd` (the same factorisation through
    the Gram matrix of the smaller side; cuSOLVER's float64 SVD of a 8960 × 1536 ΔW is the slow
    part of a TIES merge there), equal to the SVD's product to float32 precision.
    """
    if W.device.type != "cpu":
        return gram_svd(W, rtol)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    keep = max(1, int((S > rtol * S[0]).sum())) if S.numel() and S[0] > 0 else 1
    return LoraDelta(Vh[:keep].float().contiguous(), (U[:, :keep] * S[:keep]).float().contiguous(), 1.0)


def _dense_stack(deltas_list: Sequence[Adapter], m: str) -> torch.Tensor:
    shape = next(ad[m] for ad in deltas_list if m in ad)
    return torch.stack([ad[m].to(shape.A.device).dense() if m in ad
                        else torch.zeros(shape.d_out, shape.d_in, dtype=torch.float64, device=shape.A.device)
                        for ad in deltas_list])


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")


MAJORITY_SIGN_METHODS = ("total", "frequency")


def ties_dense(task_tensors: torch.Tensor, weights: Sequence[float], density: float,
               majority_sign_method: str = "total") -> torch.Tensor:
    """TIES-merging of dense tensors ``[n, ...]`` (Yadav et al., NeurIPS 2023, Alg. 1).

    1. Trim: keep each τᵢ's top ``⌊density·numel⌋`` entries by magnitude (others 0) → τ̂ᵢ.
    2. Elect sign: γ = +1 where Σᵢ τ̂ᵢ ≥ 0, else −1 (mass-weighted, ``"total"``), or where
       Σᵢ sign(τ̂ᵢ) ≥ 0 (``"frequency"``: one vote per expert), as peft's ``calculate_majority_sign_mask``.
    3. Disjoint weighted mean: τ = Σᵢ [sign(τ̂ᵢ) = γ] wᵢ τ̂ᵢ / max(1, #{i : sign(τ̂ᵢ) = γ}).

    Conventions (⌊·⌋, sign elected on the *unweighted* trimmed tensors, wᵢ applied in the
    disjoint sum, ties to +) follow peft's ``merge_utils.ties`` so the two agree exactly; with
    wᵢ = λ this is the paper's ``λ·τ_m``.
    """
    _check_density(density)
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise MergeError(f"majority_sign_method must be one of {MAJORITY_SIGN_METHODS}, got {majority_sign_method!r}")
    n = task_tensors.shape[0]
    flat = task_tensors.reshape(n, -1)
    k = max(1, int(density * flat.shape[1]))
    trimmed = torch.zeros_like(flat)
    idx = flat.abs().topk(k, dim=1).indices
    trimmed.scatter_(1, idx, flat.gather(1, idx))
    votes = trimmed.sign().sum(0) if majority_sign_method == "frequency" else trimmed.sum(0)
    gamma = torch.where(votes >= 0, 1.0, -1.0).to(flat.dtype)
    agree = torch.sign(trimmed) == gamma
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device).view(n, 1)
    merged = (trimmed * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(task_tensors.shape[1:])


def ties(deltas_list: Sequence[Adapter], density: float = 0.2,
         weights: Sequence[float] | None = None, rtol: float = 1e-7,
         majority_sign_method: str = "total") -> Adapter:
    """TIES-merging (Yadav et al. 2023) of the dense ΔWᵢ per module, re-factored exactly.

    Per module ``ΔW = TIES(ΔW₁…ΔWₙ; density, w, majority_sign_method)`` as in :func:`ties_dense`
    (default wᵢ = 1), then :func:`dense_to_delta`; output-bias changes, where any, are TIES-merged
    as their own tensor (trim, sign, disjoint mean per tensor, as peft merges each parameter).
    Forms dense ``[d_out, d_in]`` float64 matrices per module.

    Raises:
        MergeError: bad density, weights, sign method, or shapes.
    """
    weights = _check(deltas_list, weights if weights is not None else [1.0] * len(deltas_list))
    out = {}
    for m in _modules(deltas_list):
        out[m] = dense_to_delta(ties_dense(_dense_stack(deltas_list, m), weights, density, majority_sign_method), rtol)
        out[m].bias = _bias_combine(deltas_list, m, lambda b: ties_dense(b, weights, density, majority_sign_method))
    return out


def dare_dense(task_tensors: torch.Tensor, weights: Sequence[float], density: float,
               generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024, eq. 2–3) + linear merge of dense tensors ``[n, ...]``.

    Each entry of τᵢ is dropped with probability ``p = 1 − density`` (Bernoulli mask from
    ``generator``) and survivors are rescaled by ``1/(1−p)`` (if ``rescale``); then
    ``τ = Σᵢ wᵢ τ̃ᵢ``.
    """
    _check_density(density)
    # masks drawn on the generator's device (the CPU: the same masks wherever the tensors live)
    keep = torch.rand(task_tensors.shape, generator=generator, dtype=torch.float64, device=generator.device) < density
    dropped = task_tensors * keep.to(task_tensors.device)
    if rescale:
        dropped = dropped / density
    w = torch.tensor(list(weights), dtype=task_tensors.dtype, device=task_tensors.device)
    return (dropped * w.view(-1, *([1] * (task_tensors.dim() - 1)))).sum(0)


def dare(deltas_list: Sequence[Adapter], density: float = 0.5, seed: int = 0, rescale: bool = True,
         weights: Sequence[float] | None = None, rtol: float = 1e-7) -> Adapter:
    """DARE drop-and-rescale (Yu et al. 2024) of the dense ΔWᵢ, linear merge, re-factored exactly.

    Per module (in sorted module order, one ``torch.Generator`` seeded with ``seed``):
    ``ΔW = Σᵢ wᵢ · (Mᵢ ⊙ ΔWᵢ) / density`` with ``Mᵢ ~ Bernoulli(density)``; default wᵢ = 1
    (task-arithmetic sum, as the paper), then :func:`dense_to_delta`. Output-bias changes, where
    any, get the same treatment as their own tensor (masks drawn after the module's matrix masks).

    Raises:
        MergeError: bad density, weights, or shapes.
    """
    weights = _check(deltas_list, weights if weights is not None else [1.0] * len(deltas_list))
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for m in _modules(deltas_list):
        out[m] = dense_to_delta(dare_dense(_dense_stack(deltas_list, m), weights, density, gen, rescale), rtol)
        # bias masks are drawn after the module's matrix masks, from the same generator
        out[m].bias = _bias_combine(deltas_list, m, lambda b: dare_dense(b, weights, density, gen, rescale))
    return out


# --------------------------------------------------------------------------------------------
# peft's combinations and faithfulness
# --------------------------------------------------------------------------------------------


def deltas_from_peft(peft_model, adapter_name: str) -> Adapter:
    """``{module_path: LoraDelta}`` of one adapter as held in a live ``PeftModel``'s LoRA layers.

    Module paths are relative to the base model (``model.layers.0.self_attn.q_proj``); scale is
    the layer's ``scaling[adapter_name]``; ``bias`` is ``scale · lora_B.bias`` (peft's ``lora_bias``).
    """
    out: Adapter = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and adapter_name in getattr(mod, "lora_A", {}) \
                and adapter_name in getattr(mod, "lora_B", {}):
            path = clean_module_path(name)
            s = float(mod.scaling[adapter_name])
            b = mod.lora_B[adapter_name].bias
            out[path] = LoraDelta(mod.lora_A[adapter_name].weight.detach().float().clone(),
                                  mod.lora_B[adapter_name].weight.detach().float().clone(), s,
                                  None if b is None else s * b.detach().float())
    return out


def work_device(tensors: Iterable[torch.Tensor]) -> torch.device:
    """The device to compute on for ``tensors`` that may live apart: the first one off the CPU
    (an accelerator), else the CPU. Computing there moves the small CPU operands to it rather
    than copying large accelerator factors back to the host."""
    first = None
    for t in tensors:
        if t.device.type != "cpu":
            return t.device
        first = first or t.device
    return first or torch.device("cpu")


def _fro_sq_combo(terms: Iterable[tuple[float, LoraDelta]]) -> float:
    """‖Σⱼ cⱼ sⱼ Bⱼ Aⱼ‖_F² from factors: with B = [cⱼsⱼBⱼ], A = [Aⱼ], it is Σ (BᵀB) ⊙ (AAᵀ)."""
    terms = list(terms)
    # a merge built on the GPU is compared with experts read from files onto the CPU: the Gram
    # products (a TIES merge is near full rank) run where the largest factors already are
    dev = work_device(t for _, d in terms for t in (d.A, d.B))
    B = torch.cat([c * d.scale * d.B.to(dev, torch.float64) for c, d in terms], 1)
    A = torch.cat([d.A.to(dev, torch.float64) for _, d in terms], 0)
    bias = sum((c * d.bias.to(dev, torch.float64) for c, d in terms if d.bias is not None),
               torch.zeros(B.shape[0], dtype=torch.float64, device=dev))
    return max(0.0, float(torch.sum((B.T @ B) * (A @ A.T)))) + float(bias @ bias)


def faithfulness_report(merged: Adapter, deltas_list: Sequence[Adapter],
                        weights: Sequence[float] | None = None) -> pd.DataFrame:
    """How far a merged adapter is from the exact weighted sum, per module.

    ``rel_error = ‖ΔW_merged − Σᵢ wᵢ ΔWᵢ‖_F / ‖Σᵢ wᵢ ΔWᵢ‖_F`` — the norm of ``[ΔW | Δb]`` where
    output biases change, so a merge that drops a bias shows it — computed from the factors through
    Gram matrices (:func:`_fro_sq_combo`), never forming ΔW. 0 (to ~1e-8, float64 cancellation) for
    the exact merges here and peft's ``cat``; > 0 for peft's factor-space ``linear`` (cross terms
    ``Bᵢ Aⱼ``), SVD truncation, TIES and DARE.

    Args:
        merged: the merged adapter ``{module: LoraDelta}``.
        deltas_list: the experts.
        weights: the target weights wᵢ (default 1/n: Uniform).

    Returns:
        Tidy DataFrame, one row per module: ``module, layer, projection, rank_merged,
        norm_target, norm_merged, rel_error`` (norms are Frobenius, in weight units).

    Raises:
        MergeError: bad weights; a merged module missing from every expert.
    """
    weights = _check(deltas_list, weights)
    rows = []
    for m in sorted(set(_modules(deltas_list)) | set(merged)):
        target = [(w, ad[m]) for w, ad in zip(weights, deltas_list) if m in ad]
        if not target:
            raise MergeError(f"merged module {m} is in no expert")
        t2 = _fro_sq_combo(target)
        if m in merged:
            e2 = _fro_sq_combo(target + [(-1.0, merged[m])])
            m2 = _fro_sq_combo([(1.0, merged[m])])
            rank = merged[m].rank
        else:
            e2, m2, rank = t2, 0.0, 0
        rows.append({"module": m, "layer": layer_of(m), "projection": short_module(m),
                     "rank_merged": rank, "norm_target": math.sqrt(t2), "norm_merged": math.sqrt(m2),
                     "rel_error": math.sqrt(e2) / math.sqrt(t2) if t2 > 0 else math.sqrt(e2)})
    return pd.DataFrame(rows)
