"""The patching engine's core: forwards that start at a block from cached residuals and keys/values,
the answer logit difference, hook names, and the memory-driven batch sizes."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from interp.errors import PatchingError, UnsupportedHookError
from interp.packing import first_fit_decreasing
from interp.surgery import unembed_linear


SHORT_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}


@contextlib.contextmanager
def skip_blocks(bridge: Any, n: int):
    """Make blocks ``0..n-1`` of ``bridge`` identity maps for the duration of the context.

    Used with ``start_at_layer=n``: the bridge would otherwise still execute (and discard) the
    earlier blocks. The residual entering block ``n`` is swapped in by the bridge, so the skipped
    blocks' outputs are never read. Restored on exit, even after an exception.
    """
    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    done = []
    try:
        for block in list(bridge.blocks)[:n]:
            object.__setattr__(block, "forward", identity)
            done.append(block)
        yield
    finally:
        for block in done:
            object.__delattr__(block, "forward")


def _kv_tensors(past: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) ``[batch, kv_heads, pos, head_dim]`` of a transformers cache."""
    if hasattr(past, "layers"):
        return [(lay.keys, lay.values) for lay in past.layers]
    return [(k, v) for k, v in past]  # legacy tuple format


@torch.no_grad()
def forward_from(hm: Any, start_layer: int, resid: torch.Tensor,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None, logits_to_keep: int,
                 fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> torch.Tensor:
    """Run the bridge from block ``start_layer`` on residual states of positions ``p0..``.

    Args:
        hm: a ``HookedModel``.
        start_layer: block whose ``resid_pre`` ``resid`` is.
        resid: ``[N, S, d_model]`` residual entering block ``start_layer`` at global positions
            ``p0 .. p0+S-1``.
        kv: per layer ``(keys, values)`` ``[N, kv_heads, p0, head_dim]`` of positions ``< p0``
            (``None`` when ``p0 == 0``). Only layers ≥ ``start_layer`` are read.
        logits_to_keep: unembed only the last this many positions.
        fwd_hooks: TransformerLens hooks; activations they see cover local positions only.

    Returns:
        ``[N, logits_to_keep, d_vocab]`` logits.
    """
    from transformers import DynamicCache

    past = None
    if kv is not None and kv[0][0].shape[-2] > 0:
        past = DynamicCache()
        for i, (k, v) in enumerate(kv):
            past.update(k, v, i)
    kwargs = {"logits_to_keep": int(logits_to_keep)}
    if past is not None:
        kwargs["past_key_values"] = past
    with skip_blocks(hm.bridge, start_layer):
        out = hm.bridge.run_with_hooks(resid, start_at_layer=start_layer, fwd_hooks=list(fwd_hooks),
                                       **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


# Hooks whose activation puts the head axis before the position: [batch, head, q_pos, k_pos].
# Indexing them as [batch, position] would patch head p, not position p: refused.
HEAD_FIRST_HOOKS = ("hook_attn_scores", "hook_pattern")


def supported_hooks() -> str:
    """What the patching engine accepts, for error messages and docs."""
    return (f"short names {', '.join(SHORT_HOOKS)} (fast engine), or any template "
            "'blocks.{layer}.<hook>' whose activation is [batch, pos, ...] (full forwards): "
            "hook_resid_mid, hook_resid_post, ln2.hook_in, mlp.hook_post, an adapter's "
            "lora.<name>.hook_delta; attn.hook_q/k/v/z ([batch, pos, head, d_head]: every head "
            "at the position is patched). Not " + ", ".join(f"attn.{h}" for h in HEAD_FIRST_HOOKS)
            + " (head axis before the position)")


def _hook_template(hook: str) -> str:
    """The ``blocks.{layer}.…`` template of a hook name.

    Raises:
        UnsupportedHookError: not a short name nor a per-block template, or a hook whose
            activation has the head axis before the position (:data:`HEAD_FIRST_HOOKS`).
    """
    t = SHORT_HOOKS.get(hook, hook)
    if not t.startswith("blocks.{layer}.") or t.rsplit(".", 1)[-1] in HEAD_FIRST_HOOKS:
        raise UnsupportedHookError(f"hook {hook!r} cannot be patched by position; supported: "
                                   + supported_hooks())
    return t


@torch.no_grad()
def _run_cached(hm: Any, tokens: torch.Tensor, names: Sequence[str], states: bool = False):
    """One forward: logits, per-layer KV, and the activations ``names``.

    With ``states=True`` the first output is the final *normalised* residual ``[batch, pos,
    d_model]`` instead of the logits (the unembedding is skipped, see :func:`final_states`).
    """
    wanted = set(names)
    ctx = final_states(hm.bridge) if states else contextlib.nullcontext()
    with ctx:
        (logits, past), cache = hm.bridge.run_with_cache(
            tokens, return_type="logits_and_cache", names_filter=lambda n: n in wanted)
    missing = [n for n in names if n not in cache]
    if missing:
        raise PatchingError(f"hook {missing[0]!r} did not fire in {hm.name}: not a hook point of this "
                         "bridge")
    return logits, _kv_tensors(past), {n: cache[n] for n in names}


@contextlib.contextmanager
def final_states(bridge: Any):
    """Make the bridge's unembedding an identity map for the duration of the context.

    A forward then returns the final normalised residual ``ln_final(resid)`` (``[batch, pos,
    d_model]``) where it would return logits: the sweep needs only two answer logits per copy,
    which :func:`answer_logit_diff` projects from it, so the ``d_model × d_vocab`` product over
    every kept position is never formed. Restored on exit, even after an exception.
    """
    un = bridge.unembed
    object.__setattr__(un, "forward", lambda hidden_states, *a, **k: hidden_states)
    try:
        yield
    finally:
        object.__delattr__(un, "forward")


def answer_logit_diff(hm: Any, states: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor) -> torch.Tensor:
    """``logit[a] − logit[b]`` (float32 ``[n]``) from final normalised residuals ``[n, d_model]``.

    When the unembedding is a plain ``nn.Linear`` (every decoder LM the bridge wraps unless
    adapters sit on ``lm_head``), only the two rows ``W_U[a]``, ``W_U[b]`` (and biases) are used;
    otherwise the module runs on ``states`` (one position per copy). Final-logit soft-capping
    (``config.final_logit_softcapping``, Gemma 2) is applied to both logits, as the model does.
    """
    un = hm.bridge.unembed
    lin = unembed_linear(hm.bridge)
    if lin is not None:
        w = lin.weight
        h = states.to(w.dtype)
        za = torch.bmm(h[:, None, :], w[a][:, :, None])[:, 0, 0]
        zb = torch.bmm(h[:, None, :], w[b][:, :, None])[:, 0, 0]
        if lin.bias is not None:
            za, zb = za + lin.bias[a], zb + lin.bias[b]
    else:
        logits = un(states[:, None, :])[:, 0]
        rows = torch.arange(len(a), device=logits.device)
        za, zb = logits[rows, a], logits[rows, b]
    cfg = getattr(hm.hf_model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None) or getattr(
        getattr(cfg, "text_config", None), "final_logit_softcapping", None)
    if cap:
        za, zb = torch.tanh(za / cap) * cap, torch.tanh(zb / cap) * cap
    return (za - zb).float()


@torch.no_grad()
def forward_packed(hm: Any, start_layer: int, resid: torch.Tensor,
                   kv: list[tuple[torch.Tensor, torch.Tensor]] | None, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor,
                   fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> torch.Tensor:
    """Run the bridge from block ``start_layer`` on packed rows; return final normalised states.

    Args:
        hm: a ``HookedModel``.
        start_layer: block whose ``resid_pre`` ``resid`` is.
        resid: ``[R, C, d_model]`` residual entering block ``start_layer``; a row may hold
            several independent segments (one per patched copy).
        kv: per layer ``(keys, values)`` ``[R, kv_heads, P, head_dim]`` of a cached prefix
            (``None``: no prefix). Only layers ≥ ``start_layer`` are read.
        attention_mask: ``[R, 1, C, P + C]``, additive (0 = may attend, the dtype's minimum =
            masked) or bool (True = may attend): the segments' own causal structure and which
            prefix entries each slot sees.
        position_ids: ``[R, C]`` absolute positions of the slots (rotary embeddings).
        fwd_hooks: TransformerLens hooks; activations they see are ``[R, C, ...]``.

    Returns:
        ``[R, C, d_model]``: ``ln_final`` of the last block's output at every slot.
    """
    from transformers import DynamicCache

    kwargs: dict[str, Any] = {"logits_to_keep": 0, "attention_mask": attention_mask,
                              "position_ids": position_ids}
    if kv is not None and kv[start_layer][0].shape[-2] > 0:
        past = DynamicCache()
        for i, (k, v) in enumerate(kv):
            past.update(k, v, i)
        kwargs["past_key_values"] = past
    with skip_blocks(hm.bridge, start_layer), final_states(hm.bridge):
        out = hm.bridge.run_with_hooks(resid, start_at_layer=start_layer, fwd_hooks=list(fwd_hooks),
                                       **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _pack(suffixes: tuple[int, ...], capacity: int, max_copies: int) -> list[list[tuple[int, int]]]:
    """First-fit-decreasing packing of segments (lengths ``suffixes``) into rows of ``capacity``,
    at most ``max_copies`` per row (:func:`interp.packing.first_fit_decreasing`)."""
    return first_fit_decreasing(suffixes, capacity, max_copies)


STACKED_MODEL_TYPES = frozenset({"llama", "qwen2"})


def stacked_ok(hm: Any) -> bool:
    """Whether the sweep may drive the bridge's blocks itself (one pass for copies of all layers).

    True for the architectures whose model forward is ``rotary_emb → blocks → norm`` and which
    are tested against TransformerLens here (``STACKED_MODEL_TYPES``: Llama, Qwen2); other
    models run one bridge forward per layer instead (same results, more launches).
    """
    cfg = getattr(hm.hf_model, "config", None)
    inner = getattr(hm.hf_model, "model", None)
    return (getattr(cfg, "model_type", None) in STACKED_MODEL_TYPES and inner is not None
            and hasattr(inner, "rotary_emb") and hasattr(hm.bridge, "blocks")
            and hasattr(hm.bridge, "ln_final"))


def _sliding_window_below(hm: Any, n_tokens: int) -> bool:
    """A sliding attention window shorter than the prompts (custom masks would ignore it)."""
    cfg = getattr(hm.hf_model, "config", None)
    w = getattr(cfg, "sliding_window", None)
    return bool(w) and getattr(cfg, "use_sliding_window", True) is not False and int(w) < n_tokens


def default_max_batch(hm: Any, n_tokens: int) -> int:
    """Patched copies per forward when not given: 64 on the CPU; on CUDA as many as keep one
    forward's activations (``max_batch × n_tokens`` tokens at most) within min(4 GiB, 1/8 of the
    free memory), and at least 256."""
    dev = hm.device
    if dev.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(dev)
    cfg = hm.bridge.cfg
    d = int(cfg.d_model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    per_token = (8 * d + 3 * d_mlp) * next(hm.hf_model.parameters()).element_size()
    return int(max(256, min(4 << 30, free // 8) // (max(n_tokens, 1) * per_token)))


def auto_prompt_chunk(hm: Any, n_tokens: int, n_cached: int, budget_bytes: int | None = None) -> int:
    """Prompts per chunk so that one chunk's cached runs stay within a memory budget.

    A chunk caches, per prompt, ``n_cached`` activations ``[n_tokens, d_model]`` (clean and
    corrupted, one per swept layer) and the corrupted keys/values of every layer, plus the
    transient activations of its two full forwards. The budget is ``budget_bytes`` or, by
    default, a quarter of the free GPU memory capped at 4 GiB on CUDA and 1 GiB on the CPU.
    """
    dev = hm.device
    if budget_bytes is None:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget_bytes = min(4 << 30, free // 4)
        else:
            budget_bytes = 1 << 30
    cfg = hm.bridge.cfg
    d = int(cfg.d_model)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    d_head = int(getattr(cfg, "d_head", None) or d // int(cfg.n_heads))
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    elem = next(hm.hf_model.parameters()).element_size()
    per_token = n_cached * d + 2 * hm.n_layers * n_kv * d_head + 4 * d_mlp + 4 * d
    per_prompt = n_tokens * per_token * elem + n_tokens * n_tokens * int(cfg.n_heads) * 4
    return max(1, int(budget_bytes // max(per_prompt, 1)))


