"""Step ``mechanisms`` of the shared-template study (one condition): where the intermediate
result is computed, which step's tokens carry it, and which adapter acts at each step.

Three tables, per variant of ``mechanisms.variants`` (cached per variant), on the first
``mechanisms.n_examples`` composed test problems, each read teacher-forced on its gold answer
(``prompt + answer`` as the scorer tokenises it):

* ``math_lens`` — logit lens (nostalgebraist 2020; the two-hop study's EntRec, Yang et al. 2024)
  at every layer, at the position that predicts each number of the solution: ``query_end`` (last
  prompt token), and in the step-by-step template ``step1_eq`` (predicts the intermediate
  ``y = zib(x)``), ``step2_eq`` (predicts ``z = dax(y)``), ``answer_eq`` (predicts the stated
  answer). Targets: the first token of ``y`` (the intermediate) and of ``z`` (the result).
* ``math_patching`` — activation patching of ``resid_pre`` (normalised metric, Meng et al. 2022;
  :func:`interp.mechanisms.activation_patching`) at the position that predicts the final result,
  clean vs a composed problem with another ``x`` (same token length, another first answer token):
  ``region`` names the number each position belongs to (``x``, ``step1_res`` = the written
  intermediate, ``step2_arg`` = its copy as step 2's argument, ...). In the shared template, a
  composed answer produced by chaining the template is carried by the written intermediate.
* ``math_contributions`` — per-adapter contribution ``‖w_e · s_e B_e A_e x‖`` (the
  ``...lora.{adapter}.hook_delta`` hook points; router-weighted for Arrow) summed in quadrature
  over a layer's LoRA sites, averaged over the tokens of each ``segment`` of the sequence
  (``prompt``; shared and bridged: ``step1``, ``step2``, ``answer``; separate: ``answer``): does each expert
  act on its own step? For variants that combine several experts.
"""

from __future__ import annotations

import random

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.adapters.hooks import fold_static_update
from interp.study.runner import console, read_unit_tables, unit_key, write_unit_tables
from interp.study.variants import VARIANTS

TABLES = ("math_lens", "math_patching", "math_contributions")


def _ids(hm, e) -> list[int]:
    return list(hm.encode(e.prompt)) + list(hm.encode(e.answer))


def _spans(hm, e) -> dict[str, tuple[int, int]]:
    from interp.tasks.math_skills import solution_spans

    return solution_spans(e, hm.tokenizer)


def lens_positions(sp: dict[str, tuple[int, int]], n_prompt: int) -> dict[str, int]:
    """Named positions (the token that *predicts* each number): ``query_end`` and, in the
    step-by-step template, ``step1_eq``, ``step2_eq``, ``answer_eq``."""
    out = {"query_end": n_prompt - 1}
    for key, name in (("step1_res", "step1_eq"), ("step2_res", "step2_eq")):
        if key in sp:
            out[name] = sp[key][0] - 1
    if "step1_res" in sp:
        out["answer_eq"] = sp["answer"][0] - 1
    return out


@torch.no_grad()
def math_lens(hm, exs: list) -> pd.DataFrame:
    """Logit-lens log-probability (nats) and rank of the first token of ``y`` and ``z`` at every
    layer ``0..n_layers`` (``resid_pre`` of block ℓ; ℓ = n_layers: the final residual) and named
    position (:func:`lens_positions`). Rows: example_id, tier, x, position, token_index, layer,
    target, token_id, logprob, rank."""
    from interp.mechanisms.lens import lens_logits, residual_stack, token_rank

    rows = []
    for e in exs:
        ids = _ids(hm, e)
        sp = _spans(hm, e)
        pos = lens_positions(sp, len(hm.encode(e.prompt)))
        stack = residual_stack(hm, torch.tensor([ids], device=hm.device))  # [L+1, 1, pos, d]
        targets = {"y": hm.encode(str(e.intermediate))[0], "z": hm.encode(str(e.result))[0]}
        for name, p in pos.items():
            lp = torch.log_softmax(lens_logits(hm, stack[:, 0, p]), dim=-1)  # [L+1, V]
            for t, tid in targets.items():
                rank = token_rank(lp, tid)
                for layer in range(lp.shape[0]):
                    rows.append({"example_id": e.example_id, "tier": e.tier, "x": e.x, "position": name,
                                 "token_index": p, "layer": layer, "target": t, "token_id": int(tid),
                                 "logprob": float(lp[layer, tid]), "rank": int(rank[layer])})
    return pd.DataFrame(rows)


def patch_pairs(hm, exs: list, n: int, seed: int = 0) -> list:
    """Up to ``n`` clean / corrupted :class:`~interp.mechanisms.PatchPair` s of composed
    problems: the text up to the final result (prompt, plus the written solution in the
    template), the donor another problem of the same token length whose result starts with
    another token. Spans name the numbers (``x``, ``step1_res``, ``step2_arg``...)."""
    from interp.mechanisms.patching.pairs import PatchPair

    def cut(e):
        ids = _ids(hm, e)
        sp = _spans(hm, e)
        a = sp["answer"][0]
        text = e.prompt + e.answer[: len(hm.tokenizer.decode(ids[len(hm.encode(e.prompt)):a]))]
        if list(hm.encode(text)) != ids[:a]:
            return None  # the prefix would tokenise differently on its own: positions would not align
        return e, text, len(ids[:a]), {k: v for k, v in sp.items() if v[1] <= a}

    rng = random.Random(seed)
    prepared = [c for c in map(cut, exs) if c is not None]
    first = {e.example_id: hm.encode(str(e.result))[0] for e, *_ in prepared}
    out = []
    for e, text, n_tok, sp in prepared:
        donors = [(d, dtext) for d, dtext, dn, _ in prepared
                  if d is not e and dn == n_tok and first[d.example_id] != first[e.example_id]]
        if not donors:
            continue
        d, dtext = rng.choice(donors)
        out.append(PatchPair(example_id=e.example_id, clean_prompt=text, corrupted_prompt=dtext,
                             clean_answer=str(e.result), corrupted_answer=str(d.result), spans=sp,
                             tier=e.tier, kind=e.kind, chain_id=e.x))
        if len(out) == n:
            break
    return out


