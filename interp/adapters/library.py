"""A library: a named set of PEFT LoRA adapters (experts) for one base model, validated.

:meth:`AdapterLibrary.load` reads every adapter (safetensors; pickles only on opt-in) and refuses,
with an :class:`AdapterError` naming adapter, module and problem:

* a directory without ``adapter_config.json`` / weights (:class:`AdapterFileError`), or with only a
  pickle ``adapter_model.bin`` (:class:`PickleRefusedError`);
* a different base model than the one in use (:class:`BaseModelMismatchError`): the base recorded in
  ``interp_meta.json`` (``base_model``) or else ``adapter_config.json``
  (``base_model_name_or_path``) must match (``expected_base`` overrides what it must match);
* a target module the model does not have (:class:`TargetModuleError`), or factors that do not fit
  the module (``A.shape[1] == in_features``, ``B.shape[0] == out_features``; :class:`ShapeMismatchError`);
* NaN/Inf weights (:class:`NonFiniteWeightsError`); an all-zero B everywhere — never trained or
  weights that did not land in the file (:class:`ZeroUpdateError`);
* a fused projection the bridge would bypass (``interp.models.FusedProjectionError``);
* a reserved adapter name, or a peft feature with no exact rebuild (the ``AdapterFeatureError``
  subclasses of :mod:`interp.adapters.features`).

DoRA, PiSSA/OLoRA and trained-bias adapters get their exact per-site update on the original base in
:attr:`AdapterLibrary.deltas` (:func:`interp.adapters.features.effective_site_deltas`).

After PEFT attaches the adapters, :meth:`AdapterLibrary.verify_attached` checks that every
``lora_A``/``lora_B`` in the live model equals the file's (:class:`WeightsNotLoadedError`) — the
"weights actually landed" check.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from interp.adapters.factors import (ADAPTER_WEIGHTS, PICKLE_WEIGHTS, AdapterFormatError,
                                     LoraDelta, adapter_dir_problem, read_adapter, read_adapter_config)
from interp.adapters.hooks import check_adapter_name
from interp.errors import AdapterError
from interp.surgery import clean_module_path

META = "interp_meta.json"


class AdapterFileError(AdapterError):
    """Missing or unreadable adapter files."""


class PickleRefusedError(AdapterError):
    """The adapter holds only a pickle and ``allow_pickle`` was not given."""


class BaseModelMismatchError(AdapterError):
    """The adapter was trained on another base model."""


class TargetModuleError(AdapterError):
    """The adapter targets a module the base model does not have."""


class ShapeMismatchError(AdapterError):
    """The LoRA factors do not fit the target module's weight."""


class NonFiniteWeightsError(AdapterError):
    """NaN or Inf in the adapter's weights."""


class ZeroUpdateError(AdapterError):
    """Every B factor is zero: ΔW = 0 (never trained, or weights did not land)."""


class WeightsNotLoadedError(AdapterError):
    """The live PEFT model's LoRA weights differ from the adapter file's."""


def _norm_base(name: Any) -> str:
    s = str(name or "").strip()
    if not s:
        return ""
    p = Path(s).expanduser()
    if p.exists():
        try:
            from interp.models import cache_dir

            p = p.resolve()
            if p == (cache_dir() / "models" / "smollm2-135m").resolve():
                return "smollm2-135m"
            return str(p)
        except OSError:
            return s
    return s


