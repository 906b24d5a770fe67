"""Random-init models with the shapes of real checkpoints, for timing without weights.

Speed does not depend on weight values, so a model built from a real config (Qwen2.5-0.5B,
Llama-3.2-1B) with random weights times like the checkpoint. The tokenizer is an offline
word-level one (``t1 t2 ...``; one token per word), saved to a temp dir because the bridge
re-opens tokenizers by path (recipe of ``shared/gpu/probe_random_arch.py``).

:func:`register` puts such a model into ``interp.models.REGISTRY`` under its name, so every
interp engine that takes a registered name (``train_expert``, ``load_model``) uses it unchanged.
Each build is seeded: two builds give identical weights (needed to compare two training loops).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, qkv bias (Qwen2)
    "qwen2.5-0.5b-shape": dict(arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                               tie_word_embeddings=True),
    "qwen2.5-1.5b-shape": dict(arch="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                               tie_word_embeddings=True),
    "llama-3.2-1b-shape": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                               tie_word_embeddings=True),
    "llama-3.1-8b-shape": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                               tie_word_embeddings=False),
    # CPU smoke-test shape: the same code paths, tiny sizes.
    "tiny-shape": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=500, tie_word_embeddings=False),
}


def config(name: str, n_layers: int | None = None):
    """The transformers config of shape ``name`` (optionally with ``n_layers`` layers), eager attention."""
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(SHAPES[name])
    arch = spec.pop("arch")
    if n_layers is not None:
        spec["num_hidden_layers"] = int(n_layers)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(**spec, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return cfg


_TOKENIZERS: dict[int, Any] = {}


def word_tokenizer(vocab_size: int) -> Any:
    """Offline word-level tokenizer: ``t{i}`` -> id i (0 = [UNK] = pad/eos/bos), saved to a temp dir."""
    if vocab_size in _TOKENIZERS:
        return _TOKENIZERS[vocab_size]
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    t = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[UNK]",
                                 eos_token="[UNK]", bos_token="[UNK]")
    d = tempfile.mkdtemp(prefix="wordtok-")
    tk.save_pretrained(d)
    _TOKENIZERS[vocab_size] = AutoTokenizer.from_pretrained(d)
    return _TOKENIZERS[vocab_size]


def build(name: str, device: str | torch.device = "cpu", seed: int = 0, n_layers: int | None = None,
          dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A seeded random-init model of shape ``name``, created directly on ``device``, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    cfg = config(name, n_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return hf.eval(), word_tokenizer(cfg.vocab_size)


def register(name: str, device: str | torch.device = "cpu", seed: int = 0, n_layers: int | None = None,
             dtype: torch.dtype = torch.float32) -> str:
    """Register shape ``name`` in ``interp.models.REGISTRY`` (a fresh seeded build per load, made
    directly on ``device`` in ``dtype``: a loader that then moves it to the same place copies nothing);
    returns the key."""
    from interp.models import REGISTRY, ModelSpec

    key = name if n_layers is None else f"{name}-L{n_layers}"
    REGISTRY[key] = ModelSpec(key, f"random-init {name} (benchmark only)", "?",
                              lambda: build(name, device, seed, n_layers, dtype), lambda: True, "random-init")
    return key


def register_text(name: str, device: str | torch.device = "cpu", seed: int = 0, n_layers: int | None = None) -> str:
    """Register shape ``name`` with interp's byte-level tokenizer instead of the word-level one,
    so the study's English prompts tokenise (ids < 311 of the real vocabulary; the embedding and
    unembedding keep the real shape). Each load is a fresh seeded float32 build made directly on
    ``device`` (identical weights every time; no host-to-device copy, so load times are lower
    than a checkpoint read from disk). Returns the key (``NAME-text``)."""
    from interp.models import REGISTRY, ModelSpec, byte_tokenizer, use_eager_attention

    def build_text():
        from transformers import AutoModelForCausalLM

        cfg = use_eager_attention(config(name, n_layers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        return hf.eval(), byte_tokenizer()

    key = f"{name}-text" if n_layers is None else f"{name}-L{n_layers}-text"
    REGISTRY[key] = ModelSpec(key, f"random-init {name}, byte tokenizer (benchmark only)", "?",
                              build_text, lambda: True, "random-init")
    return key


def hooked(name: str, device: str | torch.device = "cpu", seed: int = 0, n_layers: int | None = None,
           dtype: torch.dtype = torch.float32) -> Any:
    """A ``HookedModel`` (bridge + HF model + tokenizer) of a random-init shape, on ``device``."""
    from interp.models import HookedModel, bridge_model

    hf, tok = build(name, device, seed, n_layers, dtype)
    br = bridge_model(hf, tok, name, device)
    return HookedModel(name=name, bridge=br, hf_model=hf, tokenizer=tok, info={"source": "random-init"})


def random_pairs(vocab_size: int, n_prompts: int, n_tokens: int, seed: int = 1, corrupt_pos: int = 2):
    """Clean tokens, corrupted tokens (one position changed), and two distinct answer ids per prompt."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab_size, (n_prompts, n_tokens), generator=g)
    corr = clean.clone()
    corr[:, corrupt_pos] = torch.randint(1, vocab_size, (n_prompts,), generator=g)
    ca = torch.randint(1, vocab_size, (n_prompts,), generator=g)
    xa = (ca + 1 + torch.randint(0, vocab_size - 2, (n_prompts,), generator=g)) % (vocab_size - 1) + 1
    xa = torch.where(xa == ca, (ca % (vocab_size - 1)) + 1, xa)
    return clean, corr, ca, xa


def word_examples(vocab_size: int, n: int, prompt_words: int, answer_words: int = 1, seed: int = 0):
    """``n`` synthetic (prompt, answer) fact pairs in the word-level vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (n, prompt_words + answer_words), generator=g).tolist()
    return [(" ".join(f"t{i}" for i in row[:prompt_words]),
             " " + " ".join(f"t{i}" for i in row[prompt_words:])) for row in ids]


def skeleton(name: str, dtype: torch.dtype = torch.bfloat16, n_layers: int | None = None) -> Any:
    """Shape ``name`` with *uninitialised* CPU weights (no init cost): only for writing adapter
    files (``make_random_adapter(..., hf_model=skeleton(...))`` reads module shapes, not values)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config(name, n_layers), dtype=dtype)
    return hf.to_empty(device="cpu").eval()
