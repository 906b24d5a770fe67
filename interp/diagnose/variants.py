"""The models ``interp diagnose`` compares, and what it measures on each (one model load each).

Variants, in report order: ``base`` (no adapter), ``expert_<name>`` (each adapter alone,
``combine="none"``), then one per requested combine over every adapter (``uniform``, ``ties``,
``arrow``, …; :func:`interp.load_hooked`). Each variant's tables are computed from one load and
cached under ``DIR/cache/variants/<variant>.<key>/`` (:func:`variant_tables`), so an interrupted
diagnosis resumes at the first unfinished variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from interp.diagnose.inputs import PLACEHOLDER, Query

#: combines whose per-token router weights the report shows (the others are constant)
ROUTED = ("arrow", "oracle", "mixture")


@dataclasses.dataclass(frozen=True)
class DVariant:
    """One diagnosed model: ``name`` (the ``variant`` column), its adapters and ``combine``."""

    name: str
    adapters: tuple[str, ...]
    combine: str
    role: str  # "base" | "expert" | "combine"


def plan_variants(adapters: Sequence[str], combines: Sequence[str]) -> list[DVariant]:
    """base, each expert alone, then each combine of all adapters (only with ≥ 2 adapters)."""
    out = [DVariant("base", (), "none", "base")]
    out += [DVariant(f"expert_{a}", (a,), "none", "expert") for a in adapters]
    if len(adapters) >= 2:
        out += [DVariant(c, tuple(adapters), c, "combine") for c in combines]
    return out


def load_variant(run: Any, v: DVariant):
    """The variant's ``HookedModel`` (the run's base for ``base``), on the run's device."""
    if not v.adapters:
        return run.base()
    from interp import load_hooked

    dirs = run.cfg.diagnose["adapters"]
    opts = run.cfg.diagnose.get("options", {}).get(v.combine, {}) if v.role == "combine" else {}
    hm = load_hooked(run.model, {a: dirs[a] for a in v.adapters}, combine=v.combine, **opts)
    if run.cfg.study.device != "cpu":
        hm.hf_model.to(run.cfg.study.device)
    return hm


def _route(hm: Any, v: DVariant) -> Callable[[list], Any] | None:
    """Oracle routing: each item of a batch wholly to its own ``expert`` label (the JSONL's:
    ``expert`` for the query, ``hop1_expert`` / ``hop2_expert`` for each hop, see
    :func:`score_sets`); ``None`` for every other variant."""
    if v.combine != "oracle":
        return None
    from interp.adapters.route import route_examples

    return lambda batch: route_examples(hm, [q.expert for q in batch])


def _routable(v: DVariant, items: Sequence[Any]) -> bool:
    """Whether ``v`` can run ``items``: every variant but the oracle always; the oracle only
    where every item carries an ``expert`` label to route to."""
    return v.combine != "oracle" or all(x.expert for x in items)


@dataclasses.dataclass(frozen=True)
class _Ex:
    """A scored item: what :func:`interp.evaluate.score_examples` reads, plus the query's line."""

    prompt: str
    answer: str
    line: int
    expert: str = ""


