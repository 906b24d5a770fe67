"""Key overlap: how much of a module's input lies in an adapter's row space,
on composed queries vs the adapter's own training prompts."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from interp.adapters.factors import LoraDelta, layer_of, short_module
from interp.errors import SubspaceError
from interp.subspace.overlap import resolve_linear
from interp.subspace.svd import DTYPE, left_right_bases


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
        SubspaceError: empty prompts/modules or an unknown ``position``; KeyError / SubspaceError:
            a module path that does not resolve to a linear layer; RuntimeError: a hooked module
            never ran (e.g. a fused projection bypassed by a bridge without interp's LoRA hooks).
    """
    if position not in ("final", "all"):
        raise SubspaceError(f"module_inputs: position must be 'final' or 'all', got {position!r}")
    if not prompts:
        raise SubspaceError("module_inputs: no prompts")
    if not modules:
        raise SubspaceError("module_inputs: no modules")
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
            # a fused projection the bridge runs as split copies (interp.adapters.hooks): each copy reads its input
            lin = (getattr(lin, "_interp_parts", None) or [lin])[0]
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
    """Key overlap κ = ‖P_R x‖² / ‖x‖² per activation (from the one-layer key-value model of
    Chen et al. 2025, arXiv 2506.13479): the energy fraction of a module's
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
    plus output triggering ‖ΔW x‖.

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
        SubspaceError / KeyError / SubspaceError: as :func:`module_inputs` and :func:`key_overlap`.
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
