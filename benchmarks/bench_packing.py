"""Packed rows against right padding in LoRA training, side by side in one run, on *this* CPU.

``train_expert`` with the study's recipe (LoRA r=8 on the seven projections, LoRA+, batch 16) on
the two-hop world's D1 ∪ D2 ∪ D_AC pairs (joint_all's data: 8-22 tokens an example), once per
layout and precision: right-padded to the batch's longest example (``packing=False``), and packed
into rows of 1x, 2x (the default, ``PACK_ROW_FACTOR``), 3x and 4x the longest. Reported: median seconds an optimiser step after a warm-up, the speed-up over padding, and
the tokens a step computes (padding included) over the real tokens. Every row carries the CPU
model, torch's capability string and the bf16 flags.

    python benchmarks/bench_packing.py                    # SmolLM2, fp32 and bf16, 1 thread, ~6 min
    python benchmarks/bench_packing.py --precision fp32   # one precision (an AVX2-only CPU)
    python benchmarks/bench_packing.py --quick            # tiny-llama, seconds

To time an AVX2-only processor on an AVX-512 one, run it with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` (README, "An AVX2-only CPU").
Writes ``benchmarks/results/bench_packing.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from gpu.measure import save_json  # noqa: E402

LAYOUTS = {"padded": None, "packed 1x": 1, "packed 2x": 2, "packed 3x": 3, "packed 4x": 4}


def tokens_per_step(pairs, tok, factor: int | None, batch_size: int = 16) -> tuple[int, int]:
    """(tokens computed, real tokens) over epoch 0's batches in this layout."""
    from interp.adapters.train import _batch, _encode, _packed_batch, epoch_batches

    enc = _encode(tok, pairs, False)
    computed = real = 0
    for idx in epoch_batches(len(enc), batch_size, 0, 0):
        ids = _batch(enc, idx, 0)[0] if factor is None else _packed_batch(enc, idx, 0, factor)[0]
        computed += ids.numel()
        real += sum(len(enc[i][0]) + len(enc[i][1]) for i in idx)
    return computed, real


def step_seconds(model: str, pairs, precision: str, factor: int | None, steps: int, warmup: int) -> float:
    """Median seconds per optimiser step of ``train_expert`` in one layout, after ``warmup`` steps."""
    import interp.adapters.train as T
    from interp.adapters.recipe import TrainConfig

    cfg = TrainConfig(max_steps=warmup + steps, precision=precision, checkpoint_every=0, packing=factor is not None)
    old = T.PACK_ROW_FACTOR
    T.PACK_ROW_FACTOR = factor or old
    ends: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    try:
        meta = T.train_expert(model, pairs, tmp / "e", cfg, progress=False,
                              callback=lambda s, l: ends.append(time.perf_counter()))
    finally:
        T.PACK_ROW_FACTOR = old
        shutil.rmtree(tmp, ignore_errors=True)
    if meta["packed"] != (factor is not None):
        raise RuntimeError(f"{model}: packing was turned off by train_expert's check")
    return statistics.median(b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:]))


def main(argv=None) -> dict:
    from interp.hardware import cpu_description
    from interp.models import load_hf
    from interp.tasks.two_hop import make_world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: what each of make demo's two processes gets on 2 cores)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_packing.json"))
    a = ap.parse_args(argv)
    model = a.model or ("tiny-llama" if a.quick else "smollm2-135m")
    steps = a.steps or (3 if a.quick else 10)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    world = make_world(seed=0, n_chains_per_tier=64)
    pairs = [p for split in ("d1", "d2", "d_ac") for p in world.train_pairs(split)]
    _, tok = load_hf(model)
    cpu = cpu_description()
    rows = []
    for precision in (("fp32", "bf16") if a.precision == "both" else (a.precision,)):
        base = None
        for name, factor in LAYOUTS.items():
            s = step_seconds(model, pairs, precision, factor, steps, warmup=2)
            base = base or s
            computed, real = tokens_per_step(pairs, tok, factor)
            rows.append({"precision": precision, "layout": name, "step_s": round(s, 4),
                         "speedup_vs_padded": round(base / s, 3), "tokens_computed_over_real": round(computed / real, 3),
                         "threads": torch.get_num_threads(), "base_model": model, "cpu": cpu})
            print(f"{precision:5s} {name:16s} {s:7.3f} s/step  x{base / s:4.2f}  tokens/real {computed / real:.2f}",
                  flush=True)
    save_json({"rows": rows}, a.out)
    return {"rows": rows}


if __name__ == "__main__":
    main()
