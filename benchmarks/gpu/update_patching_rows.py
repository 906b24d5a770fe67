"""Replace the patching rows (and scaling / tuning sections) of ``results/gpu_latest.{json,md}``.

The other rows (spectrum, merge, training, scale-out) stay as they were measured. Input: the
``bench_patching_gpu.json`` of a GPU run (and optionally ``tune_patching.json``,
``profile_patching.json`` from the same run).

    python benchmarks/gpu/update_patching_rows.py DIR     # DIR holds the GPU run's JSON files
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import run_all  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="directory with bench_patching_gpu.json [tune_patching.json, profile_patching.json]")
    ap.add_argument("--results", default=str(run_all.RESULTS))
    a = ap.parse_args(argv)
    src, out = Path(a.src), Path(a.results)
    res = json.loads((out / "gpu_latest.json").read_text())
    j = json.loads((src / "bench_patching_gpu.json").read_text())
    res["rows"] = run_all.rows_patching_gpu(j) + [r for r in res["rows"] if r["benchmark"] != "patching"]
    if j.get("scaling"):
        res["scaling"] = {"points": j["scaling"], "fit_time": j["scaling_fit_time"],
                          "fit_memory": j["scaling_fit_memory"], "unchunked_largest": j.get("unchunked_largest"),
                          "chunk_memory": j.get("chunk_memory")}
    tune, prof = src / "tune_patching.json", src / "profile_patching.json"
    if tune.is_file():
        res["tune_patching"] = json.loads(tune.read_text())
    res.pop("profile_patching", None)  # only a profile of this same run is kept
    if prof.is_file():
        res["profile_patching"] = json.loads(prof.read_text())
    when = time.strftime("%Y-%m-%d", time.localtime((src / "bench_patching_gpu.json").stat().st_mtime))
    stamp = f" Patching rows, scaling and max_batch/TF32 table re-measured {when} on {j['device']} (torch {j['torch']})."
    res["note"] = res.get("note", "").split(" Patching rows,")[0] + stamp
    run_all.write(res, "gpu_latest", out)
    return res


if __name__ == "__main__":
    main()
