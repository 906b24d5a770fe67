"""Benchmark: scoring prompts with a merged LoRA library on SmolLM2, and back-patching.

1. **Scoring** (``interp.evaluate.score_examples``, the study's evaluation) of the Uniform merge of
   two rank-8 experts on all 7 projections, three ways in one process on the same prompts:
   ``fold_static_update`` (ours: ΔW folded into the weights), the hooked runtime unfolded (per-adapter
   hook points live), and peft's own forward of the same merge (``add_weighted_adapter`` with
   ``combination_type="cat"``, exact in ΔW space) as the baseline. Max abs diff of the
   answer-position log-probs against peft.
2. **Back-patching** (``interp.mechanisms.patching.back_patching``) against a plain TransformerLens
   loop: one hooked forward of the whole batch per (source, target) cell, which writes the
   final-position ``resid_pre[ℓs]`` into ``resid_pre[ℓt]``; both on the same prompts and cells
   (every ``--stride``-th layer), max abs diff of the first-answer-token log-probs.

Usage: python benchmarks/bench_inference.py [--n 96] [--n-backpatch 12] [--stride 3]
Writes benchmarks/results/bench_inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Louis"]
PLACES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Cairo", "Lima"]


@dataclass
class Ex:
    prompt: str
    answer: str


def examples(n: int) -> list[Ex]:
    out = []
    for i in range(n):
        name, place = NAMES[i % len(NAMES)], PLACES[(i // len(NAMES)) % len(PLACES)]
        out.append(Ex(f"{name} was born in {place}. The country where {name} was born is called",
                      " France" if i % 2 else " Spain"))
    return out


def timed(fn, reps: int = 2):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_scoring(n: int, tmp: Path) -> dict:
    from peft import PeftModel

    from interp.adapters import fold_static_update, load_hooked, make_random_adapter
    from interp.evaluate import score_examples
    from interp.models import load_hf

    ads = {k: str(make_random_adapter("smollm2-135m", tmp / k, r=8, seed=s, b_std=0.02)) for k, s in (("a", 1), ("b", 2))}
    exs = examples(n)
    hm = load_hooked("smollm2-135m", ads, combine="uniform")

    def folded():
        with fold_static_update(hm) as ok:
            assert ok
            return score_examples(hm, exs, batch_size=32)

    t_fold, s_fold = timed(folded)
    t_hook, s_hook = timed(lambda: score_examples(hm, exs, batch_size=32))
    del hm
    hf, _ = load_hf("smollm2-135m")
    pm = PeftModel.from_pretrained(hf, ads["a"], adapter_name="a")
    pm.load_adapter(ads["b"], adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "uniform", combination_type="cat")
    pm.set_adapter("uniform")
    pm.eval()
    base = load_hooked("smollm2-135m", {"a": ads["a"]})  # tokenizer / encode only

    @torch.no_grad()
    def peft_scores():
        lp = []
        for b in range(0, n, 32):
            batch = exs[b:b + 32]
            ids = [base.encode(e.prompt) + base.encode(e.answer) for e in batch]
            width = max(map(len, ids))
            toks = torch.full((len(ids), width), base.pad_token_id, dtype=torch.long)
            for i, r in enumerate(ids):
                toks[i, :len(r)] = torch.tensor(r)
            logp = torch.log_softmax(pm(input_ids=toks).logits.float(), -1)
            for i, e in enumerate(batch):
                p, a = base.encode(e.prompt), base.encode(e.answer)
                lp.append(float(sum(logp[i, len(p) - 1 + j, a[j]] for j in range(len(a)))))
        return lp

    t_peft, s_peft = timed(peft_scores)
    diff = max(abs(a - b) for a, b in zip(s_fold["answer_logprob"], s_peft))
    diff_hook = max(abs(a - b) for a, b in zip(s_hook["answer_logprob"], s_peft))
    return {"n_prompts": n, "fold_s": t_fold, "hooked_s": t_hook, "peft_s": t_peft,
            "speedup_fold_vs_peft": t_peft / t_fold, "speedup_fold_vs_hooked": t_hook / t_fold,
            "max_abs_diff_fold_vs_peft": diff, "max_abs_diff_hooked_vs_peft": diff_hook}


def bench_backpatch(n: int, stride: int) -> dict:
    from interp.mechanisms.patching import back_patching
    from interp.models import load_model

    hm = load_model("smollm2-135m")
    exs = examples(n)
    L = hm.n_layers
    layers = list(range(0, L, stride))
    t_ours, df = timed(lambda: back_patching(hm, exs, source_layers=layers, target_layers=layers, progress=False), 1)

    toks, lengths = hm.tokenize([e.prompt for e in exs])
    fin = lengths - 1
    ar = torch.arange(len(exs))
    ans = torch.tensor([hm.encode(e.answer)[0] for e in exs])

    @torch.no_grad()
    def tl_loop():
        _, cache = hm.bridge.run_with_cache(toks, names_filter=lambda name: name.endswith("hook_resid_pre"))
        out = {}
        for lt in layers:
            for ls in layers:
                if ls < lt:
                    continue
                src = cache[f"blocks.{ls}.hook_resid_pre"][ar, fin].clone()

                def hook(act, hook, src=src):
                    act[ar, fin] = src
                    return act

                logits = hm.bridge.run_with_hooks(toks, fwd_hooks=[(f"blocks.{lt}.hook_resid_pre", hook)])
                lp = torch.log_softmax(logits[ar, fin].float(), -1)[ar, ans]
                for b in range(len(exs)):
                    out[(b, ls, lt)] = float(lp[b])
        return out

    t_tl, ref = timed(tl_loop, 1)
    diff = max(abs(r.logprob - ref[(int(r.example_id), int(r.source_layer), int(r.target_layer))])
               for r in df.itertuples())
    return {"n_prompts": n, "layers": layers, "cells": int(len(df) // n), "ours_s": t_ours, "tl_s": t_tl,
            "speedup": t_tl / t_ours, "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--n-backpatch", type=int, default=12)
    ap.add_argument("--stride", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_inference.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        scoring = bench_scoring(a.n, Path(d))
    res = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "host": f"{platform.node()} ({os.cpu_count()} cores)", "loadavg_start": os.getloadavg(),
           "scoring": scoring, "backpatch": bench_backpatch(a.n_backpatch, a.stride),
           "loadavg_end": os.getloadavg()}
    tmp = Path(a.out + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(a.out)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