def recorded_base(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was made for: ``interp_meta.json``'s ``base_model``, else the config's
    ``base_model_name_or_path`` ("" if neither records one)."""
    d = Path(adapter_dir)
    meta = d / META
    if meta.is_file():
        try:
            b = json.loads(meta.read_text()).get("base_model")
            if b:
                return str(b)
        except json.JSONDecodeError:
            pass
    return str(read_adapter_config(d).get("base_model_name_or_path") or "")


def linear_shapes(hf_model: Any) -> dict[str, tuple[int, int]]:
    """``{module_path: (in_features, out_features)}`` of every linear layer (and GPT-2 ``Conv1D``) of a (maybe PEFT-wrapped or
    bridged) HF model, with ``_original_component`` / ``base_layer`` path segments removed."""
    out = {}
    for name, mod in hf_model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            clean = clean_module_path(name, drop_lora_wrapper=True, drop_peft_prefix=True)
            if isinstance(mod, torch.nn.Linear):
                out[clean] = (int(mod.in_features), int(mod.out_features))
            else:  # transformers' Conv1D (GPT-2): weight [d_in, d_out], y = x W + b
                out[clean] = (int(mod.weight.shape[0]), int(mod.weight.shape[1]))
    return out


@dataclasses.dataclass
class AdapterLibrary:
    """Named, validated experts for one base model.

    Attributes:
        base: the base model's name (registry name or directory) the adapters were checked against.
        dirs: adapter name -> directory.
        deltas: adapter name -> ``{module_path: LoraDelta}``: each site's exact update relative to
            the original base (with bias); equal to ``factors`` for a plain LoRA, rebuilt by
            :func:`interp.adapters.features.effective_site_deltas` for DoRA, PiSSA/OLoRA, biases.
        configs: adapter name -> ``adapter_config.json`` dict.
        factors: adapter name -> the file's own ``lora_A``/``lora_B`` (:func:`read_adapter`).
        parts: adapter name -> :class:`interp.adapters.features.AdapterParts` (features, extras).
    """

    base: str
    dirs: dict[str, str]
    deltas: dict[str, dict[str, LoraDelta]]
    configs: dict[str, dict]
    factors: dict[str, dict[str, LoraDelta]] = dataclasses.field(default_factory=dict)
    parts: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.dirs)

    def __len__(self) -> int:
        return len(self.dirs)

    @classmethod
    def load(cls, base: Any, adapters: dict[str, str | os.PathLike], allow_pickle: bool = False,
             expected_base: str | None = None, hf_model: Any = None,
             allow_fused: bool = False) -> "AdapterLibrary":
        """Read and validate adapters for ``base``.

        Args:
            base: a registered model name, a local HF directory, or a ``HookedModel`` (its
                ``info["source"]`` / ``name`` is the base name and its ``hf_model`` gives shapes).
            adapters: ``{name: directory}``; names become hook-name parts (``[A-Za-z0-9_-]+``).
            allow_pickle: accept ``adapter_model.bin`` (loaded with ``weights_only=True``).
            expected_base: the base name every adapter must record (default: ``base``'s name).
                Adapters that record no base are accepted.
            hf_model: the HF model to check module shapes against (default: ``base``'s, loaded
                with ``interp.models.load_hf`` if ``base`` is a name).
            allow_fused: accept targets on fused projections (for merging into the weights before
                the bridge boots, where nothing is bypassed).

        Raises:
            AdapterError subclasses (see module docstring); ``interp.models.FusedProjectionError``;
            ``ReservedAdapterNameError`` and the ``AdapterFeatureError`` subclasses of
            :mod:`interp.adapters.features` (features with no exact rebuild);
            ``ValueError`` for an empty ``adapters`` or a bad adapter name.
        """
        from interp.adapters.factors import read_adapter_tensors
        from interp.adapters.features import (check_adapter_name_reserved, check_config, effective_site_deltas,
                                              inspect_adapter)
        from interp.models import MANIFEST, check_fused_targets, load_hf, verify_manifest

        if not adapters:
            raise AdapterError("no adapters given: pass {name: adapter directory, ...}")
        if hasattr(base, "hf_model") and hasattr(base, "bridge"):
            base_name = str(base.info.get("source", base.name))
            hf_model = hf_model if hf_model is not None else base.hf_model
        else:
            base_name = str(base)
            if hf_model is None:
                hf_model, _ = load_hf(base_name)
        shapes = linear_shapes(hf_model)
        want = _norm_base(expected_base if expected_base is not None else base_name)
        dirs, deltas, configs, factors, parts = {}, {}, {}, {}, {}
        for name, d in adapters.items():
            check_adapter_name(name)
            check_adapter_name_reserved(name)
            d = Path(d)
            problem = adapter_dir_problem(d)
            if problem:
                raise AdapterFileError(f"adapter {name!r}: {problem}")
            if not (d / ADAPTER_WEIGHTS).is_file():
                if (d / PICKLE_WEIGHTS).is_file() and not allow_pickle:
                    raise PickleRefusedError(
                        f"adapter {name!r}: {d} holds only a pickle {PICKLE_WEIGHTS}, which can run code "
                        "when loaded; convert it to safetensors or pass allow_pickle=True if you trust it")
                if not (d / PICKLE_WEIGHTS).is_file():
                    raise AdapterFileError(f"adapter {name!r}: {d} has no {ADAPTER_WEIGHTS}")
            if (d / MANIFEST).is_file():  # written by train_expert / make_random_adapter
                ok, reason = verify_manifest(d)
                if not ok:
                    raise AdapterFileError(f"adapter {name!r}: {d} fails its checksum manifest ({reason})")
            try:
                cfg = read_adapter_config(d)
                delta = read_adapter(d, allow_pickle=allow_pickle)
                tensors = read_adapter_tensors(d, allow_pickle=allow_pickle)
            except AdapterFormatError as e:
                raise AdapterFileError(f"adapter {name!r}: {e}") from e
            check_config(name, cfg)  # before the targets: layer_replication's targets are not the base's
            got = _norm_base(recorded_base(d))
            if got and want and got != want:
                raise BaseModelMismatchError(
                    f"adapter {name!r} ({d}) was made for base model {got!r}, but the base in use is "
                    f"{want!r}; pass expected_base= if they are the same model under another name")
            tm = cfg.get("target_modules")
            if not allow_fused:
                check_fused_targets(hf_model, sorted(tm) if isinstance(tm, (list, set)) else tm)
            any_nonzero = False
            for m, ld in delta.items():
                if m not in shapes:
                    raise TargetModuleError(
                        f"adapter {name!r}: target module {m!r} is not a linear layer of base {base_name!r}")
                d_in, d_out = shapes[m]
                if ld.d_in != d_in or ld.d_out != d_out:
                    raise ShapeMismatchError(
                        f"adapter {name!r}, module {m!r}: LoRA A {tuple(ld.A.shape)} / B {tuple(ld.B.shape)} "
                        f"do not fit the layer (in_features {d_in}, out_features {d_out})")
                if not (torch.isfinite(ld.A).all() and torch.isfinite(ld.B).all()):
                    raise NonFiniteWeightsError(f"adapter {name!r}, module {m!r}: NaN or Inf in lora_A/lora_B")
                any_nonzero = any_nonzero or bool((ld.B != 0).any())
            part = inspect_adapter(name, cfg, tensors, set(delta))
            any_nonzero = any_nonzero or bool(part.features & {"dora", "lora_bias", "trained_bias"} or part.extras)
            if not any_nonzero:
                raise ZeroUpdateError(
                    f"adapter {name!r} ({d}): every lora_B is zero, so ΔW = 0 — the adapter was never "
                    "trained or its weights were not saved")
            dirs[name], configs[name], factors[name], parts[name] = str(d), cfg, delta, part
            deltas[name] = effective_site_deltas(cfg, delta, part, hf_model)
        return cls(base_name, dirs, deltas, configs, factors, parts)

    def verify_attached(self, peft_model: Any, names: list[str] | None = None) -> None:
        """Check that each adapter's ``lora_A``/``lora_B`` in ``peft_model`` equal the file's exactly.

        Raises:
            WeightsNotLoadedError: a module missing from the live model, or different weights.
        """
        from interp.adapters.merge import deltas_from_peft

        for name in names or self.names:
            live = deltas_from_peft(peft_model, name)
            for m, ld in (self.factors or self.deltas)[name].items():
                if m not in live:
                    raise WeightsNotLoadedError(f"adapter {name!r}, module {m!r}: no LoRA layer in the live model")
                # the file's factors on the live model's device and dtype (peft casts adapters to the
                # base's device and dtype; fp32 -> fp64 is exact, and bf16 bases keep fp32 adapters)
                ld = LoraDelta(ld.A.to(live[m].A), ld.B.to(live[m].B), ld.scale,
                               None if ld.bias is None or live[m].bias is None else ld.bias.to(live[m].bias))
                if not (torch.equal(live[m].B, ld.B) and torch.equal(live[m].A, ld.A)):
                    raise WeightsNotLoadedError(
                        f"adapter {name!r}, module {m!r}: live lora_A/lora_B differ from {self.dirs[name]}")
                if (live[m].bias is None) != (ld.bias is None) or (
                        ld.bias is not None and not torch.allclose(live[m].bias, ld.bias, rtol=1e-6, atol=0)):
                    raise WeightsNotLoadedError(
                        f"adapter {name!r}, module {m!r}: live lora_B bias differs from {self.dirs[name]}")
                if abs(live[m].scale - ld.scale) > 1e-9 * max(1.0, abs(ld.scale)):
                    raise WeightsNotLoadedError(
                        f"adapter {name!r}, module {m!r}: live scale {live[m].scale} != file's {ld.scale}")
