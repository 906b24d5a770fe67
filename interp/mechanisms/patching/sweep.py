"""Layer × position activation patching: :func:`patch_layer_pos` (the raw :class:`PatchGrid`) and
:func:`activation_patching` (a tidy table over clean/corrupted pairs)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import PatchingError, UnsupportedHookError
from interp.mechanisms.lens import position_label
from interp.mechanisms.patching.engine import (
    SHORT_HOOKS,
    _hook_template,
    _run_cached,
    _sliding_window_below,
    answer_logit_diff,
    auto_prompt_chunk,
    default_max_batch,
    stacked_ok,
    supported_hooks,
)
from interp.mechanisms.patching.pairs import PatchPair, _tokens_for_pairs
from interp.mechanisms.patching.plan import _full_forward_layer, _packed_forward, _plan, _stacked_forward, upload


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
            per-adapter delta hook; ``attn.hook_z``/``hook_q`` patch every head at the
            position). ``blocks.{layer}.hook_resid_mid`` (= resid_pre + attn_out) is, on the
            bridge, an alias of ``ln2.hook_in``: patching it replaces the MLP's *input* only,
            the skip connection keeps the corrupted residual — the same as patching
            ``hook_mlp_out`` with the MLP of the clean value, and not HookedTransformer's
            resid_mid patch (tested against the bridge's own ``run_with_hooks``).
            ``attn.hook_pattern`` / ``hook_attn_scores`` (head axis first) are refused.
        layers, positions: subsets to sweep (default all).
        max_batch: patched copies per forward (bounds memory: at most ``max_batch × pos``
            tokens per forward). ``None``: :func:`default_max_batch` (64 on the CPU; on CUDA
            from the free memory, at least 256).
        progress: show a tqdm bar over layers.
        fast: start each forward at block ℓ, reuse the corrupted keys/values and pack copies
            (exact for ``resid_pre``, ``attn_out``, ``mlp_out``: tested against
            TransformerLens). ``None`` (default) = fast for those three, and a batched full
            forward from the tokens for any other hook: some bridge hook points (e.g.
            ``hook_resid_mid``) are not reproduced by a resumed forward. Pass ``fast=True``
            only for hooks you have checked.
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
        PatchingError: shape mismatches, out-of-range layers/positions, an unknown hook.
        UnsupportedHookError: a hook whose activation is not ``[batch, pos, ...]``.
    """
    dev = hm.device
    clean_tokens, corrupted_tokens = clean_tokens.to(dev), corrupted_tokens.to(dev)
    if clean_tokens.shape != corrupted_tokens.shape or clean_tokens.ndim != 2:
        raise PatchingError(f"clean {tuple(clean_tokens.shape)} and corrupted "
                         f"{tuple(corrupted_tokens.shape)} token tensors must be equal [batch, pos]")
    B, T = clean_tokens.shape
    L = hm.n_layers
    lengths = (torch.full((B,), T, device=dev) if lengths is None else lengths.to(dev)).long()
    if lengths.min() < 1 or lengths.max() > T:
        raise PatchingError(f"lengths must lie in [1, {T}]")
    ca, xa = clean_answer_ids.to(dev).long(), corrupted_answer_ids.to(dev).long()
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    if any(not 0 <= l < L for l in layers) or any(not 0 <= p < T for p in positions):
        raise PatchingError(f"layers must lie in [0, {L}) and positions in [0, {T})")
    if max_batch is None:
        max_batch = default_max_batch(hm, T)
    if max_batch < 1:
        raise PatchingError("max_batch must be >= 1")
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
        raise PatchingError("prompt_chunk must be >= 1")
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
    bad = [n for n in names if tuple(clean_acts[n].shape[:2]) != (B, T)]
    if bad:  # e.g. a head axis before the position: indexing [b, p] would patch head p
        raise UnsupportedHookError(f"{bad[0]} has activation shape {tuple(clean_acts[bad[0]].shape)}, "
                                   f"not [batch={B}, pos={T}, ...]; supported: {supported_hooks()}")
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
    run = _stacked_forward if stacked else _packed_forward
    for g, views in tqdm(list(zip(plan, upload(plan, dev))), desc=desc, leave=False, disable=not progress):
        run(hm, out, g, views, names, resid_names, clean_acts, corr_acts, layers, is_resid_pre,
            corr_kv, ca, xa)
    return out, clean_ld, corr_ld


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
        PatchingError: empty pairs, unequal token lengths within a pair, equal answer tokens.
    """
    if not pairs:
        raise PatchingError("activation_patching() got no pairs")
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
