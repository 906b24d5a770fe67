"""The whole default study on one GPU with a random-init model of a real shape, then the same
analyses re-run in other precisions for the precision policy.

The model: ``--shape`` (default Qwen2.5-1.5B) with random weights and interp's byte tokenizer
(:func:`arch.register_text`); the config: ``experiments/two_hop.toml``'s defaults with
``world.verify_familiarity = false`` (random weights know no facts) on ``--device``. Steps world →
subspace (figures and report load no model). ``run.json`` gives seconds, GPU utilisation and peak
memory per step. Then for each ``--dtypes`` entry the run directory is copied (world, experts) and
``evaluate, mechanisms, subspace`` re-run with ``evaluation.dtype`` set, and each table compared with
the fp32 one (``benchmarks/precision_compare.py``).

    python benchmarks/gpu/study_gpu.py --out $OUT/study_gpu.json --run-dir /tmp/study15
    python benchmarks/gpu/study_gpu.py --small --device cpu --dtypes bf16    # CPU check, tiny shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from gpu import arch  # noqa: E402

import precision_compare  # noqa: E402

SMALL = {"world.n_chains_per_tier": 4, "world.n_ac_chains_per_tier": 2, "training.epochs": 1,
         "training.min_steps": 2, "mechanisms.n_examples": 2, "mechanisms.n_patching_pairs": 1}
STEPS = ["world", "experts", "evaluate", "mechanisms", "subspace"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen2.5-1.5b-shape")
    ap.add_argument("--run-dir", default="/tmp/study-gpu")
    ap.add_argument("--dtypes", default="tf32,bf16", help="analysis precisions to compare with fp32 ('' for none)")
    ap.add_argument("--training-precision", default="auto")
    ap.add_argument("--small", action="store_true", help="tiny shape and a few chains: a CPU check")
    ap.add_argument("--config", default=None, help="study config (default: the defaults)")
    ap.add_argument("--model", default=None, help="a registered model instead of --shape (e.g. tiny-llama)")
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE (JSON value), repeatable")
    ap.add_argument("--save-run", default=None, help="copy the fp32 run's results and run.json here")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from interp.study import run_study

    shape = "tiny-shape" if a.small else a.shape
    key = a.model or arch.register_text(shape, device=a.device)
    ov = {"world.verify_familiarity": False, "training.precision": a.training_precision}
    if a.small:
        ov.update(SMALL)
    for kv in a.override:
        k, _, v = kv.partition("=")
        ov[k] = json.loads(v)
    run_dir = Path(a.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    res: dict = {"shape": a.model or shape, "device": a.device, "overrides": ov, "config": a.config}
    t = time.perf_counter()
    for step in STEPS:  # one step at a time: run.json is saved after each (a cut-off call keeps them)
        run_study(a.config, out=run_dir, model=key, device=a.device, steps=[step], overrides=ov)
        if a.save_run:
            Path(a.save_run).mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "run.json", Path(a.save_run) / "run.json")
    res["wall_s"] = round(time.perf_counter() - t, 1)
    rj = json.loads((run_dir / "run.json").read_text())
    res.update({k: rj.get(k) for k in ("timings", "gpu", "machine")})
    res["experts"] = json.loads(
        __import__("pandas").read_csv(run_dir / "results" / "experts.csv").to_json(orient="records"))
    print(json.dumps({k: res[k] for k in ("wall_s", "timings", "gpu")}, indent=1), flush=True)
    if a.save_run:
        shutil.copytree(run_dir / "results", Path(a.save_run) / "results", dirs_exist_ok=True)
        shutil.copy(run_dir / "run.json", Path(a.save_run) / "run.json")
    res["precision"] = {}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    for dt in [d for d in a.dtypes.split(",") if d]:
        other = run_dir.with_name(run_dir.name + f"-{dt}")
        shutil.rmtree(other, ignore_errors=True)
        shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("cache"))
        t = time.perf_counter()
        run_study(a.config, out=other, model=key, device=a.device, steps=["evaluate", "mechanisms", "subspace"],
                  overrides={**ov, "evaluation.dtype": dt})
        rj = json.loads((other / "run.json").read_text())
        res["precision"][dt] = {"wall_s": round(time.perf_counter() - t, 1), "timings": rj.get("timings"),
                                "gpu": rj.get("gpu"), "errors": precision_compare.compare(run_dir, other)}
        print(dt, json.dumps(res["precision"][dt], indent=1), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
