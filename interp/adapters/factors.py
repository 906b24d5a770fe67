"""LoRA factors as the science sees them: per module, ΔW = s·B·A.

A PEFT LoRA adapter stores, for each targeted ``nn.Linear`` (weight ``[d_out, d_in]``),
``lora_A.weight`` ``[r, d_in]`` and ``lora_B.weight`` ``[d_out, r]``, plus a scale
``s = lora_alpha / r`` (or ``lora_alpha / √r`` with rsLoRA; per-module ``rank_pattern`` /
``alpha_pattern`` override both). This module reads them — safetensors only — into
:class:`LoraDelta` objects keyed by the module's path in the base model
(``model.layers.3.self_attn.q_proj``), the common currency of merge, route and subspace code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from interp.errors import InterpError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
_LAYER = re.compile(r"\.layers\.(\d+)\.|\.h\.(\d+)\.|\.blocks\.(\d+)\.")


class AdapterFormatError(InterpError, ValueError):
    """An adapter directory is missing files or holds tensors that are not a LoRA."""


@dataclasses.dataclass
class LoraDelta:
    """One module's low-rank update ΔW = scale · B @ A.

    Attributes:
        A: ``[r, d_in]`` down-projection (PEFT ``lora_A.weight``).
        B: ``[d_out, r]`` up-projection (PEFT ``lora_B.weight``).
        scale: ``s`` (``lora_alpha / r``, or ``/ √r`` with rsLoRA).
        bias: ``[d_out]`` change of the layer's output bias, already scaled (``s·lora_B.bias`` with
            peft's ``lora_bias=True``; trained base biases), or ``None``. The module's update is
            ``x ↦ ΔW x + bias``; :meth:`dense` and :meth:`apply` cover ΔW only.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise AdapterFormatError(
                f"LoRA factors do not fit: A {tuple(self.A.shape)} (r × d_in) and "
                f"B {tuple(self.B.shape)} (d_out × r)")
        if self.bias is not None and tuple(self.bias.shape) != (self.B.shape[0],):
            raise AdapterFormatError(f"LoRA output bias {tuple(self.bias.shape)} does not fit d_out {self.B.shape[0]}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    def dense(self) -> torch.Tensor:
        """ΔW ``[d_out, d_in]`` in float64 (forms the full matrix: only for checks and small d)."""
        return self.scale * (self.B.double() @ self.A.double())

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LoraDelta":
        """A copy with ``A``, ``B`` and ``bias`` on ``device`` (and cast to ``dtype`` if given);
        ``self`` when nothing changes."""
        dev = torch.device(device) if device is not None else self.A.device
        dt = dtype or self.A.dtype
        same = all(t is None or (t.device == dev and (dtype is None or t.dtype == dt))
                   for t in (self.A, self.B, self.bias))
        if same:
            return self
        mv = (lambda t: t.to(device=dev, dtype=dt)) if dtype is not None else (lambda t: t.to(dev))
        return LoraDelta(mv(self.A), mv(self.B), self.scale, None if self.bias is None else mv(self.bias))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for activations ``[..., d_in]`` -> ``[..., d_out]`` without forming ΔW."""
        return self.scale * ((x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype))

    def frobenius_sq(self) -> float:
        """‖ΔW‖_F² from the factors: s² · tr((BᵀB)(AAᵀ))."""
        A, B = self.A.double(), self.B.double()
        return float(self.scale ** 2 * torch.sum((B.T @ B) * (A @ A.T)))


def layer_of(module: str) -> int | None:
    """Transformer layer index of a module path (``model.layers.7.mlp.up_proj`` -> 7)."""
    m = _LAYER.search("." + module + ".")
    if not m:
        return None
    return int(next(g for g in m.groups() if g is not None))


def short_module(module: str) -> str:
    """Projection name of a module path (``model.layers.7.mlp.up_proj`` -> ``up_proj``)."""
    return module.rsplit(".", 1)[-1]


def adapter_dir_problem(d: Path) -> str | None:
    """What is wrong with ``d`` as a PEFT adapter directory, in words a user can act on, or None.

    Names the common slips: a weights *file* given instead of its directory, and the sub-folders
    peft writes for named adapters (``save_pretrained`` of a model with adapter ``"ab"`` saves it
    under ``DIR/ab``).
    """
    if d.is_file():
        return f"{d} is a file; pass the adapter directory that holds it ({d.parent})"
    if not d.is_dir():
        return f"adapter directory {d} does not exist"
    if (d / ADAPTER_CONFIG).is_file():
        return None
    nested = sorted(str(c.parent.relative_to(d)) for c in d.glob(f"*/{ADAPTER_CONFIG}")) + \
        sorted(str(c.parent.relative_to(d)) for c in d.glob(f"*/*/{ADAPTER_CONFIG}"))
    if nested:
        return (f"adapter directory {d} has no {ADAPTER_CONFIG}, but its sub-folder(s) {', '.join(nested[:5])} "
                "do (peft saves named adapters there); pass the sub-folder")
    return f"adapter directory {d} has no {ADAPTER_CONFIG}"


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        AdapterFormatError: the directory or the config is missing or unreadable.
    """
    d = Path(adapter_dir)
    problem = adapter_dir_problem(d)
    if problem:
        raise AdapterFormatError(problem)
    p = d / ADAPTER_CONFIG
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{p} is not valid JSON: {e}") from e


def pattern_key(keys, module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module``, as peft 0.21.2 resolves it
    (``peft.utils.other.get_pattern_key``): the *first* key, in the config's order, with
    ``re.match(rf"(.*\\.)?({key})$", module)``; ``None`` if no key matches. Keys are regexes
    (``"q_proj|v_proj"`` matches both), and an earlier key wins over a later, more specific one."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _scale_for(module: str, rank: int, cfg: dict) -> float:
    alpha = cfg.get("lora_alpha", 8)
    pats = cfg.get("alpha_pattern") or {}
    key = pattern_key(pats, module)
    if key is not None:
        alpha = pats[key]
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def read_adapter_tensors(adapter_dir: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter's weights file, keyed as saved (``base_model.model.…``).

    Raises:
        AdapterFormatError: not a LoRA config, missing weights, a pickle without opt-in, unreadable file.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{d} is a {cfg.get('peft_type')} adapter, not LORA")
    st = d / ADAPTER_WEIGHTS
    if st.is_file():
        try:
            tensors = load_file(str(st))
        except Exception as e:  # noqa: BLE001
            raise AdapterFormatError(f"{st} is not a readable safetensors file: {e}") from e
    elif (d / PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{d} holds only a pickle {PICKLE_WEIGHTS}; pickles can execute code. Convert it to "
                "safetensors, or pass allow_pickle=True if you trust its source")
        tensors = torch.load(d / PICKLE_WEIGHTS, map_location="cpu", weights_only=True)
    else:
        raise AdapterFormatError(f"adapter directory {d} has no {ADAPTER_WEIGHTS}")
    return tensors


def read_adapter(adapter_dir: str | Path, allow_pickle: bool = False) -> dict[str, LoraDelta]:
    """Read a PEFT LoRA adapter directory into ``{module_path: LoraDelta}``.

    Module paths are relative to the base model (PEFT's ``base_model.model.`` prefix removed).
    ``rank_pattern`` / ``alpha_pattern`` keys resolve as peft resolves them (:func:`pattern_key`);
    a ``lora_B.bias`` (peft's ``lora_bias=True``) becomes :attr:`LoraDelta.bias` (``s·b``). Other
    tensors (DoRA magnitudes, trained base biases, ``modules_to_save`` …) are not read here: they need
    the base model (:mod:`interp.adapters.features`).

    Args:
        adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: also accept a pickle ``adapter_model.bin`` (loaded with
            ``torch.load(weights_only=True)``). Off by default: pickles from untrusted sources
            can run code.

    Raises:
        AdapterFormatError: missing files, a pickle without opt-in, not a LoRA, or A/B
            factors that do not pair up.
    """
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    tensors = read_adapter_tensors(d, allow_pickle)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    lora_bias: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(m["module"], {})[m["ab"]] = t.detach().float()
        elif (mb := _BIAS_KEY.match(key)):  # peft's lora_bias=True: lora_B carries a bias, scaled with B
            lora_bias[mb["module"]] = t.detach().float()
    if not parts:
        raise AdapterFormatError(f"{d} contains no lora_A/lora_B tensors")
    out: dict[str, LoraDelta] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{d}: module {module} has lora_{''.join(ab)} but not both factors")
        rank = int(ab["A"].shape[0])
        rpats = cfg.get("rank_pattern") or {}
        key = pattern_key(rpats, module)
        want = rpats[key] if key is not None else cfg.get("r", rank)
        if want != rank:
            raise AdapterFormatError(f"{d}: {module} has rank {rank}, but the config gives it rank {want} "
                                     f"({'rank_pattern key ' + repr(key) if key is not None else 'r'})")
        scale = _scale_for(module, rank, cfg)
        bias = lora_bias.get(module)
        out[module] = LoraDelta(ab["A"], ab["B"], scale, None if bias is None else scale * bias)
    return out
