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
from interp.adapters.features import (RESERVED_ADAPTER_NAMES, AdapterFeatureError, ExtraModulesError,
                                      FeatureCombineError, ReservedAdapterNameError, SharedBaseError,
                                      UnknownAdapterTensorError, UnsupportedInitError, UnsupportedVariantError,
                                      check_adapter_name_reserved, check_combine)
from interp.adapters.hooks import delta_hook_name, fold_static_update, install_lora_hooks, router_hook_name, site_name
from interp.adapters.library import AdapterError, AdapterLibrary, linear_shapes
from interp.adapters.merge import (PEFT_COMBINATIONS, MergeError, dare, deltas_from_peft, faithfulness_report,
                                   svd_merge, task_arithmetic, ties, weighted_average)
from interp.adapters.route import (ArrowRouter, OracleRouter, RoutingError, StaticRouter, route_examples,
                                   route_tokens)
from interp.adapters.testing import make_random_adapter

COMBINES = ("none", "uniform", "weighted", "task_arithmetic", "ties", "dare", "svd", *PEFT_COMBINATIONS,
            "arrow", "mixture", "oracle", "merge_and_unload")

#: options each combine accepts (anything else is refused, never ignored)
COMBINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": (), "uniform": (), "weighted": (), "mixture": (), "oracle": (), "merge_and_unload": (),
    "task_arithmetic": ("lam",), "ties": ("density", "majority_sign_method"), "dare": ("density", "seed", "rescale"),
    "svd": ("rank",), "peft_linear": (), "peft_cat": (), "peft_svd": ("svd_rank",),
    "peft_ties": ("density", "majority_sign_method"), "peft_dare_linear": ("density",),
    "peft_dare_ties": ("density", "majority_sign_method"), "peft_magnitude_prune": ("density",),
    "arrow": ("top_k", "temperature", "seed", "method"),
}


# combines whose result depends on per-expert weights (the others fix their own: 1/n, λ, routing)
WEIGHTED_COMBINES = ("weighted", "ties", "dare", "svd", "peft_linear", "peft_ties", "peft_dare_linear",
                     "peft_dare_ties", "peft_magnitude_prune", "peft_svd", "peft_cat", "merge_and_unload")


class UnsupportedOptionError(AdapterError, TypeError):
    """A ``load_hooked`` option the chosen combine does not accept (unknown or inapplicable)."""


__all__ = ["load_hooked", "fold_static_update", "COMBINES", "COMBINE_OPTIONS", "WEIGHTED_COMBINES", "AdapterLibrary", "AdapterError",
           "route_examples", "route_tokens", "make_random_adapter", "LoraDelta", "read_adapter", "delta_hook_name",
           "router_hook_name", "site_name", "MergeError", "RoutingError", "UnsupportedOptionError",
           "RESERVED_ADAPTER_NAMES", "ReservedAdapterNameError", "AdapterFeatureError", "ExtraModulesError",
           "FeatureCombineError", "SharedBaseError", "UnknownAdapterTensorError", "UnsupportedInitError",
           "UnsupportedVariantError"]


def _check_options(combine: str, options: dict[str, Any]) -> None:
    accepted = COMBINE_OPTIONS[combine]
    bad = sorted(set(options) - set(accepted))
    if bad:
        hint = ""
        if "svd_rank" in bad and combine == "svd":
            hint = " (our exact 'svd' merge takes rank=k; svd_rank is peft_svd's option)"
        elif "rank" in bad and combine == "peft_svd":
            hint = " (peft_svd takes svd_rank=k)"
        raise UnsupportedOptionError(
            f"option(s) {bad} do not apply to combine={combine!r}; it accepts "
            f"{', '.join(accepted) if accepted else 'no options'}{hint}")
    k = options.get("rank")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UnsupportedOptionError(f"rank must be a positive integer (the merged adapter's rank k), got {k!r}")
    msm = options.get("majority_sign_method")
    if msm is not None and msm not in ("total", "frequency"):
        raise UnsupportedOptionError(f"majority_sign_method must be 'total' or 'frequency', got {msm!r}")


