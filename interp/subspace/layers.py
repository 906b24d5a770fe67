"""Layer placement: where an adapter writes, and its mass past the bridge layer."""

from __future__ import annotations

from typing import Mapping

import torch

from interp.adapters.factors import LoraDelta, layer_of
from interp.errors import SubspaceError
from interp.subspace.svd import DTYPE


def layer_energy(deltas: Mapping[str, LoraDelta], n_layers: int | None = None) -> torch.Tensor:
    """Layer energy profile e(ℓ) = Σ_{modules at ℓ} ‖ΔW‖_F² / Σ_{all modules} ‖ΔW‖_F², from the factors.

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
    """Late mass m₂ = Σ_{ℓ > ℓ*} e(ℓ): the share of an expert's update
    after the layer ℓ* where the bridge entity becomes decodable.

    Args:
        profile: ``[n_layers]`` from :func:`layer_energy`; bridge_layer: ℓ* (−1 → all mass).

    Raises:
        SubspaceError: ℓ* outside [−1, n_layers − 1].
    """
    profile = torch.as_tensor(profile, dtype=DTYPE)
    if not -1 <= bridge_layer < profile.shape[0]:
        raise SubspaceError(f"late_mass: bridge_layer {bridge_layer} outside [-1, {profile.shape[0] - 1}]")
    return float(profile[bridge_layer + 1:].sum())
