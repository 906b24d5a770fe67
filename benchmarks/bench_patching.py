"""Benchmark: resid_pre layer × position patching on SmolLM2 — ours vs TransformerLens.

TransformerLens's ``get_act_patch_resid_pre`` runs one full forward per (layer, position). Ours
(:func:`interp.mechanisms.patching.patch_layer_pos`) batches patched copies, starts each forward
at the patched block and reuses the corrupted keys/values. Both run in this one process on the
same 8 prompts (equality checked per example); ours also on 32 prompts. Peak memory is the
process's resident-set high-water mark (``ru_maxrss``) growth during each run, measured in
separate subprocesses so one run's peak cannot hide another's.

Usage: python benchmarks/bench_patching.py [--n-tl 8] [--n-ours 32]
Writes benchmarks/results/bench_patching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Karen", "Louis", "Maria", "Nancy", "Oscar", "Peter", "Rachel", "Steve", "Tina", "Victor",
         "Wendy", "Xavier", "Yvonne", "Zack", "Anna", "Brian", "Chris", "Diana", "Edward", "Fiona",
         "George", "Helen"]
CITIES = [" Paris", " London", " Berlin", " Madrid", " Rome", " Tokyo"]


def prompts(hm, n):
    """n equal-length (~10 token) clean/corrupted prompt pairs with distinct answers."""
    out, lens = [], {}
    for i, name in enumerate(NAMES):
        for other in NAMES:
            if other == name:
                continue
            c = f"The capital of the country where {name} lives is"
            x = f"The capital of the country where {other} lives is"
            if len(hm.encode(c)) == len(hm.encode(x)):
                out.append((c, x, CITIES[i % 6], CITIES[(i + 1) % 6]))
                break
    length = {}
    for c in out:
        length.setdefault(len(hm.encode(c[0])), []).append(c)
    best = max(length.values(), key=len)
    if len(best) < n:
        best = (best * ((n // len(best)) + 1))
    return best[:n]


def run(mode: str, n: int) -> dict:
    from interp.models import load_model
    from interp.mechanisms.patching import patch_layer_pos

    torch.manual_seed(0)
    hm = load_model("smollm2-135m")
    pairs = prompts(hm, n)
    ct, cl = hm.tokenize([p[0] for p in pairs])
    xt, _ = hm.tokenize([p[1] for p in pairs])
    ca = torch.tensor([hm.encode(p[2])[0] for p in pairs])
    xa = torch.tensor([hm.encode(p[3])[0] for p in pairs])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if mode == "tl":
        from transformer_lens.patching import get_act_patch_resid_pre
        fin, ar = cl - 1, torch.arange(n)
        with torch.no_grad():
            _, cache = hm.bridge.run_with_cache(ct)
            vals = get_act_patch_resid_pre(
                hm.bridge, xt, cache, lambda lg: lg[ar, fin, ca] - lg[ar, fin, xa],
                reduce="none").values
    else:
        vals = patch_layer_pos(hm, ct, xt, ca, xa, cl, max_batch=int(mode.split(":")[1]),
                               progress=False).logit_diff
    secs = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n_prompts": n, "n_tokens": int(ct.shape[1]), "seconds": secs,
            "peak_rss_growth_mib": (rss1 - rss0) / 1024, "values": vals.tolist()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-tl", type=int, default=8)
    ap.add_argument("--n-ours", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run(a.child[0], int(a.child[1]))))
        return

    def child(mode, n):
        r = subprocess.run([sys.executable, __file__, "--child", mode, str(n)], check=True,
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return json.loads(r.stdout.strip().splitlines()[-1])

    ours_mode = f"ours:{a.max_batch}"
    tl = child("tl", a.n_tl)
    ours8 = child(ours_mode, a.n_tl)
    ours32 = child(ours_mode, a.n_ours)
    diff = (torch.tensor(tl["values"]) - torch.tensor(ours8["values"])).abs().max().item()
    res = {
        "model": "smollm2-135m", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "note": f"load average {os.getloadavg()[0]:.2f} at start",
        "n_layers": 30, "n_tokens": tl["n_tokens"], "max_batch": a.max_batch,
        "tl_seconds": tl["seconds"], "ours_seconds_same_prompts": ours8["seconds"],
        "speedup_same_prompts": tl["seconds"] / ours8["seconds"],
        "ours_seconds_n_ours": ours32["seconds"], "n_tl": a.n_tl, "n_ours": a.n_ours,
        "tl_seconds_per_prompt": tl["seconds"] / a.n_tl,
        "ours_seconds_per_prompt_n_ours": ours32["seconds"] / a.n_ours,
        "speedup_per_prompt_n_ours": (tl["seconds"] / a.n_tl) / (ours32["seconds"] / a.n_ours),
        "max_abs_diff_same_prompts": diff, "equal_within_1e-4": diff <= 1e-4,
        "tl_peak_rss_growth_mib": tl["peak_rss_growth_mib"],
        "ours_peak_rss_growth_mib_same_prompts": ours8["peak_rss_growth_mib"],
        "ours_peak_rss_growth_mib_n_ours": ours32["peak_rss_growth_mib"],
    }
    print(json.dumps(res, indent=1))
    out = Path(__file__).parent / "results" / "bench_patching.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
