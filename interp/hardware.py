"""What this machine does well: the training precision and the torch thread count.

Machines of one nominal kind differ: on a CPU with AVX512-BF16 a bf16 matmul of SmolLM2's shape is
~5x faster than fp32; on an AVX2-only CPU it is ~5x *slower* (no native bf16, every product
converted). So ``precision = "auto"`` is decided by measuring, not assumed: :func:`choose_precision`
times a bf16 and an fp32 matmul of a transformer MLP's shape on the current thread count and picks
bf16 only where it is clearly faster. The measurement is cached per machine (CPU model, flags,
torch version, threads) in ``cache_dir()/hardware.json`` so later runs decide instantly and
identically.

Threads: OpenMP threads wait for each other at every parallel region, so a 2-thread torch process
next to one other busy process on 2 cores runs far slower than a 1-thread one (measured in
``benchmarks/bench_machine.py``). :func:`default_threads` therefore counts the cores that are
*free* (the process's CPU affinity minus the cores other processes keep busy), at least 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from interp.adapters.recipe import PRECISIONS
from interp.devices import DTYPES, HardwareError, check_device, resolve_dtype  # noqa: F401  (re-exported)

# bf16 must beat fp32 by this factor on the probe to be chosen: a training step also runs fp32
# LoRA factors, casts and the optimiser, which dilute a matmul-only gain.
MIN_BF16_SPEEDUP = 1.3
PROBE_SHAPE = (128, 576, 1536)  # rows x d_model x d_mlp: a SmolLM2 MLP matmul on one batch


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why.

    Attributes:
        precision: ``"fp32"`` or ``"bf16"`` (what is used).
        requested: what the config or caller asked for (``"auto"``, ``"fp32"``, ``"bf16"``).
        reason: one sentence, printed once and written to ``run.json``.
        device: ``"cpu"`` or ``"cuda"``.
        capability: torch's CPU capability string (``"AVX512"``, ``"AVX2"``...) or the GPU name.
        bf16_speedup: fp32 time / bf16 time of the probe matmul (``None`` if not measured).
    """

    precision: str
    requested: str
    reason: str
    device: str
    capability: str
    bf16_speedup: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cpu_description() -> dict[str, Any]:
    """CPU model name, torch's capability string, bf16-relevant flags and the core count."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx2": "avx2" in flags, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1}


def _time_matmul(dtype: torch.dtype, reps: int = 3) -> float:
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    a @ b  # warm-up: first call picks kernels
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def measure_bf16_speedup() -> float:
    """fp32 / bf16 wall time of one ``[128, 576] @ [576, 1536]`` matmul on the CPU (best of 3).

    > 1 means bf16 is faster. Takes ~0.05 s where bf16 is native, ~0.3 s where it is emulated.
    """
    return _time_matmul(torch.float32) / _time_matmul(torch.bfloat16)


def _probe_key(desc: dict[str, Any]) -> str:
    blob = json.dumps({**desc, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "shape": PROBE_SHAPE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_speedup(desc: dict[str, Any]) -> float:
    from interp.models import atomic_write_text, cache_dir

    path = cache_dir() / "hardware.json"
    key = _probe_key(desc)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if isinstance(table.get(key), dict) and isinstance(table[key].get("bf16_speedup"), float):
        return table[key]["bf16_speedup"]
    speedup = measure_bf16_speedup()
    table[key] = {"bf16_speedup": speedup, "cpu": desc, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_text(path, json.dumps(table, indent=1))
    except OSError:
        pass  # a read-only cache only costs the probe again next time
    return speedup


def choose_precision(requested: str = "auto", device: str | torch.device = "cpu") -> PrecisionChoice:
    """Resolve a training precision request for ``device``.

    ``"fp32"`` and ``"bf16"`` are honoured as given (a forced bf16 on a CPU where it is slow is
    kept, with the measured penalty in the reason). ``"auto"``: on CUDA, bf16 where the GPU
    supports it; on the CPU, bf16 iff the cached probe (:func:`measure_bf16_speedup`) shows it
    at least :data:`MIN_BF16_SPEEDUP` times faster than fp32 on this machine and thread count.

    Raises:
        HardwareError: ``requested`` is not one of :data:`PRECISIONS`.
    """
    if requested not in PRECISIONS:
        raise HardwareError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    dev = torch.device(device).type
    if dev == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (not available)"
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if requested == "auto":
            prec = "bf16" if ok else "fp32"
            why = f"auto on {name}: " + ("bf16 supported" if ok else "no bf16 support, fp32")
        else:
            prec, why = requested, f"{requested} as configured on {name}"
        return PrecisionChoice(prec, requested, why, "cuda", name)
    desc = cpu_description()
    cap = f"{desc['model']} ({desc['capability']}{', AVX512-BF16' if desc['avx512_bf16'] else ''}" \
          f"{', AMX-BF16' if desc['amx_bf16'] else ''})"
    if requested == "fp32":
        return PrecisionChoice("fp32", requested, f"fp32 as configured on {cap}", "cpu", desc["capability"])
    speed = _cached_speedup(desc)
    if requested == "bf16":
        why = f"bf16 as configured on {cap}; bf16 matmuls measured {speed:.2f}x the speed of fp32"
        return PrecisionChoice("bf16", requested, why, "cpu", desc["capability"], speed)
    prec = "bf16" if speed >= MIN_BF16_SPEEDUP else "fp32"
    why = (f"auto on {cap}: a bf16 matmul measured {speed:.2f}x the speed of fp32 "
           f"({'≥' if prec == 'bf16' else '<'} {MIN_BF16_SPEEDUP}x), so {prec}")
    return PrecisionChoice(prec, requested, why, "cpu", desc["capability"], speed)


def _busy_cores(window_s: float = 0.5) -> float:
    """Cores busy with other work, sampled from ``/proc/stat`` over ``window_s`` while this
    process sleeps (a load average lags by a minute and still counts a finished ``pip install``)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]) - idle, sum(vals[:8])
    try:
        b0, t0 = sample()
        time.sleep(window_s)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total_cores = os.cpu_count() or 1
    return total_cores * (b1 - b0) / max(1, t1 - t0)


