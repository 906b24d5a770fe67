"""Where a model lives: device and dtype checks shared by every loader (no other interp imports,
so ``interp.models`` can use them without an import cycle; ``interp.hardware`` re-exports them)."""

from __future__ import annotations

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


class analysis_precision:
    """Context: matmuls in the precision ``name`` of :data:`ANALYSIS_DTYPES` for its duration.

    ``"tf32"`` turns on TF32 for CUDA matmuls and cuDNN (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``); ``"fp32"`` turns it off (torch's own default for matmuls)
    and ``"bf16"`` leaves it off (bf16 weights use bf16 kernels). The previous flags are restored
    on exit, so a study's training step is never affected by its analyses' setting.

    Raises:
        HardwareError: an unknown name, or ``"tf32"`` on a device other than CUDA (TF32 exists
            only on NVIDIA GPUs from Ampere on; on a CPU it would silently mean fp32).
    """

    def __init__(self, name: str, device: str | torch.device = "cpu"):
        if name not in ANALYSIS_DTYPES:
            raise HardwareError(f"analysis dtype must be one of {', '.join(ANALYSIS_DTYPES)}, got {name!r}")
        if name == "tf32" and torch.device(device).type != "cuda":
            raise HardwareError(f"dtype 'tf32' needs a CUDA device (TF32 is a GPU matmul mode); "
                                f"device is {str(device)!r}: use fp32 or bf16")
        self.name = name

    def __enter__(self) -> "analysis_precision":
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        on = self.name == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        return self

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
