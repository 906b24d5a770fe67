"""Each analysis engine in fp32, TF32 and bf16 on one model, compared with fp32 table by table.

A random-init model of ``--shape`` (interp's byte tokenizer, :func:`arch.register_text`) answers
two-hop queries of a synthetic world: scoring, EntRec, Patchscope, resid_pre activation patching,
back-patching, attention knockout, probes (``--probe-layers``) and the key overlap κ of a seeded
random expert (``--kappa-modules``), as the study's steps call them; each engine's seconds per precision.
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


def tables(hm, world, n: int, probe_layers: list[int], seconds: dict[str, float] | None = None,
           kappa: dict | None = None) -> dict[str, pd.DataFrame]:
    """Each engine's table on ``hm``; ``seconds`` (if given) receives each engine's wall seconds
    (CUDA synchronised); ``kappa``: ``{module: LoraDelta}`` of an expert for the key overlap κ."""
    import torch

    from interp.evaluate import score_examples
    from interp.mechanisms import lens, patching
    from interp.mechanisms.patchscope import patchscope
    from interp.mechanisms.probes import probe_bridge_entity

    test = [e for e in world.get(split="test", kind="two_hop") if e.template_id == 0]
    exs = test[:n]
    probe_exs = [e for e in world.get(split="test", kind="two_hop") if e.tier in ("H", "R")]
    jobs = {"scores": lambda: score_examples(hm, test, batch_size=64).assign(method="m", hop="two_hop"),
            "lens": lambda: lens.entrec(hm, exs),
            "patchscope": lambda: patchscope(hm, exs[:4], source_position="final", progress=False),
            "backpatch": lambda: patching.back_patching(hm, exs[:4], progress=False),
            "knockout": lambda: patching.attention_knockout(hm, exs[:4], window=3, progress=False),
            "patching": lambda: patching.activation_patching(
                hm, patching.make_corrupted_pairs(test, hm, seed=0)[:4], hooks=("resid_pre",), progress=False),
            "probes": lambda: probe_bridge_entity(hm, probe_exs, layers=probe_layers, n_splits=3, seed=0, estimator="ridge",
                                                  progress=False)}
    if kappa is not None:
        from interp.subspace import key_overlap_table

        native = [e.prompt for e in world.get(split="eval", kind="hop2") if e.template_id == 0][:64]
        jobs["subspace_key_overlap"] = lambda: key_overlap_table(hm, kappa, [e.prompt for e in test[:64]], native)
    out = {}
    for name, job in jobs.items():
        t = time.perf_counter()
        out[name] = job()
        if hm.device.type == "cuda":
            torch.cuda.synchronize(hm.device)
        if seconds is not None:
            seconds[name] = round(time.perf_counter() - t, 2)
        print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
    return {k: v.assign(method="m") if "method" not in v.columns and k != "subspace_key_overlap" else v
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen2.5-1.5b-shape")
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--n", type=int, default=12, help="queries for the lens")
    ap.add_argument("--probe-layers", default="0,9,18,27")
    ap.add_argument("--kappa-modules", default="v_proj,down_proj",
                    help="projections of the random expert whose key overlap κ is compared ('' for none)")
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
    res: dict = {"shape": a.shape, "weights": "random-init (speed does not depend on weight values)",
                 "device": a.device, "seconds": {}, "engine_seconds": {}, "errors": {}}
    kappa = random_expert(a.shape, a.kappa_modules) if a.kappa_modules else None
    for prec in a.precisions.split(","):
        hm = load_model(key, device=a.device, dtype=ANALYSIS_DTYPES[prec])
        t = time.perf_counter()
        res["engine_seconds"][prec] = {}
        with analysis_precision(prec, a.device):
            tabs = tables(hm, world, a.n, layers, res["engine_seconds"][prec], kappa)
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


def random_expert(shape: str, modules: str, r: int = 8, seed: int = 0) -> dict:
    """A seeded random rank-``r`` LoRA ``{module: LoraDelta}`` (fp32, CPU) on the ``modules``
    (comma-separated projection names) of every layer of ``shape``: the B→C expert of the key
    overlap κ (its value does not matter for a precision comparison, only that it is fixed)."""
    import torch

    from interp.adapters.factors import LoraDelta

    cfg = arch.config(shape)
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    io = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
          "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    where = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for m in modules.split(","):
            d_out, d_in = io[m]
            out[f"model.layers.{layer}.{where[m]}.{m}"] = LoraDelta(
                A=torch.randn(r, d_in, generator=g) / d_in ** 0.5, B=0.05 * torch.randn(d_out, r, generator=g),
                scale=2.0)
    return out


if __name__ == "__main__":
    main()
