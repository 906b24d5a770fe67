"""Clean / corrupted prompt pairs for activation patching (e₁ swapped for a donor of equal token
length, same tier and template), and their tokens and answer ids."""

from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Any, Sequence

import torch

from interp.errors import PatchingError
from interp.mechanisms.lens import SpanDict, SpansFn, resolve_spans


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
        PatchingError: no example has a valid donor, or an example lacks an ``e1`` span.
    """
    rng = random.Random(seed)
    sp = resolve_spans(examples, hm, spans, spans_fn)
    first = [int(hm.encode(ex.answer)[0]) for ex in examples]
    lengths = [len(hm.encode(ex.prompt)) for ex in examples]
    pairs, skipped = [], 0
    for i, ex in enumerate(examples):
        if "e1" not in ex.char_spans:
            raise PatchingError(f"example {i} ({ex.prompt!r}) has no e1 span to corrupt")
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
        raise PatchingError("no example has a donor of the same tier/kind/template, equal token "
                         "length and a different answer")
    if skipped:
        warnings.warn(f"make_corrupted_pairs: {skipped} of {len(examples)} examples had no donor")
    return pairs


def _tokens_for_pairs(hm: Any, pairs: Sequence[PatchPair]):
    ct, cl = hm.tokenize([p.clean_prompt for p in pairs])
    xt, xl = hm.tokenize([p.corrupted_prompt for p in pairs])
    bad = [p.example_id for p, a, b in zip(pairs, cl.tolist(), xl.tolist()) if a != b]
    if bad:
        raise PatchingError(f"clean and corrupted prompts differ in token length for examples {bad}")
    ca = torch.tensor([hm.encode(p.clean_answer)[0] for p in pairs], device=hm.device)
    xa = torch.tensor([hm.encode(p.corrupted_answer)[0] for p in pairs], device=hm.device)
    if bool((ca == xa).any()):
        raise PatchingError("a pair has the same first answer token clean and corrupted: the logit "
                         "difference is 0")
    return ct, xt, cl, ca, xa


