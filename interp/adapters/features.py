"""What a saved PEFT LoRA adapter does beyond ``ΔW = s·B·A``, and its exact update on the base model.

peft 0.21.2 adapters can carry more than LoRA factors; each changes the model PEFT rebuilds at load
time. :func:`inspect_adapter` sorts every tensor of an adapter file into

* **site parts** — per LoRA-wrapped linear layer: DoRA magnitudes (``use_dora``), ``lora_B.bias``
  (``lora_bias=True``), trained base biases (``bias="lora_only"/"all"``), and the residual base
  that PiSSA / OLoRA initialisation leaves in the layer (``init_lora_weights="pissa"/"olora"``);
* **extras** — parameters outside LoRA linear sites: ``modules_to_save`` copies, LoRA on
  embeddings, ``trainable_token_indices`` deltas, trained biases of untargeted modules;

and refuses, with an :class:`AdapterFeatureError` subclass naming the feature, whatever has no
exact rebuild (randomised PiSSA, CorDA, LoftQ, MiCA, aLoRA, QALoRA, …, unknown tensors).

:func:`effective_site_deltas` turns site parts into each site's *exact* update relative to the
original base weights ``W₀, b₀`` — ``ΔW = M − W₀``, ``Δb = b_M − b₀`` with ``M`` the weight PEFT's own
``lora.Linear.merge`` produces for that adapter alone (so DoRA's ``m/‖W₀+sBA‖_row`` rescaling,
the PiSSA/OLoRA residual, rsLoRA and ``fan_in_fan_out`` are peft's, not restated). A plain LoRA
keeps its factors; otherwise ΔW is dense and held exactly as a LoRA with an identity factor.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import torch

from interp.adapters.factors import LoraDelta, pattern_key
from interp.errors import AdapterError

#: Combine names (merges create an adapter of that name) and peft's internal names: an adapter named
#: like one of them would be skipped, shadowed or clash with a parameter name.
RESERVED_ADAPTER_NAMES = (
    "none", "uniform", "weighted", "task_arithmetic", "ties", "dare", "svd", "peft_linear", "peft_ties",
    "peft_dare_linear", "peft_dare_ties", "peft_magnitude_prune", "peft_svd", "peft_cat", "arrow",
    "mixture", "oracle", "merge_and_unload", "arrow_router", "gks", "__base__", "lora_A", "lora_B",
    "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout", "lora_alpha",
    "lora_variant", "scaling", "r", "base_layer", "modules_to_save", "original_module", "token_adapter",
    "trainable_tokens_delta", "trainable_tokens_original",
)

#: ``init_lora_weights`` values that only set the initial A, B (the saved factors say everything).
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
#: inits that also rewrite the base weight; peft rebuilds them deterministically at load time.
RESIDUAL_INITS = ("pissa", "olora")
#: LoraConfig fields that switch on a LoRA variant other than DoRA (never exact here).
VARIANT_FIELDS = ("use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config",
                  "monteclora_config", "velora_config", "layer_replication", "target_parameters",
                  "lora_ga_config")

#: features with no exact meaning outside combine="none" (parts of the model that are not LoRA sites)
EXTRA_FEATURES = ("modules_to_save", "embedding_lora", "trainable_tokens", "bias_outside_lora_sites")
#: features carried exactly as a per-site update (ΔW, Δb) through merges
SITE_FEATURES = ("dora", "lora_bias", "trained_bias", "pissa", "olora")

_PREFIX = "base_model.model."
#: how messages name each feature (the LoraConfig field that turns it on)
FEATURE_LABELS = {
    "dora": "DoRA (use_dora=True)", "lora_bias": "lora_bias=True", "trained_bias": "trained biases (bias=...)",
    "pissa": "PiSSA init (init_lora_weights='pissa')", "olora": "OLoRA init (init_lora_weights='olora')",
    "modules_to_save": "modules_to_save", "embedding_lora": "LoRA on embeddings",
    "trainable_tokens": "trainable_token_indices", "bias_outside_lora_sites": "bias='all' on modules without LoRA",
    "rslora": "rsLoRA (use_rslora=True)",
}


class ReservedAdapterNameError(AdapterError):
    """An adapter name equal to a combine name or a name peft uses internally."""


class AdapterFeatureError(AdapterError):
    """An adapter uses a peft feature that cannot be reproduced exactly in this setting."""


class UnsupportedInitError(AdapterFeatureError):
    """``init_lora_weights`` rewrote the base weights in a way that cannot be rebuilt exactly."""


class UnsupportedVariantError(AdapterFeatureError):
    """A LoRA variant or config field with no exact implementation here (QALoRA, aLoRA, …)."""


class UnknownAdapterTensorError(AdapterFeatureError):
    """The adapter file holds a tensor this toolkit does not know how to apply."""


class ExtraModulesError(AdapterFeatureError):
    """modules_to_save / embedding LoRA / trainable tokens / biases outside LoRA sites, in a combine
    other than ``"none"``."""


class FeatureCombineError(AdapterFeatureError):
    """A site feature (DoRA, biases, PiSSA/OLoRA, rsLoRA) under a combine that cannot carry it exactly."""


class SharedBaseError(AdapterFeatureError):
    """Several adapters under combine="none" that each rewrite the shared base (PiSSA/OLoRA residuals,
    trained base biases): peft would apply them on top of each other."""


def check_adapter_name_reserved(name: str) -> None:
    """Refuse reserved adapter names.

    Raises:
        ReservedAdapterNameError: ``name`` is in :data:`RESERVED_ADAPTER_NAMES`.
    """
    if name in RESERVED_ADAPTER_NAMES:
        raise ReservedAdapterNameError(
            f"adapter name {name!r} is reserved (combine names and peft-internal names: "
            f"{', '.join(RESERVED_ADAPTER_NAMES)}); rename the adapter in the {{name: directory}} dict")


@dataclasses.dataclass
class AdapterParts:
    """An adapter file sorted by what each tensor does (see module docstring).

    Attributes:
        features: names from :data:`SITE_FEATURES`, :data:`EXTRA_FEATURES` and ``"rslora"``.
        magnitude: module -> DoRA magnitude ``[d_out]``.
        base_bias: module -> trained bias ``[d_out]`` of the LoRA-wrapped layer (replaces ``b₀``).
        extras: state-dict key (base-model relative) -> tensor, outside LoRA linear sites.
        init: the ``init_lora_weights`` value.
    """

    features: set[str]
    magnitude: dict[str, torch.Tensor]
    base_bias: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    init: Any

    def describe(self, names: tuple[str, ...]) -> str:
        """The features among ``names`` this adapter uses, as readable labels ("" if none)."""
        return ", ".join(FEATURE_LABELS.get(f, f) for f in sorted(self.features) if f in names)


def check_config(name: str, cfg: dict) -> None:
    """Refuse ``adapter_config.json`` settings with no exact rebuild, before any tensor is read.

    Args:
        name: adapter name (for messages).
        cfg: its ``adapter_config.json``.

    Raises:
        UnsupportedVariantError: ``layer_replication`` (named: its adapter targets layers the base does
            not have) or another of :data:`VARIANT_FIELDS`.
        UnsupportedInitError: ``init_lora_weights`` other than :data:`PLAIN_INITS` / :data:`RESIDUAL_INITS`.
    """
    if cfg.get("layer_replication"):
        raise UnsupportedVariantError(
            f"adapter {name!r}: LoraConfig.layer_replication={cfg['layer_replication']!r} is not supported: peft "
            "builds a deeper model by repeating base layers and trains LoRA on the copies, so the adapter's "
            "layers do not exist in the base model interp hooks; supported variants: plain LoRA, rsLoRA, DoRA")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, str) and init.lower() in RESIDUAL_INITS) and init not in PLAIN_INITS:
        raise UnsupportedInitError(
            f"adapter {name!r}: init_lora_weights={init!r} rewrites the base weights at load time in a way "
            f"that cannot be rebuilt exactly (supported: {', '.join(map(str, PLAIN_INITS + RESIDUAL_INITS))}). "
            "Save it converted to a plain LoRA (peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and load that")
    for f in VARIANT_FIELDS:
        if cfg.get(f):
            raise UnsupportedVariantError(
                f"adapter {name!r}: LoraConfig.{f}={cfg[f]!r} is not supported (no exact hooked forward); "
                "supported variants: plain LoRA, rsLoRA, DoRA")


def inspect_adapter(name: str, cfg: dict, tensors: dict[str, torch.Tensor], sites: set[str]) -> AdapterParts:
    """Sort an adapter's tensors into site parts and extras, refusing what has no exact rebuild.

    Args:
        name: adapter name (for messages).
        cfg: its ``adapter_config.json``.
        tensors: its weights file (:func:`interp.adapters.factors.read_adapter_tensors`).
        sites: module paths that carry ``lora_A``/``lora_B`` in this file.

    Raises:
        UnsupportedInitError: ``init_lora_weights`` other than :data:`PLAIN_INITS` /
            :data:`RESIDUAL_INITS` (randomised ``pissa_niter_*``, CorDA, LoftQ, MiCA, LoRA-GA, …).
        UnsupportedVariantError: any of :data:`VARIANT_FIELDS` set.
        UnknownAdapterTensorError: a tensor that is none of the known kinds.
    """
    check_config(name, cfg)
    feats: set[str] = set()
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in RESIDUAL_INITS:
        feats.add(init.lower())
    if cfg.get("use_rslora"):
        feats.add("rslora")
    mags, bbias, extras = {}, {}, {}
    for key, t in tensors.items():
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        mod, _, leaf = k.rpartition(".")
        if re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", k) or re.search(r"\.lora_B(\.[^.]+)?\.bias$", k):
            if k.endswith(".bias"):
                feats.add("lora_bias")
            continue
        if re.search(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", k):
            m = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", "", k)
            if m in sites:
                mags[m] = t.detach().float()
                feats.add("dora")
                continue
            feats.add("embedding_lora")
            extras[k] = t
            continue
        if leaf == "bias" and mod.endswith(".base_layer") and mod[:-len(".base_layer")] in sites:
            bbias[mod[:-len(".base_layer")]] = t.detach().float()
            feats.add("trained_bias")
            continue
        if "lora_embedding_" in k:
            feats.add("embedding_lora")
        elif "trainable_tokens_" in k:
            feats.add("trainable_tokens")
        elif leaf == "bias" and cfg.get("bias", "none") != "none":
            feats.add("bias_outside_lora_sites")
        elif cfg.get("modules_to_save") or k.endswith(".base_layer.weight"):
            feats.add("modules_to_save" if cfg.get("modules_to_save") else "embedding_lora")
        else:
            raise UnknownAdapterTensorError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA factor, DoRA magnitude, bias, "
                "modules_to_save copy, embedding LoRA or trainable-token delta; refusing rather than ignoring it")
        extras[k] = t
    if cfg.get("trainable_token_indices"):
        feats.add("trainable_tokens")
    return AdapterParts(feats, mags, bbias, extras, init)


def _lora_config(cfg: dict, module: str, r: int, **over: Any):
    from peft import LoraConfig

    apats = cfg.get("alpha_pattern") or {}
    key = pattern_key(apats, module)
    alpha = apats[key] if key is not None else cfg.get("lora_alpha", 8)
    init = cfg.get("init_lora_weights", True)
    lc = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=bool(cfg.get("use_rslora")),
                    use_dora=bool(cfg.get("use_dora")), lora_bias=bool(cfg.get("lora_bias")),
                    init_lora_weights=init if init in RESIDUAL_INITS else True, **over)
    return lc, alpha


def effective_site_deltas(cfg: dict, factors: dict[str, LoraDelta], parts: AdapterParts,
                          hf_model: Any) -> dict[str, LoraDelta]:
    """Each LoRA site's exact update relative to the original base, as :class:`LoraDelta` with bias.

    For a plain LoRA (no DoRA / residual init / trained bias) the factors are returned unchanged.
    Otherwise, per site, a throwaway peft ``lora.Linear`` is built around a copy of the base layer
    (``W₀``, ``b₀``, with the trained bias if any) with the adapter's config — so PiSSA/OLoRA
    rebuild their residual and DoRA its norms exactly as ``PeftModel.from_pretrained`` does — its
    factors (and magnitude, ``lora_B`` bias) are set from the file, and peft's own ``merge`` gives
    ``M``, ``b_M``. Returned: ``ΔW = M − W₀`` (``[d_out, d_in]``, dense, as ``A = I`` or ``B = I``,
    scale 1) and ``bias = b_M − b₀`` (``None`` if zero by construction).

    Args:
        cfg: ``adapter_config.json``.
        factors: ``{module: LoraDelta}`` as read (:func:`interp.adapters.factors.read_adapter`).
        parts: :func:`inspect_adapter`'s result.
        hf_model: the *unmodified* base model (its layers are copied, never changed).

    Returns:
        ``{module: LoraDelta}``.
    """
    from peft.tuners.lora import Linear as LoraLinear

    exotic = parts.features & {"dora", "pissa", "olora", "trained_bias"}
    if not exotic:
        return factors
    mods = dict(hf_model.named_modules())
    out = {}
    for m, ld in factors.items():
        base = mods[m]
        conv1d = type(base).__name__ == "Conv1D"
        layer_base = copy.deepcopy(base)
        b0 = None if base.bias is None else base.bias.detach().clone()
        with torch.no_grad():
            if m in parts.base_bias:
                layer_base.bias.copy_(parts.base_bias[m].to(layer_base.bias.dtype))
            if ld.bias is not None and layer_base.bias is None:  # lora_bias on a bias-free layer: merge needs one
                layer_base.bias = torch.nn.Parameter(torch.zeros(ld.d_out, dtype=base.weight.dtype,
                                                                  device=base.weight.device))
        lc, alpha = _lora_config(cfg, m, ld.rank, fan_in_fan_out=conv1d)
        lay = LoraLinear(layer_base, "x", config=lc, r=ld.rank, lora_alpha=alpha, is_target_conv_1d_layer=False)
        with torch.no_grad():
            lay.lora_A["x"].weight.copy_(ld.A)
            lay.lora_B["x"].weight.copy_(ld.B)
            if ld.bias is not None:
                lay.lora_B["x"].bias.copy_(ld.bias / ld.scale)
            if m in parts.magnitude:
                lay.lora_magnitude_vector["x"].weight.copy_(parts.magnitude[m])
            if abs(float(lay.scaling["x"]) - ld.scale) > 1e-9 * max(1.0, abs(ld.scale)):
                raise AdapterError(f"module {m!r}: peft's scaling {lay.scaling['x']} != the config's {ld.scale}")
            lay.merge(safe_merge=False)
            M = lay.base_layer.weight.detach().double()
            W0 = base.weight.detach().double()
            if conv1d:  # Conv1D stores W transposed ([d_in, d_out])
                M, W0 = M.T, W0.T
            D = (M - W0).float()
            bm = lay.base_layer.bias
            db = None
            if bm is not None:
                db = (bm.detach().double() - (b0.double() if b0 is not None else 0.0)).float()
        d_out, d_in = D.shape
        if d_in <= d_out:
            out[m] = LoraDelta(torch.eye(d_in, device=D.device), D.contiguous(), 1.0, db)
        else:
            out[m] = LoraDelta(D.contiguous(), torch.eye(d_out, device=D.device), 1.0, db)
    return out


#: combines whose update is input-independent and linear or entrywise in each expert's (ΔW, Δb)
_SITE_OK = ("none", "uniform", "weighted", "task_arithmetic", "ties", "dare", "svd", "mixture", "oracle",
            "merge_and_unload")


def check_combine(parts: dict[str, AdapterParts], combine: str) -> None:
    """Refuse adapter features that ``combine`` cannot reproduce exactly.

    * extras (:data:`EXTRA_FEATURES`): only ``combine="none"`` (peft's own modules run them);
    * site features (:data:`SITE_FEATURES`): every combine but ``arrow`` (its prototypes are defined on
      plain ``B·A``) and the ``peft_*`` ones (peft's ``add_weighted_adapter`` drops them);
    * rsLoRA: not through ``peft_*`` (peft's merged adapter re-scales by ``α/√r`` again, peft issues
      3761 / 3449);
    * ``combine="none"`` with several adapters that each rewrite the shared base (PiSSA/OLoRA, trained
      base biases): refused.

    Raises:
        ExtraModulesError, FeatureCombineError, SharedBaseError.
    """
    for name, p in parts.items():
        extra = p.describe(EXTRA_FEATURES)
        if extra and combine != "none":
            raise ExtraModulesError(
                f"adapter {name!r} trains parts outside the LoRA linear layers ({extra}); combine={combine!r} "
                "would merge or route only the LoRA layers and silently drop or mis-weight them. Use "
                "combine='none' (one adapter at a time), or save the adapter without them")
        site = p.describe(SITE_FEATURES)
        if site and combine not in _SITE_OK:
            raise FeatureCombineError(
                f"adapter {name!r} uses {site}; combine={combine!r} cannot carry it exactly ("
                + ("Arrow's prototypes are defined on plain B·A" if combine == "arrow" else
                   "peft's add_weighted_adapter combines only lora_A/lora_B") +
                f"). Exact combines for it: {', '.join(_SITE_OK)}")
        if "rslora" in p.features and combine.startswith("peft_"):
            raise FeatureCombineError(
                f"adapter {name!r} uses rsLoRA (use_rslora=True); peft's add_weighted_adapter ({combine!r}) "
                "gives the merged adapter rsLoRA scaling α/√r on top of the experts' scales (peft issues "
                "3761, 3449), so the merge would be over-scaled. Use the exact combines uniform / weighted / "
                "task_arithmetic / ties / dare / svd instead")
    if combine == "none" and len(parts) > 1:
        shared = {n: p.describe(("pissa", "olora", "trained_bias", "bias_outside_lora_sites"))
                  for n, p in parts.items()}
        shared = {n: f for n, f in shared.items() if f}
        if shared:
            raise SharedBaseError(
                f"adapters {shared} rewrite the shared base model when peft loads them (residual base / "
                "trained biases), so with several adapters loaded each would run on the others' base. Load "
                "them one at a time with combine='none', or merge them (uniform, ties, …)")
