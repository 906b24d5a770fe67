"""The tiny study (``experiments/tiny.toml``) on one device, with every model load recorded.

Spies on ``interp.models.load_model`` and ``interp.adapters.load_hooked`` (what ``Run.base`` and
``Run.load_variant`` call) and on ``train_expert``: each call's requested device and the device of
every parameter of the model it returned. Exits non-zero if any model lands off ``--device``.
Writes the spy log, per-step seconds (``run.json``) and peak CUDA memory to ``--out``.

    python benchmarks/gpu/device_study.py --device cuda --run-dir /tmp/tiny --out $OUT/study.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

STEPS = ["world", "experts", "evaluate", "mechanisms", "subspace"]  # figures/report load no model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--run-dir", default="/tmp/tiny-device")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import interp.adapters as ad
    import interp.models as md
    from interp.study import run_study

    log: list[dict] = []
    orig_lm, orig_lh = md.load_model, ad.load_hooked

    def spy(fn, what):
        def wrapped(*args, **kw):
            hm = fn(*args, **kw)
            hf = hm.hf_model if hasattr(hm, "hf_model") else hm[0]
            devs = sorted({str(p.device) for p in hf.parameters()})
            log.append({"call": what, "requested": str(kw.get("device")), "devices": devs,
                        "combine": kw.get("combine")})
            return hm
        return wrapped

    md.load_model = spy(orig_lm, "load_model")
    ad.load_hooked = spy(orig_lh, "load_hooked")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run_study(str(ROOT / "experiments/tiny.toml"), out=a.run_dir, device=a.device, steps=a.steps.split(","))
    wall = time.perf_counter() - t
    run = json.loads((Path(a.run_dir) / "run.json").read_text())
    want = torch.device(a.device)
    off = [e for e in log if any(torch.device(d).type != want.type for d in e["devices"])]
    res = {"device": a.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "wall_s": round(wall, 1), "timings": run.get("timings"), "loads": log, "off_device": off,
           "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
           "experts": [json.loads(p.read_text()).get("precision") for p in
                       sorted(Path(a.run_dir, "adapters").glob("*/interp_meta.json"))][:1]}
    print(json.dumps({k: v for k, v in res.items() if k != "loads"}, indent=1))
    print(f"{len(log)} model loads, {len(off)} off {a.device}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    sys.exit(1 if off or not log else 0)


if __name__ == "__main__":
    main()
