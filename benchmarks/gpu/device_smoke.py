"""Every analysis on one GPU: load_hooked + merges + fold + scoring + patching on CUDA, and rows
at a real shape (random-init weights: speed and memory do not depend on weight values).

``smoke``: a random-init model of ``--shape`` (default Llama-3.2-1B, fp32) and two random
rank-16 all-linear adapters (:func:`interp.adapters.make_random_adapter`); for each combine it
checks that every parameter, LoRA factor, ``info`` delta and cached activation is on the GPU,
that the folded forward equals the hooked one (an independent path: ``W+ΔW`` in the weights vs
``Wx + Σ sBAx`` in hooks), then scores prompts and runs a resid_pre patching sweep.

``bench``: at ``--shape`` (default Llama-3.1-8B) in ``--dtype`` (bf16): time and peak CUDA memory
of load_hooked (Uniform of two rank-16 all-linear adapters; the base built on the GPU once, never
a second copy), fold_static_update, score_examples of ``--n-prompts`` prompts, the patching sweep.

    python benchmarks/gpu/device_smoke.py smoke --out $OUT/smoke.json
    python benchmarks/gpu/device_smoke.py bench --out $OUT/bench8b.json
    python benchmarks/gpu/device_smoke.py smoke --device cpu --shape tiny-shape   # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from gpu import arch  # noqa: E402
from gpu.measure import Peak, device_name, sync  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapters(shape: str, key: str, dtype, d: Path, r: int = 16, n_layers: int | None = None) -> dict[str, str]:
    from interp.adapters import make_random_adapter

    sk = arch.skeleton(shape, dtype, n_layers)  # shapes only: no weights are initialised or sent to the GPU
    out = {n: str(make_random_adapter(key, d / n, r=r, target_modules=ALL_LINEAR, seed=i + 1, hf_model=sk))
           for i, n in enumerate(("ab", "bc"))}
    del sk
    return out


def where(hm) -> dict:
    """Devices and dtypes of everything the hooked model holds (parameters, LoRA factors, deltas)."""
    params = {(str(p.device), str(p.dtype)) for p in hm.hf_model.parameters()}
    lora = {(str(p.device), str(p.dtype)) for n, p in hm.hf_model.named_parameters() if "lora_" in n}
    deltas = set()
    for group in ([hm.info.get("deltas") or {}] + list((hm.info.get("expert_deltas") or {}).values())):
        for dl in group.values():
            deltas |= {str(t.device) for t in (dl.A, dl.B, dl.bias) if t is not None}
    return {"params": sorted(map(list, params)), "lora": sorted(map(list, lora)), "deltas": sorted(deltas)}


def smoke(a) -> dict:
    from interp.adapters import fold_static_update, load_hooked
    from interp.evaluate import score_examples
    from interp.mechanisms.patching import patch_layer_pos
    from interp.tasks.two_hop import Example  # noqa: F401  (score_examples reads .prompt/.answer)

    dev, dt = a.device, getattr(torch, a.dtype)
    # built on the CPU (load_hooked must move it); real widths, --layers layers (CPU init is slow)
    key = arch.register(a.shape, "cpu", dtype=dt, n_layers=a.layers)
    tmp = Path(tempfile.mkdtemp(prefix="smoke-"))
    ads = _adapters(a.shape, key, dt, tmp, n_layers=a.layers)
    res = {"device": device_name(dev), "shape": a.shape, "layers": a.layers, "dtype": a.dtype, "combines": {}}
    V = arch.config(a.shape).vocab_size
    exs = [type("Ex", (), {"prompt": p, "answer": ans})() for p, ans in arch.word_examples(V, 32, 12)]
    for comb in a.combines:
        row: dict = {}
        t = time.perf_counter()
        hm = load_hooked(key, ads, combine=comb, device=dev, dtype=dt)
        sync(dev)
        row["load_s"] = round(time.perf_counter() - t, 2)
        row["where"] = where(hm)
        toks, _ = hm.tokenize([e.prompt for e in exs[:4]])
        with torch.no_grad():
            logits, cache = hm.bridge.run_with_cache(toks)
        row["cache"] = sorted({f"{v.device}/{v.dtype}" for v in cache.values() if v.is_floating_point()})
        row["n_delta_hooks"] = sum(".lora." in k for k in cache.keys())
        del cache
        with fold_static_update(hm) as folded, torch.no_grad():
            lf = hm.logits(toks)
        row["folded"] = bool(folded)
        row["fold_vs_hooked_max_abs"] = float((lf - logits).abs().max())
        row["logit_scale"] = float(logits.abs().max())
        with Peak(dev) as pk:
            t = time.perf_counter()
            with fold_static_update(hm):
                sc = score_examples(hm, exs, batch_size=16)
            sync(dev)
        row["score_s"], row["score_peak_mib"] = round(time.perf_counter() - t, 3), round(pk.mib)
        row["score_n"] = len(sc)
        clean, corr, ca, xa = (x.to(dev) for x in arch.random_pairs(V, 4, 12))
        t = time.perf_counter()
        g = patch_layer_pos(hm, clean, corr, ca, xa, progress=False)
        sync(dev)
        row["patch_s"] = round(time.perf_counter() - t, 3)
        row["patch_grid"] = list(g.value.shape)
        row["patch_device"] = str(g.value.device)
        res["combines"][comb] = row
        print(comb, json.dumps(row), flush=True)
        del hm, g, logits, lf
        torch.cuda.empty_cache() if dev.startswith("cuda") else None
    return res


def bench(a) -> dict:
    from interp.adapters import fold_static_update, load_hooked
    from interp.evaluate import score_examples
    from interp.mechanisms.patching import patch_layer_pos

    dev, dt = a.device, getattr(torch, a.dtype)
    key = arch.register(a.shape, dev, dtype=dt)  # built on the GPU in dt: one copy, never moved
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    t = time.perf_counter()
    ads = _adapters(a.shape, key, dt, tmp)
    rows = {"device": device_name(dev), "shape": a.shape, "dtype": a.dtype, "adapters_write_s":
            round(time.perf_counter() - t, 1), "rank": 16, "targets": "all-linear", "combine": "uniform"}
    with Peak(dev) as pk:
        t = time.perf_counter()
        hm = load_hooked(key, ads, combine="uniform", device=dev, dtype=dt)
        sync(dev)
    rows["load_hooked"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib)}
    rows["weights_mib"] = round(sum(p.numel() * p.element_size() for p in hm.hf_model.parameters()) / 2**20)
    rows["where"] = where(hm)
    print(json.dumps(rows), flush=True)
    with Peak(dev) as pk:
        t = time.perf_counter()
        with fold_static_update(hm) as folded:
            sync(dev)
            rows["fold"] = {"s": round(time.perf_counter() - t, 2), "folded": bool(folded)}
    rows["fold"]["peak_mib"] = round(pk.mib)  # fold and unfold (the float64 ΔW of one site at a time)
    V = arch.config(a.shape).vocab_size
    exs = [type("Ex", (), {"prompt": p, "answer": ans})() for p, ans in arch.word_examples(V, a.n_prompts, 24, 2)]
    from interp.adapters import hooks

    probe = {n: p.detach().clone() for n, p in list(hm.hf_model.named_parameters())[:40] if "base_layer" in n}
    for label, fold in (("score_folded", True), ("score_folded_host", "host"), ("score_hooked", False)):
        park = hooks._park_originals_on_host
        if fold == "host":  # force the low-memory path: originals wait in host memory while folded
            hooks._park_originals_on_host = lambda ws: True
        with Peak(dev) as pk:
            t = time.perf_counter()
            if fold:
                with fold_static_update(hm) as folded:
                    score_examples(hm, exs, batch_size=64)
            else:
                folded = False
                score_examples(hm, exs, batch_size=64)
            sync(dev)
        hooks._park_originals_on_host = park
        live = dict(hm.hf_model.named_parameters())
        rows[label] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib), "n": len(exs),
                       "tokens": 26, "folded": bool(folded),
                       "weights_restored_bit_for_bit": all(torch.equal(live[n], v) for n, v in probe.items())}
        print(label, rows[label], flush=True)
    if a.fold_only:
        return rows
    clean, corr, ca, xa = (x.to(dev) for x in arch.random_pairs(V, a.patch_prompts, 16))
    for rep in range(2):  # the first call includes warm-up
        with Peak(dev) as pk:
            t = time.perf_counter()
            g = patch_layer_pos(hm, clean, corr, ca, xa, progress=False)
            sync(dev)
        rows["patching"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib),
                            "grid": list(g.value.shape), "prompts": a.patch_prompts, "tokens": 16}
    print("patching", rows["patching"], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("smoke", "bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--combines", default="uniform,none,ties,arrow,merge_and_unload")
    ap.add_argument("--n-prompts", type=int, default=256)
    ap.add_argument("--patch-prompts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="smoke: layers of the shape (default all)")
    ap.add_argument("--fold-only", action="store_true", help="bench: only load + fold + scoring (for fp32)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.combines = a.combines.split(",")
    if a.what == "smoke":
        a.shape, a.dtype = a.shape or "llama-3.2-1b-shape", a.dtype or "float32"
        res = smoke(a)
    else:
        a.shape, a.dtype = a.shape or "llama-3.1-8b-shape", a.dtype or "bfloat16"
        res = bench(a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
