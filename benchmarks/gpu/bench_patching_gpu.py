"""Patching sweep on random-init real-architecture models: ours vs TransformerLens, and scaling.

1. Head to head (fp32, eager attention): ``transformer_lens.patching.get_act_patch_resid_pre``
   (one full bridge forward per (layer, position)) vs ``interp.mechanisms.patching.patch_layer_pos``
   on the same bridge, prompts and metric (per-example logit difference at the final position).
   Max abs difference of the [layers, positions, prompts] grids is reported. Ours (median of
   ``--reps`` runs) is timed with its defaults (max_batch 256 on CUDA, automatic prompt chunk,
   copies whose clean activation equals the corrupted one skipped), again with every copy
   recomputed (``skip_unchanged=False``), with TF32 matmuls, and with the model in bf16; those
   are compared with the fp32 TransformerLens grid (tolerance: the max abs difference relative to
   the largest |value| of the grid, documented, not asserted). TransformerLens is also timed in
   TF32 (the GPU default precision, ``interp.devices.analysis_precision``), for a like-for-like
   speed-up, with its own error against the fp32 grid.
2. Scaling of ours: time and peak memory over layers × positions × prompts, and a log-linear fit
   ``t = k · L^a · T^b · B^c``. ``patch_layer_pos`` caches the clean and corrupted runs of the
   prompts of one chunk, so its memory grows with the chunk; the largest point is also run in
   chunks of ``--prompt-chunk`` and unchunked, for the memory contrast.

    python benchmarks/gpu/bench_patching_gpu.py --device cuda            # H200
    python benchmarks/gpu/bench_patching_gpu.py --small                  # CPU smoke test (tiny shape)

Writes ``$OUT/bench_patching_gpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from gpu import arch  # noqa: E402
from gpu.measure import Peak, device_name, save_json, sync  # noqa: E402


def sweep(hm, clean, corr, ca, xa, max_batch: int | None = None, prompt_chunk: int | None = None,
          skip_unchanged: bool = True) -> torch.Tensor:
    """Our resid_pre sweep ``[layers, positions, prompts]`` (``None``: the engine's defaults)."""
    from interp.mechanisms.patching import patch_layer_pos

    return patch_layer_pos(hm, clean, corr, ca, xa, max_batch=max_batch, progress=False,
                           prompt_chunk=prompt_chunk, skip_unchanged=skip_unchanged).logit_diff


def tl_sweep(hm, clean, corr, ca, xa) -> torch.Tensor:
    """TransformerLens's sweep with the same per-example logit-difference metric, ``[L, T, B]``."""
    from transformer_lens.patching import get_act_patch_resid_pre

    dev = hm.device
    clean, corr, ca, xa = clean.to(dev), corr.to(dev), ca.to(dev), xa.to(dev)
    ar = torch.arange(clean.shape[0], device=dev)
    with torch.no_grad():
        _, cache = hm.bridge.run_with_cache(clean)
        vals = get_act_patch_resid_pre(hm.bridge, corr, cache,
                                       lambda lg: lg[ar, -1, ca] - lg[ar, -1, xa], reduce="none")
    vals = getattr(vals, "values", vals)
    return vals.permute(1, 2, 0) if vals.dim() == 3 and vals.shape[0] == clean.shape[0] else vals


def timed_sweep(device, reps, fn):
    """Median seconds of ``reps`` runs of ``fn`` and the peak memory of the last one."""
    ts = []
    for _ in range(reps):
        with Peak(device) as pk:
            t = time.perf_counter()
            got = fn()
            sync(device)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts), pk.mib, got


