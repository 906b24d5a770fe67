"""interp: mechanistic interpretability of LoRA reuse.

Load merged and routed LoRA adapters into hooked TransformerLens models, patch activations to test
whether a two-hop query's bridge entity is computed and used, and measure LoRA update subspaces
against the theory's bounds.

interp never downloads: importing it switches the Hugging Face libraries to offline mode, whatever
the environment says. Heavy modules (torch, transformers) load on first use, so the command line
starts fast.
"""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def enforce_offline() -> None:
    """Put huggingface_hub / transformers / datasets in offline mode (environment and, if already
    imported, huggingface_hub's own flag, which every hub call reads)."""
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


enforce_offline()

_LAZY = {"HookedModel": "interp.models", "load_model": "interp.models", "list_models": "interp.models"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


def load_hooked(model, adapters=None, combine="none", **options):
    """Base model + PEFT adapters, merged or routed, in one hooked model (see interp.adapters).

    Options include ``device=`` and ``dtype=`` (default: a HookedModel's own, else CPU float32)."""
    from interp.adapters import load_hooked as _load_hooked

    return _load_hooked(model, adapters or {}, combine=combine, **options)


__all__ = ["HookedModel", "load_model", "load_hooked", "list_models", "enforce_offline", "__version__"]
