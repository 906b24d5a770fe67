"""Scoring prompts with gold answers, and accuracy tables with Wilson 95% intervals.

Metrics per example (:func:`score_examples`), all from **one teacher-forced forward** of
``encode(prompt) + encode(answer)`` (right-padded batch, no attention mask needed: a causal
model's real positions never see the pads that follow them):

* ``first_token_correct`` — the argmax at the last prompt position equals the answer's first
  token (the usual one-token metric; meaningful when candidate answers have distinct first
  tokens, see ``tasks.two_hop``);
* ``exact_match`` — every answer token is the argmax given the gold prefix. By induction this is
  the same as "greedy decoding of ``len(answer tokens)`` tokens reproduces the answer exactly"
  (if the first k greedy tokens equal the gold ones, the (k+1)-th greedy step sees exactly the
  gold prefix), so one forward replaces a decode loop; tested against :func:`greedy_answers`;
* ``answer_logprob`` — Σ log p(answer token | prompt, gold prefix), nats.

The answer is tokenised separately from the prompt; the task modules guarantee that
``encode(prompt) + encode(answer) == encode(prompt + answer)`` for their templates.

:func:`accuracy_table` aggregates scored frames (to which the caller adds ``method, library,
test_set, hop``) into the tidy table of issue 4 with Wilson score intervals (Wilson 1927).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from interp.errors import EvaluationError

TABLE_COLUMNS = ["method", "library", "test_set", "hop", "metric", "n", "accuracy", "ci_low",
                 "ci_high"]
METRIC_COLUMNS = {"first_token": "first_token_correct", "exact": "exact_match"}
_EXAMPLE_FIELDS = ("prompt", "answer", "kind", "tier", "split", "chain_id", "template_id",
                   "relation", "held_out_template", "e1", "e2", "e3", "variant", "problem_id")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927, JASA 22:209).

    ``centre = (p + z²/2n) / (1 + z²/n)``, ``half = z √(p(1−p)/n + z²/4n²) / (1 + z²/n)``
    with ``p = k/n``; the bounds are clipped to [0, 1]. ``z = 1.96`` gives a 95% interval.

    Returns:
        ``(lo, hi)``, fractions in [0, 1].

    Raises:
        EvaluationError: ``n <= 0``, ``k`` outside ``[0, n]``, non-integer counts, or ``z <= 0``.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise EvaluationError(f"wilson_interval needs integer counts, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n <= 0:
        raise EvaluationError(f"wilson_interval needs n > 0, got n={n}")
    if not 0 <= k <= n:
        raise EvaluationError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if not z > 0:
        raise EvaluationError(f"wilson_interval needs z > 0, got {z}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _encode(hm: Any, text: str, what: str) -> list[int]:
    ids = hm.encode(text)
    if not ids:
        raise EvaluationError(f"{what} {text!r} tokenises to no tokens")
    return ids


def _route_ctx(route: Callable | None, batch: Sequence[Any]):
    return route(list(batch)) if route is not None else contextlib.nullcontext()


def _by_length(lengths: Sequence[int], route: Callable | None) -> list[int]:
    """The order in which to batch examples: by token length (stable), so each batch pads to
    nearly its own length (~10% fewer tokens on the study's query sets); input order under a
    ``route``, whose context is entered per batch of the caller's own grouping (oracle routing).
    Each row's result does not depend on its batch mates (causal attention, right padding)."""
    if route is not None:
        return list(range(len(lengths)))
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


@torch.no_grad()
def logits_at(hm: Any, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 logits at chosen positions, ``[n, d_vocab]`` for ``n`` (row, col) pairs.

    Runs the decoder of the transformers model the bridge wraps (same modules, LoRA layers and
    routers included) once over ``tokens [batch, pos]`` and applies the unembedding only where it
    is read: on two-hop prompts that is ~2 of ~15 positions, a fifth of a SmolLM2 forward saved.
    Falls back to the bridge's full logits for heads that do more than a linear map
    (logit soft-capping) or models without ``get_decoder``. Equal to ``hm.logits(tokens)[rows,
    cols]`` (tested).
    """
    from interp.models import decoder_and_head

    split = decoder_and_head(hm.hf_model)
    if split is None:
        return hm.logits(tokens)[rows.to(tokens.device), cols.to(tokens.device)].float()
    decoder, head = split
    hidden = decoder(input_ids=tokens, use_cache=False).last_hidden_state
    return head(hidden[rows.to(hidden.device), cols.to(hidden.device)]).float()


@torch.no_grad()
def score_examples(hm: Any, examples: Sequence[Any], batch_size: int = 16,
                   route: Callable[[list], Any] | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Score each example by teacher forcing: first-token correctness, exact match, log-prob.

    Args:
        hm: a ``HookedModel`` (adapters attached or not).
        examples: objects with ``prompt`` and ``answer`` (``tasks.two_hop.Example``,
            ``tasks.math_word`` problems); other known fields are copied to the output.
        batch_size: examples per forward; each forward is ``[batch, max(len(p)+len(a))]``,
            batches formed in order of token length unless ``route`` is given.
        route: optional ``route(batch_examples) -> context manager`` entered around that batch's
            forward (oracle routing: activate the right adapter per batch).
        progress: show a tqdm bar.

    Returns:
        one row per example, in input order: ``idx``, the example's fields (prompt, answer, kind,
        tier, split, ... when present), ``first_token_correct`` (bool), ``exact_match`` (bool),
        ``answer_logprob`` (nats), ``n_answer_tokens``, ``pred_first_token`` (decoded argmax at
        the last prompt position), ``gold_first_token``.

    Raises:
        EvaluationError: empty ``examples``, ``batch_size < 1``, a prompt or answer that tokenises to
            nothing, or a sequence longer than the model's context.
    """
    if not examples:
        raise EvaluationError("score_examples got an empty list of examples")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    n_ctx = int(getattr(hm.bridge.cfg, "n_ctx", 0) or 0)
    rows: list[dict] = []
    enc_p = [_encode(hm, e.prompt, "prompt") for e in examples]
    enc_a = [_encode(hm, e.answer, "answer") for e in examples]
    order = _by_length([len(p) + len(a) for p, a in zip(enc_p, enc_a)], route)
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="score", unit="batch")
    with contextlib.ExitStack() as bypass:
        _score_batches(hm, examples, batch_size, route, enc_p, enc_a, order, starts, n_ctx, rows, bypass)
    return pd.DataFrame(rows).sort_values("idx", ignore_index=True)


def _bridge_bypass_ok(hm: Any, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
                      = None) -> bool | None:
    """Whether scoring may run ``hm``'s transformers modules without the bridge's wrappers
    (:func:`interp.surgery.bridge_bypassed`): no hook set on any hook point, no fused projection
    run as split copies, and the logits of a real batch bit-identical without the wrappers —
    checked once per model on ``batch = (tokens, rows, cols, logits read through the bridge)``,
    the verdict kept in ``hm.info``. ``None`` when that check is still to be made and no batch is given."""
    from interp.surgery import bridge_bypassed, bridge_hooks_in_use, runs_split_copies

    bridge = getattr(hm, "bridge", None)
    if bridge is None or bridge_hooks_in_use(bridge) or runs_split_copies(hm.hf_model):
        return False
    info = getattr(hm, "info", None)
    state = _bypass_state(hm)
    if isinstance(info, dict) and "bridge_bypass_exact" in info and info.get("bridge_bypass_state") == state:
        return info["bridge_bypass_exact"]
    if batch is None:
        return None
    tokens, rows, cols, read = batch
    with bridge_bypassed(hm.hf_model):
        ok = bool(torch.equal(logits_at(hm, tokens, rows, cols), read))
    if isinstance(info, dict):
        info.update(bridge_bypass_exact=ok, bridge_bypass_state=state)
    return ok


def _bypass_state(hm: Any) -> int:
    """What the bypass verdict was checked under: the module tree (which modules, where), the
    attention kernel and the bridge's config flags (``set_use_attn_result`` and kin change how
    its components compute). A verdict checked under another state is checked again."""
    from interp.surgery import attention_kernels

    cfg = getattr(hm.bridge, "cfg", None)
    flags = sorted((k, v) for k, v in vars(cfg).items() if isinstance(v, (bool, int, float, str, type(None)))) \
        if cfg is not None and hasattr(cfg, "__dict__") else []
    tree = [(n, id(m)) for n, m in hm.hf_model.named_modules()]
    return hash((tuple(flags), attention_kernels(hm.hf_model), tuple(tree)))


def _score_batches(hm, examples, batch_size, route, enc_p, enc_a, order, starts, n_ctx, rows, bypass) -> None:
    """The batch loop of :func:`score_examples` (rows appended to ``rows``). Without a ``route``
    and where :func:`_bridge_bypass_ok` (known from an earlier call, else checked on the first
    batch), the batches run with the bridge's wrappers bypassed (``bypass``, an ExitStack the
    caller closes): the same logits, without the wrappers' per-module Python work, which bounds
    a small model's forward on a GPU."""
    from interp.surgery import bridge_bypassed

    ok = False if route is not None else _bridge_bypass_ok(hm)  # a route's context may add hooks per batch
    if ok:
        bypass.enter_context(bridge_bypassed(hm.hf_model))
    for b in starts:
        picked = order[b:b + batch_size]  # example indices of this batch
        batch = [examples[j] for j in picked]
        ps = [enc_p[j] for j in picked]
        ans = [enc_a[j] for j in picked]
        width = max(len(p) + len(a) for p, a in zip(ps, ans))
        if n_ctx and width > n_ctx:
            raise EvaluationError(f"a prompt+answer has {width} tokens, more than the context {n_ctx}")
        toks = torch.full((len(batch), width), hm.pad_token_id, dtype=torch.long)
        for i, (p, a) in enumerate(zip(ps, ans)):
            toks[i, :len(p) + len(a)] = torch.tensor(p + a)
        rows_, cols_ = [], []
        for i, (p, a) in enumerate(zip(ps, ans)):
            rows_ += [i] * len(a)
            cols_ += range(len(p) - 1, len(p) - 1 + len(a))
        tk, r, c = toks.to(hm.device), torch.tensor(rows_), torch.tensor(cols_)
        with _route_ctx(route, batch):
            read = logits_at(hm, tk, r, c)
        if ok is None:  # the first batch of a model not checked yet
            ok = _bridge_bypass_ok(hm, (tk, r, c, read))
            if ok:
                bypass.enter_context(bridge_bypassed(hm.hf_model))
        # everything read per example comes to the host in one transfer per batch (on a GPU,
        # per-example reads would be ~5 synchronisations each); sums are taken there, in order
        gold_all = torch.tensor([t for a in ans for t in a], device=read.device)
        pred_all = read.argmax(-1).tolist()
        lp_all = torch.log_softmax(read, dim=-1).gather(1, gold_all[:, None])[:, 0].cpu()
        start = 0
        for i, (e, p, a) in enumerate(zip(batch, ps, ans)):
            sl = slice(start, start + len(a))
            start += len(a)
            pred = pred_all[sl]
            row = {"idx": picked[i]}
            for f in _EXAMPLE_FIELDS:
                if hasattr(e, f):
                    row[f] = getattr(e, f)
            row.update(first_token_correct=pred[0] == a[0],
                       exact_match=pred == list(a),
                       answer_logprob=float(lp_all[sl].sum()),
                       n_answer_tokens=len(a),
                       pred_first_token=hm.tokenizer.decode([pred[0]]),
                       gold_first_token=hm.tokenizer.decode([a[0]]))
            rows.append(row)


def accuracy_table(scored: pd.DataFrame, by: Sequence[str] = ("method", "library", "test_set", "hop"),
                   metrics: Sequence[str] = ("first_token", "exact"), z: float = 1.96) -> pd.DataFrame:
    """Accuracy with Wilson intervals per group and metric, as a tidy table.

    Args:
        scored: rows from :func:`score_examples` (possibly concatenated over methods) with the
            grouping columns added by the caller.
        by: grouping columns; must include ``method, library, test_set, hop`` (extra columns,
            e.g. ``tier``, are appended after them).
        metrics: ``"first_token"`` (column ``first_token_correct``) and/or ``"exact"``
            (``exact_match``).
        z: normal quantile of the interval (1.96 → 95%).

    Returns:
        columns ``method, library, test_set, hop, metric, n, accuracy, ci_low, ci_high`` (+ extra
        ``by`` columns after ``hop``); accuracies and bounds are fractions in [0, 1].

    Raises:
        EvaluationError: empty frame, missing grouping/metric columns, unknown metric.
    """
    if scored is None or len(scored) == 0:
        raise EvaluationError("accuracy_table got an empty scored frame")
    by = list(by)
    required = ["method", "library", "test_set", "hop"]
    missing = [c for c in required if c not in by] + [c for c in by if c not in scored.columns]
    if missing:
        raise EvaluationError(f"accuracy_table: missing grouping columns {missing} (scored frames "
                         f"need {required}; the caller adds them)")
    for m in metrics:
        if m not in METRIC_COLUMNS:
            raise EvaluationError(f"unknown metric {m!r}; expected one of {sorted(METRIC_COLUMNS)}")
        if METRIC_COLUMNS[m] not in scored.columns:
            raise EvaluationError(f"scored frame has no {METRIC_COLUMNS[m]!r} column for metric {m!r}")
    extra = [c for c in by if c not in required]
    rows = []
    for keys, g in scored.groupby(by, sort=True, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for m in metrics:
            col = g[METRIC_COLUMNS[m]].astype(bool)
            k, n = int(col.sum()), int(col.size)
            lo, hi = wilson_interval(k, n, z)
            rows.append({**dict(zip(by, keys)), "metric": m, "n": n, "accuracy": k / n,
                         "ci_low": lo, "ci_high": hi})
    cols = required + extra + TABLE_COLUMNS[4:]
    return pd.DataFrame(rows, columns=cols)


@torch.no_grad()
def greedy_answers(hm: Any, examples: Sequence[Any], max_new_tokens: int = 8,
                   batch_size: int = 16, route: Callable[[list], Any] | None = None,
                   stop_at_eos: bool = True) -> list[str]:
    """Greedy continuations of each prompt, batched, with a KV cache.

    The batch is left-padded with an attention mask and explicit position ids (each row counts
    positions from its own first real token), so every row decodes as it would alone; after the
    prompt pass each step feeds one token per row and reads only the last position's logits.
    Runs the transformers model the bridge wraps (same modules, LoRA layers and routers
    included; its logits equal the bridge's). Used for explicit chaining
    (``tasks.two_hop.chaining_prompts``).

    Args:
        hm: a ``HookedModel``.
        examples: objects with ``prompt`` (or plain strings).
        max_new_tokens: tokens generated per prompt (≥ 1).
        batch_size: prompts per forward (batched in order of length unless ``route`` is given).
        route: optional ``route(batch_examples) -> context manager`` around each batch.
        stop_at_eos: stop a row at the tokenizer's EOS (not included in the text).

    Returns:
        the decoded continuation of each prompt (``tokenizer.decode`` of the new ids).

    Raises:
        EvaluationError: empty input, ``max_new_tokens < 1``, a prompt that tokenises to nothing.
    """
    if not examples:
        raise EvaluationError("greedy_answers got an empty list of examples")
    if max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = hm.tokenizer.eos_token_id
    dev = hm.device
    enc = [_encode(hm, e if isinstance(e, str) else e.prompt, "prompt") for e in examples]
    order = _by_length([len(r) for r in enc], route)
    out: list[str] = [""] * len(examples)
    for b in range(0, len(examples), batch_size):
        rows = order[b:b + batch_size]
        batch = [examples[j] for j in rows]
        ids = [enc[j] for j in rows]
        width = max(len(r) for r in ids)
        toks = torch.full((len(ids), width), hm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, r in enumerate(ids):
            toks[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        toks, mask = toks.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(ids), dtype=torch.bool)
        new: list[list[int]] = [[] for _ in ids]
        with _route_ctx(route, batch):
            res = hm.hf_model(input_ids=toks, attention_mask=mask, position_ids=pos, use_cache=True,
                              logits_to_keep=1)
            for step in range(max_new_tokens):
                nxt = res.logits[:, -1].argmax(-1).cpu()
                for i in range(len(ids)):
                    if done[i]:
                        continue
                    t = int(nxt[i])
                    if stop_at_eos and eos is not None and t == eos:
                        done[i] = True
                        continue
                    new[i].append(t)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                res = hm.hf_model(input_ids=nxt[:, None].to(dev), attention_mask=mask, position_ids=pos,
                                  past_key_values=res.past_key_values, use_cache=True, logits_to_keep=1)
        for j, r in zip(rows, new):
            out[j] = hm.tokenizer.decode(r)
    return out