def head_to_head(shape: str, device: str, B: int, T: int, bf16: bool = True, reps: int = 3,
                 tf32: bool = True, tl: bool = True, smoke: bool = False) -> dict:
    hm = arch.hooked(shape, device)
    V = hm.d_vocab
    clean, corr, ca, xa = arch.random_pairs(V, B, T)
    clean, corr, ca, xa = (t.to(device) for t in (clean, corr, ca, xa))
    row = {"benchmark": "patching", "model": shape, "n_layers": hm.n_layers, "positions": T, "prompts": B,
           "dtype": "float32", "reps": reps}
    sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2])  # warm-up (kernels, handles)
    sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2], skip_unchanged=False)
    if tl:
        with Peak(device) as pk:
            t = time.perf_counter()
            ref = tl_sweep(hm, clean, corr, ca, xa)
            sync(device)
            row["tl_s"] = time.perf_counter() - t
        row["tl_peak_mib"] = pk.mib
        ref = ref.float()
        if ref.shape != (hm.n_layers, T, B):
            raise RuntimeError(f"TL sweep shape {tuple(ref.shape)} != {(hm.n_layers, T, B)}")
    s, mib, got = timed_sweep(device, reps, lambda: sweep(hm, clean, corr, ca, xa))
    if not tl:
        ref = got.float()
    grid_max = float(ref.abs().max())
    from interp.mechanisms.patching import default_max_batch
    row.update(ours_s=s, ours_peak_mib=mib, best_max_batch=f"default ({default_max_batch(hm, T)})",
               max_abs_diff=float((got.float() - ref).abs().max()), grid_abs_max=grid_max)
    s, mib, got = timed_sweep(device, reps, lambda: sweep(hm, clean, corr, ca, xa, skip_unchanged=False))
    row.update(ours_noskip_s=s, ours_noskip_peak_mib=mib,
               noskip_max_abs_diff=float((got.float() - ref).abs().max()))
    if tl:
        row["speedup"] = row["tl_s"] / row["ours_s"]
        row["noskip_speedup"] = row["tl_s"] / row["ours_noskip_s"]
    cuda = torch.device(device).type == "cuda"
    if tf32 and (cuda or smoke):
        from interp.devices import analysis_precision

        # TF32 for both (interp's switch: matmuls and cuDNN), so both run in the GPU default
        # precision; the errors are against the fp32 reference grid. (--small on a CPU runs this
        # path in fp32, to check the script.)
        with analysis_precision("tf32" if cuda else "fp32", device):
            if tl:
                with Peak(device) as pk:
                    t = time.perf_counter()
                    tl_tf32 = tl_sweep(hm, clean, corr, ca, xa).float()
                    sync(device)
                    row["tl_tf32_s"] = time.perf_counter() - t
                d = float((tl_tf32 - ref).abs().max())
                row.update(tl_tf32_peak_mib=pk.mib, tl_tf32_max_abs_diff_vs_fp32=d,
                           tl_tf32_rel_diff_vs_grid_max=d / max(grid_max, 1e-12))
            sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2])
            s, mib, got = timed_sweep(device, reps, lambda: sweep(hm, clean, corr, ca, xa))
            d = float((got.float() - ref).abs().max())
            row.update(ours_tf32_s=s, ours_tf32_peak_mib=mib, tf32_max_abs_diff_vs_fp32=d,
                       tf32_rel_diff_vs_grid_max=d / max(grid_max, 1e-12))
            if tl:
                row["tf32_speedup"] = row["tl_tf32_s"] / s
    if bf16:
        hm.hf_model.to(torch.bfloat16)
        try:
            sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2])
            s, mib, got = timed_sweep(device, reps, lambda: sweep(hm, clean, corr, ca, xa))
            d = (got.float() - ref).abs().max()
            row.update(ours_bf16_s=s, ours_bf16_peak_mib=mib, bf16_max_abs_diff_vs_fp32=float(d),
                       bf16_rel_diff_vs_grid_max=float(d / max(grid_max, 1e-12)))
        except Exception as e:  # noqa: BLE001 - bf16 is optional; record why
            row["bf16_error"] = repr(e)[:300]
    row["device"] = device_name(device)
    del hm
    if device != "cpu":
        torch.cuda.empty_cache()
    return row


def scaling(shape: str, device: str, points, max_batch: int | None = None) -> list[dict]:
    """Time and peak memory of our sweep at each (L, T, B), with the engine's automatic prompt chunk."""
    from interp.mechanisms.patching import auto_prompt_chunk

    rows, models = [], {}
    for L, T, B in points:
        if L not in models:
            models.clear()
            if device != "cpu":
                torch.cuda.empty_cache()
            models[L] = arch.hooked(shape, device, n_layers=L)
        hm = models[L]
        clean, corr, ca, xa = (t.to(device) for t in arch.random_pairs(hm.d_vocab, B, T))
        sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2], max_batch)
        chunk = auto_prompt_chunk(hm, T, 2 * L)
        with Peak(device) as pk:
            t = time.perf_counter()
            sweep(hm, clean, corr, ca, xa, max_batch)
            sync(device)
            s = time.perf_counter() - t
        rows.append({"layers": L, "positions": T, "prompts": B, "patches": L * T * B, "seconds": s,
                     "peak_mib": pk.mib, "prompt_chunk": chunk if chunk < B else None, "max_batch": max_batch})
        print(f"  scaling L={L} T={T} B={B}: {s:.3f} s, {pk.mib:.0f} MiB (auto chunk {chunk})", flush=True)
    return rows


