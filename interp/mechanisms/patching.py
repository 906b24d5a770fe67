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
  corrupted keys/values (a ``DynamicCache`` prefix) and only positions ≥ p0 are recomputed;
* many patched copies (example b, position p) run as one batch of at most ``max_batch`` copies;
  copies are grouped by position so each group shares the prefix ``p0 = min p``;
* only the logits of final positions are unembedded (``logits_to_keep``).

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
def _run_cached(hm: Any, tokens: torch.Tensor, names: Sequence[str]):
    """One forward: logits, per-layer KV, and the activations ``names``."""
    wanted = set(names)
    (logits, past), cache = hm.bridge.run_with_cache(
        tokens, return_type="logits_and_cache", names_filter=lambda n: n in wanted)
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(f"hook {missing[0]!r} did not fire in {hm.name}: not a hook point of this "
                         "bridge")
    return logits, _kv_tensors(past), {n: cache[n] for n in names}


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
                    max_batch: int = 64, progress: bool = True,
                    fast: bool | None = None) -> PatchGrid:
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
        max_batch: patched copies per forward (bounds memory: ``max_batch × pos`` tokens).
        progress: show a tqdm bar over layers.
        fast: start each forward at block ℓ and reuse the corrupted keys/values (exact for
            ``resid_pre``, ``attn_out``, ``mlp_out``: tested against TransformerLens). ``None``
            (default) = fast for those three, and a batched full forward from the tokens for any
            other hook: some bridge hook points (e.g. ``hook_resid_mid``, an alias of
            ``ln2.hook_in``) are not reproduced by a resumed forward. Pass ``fast=True`` only for
            hooks you have checked.

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
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    template = _hook_template(hook)
    is_resid_pre = template == SHORT_HOOKS["resid_pre"]
    if fast is None:
        fast = template in SHORT_HOOKS.values()
    names = [template.format(layer=l) for l in layers]
    resid_names = [SHORT_HOOKS["resid_pre"].format(layer=l) for l in layers]
    finals = lengths - 1
    ar = torch.arange(B, device=dev)

    def ld(logits_at_final: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (logits_at_final.gather(-1, ca[rows, None]) -
                logits_at_final.gather(-1, xa[rows, None]))[:, 0].float()

    clean_logits, _, clean_acts = _run_cached(hm, clean_tokens, names)
    corr_logits, corr_kv, corr_res = _run_cached(hm, corrupted_tokens, resid_names)
    clean_ld = ld(clean_logits[ar, finals], ar)
    corr_ld = ld(corr_logits[ar, finals], ar)
    del clean_logits, corr_logits

    out = torch.empty(len(layers), len(positions), B, device=dev)
    # copies sorted by position, so each group of max_batch copies shares a long KV prefix
    copies = [(j, p, b) for j, p in enumerate(positions) for b in range(B)]
    copies.sort(key=lambda c: c[1])
    for i, layer in enumerate(tqdm(layers, desc=f"patch {hook}", leave=False, disable=not progress)):
        base = corr_res[resid_names[i]]
        clean_act = clean_acts[names[i]]
        for g0 in range(0, len(copies), max_batch):
            group = copies[g0:g0 + max_batch]
            js = torch.tensor([c[0] for c in group], device=dev)
            ps = torch.tensor([c[1] for c in group], device=dev)
            bs = torch.tensor([c[2] for c in group], device=dev)
            fin = finals[bs]
            # copies whose final token precedes the patch are unaffected: corrupted value
            live = fin >= ps
            out[i, js[~live], bs[~live]] = corr_ld[bs[~live]]
            if not bool(live.any()):
                continue
            js, ps, bs, fin = js[live], ps[live], bs[live], fin[live]
            p0 = int(ps.min())
            n = len(bs)
            resid = base[bs, p0:].clone()
            rows = torch.arange(n, device=dev)
            hooks = []
            if is_resid_pre:
                resid[rows, ps - p0] = clean_act[bs, ps]
            else:
                def patch(act, hook, rows=rows, loc=ps - p0, src=clean_act[bs, ps]):
                    act = act.clone()
                    act[rows, loc] = src.to(act.dtype)
                    return act
                hooks.append((names[i], patch))
            keep = T - int(fin.min())
            if fast:
                kv = [(k[bs, :, :p0], v[bs, :, :p0]) for k, v in corr_kv] if p0 > 0 else None
                logits = forward_from(hm, layer, resid, kv, keep, hooks)
            else:  # full batched forward from the tokens: exact for any hook point
                if is_resid_pre:
                    hooks = [(names[i], lambda act, hook, rows=rows, loc=ps, src=resid[rows, ps - p0]:
                              act.index_put((rows, loc), src.to(act.dtype)))]
                else:
                    hooks = [(names[i], lambda act, hook, f=hooks[0][1], p0=p0:
                              torch.cat([act[:, :p0], f(act[:, p0:], hook)], dim=1))]
                logits = hm.bridge.run_with_hooks(corrupted_tokens[bs], fwd_hooks=hooks,
                                                  logits_to_keep=keep)
            out[i, js, bs] = ld(logits[rows, fin - (T - keep)], bs)
    return PatchGrid(template, layers, positions, out, clean_ld, corr_ld)


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
                        layers: Sequence[int] | None = None, max_batch: int = 64,
                        progress: bool = True) -> pd.DataFrame:
    """Layer × position activation patching of clean/corrupted pairs, as a tidy table.

    Implements the normalised patching metric of the module docstring (Meng et al. 2022;
    TransformerLens ``get_act_patch_*``) with the batched exact engine :func:`patch_layer_pos`.

    Args:
        hm: any ``HookedModel``.
        pairs: from :func:`make_corrupted_pairs` or built by the caller.
        hooks: short names or ``"blocks.{layer}...."`` templates.
        layers: subset of layers (default all).
        max_batch: patched copies per forward.
        progress: tqdm bars.

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
                               progress)
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
                  target_layers: Sequence[int] | None = None, max_batch: int = 64,
                  progress: bool = True) -> pd.DataFrame:
    """Back-patching grid (Biran et al. 2024, §5): final-position ``resid_pre[ℓs]`` → ``resid_pre[ℓt]``.

    For every example and every pair ℓt ≤ ℓs, the final-position residual entering block ℓs is
    written into the residual entering block ℓt of the same prompt, and the forward continues
    from ℓt. Batched: one forward per (ℓt, group of ≤ ``max_batch`` copies), starting at block ℓt
    and recomputing only the final position (earlier positions come from the cached keys/values).

    Args:
        hm: any ``HookedModel``.
        examples: objects with ``prompt`` and ``answer`` (plus optional metadata).
        source_layers, target_layers: subsets of ``0..n_layers-1`` (default all).
        max_batch: copies per forward.
        progress: tqdm bar.

    Returns:
        DataFrame: example_id, chain_id, tier, kind, source_layer, target_layer, logprob (nats,
        first answer token), correct (top-1), base_logprob, was_correct, fixed
        (``correct and not was_correct``). ℓs = ℓt rows reproduce the unpatched run.

    Raises:
        ValueError: no examples, layers out of range.
    """
    if not examples:
        raise ValueError("back_patching() got no examples")
    L = hm.n_layers
    src = list(range(L)) if source_layers is None else [int(l) for l in source_layers]
    tgt = list(range(L)) if target_layers is None else [int(l) for l in target_layers]
    if any(not 0 <= l < L for l in src + tgt):
        raise ValueError(f"layers must lie in [0, {L})")
    dev = hm.device
    toks, lengths = hm.tokenize([ex.prompt for ex in examples])
    B, T = toks.shape
    ans = torch.tensor([hm.encode(ex.answer)[0] for ex in examples], device=dev)
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
        copies = sorted([(ls, b) for (t, ls) in cells if t == lt for b in range(B)],
                        key=lambda c: int(fin[c[1]]))
        for g0 in range(0, len(copies), max_batch):
            group = copies[g0:g0 + max_batch]
            lss = torch.tensor([c[0] for c in group], device=dev)
            bs = torch.tensor([c[1] for c in group], device=dev)
            f = fin[bs]
            p0 = int(f.min())
            n = len(bs)
            r = torch.arange(n, device=dev)
            resid = res[names[lt]][bs, p0:].clone()
            source = torch.stack([res[names[int(s)]][int(b), int(q)]
                                  for s, b, q in zip(lss, bs, f)])
            resid[r, f - p0] = source
            kvs = [(k[bs, :, :p0], v[bs, :, :p0]) for k, v in kv] if p0 > 0 else None
            keep = T - p0
            out = forward_from(hm, lt, resid, kvs, keep)[r, f - p0].float()
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
