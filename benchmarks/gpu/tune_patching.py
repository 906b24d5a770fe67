"""How ``max_batch`` and TF32 move our patching sweep on a GPU (same prompts as bench_patching_gpu).

``patch_layer_pos`` packs each copy's own segment (patched position .. final token) into rows
and runs up to ``max_batch`` copies per forward: a small ``max_batch`` launches more (smaller)
forwards, a large one needs more memory per forward. Each setting's grid is compared with the
fp32 ``max_batch=64`` grid. TF32 (``torch.backends.cuda.matmul.allow_tf32``) is tried at each
shape's best ``max_batch``.

    python benchmarks/gpu/tune_patching.py --device cuda --out $OUT/tune_patching.json
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"])
    ap.add_argument("--max-batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--out", default="tune_patching.json")
    a = ap.parse_args(argv)
    res = []
    for shape in a.shapes:
        hm = arch.hooked(shape, a.device)
        clean, corr, ca, xa = (t.to(a.device) for t in arch.random_pairs(hm.d_vocab, a.prompts, a.positions))
        ref = sweep(hm, clean, corr, ca, xa, 64)
        times = {}
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            mbs = a.max_batches if not tf32 else [min(times, key=times.get)[0]]
            for mb in mbs:
                sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2], mb)
                best = float("inf")
                for _ in range(2):
                    sync(a.device)
                    t = time.perf_counter()
                    got = sweep(hm, clean, corr, ca, xa, mb)
                    sync(a.device)
                    best = min(best, time.perf_counter() - t)
                times[(mb, tf32)] = best
                res.append({"shape": shape, "max_batch": mb, "tf32": tf32, "seconds": best,
                            "max_abs_diff_vs_fp32": float((got - ref).abs().max()),
                            "grid_abs_max": float(ref.abs().max())})
                print(res[-1], flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        del hm
        torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
