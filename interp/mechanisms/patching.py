"""Activation patching engine: layer × position sweeps, back-patching, attention knockout.

**Activation patching** (Meng et al. 2022; TransformerLens ``patching``; notation of Heimersheim &
Nanda 2024): run a clean prompt (answer a) and a corrupted prompt (e₁ swapped, answer a'), write
the clean activation of one hook at one (layer, position) into the corrupted run, and measure the
logit difference ``LD = logit[a] − logit[a']`` (first answer tokens, final position), normalised

    value = (LD_patched − LD_corrupted) / (LD_clean − LD_corrupted)        (1 = fully restored).

**How the engine is fast and still exact.** TransformerLens's ``get_act_patch_resid_pre`` runs one
full forward of the whole corrupted batch per (layer, position). Here, for a patch at layer ℓ and
position p:

* nothing before block ℓ changes, so the forward *starts at block ℓ* from the cached corrupted
  ``resid_pre`` (the bridge's ``start_at_layer``; blocks < ℓ are skipped outright — the bridge
  itself would still execute them and discard the result);
* nothing at positions < p changes (causal attention), so those positions come from the cached
  corrupted keys/values (a ``DynamicCache`` prefix), and positions after the prompt's final
  token are never needed: each patched copy recomputes exactly its own segment ``p .. final``;
* the segments of one prompt are packed into rows (first-fit decreasing; suffix lengths
  1..n pair up), a row reads its prompt's corrupted keys/values and a block-diagonal causal
  mask keeps segments apart, so no position is computed twice;
* one pass over the blocks carries the rows of every layer, each row joining at its block ℓ
  (Llama and Qwen2; other models run one bridge forward per layer): up to ``max_batch``
  copies per pass (64 on the CPU; on CUDA from the free memory, ≥ 256), so the matrix
  products are few and large and Python runs once per block, not once per (layer, block);
* a copy whose clean activation equals the corrupted one bit for bit (every position before
  the first differing token; at layer 0 of ``resid_pre``, every position whose token agrees)
  would run the corrupted forward unchanged: its value is the corrupted logit difference;
* nothing is unembedded: the final normalised residual is projected on the two answer rows of
  ``W_U`` (``logit[a] − logit[a']``), never on the whole vocabulary;
* prompts are processed in chunks (``prompt_chunk``) whose cached runs fit a memory budget.

Results equal ``transformer_lens.patching.get_act_patch_resid_pre / _attn_out / _mlp_out`` on the
same bridge (tests: ≤ 1e-4 on tiny Llama and Qwen2).

**Back-patching** (Biran et al. 2024, "Hopping Too Late", EMNLP 2024, §5): the final-position
residual at source layer ℓs written into ``resid_pre`` of target layer ℓt ≤ ℓs of the *same*
prompt; a query is *fixed* when its first answer token becomes top-1 and was not.

**Attention knockout** (Geva et al. 2023, "Dissecting Recall of Factual Associations", EMNLP 2023,
§5): attention from the final token to the e₁ span is blocked in a window of layers by setting
those pre-softmax scores to −∞ (``attn.hook_attn_scores``), so softmax renormalises over the
remaining keys exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.mechanisms.lens import (
    SpanDict,
    SpansFn,
    entity_first_token,
    example_meta,
    position_label,
    resolve_spans,
)

SHORT_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PatchPair:
    """A clean / corrupted prompt pair of equal token length.

    Attributes:
        example_id: index of the clean example in the caller's list.
        clean_prompt, corrupted_prompt: the two prompts.
        clean_answer, corrupted_answer: gold continuations (leading space); their first tokens
            define the logit difference.
        spans: token spans of the clean prompt (``{"e1": (start, end)}``), for position labels.
        tier, kind, chain_id: metadata copied into result tables.
    """

    example_id: int
    clean_prompt: str
    corrupted_prompt: str
    clean_answer: str
    corrupted_answer: str
    spans: SpanDict = dataclasses.field(default_factory=dict)
    tier: str = ""
    kind: str = ""
    chain_id: int = -1


def make_corrupted_pairs(examples: Sequence[Any], hm: Any, seed: int = 0,
                         spans: Sequence[SpanDict] | None = None,
                         spans_fn: SpansFn | None = None) -> list[PatchPair]:
    """Corrupt each example by swapping e₁ for another example's e₁ (Meng et al. 2022 style).

    The donor has the same tier, kind and template (so its own answer is the corrupted answer),
    a different first answer token, and the corrupted prompt has the same token length as the
    clean one (so positions align). Donors are drawn with ``random.Random(seed)``.

    Args:
        examples: objects with ``prompt``, ``answer``, ``e1``, ``char_spans["e1"]``, ``tier``,
            ``kind`` and optionally ``template_id``, ``chain_id``.
        hm: the ``HookedModel`` whose tokenizer defines token lengths.
        seed: RNG seed for donor choice.
        spans, spans_fn: token spans (see :func:`interp.mechanisms.lens.resolve_spans`).

    Returns:
        One :class:`PatchPair` per example that has a donor (others are skipped with a warning).

    Raises:
        ValueError: no example has a valid donor, or an example lacks an ``e1`` span.
    """
    rng = random.Random(seed)
    sp = resolve_spans(examples, hm, spans, spans_fn)
    first = [int(hm.encode(ex.answer)[0]) for ex in examples]
    lengths = [len(hm.encode(ex.prompt)) for ex in examples]
    pairs, skipped = [], 0
    for i, ex in enumerate(examples):
        if "e1" not in ex.char_spans:
            raise ValueError(f"example {i} ({ex.prompt!r}) has no e1 span to corrupt")
        cs, ce = ex.char_spans["e1"]
        cands = []
        for j, d in enumerate(examples):
            if (j == i or d.e1 == ex.e1 or first[j] == first[i]
                    or getattr(d, "tier", None) != getattr(ex, "tier", None)
                    or getattr(d, "kind", None) != getattr(ex, "kind", None)
                    or getattr(d, "template_id", None) != getattr(ex, "template_id", None)):
                continue
            corrupted = ex.prompt[:cs] + d.e1 + ex.prompt[ce:]
            if len(hm.encode(corrupted)) == lengths[i]:
                cands.append((j, corrupted))
        if not cands:
            skipped += 1
            continue
        j, corrupted = rng.choice(cands)
        pairs.append(PatchPair(i, ex.prompt, corrupted, ex.answer, examples[j].answer, sp[i],
                               getattr(ex, "tier", ""), getattr(ex, "kind", ""),
                               getattr(ex, "chain_id", i)))
    if not pairs:
        raise ValueError("no example has a donor of the same tier/kind/template, equal token "
                         "length and a different answer")
    if skipped:
        warnings.warn(f"make_corrupted_pairs: {skipped} of {len(examples)} examples had no donor")
    return pairs


# --------------------------------------------------------------------------------------------
# Engine core
# --------------------------------------------------------------------------------------------


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


def _hook_template(hook: str) -> str:
    t = SHORT_HOOKS.get(hook, hook)
    if not t.startswith("blocks.{layer}."):
        raise ValueError(f"hook {hook!r}: give a short name ({', '.join(SHORT_HOOKS)}) or a "
                         "template starting with 'blocks.{layer}.'")
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
        raise ValueError(f"hook {missing[0]!r} did not fire in {hm.name}: not a hook point of this "
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
    lin = getattr(un, "original_component", None)
    if type(lin) is torch.nn.Linear:
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
    """First-fit-decreasing packing of segments (lengths ``suffixes``) into rows of ``capacity``.

    Returns rows as lists of ``(segment index, offset in row)``; a row holds at most
    ``max_copies`` segments.
    """
    order = sorted(range(len(suffixes)), key=lambda i: -suffixes[i])
    rows: list[list[tuple[int, int]]] = []
    used: list[int] = []
    for i in order:
        s = suffixes[i]
        for r in range(len(rows)):
            if used[r] + s <= capacity and len(rows[r]) < max_copies:
                rows[r].append((i, used[r]))
                used[r] += s
                break
        else:
            rows.append([(i, 0)])
            used.append(s)
    return rows


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


@dataclasses.dataclass
class PatchGrid:
    """Raw result of a layer × position sweep.

    Attributes:
        hook: hook template patched.
        layers, positions: the swept layer and position indices.
        logit_diff: ``[n_layers_swept, n_positions_swept, batch]`` patched logit differences.
        clean, corrupted: ``[batch]`` unpatched logit differences.
        value: normalised ``(patched − corrupted)/(clean − corrupted)`` (NaN where clean ==
            corrupted).
    """

    hook: str
    layers: list[int]
    positions: list[int]
    logit_diff: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor

    @property
    def value(self) -> torch.Tensor:
        denom = (self.clean - self.corrupted)
        denom = torch.where(denom == 0, torch.full_like(denom, float("nan")), denom)
        return (self.logit_diff - self.corrupted) / denom


@torch.no_grad()
def patch_layer_pos(hm: Any, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor,
                    clean_answer_ids: torch.Tensor, corrupted_answer_ids: torch.Tensor,
                    lengths: torch.Tensor | None = None, hook: str = "resid_pre",
                    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                    max_batch: int | None = None, progress: bool = True,
                    fast: bool | None = None, prompt_chunk: int | None = None,
                    skip_unchanged: bool = True, stack_layers: bool | None = None) -> PatchGrid:
    """Batched layer × position activation patching (clean → corrupted) of one hook.

    Args:
        hm: any ``HookedModel``.
        clean_tokens, corrupted_tokens: ``[batch, pos]`` token ids (same shape; right-padded).
        clean_answer_ids, corrupted_answer_ids: ``[batch]`` first answer tokens.
        lengths: ``[batch]`` real lengths (default: all ``pos``); the metric is read at
            ``lengths - 1``.
        hook: ``"resid_pre" | "attn_out" | "mlp_out"`` or a template
            ``"blocks.{layer}.<hook>"`` whose activation is ``[batch, pos, ...]`` (e.g. a
            per-adapter delta hook).
        layers, positions: subsets to sweep (default all).
        max_batch: patched copies per forward (bounds memory: at most ``max_batch × pos``
            tokens per forward). ``None``: :func:`default_max_batch` (64 on the CPU; on CUDA
            from the free memory, at least 256).
        progress: show a tqdm bar over layers.
        fast: start each forward at block ℓ, reuse the corrupted keys/values and pack copies
            (exact for ``resid_pre``, ``attn_out``, ``mlp_out``: tested against
            TransformerLens). ``None`` (default) = fast for those three, and a batched full
            forward from the tokens for any other hook: some bridge hook points (e.g.
            ``hook_resid_mid``, an alias of ``ln2.hook_in``) are not reproduced by a resumed
            forward. Pass ``fast=True`` only for hooks you have checked.
        prompt_chunk: prompts processed together (their clean and corrupted runs are cached
            at once, so memory grows with it); ``None`` = :func:`auto_prompt_chunk`. Results do
            not depend on it.
        skip_unchanged: a copy whose clean activation equals the corrupted one bit for bit
            (e.g. every position before the first differing token, and at layer 0 of
            ``resid_pre`` every position whose token agrees) runs the corrupted forward
            unchanged, so its value is the corrupted logit difference; such copies are not
            recomputed. ``False`` recomputes them (for timing comparisons).
        stack_layers: one pass over the blocks carries copies of every layer (each joins at
            its block) instead of one forward per layer; ``None`` = where
            :func:`stacked_ok` (Llama, Qwen2). Same results either way.

    Returns:
        A :class:`PatchGrid`; ``logit_diff[i, j, b]`` is the logit difference when the clean
        activation at (``layers[i]``, ``positions[j]``) is patched into corrupted prompt ``b``,
        equal to TransformerLens's per-example sweep value.

    Raises:
        ValueError: shape mismatches, out-of-range layers/positions, an unknown hook.
    """
    dev = hm.device
    clean_tokens, corrupted_tokens = clean_tokens.to(dev), corrupted_tokens.to(dev)
    if clean_tokens.shape != corrupted_tokens.shape or clean_tokens.ndim != 2:
        raise ValueError(f"clean {tuple(clean_tokens.shape)} and corrupted "
                         f"{tuple(corrupted_tokens.shape)} token tensors must be equal [batch, pos]")
    B, T = clean_tokens.shape
    L = hm.n_layers
    lengths = (torch.full((B,), T, device=dev) if lengths is None else lengths.to(dev)).long()
    if lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths must lie in [1, {T}]")
    ca, xa = clean_answer_ids.to(dev).long(), corrupted_answer_ids.to(dev).long()
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    if any(not 0 <= l < L for l in layers) or any(not 0 <= p < T for p in positions):
        raise ValueError(f"layers must lie in [0, {L}) and positions in [0, {T})")
    if max_batch is None:
        max_batch = default_max_batch(hm, T)
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    template = _hook_template(hook)
    if fast is None:
        fast = template in SHORT_HOOKS.values()
    if fast and _sliding_window_below(hm, T):
        warnings.warn("sliding-window attention shorter than the prompts: patching with full "
                      "forwards (the packed engine's masks would ignore the window)")
        fast = False
    if stack_layers is None:
        stack_layers = stacked_ok(hm)
    is_resid_pre = template == SHORT_HOOKS["resid_pre"]
    if prompt_chunk is None:
        n_cached = len(layers) * (2 if is_resid_pre or not skip_unchanged else 3)
        prompt_chunk = auto_prompt_chunk(hm, T, n_cached)
    if prompt_chunk < 1:
        raise ValueError("prompt_chunk must be >= 1")
    parts = []
    for s in range(0, B, prompt_chunk):
        sl = slice(s, s + prompt_chunk)
        Tc = int(lengths[sl].max())  # right padding beyond the chunk's longest prompt: dropped
        parts.append(_patch_chunk(hm, clean_tokens[sl, :Tc], corrupted_tokens[sl, :Tc], ca[sl],
                                  xa[sl], lengths[sl], template, layers, positions, max_batch,
                                  progress and s == 0, fast, skip_unchanged, stack_layers))
    return PatchGrid(template, layers, positions, torch.cat([p[0] for p in parts], dim=-1),
                     torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def _patch_chunk(hm: Any, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor,
                 ca: torch.Tensor, xa: torch.Tensor, lengths: torch.Tensor, template: str,
                 layers: list[int], positions: list[int], max_batch: int, progress: bool,
                 fast: bool, skip_unchanged: bool, stacked: bool):
    """:func:`patch_layer_pos` on one chunk of prompts: ``(logit_diff, clean_ld, corrupted_ld)``.

    The fast path turns every live copy (ℓ, p, b) into a *segment*: the slots ``p .. final_b``
    entering block ℓ (nothing before ``p`` changes). Segments of one prompt share rows
    (first-fit decreasing); each row reads that prompt's cached corrupted keys/values for the
    positions before each segment's start, and a block-diagonal causal mask keeps segments
    apart, so each copy recomputes exactly its own suffix. With ``stacked`` one pass over the
    blocks carries the rows of every layer: a row joins the batch at its block ℓ (few, large
    matrix products, one Python call per block); otherwise one bridge forward runs per layer.
    The plan (which copies, which rows) is made on the CPU and sent to the device in one
    transfer, so the forwards queue on the GPU without host synchronisation.
    """
    dev = hm.device
    B, T = clean_tokens.shape
    is_resid_pre = template == SHORT_HOOKS["resid_pre"]
    names = [template.format(layer=l) for l in layers]
    resid_names = [SHORT_HOOKS["resid_pre"].format(layer=l) for l in layers]
    corr_names = list(dict.fromkeys(resid_names + (names if skip_unchanged else [])))
    finals = lengths - 1
    ar = torch.arange(B, device=dev)

    clean_h, _, clean_acts = _run_cached(hm, clean_tokens, list(dict.fromkeys(names)), states=True)
    clean_ld = answer_logit_diff(hm, clean_h[ar, finals], ca, xa)
    del clean_h
    corr_h, corr_kv, corr_acts = _run_cached(hm, corrupted_tokens, corr_names, states=True)
    corr_ld = answer_logit_diff(hm, corr_h[ar, finals], ca, xa)
    del corr_h

    P = len(positions)
    out = corr_ld.expand(len(layers), P, B).clone()
    pos_np = np.asarray(positions)
    pos_t = torch.as_tensor(pos_np, device=dev)
    fin_np = finals.cpu().numpy()
    live = (pos_t[:, None] <= finals[None, :]).expand(len(layers), P, B)  # after final: inert
    if skip_unchanged:
        same = torch.stack([(clean_acts[n] == corr_acts[n]).reshape(B, T, -1).all(-1)
                            for n in names])  # [layers, B, T]
        live = live & ~same[:, :, pos_t.clamp(max=T - 1)].transpose(1, 2)  # p ≥ T: not live
    live_np = live.cpu().numpy()
    desc = f"patch {template.split('.')[-1]}"
    if not fast:
        for i in tqdm(range(len(layers)), desc=desc, leave=False, disable=not progress):
            jj, bb = np.nonzero(live_np[i])
            if len(jj):
                _full_forward_layer(hm, out[i], corrupted_tokens, clean_acts[names[i]], names[i],
                                    jj, bb, pos_np, finals, ca, xa, max_batch)
        return out, clean_ld, corr_ld
    # plan every forward on the CPU, then one host-to-device transfer of all index arrays
    plan = _plan(live_np, layers, pos_np, fin_np, max_batch, stacked)
    flat = np.concatenate([a.ravel() for g in plan for a in g["arrays"].values()]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    flat_t = torch.from_numpy(flat).to(dev)
    off = 0
    for g in tqdm(plan, desc=desc, leave=False, disable=not progress):
        views = {}
        for k, a in g["arrays"].items():
            views[k] = flat_t[off:off + a.size].view(a.shape)
            off += a.size
        run = _stacked_forward if stacked else _packed_forward
        run(hm, out, g, views, names, resid_names, clean_acts, corr_acts, layers, is_resid_pre,
            corr_kv, ca, xa)
    return out, clean_ld, corr_ld


def _plan(live: np.ndarray, layers: list[int], pos_np: np.ndarray, fin_np: np.ndarray,
          max_batch: int, stacked: bool) -> list[dict]:
    """Rows and forwards for the live copies ``live[i, j, b]`` (index arrays, numpy).

    Segment of copy (i, p, b): slots ``p .. fin_b``. Each prompt's segments of one swept layer
    are packed (capacity: the longest segment, or one more where that needs fewer slots:
    suffixes 1..n pair up into rows of n + 1); rows are ordered by layer and cut into forwards
    of at most ``max_batch`` copies (with ``stacked=False`` a forward holds one layer only).
    Each forward is ``{"spans": [(i, layer, r0, r1, c0, c1)], "prefix": int, "arrays": {...}}``:
    rows ``r0:r1`` and copies ``c0:c1`` belong to swept layer ``i``.
    """
    ii, jj, bb = np.nonzero(live)
    if len(ii) == 0:
        return []
    seg_len = fin_np[bb] - pos_np[jj] + 1
    cap = int(seg_len.max())
    packings: dict[tuple, list] = {}
    rows = []  # (i, b, [(copy index into ii/jj/bb, offset)])
    for i in sorted(np.unique(ii).tolist(), key=lambda i: (layers[i], i)):
        sel = np.nonzero(ii == i)[0]
        for b in np.unique(bb[sel]):
            idx = sel[bb[sel] == b]
            key = tuple(seg_len[idx].tolist())
            if key not in packings:
                cands = [_pack(key, c, max_batch) for c in (cap, cap + 1)]
                packings[key] = min(cands, key=lambda r: len(r) * max(
                    sum(key[s] for s, _ in row) for row in r))
            rows += [(i, int(b), [(int(idx[s]), o) for s, o in row]) for row in packings[key]]
    groups, cur, n = [], [], 0
    for row in rows:
        if cur and (n + len(row[2]) > max_batch or (not stacked and row[0] != cur[-1][0])):
            groups.append(cur)
            cur, n = [], 0
        cur.append(row)
        n += len(row[2])
    groups.append(cur)
    out = []
    for group in groups:
        R = len(group)
        C = max(sum(int(seg_len[c]) for c, _ in segs) for _, _, segs in group)
        slot_copy = np.full((R, C), -1, dtype=np.int64)
        slot_pos = np.zeros((R, C), dtype=np.int64)
        slot_start = np.zeros((R, C), dtype=np.int64)
        c_row, c_off, c_idx, spans = [], [], [], []
        for r, (i, _, segs) in enumerate(group):
            if not spans or spans[-1][0] != i:
                spans.append([i, layers[i], r, r, len(c_idx), len(c_idx)])
            for c, o in segs:
                s, p = int(seg_len[c]), int(pos_np[jj[c]])
                slot_copy[r, o:o + s] = c
                slot_pos[r, o:o + s] = np.arange(p, p + s)
                slot_start[r, o:o + s] = p
                c_row.append(r)
                c_off.append(o)
                c_idx.append(c)
            spans[-1][3], spans[-1][5] = r + 1, len(c_idx)
        c_idx = np.asarray(c_idx)
        c_off = np.asarray(c_off)
        out.append({"spans": [tuple(s) for s in spans], "prefix": int(pos_np[jj[c_idx]].max()),
                    "arrays": {"row_b": np.array([b for _, b, _ in group]), "slot_copy": slot_copy,
                               "slot_pos": slot_pos, "slot_start": slot_start,
                               "c_row": np.asarray(c_row), "c_off": c_off,
                               "c_last": c_off + seg_len[c_idx] - 1, "c_b": bb[c_idx],
                               "c_p": pos_np[jj[c_idx]], "c_j": jj[c_idx], "c_i": ii[c_idx]}})
    return out


def _segment_inputs(g, a, names, resid_names, clean_acts, corr_acts, is_resid_pre, dtype, dev):
    """Starting residuals of the rows (patched for ``resid_pre``), hooks for other hook points,
    and the additive attention mask ``[R, 1, C, prefix + C]``."""
    R, C = a["slot_copy"].shape
    valid = a["slot_copy"] >= 0
    resid = None
    hooks = []
    for i, _, r0, r1, c0, c1 in g["spans"]:
        base = corr_acts[resid_names[i]]
        if resid is None:
            resid = torch.empty((R, C) + tuple(base.shape[2:]), dtype=base.dtype, device=dev)
        resid[r0:r1] = base[a["row_b"][r0:r1, None], a["slot_pos"][r0:r1]]
        rows, offs = a["c_row"][c0:c1], a["c_off"][c0:c1]
        src = clean_acts[names[i]][a["c_b"][c0:c1], a["c_p"][c0:c1]]
        if is_resid_pre:
            resid[rows, offs] = src
        else:
            def patch(act, hook, rows=rows, offs=offs, src=src):
                act = act.clone()
                act[rows, offs] = src.to(act.dtype)
                return act
            hooks.append((names[i], patch))
    resid = resid * valid[..., None].to(resid.dtype)
    k = torch.arange(C, device=dev)
    sc = a["slot_copy"]
    allowed = (sc[:, :, None] == sc[:, None, :]) & (k[None, None, :] <= k[None, :, None])
    if g["prefix"] > 0:
        pre = torch.arange(g["prefix"], device=dev)[None, None, :] < a["slot_start"][:, :, None]
        allowed = torch.cat([pre, allowed], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]
    return resid, hooks, mask


class _PrefixKV:
    """Stand-in for a transformers cache at one layer: fixed prefix keys/values before the new."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2))

    def get_seq_length(self, *args, **kwargs) -> int:
        return int(self.keys.shape[-2])