def free_cores() -> int:
    """Cores this process may use that are not busy with other work (≥ 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - int(round(_busy_cores()))))


def resolve_threads(value: int | str | None = None) -> int:
    """Torch threads for a run as a positive int.

    ``None``, ``0`` or ``"auto"`` take ``$INTERP_THREADS`` if set, else :func:`free_cores`
    (so a run started beside a busy process uses one thread instead of two that wait on each
    other); any other value must be a positive integer.

    Raises:
        HardwareError: not a positive integer or ``"auto"``.
    """
    n = check_threads(value)
    return free_cores() if n is None else n


def check_threads(value: int | str | None = None) -> int | None:
    """What :func:`resolve_threads` would give without sampling the free cores: the thread count,
    or ``None`` for automatic. For checking input before any work (sampling takes a pause).

    Raises:
        HardwareError: ``value``, or ``$INTERP_THREADS`` where it is used, is not a positive
            integer or ``"auto"``.
    """
    name = "threads"
    if value in (None, 0, "0", "auto", ""):
        env = os.environ.get("INTERP_THREADS", "").strip()
        if env in ("", "0", "auto"):
            return None
        value, name = env, "$INTERP_THREADS"
    try:
        n = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except (TypeError, ValueError):
        raise HardwareError(f"{name} must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise HardwareError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return n


def oversubscription(threads: int, cores: int | None = None) -> str | None:
    """A warning when ``threads`` exceeds the machine's cores (``os.cpu_count()``), else None:
    OpenMP threads then wait on each other (measured here: a SmolLM2 forward 2.85 s with one
    thread, 13.0 s with two, beside one busy process on 2 cores)."""
    cores = cores or os.cpu_count() or 1
    if threads <= cores:
        return None
    return (f"{threads} torch threads on {cores} core(s): threads beyond the cores wait on each other and "
            f"slow every step; use --threads {cores} or auto")


def gpu_utilisation_reader(device: str | torch.device = "cuda"):
    """A function returning the current utilisation (%, 0–100) of the CUDA ``device``, or ``None``
    when there is none to read: a CPU device, or neither NVML (``torch.cuda.utilization``, needs
    the ``nvidia-ml-py`` package) nor ``nvidia-smi`` answers."""
    import subprocess

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        torch.cuda.utilization(idx)
        return lambda: float(torch.cuda.utilization(idx))
    except Exception:  # no pynvml: ask nvidia-smi (its index is the same unless CUDA_VISIBLE_DEVICES remaps)
        pass
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    smi_idx = vis[idx].strip() if idx < len(vis) and vis[idx].strip() else str(idx)
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", smi_idx]

    def smi() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.split()[0])

    try:
        smi()
    except Exception:
        return None
    return smi


class GpuMonitor:
    """Context: samples GPU utilisation every ``interval_s`` in a background thread and records
    the peak CUDA memory allocated by this process, for one step of a run.

    ``summary()`` gives ``{"util_mean_pct", "util_max_pct", "samples", "interval_s", "peak_mib"}``
    (utilisation: the driver's "percent of time a kernel was running" over its last sample period),
    or ``None`` on a CPU device. ``read`` replaces the reader (tests).
    """

    def __init__(self, device: str | torch.device = "cuda", interval_s: float = 0.5, read=None):
        import threading

        self.device = torch.device(device)
        self.interval_s = float(interval_s)
        self.read = read if read is not None else gpu_utilisation_reader(self.device)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(float(self.read()))
            except Exception:  # a failed read is a missing sample, never a failed step
                pass

    def __enter__(self) -> "GpuMonitor":
        import threading

        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="interp-gpu-monitor")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.peak_mib = round(torch.cuda.max_memory_allocated(self.device) / 2**20) if self._cuda else None

    def summary(self) -> dict[str, Any] | None:
        if self.read is None and not self._cuda:
            return None
        s = self.samples
        return {"util_mean_pct": round(sum(s) / len(s), 1) if s else None,
                "util_max_pct": max(s) if s else None, "samples": len(s), "interval_s": self.interval_s,
                "peak_mib": getattr(self, "peak_mib", None)}
