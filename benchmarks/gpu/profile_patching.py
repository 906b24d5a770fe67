"""Where the GPU time of our patching sweep goes: ``torch.profiler`` over one resid_pre sweep.

Reports the wall time, the summed CUDA kernel time (if it is close to the wall time the sweep is
GPU-bound; if much lower, host/launch-bound), the number of kernel launches, and the kernels and
operators with the most CUDA time, for each shape.

    python benchmarks/gpu/profile_patching.py --device cuda --out $OUT/profile_patching.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from gpu import arch  # noqa: E402
from gpu.bench_patching_gpu import sweep  # noqa: E402
from gpu.measure import sync  # noqa: E402


def profile(shape: str, device: str, B: int, T: int, skip_unchanged: bool = True, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    hm = arch.hooked(shape, device)
    clean, corr, ca, xa = (t.to(device) for t in arch.random_pairs(hm.d_vocab, B, T))
    sweep(hm, clean, corr, ca, xa, skip_unchanged=skip_unchanged)  # warm-up
    sync(device)
    t = time.perf_counter()
    sweep(hm, clean, corr, ca, xa, skip_unchanged=skip_unchanged)
    sync(device)
    wall = time.perf_counter() - t
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with tprofile(activities=acts) as prof:
        sweep(hm, clean, corr, ca, xa, skip_unchanged=skip_unchanged)
        sync(device)
    ev = prof.key_averages()
    dev_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    kernels = [e for e in ev if dev_time(e) > 0]
    total_us = sum(dev_time(e) for e in kernels)
    ops = sorted(kernels, key=dev_time, reverse=True)[:top]
    out = {"shape": shape, "prompts": B, "positions": T, "skip_unchanged": skip_unchanged, "wall_s": wall,
           "cuda_time_s": total_us / 1e6, "kernel_launches": int(sum(e.count for e in kernels)),
           "top": [{"name": e.key[:90], "cuda_ms": dev_time(e) / 1e3, "count": e.count} for e in ops]}
    del hm
    torch.cuda.empty_cache()
    return out


def gemm_rate(device: str, m: int, k: int, n: int, tf32: bool = False, reps: int = 20) -> float:
    """Measured TFLOP/s of one ``[m, k] @ [k, n]`` float32 product (median of ``reps``, CUDA events)."""
    import statistics

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=g)
    b = torch.randn(k, n, device=device, generator=g)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for _ in range(3):
            a @ b
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * m * k * n / statistics.median(ts) / 1e12


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--out", default="profile_patching.json")
    a = ap.parse_args(argv)
    res = []
    if a.device.startswith("cuda"):
        rates = {f"{m}x{k}x{n}{' tf32' if tf in (True,) else ''}": gemm_rate(a.device, m, k, n, tf)
                 for m, k, n in ((8192, 8192, 8192), (1024, 2048, 8192), (1024, 896, 4864)) for tf in (False, True)}
        print("fp32 GEMM TFLOP/s:", json.dumps({k: round(v, 1) for k, v in rates.items()}), flush=True)
        res.append({"gemm_tflops": rates})
    for s in a.shapes:
        r = profile(s, a.device, a.prompts, a.positions)
        res.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "top"}), flush=True)
        for k in r["top"]:
            print(f"   {k['cuda_ms']:9.2f} ms  x{k['count']:<6} {k['name']}", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
