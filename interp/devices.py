"""Where a model lives: device and dtype checks shared by every loader (no other interp imports,
so ``interp.models`` can use them without an import cycle; ``interp.hardware`` re-exports them)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from interp.errors import InterpError


class HardwareError(InterpError, ValueError):
    """A precision, device or thread request this machine cannot honour."""


def check_device(device: str | torch.device) -> str:
    """``device`` as a string if torch can use it here.

    Raises:
        HardwareError: not a device string, or CUDA asked for where torch sees no GPU (or too few).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HardwareError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HardwareError(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine "
                                f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HardwareError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise HardwareError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return str(dev)


#: names accepted for a model dtype (torch's own names and the usual short ones)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating torch dtype from ``dtype`` (a ``torch.dtype`` or a name in :data:`DTYPES`);
    ``None`` stays ``None`` (keep the model's own dtype).

    Raises:
        HardwareError: not a floating dtype or an unknown name.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise HardwareError(f"model dtype must be a floating dtype, got {dtype}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise HardwareError(f"dtype must be one of {', '.join(DTYPES)} or a floating torch.dtype, got {dtype!r}")
    return DTYPES[key]


#: the precisions of evaluation and every analysis (``[evaluation] dtype``, ``interp run --dtype``):
#: name -> the weights' dtype. ``tf32`` keeps float32 weights and lets CUDA matmuls use TF32 cores.
ANALYSIS_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
#: what ``[evaluation] dtype`` accepts: ``auto`` (resolved per device, :func:`resolve_analysis_dtype`)
#: and the names of :data:`ANALYSIS_DTYPES`, which force that precision
ANALYSIS_CHOICES = ("auto", *ANALYSIS_DTYPES)


@dataclasses.dataclass(frozen=True)
class AnalysisDtypeChoice:
    """The precision of evaluation and every analysis, and why (``run.json`` ``machine.analysis_dtype``).

    Attributes:
        dtype: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (what is used; a key of :data:`ANALYSIS_DTYPES`).
        requested: what the config or caller asked for (``"auto"`` or one of those names).
        reason: one sentence, printed once by the study runner.
        device: ``"cpu"`` or ``"cuda"``.
    """

    dtype: str
    requested: str
    reason: str
    device: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_analysis_dtype(requested: str, device: str | torch.device = "cpu") -> AnalysisDtypeChoice:
    """Resolve ``[evaluation] dtype`` for ``device`` (only its type matters, so the choice, and
    the cache keys that include it, are the same on every machine of one device type).

    ``"auto"``: ``"tf32"`` on CUDA — the weights stay the float32 the user gave, only CUDA
    matmuls use TF32 (10-bit mantissa inputs, fp32 accumulation): the patching sweep 1.2–4.9×
    faster than fp32 at the 0.5B–8B shapes on an H200, every grid measured within 1% of its
    fp32 range (README "Precision policy") — and ``"fp32"`` on the CPU, where TF32 does not
    exist. ``"fp32"``, ``"tf32"`` and ``"bf16"`` force that precision.

    Raises:
        HardwareError: an unknown name or device, or ``"tf32"`` on a device other than CUDA (on a
            CPU it would silently mean fp32).
    """
    if requested not in ANALYSIS_CHOICES:
        raise HardwareError(f"analysis dtype must be one of {', '.join(ANALYSIS_CHOICES)}, got {requested!r}")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise HardwareError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if requested == "auto":
        if kind == "cuda":
            return AnalysisDtypeChoice("tf32", "auto", "auto on CUDA: tf32 (float32 weights, TF32 matmuls; "
                                       "within 1% of fp32 on every grid measured, README \"Precision policy\")",
                                       kind)
        return AnalysisDtypeChoice("fp32", "auto", f"auto on {kind}: fp32 (TF32 is a CUDA matmul mode)", kind)
    if requested == "tf32" and kind != "cuda":
        raise HardwareError(f"dtype 'tf32' needs a CUDA device (TF32 is a GPU matmul mode); "
                            f"device is {str(device)!r}: use auto, fp32 or bf16")
    return AnalysisDtypeChoice(requested, requested, f"{requested} as configured", kind)


class analysis_precision:
    """Context: matmuls in the precision ``name`` (``"auto"`` or a key of :data:`ANALYSIS_DTYPES`,
    resolved for ``device`` by :func:`resolve_analysis_dtype`) for its duration.

    ``"tf32"`` turns on TF32 for CUDA matmuls and cuDNN (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``); ``"fp32"`` turns it off (torch's own default for matmuls)
    and ``"bf16"`` leaves it off (bf16 weights use bf16 kernels). The previous flags are restored
    on exit, so a study's training step is never affected by its analyses' setting, also where the
    caller set them with torch's per-backend ``fp32_precision`` API (:func:`_tf32_state`).

    Attributes:
        name: the resolved precision (``"fp32"``, ``"tf32"`` or ``"bf16"``).

    Raises:
        HardwareError: an unknown name, or ``"tf32"`` on a device other than CUDA (TF32 exists
            only on NVIDIA GPUs from Ampere on; on a CPU it would silently mean fp32).
    """

    def __init__(self, name: str, device: str | torch.device = "cpu"):
        self.name = resolve_analysis_dtype(name, device).dtype

    def __enter__(self) -> "analysis_precision":
        self._saved = _tf32_state()
        on = self.name == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        return self

    def __exit__(self, *exc) -> None:
        _set_tf32_state(self._saved)


def _tf32_state() -> tuple[str, tuple]:
    """The caller's TF32 setting, in the API it was made with: torch's legacy ``allow_tf32`` flags,
    or, where reading those raises (torch >= 2.9 after a caller used its per-backend
    ``fp32_precision`` settings: "a mix of the legacy and new APIs"), those settings."""
    b = torch.backends
    try:
        return "legacy", (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    except RuntimeError:
        return "new", (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)


def _set_tf32_state(state: tuple[str, tuple]) -> None:
    b = torch.backends
    api, v = state
    if api == "legacy":
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = v
    else:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = v
