"""Random LoRA adapters on disk, for tests, benchmarks and dry runs of a study.

:func:`make_random_adapter` writes a standard PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) whose factors are seeded Gaussians, plus ``interp_meta.json``
recording the base model, so :class:`interp.adapters.library.AdapterLibrary` validates it like a
trained expert. No training happens: it takes well under a second on the tiny models.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from interp.models import atomic_directory, atomic_write_text, check_fused_targets, load_hf, write_manifest

META = "interp_meta.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    base_name: str | os.PathLike,
    out_dir: str | os.PathLike,
    r: int = 4,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    lora_alpha: float | None = None,
    b_std: float = 0.05,
    layers: Sequence[int] | None = None,
    adapter_name: str = "default",
    hf_model: Any = None,
) -> Path:
    """Write a seeded random LoRA adapter for ``base_name`` to ``out_dir`` (atomically).

    Factors per targeted module (``nn.Linear`` weight ``[d_out, d_in]``):
    ``A ~ N(0, 1/d_in)`` of shape ``[r, d_in]`` and ``B ~ N(0, b_std²)`` of shape ``[d_out, r]``,
    drawn from one ``torch.Generator`` seeded with ``seed`` in module order, so the update is
    ΔW = s·B·A with ``s = lora_alpha / r`` (Hu et al. 2021, eq. 3) and ``‖ΔW x‖ ≈ s·b_std·√r·‖x‖/√d_in``.
    Unlike a trained LoRA, B is non-zero from the start, so the adapter changes the logits.

    Args:
        base_name: registered model name (``"tiny-llama"``) or local HF directory; recorded as
            ``base_model_name_or_path`` in the config and ``base_model`` in ``interp_meta.json``.
        out_dir: the adapter directory to write (replaced if it exists).
        r: LoRA rank.
        target_modules: projection names (PEFT ``target_modules``).
        seed: seed of the factors (same seed → byte-identical weights).
        lora_alpha: LoRA alpha; default ``2·r`` (scale 2).
        b_std: standard deviation of B's entries (0 gives an all-zero, "untrained" B).
        layers: restrict to these layer indices (PEFT ``layers_to_transform``); default all.
        adapter_name: PEFT adapter name used while building (not stored in the directory).
        hf_model: an already loaded HF base model to wrap instead of loading ``base_name``
            (it is *not* modified: a deep copy is used).

    Returns:
        ``Path(out_dir)``.

    Raises:
        interp.models.ModelLoadError: unknown base model.
        interp.models.FusedProjectionError: a target is a fused projection (GPT-2 ``c_attn``).
        ValueError: ``r < 1`` or negative ``b_std``.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if b_std < 0:
        raise ValueError(f"b_std must be >= 0, got {b_std}")
    if hf_model is None:
        hf_model, _ = load_hf(base_name)
    else:
        hf_model = copy.deepcopy(hf_model)
    check_fused_targets(hf_model, list(target_modules))
    cfg = LoraConfig(r=r, lora_alpha=float(2 * r if lora_alpha is None else lora_alpha),
                     target_modules=list(target_modules), lora_dropout=0.0,
                     init_lora_weights=False,
                     layers_to_transform=list(layers) if layers is not None else None)
    pm = get_peft_model(hf_model, cfg, adapter_name=adapter_name)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, mod in sorted(pm.named_modules()):
            if hasattr(mod, "lora_A") and adapter_name in getattr(mod, "lora_A", {}):
                A = mod.lora_A[adapter_name].weight
                B = mod.lora_B[adapter_name].weight
                A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[1]))
                B.copy_(torch.randn(B.shape, generator=gen) * b_std)
    pm.peft_config[adapter_name].base_model_name_or_path = str(base_name)
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        pm.save_pretrained(str(tmp), selected_adapters=[adapter_name], safe_serialization=True)
        # save_pretrained puts non-default adapters in a subfolder; flatten it.
        sub = tmp / adapter_name
        if adapter_name != "default" and sub.is_dir():
            for p in sub.iterdir():
                os.replace(p, tmp / p.name)
            sub.rmdir()
        atomic_write_text(tmp / META, json.dumps(
            {"base_model": str(base_name), "kind": "random", "seed": int(seed), "r": int(r),
             "b_std": float(b_std), "target_modules": list(target_modules)}, indent=1))
        write_manifest(tmp)
    return out