def score_sets(hm: Any, v: DVariant, queries: Sequence[Query], batch_size: int = 16) -> pd.DataFrame:
    """Scores of every query set: ``query`` (latent, the prompt itself); with hop prompts
    ``chain`` (explicit chaining: the variant's own greedy hop-1 answer in ``{bridge}``) and,
    where ``bridge`` is given, ``hop1`` (against the bridge) and ``hop2`` (gold bridge filled in).
    Static updates are folded into the weights (:func:`fold_static_update`) for speed.

    Oracle routing (``v.combine == "oracle"``) sends each prompt to the adapter labelled for it:
    ``prompt`` to ``expert``, ``hop1_prompt`` (the greedy hop-1 answer of ``chain`` and ``hop1``)
    to ``hop1_expert``, ``hop2_prompt`` (``chain`` and ``hop2``) to ``hop2_expert``, each hop
    falling back to ``expert``; a set with an unlabelled item is not scored for the oracle.

    Returns:
        one row per set × query: :func:`interp.evaluate.score_examples`'s columns plus ``hop``,
        ``line`` and, for ``chain``, ``bridge_used`` (the cleaned hop-1 answer).
    """
    from interp.adapters.hooks import fold_static_update
    from interp.evaluate import greedy_answers, score_examples

    route = _route(hm, v)
    h1 = lambda q: q.hop1_expert or q.expert  # noqa: E731  (hop labels fall back to the query's)
    h2 = lambda q: q.hop2_expert or q.expert  # noqa: E731
    sets = {"query": [_Ex(q.prompt, q.answer, q.line, q.expert) for q in queries]}
    hop = [q for q in queries if q.hop1_prompt]
    gold = [q for q in hop if q.bridge]
    if gold:
        sets["hop1"] = [_Ex(q.hop1_prompt, " " + q.bridge.strip(), q.line, h1(q)) for q in gold]
        sets["hop2"] = [_Ex(q.hop2_prompt.replace(PLACEHOLDER, q.bridge.strip()), q.answer, q.line, h2(q))
                        for q in gold]
    sets = {k: exs for k, exs in sets.items() if _routable(v, exs)}
    frames = []
    with fold_static_update(hm):
        for name, exs in sets.items():
            frames.append(score_examples(hm, exs, batch_size=batch_size, route=route).assign(
                hop=name, line=[e.line for e in exs]))
        first = [_Ex(q.hop1_prompt, "", q.line, h1(q)) for q in hop]
        if hop and _routable(v, first) and _routable(v, [_Ex("", "", q.line, h2(q)) for q in hop]):
            preds = greedy_answers(hm, first, max_new_tokens=8, batch_size=batch_size, route=route)
            used = [_clean(p) for p in preds]
            chain = [_Ex(q.hop2_prompt.replace(PLACEHOLDER, u or "unknown"), q.answer, q.line, h2(q))
                     for q, u in zip(hop, used)]
            frames.append(score_examples(hm, chain, batch_size=batch_size, route=route).assign(
                hop="chain", line=[e.line for e in chain], bridge_used=used))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _clean(pred: str) -> str:
    """A greedy hop-1 continuation cut at the first newline / period / comma (as the study does)."""
    for stop in ("\n", ".", ","):
        pred = pred.split(stop)[0]
    return pred.strip()


