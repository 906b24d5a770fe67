"""Timing and peak-memory helpers shared by the benchmarks (CPU and CUDA).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
(tensor memory only); on the CPU the process's resident-set high-water mark ``VmHWM``, reset
before the measured region by writing ``5`` to ``/proc/self/clear_refs`` (Linux), so two runs
in one process get separate peaks. Where the reset is not possible, ``ru_maxrss`` growth is used.
"""

from __future__ import annotations

import contextlib
import re
import resource
import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _hwm_kib() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Peak:
    """``with Peak(device) as p: ...`` then ``p.mib``: peak memory of the region (see module doc)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.mib = float("nan")
        self.kind = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.kind = "cuda max_memory_allocated"
        elif _reset_hwm() and _hwm_kib() is not None:
            self.kind = "VmHWM (process RSS peak)"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = "ru_maxrss growth"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
            self.above_start_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.kind.startswith("VmHWM"):
            self.mib = _hwm_kib() / 1024
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024
        return False


def timed(fn: Callable, device="cpu", reps: int = 1, warmup: int = 0):
    """Median seconds of ``reps`` calls of ``fn`` (after ``warmup`` calls), and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


@contextlib.contextmanager
def stopwatch(device="cpu"):
    """``with stopwatch(dev) as w: ...`` then ``w["s"]`` (synchronised on CUDA)."""
    sync(device)
    w = {"s": float("nan")}
    t = time.perf_counter()
    yield w
    sync(device)
    w["s"] = time.perf_counter() - t


def device_name(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d.index or 0)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def save_json(result: dict, out: str) -> dict:
    """Write a benchmark's result dict as indented JSON to ``out`` (parents created); returns it."""
    import json
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result