@contextlib.contextmanager
def _mlp_only_at(mlp: Any, rows: torch.Tensor, cols: torch.Tensor):
    """Run ``mlp`` (a per-token MLP) only at slots ``(rows, cols)``; zeros elsewhere.

    Used in the last block, where only each copy's final slot is read: the other slots'
    outputs are never used, so their MLP (most of the block's arithmetic) is not computed.
    """
    def sub(x, *args, **kwargs):
        object.__delattr__(mlp, "forward")
        try:
            part = mlp(x[rows, cols][:, None], *args, **kwargs)
        finally:
            object.__setattr__(mlp, "forward", sub)
        y = torch.zeros(x.shape[:-1] + part.shape[-1:], dtype=part.dtype, device=part.device)
        y[rows, cols] = part[:, 0]
        return y

    object.__setattr__(mlp, "forward", sub)
    try:
        yield
    finally:
        object.__delattr__(mlp, "forward")


def _stacked_forward(hm, out, g, a, names, resid_names, clean_acts, corr_acts, layers,
                     is_resid_pre, corr_kv, ca, xa) -> None:
    """One pass over the blocks for packed rows of several layers (rows join at their block).

    In the last block only the final slot of each copy is read, so its MLP runs on those slots
    alone (unless a hook of that block is being patched).
    """
    dev = hm.device
    dtype = next(hm.hf_model.parameters()).dtype
    h, hooks, mask = _segment_inputs(g, a, names, resid_names, clean_acts, corr_acts,
                                     is_resid_pre, dtype, dev)
    R = h.shape[0]
    L = hm.n_layers
    first = min(s[1] for s in g["spans"])
    n_active = [max([s[3] for s in g["spans"] if s[1] <= l], default=0) for l in range(L)]
    pos = a["slot_pos"]
    cos, sin = hm.hf_model.model.rotary_emb(h, position_ids=pos)
    P = g["prefix"]
    rb = a["row_b"]
    blocks = list(hm.bridge.blocks)
    last_mlp = getattr(blocks[L - 1], "mlp", None)
    trim = last_mlp is not None and not (not is_resid_pre and any(s[1] == L - 1 for s in g["spans"]))
    with hm.bridge.hooks(fwd_hooks=hooks):
        for l in range(first, L):
            n = n_active[l]
            past = _PrefixKV(corr_kv[l][0][rb[:n], :, :P], corr_kv[l][1][rb[:n], :, :P]) \
                if P > 0 else None
            ctx = _mlp_only_at(last_mlp, a["c_row"], a["c_last"]) if trim and l == L - 1 \
                else contextlib.nullcontext()
            with ctx:
                o = blocks[l](h[:n], attention_mask=mask[:n], position_ids=pos[:n],
                              past_key_values=past, use_cache=past is not None,
                              position_embeddings=(cos[:n], sin[:n]))
            o = o[0] if isinstance(o, tuple) else o
            if n == R:
                h = o
            else:
                h[:n] = o
        final = hm.bridge.ln_final(h[a["c_row"], a["c_last"]])
    out[a["c_i"], a["c_j"], a["c_b"]] = answer_logit_diff(hm, final, ca[a["c_b"]], xa[a["c_b"]])


