"""Representation swap: does the answer follow a bridge representation taken from another prompt?

For a target prompt (e₁ → e₂ → e₃) and a donor prompt of the same relation pair with another
bridge (e₁' → e₂' → e₃'), the donor's ``resid_pre`` at its named position (default e₁'s last token)
entering layer ℓ replaces the target's at its own named position, and the final-position logit
difference ``LD = logit[first token of e₃'] − logit[first token of e₃]`` is read (the
subject-swap test of Meng et al. 2022 §2 / Geva et al. 2023, at one position, with positions
allowed to differ between donor and target: the residual carries no absolute position in
rotary models). The swap *follows* when LD becomes positive, i.e. the donor's answer beats the
target's. When donor and target have the same token length and the same position, this equals
``patch_layer_pos(clean=donor, corrupted=target)`` (tested).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import PatchingError
from interp.mechanisms.lens import (
    SpanDict,
    SpansFn,
    batches,
    entity_first_token,
    named_position,
    resolve_spans,
)


@torch.no_grad()
def swap_patching(hm: Any, targets: Sequence[Any], donors: Sequence[Any],
                  layers: Sequence[int] | None = None, position: str = "e1_last",
                  answer: str = "e3", spans: Sequence[SpanDict] | None = None,
                  donor_spans: Sequence[SpanDict] | None = None, spans_fn: SpansFn | None = None,
                  batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Patch each donor's ``resid_pre`` at ``position`` into its target, layer by layer.

    Args:
        hm: any ``HookedModel``.
        targets, donors: aligned lists of examples (``prompt``, ``char_spans`` and the ``answer``
            attribute, an entity name whose first token is scored, see
            :func:`interp.mechanisms.lens.entity_first_token`).
        layers: layers ℓ whose ``blocks.ℓ.hook_resid_pre`` is swapped (default all).
        position: named position (:func:`interp.mechanisms.lens.named_position`) in both prompts.
        answer: attribute naming the answer entity of each prompt.
        spans, donor_spans, spans_fn: token spans (see :func:`~interp.mechanisms.lens.resolve_spans`).
        batch_size: prompts per forward (one full forward per layer and batch).
        progress: tqdm bar.

    Returns:
        Tidy DataFrame, one row per (target, layer): example_id, chain_id, donor_chain_id, layer,
        position, token_index, donor_token_index, logit_diff (patched LD, logits), base_logit_diff
        (target unpatched), donor_logit_diff (donor's own run), shift (``logit_diff −
        base_logit_diff``), follows (``logit_diff > 0``), top1_donor_answer (the patched
        argmax is the donor answer's first token).

    Raises:
        PatchingError: lengths differ, no examples, layers out of range, or a donor whose answer
            has the target answer's first token (LD would be 0 by construction).
    """
    if not targets or len(targets) != len(donors):
        raise PatchingError(f"need equally many targets and donors (> 0), got {len(targets)} and "
                            f"{len(donors)}")
    L = hm.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    if any(not 0 <= l < L for l in layers):
        raise PatchingError(f"layers must lie in [0, {L})")
    t_sp = resolve_spans(targets, hm, spans, spans_fn)
    d_sp = resolve_spans(donors, hm, donor_spans, spans_fn)
    t_ans = [entity_first_token(hm, getattr(e, answer)) for e in targets]
    d_ans = [entity_first_token(hm, getattr(e, answer)) for e in donors]
    same = [i for i, (a, b) in enumerate(zip(t_ans, d_ans)) if a == b]
    if same:
        raise PatchingError(f"donor and target answers share their first token for targets {same[:5]}")
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    wanted = set(names)
    dev = hm.device
    rows = []
    chunks = list(batches(len(targets), batch_size))
    for a, b in tqdm(chunks, desc="swap patching", leave=False, disable=not progress):
        n = b - a
        tt, tl = hm.tokenize([e.prompt for e in targets[a:b]])
        dt, dl = hm.tokenize([e.prompt for e in donors[a:b]])
        ar = torch.arange(n, device=dev)
        ta = torch.tensor(t_ans[a:b], device=dev)
        da = torch.tensor(d_ans[a:b], device=dev)
        tp = torch.tensor([named_position(position, t_sp[a + j], int(tl[j])) for j in range(n)],
                          device=dev)
        dp = [named_position(position, d_sp[a + j], int(dl[j])) for j in range(n)]
        d_logits, cache = hm.bridge.run_with_cache(dt, names_filter=lambda nm: nm in wanted)
        d_fin = d_logits[ar, dl - 1].float()
        donor_ld = (d_fin[ar, da] - d_fin[ar, ta]).cpu()
        t_fin = hm.logits(tt)[ar, tl - 1].float()
        base_ld = (t_fin[ar, da] - t_fin[ar, ta]).cpu()
        for l, nm in zip(layers, names):
            h = torch.stack([cache[nm][j, dp[j]] for j in range(n)])  # [n, d_model]

            def put(x, hook, h=h):
                x = x.clone()
                x[ar, tp] = h.to(x.dtype)
                return x

            fin = hm.bridge.run_with_hooks(tt, fwd_hooks=[(nm, put)])[ar, tl - 1].float()
            ld = (fin[ar, da] - fin[ar, ta]).cpu()
            top = fin.argmax(-1).cpu()
            for j in range(n):
                rows.append({"example_id": a + j,
                             "chain_id": getattr(targets[a + j], "chain_id", a + j),
                             "donor_chain_id": getattr(donors[a + j], "chain_id", -1),
                             "layer": l, "position": position, "token_index": int(tp[j]),
                             "donor_token_index": dp[j], "logit_diff": float(ld[j]),
                             "base_logit_diff": float(base_ld[j]),
                             "donor_logit_diff": float(donor_ld[j]),
                             "shift": float(ld[j] - base_ld[j]), "follows": bool(ld[j] > 0),
                             "top1_donor_answer": int(top[j]) == d_ans[a + j]})
    return pd.DataFrame(rows)


def pick_donors(items: Sequence[Any], group: str = "relation", bridge: str = "e2",
                answer_first: Sequence[int] | None = None, seed: int = 0) -> list[int | None]:
    """For each item, a donor index: same ``group`` attribute, another ``bridge`` entity and (when
    ``answer_first`` is given) another answer first token; drawn with ``numpy`` ``seed``.

    Returns:
        one index per item, ``None`` where no donor qualifies.
    """
    rng = np.random.default_rng(seed)
    out: list[int | None] = []
    for i, it in enumerate(items):
        cands = [j for j, d in enumerate(items)
                 if j != i and getattr(d, group) == getattr(it, group)
                 and getattr(d, bridge) != getattr(it, bridge)
                 and (answer_first is None or answer_first[j] != answer_first[i])]
        out.append(int(rng.choice(cands)) if cands else None)
    return out
