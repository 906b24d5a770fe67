"""The bridge mechanisms of one diagnosed variant: Patchscope, back-patching, attention knockout.

Each runs the tested engine of :mod:`interp.mechanisms` unchanged, on the prompt lines that carry
what it needs, in chunks of the run's batch size; ``example_id`` of the engines (an index into a
chunk) becomes ``line`` (the prompt file's line), so the tables join :mod:`scores <interp.diagnose.variants>`.

* :func:`patchscope_table` — lines with ``bridge`` and ``subject``: the residual entering each
  layer ℓ at e₁'s last token, decoded through the token-identity target prompt at layer ℓ
  (Ghandeharioun et al. 2024, eq. 1; :func:`interp.mechanisms.patchscope`), scored on the
  bridge's first token. Columns: ``variant, line, source_layer, target_layer, logprob`` (nats),
  ``rank`` (0 = top-1), ``top1``, ``top_token``.
* :func:`backpatch_table` — lines with ``bridge`` (two-hop queries): the final-position residual
  entering layer ℓs written into the residual entering layer ℓt ≤ ℓs of the same prompt (Biran et
  al. 2024, §5; :func:`interp.mechanisms.back_patching`). Columns: ``variant, line, source_layer,
  target_layer, logprob`` (first answer token, nats), ``base_logprob`` (unpatched), ``delta``
  (``logprob − base_logprob``), ``correct``, ``was_correct``, ``fixed`` (top-1 now, not before).
* :func:`knockout_table` — lines with ``subject`` whose mention ends before the final token:
  attention from the final token to the subject's tokens blocked in a window of
  :data:`KNOCKOUT_WINDOW` layers centred on each layer (Geva et al. 2023, §5;
  :func:`interp.mechanisms.attention_knockout`). Columns: ``variant, line, layer`` (centre),
  ``first_layer, last_layer, logprob, base_logprob, delta`` (nats, first answer token).

None runs on the ``oracle`` variant: its routing is fixed per prompt of a batch, while the engines
batch copies of prompts (the report says so).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pandas as pd

from interp.diagnose.inputs import Query

#: layers blocked per knockout centre (Geva et al. 2023 use 9 of GPT-J's 28 layers; a sixth of
#: SmolLM2's 30 is 5); clipped to the model's layers by the engine
KNOCKOUT_WINDOW = 5
#: the Patchscope target prompt (``interp.mechanisms.patchscope.TARGET_PROMPTS``)
PATCHSCOPE_TARGET = "identity"


def _by_line(fn: Callable[[list[Query]], pd.DataFrame], qs: Sequence[Query], batch_size: int,
             keep: Sequence[str]) -> pd.DataFrame:
    """``fn`` on chunks of ``batch_size`` queries; ``example_id`` → ``line``; columns ``keep``."""
    frames = []
    for i in range(0, len(qs), batch_size):
        chunk = list(qs[i:i + batch_size])
        df = fn(chunk)
        df.insert(0, "line", [chunk[int(j)].line for j in df["example_id"]])
        frames.append(df[["line", *keep]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _spans(qs: Sequence[Query], hm: Any) -> list[dict]:
    from interp.mechanisms.lens import offsets_token_spans

    return [offsets_token_spans(q, hm) for q in qs]


def patchscope_table(hm: Any, queries: Sequence[Query], batch_size: int = 16) -> pd.DataFrame:
    """Patchscope of the bridge from e₁'s last token, every source layer (see module docstring);
    empty without lines carrying both ``bridge`` and ``subject``."""
    from interp.mechanisms import patchscope

    qs = [q for q in queries if q.bridge and q.subject]
    return _by_line(lambda c: patchscope(hm, c, "e1_last", PATCHSCOPE_TARGET, targets=("e2",), spans=_spans(c, hm),
                                         max_batch=64, progress=False),
                    qs, batch_size, ("source_layer", "target_layer", "logprob", "rank", "top1", "top_token"))


def backpatch_table(hm: Any, queries: Sequence[Query], batch_size: int = 16) -> pd.DataFrame:
    """Back-patching grid ℓs → ℓt ≤ ℓs at the final position (see module docstring); empty
    without lines carrying a ``bridge``."""
    from interp.mechanisms import back_patching

    qs = [q for q in queries if q.bridge]
    df = _by_line(lambda c: back_patching(hm, c, progress=False), qs, batch_size,
                  ("source_layer", "target_layer", "logprob", "base_logprob", "correct", "was_correct", "fixed"))
    if len(df):
        df.insert(5, "delta", df["logprob"] - df["base_logprob"])
    return df


def knockout_table(hm: Any, queries: Sequence[Query], batch_size: int = 16) -> pd.DataFrame:
    """Attention knockout of the subject from the final token (see module docstring); empty
    without lines whose ``subject`` ends before the final token."""
    from interp.mechanisms import attention_knockout

    qs = [q for q in queries if q.subject]
    keep = [q for q, s in zip(qs, _spans(qs, hm)) if s["e1"][1] <= len(hm.encode(q.prompt)) - 1]
    return _by_line(lambda c: attention_knockout(hm, c, "e1", KNOCKOUT_WINDOW, spans=_spans(c, hm), progress=False),
                    keep, batch_size, ("layer", "first_layer", "last_layer", "logprob", "base_logprob", "delta"))