def _packed_forward(hm, out, g, a, names, resid_names, clean_acts, corr_acts, layers,
                    is_resid_pre, corr_kv, ca, xa) -> None:
    """One bridge forward (from block ℓ) of packed rows of one layer ℓ."""
    dev = hm.device
    dtype = next(hm.hf_model.parameters()).dtype
    layer = g["spans"][0][1]
    resid, hooks, mask = _segment_inputs(g, a, names, resid_names, clean_acts, corr_acts,
                                         is_resid_pre, dtype, dev)
    kv = None
    if g["prefix"] > 0:
        rb, P = a["row_b"], g["prefix"]
        kv = [(kk[rb, :, :P], vv[rb, :, :P]) if l >= layer else None
              for l, (kk, vv) in enumerate(corr_kv)]
        kv = [x if x is not None else kv[layer] for x in kv]
    h = forward_packed(hm, layer, resid, kv, mask, a["slot_pos"], hooks)
    out[a["c_i"], a["c_j"], a["c_b"]] = answer_logit_diff(hm, h[a["c_row"], a["c_last"]],
                                                          ca[a["c_b"]], xa[a["c_b"]])


def _full_forward_layer(hm, out_i, corrupted_tokens, clean_act, name, jj, bb, pos_np, finals, ca,
                        xa, max_batch) -> None:
    """Batched full forwards from the tokens (exact for any hook point) for one layer."""
    dev = hm.device
    T = corrupted_tokens.shape[1]
    for g0 in range(0, len(jj), max_batch):
        js = torch.as_tensor(jj[g0:g0 + max_batch], device=dev)
        bs = torch.as_tensor(bb[g0:g0 + max_batch], device=dev)
        ps = torch.as_tensor(pos_np, device=dev)[js]
        rows = torch.arange(len(bs), device=dev)
        src = clean_act[bs, ps]
        fin = finals[bs]

        def patch(act, hook, rows=rows, ps=ps, src=src):
            return act.index_put((rows, ps), src.to(act.dtype))
        keep = T - int(fin.min())
        with final_states(hm.bridge):
            h = hm.bridge.run_with_hooks(corrupted_tokens[bs], fwd_hooks=[(name, patch)],
                                         logits_to_keep=keep)
        h = h if isinstance(h, torch.Tensor) else h[0]
        out_i[js, bs] = answer_logit_diff(hm, h[rows, fin - (T - keep)], ca[bs], xa[bs])