def chunk_memory(shape: str, device: str, L: int, T: int, B: int, chunks) -> list[dict]:
    """Peak memory and time of one sweep of B prompts in chunks of each size in ``chunks``."""
    hm = arch.hooked(shape, device, n_layers=L)
    clean, corr, ca, xa = (t.to(device) for t in arch.random_pairs(hm.d_vocab, B, T))
    sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2])
    out, ref = [], None
    for c in chunks:
        with Peak(device) as pk:
            t = time.perf_counter()
            got = sweep(hm, clean, corr, ca, xa, None, c)
            sync(device)
            s = time.perf_counter() - t
        ref = got if ref is None else ref
        out.append({"layers": L, "positions": T, "prompts": B, "prompt_chunk": c, "seconds": s,
                    "peak_mib": pk.mib, "above_start_mib": pk.above_start_mib if hasattr(pk, "above_start_mib") else None,
                    "max_abs_diff_vs_first": float((got - ref).abs().max())})
        print(f"  chunk {c}: {s:.3f} s, peak {pk.mib:.0f} MiB", flush=True)
    del hm
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


def fit(rows: list[dict], key: str) -> dict:
    """Least squares of log(key) on log L, log T, log B (+ intercept); also per-axis exponents."""
    import numpy as np

    X = np.array([[1, math.log(r["layers"]), math.log(r["positions"]), math.log(r["prompts"])] for r in rows])
    y = np.array([math.log(r[key]) for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    pred = X @ coef
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    return {"k": float(math.exp(coef[0])), "a_layers": float(coef[1]), "b_positions": float(coef[2]),
            "c_prompts": float(coef[3]), "r2_log": float(r2),
            "formula": f"{key} ≈ {math.exp(coef[0]):.3g} · L^{coef[1]:.2f} · T^{coef[2]:.2f} · B^{coef[3]:.2f}"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shape, small sizes (CPU smoke test)")
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-tl", action="store_true", help="skip the TransformerLens baseline")
    ap.add_argument("--prompt-chunk", type=int, default=64, help="chunk of the memory contrast")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(HERE.parent / "results")),
                                                  "bench_patching_gpu.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.small:
        shapes, B, T = a.shapes or ["tiny-shape"], 4, 6
        scale_shape = "tiny-shape"
        points = [(1, 6, 4), (2, 6, 4), (2, 12, 4), (2, 6, 8), (2, 6, 16)]
        chunk = 4
    else:
        shapes, B, T = a.shapes or ["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"], 8, 16
        scale_shape = "qwen2.5-0.5b-shape"
        points = [(6, 16, 8), (12, 16, 8), (24, 16, 8),          # layers
                  (24, 8, 8), (24, 32, 8), (24, 64, 8),          # positions
                  (24, 16, 32), (24, 16, 128), (24, 16, 512)]    # prompts
        chunk = a.prompt_chunk
    res = {"benchmark": "bench_patching_gpu", "device": device_name(a.device), "torch": torch.__version__,
           "when": f"{time.strftime('%Y-%m-%d')}, one {device_name(a.device)}, torch {torch.__version__}, "
                   "random-init weights of real shapes", "head_to_head": [], "scaling": []}
    for s in shapes:
        row = head_to_head(s, a.device, B, T, reps=a.reps, tl=not a.no_tl, smoke=a.small)
        res["head_to_head"].append(row)
        print(json.dumps(row), flush=True)
    if not a.no_scaling:
        res["scaling"] = scaling(scale_shape, a.device, points)
        res["scaling_fit_time"] = fit(res["scaling"], "seconds")
        res["scaling_fit_memory"] = fit(res["scaling"], "peak_mib")
        print(res["scaling_fit_time"]["formula"], "|", res["scaling_fit_memory"]["formula"], flush=True)
        L, T2, B2 = points[-1]
        res["chunk_memory"] = chunk_memory(scale_shape, a.device, L, T2, B2, [chunk, B2])
        u = res["chunk_memory"][-1]
        res["unchunked_largest"] = {k: u[k] for k in ("layers", "positions", "prompts", "seconds", "peak_mib")}
    return save_json(res, a.out)


if __name__ == "__main__":
    main()
