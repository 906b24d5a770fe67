"""Add the one-GPU rows (``device_smoke.py bench``, ``device_study.py``) to ``results/gpu_latest.{json,md}``.

Input: a directory with ``bench8b_bf16.json`` and ``bench8b_fp32.json`` (``device_smoke.py bench``
at the Llama-3.1-8B shape, random-init weights) and ``study_tiny_cuda.json`` (``device_study.py``).
Other rows stay as they were measured; earlier ``one GPU`` rows are replaced.

    python benchmarks/gpu/update_device_rows.py benchmarks/results/device_gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import run_all  # noqa: E402

BENCH = "one GPU"


def _row(case: str, s: float, mib: float | None, note: str) -> dict:
    return {"benchmark": BENCH, "case": case, "ours": s, "baseline": None, "unit": "s", "speedup": None,
            "max_abs_diff": None, "peak_mib_ours": mib, "peak_mib_baseline": None, "target": "", "note": note}


def rows(src: Path) -> list[dict]:
    out = []
    for name in ("bench8b_bf16.json", "bench8b_fp32.json"):
        p = src / name
        if not p.is_file():
            continue
        j = json.loads(p.read_text())
        dt = "bf16" if j["dtype"] == "bfloat16" else "fp32"
        tag = f"{j['shape']} ({dt}), Uniform of 2 r={j['rank']} {j['targets']} adapters"
        out.append(_row(f"load_hooked, {tag}", j["load_hooked"]["s"], j["load_hooked"]["peak_mib"],
                        f"base built on the GPU once (weights {j['weights_mib']:,} MiB), adapters from files"))
        f = j["fold"]
        out.append(_row(f"fold_static_update, {tag}", f["s"], f["peak_mib"],
                        "folded; the originals stay on the GPU to be put back bit for bit, so the peak "
                        "is ≈ 2× the weights (a known cost, not yet offloaded)" if f["folded"] else "not folded: bf16 weights are refused by design "
                        "(rounding would erase ΔW); the context is a no-op"))
        for k in ("score_hooked", "score_folded"):
            if k in j and (k == "score_hooked" or j[k]["folded"]):
                sc = j[k]
                out.append(_row(f"score_examples {sc['n']} prompts × {sc['tokens']} tokens, {tag}"
                                f"{', folded' if sc['folded'] else ', hooked'}", sc["s"], sc["peak_mib"],
                                "batch 64; peak includes the model" +
                                ("; the fold keeps the original weights on the GPU (2× weights)" if sc["folded"] else "")))
        if "patching" in j:
            pt = j["patching"]
            g = pt["grid"]
            out.append(_row(f"patch_layer_pos resid_pre {g[0]} × {g[1]} × {g[2]}, {tag}", pt["s"], pt["peak_mib"],
                            "second of two runs; engine defaults"))
    st = src / "study_tiny_cuda.json"
    if st.is_file():
        j = json.loads(st.read_text())
        t = j["timings"]
        steps = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total_this_invocation")
        out.append(_row(f"tiny study (experiments/tiny.toml) on {j['device']}: {steps} s",
                        t["total_this_invocation"], j["peak_cuda_mib"],
                        f"{len(j['loads'])} model loads, {len(j['off_device'])} off the GPU; figures/report "
                        "steps (no model) not run there"))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--results", default=str(run_all.RESULTS))
    a = ap.parse_args(argv)
    out = Path(a.results)
    res = json.loads((out / "gpu_latest.json").read_text())
    res["rows"] = [r for r in res["rows"] if r["benchmark"] != BENCH] + rows(Path(a.src))
    stamp = (" One-GPU rows (load_hooked, fold, scoring, patching at the Llama-3.1-8B shape; the tiny study) "
             "measured 2026-12-02 on NVIDIA H200 (torch 2.11.0+cu130), random-init weights.")
    res["note"] = res.get("note", "").split(" One-GPU rows")[0] + stamp
    run_all.write(res, "gpu_latest", out)
    return res


if __name__ == "__main__":
    main()
