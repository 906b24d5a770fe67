"""Spectrum of ΔW = s·B·A: from the factors (interp.subspace.spectrum) vs dense svdvals(B @ A).

Side by side in one run, at d = 576 (SmolLM2 width) and d = 4096, r = 8, 16, 32, 64. Both routes
run in float64 on the same device (CPU by default; ``--device cuda`` if available). The dense route
is repeated ``--dense-reps`` times at d = 576 and once at d = 4096 (about 10 s each on 2 CPU
cores); the factor route is timed as the median of ``--fast-reps`` runs. Reports the ratio of
median times and the max relative difference of the singular values, prints a table and writes
JSON to benchmarks/results/bench_spectrum.json.

    python benchmarks/bench_spectrum.py [--device cpu] [--threads 1] [--sizes 576 4096] [--ranks 8 16 32 64]

On a shared, loaded CPU use ``--threads 1``: multi-threaded small factorisations then suffer
from oversubscription (observed: 1 ms medians becoming 100 ms), which would flatter the ratio
for the wrong reason. Both routes always use the same thread setting.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from interp.adapters.factors import LoraDelta
from interp.models import atomic_write_text
from interp.subspace import spectrum


def _time(fn, reps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--fast-reps", type=int, default=20)
    ap.add_argument("--dense-reps", type=int, default=3, help="dense repetitions below d = 2048")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_spectrum.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'d':>5} {'r':>3} {'factors_ms':>11} {'dense_s':>9} {'ratio':>9} {'max_rel_diff':>13}")
    for d in args.sizes:
        for r in args.ranks:
            g = torch.Generator().manual_seed(d * 1000 + r)
            A = torch.randn(r, d, generator=g, dtype=torch.float64).to(device)
            B = torch.randn(d, r, generator=g, dtype=torch.float64).to(device)
            delta = LoraDelta(A, B, 1.0)
            spectrum(delta)  # warm-up
            t_fast, s_fast = _time(lambda: spectrum(delta), args.fast_reps, device)
            dense_reps = args.dense_reps if d < 2048 else 1
            t_dense, s_dense = _time(lambda: torch.linalg.svdvals(B @ A), dense_reps, device)
            rel = float(((s_fast - s_dense[:r]).abs() / s_dense[:r]).max())
            rows.append(dict(d=d, r=r, factors_s=t_fast, dense_s=t_dense, ratio=t_dense / t_fast,
                             max_rel_diff=rel, fast_reps=args.fast_reps, dense_reps=dense_reps))
            print(f"{d:>5} {r:>3} {1e3 * t_fast:>11.3f} {t_dense:>9.3f} {t_dense / t_fast:>9.0f} {rel:>13.2e}",
                  flush=True)
    res = dict(benchmark="bench_spectrum", device=str(device), dtype="float64",
               torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
               rows=rows)
    atomic_write_text(args.out, json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
