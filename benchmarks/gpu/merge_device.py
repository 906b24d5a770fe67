"""TIES / DARE / SVD merges on the GPU against the same merges on the CPU, at real widths.

Two random rank-``--rank`` experts on ``--modules`` modules of the given widths (default: the
Qwen2.5-1.5B shapes of q_proj 1536×1536, k_proj 256×1536, gate_proj 8960×1536, down_proj
1536×8960); each merge run with the factors on the CPU and on ``--device``; the dense merged ΔW
compared (max |Δ| relative to max |ΔW|), with the seconds of each.

    python benchmarks/gpu/merge_device.py --out $OUT/merge_device.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"q_proj": (1536, 1536), "k_proj": (256, 1536), "gate_proj": (8960, 1536), "down_proj": (1536, 8960)}


def experts(rank: int, shapes: dict, seed: int = 0):
    from interp.adapters.factors import LoraDelta

    g = torch.Generator().manual_seed(seed)
    return [{m: LoraDelta(torch.randn(rank, d_in, generator=g) * 0.02, torch.randn(d_out, rank, generator=g) * 0.02, 2.0)
             for m, (d_out, d_in) in shapes.items()} for _ in range(2)]


def run(device: str, rank: int, shapes: dict) -> dict:
    from interp.adapters.merge import dare, svd_merge, ties

    cpu = experts(rank, shapes)
    dev = [{m: d.to(device) for m, d in e.items()} for e in cpu]
    out = {}
    for name, fn in (("ties", lambda ex: ties(ex, 0.5, [1.0, 1.0])), ("dare", lambda ex: dare(ex, 0.5, 0)),
                     ("svd", lambda ex: svd_merge(ex, [0.5, 0.5], rank)[0])):
        t = time.perf_counter()
        mc = fn(cpu)
        tc = time.perf_counter() - t
        fn(dev)  # warm-up (cuSOLVER handles)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        t = time.perf_counter()
        md = fn(dev)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        td = time.perf_counter() - t
        diff = max(float((mc[m].dense() - md[m].to("cpu").dense()).abs().max() / mc[m].dense().abs().max())
                   for m in mc)
        out[name] = {"cpu_s": round(tc, 3), "device_s": round(td, 3), "max_rel_diff": diff,
                     "device_of_result": str(next(iter(md.values())).A.device)}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shapes = {m: (s[0] // 32, s[1] // 32) for m, s in SHAPES.items()} if a.small else SHAPES
    res = {"device": a.device, "rank": a.rank, "shapes": shapes, "merges": run(a.device, a.rank, shapes)}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
