"""Patchscopes: decode a hidden state by writing it into a target prompt (Ghandeharioun et al. 2024).

A Patchscope (Ghandeharioun et al., ICML 2024, §3, eq. 1) takes the residual ``h`` of a source
prompt at (source layer ℓ, source position i), writes it into a target prompt at its placeholder
position i* (the target's last token) entering target layer ℓ* (default ℓ* = ℓ), and reads the
target model's next-token distribution there. Two canonical targets:

* the token-identity prompt ``"cat -> cat; 1135 -> 1135; hello -> hello; ?"`` (next-token
  decoding), and
* a few-shot entity-description prompt ``"Syria: country in the Middle East. Leonardo DiCaprio:
  American actor. x"`` (entity resolution; Biran et al. 2024 use it to decide whether the bridge
  entity e₂ is already resolved at e₁'s last token).

Because the placeholder is the target's last token, positions before it are unaffected: the
engine reuses the target's cached keys/values and runs a single token from block ℓ*, for every
source layer and example in a batch (see :mod:`interp.mechanisms.patching`).
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import PatchscopeError
from interp.mechanisms.lens import (
    SpanDict,
    SpansFn,
    entity_first_token,
    example_meta,
    named_position,
    resolve_spans,
    token_rank,
)
from interp.mechanisms.patching import _run_cached, forward_from

IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"
DESCRIPTION_PROMPT = ("Syria: country in the Middle East. Leonardo DiCaprio: American actor. "
                      "Samsung: South Korean company. x")
TARGET_PROMPTS = {"identity": IDENTITY_PROMPT, "description": DESCRIPTION_PROMPT}


@torch.no_grad()
def patchscope(hm: Any, examples: Sequence[Any], source_position: str = "e1_last",
               target: str = "identity", source_layers: Sequence[int] | None = None,
               target_layer: int | None = None, targets: Sequence[str] = ("e2",),
               spans: Sequence[SpanDict] | None = None, spans_fn: SpansFn | None = None,
               n_generate: int = 0, max_batch: int = 64, progress: bool = True) -> pd.DataFrame:
    """Decode ``resid_pre`` states of each source layer through a target prompt.

    Args:
        hm: any ``HookedModel`` (source and target model are the same).
        examples: objects with ``prompt``, ``char_spans`` and the ``targets`` attributes.
        source_position: ``"e1_last"``, ``"final"`` or another name for
            :func:`interp.mechanisms.lens.named_position`.
        target: ``"identity"``, ``"description"`` or a literal target prompt; its last token is
            the placeholder.
        source_layers: layers ℓ (default all); ``h = blocks.ℓ.hook_resid_pre`` at the source
            position.
        target_layer: ℓ* (default ``None``: ℓ* = ℓ, the same layer).
        targets: entity attributes to score (first token of ``" " + entity``).
        spans, spans_fn: token spans (see :func:`interp.mechanisms.lens.resolve_spans`).
        n_generate: also decode this many greedy tokens after the placeholder (0 = none); each
            step is one batched full forward with the patch hooked in.
        max_batch: copies per forward.
        progress: tqdm bar.

    Returns:
        Tidy DataFrame: example_id, chain_id, tier, kind, source_layer, target_layer,
        source_position, target (prompt key), entity, token_id, logprob (nats at the placeholder),
        rank (0 = top-1; ties in the target's favour, see ``lens.token_rank``), top1 (bool), top_token (decoded argmax), generated (str, "" when
        ``n_generate == 0``).

    Raises:
        PatchscopeError: no examples, layers out of range, an unknown position, an empty target.
    """
    if not examples:
        raise PatchscopeError("patchscope() got no examples")
    L = hm.n_layers
    src_layers = list(range(L)) if source_layers is None else [int(l) for l in source_layers]
    if any(not 0 <= l < L for l in src_layers) or (
            target_layer is not None and not 0 <= int(target_layer) < L):
        raise PatchscopeError(f"layers must lie in [0, {L})")
    tprompt = TARGET_PROMPTS.get(target, target)
    if not tprompt:
        raise PatchscopeError("empty target prompt")
    dev = hm.device
    sp = resolve_spans(examples, hm, spans, spans_fn)
    toks, lengths = hm.tokenize([ex.prompt for ex in examples])
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    _, _, src_res = _run_cached(hm, toks, names)
    src_pos = [named_position(source_position, sp[i], int(lengths[i])) for i in range(len(examples))]
    ttoks, _ = hm.tokenize([tprompt])
    T = ttoks.shape[1]
    _, tkv, tres = _run_cached(hm, ttoks, names)

    # copies: (source layer, example); h = resid_pre[ℓ] of example at its source position
    copies = [(l, b) for l in src_layers for b in range(len(examples))]
    tl_of = (lambda l: l) if target_layer is None else (lambda l: int(target_layer))
    by_tl: dict[int, list[tuple[int, int]]] = {}
    for c in copies:
        by_tl.setdefault(tl_of(c[0]), []).append(c)
    results: dict[tuple[int, int], torch.Tensor] = {}
    for lt, group_all in tqdm(sorted(by_tl.items()), desc=f"patchscope {target}", leave=False,
                              disable=not progress):
        for g0 in range(0, len(group_all), max_batch):
            group = group_all[g0:g0 + max_batch]
            n = len(group)
            h = torch.stack([src_res[names[l]][b, src_pos[b]] for l, b in group])  # [n, d]
            resid = h[:, None, :]
            kv = [(k.expand(n, -1, -1, -1)[:, :, : T - 1], v.expand(n, -1, -1, -1)[:, :, : T - 1])
                  for k, v in tkv] if T > 1 else None
            logits = forward_from(hm, lt, resid, kv, 1)[:, -1].float()
            for c, lp in zip(group, torch.log_softmax(logits, -1)):
                results[c] = lp
    gen: dict[tuple[int, int], str] = {}
    if n_generate > 0:
        gen = _generate(hm, ttoks[0], copies, tl_of, src_res, names, src_pos, n_generate,
                        max_batch)
    rows = []
    for (l, b), lp in results.items():
        ex = examples[b]
        top = int(lp.argmax())
        for t in targets:
            tid = entity_first_token(hm, getattr(ex, t))
            score = lp[tid]
            rank = int(token_rank(lp, tid))
            rows.append({**example_meta(ex, b), "source_layer": l, "target_layer": tl_of(l),
                         "source_position": source_position, "target": target, "entity": t,
                         "token_id": tid, "logprob": float(score), "rank": rank,
                         "top1": rank == 0, "top_token": hm.tokenizer.decode([top]),
                         "generated": gen.get((l, b), "")})
    return pd.DataFrame(rows)


@torch.no_grad()
def _generate(hm: Any, target_ids: torch.Tensor, copies, tl_of, src_res, names, src_pos,
              n_generate: int, max_batch: int) -> dict[tuple[int, int], str]:
    """Greedy tokens after the placeholder, the patch hooked into every step's full forward."""
    T = target_ids.shape[0]
    out: dict[tuple[int, int], str] = {}
    for g0 in range(0, len(copies), max_batch):
        group = copies[g0:g0 + max_batch]
        n = len(group)
        h = torch.stack([src_res[names[l]][b, src_pos[b]] for l, b in group])
        tls = torch.tensor([tl_of(l) for l, _ in group], device=hm.device)
        seq = target_ids[None].expand(n, -1).clone()
        hooks = []
        for lt in sorted(set(tls.tolist())):
            rows = (tls == lt).nonzero()[:, 0]

            def patch(x, hook, rows=rows):
                x = x.clone()
                x[rows, T - 1] = h[rows].to(x.dtype)
                return x
            hooks.append((names[lt], patch))
        for _ in range(n_generate):
            logits = hm.bridge.run_with_hooks(seq, fwd_hooks=hooks)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        for c, row in zip(group, seq[:, T:]):
            out[c] = hm.tokenizer.decode(row.tolist())
    return out
