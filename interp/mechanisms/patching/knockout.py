"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations", EMNLP 2023, §5)."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import PatchingError
from interp.mechanisms.lens import SpanDict, SpansFn, example_meta, resolve_spans
from interp.mechanisms.patching.engine import _run_cached, forward_from


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
    the forward starts at the window's first layer and recomputes only the final position: copies
    are grouped by prompt length (one forward per centre × length × ``max_batch`` copies, no
    padding), the earlier positions' keys/values read from one cached clean run.

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
        PatchingError: no examples, ``window < 1``, a missing span or one that reaches the final
            token.
    """
    if not examples:
        raise PatchingError("attention_knockout() got no examples")
    if window < 1:
        raise PatchingError("window must be >= 1")
    L = hm.n_layers
    centres = list(range(L)) if layers is None else [int(l) for l in layers]
    sp = resolve_spans(examples, hm, spans, spans_fn)
    dev = hm.device
    toks, lengths = hm.tokenize([ex.prompt for ex in examples])
    B = toks.shape[0]
    fin = lengths - 1
    for i, s in enumerate(sp):
        if span not in s:
            raise PatchingError(f"example {i} has no {span!r} span")
        if s[span][1] > int(fin[i]):
            raise PatchingError(f"example {i}: span {span} {s[span]} reaches the final token")
    ans = torch.tensor([hm.encode(ex.answer)[0] for ex in examples], device=dev)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    logits, kv, res = _run_cached(hm, toks, names)
    ar = torch.arange(B, device=dev)
    base_lp = torch.log_softmax(logits[ar, fin].float(), -1)[ar, ans]
    lo_off, hi_off = (window - 1) // 2, window // 2
    # Only the final position changes: copies are grouped by prompt length so that each forward
    # computes that one position (keys/values of the earlier ones from the cache), no padding.
    by_len: dict[int, list[int]] = {}
    for b in range(B):
        by_len.setdefault(int(fin[b]), []).append(b)
    groups = [g[i:i + max_batch] for _, g in sorted(by_len.items()) for i in range(0, len(g), max_batch)]
    rows = []
    for c in tqdm(centres, desc="knockout", leave=False, disable=not progress):
        lo, hi = max(0, c - lo_off), min(L - 1, c + hi_off)
        for group in groups:
            bs = torch.tensor(group, device=dev)
            p0 = int(fin[group[0]])  # the final position, the same for the whole group
            n = len(group)
            r = torch.arange(n, device=dev)
            mask = torch.zeros(n, p0 + 1, dtype=torch.bool, device=dev)  # [copy, key position]
            for k, b in enumerate(group):
                a, e = sp[b][span]
                mask[k, a:e] = True

            def knock(scores, hook, mask=mask):
                # scores [n, heads, 1, p0 + 1]: the final query's row only
                return scores.masked_fill(mask[:, None, None, :], float("-inf"))

            hooks = [(f"blocks.{l}.attn.hook_attn_scores", knock) for l in range(lo, hi + 1)]
            kvs = [(k[bs, :, :p0], v[bs, :, :p0]) for k, v in kv] if p0 > 0 else None
            out = forward_from(hm, lo, res[names[lo]][bs, p0:p0 + 1], kvs, 1, hooks)[:, 0]
            lp = torch.log_softmax(out.float(), -1)[r, ans[bs]]
            for k, b in enumerate(group):
                rows.append({**example_meta(examples[b], b), "layer": c, "window": window,
                             "first_layer": lo, "last_layer": hi, "logprob": float(lp[k]),
                             "base_logprob": float(base_lp[b]),
                             "delta": float(lp[k] - base_lp[b])})
    return pd.DataFrame(rows)
