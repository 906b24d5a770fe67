"""Every reach into TransformerLens, transformers or peft internals, in one module.

interp wraps PEFT LoRA layers inside a TransformerLens ``TransformerBridge`` and adds hook points
of its own; doing that needs a few names those libraries do not promise to keep. They are all
here, so a version bump has one place to look (pinned: transformer-lens 4.3.0, transformers
5.23.0, peft 0.21.2):

- TransformerLens bridge components keep the wrapped HF module as the attribute
  ``original_component``, registered as the child ``_original_component`` (so module paths read
  through a bridge carry those segments); hook points are looked up in the bridge's
  ``_hook_registry`` (``hook_dict`` reads it), and its unembedding's linear layer is
  ``bridge.unembed.original_component``.
- peft LoRA layers keep the wrapped layer as ``base_layer``; a ``PeftModel``'s HF model is
  ``base_model.model``.
- transformers model configs select their attention kernel with ``config._attn_implementation``.
- A module's ``forward`` is replaced per instance (never on the class) to insert the per-adapter
  hook points; the original bound method is kept by the replacement.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

BRIDGE_SEGMENTS = ("_original_component", "original_component")
LORA_SEGMENT = "base_layer"
PEFT_PREFIX = "base_model.model."


def clean_module_path(name: str, drop_lora_wrapper: bool = False, drop_peft_prefix: bool = False) -> str:
    """A module path as the base HF model names it: bridge wrapper segments removed (optionally
    peft's ``base_layer`` segments and its ``base_model.model.`` prefix too).

    >>> clean_module_path("model.layers.0._original_component.self_attn.q_proj")
    'model.layers.0.self_attn.q_proj'
    """
    drop = BRIDGE_SEGMENTS + ((LORA_SEGMENT,) if drop_lora_wrapper else ())
    out = ".".join(p for p in name.split(".") if p not in drop)
    if drop_peft_prefix and out.startswith(PEFT_PREFIX):
        out = out[len(PEFT_PREFIX):]
    return out


def unwrap(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module one wrapper below ``module`` (a bridge component's HF module, or a LoRA layer's
    base layer), or ``None`` if ``module`` wraps nothing."""
    for attr in ("_original_component", LORA_SEGMENT):
        inner = getattr(module, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def peft_inner_model(model: Any) -> Any | None:
    """The HF model inside a ``PeftModel`` (``base_model.model``), or ``None`` for a plain model."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and inner is not model else None


def register_hook_point(bridge: Any, hook_point: Any) -> None:
    """Make a ``HookPoint`` created outside the bridge visible to ``bridge.hook_dict``,
    ``run_with_hooks`` and ``run_with_cache`` under ``hook_point.name``."""
    bridge._hook_registry[hook_point.name] = hook_point


def replace_forward(module: torch.nn.Module, make: Callable[[Callable], Callable]) -> None:
    """Replace ``module.forward`` on this instance by ``make(original_bound_forward)``, bound to
    the module (the class and other instances are untouched)."""
    module.forward = types.MethodType(make(module.forward), module)


def use_eager_attention(config: Any) -> Any:
    """Select transformers' eager attention kernel on ``config`` (returned): the one the bridge's
    attention hooks (patterns, scores) see every step of."""
    config._attn_implementation = "eager"
    return config


def unembed_linear(bridge: Any) -> torch.nn.Linear | None:
    """The bridge's unembedding as a plain ``nn.Linear`` (``W_U`` rows readable directly), or
    ``None`` when it is anything else (e.g. a LoRA layer on ``lm_head``)."""
    lin = getattr(bridge.unembed, "original_component", None)
    return lin if type(lin) is torch.nn.Linear else None
