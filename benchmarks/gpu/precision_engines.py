"""Each analysis engine in fp32, TF32 and bf16 on one model, compared with fp32 table by table.

A random-init model of ``--shape`` (interp's byte tokenizer, :func:`arch.register_text`) answers
two-hop queries of a synthetic world: scoring, EntRec, Patchscope, resid_pre activation patching,
back-patching, attention knockout and probes (``--probe-layers``), as the study's steps call them.
Each precision's tables go to ``DIR/<precision>/results/*.csv`` and are compared with fp32's by
``benchmarks/precision_compare.py``. TF32 only on CUDA (fp32 weights, TF32 matmuls).

    python benchmarks/gpu/precision_engines.py --out $OUT/precision_engines.json
    python benchmarks/gpu/precision_engines.py --device cpu --shape tiny-shape --precisions fp32,bf16   # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from gpu import arch  # noqa: E402

import precision_compare  # noqa: E402


def tables(hm, world, n: int, probe_layers: list[int]) -> dict[str, pd.DataFrame]:
    from interp.evaluate import score_examples
    from interp.mechanisms import lens, patching
    from interp.mechanisms.patchscope import patchscope
    from interp.mechanisms.probes import probe_bridge_entity

    test = [e for e in world.get(split="test", kind="two_hop") if e.template_id == 0]
    exs = test[:n]
    out = {"scores": score_examples(hm, test, batch_size=64).assign(method="m", hop="two_hop"),
           "lens": lens.entrec(hm, exs), "patchscope": patchscope(hm, exs[:4], source_position="final", progress=False),
           "backpatch": patching.back_patching(hm, exs[:4], progress=False),
           "knockout": patching.attention_knockout(hm, exs[:4], window=3, progress=False)}
    pairs = patching.make_corrupted_pairs(test, hm, seed=0)[:4]
    out["patching"] = patching.activation_patching(hm, pairs, hooks=("resid_pre",), progress=False)
    probe_exs = [e for e in world.get(split="test", kind="two_hop") if e.tier in ("H", "R")]
    out["probes"] = probe_bridge_entity(hm, probe_exs, layers=probe_layers, n_splits=3, seed=0, progress=False)
    return {k: v.assign(method="m") if "method" not in v.columns else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen2.5-1.5b-shape")
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--n", type=int, default=12, help="queries for the lens")
    ap.add_argument("--probe-layers", default="0,9,18,27")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from interp.devices import ANALYSIS_DTYPES, analysis_precision
    from interp.models import load_model
    from interp.study.runner import csv_text
    from interp.tasks.two_hop import make_world

    key = arch.register_text(a.shape, device=a.device)
    world = make_world(seed=0, n_chains_per_tier=16, base=None)
    root = Path(a.dir or tempfile.mkdtemp(prefix="prec-"))
    n_layers = arch.config(a.shape).num_hidden_layers
    layers = [int(x) for x in a.probe_layers.split(",") if int(x) < n_layers] or [0]
    res: dict = {"shape": a.shape, "device": a.device, "seconds": {}, "errors": {}}
    for prec in a.precisions.split(","):
        hm = load_model(key, device=a.device, dtype=ANALYSIS_DTYPES[prec])
        t = time.perf_counter()
        with analysis_precision(prec, a.device):
            tabs = tables(hm, world, a.n, layers)
        res["seconds"][prec] = round(time.perf_counter() - t, 1)
        for name, df in tabs.items():
            p = root / prec / "results" / f"{name}.csv"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(csv_text(df))
        del hm
        if prec != "fp32":
            res["errors"][prec] = precision_compare.compare(root / "fp32", root / prec)
            print(prec, json.dumps(res["errors"][prec]), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
