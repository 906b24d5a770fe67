"""interp: mechanistic interpretability of LoRA reuse.

Load merged and routed LoRA adapters into hooked TransformerLens models, patch activations to test
whether a two-hop query's bridge entity is computed and used, and measure LoRA update subspaces
against the theory's bounds.
"""

from interp.models import HookedModel, list_models, load_model

__version__ = "0.1.0"


def load_hooked(model, adapters=None, combine="none", **options):
    """Base model + PEFT adapters, merged or routed, in one hooked model (see interp.adapters)."""
    from interp.adapters import load_hooked as _load_hooked

    return _load_hooked(model, adapters or {}, combine=combine, **options)


__all__ = ["HookedModel", "load_model", "load_hooked", "list_models", "__version__"]
