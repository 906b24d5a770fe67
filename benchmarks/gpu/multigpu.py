"""Scale-out over the GPUs of one host with torch.distributed (launched by ``torchrun``).

Two jobs, each sharded by rank (rank ``k`` of ``W`` takes items ``k, k+W, k+2W, …``), results
gathered with ``torch.distributed.all_gather_object``:

1. a resid_pre layer × position patching sweep over many prompts
   (``interp.mechanisms.patching.patch_layer_pos``, prompts in chunks of ``--prompt-chunk``);
2. the training of a library of LoRA experts (``interp.adapters.train.train_expert``, one expert
   per item, each on its own synthetic facts).

Every rank builds the same seeded random-init model of a real shape on its own GPU. Timed regions
start and end at a barrier, so a job's time is the slowest rank's. Rank 0 writes the gathered
grid and losses (``--save``) so a 1-process and a 2-process run can be compared, and a JSON
summary to ``--out``.

    torchrun --nproc_per_node 2 benchmarks/gpu/multigpu.py --out $OUT/multigpu_w2.json
    torchrun --nproc_per_node 2 benchmarks/gpu/multigpu.py --small     # 2 CPU processes, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

from gpu import arch  # noqa: E402
from gpu.bench_patching_gpu import sweep  # noqa: E402


def timed_barrier(fn):
    dist.barrier()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shape on the CPU (gloo)")
    ap.add_argument("--shape", default="qwen2.5-0.5b-shape")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--prompt-chunk", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save", default=None, help="rank 0 saves gathered results here (torch.save)")
    ap.add_argument("--compare", default=None, help="rank 0 compares with results saved by another run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.small
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{local}" if cuda else "cpu"
    if a.small:
        a.shape, a.prompts, a.positions, a.prompt_chunk, a.max_batch, a.experts, a.steps = \
            "tiny-shape", 12, 6, 4, 32, 4, 3
    summary = {"world_size": world, "shape": a.shape, "device": torch.cuda.get_device_name(local) if cuda else "cpu"}

    # ---- 1. patching sweep sharded over prompts --------------------------------------------------
    t0 = time.perf_counter()
    hm = arch.hooked(a.shape, device)
    summary["build_s_rank0"] = time.perf_counter() - t0
    clean, corr, ca, xa = arch.random_pairs(hm.d_vocab, a.prompts, a.positions)
    mine = torch.arange(rank, a.prompts, world)
    args = [t[mine].to(device) for t in (clean, corr, ca, xa)]
    sweep(hm, *[x[:2] for x in args], a.max_batch)  # warm-up
    grid, secs = timed_barrier(lambda: sweep(hm, *args, a.max_batch, a.prompt_chunk).cpu())
    parts = [None] * world
    dist.all_gather_object(parts, (mine.tolist(), grid))
    full = torch.empty(grid.shape[0], grid.shape[1], a.prompts)
    for idx, g in parts:
        full[:, :, idx] = g
    summary["patching"] = {"prompts": a.prompts, "positions": a.positions, "layers": hm.n_layers,
                           "prompt_chunk": a.prompt_chunk, "max_batch": a.max_batch, "seconds": secs,
                           "patches_per_s": hm.n_layers * a.positions * a.prompts / secs}
    del hm
    if cuda:
        torch.cuda.empty_cache()

    # ---- 2. a library of experts sharded over ranks ---------------------------------------------
    from interp.adapters.train import TrainConfig, train_expert

    key = arch.register(a.shape, device)
    V = arch.config(a.shape).vocab_size
    cfg = TrainConfig(r=8, lora_alpha=16, batch_size=16, max_steps=a.steps, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix=f"lib-r{rank}-"))

    def train_mine():
        out = {}
        for e in range(rank, a.experts, world):
            ex = arch.word_examples(V, 64, 48, 1, seed=100 + e)
            meta = train_expert(key, ex, tmp / f"expert{e}", cfg, progress=False, device=device)
            out[e] = meta["losses"]
        return out

    losses, secs = timed_barrier(train_mine)
    parts = [None] * world
    dist.all_gather_object(parts, losses)
    all_losses = {e: l for p in parts for e, l in p.items()}
    summary["library"] = {"experts": a.experts, "steps": a.steps, "batch": 16, "seconds": secs,
                          "experts_per_min": a.experts / secs * 60,
                          "final_losses": [all_losses[e][-1] for e in range(a.experts)]}
    if rank == 0:
        if a.save:
            torch.save({"grid": full, "losses": all_losses}, a.save)
        if a.compare and os.path.isfile(a.compare):
            ref = torch.load(a.compare)
            summary["patching"]["max_abs_diff_vs_compare"] = float((ref["grid"] - full).abs().max())
            summary["library"]["max_abs_diff_losses_vs_compare"] = max(
                abs(x - y) for e in all_losses for x, y in zip(all_losses[e], ref["losses"][e]))
        if a.out:
            Path(a.out).write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
