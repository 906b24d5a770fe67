"""Patching sweep on random-init real-architecture models: ours vs TransformerLens, and scaling.

1. Head to head (fp32, eager attention): ``transformer_lens.patching.get_act_patch_resid_pre``
   (one full bridge forward per (layer, position)) vs ``interp.mechanisms.patching.patch_layer_pos``
   on the same bridge, prompts and metric (per-example logit difference at the final position).
   Max abs difference of the [layers, positions, prompts] grids is reported. Ours is also timed
   with the model in bf16, compared with the fp32 grid (tolerance: the max abs difference relative
   to the largest |clean − corrupted| logit difference of the batch, documented, not asserted).
2. Scaling of ours: time and peak memory over layers × positions × prompts, and a log-linear fit
   ``t = k · L^a · T^b · B^c``. Prompts beyond ``--prompt-chunk`` are processed in chunks
   (``patch_layer_pos`` caches the clean and corrupted runs of all prompts it is given, so its
   memory grows with the prompts; chunking the prompts bounds it; ``max_batch`` bounds the
   patched copies per forward).

    python benchmarks/gpu/bench_patching_gpu.py --device cuda            # H200
    python benchmarks/gpu/bench_patching_gpu.py --small                  # CPU smoke test (tiny shape)

Writes ``$OUT/bench_patching_gpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from gpu import arch  # noqa: E402
from gpu.measure import Peak, device_name, sync  # noqa: E402


def sweep(hm, clean, corr, ca, xa, max_batch: int = 256, prompt_chunk: int | None = None) -> torch.Tensor:
    """Our resid_pre sweep ``[layers, positions, prompts]``, prompts in chunks of ``prompt_chunk``."""
    from interp.mechanisms.patching import patch_layer_pos

    B = clean.shape[0]
    step = prompt_chunk or B
    parts = [patch_layer_pos(hm, clean[s:s + step], corr[s:s + step], ca[s:s + step], xa[s:s + step],
                             max_batch=max_batch, progress=False).logit_diff for s in range(0, B, step)]
    return torch.cat(parts, dim=-1)


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


def head_to_head(shape: str, device: str, B: int, T: int, max_batches=(64, 256), bf16: bool = True) -> dict:
    hm = arch.hooked(shape, device)
    V = hm.d_vocab
    clean, corr, ca, xa = arch.random_pairs(V, B, T)
    clean, corr, ca, xa = (t.to(device) for t in (clean, corr, ca, xa))
    row = {"benchmark": "patching", "model": shape, "n_layers": hm.n_layers, "positions": T, "prompts": B,
           "dtype": "float32"}
    sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2], 64)  # warm-up (kernels, handles)
    with Peak(device) as pk:
        t = time.perf_counter()
        ref = tl_sweep(hm, clean, corr, ca, xa)
        sync(device)
        row["tl_s"] = time.perf_counter() - t
    row["tl_peak_mib"] = pk.mib
    ref = ref.float()
    if ref.shape != (hm.n_layers, T, B):
        raise RuntimeError(f"TL sweep shape {tuple(ref.shape)} != {(hm.n_layers, T, B)}")
    for mb in max_batches:
        with Peak(device) as pk:
            t = time.perf_counter()
            got = sweep(hm, clean, corr, ca, xa, mb)
            sync(device)
            s = time.perf_counter() - t
        row[f"ours_s_max_batch_{mb}"] = s
        row[f"ours_peak_mib_max_batch_{mb}"] = pk.mib
        row[f"max_abs_diff_max_batch_{mb}"] = float((got.float() - ref).abs().max())
    best = min(max_batches, key=lambda mb: row[f"ours_s_max_batch_{mb}"])
    row.update(ours_s=row[f"ours_s_max_batch_{best}"], ours_peak_mib=row[f"ours_peak_mib_max_batch_{best}"],
               best_max_batch=best, max_abs_diff=max(row[f"max_abs_diff_max_batch_{mb}"] for mb in max_batches),
               speedup=row["tl_s"] / row[f"ours_s_max_batch_{best}"])
    row["grid_abs_max"] = float(ref.abs().max())
    if bf16:
        hm.hf_model.to(torch.bfloat16)
        try:
            sweep(hm, clean[:2], corr[:2], ca[:2], xa[:2], 64)
            with Peak(device) as pk:
                t = time.perf_counter()
                got = sweep(hm, clean, corr, ca, xa, best)
                sync(device)
                row["ours_bf16_s"] = time.perf_counter() - t
            row["ours_bf16_peak_mib"] = pk.mib
            d = (got.float() - ref).abs().max()
            row["bf16_max_abs_diff_vs_fp32"] = float(d)
            row["bf16_rel_diff_vs_grid_max"] = float(d / ref.abs().max().clamp_min(1e-12))
        except Exception as e:  # noqa: BLE001 - bf16 is optional; record why
            row["bf16_error"] = repr(e)[:300]
    row["device"] = device_name(device)
    del hm
    if device != "cpu":
        torch.cuda.empty_cache()
    return row


def scaling(shape: str, device: str, points, max_batch: int, prompt_chunk: int | None) -> list[dict]:
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
        chunk = prompt_chunk if prompt_chunk and B > prompt_chunk else None
        with Peak(device) as pk:
            t = time.perf_counter()
            sweep(hm, clean, corr, ca, xa, max_batch, chunk)
            sync(device)
            s = time.perf_counter() - t
        rows.append({"layers": L, "positions": T, "prompts": B, "patches": L * T * B, "seconds": s,
                     "peak_mib": pk.mib, "prompt_chunk": chunk, "max_batch": max_batch})
        print(f"  scaling L={L} T={T} B={B}: {s:.3f} s, {pk.mib:.0f} MiB (chunk {chunk})", flush=True)
    return rows


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
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--prompt-chunk", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(HERE.parent / "results")),
                                                  "bench_patching_gpu.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.small:
        shapes, B, T, mbs = a.shapes or ["tiny-shape"], 4, 6, (16, 64)
        scale_shape, base = "tiny-shape", (2, 6, 4)
        points = [(1, 6, 4), (2, 6, 4), (2, 12, 4), (2, 6, 8), (2, 6, 16)]
        chunk = 8
    else:
        shapes, B, T, mbs = a.shapes or ["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"], 8, 16, (64, 256)
        scale_shape = "qwen2.5-0.5b-shape"
        points = [(6, 16, 8), (12, 16, 8), (24, 16, 8),          # layers
                  (24, 8, 8), (24, 32, 8), (24, 64, 8),          # positions
                  (24, 16, 32), (24, 16, 128), (24, 16, 512)]    # prompts
        chunk = a.prompt_chunk
    res = {"benchmark": "bench_patching_gpu", "device": device_name(a.device), "torch": torch.__version__,
           "head_to_head": [], "scaling": []}
    for s in shapes:
        row = head_to_head(s, a.device, B, T, mbs)
        res["head_to_head"].append(row)
        print(f"{s}: TL {row['tl_s']:.2f} s, ours {row['ours_s']:.3f} s (max_batch {row['best_max_batch']}), "
              f"{row['speedup']:.1f}x, max|diff| {row['max_abs_diff']:.2e}, bf16 {row.get('ours_bf16_s')}", flush=True)
    if not a.no_scaling:
        res["scaling"] = scaling(scale_shape, a.device, points, max(mbs), chunk)
        res["scaling_fit_time"] = fit(res["scaling"], "seconds")
        res["scaling_fit_memory"] = fit(res["scaling"], "peak_mib")
        print(res["scaling_fit_time"]["formula"], "|", res["scaling_fit_memory"]["formula"], flush=True)
        if not a.small:  # bounded memory: the largest prompt count without chunking, for contrast
            L, T2, B2 = points[-1]
            hm = arch.hooked(scale_shape, a.device, n_layers=L)
            clean, corr, ca, xa = (t.to(a.device) for t in arch.random_pairs(hm.d_vocab, B2, T2))
            with Peak(a.device) as pk:
                t = time.perf_counter()
                sweep(hm, clean, corr, ca, xa, max(mbs), None)
                sync(a.device)
            res["unchunked_largest"] = {"layers": L, "positions": T2, "prompts": B2,
                                        "seconds": time.perf_counter() - t, "peak_mib": pk.mib}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