def region_of(label: str) -> str:
    """``step1_res_2`` / ``step1_res_last`` → ``step1_res``; ``final``, ``other`` unchanged."""
    for suffix in ("_last",):
        if label.endswith(suffix):
            return label[: -len(suffix)]
    head, _, tail = label.rpartition("_")
    return head if head and tail.isdigit() else label


@torch.no_grad()
def contributions(hm, exs: list) -> pd.DataFrame:
    """Per-adapter contribution norms per layer and segment (see the module docstring). Rows:
    layer, adapter, segment, norm (residual-stream units, mean over the segment's tokens and the
    examples), n_tokens."""
    from interp.adapters.factors import layer_of

    rt = hm.info.get("lora_runtime")
    if rt is None or not rt.sites:
        return pd.DataFrame()
    names = {h.name: (layer_of(s.module_path), a) for s in rt.sites for a, h in s.hook_delta.items()}
    acc: dict[tuple[int, str, str], list[float]] = {}
    for e in exs:
        ids = _ids(hm, e)
        sp = _spans(hm, e)
        n_prompt = len(hm.encode(e.prompt))
        seg = ["prompt"] * n_prompt + ["answer"] * (len(ids) - n_prompt)
        if "step2_res" in sp:
            for i in range(n_prompt, len(ids)):
                seg[i] = "step1" if i < sp["step1_res"][1] else "step2" if i < sp["step2_res"][1] else "answer"
        _, cache = hm.bridge.run_with_cache(torch.tensor([ids], device=hm.device),
                                            names_filter=lambda n: n in names)
        sq: dict[tuple[int, str], torch.Tensor] = {}
        for n, (layer, a) in names.items():
            if n in cache:
                d = cache[n][0].double().norm(dim=-1).cpu() ** 2  # [pos]
                sq[(layer, a)] = sq.get((layer, a), 0) + d
        for (layer, a), s in sq.items():
            norms = torch.sqrt(s)
            for name in dict.fromkeys(seg):
                mask = torch.tensor([x == name for x in seg])
                acc.setdefault((layer, a, name), []).extend(norms[mask].tolist())
    return pd.DataFrame([{"layer": l, "adapter": a, "segment": s, "norm": sum(v) / len(v), "n_tokens": len(v)}
                         for (l, a, s), v in sorted(acc.items())])


def variant_tables(run, v: str, hm, exs: list) -> dict[str, pd.DataFrame]:
    """The mechanism tables of one variant (``method`` column added by the caller)."""
    m = run.cfg.mechanisms
    parts: dict[str, pd.DataFrame] = {}
    spec = VARIANTS[v]
    if len(spec.experts) > 1 and not spec.scored_from:
        parts["math_contributions"] = contributions(hm, exs)  # adapters' own hooks: not folded
    with fold_static_update(hm):
        parts["math_lens"] = math_lens(hm, exs)
        n_pairs = run.cfg.math.n_patching_pairs
        if v in m.patching_variants and n_pairs > 0:
            from interp.mechanisms import activation_patching

            pool = run.world().get(split="test")
            pairs = patch_pairs(hm, pool, n_pairs, seed=run.cfg.study.seed)
            if pairs:
                df = activation_patching(hm, pairs, hooks=("resid_pre",), progress=False)
                parts["math_patching"] = df.assign(region=[region_of(s) for s in df["position_label"]])
            else:
                console.print(f"[yellow]{v}: no clean/corrupted pairs of equal length; patching skipped[/yellow]")
    return {k: d for k, d in parts.items() if len(d)}


def math_mechanism_key(run) -> str:
    """Cache key of one condition's per-variant mechanism tables: the study, world, experts and
    merges, the ``[mechanisms]`` table, and the analysis precision when it is not fp32 (fp32
    runs cached before the precision switch keep their keys)."""
    inputs = {"up": run.cfg.section_hash("study", "math", "training", "methods"),
              "mech": run.cfg.to_dict()["mechanisms"]}
    if run.analysis_dtype != "fp32":
        inputs["dtype"] = run.analysis_dtype
    return unit_key(inputs)


def run(run) -> None:
    """Write ``math_lens``, ``math_patching``, ``math_contributions`` for one condition."""
    world = run.world()
    m = run.cfg.mechanisms
    exs = world.get(split="test")[: m.n_examples]
    cache = run.cache / "mechanisms"
    key = math_mechanism_key(run)
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in TABLES}
    for v in tqdm(m.variants, desc=f"mechanisms {world.condition}"):
        if VARIANTS[v].scored_from:
            continue  # the oracle has no forward of its own
        if read_unit_tables(cache, v, key) is None:
            hm = run.load_variant(v)
            write_unit_tables(cache, v, key, variant_tables(run, v, hm, exs))
            run.release(hm)
        for name, df in read_unit_tables(cache, v, key).items():
            tables[name].append(df)
    for name, dfs in tables.items():
        if dfs:
            run.write_csv(pd.concat(dfs, ignore_index=True), name)
