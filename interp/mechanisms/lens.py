"""Logit lens and EntRec: is the bridge entity decodable from the residual stream?

The *logit lens* reads a residual-stream state ``x`` (``[..., d_model]``) as if it were the last
one: ``logits = W_U · LN_final(x)`` (nostalgebraist 2020). *EntRec* (Yang et al. 2024, "Do Large
Language Models Latently Perform Multi-Hop Reasoning?", ACL 2024, §3, eq. 2) is the logit lens's
log-softmax at the first token of an entity::

    EntRec^ℓ(e, t) = log softmax(W_U · LN_final(h^ℓ_t))[first_token(e)]

computed here for e₂ (the bridge entity) and e₃ (the answer) — both curves, since later hops are
sometimes decodable before the bridge (Liu et al. 2026) — at the last token of the e₁ mention and
at the final position, with the entity token's rank (:func:`token_rank`: the number of tokens
with a strictly greater log-probability, so 0 = top-1 and ties count in the target's favour).

Lens layers run ``0..n_layers``: layer ``ℓ < n_layers`` reads ``blocks.ℓ.hook_resid_pre``; layer
``n_layers`` reads the final residual ``blocks.{n_layers-1}.hook_resid_post``, where the lens equals
the model's logits exactly.

This module also holds the small data helpers shared by :mod:`interp.mechanisms` (token spans,
entity first tokens, position labels); they take any object with the two-hop ``Example`` fields.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import LensError

SpanDict = dict[str, tuple[int, int]]
SpansFn = Callable[[Any, Any], SpanDict]

# --------------------------------------------------------------------------------------------
# Shared data helpers
# --------------------------------------------------------------------------------------------


def offsets_token_spans(example: Any, hm: Any) -> SpanDict:
    """Token span ``[start, end)`` of each ``example.char_spans`` entry, from tokenizer offsets.

    The fallback when :func:`interp.tasks.two_hop.token_spans` is not importable; same rule (a
    token belongs to a mention when its character offsets overlap it).

    Raises:
        LensError: the tokenizer gives no offsets, or a mention covers no token.
    """
    tok = hm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise LensError("token spans need a fast tokenizer (offset mappings)")
    offsets = tok(example.prompt, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"]
    out: SpanDict = {}
    for key, (cs, ce) in example.char_spans.items():
        idx = [t for t, (a, b) in enumerate(offsets) if a < ce and b > cs and b > a]
        if not idx:
            raise LensError(f"mention {key!r} of {example.prompt!r} covers no token")
        out[key] = (idx[0], idx[-1] + 1)
    return out


def default_spans_fn() -> SpansFn:
    """``interp.tasks.two_hop.token_spans`` when importable, else :func:`offsets_token_spans`."""
    try:
        from interp.tasks.two_hop import token_spans
        return token_spans
    except Exception:  # noqa: BLE001 - any import problem means "use the fallback"
        return offsets_token_spans


def resolve_spans(examples: Sequence[Any], hm: Any, spans: Sequence[SpanDict] | None = None,
                  spans_fn: SpansFn | None = None) -> list[SpanDict]:
    """One token-span dict per example: ``spans`` if given, else ``spans_fn(example, hm)``.

    Raises:
        LensError: ``spans`` has a different length than ``examples``, or a span lies outside
            its prompt (an empty span ``(a, a)`` is allowed).
    """
    if spans is not None:
        if len(spans) != len(examples):
            raise LensError(f"got {len(spans)} span dicts for {len(examples)} examples")
        out = [dict(s) for s in spans]
    else:
        fn = spans_fn or default_spans_fn()
        out = [dict(fn(ex, hm)) for ex in examples]
    for ex, s in zip(examples, out):
        n = len(hm.encode(ex.prompt))
        for key, (a, b) in s.items():
            if not 0 <= a <= b <= n:
                raise LensError(f"span {key}={a, b} is outside the {n} tokens of {ex.prompt!r}")
    return out


def entity_first_token(hm: Any, entity: str) -> int:
    """First token of ``" " + entity`` that carries part of the name.

    Byte-level tokenizers can split a leading space off as a token of its own (``" "``, then
    ``"Zorvath"``); a bare whitespace token says nothing about which entity is meant, so the
    first token whose text is not whitespace is taken (``hm.encode(" " + entity)[0]`` when the
    space is merged into the name's first token, as usual).

    Raises:
        LensError: empty entity name.
    """
    if not entity or not entity.strip():
        raise LensError("entity name is empty")
    ids = hm.encode(" " + entity.strip())
    for i in ids:
        if hm.tokenizer.decode([int(i)]).strip():
            return int(i)
    return int(ids[0])


def position_label(p: int, spans: SpanDict, length: int) -> str:
    """Label of token position ``p`` of a prompt of ``length`` tokens.

    ``"final"`` for the last token; inside a span ``k`` (e.g. ``"e1"``): ``"k_last"`` for its
    last token and ``"k_i"`` for token ``i`` of it otherwise; ``"pad"`` past the prompt;
    ``"other"`` elsewhere.
    """
    if p >= length:
        return "pad"
    if p == length - 1:
        return "final"
    for key, (a, b) in spans.items():
        if a <= p < b:
            return f"{key}_last" if p == b - 1 else f"{key}_{p - a}"
    return "other"


def named_position(name: str, spans: SpanDict, length: int) -> int:
    """Token index of a named position: ``"final"``, ``"<span>_last"``, ``"<span>_first"``.

    Raises:
        LensError: unknown name or a span the example lacks.
    """
    if name == "final":
        return length - 1
    for suffix, pick in (("_last", lambda ab: ab[1] - 1), ("_first", lambda ab: ab[0])):
        if name.endswith(suffix):
            key = name[: -len(suffix)]
            if key not in spans:
                raise LensError(f"position {name!r} needs span {key!r}; have {sorted(spans)}")
            return pick(spans[key])
    raise LensError(f"unknown position name {name!r}: use 'final', '<span>_last', '<span>_first'")


def example_meta(ex: Any, i: int) -> dict[str, Any]:
    """Identifying columns of an example for tidy tables."""
    return {"example_id": i, "chain_id": getattr(ex, "chain_id", i),
            "tier": getattr(ex, "tier", ""), "kind": getattr(ex, "kind", "")}


def batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(n)`` in chunks of ``size``."""
    if size < 1:
        raise LensError(f"batch size must be >= 1, got {size}")
    for a in range(0, n, size):
        yield a, min(n, a + size)


# --------------------------------------------------------------------------------------------
# Logit lens
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def lens_logits(hm: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logit lens of residual states: ``unembed(ln_final(resid))``.

    Args:
        hm: a ``HookedModel``.
        resid: ``[..., d_model]`` residual-stream states (any leading shape).

    Returns:
        ``[..., d_vocab]`` fp32 logits.

    Raises:
        LensError: last dimension is not ``d_model``.
    """
    if resid.shape[-1] != hm.d_model:
        raise LensError(f"residual last dim {resid.shape[-1]} != d_model {hm.d_model}")
    lead = resid.shape[:-1]
    x = resid.reshape(1, -1, hm.d_model).to(hm.device)
    out = hm.bridge.unembed(hm.bridge.ln_final(x))
    return out.reshape(*lead, -1).float()


@torch.no_grad()
def residual_stack(hm: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Residual stream at every lens layer: ``[n_layers + 1, batch, pos, d_model]``.

    Entry ``ℓ < n_layers`` is ``blocks.ℓ.hook_resid_pre``; entry ``n_layers`` is the final
    ``blocks.{n_layers-1}.hook_resid_post``. One ``run_with_cache`` with a ``names_filter``.
    """
    L = hm.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    wanted = set(names)
    _, cache = hm.bridge.run_with_cache(tokens.to(hm.device), names_filter=lambda n: n in wanted)
    return torch.stack([cache[n] for n in names])


@torch.no_grad()
def logit_lens(hm: Any, texts: Sequence[str]) -> torch.Tensor:
    """Logit-lens log-probabilities at every layer and position.

    Args:
        hm: a ``HookedModel``.
        texts: prompts (right-padded together; positions past a prompt's length are padding).

    Returns:
        ``[n_layers + 1, batch, pos, d_vocab]`` log-softmax of the lens logits (nats). Entry
        ``n_layers`` equals ``log_softmax`` of the model's own logits.

    Raises:
        LensError: empty ``texts`` (from ``hm.tokenize``).
    """
    toks, _ = hm.tokenize(list(texts))
    return torch.log_softmax(lens_logits(hm, residual_stack(hm, toks)), dim=-1)


def token_rank(scores: torch.Tensor, token_id: int) -> torch.Tensor:
    """Rank of ``token_id`` in ``scores`` ``[..., d_vocab]`` (logits or log-probabilities): the
    number of tokens with a strictly greater score, ``[...]`` int64.

    0 = top-1. Ties count in the target's favour (a token tied with others for the top has rank
    0), the usual "competition" convention of the logit-lens literature; rank + 1 is the
    target's position if ties were broken for it.
    """
    return (scores > scores[..., token_id, None]).sum(-1)


@torch.no_grad()
def entrec(hm: Any, examples: Sequence[Any], positions: Sequence[str] = ("e1_last", "final"),
           spans: Sequence[SpanDict] | None = None, spans_fn: SpansFn | None = None,
           batch_size: int = 16, targets: Sequence[str] = ("e2", "e3")) -> pd.DataFrame:
    """EntRec curves (Yang et al. 2024, eq. 2) of the bridge entity e₂ and the answer e₃.

    For every example, lens layer ℓ ∈ ``0..n_layers`` and named position, the logit-lens
    log-probability (nats) of the entity's first token (``hm.encode(" " + e)[0]``) and its rank
    among all ``d_vocab`` tokens (:func:`token_rank`: tokens with a strictly greater log-probability;
    0 = top-1, ties count in the target's favour).

    Args:
        hm: any ``HookedModel`` (base, expert, merge, router).
        examples: objects with ``prompt``, ``e2``, ``e3``, ``char_spans`` (and optionally
            ``tier``, ``kind``, ``chain_id``).
        positions: names for :func:`named_position` (``"e1_last"``, ``"final"``, ...).
        spans: token spans per example (else ``spans_fn`` / ``interp.tasks.two_hop.token_spans``).
        batch_size: prompts per forward.
        targets: entity attributes to score.

    Returns:
        Tidy DataFrame: example_id, chain_id, tier, kind, layer, position, token_index,
        target, token_id, logprob, rank.

    Raises:
        LensError: no examples, an unknown position, or an empty entity name.
    """
    if not examples:
        raise LensError("entrec() got no examples")
    sp = resolve_spans(examples, hm, spans, spans_fn)
    rows = []
    for a, b in tqdm(list(batches(len(examples), batch_size)), desc="EntRec", leave=False,
                     disable=len(examples) <= batch_size):
        chunk = examples[a:b]
        toks, lengths = hm.tokenize([ex.prompt for ex in chunk])
        stack = residual_stack(hm, toks)  # [L+1, n, pos, d]
        for j, ex in enumerate(chunk):
            i = a + j
            n = int(lengths[j])
            tgt = {t: entity_first_token(hm, getattr(ex, t)) for t in targets}
            for pos_name in positions:
                p = named_position(pos_name, sp[i], n)
                lp = torch.log_softmax(lens_logits(hm, stack[:, j, p]), dim=-1)  # [L+1, V]
                for t, tid in tgt.items():
                    score = lp[:, tid]
                    rank = token_rank(lp, tid)
                    for layer in range(lp.shape[0]):
                        rows.append({**example_meta(ex, i), "layer": layer, "position": pos_name,
                                     "token_index": p, "target": t, "token_id": tid,
                                     "logprob": float(score[layer]), "rank": int(rank[layer])})
    return pd.DataFrame(rows)
