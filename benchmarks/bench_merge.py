"""Exact ΔW-space Uniform merge + spectrum from factors vs peft's ``svd`` add_weighted_adapter.

Ours: concatenate factors (exact Uniform, interp.adapters.merge.uniform) and take the spectrum by QR of
B and Aᵀ + SVD of the small core (merge.factored_svd), per module. peft: add_weighted_adapter(
combination_type="svd") on a PeftModel (forms each dense ΔW, sums, full SVD, truncates).
Random rank-8 LoRAs, two experts. Prints times and ratio; writes benchmarks/results/bench_merge.json.
Usage: python benchmarks/bench_merge.py [--quick]
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from interp.adapters import merge as M
from interp.adapters.factors import LoraDelta


def build(n_layers, shapes):
    """A bare model of linear layers (no transformer needed for a merge benchmark)."""
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(n_layers):
        blk = nn.Module()
        for name, (i, o) in shapes.items():
            setattr(blk, name, nn.Linear(i, o, bias=False))
        model.layers.append(blk)
    return model


def run(label, n_layers, shapes, r=8, reps=1):
    from peft import LoraConfig, get_peft_model

    model = build(n_layers, shapes)
    cfg = lambda: LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(shapes), init_lora_weights=False)
    pm = get_peft_model(model, cfg(), adapter_name="e1")
    pm.add_adapter("e2", cfg())
    experts = []
    for name in ("e1", "e2"):
        ad = {}
        for path, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                ad[path] = LoraDelta(mod.lora_A[name].weight.detach(), mod.lora_B[name].weight.detach(),
                                     float(mod.scaling[name]))
        experts.append(ad)
    t = time.perf_counter()
    for _ in range(reps):
        merged = M.uniform(experts)
        spectra = {m: M.factored_svd(d)[1] for m, d in merged.items()}
    ours = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for k in range(reps):
        pm.add_weighted_adapter(["e1", "e2"], [0.5, 0.5], f"svd{k}", combination_type="svd", svd_rank=r)
    theirs = (time.perf_counter() - t) / reps
    # sanity: our exact spectrum's top-r energy is what peft's rank-r truncation keeps
    m0 = next(iter(merged))
    return {"label": label, "modules": len(merged), "rank": r, "ours_s": ours, "peft_svd_s": theirs,
            "speedup": theirs / ours, "top_singular_value_module0": float(spectra[m0][0])}


def main():
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    smol = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
            "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    wide = {"q_proj": (4096, 4096), "down_proj": (11008, 4096)}
    cases = [("smollm2-shaped (layers x 7 modules, d=576/1536, r=8)", 6 if quick else 30, smol),
             ("4096-wide (layers x q 4096^2 + down 11008x4096, r=8)", 1 if quick else 2, wide)]
    results = []
    for label, n_layers, shapes in cases:
        r = run(label, n_layers, shapes)
        results.append(r)
        print(f"{r['label']}: ours {r['ours_s']:.3f} s, peft svd {r['peft_svd_s']:.3f} s, "
              f"ratio {r['speedup']:.1f}x ({r['modules']} modules)", flush=True)
    out = Path(__file__).parent / "results" / "bench_merge.json"
    from interp.models import atomic_write_text

    atomic_write_text(out, json.dumps({"quick": quick, "torch_threads": torch.get_num_threads(), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
