"""Back-patching, probes and ΔW spectra at a real shape on one GPU (random-init weights: speed and
memory do not depend on weight values), beside ``device_smoke.py bench``'s rows.

The model: ``--shape`` (default Llama-3.1-8B) with interp's byte tokenizer
(:func:`arch.register_text`), loaded by ``load_hooked`` in ``--dtype`` with a Uniform merge of two
random rank-16 all-linear adapters; the queries: two-hop test queries of a synthetic world
(``make_world``), as the study's mechanisms step uses them. Rows: ``back_patching`` (full
layers × layers grid), ``probe_bridge_entity`` (every layer, ridge, 3 folds) and
``spectra_table`` of the two experts' ΔW (every module, from the factors, on the GPU), each with
seconds and peak CUDA memory (the model included).

    python benchmarks/gpu/bench_mech_8b.py --out $OUT/mech8b.json
    python benchmarks/gpu/bench_mech_8b.py --device cpu --shape tiny-shape --dtype float32   # CPU check
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
from gpu.device_smoke import _adapters  # noqa: E402
from gpu.measure import Peak, device_name, sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3.1-8b-shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n-backpatch", type=int, default=8, help="queries in the back-patching grid")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from interp.adapters import load_hooked
    from interp.mechanisms.patching import back_patching
    from interp.mechanisms.probes import probe_bridge_entity
    from interp.subspace.tables import spectra_table
    from interp.tasks.two_hop import make_world

    dev, dt = a.device, getattr(torch, a.dtype)
    key = arch.register_text(a.shape, device=dev)
    ads = _adapters(a.shape, key, dt, Path(tempfile.mkdtemp(prefix="mech8b-")))
    res: dict = {"device": device_name(dev), "shape": a.shape, "dtype": a.dtype, "rank": 16,
                 "targets": "all-linear", "combine": "uniform"}
    with Peak(dev) as pk:
        t = time.perf_counter()
        hm = load_hooked(key, ads, combine="uniform", device=dev, dtype=dt)
        sync(dev)
    res["load_hooked"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib)}
    print(json.dumps(res), flush=True)
    world = make_world(seed=0, n_chains_per_tier=16, base=None)
    test = [e for e in world.get(split="test", kind="two_hop")]
    few = [e for e in test if e.template_id == 0][: a.n_backpatch]
    probe_exs = [e for e in test if e.tier in ("H", "R")]
    L = hm.n_layers
    for rep in range(2):  # the first includes warm-up
        with Peak(dev) as pk:
            t = time.perf_counter()
            bp = back_patching(hm, few, progress=False)
            sync(dev)
        res["backpatch"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib), "rows": len(bp),
                            "prompts": len(few), "grid": f"{L} × {L} (ℓt ≤ ℓs)",
                            "tokens": int(max(len(hm.tokenize([e.prompt])[0][0]) for e in few))}
    print("backpatch", res["backpatch"], flush=True)
    with Peak(dev) as pk:
        t = time.perf_counter()
        pr = probe_bridge_entity(hm, probe_exs, layers=list(range(L)), n_splits=3, seed=0, progress=False,
                                 estimator="ridge")
        sync(dev)
    res["probes"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib), "rows": len(pr),
                     "examples": len(probe_exs), "layers": L, "estimator": "ridge, 3 folds"}
    print("probes", res["probes"], flush=True)
    deltas = {n: hm.info["expert_deltas"][n] for n in ("ab", "bc")}
    on = sorted({str(d.A.device) for ds in deltas.values() for d in ds.values()})
    with Peak(dev) as pk:
        t = time.perf_counter()
        sp = spectra_table(deltas)
        sync(dev)
    res["spectra"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib), "rows": len(sp),
                      "modules": sum(len(d) for d in deltas.values()), "factors_on": on}
    print("spectra", res["spectra"], flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
