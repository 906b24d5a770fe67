"""How each registered model is built offline: SmolLM2 from its GGUF, tiny random-init models.

:mod:`interp.registry` names these builders; :func:`interp.models.load_model` calls them and puts
the result inside a TransformerBridge. The SmolLM2 GGUF is dequantised once to fp32 safetensors
in ``$INTERP_CACHE/models/smollm2-135m`` with a checksum manifest; later builds verify it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from interp.errors import ModelLoadError
from interp.files import (MANIFEST, atomic_directory, cache_dir, sha256_file, smollm2_gguf_path, verify_manifest,
                          write_manifest)
from interp.surgery import use_eager_attention


def _convert_gguf_to_safetensors(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF to fp32 safetensors + tokenizer in ``target``, atomically, with manifest."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(target) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it carries its quantisation marker.
        cfg_dict = hf.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg = AutoConfig.for_model(**cfg_dict)
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        clean.load_state_dict(hf.state_dict())
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(tmp, {"source": str(gguf), "source_sha256": sha256_file(gguf)})


def smollm2_dir(rebuild: bool = False) -> Path:
    """The verified safetensors directory of SmolLM2-135M, built from the GGUF if needed.

    A directory whose manifest fails (truncated or corrupted file) is rebuilt, never loaded.
    """
    target = cache_dir() / "models" / "smollm2-135m"
    ok, reason = verify_manifest(target) if target.exists() and not rebuild else (False, "rebuild")
    if not ok:
        if target.exists() and reason != "rebuild":
            import warnings
            warnings.warn(f"SmolLM2 cache at {target} is invalid ({reason}); rebuilding from GGUF")
        _convert_gguf_to_safetensors(smollm2_gguf_path(), target)
        ok, reason = verify_manifest(target)
        if not ok:  # pragma: no cover - would mean the disk lies to us
            raise ModelLoadError(f"freshly written SmolLM2 cache does not verify: {reason}")
    return target


def _build_smollm2() -> tuple[Any, Any]:
    return load_hf_dir(smollm2_dir())


def smollm2_config() -> Any:
    """SmolLM2-135M's transformers config (eager attention), from the dequantised cache."""
    from transformers import AutoConfig

    return use_eager_attention(AutoConfig.from_pretrained(str(smollm2_dir())))


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer (3 specials + 256 bytes + 52 "space+letter" merges), on disk.

    Every text tokenises (one token per UTF-8 byte, except that a space followed by an ASCII
    letter is one token), so multi-token entity names are the norm while a word's first token
    (" V" of " Vexmoor") still tells answers apart, as with real subword tokenizers. Saved under
    the cache dir because the bridge re-opens tokenizers by path. Ids: 0 ``<pad>``, 1 ``<s>``,
    2 ``</s>``, bytes from 3, merges from 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    target = cache_dir() / "tokenizers" / "bytes-v2"
    if not (target / MANIFEST).is_file() or not verify_manifest(target)[0]:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
        for ch in sorted(alphabet):
            vocab[ch] = len(vocab)
        letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        merges = [("Ġ", c) for c in letters]  # "Ġ" is the byte-level symbol of a space
        for a, b in merges:
            vocab[a + b] = len(vocab)
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", unk_token="</s>")
        with atomic_directory(target) as tmp:
            fast.save_pretrained(tmp)
            write_manifest(tmp)
    return AutoTokenizer.from_pretrained(str(target))


BYTE_VOCAB = 311


def tiny_config(arch: str):
    """Config of a tiny random model with a real architecture's code path.

    Shapes are deliberately non-square (d_model 96 ≠ d_mlp 160 ≠ vocab 311 ≠ n_ctx) and use
    GQA (6 query heads over 2 key-value heads), so transposition bugs cannot hide.
    """
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=BYTE_VOCAB, hidden_size=96, intermediate_size=160,
                  num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=10000.0)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=10000.0)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=BYTE_VOCAB, n_embd=96, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=1, eos_token_id=2)
    else:
        raise ModelLoadError(f"unknown tiny architecture {arch!r} (llama, qwen2, gpt2)")
    return use_eager_attention(cfg)


def build_tiny(arch: str, seed: int = 0) -> tuple[Any, Any]:
    """A seeded random-init tiny model of architecture ``arch`` and the byte tokenizer."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # Default init (std 0.02) makes a near-uniform, featureless model; a larger scale
        # gives tiny models peaked, position-dependent logits, so patching tests have signal.
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.15)
    return hf, byte_tokenizer()


def load_hf_dir(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load a local Hugging Face model directory (fp32, eager attention) and its tokenizer.

    Raises:
        ModelLoadError: no ``config.json``, a failing ``manifest.json``, or no usable tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    if (path / MANIFEST).is_file():
        ok, reason = verify_manifest(path)
        if not ok:
            raise ModelLoadError(f"model directory {path} fails its manifest: {reason}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"no usable tokenizer in {path}: {e}") from e
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                              attn_implementation="eager")
    return hf, tok