def _tokens_for_pairs(hm: Any, pairs: Sequence[PatchPair]):
    ct, cl = hm.tokenize([p.clean_prompt for p in pairs])
    xt, xl = hm.tokenize([p.corrupted_prompt for p in pairs])
    bad = [p.example_id for p, a, b in zip(pairs, cl.tolist(), xl.tolist()) if a != b]
    if bad:
        raise ValueError(f"clean and corrupted prompts differ in token length for examples {bad}")
    ca = torch.tensor([hm.encode(p.clean_answer)[0] for p in pairs], device=hm.device)
    xa = torch.tensor([hm.encode(p.corrupted_answer)[0] for p in pairs], device=hm.device)
    if bool((ca == xa).any()):
        raise ValueError("a pair has the same first answer token clean and corrupted: the logit "
                         "difference is 0")
    return ct, xt, cl, ca, xa


def activation_patching(hm: Any, pairs: Sequence[PatchPair],
                        hooks: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
                        layers: Sequence[int] | None = None, max_batch: int | None = None,
                        progress: bool = True, prompt_chunk: int | None = None) -> pd.DataFrame:
    """Layer × position activation patching of clean/corrupted pairs, as a tidy table.

    Implements the normalised patching metric of the module docstring (Meng et al. 2022;
    TransformerLens ``get_act_patch_*``) with the batched exact engine :func:`patch_layer_pos`.

    Args:
        hm: any ``HookedModel``.
        pairs: from :func:`make_corrupted_pairs` or built by the caller.
        hooks: short names or ``"blocks.{layer}...."`` templates.
        layers: subset of layers (default all).
        max_batch: patched copies per forward (``None``: 256 on CUDA, 64 elsewhere).
        progress: tqdm bars.
        prompt_chunk: pairs whose clean/corrupted runs are cached at once (bounds memory;
            ``None``: from the free memory, see :func:`auto_prompt_chunk`).

    Returns:
        DataFrame: example_id, chain_id, tier, kind, hook, layer, position, position_label,
        value (normalised), logit_diff, clean_logit_diff, corrupted_logit_diff.

    Raises:
        ValueError: empty pairs, unequal token lengths within a pair, equal answer tokens.
    """
    if not pairs:
        raise ValueError("activation_patching() got no pairs")
    ct, xt, lengths, ca, xa = _tokens_for_pairs(hm, pairs)
    frames = []
    for hook in hooks:
        grid = patch_layer_pos(hm, ct, xt, ca, xa, lengths, hook, layers, None, max_batch,
                               progress, prompt_chunk=prompt_chunk)
        L_, P_, B_ = grid.logit_diff.shape
        li, pi, bi = np.meshgrid(np.arange(L_), np.arange(P_), np.arange(B_), indexing="ij")
        li, pi, bi = li.ravel(), pi.ravel(), bi.ravel()
        df = pd.DataFrame({
            "example_id": [pairs[b].example_id for b in bi],
            "chain_id": [pairs[b].chain_id for b in bi],
            "tier": [pairs[b].tier for b in bi], "kind": [pairs[b].kind for b in bi],
            "hook": hook, "layer": np.asarray(grid.layers)[li],
            "position": np.asarray(grid.positions)[pi],
            "position_label": [position_label(int(grid.positions[p]), pairs[b].spans,
                                              int(lengths[b])) for p, b in zip(pi, bi)],
            "value": grid.value.cpu().numpy().ravel(),
            "logit_diff": grid.logit_diff.cpu().numpy().ravel(),
            "clean_logit_diff": grid.clean.cpu().numpy()[bi],
            "corrupted_logit_diff": grid.corrupted.cpu().numpy()[bi],
        })
        frames.append(df[df["position_label"] != "pad"])
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Back-patching (Biran et al. 2024)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def back_patching(hm: Any, examples: Sequence[Any], source_layers: Sequence[int] | None = None,
                  target_layers: Sequence[int] | None = None, max_batch: int = 256,
                  progress: bool = True) -> pd.DataFrame:
    """Back-patching grid (Biran et al. 2024, §5): final-position ``resid_pre[ℓs]`` → ``resid_pre[ℓt]``.

    For every example and every pair ℓt ≤ ℓs, the final-position residual entering block ℓs is
    written into the residual entering block ℓt of the same prompt, and the forward continues
    from ℓt. Batched: one forward per (ℓt, prompt length, group of ≤ ``max_batch`` copies),
    starting at block ℓt and computing only the final position (earlier positions come from the
    cached keys/values). SmolLM2, 12 prompts, the full 30 × 30 grid: 21 s on 2 CPU cores.

    Args:
        hm: any ``HookedModel``.
        examples: objects with ``prompt`` and ``answer`` (plus optional metadata).
        source_layers, target_layers: subsets of ``0..n_layers-1`` (default all; duplicates
            ignored).
        max_batch: copies per forward.
        progress: tqdm bar.

    Returns:
        DataFrame: example_id, chain_id, tier, kind, source_layer, target_layer, logprob (nats,
        first answer token), correct (top-1), base_logprob, was_correct, fixed
        (``correct and not was_correct``). ℓs = ℓt rows reproduce the unpatched run.

    Raises:
        ValueError: no examples, layers out of range, no cell with ℓs ≥ ℓt, an empty answer,
            ``max_batch < 1``.
    """
    if not examples:
        raise ValueError("back_patching() got no examples")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    L = hm.n_layers
    src = list(range(L)) if source_layers is None else sorted({int(l) for l in source_layers})
    tgt = list(range(L)) if target_layers is None else sorted({int(l) for l in target_layers})
    if any(not 0 <= l < L for l in src + tgt):
        raise ValueError(f"layers must lie in [0, {L})")
    if not any(ls >= lt for lt in tgt for ls in src):
        raise ValueError(f"no cell with source layer >= target layer (sources {src}, targets {tgt})")
    answer_ids = [hm.encode(ex.answer) for ex in examples]
    empty = [i for i, ids in enumerate(answer_ids) if not ids]
    if empty:
        raise ValueError(f"example {empty[0]} has an answer that tokenises to nothing")
    dev = hm.device
    toks, lengths = hm.tokenize([ex.prompt for ex in examples])
    B = toks.shape[0]
    ans = torch.tensor([ids[0] for ids in answer_ids], device=dev)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    logits, kv, res = _run_cached(hm, toks, names)
    fin = lengths - 1
    ar = torch.arange(B, device=dev)
    base_lp = torch.log_softmax(logits[ar, fin].float(), -1)[ar, ans]
    base_ok = logits[ar, fin].argmax(-1) == ans
    rows = []
    cells = [(lt, ls) for lt in tgt for ls in src if ls >= lt]
    for lt in tqdm(sorted(set(c[0] for c in cells)), desc="back-patching", leave=False,
                   disable=not progress):
        # Only the final position changes, so a forward needs just that position (keys/values of
        # the earlier ones come from the cache): copies are grouped by prompt length, one position
        # per row, instead of recomputing a shared suffix and the right padding.
        copies = [(ls, b) for (t, ls) in cells if t == lt for b in range(B)]
        by_len: dict[int, list] = {}
        for c in copies:
            by_len.setdefault(int(fin[c[1]]), []).append(c)
        groups = [g[i:i + max_batch] for _, g in sorted(by_len.items()) for i in range(0, len(g), max_batch)]
        for group in groups:
            lss = torch.tensor([c[0] for c in group], device=dev)
            bs = torch.tensor([c[1] for c in group], device=dev)
            p0 = int(fin[group[0][1]])
            n = len(bs)
            r = torch.arange(n, device=dev)
            resid = torch.stack([res[names[int(s)]][int(b), p0] for s, b in zip(lss, bs)])[:, None]
            kvs = [(k[bs, :, :p0], v[bs, :, :p0]) for k, v in kv] if p0 > 0 else None
            out = forward_from(hm, lt, resid, kvs, 1)[:, 0].float()
            lp = torch.log_softmax(out, -1)[r, ans[bs]]
            ok = out.argmax(-1) == ans[bs]
            for c in range(n):
                b = int(bs[c])
                rows.append({**example_meta(examples[b], b), "source_layer": int(lss[c]),
                             "target_layer": lt, "logprob": float(lp[c]), "correct": bool(ok[c]),
                             "base_logprob": float(base_lp[b]), "was_correct": bool(base_ok[b]),
                             "fixed": bool(ok[c]) and not bool(base_ok[b])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Attention knockout (Geva et al. 2023)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_knockout(hm: Any, examples: Sequence[Any], span: str = "e1", window: int = 1,
                       layers: Sequence[int] | None = None, spans: Sequence[SpanDict] | None = None,
                       spans_fn: SpansFn | None = None, max_batch: int = 64,
                       progress: bool = True) -> pd.DataFrame:
    """Block attention from the final token to a span in a window of layers (Geva et al. 2023, §5).

    For each centre layer ℓ, the pre-softmax scores (``blocks.l.attn.hook_attn_scores``, all
    heads) from the final query to the keys of ``span`` are set to −∞ in layers
    ``l ∈ [ℓ − ⌊(window−1)/2⌋, ℓ + ⌊window/2⌋] ∩ [0, n_layers)``; softmax then renormalises the
    final token's attention over the remaining keys. Only the final token's computation changes, so
    the forward starts at the window's first layer and recomputes only the final position.

    Args:
        hm: any ``HookedModel``.
        examples: objects with ``prompt``, ``answer``, ``char_spans``.
        span: span key to block (``"e1"``); an empty span ``(a, a)`` blocks nothing.
        window: number of consecutive layers blocked per centre layer.
        layers: centre layers (default all).
        spans, spans_fn: token spans (see :func:`interp.mechanisms.lens.resolve_spans`).
        max_batch: copies per forward.
        progress: tqdm bar.

    Returns:
        DataFrame: example_id, chain_id, tier, kind, layer (centre), window, first_layer,
        last_layer, logprob (first answer token, nats), base_logprob, delta (logprob −
        base_logprob).

    Raises:
        ValueError: no examples, ``window < 1``, a missing span or one that reaches the final
            token.
    """
    if not examples:
        raise ValueError("attention_knockout() got no examples")
    if window < 1:
        raise ValueError("window must be >= 1")
    L = hm.n_layers
    centres = list(range(L)) if layers is None else [int(l) for l in layers]
    sp = resolve_spans(examples, hm, spans, spans_fn)
    dev = hm.device
    toks, lengths = hm.tokenize([ex.prompt for ex in examples])
    B, T = toks.shape
    fin = lengths - 1
    for i, s in enumerate(sp):
        if span not in s:
            raise ValueError(f"example {i} has no {span!r} span")
        if s[span][1] > int(fin[i]):
            raise ValueError(f"example {i}: span {span} {s[span]} reaches the final token")
    ans = torch.tensor([hm.encode(ex.answer)[0] for ex in examples], device=dev)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    logits, kv, res = _run_cached(hm, toks, names)
    ar = torch.arange(B, device=dev)
    base_lp = torch.log_softmax(logits[ar, fin].float(), -1)[ar, ans]
    lo_off, hi_off = (window - 1) // 2, window // 2
    rows = []
    for c in tqdm(centres, desc="knockout", leave=False, disable=not progress):
        lo, hi = max(0, c - lo_off), min(L - 1, c + hi_off)
        order = sorted(range(B), key=lambda b: int(fin[b]))
        for g0 in range(0, B, max_batch):
            bs = torch.tensor(order[g0:g0 + max_batch], device=dev)
            f = fin[bs]
            p0 = int(f.min())
            n = len(bs)
            r = torch.arange(n, device=dev)
            mask = torch.zeros(n, T, dtype=torch.bool, device=dev)  # [copy, key position]
            for k, b in enumerate(bs.tolist()):
                a, e = sp[b][span]
                mask[k, a:e] = True
            qloc = f - p0

            def knock(scores, hook, mask=mask, qloc=qloc, r=r):
                scores = scores.clone()  # [n, heads, q, k]
                kk = scores.shape[-1]
                row = scores[r, :, qloc]  # [n, heads, k]
                row = row.masked_fill(mask[:, None, :kk], float("-inf"))
                scores[r, :, qloc] = row
                return scores

            hooks = [(f"blocks.{l}.attn.hook_attn_scores", knock) for l in range(lo, hi + 1)]
            kvs = [(k[bs, :, :p0], v[bs, :, :p0]) for k, v in kv] if p0 > 0 else None
            out = forward_from(hm, lo, res[names[lo]][bs, p0:], kvs, T - p0, hooks)[r, qloc]
            lp = torch.log_softmax(out.float(), -1)[r, ans[bs]]
            for k in range(n):
                b = int(bs[k])
                rows.append({**example_meta(examples[b], b), "layer": c, "window": window,
                             "first_layer": lo, "last_layer": hi, "logprob": float(lp[k]),
                             "base_logprob": float(base_lp[b]),
                             "delta": float(lp[k] - base_lp[b])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def difference(df_a: pd.DataFrame, df_b: pd.DataFrame, on: Sequence[str],
               value: str = "value", labels: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """One variant minus another (e.g. Uniform minus oracle), matched on ``on``.

    Rows of each table are first averaged over duplicates of the ``on`` keys, then inner-joined.

    Args:
        df_a, df_b: tidy tables from the same function on two model variants.
        on: key columns (e.g. ``["hook", "layer", "position_label"]``).
        value: the numeric column to subtract.
        labels: suffixes naming the two variants in the output.

    Returns:
        DataFrame: ``on`` columns, ``value_<a>``, ``value_<b>``, ``difference`` (a − b).

    Raises:
        ValueError: a missing column, or no key in common.
    """
    on = list(on)
    for name, df in (("df_a", df_a), ("df_b", df_b)):
        missing = [c for c in on + [value] if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    a = df_a.groupby(on, as_index=False)[value].mean()
    b = df_b.groupby(on, as_index=False)[value].mean()
    out = a.merge(b, on=on, suffixes=(f"_{labels[0]}", f"_{labels[1]}"), how="inner")
    if out.empty:
        raise ValueError(f"the two tables share no {on} key")
    out["difference"] = out[f"{value}_{labels[0]}"] - out[f"{value}_{labels[1]}"]
    return out


def summarise(df: pd.DataFrame, by: Sequence[str], value: str = "value") -> pd.DataFrame:
    """Mean, standard error and count of ``value`` per group ``by`` (NaNs dropped).

    Raises:
        ValueError: a missing column.
    """
    missing = [c for c in list(by) + [value] if c not in df.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    g = df.dropna(subset=[value]).groupby(list(by))[value]
    out = g.agg(["mean", "sem", "count"]).reset_index()
    return out.rename(columns={"count": "n"})
