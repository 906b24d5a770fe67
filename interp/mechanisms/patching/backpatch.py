"""Back-patching (Biran et al. 2024, "Hopping Too Late", EMNLP 2024, §5)."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import PatchingError
from interp.mechanisms.lens import example_meta
from interp.mechanisms.patching.engine import _run_cached, forward_from


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
        (``correct and not was_correct``), sorted by target layer, source layer, example. ℓs = ℓt
        rows are the unpatched run, read from the cached clean forward.

    Raises:
        PatchingError: no examples, layers out of range, no cell with ℓs ≥ ℓt, an empty answer,
            ``max_batch < 1``.
    """
    if not examples:
        raise PatchingError("back_patching() got no examples")
    if max_batch < 1:
        raise PatchingError(f"max_batch must be >= 1, got {max_batch}")
    L = hm.n_layers
    src = list(range(L)) if source_layers is None else sorted({int(l) for l in source_layers})
    tgt = list(range(L)) if target_layers is None else sorted({int(l) for l in target_layers})
    if any(not 0 <= l < L for l in src + tgt):
        raise PatchingError(f"layers must lie in [0, {L})")
    if not any(ls >= lt for lt in tgt for ls in src):
        raise PatchingError(f"no cell with source layer >= target layer (sources {src}, targets {tgt})")
    answer_ids = [hm.encode(ex.answer) for ex in examples]
    empty = [i for i, ids in enumerate(answer_ids) if not ids]
    if empty:
        raise PatchingError(f"example {empty[0]} has an answer that tokenises to nothing")
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
    # ℓs = ℓt writes a state into itself: the unpatched run, read from the cached logits (exact,
    # so never "fixed"), not recomputed.
    for lt in sorted(set(tgt) & set(src)):
        for b in range(B):
            rows.append({**example_meta(examples[b], b), "source_layer": lt, "target_layer": lt,
                         "logprob": float(base_lp[b]), "correct": bool(base_ok[b]),
                         "base_logprob": float(base_lp[b]), "was_correct": bool(base_ok[b]), "fixed": False})
    cells = [(lt, ls) for lt in tgt for ls in src if ls > lt]
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
    df = pd.DataFrame(rows)
    return df.sort_values(["target_layer", "source_layer", "example_id"], kind="stable", ignore_index=True)