def _plain_lora_config(model: Any, deltas: dict[str, LoraDelta]):
    """A LoraConfig holding ``deltas`` at scale 1 (per-module ranks via escaped-path patterns)."""
    from peft import LoraConfig

    ranks = {m: d.rank for m, d in deltas.items()}
    r = max(ranks.values())
    live = dict(model.named_modules())
    conv1d = any(type(live[m]).__name__ == "Conv1D" for m in deltas)
    # patterns match as peft does: re.match(rf"(.*\.)?({key})$", path); an escaped full path is unambiguous
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(deltas), lora_dropout=0.0, fan_in_fan_out=conv1d,
                      lora_bias=any(d.bias is not None for d in deltas.values()),
                      rank_pattern={re.escape(m): k for m, k in ranks.items()},
                      alpha_pattern={re.escape(m): k for m, k in ranks.items()})


def _fill_adapter(pm: Any, name: str, deltas: dict[str, LoraDelta]) -> None:
    live = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for m, d in deltas.items():
            mod = live[m]
            mod.lora_A[name].weight.copy_(d.A)
            mod.lora_B[name].weight.copy_(d.B * d.scale / mod.scaling[name])
            if mod.lora_B[name].bias is not None:  # lora_bias: peft scales the bias with B
                mod.lora_B[name].bias.copy_((d.bias if d.bias is not None else torch.zeros(d.d_out))
                                            / mod.scaling[name])


def _attach_deltas(pm: Any, name: str, deltas: dict[str, LoraDelta]) -> None:
    """Add ``deltas`` (with output biases) to a PeftModel as plain LoRA adapter ``name``."""
    pm.add_adapter(name, _plain_lora_config(pm.base_model.model, deltas))
    _fill_adapter(pm, name, deltas)


def _peft_from_deltas(hf: Any, named: dict[str, dict[str, LoraDelta]]) -> Any:
    """A PeftModel over the unmodified ``hf`` holding each expert's exact update as a plain LoRA."""
    from peft import PeftModel

    names = list(named)
    pm = PeftModel(hf, _plain_lora_config(hf, named[names[0]]), adapter_name=names[0])
    _fill_adapter(pm, names[0], named[names[0]])
    for a in names[1:]:
        _attach_deltas(pm, a, named[a])
    pm.eval()
    return pm


def _add_on_device(hf: Any, merged: dict[str, LoraDelta]) -> None:
    """``W += ΔW``, ``b += Δb`` in place, each ΔW formed in float64 on its weight's device and
    cast once (Conv1D weights transposed; a bias created where needed)."""
    mods = dict(hf.named_modules())
    with torch.no_grad():
        for m, d in merged.items():
            mod = mods[m]
            dw = d.to(mod.weight.device).dense()  # float64 on the weight's device, then cast once
            dw = dw.T if type(mod).__name__ == "Conv1D" else dw
            mod.weight += dw.to(mod.weight.dtype)
            if d.bias is not None:
                if mod.bias is None:
                    mod.bias = torch.nn.Parameter(torch.zeros(d.d_out, dtype=mod.weight.dtype, device=mod.weight.device))
                mod.bias += d.bias.to(mod.bias)


def _on(deltas: dict[str, LoraDelta] | None, device: torch.device) -> dict[str, LoraDelta] | None:
    return None if deltas is None else {m: d.to(device) for m, d in deltas.items()}


