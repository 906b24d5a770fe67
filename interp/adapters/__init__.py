"""LoRA adapters: train, library, merge, route, adapter-aware hooks.

The entry point is :func:`load_hooked`: a base model plus a library of PEFT LoRA experts,
combined one of many ways, inside a TransformerLens bridge with per-adapter hook points
(:mod:`interp.adapters.hooks`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import torch

from interp.adapters.factors import LoraDelta, read_adapter
from interp.adapters.hooks import delta_hook_name, fold_static_update, install_lora_hooks, router_hook_name, site_name
from interp.adapters.library import AdapterError, AdapterLibrary
from interp.adapters.merge import (PEFT_COMBINATIONS, MergeError, dare, deltas_from_peft, faithfulness_report,
                                   svd_merge, task_arithmetic, ties, weighted_average)
from interp.adapters.route import (ArrowRouter, OracleRouter, RoutingError, StaticRouter, route_examples,
                                   route_tokens)
from interp.adapters.testing import make_random_adapter

COMBINES = ("none", "uniform", "weighted", "task_arithmetic", "ties", "dare", "svd", *PEFT_COMBINATIONS,
            "arrow", "mixture", "oracle", "merge_and_unload")

__all__ = ["load_hooked", "fold_static_update", "COMBINES", "AdapterLibrary", "AdapterError", "route_examples", "route_tokens",
           "make_random_adapter", "LoraDelta", "read_adapter", "delta_hook_name", "router_hook_name",
           "site_name", "MergeError", "RoutingError"]


def _attach_deltas(pm: Any, name: str, deltas: dict[str, LoraDelta]) -> None:
    """Add ``deltas`` to a PeftModel as adapter ``name`` (scale 1, per-module ranks via rank_pattern)."""
    from peft import LoraConfig

    ranks = {m: d.rank for m, d in deltas.items()}
    r = max(ranks.values())
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(deltas), lora_dropout=0.0,
                     rank_pattern={re.escape(m): k for m, k in ranks.items()},
                     alpha_pattern={re.escape(m): k for m, k in ranks.items()})
    pm.add_adapter(name, cfg)
    live = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for m, d in deltas.items():
            mod = live[m]
            mod.lora_A[name].weight.copy_(d.A)
            mod.lora_B[name].weight.copy_(d.B * d.scale / mod.scaling[name])


def load_hooked(model: Any, adapters: dict[str, str | os.PathLike], combine: str = "none",
                weights: Sequence[float] | None = None, *, allow_pickle: bool = False,
                expected_base: str | None = None, **options: Any):
    """Load a base model with a library of LoRA experts, combined, into a hooked bridge.

    Args:
        model: registered name, local HF directory, or a ``HookedModel`` (its base is re-loaded
            fresh from ``info["source"]``; the caller's model is never modified).
        adapters: ``{name: directory}`` of PEFT LoRA adapters (names: ``[A-Za-z0-9_-]+``).
        combine: one of :data:`COMBINES`:

            * ``"none"`` — all attached, the first active (``hm.peft_model.set_adapter`` works).
            * ``"uniform"`` / ``"weighted"`` / ``"task_arithmetic"`` — exact ΔW-space sum
              ``Σ wᵢ sᵢ Bᵢ Aᵢ`` (:mod:`~interp.adapters.merge`), run as the experts at fixed weights
              (so per-expert hooks exist); weights 1/n, ``weights``, ``λ`` (option ``lam``, default 1).
            * ``"ties"`` (options ``density`` 0.2), ``"dare"`` (``density`` 0.5, ``seed`` 0,
              ``rescale``), ``"svd"`` (``rank`` k, default max rᵢ): a new adapter named after the
              combine holding the merged ΔW.
            * ``"peft_linear"`` … ``"peft_cat"`` — peft's ``add_weighted_adapter`` (options
              ``density``, ``svd_rank``, ``majority_sign_method``); default weights 1/n.
            * ``"arrow"`` (options ``top_k`` default min(3, n), ``temperature`` 1, ``seed`` 0,
              ``method`` "power"), ``"mixture"`` (1/n each, per token), ``"oracle"`` (routing given
              by :func:`route_examples` / :func:`route_tokens`).
            * ``"merge_and_unload"`` — the exact weighted sum (default 1/n) added to the base
              weights; no LoRA layers remain (no adapter hooks).
        weights: per-expert weights for the merges (default 1/n; task arithmetic uses ``lam``).
        allow_pickle: accept pickle adapter files (see :class:`AdapterLibrary`).
        expected_base: base name the adapters must record (default: ``model``'s name).

    Returns:
        ``HookedModel`` with ``.peft_model``, ``.adapters``, ``.combine`` set and ``info`` keys:
        ``library`` (:class:`AdapterLibrary`), ``deltas`` (``{module: LoraDelta}`` effective update;
        ``None`` for input-dependent routing: arrow, oracle), ``expert_deltas``, ``faithfulness``
        (DataFrame from :func:`~interp.adapters.merge.faithfulness_report`, merges only),
        ``lora_runtime`` and ``router_adapters`` (expert order of ``hook_router``).

    Raises:
        ValueError: unknown combine, unknown option, bad weights; AdapterError subclasses and
        ``FusedProjectionError`` from validation; ``MergeError``; ``RoutingError``.
    """
    from peft import PeftModel

    from interp.models import HookedModel, assert_lora_reached, bridge_model, load_hf

    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; choose one of {', '.join(COMBINES)}")
    known = {"lam", "density", "seed", "rescale", "rank", "svd_rank", "majority_sign_method", "top_k",
             "temperature", "method"}
    if set(options) - known:
        raise ValueError(f"unknown options {sorted(set(options) - known)} for load_hooked (known: {sorted(known)})")
    source = str(model.info.get("source", model.name)) if isinstance(model, HookedModel) else str(model)
    hf, tok = load_hf(source)
    lib = AdapterLibrary.load(source, adapters, allow_pickle=allow_pickle, expected_base=expected_base, hf_model=hf)
    names = lib.names
    n = len(names)
    experts = [lib.deltas[a] for a in names]
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} adapters {names}")
    w = [float(x) for x in weights] if weights is not None else [1.0 / n] * n
    info: dict[str, Any] = {"source": source, "library": lib, "expert_deltas": dict(zip(names, experts)),
                            "router_adapters": names, "deltas": None, "faithfulness": None}
    label = f"{source}+{combine}"

    if combine == "merge_and_unload":
        merged = weighted_average(experts, w)
        mods = dict(hf.named_modules())
        with torch.no_grad():
            for m, d in merged.items():
                mods[m].weight += d.dense().to(mods[m].weight.dtype)
        info.update(deltas=merged, faithfulness=faithfulness_report(merged, experts, w))
        bridge = bridge_model(hf, tok, label)
        return HookedModel(name=label, bridge=bridge, hf_model=hf, tokenizer=tok, peft_model=None,
                           adapters={a: lib.dirs[a] for a in names}, combine=combine, info=info)

    pm = PeftModel.from_pretrained(hf, lib.dirs[names[0]], adapter_name=names[0], is_trainable=False,
                                   low_cpu_mem_usage=False)
    for a in names[1:]:
        pm.load_adapter(lib.dirs[a], adapter_name=a, is_trainable=False)
    lib.verify_attached(pm)
    router = None
    if combine == "none":
        pm.set_adapter(names[0])
        info["deltas"] = experts[0]
    elif combine in ("uniform", "weighted", "task_arithmetic", "mixture"):
        if combine in ("uniform", "mixture"):
            w = [1.0 / n] * n
        elif combine == "task_arithmetic":
            w = [float(options.get("lam", 1.0))] * n
        elif weights is None:
            raise ValueError("combine='weighted' needs weights=[...]")
        router = StaticRouter(names, w)
        merged = task_arithmetic(experts, w[0]) if combine == "task_arithmetic" else weighted_average(experts, w)
        info.update(deltas=merged, faithfulness=faithfulness_report(merged, experts, w))
    elif combine in ("ties", "dare", "svd"):
        if combine == "ties":
            tw = [float(x) for x in weights] if weights is not None else [1.0] * n
            merged = ties(experts, float(options.get("density", 0.2)), tw)
        elif combine == "dare":
            tw = [float(x) for x in weights] if weights is not None else [1.0] * n
            merged = dare(experts, float(options.get("density", 0.5)), int(options.get("seed", 0)),
                          bool(options.get("rescale", True)), tw)
        else:
            tw = w
            merged, energy = svd_merge(experts, w, options.get("rank"))
            info["svd_energy"] = energy
        _attach_deltas(pm, combine, merged)
        pm.set_adapter(combine)
        info.update(deltas=merged, faithfulness=faithfulness_report(merged, experts, tw))
    elif combine in PEFT_COMBINATIONS:
        ctype = PEFT_COMBINATIONS[combine]
        kw: dict[str, Any] = {}
        if ctype in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
            kw["density"] = float(options.get("density", 0.5))
        if ctype in ("ties", "dare_ties"):
            kw["majority_sign_method"] = options.get("majority_sign_method", "total")
        if ctype == "svd" and options.get("svd_rank") is not None:
            kw["svd_rank"] = int(options["svd_rank"])
        pm.add_weighted_adapter(names, w, combine, combination_type=ctype, **kw)
        pm.set_adapter(combine)
        merged = deltas_from_peft(pm, combine)
        info.update(deltas=merged, faithfulness=faithfulness_report(merged, experts, w))
    elif combine == "arrow":
        router = ArrowRouter(top_k=int(options.get("top_k", min(3, n))),
                             temperature=float(options.get("temperature", 1.0)),
                             seed=options.get("seed", 0), method=options.get("method", "power"))
    elif combine == "oracle":
        router = OracleRouter(names)
    inner = pm.base_model.model
    bridge = bridge_model(inner, tok, label)
    runtime = install_lora_hooks(inner, bridge, router)
    info["lora_runtime"] = runtime
    hm = HookedModel(name=label, bridge=bridge, hf_model=inner, tokenizer=tok, peft_model=pm,
                     adapters={a: lib.dirs[a] for a in names}, combine=combine, info=info)
    if combine == "oracle":
        with route_examples(hm, [names[0]]):
            assert_lora_reached(hm)
    else:
        assert_lora_reached(hm)
    return hm