@torch.no_grad()
def contributions(hm: Any, v: DVariant, queries: Sequence[Query], batch_size: int = 16
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-adapter contribution norms and router weights at each query's final position.

    ``contrib``: ``variant, layer, adapter, norm`` — mean over queries of
    ``sqrt(Σ_sites ‖δ_site‖²)``, δ the adapter's own (router-weighted) output change read at its
    ``...lora.{adapter}.hook_delta`` hook (units of the residual stream). ``router`` (routed
    combines only): ``variant, layer, adapter, weight`` — mean over queries and the layer's sites
    of the ``hook_router`` weight, with ``top1_match`` the fraction of queries whose highest-weight
    expert is the query's ``expert`` (NaN without labels).
    """
    from interp.adapters.factors import layer_of

    rt = hm.info.get("lora_runtime")
    if rt is None or not rt.sites:
        return pd.DataFrame(), pd.DataFrame()
    names = {h.name: (layer_of(s.module_path), a) for s in rt.sites for a, h in s.hook_delta.items()}
    routers = {s.hook_router.name: layer_of(s.module_path) for s in rt.sites}
    wanted = set(names) | (set(routers) if v.combine in ROUTED else set())
    experts = list(hm.info.get("router_adapters", []))
    route = _route(hm, v)
    acc: dict[tuple[int, str], list[float]] = {}
    rw: dict[tuple[int, str], list[float]] = {}
    match: dict[int, list[float]] = {}
    for b in range(0, len(queries), batch_size):
        batch = list(queries[b:b + batch_size])
        toks, lengths = hm.tokenize([q.prompt for q in batch])
        rows = torch.arange(len(batch))
        last = lengths.to(torch.long) - 1
        ctx = route(batch) if route is not None else contextlib.nullcontext()
        with ctx:
            _, cache = hm.bridge.run_with_cache(toks.to(hm.device), names_filter=lambda n: n in wanted)
        sq: dict[tuple[int, str], torch.Tensor] = {}
        for n, (layer, a) in names.items():
            if n in cache:
                d = cache[n][rows, last.to(cache[n].device)].double().norm(dim=-1).cpu() ** 2
                sq[(layer, a)] = sq.get((layer, a), 0) + d
        for k, s in sq.items():
            acc.setdefault(k, []).extend(torch.sqrt(s).tolist())
        for n, layer in routers.items():
            if n in cache:
                w = cache[n][rows, last.to(cache[n].device)].double().cpu()  # [batch, n_experts]
                for i, a in enumerate(experts):
                    rw.setdefault((layer, a), []).extend(w[:, i].tolist())
                if all(q.expert for q in batch):
                    top = w.argmax(-1).tolist()
                    match.setdefault(layer, []).extend(float(experts[t] == q.expert) for t, q in zip(top, batch))
    contrib = pd.DataFrame([dict(variant=v.name, layer=l, adapter=a, norm=sum(x) / len(x))
                            for (l, a), x in sorted(acc.items())])
    router = pd.DataFrame([dict(variant=v.name, layer=l, adapter=a, weight=sum(x) / len(x),
                                top1_match=(sum(match[l]) / len(match[l])) if match.get(l) else math.nan)
                           for (l, a), x in sorted(rw.items())])
    return contrib, router


def patch_pairs(base: Any, queries: Sequence[Query]) -> list:
    """:class:`~interp.mechanisms.PatchPair` for the queries with a ``corrupt_prompt``; the
    contrast answer is ``corrupt_answer`` or else the base model's top prediction on the
    corrupted prompt. Pairs whose two first answer tokens coincide are dropped (no contrast)."""
    from interp.evaluate import logits_at
    from interp.mechanisms import PatchPair

    qs = [q for q in queries if q.corrupt_prompt]
    if not qs:
        return []
    contrast = []
    for q in qs:
        if q.corrupt_answer:
            contrast.append(q.corrupt_answer)
            continue
        ids = base.encode(q.corrupt_prompt)
        lg = logits_at(base, torch.tensor([ids], device=base.device), torch.tensor([0]), torch.tensor([len(ids) - 1]))
        contrast.append(base.tokenizer.decode([int(lg[0].argmax())]))
    pairs = []
    for q, c in zip(qs, contrast):
        if base.encode(q.answer)[0] == base.encode(c)[0]:
            continue
        sp = {}
        if q.subject:
            from interp.mechanisms.lens import offsets_token_spans

            sp = offsets_token_spans(q, base)
        pairs.append(PatchPair(q.line, q.prompt, q.corrupt_prompt, q.answer, c, sp, kind="query"))
    return pairs


@contextlib.contextmanager
def _stage(seconds: dict[str, float] | None, name: str):
    """Add the wall seconds of the ``with`` body to ``seconds[name]`` (when ``seconds`` is given)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if seconds is not None:
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def variant_tables(run: Any, v: DVariant, queries: Sequence[Query], pairs: list,
                   target: dict | None = None, seconds: dict[str, float] | None = None
                   ) -> dict[str, pd.DataFrame]:
    """Every table of one variant from one load: ``faithfulness`` and ``energy_kept`` (merges;
    with ``target`` = ``{module: LoraDelta}`` also rows ``expert = "target"``: the fraction of the
    target's energy inside the merge's spans, the merge's own complement of the span deficit),
    ``scores``, ``contrib``, ``router``, ``lens`` (queries with a ``bridge``), ``patching`` (given
    pairs; base and combines), ``patchscope``, ``backpatch``, ``knockout`` (every variant but
    ``oracle``; :mod:`interp.diagnose.bridge`). Empty frames for what does not apply.

    ``seconds``, when given, receives the wall seconds of each stage: ``load`` (with the merge's
    faithfulness), ``energy_kept``, ``scores``, ``contributions``, ``lens``, ``patching``,
    ``patchscope``, ``backpatch``, ``knockout`` (only the stages that ran)."""
    from interp.subspace import energy_kept

    with _stage(seconds, "load"):
        hm = load_variant(run, v)
    out: dict[str, pd.DataFrame] = {}
    faith = hm.info.get("faithfulness") if v.adapters else None
    if faith is not None:
        with _stage(seconds, "energy_kept"):
            out["faithfulness"] = faith.assign(variant=v.name)
            merged, experts = hm.info["deltas"], hm.info["expert_deltas"]
            rows = []
            for m, d in merged.items():
                for a, ed in experts.items():
                    if m in ed and ed[m].frobenius_sq() > 0 and d.frobenius_sq() > 0:
                        rows.append(dict(variant=v.name, module=m, expert=a, energy_kept=energy_kept(ed[m], d),
                                         energy=ed[m].frobenius_sq()))
                o = (target or {}).get(m)
                if o is not None and o.frobenius_sq() > 0 and d.frobenius_sq() > 0 and o.d_out == d.d_out and o.d_in == d.d_in:
                    rows.append(dict(variant=v.name, module=m, expert="target", energy_kept=energy_kept(o, d),
                                     energy=o.frobenius_sq()))
            out["energy_kept"] = pd.DataFrame(rows)
    if queries:
        bs = int(run.cfg.diagnose.get("batch_size", 16))
        with _stage(seconds, "scores"):
            out["scores"] = score_sets(hm, v, queries, bs).assign(variant=v.name)
        if v.adapters and _routable(v, queries):
            with _stage(seconds, "contributions"):
                out["contrib"], out["router"] = contributions(hm, v, queries, bs)
        lensq = [q for q in queries if q.bridge]
        if lensq and _routable(v, lensq):
            with _stage(seconds, "lens"):
                from interp.mechanisms import entrec

                route = _route(hm, v)
                positions = ("e1_last", "final") if all(q.subject for q in lensq) else ("final",)
                spans = None if positions[0] == "e1_last" else [{} for _ in lensq]
                frames = []
                for i in range(0, len(lensq), bs):  # oracle: route each batch to its experts
                    chunk = lensq[i:i + bs]
                    ctx = route(chunk) if route is not None else contextlib.nullcontext()
                    with ctx:
                        frames.append(entrec(hm, chunk, positions=positions, batch_size=bs,
                                             spans=None if spans is None else spans[i:i + bs],
                                             spans_fn=None if spans is not None else _spans))
                lens = pd.concat(frames, ignore_index=True)
                lens["target"] = lens["target"].map({"e2": "bridge", "e3": "answer"})
                out["lens"] = lens.assign(variant=v.name)
        if pairs and v.role != "expert" and v.combine != "oracle":
            from interp.mechanisms import activation_patching

            with _stage(seconds, "patching"):
                out["patching"] = activation_patching(hm, pairs, hooks=("resid_pre",), progress=False
                                                      ).assign(variant=v.name)
        if v.combine != "oracle":  # per-prompt routing; the engines batch copies of prompts
            from interp.diagnose.bridge import backpatch_table, knockout_table, patchscope_table

            for n, fn in (("patchscope", patchscope_table), ("backpatch", backpatch_table),
                          ("knockout", knockout_table)):
                with _stage(seconds, n):
                    df = fn(hm, queries, bs)
                if len(df):
                    out[n] = df.assign(variant=v.name)[["variant", *df.columns]]
    run.release(hm)
    return out


def _spans(q: Query, hm: Any) -> dict:
    from interp.mechanisms.lens import offsets_token_spans

    return offsets_token_spans(q, hm)


TABLE_NAMES = ("faithfulness", "energy_kept", "scores", "contrib", "router", "lens", "patching", "patchscope",
               "backpatch", "knockout")
#: part of every variant's cache key: bumped when a variant gains tables, so older caches recompute
CACHE_VERSION = 2


def variant_key(run: Any) -> str:
    """The variant caches' key: the ``study`` and ``diagnose`` config sections and :data:`CACHE_VERSION`."""
    return f"{run.cfg.section_hash('study', 'diagnose')}v{CACHE_VERSION}"


def variant_cache_dir(run: Any, v: DVariant, key: str | None = None) -> Path:
    """``DIR/cache/variants/<name>.<key>/`` (``key`` default :func:`variant_key`)."""
    return Path(run.cache) / "variants" / f"{v.name}.{key or variant_key(run)}"


def variant_seconds(run: Any, v: DVariant, key: str | None = None) -> dict[str, float] | None:
    """Wall seconds of each stage of ``v`` (:func:`variant_tables`) when it was computed, with
    ``total``; ``None`` if it has not been computed under this key (or by a version before timings)."""
    p = variant_cache_dir(run, v, key) / "seconds.json"
    return json.loads(p.read_text()) if p.is_file() else None


def cached_variant(run: Any, v: DVariant, queries: Sequence[Query], pairs: list, key: str,
                   target: dict | None = None) -> dict[str, pd.DataFrame]:
    """:func:`variant_tables`, cached in ``DIR/cache/variants/<name>.<key>/`` (a ``done`` marker
    written last, so a variant interrupted mid-way is recomputed whole), with the stages' wall
    seconds in ``seconds.json`` there (:func:`variant_seconds`)."""
    from interp.files import is_checked, read_checked, write_checked
    from interp.models import atomic_write_text
    from interp.study.runner import csv_text, read_cached_csv

    d = variant_cache_dir(run, v, key)
    # each table carries its SHA-256: one without it (cut off, or from before checksums) means
    # the variant is computed again; one that differs from it is an error naming it
    if not ((d / "done").is_file() and all(is_checked(d / f"{n}.csv") for n in TABLE_NAMES)):
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        tables = variant_tables(run, v, queries, pairs, target, seconds)
        seconds["total"] = round(time.perf_counter() - t0, 3)
        for n in TABLE_NAMES:
            df = tables.get(n)
            write_checked(d / f"{n}.csv", (csv_text(df) if df is not None and len(df) else "").encode())
        atomic_write_text(d / "seconds.json", json.dumps(seconds, indent=1))
        atomic_write_text(d / "done", "ok")
    out = {}
    for n in TABLE_NAMES:
        p = d / f"{n}.csv"
        empty = p.stat().st_size == 0 and read_checked(p)[1]  # written empty (not cut to nothing)
        out[n] = pd.DataFrame() if empty else read_cached_csv(p)
    return out