def load_hooked(model: Any, adapters: dict[str, str | os.PathLike], combine: str = "none",
                weights: Sequence[float] | None = None, *, allow_pickle: bool = False,
                expected_base: str | None = None, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, **options: Any):
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
            * ``"ties"`` (options ``density`` 0.2, ``majority_sign_method`` "total" or "frequency"),
              ``"dare"`` (``density`` 0.5, ``seed`` 0,
              ``rescale``), ``"svd"`` (``rank`` k, default max rᵢ): a new adapter named after the
              combine holding the merged ΔW.
            * ``"peft_linear"`` … ``"peft_cat"`` — peft's ``add_weighted_adapter`` (options
              ``density``, ``svd_rank``, ``majority_sign_method`` where peft's type takes them);
              default weights 1/n.
            * ``"arrow"`` (options ``top_k`` default min(3, n), ``temperature`` 1, ``seed`` 0,
              ``method`` "power"), ``"mixture"`` (1/n each, per token), ``"oracle"`` (routing given
              by :func:`route_examples` / :func:`route_tokens`).
            * ``"merge_and_unload"`` — the exact weighted sum (default 1/n) added to the base
              weights; no LoRA layers remain (no adapter hooks).
        weights: per-expert weights, for the combines in :data:`WEIGHTED_COMBINES` only (others
            refuse them): default 1/n for weighted / svd / merge_and_unload / peft_*, and 1 for
            ties and dare (as peft's ``ties`` / ``dare_linear``); task arithmetic uses ``lam``.
        allow_pickle: accept pickle adapter files (see :class:`AdapterLibrary`).
        expected_base: base name the adapters must record (default: ``model``'s name).
        device: where the model and everything built for it live (``"cpu"``, ``"cuda"``,
            ``"cuda:N"``); default: ``model``'s device if it is a ``HookedModel``, else ``"cpu"``.
            The base is built where its loader builds it and moved once, before peft attaches the
            adapters, so only one copy of the weights is ever on the device.
        dtype: dtype of the base weights (``torch.float32``, ``"bf16"``, …, see
            :func:`interp.devices.resolve_dtype`); default: ``model``'s if it is a ``HookedModel``,
            else the loader's (float32). peft holds the LoRA factors in the base's dtype, except
            that it keeps fp32 factors over a bf16/fp16 base (its ``autocast_adapter_dtype``).

    Returns:
        ``HookedModel`` with ``.peft_model``, ``.adapters``, ``.combine`` set and ``info`` keys:
        ``library`` (:class:`AdapterLibrary`), ``deltas`` (``{module: LoraDelta}`` effective update;
        ``None`` for input-dependent routing: arrow, oracle), ``expert_deltas``, ``faithfulness``
        (DataFrame from :func:`~interp.adapters.merge.faithfulness_report`, merges only),
        ``lora_runtime`` and ``router_adapters`` (expert order of ``hook_router``). Every
        parameter, LoRA factor, router buffer, ``info["deltas"]`` and ``info["expert_deltas"]``
        is on ``device``; merges are computed exactly (float64 where the merge needs it) from the
        files, whose factors (``info["library"]``) stay on the CPU as read.

    Raises:
        ValueError: unknown combine, bad weights. ``interp.devices.HardwareError``: a device
        torch cannot use here (CUDA on a machine without a GPU) or a bad dtype. UnsupportedOptionError: an option the combine
        does not accept (:data:`COMBINE_OPTIONS`). ReservedAdapterNameError: an adapter named like a
        combine or a peft-internal name (:data:`RESERVED_ADAPTER_NAMES`). AdapterFeatureError
        subclasses (:mod:`interp.adapters.features`): a peft feature this combine cannot reproduce
        exactly. Other AdapterError subclasses and ``FusedProjectionError`` from validation;
        ``MergeError``; ``RoutingError``.

    Adapter features (see README "Supported adapters"): plain LoRA, rsLoRA, rank/alpha patterns,
    DoRA, ``lora_bias``, trained biases and PiSSA/OLoRA are exact under every combine but
    ``arrow`` and ``peft_*``; for combines other than ``none`` the experts are attached as their
    exact update on the original base (``info["rebuilt_experts"]``). LoRA on fused projections
    (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX/Falcon ``query_key_value``) is
    exact under every combine: hooked on the bridge's split q/k/v (gate/up) copies, row block by row
    block (:mod:`interp.adapters.hooks`). ``modules_to_save``,
    embedding LoRA and trainable tokens are exact under ``none`` only (peft runs them).
    """
    from peft import PeftModel

    from interp.devices import check_device, resolve_dtype
    from interp.models import HookedModel, assert_lora_reached, bridge_model, load_hf

    if combine not in COMBINES:
        raise AdapterError(f"unknown combine {combine!r}; choose one of {', '.join(COMBINES)}")
    if not isinstance(adapters, dict) or not adapters:
        raise AdapterError(f"adapters must be a non-empty {{name: adapter directory}} dict, got {adapters!r}")
    if weights is not None and combine not in WEIGHTED_COMBINES:
        raise UnsupportedOptionError(f"weights do not apply to combine={combine!r} (it fixes its own); combines "
                                     f"that take weights: {', '.join(WEIGHTED_COMBINES)}")
    if weights is None and combine == "weighted":
        raise AdapterError("combine='weighted' needs weights=[w1, w2, ...], one per adapter")
    _check_options(combine, options)
    for a in adapters:
        check_adapter_name_reserved(a)
    source = str(model.info.get("source", model.name)) if isinstance(model, HookedModel) else str(model)
    if device is None:
        device = model.device if isinstance(model, HookedModel) else "cpu"
    dev = torch.device(check_device(device))
    dt = resolve_dtype(dtype)
    if dt is None and isinstance(model, HookedModel):
        dt = next(model.hf_model.parameters()).dtype
    hf, tok = load_hf(source)
    # fused projections: merged into the weights before the bridge boots, or hooked on the bridge's split
    # copies row block by row block (interp.adapters.hooks.install_lora_hooks)
    lib = AdapterLibrary.load(source, adapters, allow_pickle=allow_pickle, expected_base=expected_base, hf_model=hf,
                              allow_fused=True)
    names = lib.names
    n = len(names)
    experts = [lib.deltas[a] for a in names]
    if weights is not None and len(weights) != n:
        raise AdapterError(f"{len(weights)} weights for {n} adapters {names}")
    w = [float(x) for x in weights] if weights is not None else [1.0 / n] * n
    check_combine(lib.parts, combine)
    # validated against the base as built; moved once, before any adapter layer exists, so peft
    # creates every LoRA factor on the device (and in the dtype) of its base layer
    hf.to(device=dev, dtype=dt) if dt is not None else hf.to(dev)
    info: dict[str, Any] = {"source": source, "library": lib, "expert_deltas": dict(zip(names, experts)),
                            "router_adapters": names, "deltas": None, "faithfulness": None}
    label = f"{source}+{combine}"

    if combine == "merge_and_unload":
        # the exact sum built from the experts on the model's device and added there: no ΔW is
        # formed on the host and copied over (README "On a GPU")
        dev_experts = {a: _on(e, dev) for a, e in info["expert_deltas"].items()}
        merged = weighted_average(list(dev_experts.values()), w)
        _add_on_device(hf, merged)
        info.update(deltas=merged, expert_deltas=dev_experts,
                    faithfulness=faithfulness_report(merged, experts, w))
        bridge = bridge_model(hf, tok, label, dev)
        return HookedModel(name=label, bridge=bridge, hf_model=hf, tokenizer=tok, peft_model=None,
                           adapters={a: lib.dirs[a] for a in names}, combine=combine, info=info)

    rebuilt = any(lib.parts[a].features & {"dora", "pissa", "olora", "trained_bias"} for a in names)
    if combine != "none" and rebuilt:
        # each expert as its exact update on the original base (DoRA rescaling, PiSSA/OLoRA residual and
        # trained biases folded into ΔW, Δb by peft's own merge), so experts add, route and merge exactly
        pm = _peft_from_deltas(hf, dict(zip(names, experts)))
        info["rebuilt_experts"] = True
    else:
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
        elif weights is None:  # pragma: no cover - refused above
            raise AdapterError("combine='weighted' needs weights=[...]")
        router = StaticRouter(names, w)
        merged = task_arithmetic(experts, w[0]) if combine == "task_arithmetic" else weighted_average(experts, w)
        info.update(deltas=merged, faithfulness=faithfulness_report(merged, experts, w))
    elif combine in ("ties", "dare", "svd"):
        # dense float64 ΔW per module, its TIES/DARE and its exact re-factoring (an SVD) computed on
        # the model's device: a 1536 × 8960 SVD costs seconds on a CPU (same results to float64
        # rounding; DARE's masks are still drawn on the CPU, so they are identical)
        dev_experts = [_on(e, dev) for e in experts]
        if combine == "ties":
            tw = [float(x) for x in weights] if weights is not None else [1.0] * n
            merged = ties(dev_experts, float(options.get("density", 0.2)), tw,
                          majority_sign_method=options.get("majority_sign_method", "total"))
        elif combine == "dare":
            tw = [float(x) for x in weights] if weights is not None else [1.0] * n
            merged = dare(dev_experts, float(options.get("density", 0.5)), int(options.get("seed", 0)),
                          bool(options.get("rescale", True)), tw)
        else:
            tw = w
            # default k: the largest LoRA rank in the files (a rebuilt DoRA/PiSSA expert's ΔW is dense)
            k = options.get("rank") or max(d.rank for a in names for d in (lib.factors or lib.deltas)[a].values())
            merged, energy = svd_merge(dev_experts, w, int(k))
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
    info.update(deltas=_on(info["deltas"], dev), expert_deltas={a: _on(e, dev) for a, e in info["expert_deltas"].items()})
    inner = pm.base_model.model
    bridge = bridge_model(inner, tok, label, dev)
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
