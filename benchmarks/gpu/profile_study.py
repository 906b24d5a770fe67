"""Seconds and GPU utilisation of each step of the default study on one GPU, with a random-init
model of a real shape (issue 16, "the whole default study on one H200").

The model: ``--shape`` (default Qwen2.5-1.5B) with random weights and interp's byte tokenizer
(:func:`arch.register_text`; speed does not depend on weight values); the config: the defaults
(``experiments/two_hop.toml``) with ``world.verify_familiarity = false`` (random weights know no
facts) on ``--device``. Steps world → subspace run one at a time; after each, ``run.json`` (per-step
``timings`` and ``gpu``: mean / max utilisation sampled every 0.5 s, peak CUDA memory) is copied to
``--out`` and ``study_table.md`` / ``study.json`` rewritten there, so a call cut off by its time
limit keeps the steps it finished. ``--profile-train N`` then profiles N training steps of the
first expert's recipe with ``torch.profiler``: kernel time against wall time and the top operators
(``train_profile.txt``), to show what bounds expert training.

    python benchmarks/gpu/profile_study.py --out $OUT/study                       # on the GPU machine
    python benchmarks/gpu/profile_study.py --small --device cpu --out /tmp/ps     # CPU check, tiny shape
    INTERP_SHARE_GPUS=1 torchrun --standalone --nproc_per_node 3 benchmarks/gpu/profile_study.py --out $OUT/s3
                                                    # three processes sharing one GPU (README "Several GPUs")
    INTERP_SHARE_GPUS=1 torchrun ... --nproc_per_node 5 profile_study.py --steps world,experts --out D
    INTERP_SHARE_GPUS=1 torchrun ... --nproc_per_node 3 profile_study.py --keep --steps evaluate,mechanisms,subspace --out D
                                                    # the same run, five processes for training, three after

Each step's stages (per unit: a variant's load, scoring, lens...; ``run.json`` ``stages``) are also
appended to ``--out/stages.jsonl`` as they end, and tabulated in ``study_table.md``.
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
from gpu.study_gpu import SMALL, STEPS  # noqa: E402  (the same tiny config and step list)


def table(rj: dict, steps: list[str]) -> str:
    """Markdown rows ``step | seconds | utilisation mean / max | samples | peak MiB`` from a run.json
    (peak MiB: rank 0's; with several processes also their sum, ``Σ``)."""
    t, g = rj.get("timings", {}), rj.get("gpu") or {}
    rows = ["| step | seconds | GPU utilisation mean / max (%) | samples | peak MiB |", "|---|---|---|---|---|"]
    for s in steps:
        if s not in t:
            rows.append(f"| {s} | not run | | | |")
            continue
        u = g.get(s) or {}
        util = f"{u.get('util_mean_pct')} / {u.get('util_max_pct')}" if u.get("samples") else "–"
        peak = f"{u.get('peak_mib') or 0:,}"
        ranks = [p for p in u.get("peak_mib_ranks") or [] if p]
        if len(ranks) > 1:
            peak += f" (Σ {len(ranks)} processes {sum(ranks):,})"
        rows.append(f"| {s} | {t[s]:.1f} | {util} | {u.get('samples', 0)} | {peak} |")
    done = [t[s] for s in steps if s in t]
    rows.append(f"| **total** | **{sum(done):.1f}** | | | |")
    return "\n".join(rows) + "\n"


def stage_table(stages: dict) -> str:
    """Markdown rows ``step | stage | seconds (sum over units) | units | slowest unit`` from
    run.json's ``stages`` (step -> unit -> stage -> seconds)."""
    rows = ["| step | stage | seconds, sum over units | units | slowest unit (s) |", "|---|---|---|---|---|"]
    for step, units in stages.items():
        per: dict[str, list[tuple[float, str]]] = {}
        for unit, st in units.items():
            for name, sec in st.items():
                per.setdefault(name, []).append((sec, unit))
        for name, xs in per.items():
            top = max(xs)
            rows.append(f"| {step} | {name} | {sum(x for x, _ in xs):.1f} | {len(xs)} | {top[1]} ({top[0]:.1f}) |")
    return "\n".join(rows) + "\n"


def profile_training(key: str, run_dir: Path, device: str, n_steps: int, out: Path) -> dict:
    """Profile ``n_steps`` steps of ``train_expert`` on the study's D₁ facts with its recipe."""
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from interp.adapters.train import train_expert
    from interp.study import open_run

    run = open_run(run_dir)
    pairs = run.world().train_pairs("d1")
    recipe = dataclasses.replace(run.cfg.training, checkpoint_every=0)  # the study's recipe (a TrainConfig)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    # steps 1-5 wait, 6 warms up, then n_steps are recorded (each callback ends a profiler step)
    recipe = dataclasses.replace(recipe, max_steps=n_steps + 7)
    stamps = []
    t = time.perf_counter()
    with profile(activities=acts, schedule=schedule(wait=5, warmup=1, active=n_steps, repeat=1)) as prof:
        def tick(step, loss):
            stamps.append(time.perf_counter())
            prof.step()

        meta = train_expert(key, pairs, run_dir / "profile_expert", recipe, progress=False, device=device,
                            callback=tick)
    wall = time.perf_counter() - t
    ev = prof.key_averages()
    cuda = device.startswith("cuda")
    kernel_us = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else 0.0
    n_kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else 0
    active = stamps[6:6 + n_steps]
    step_s = (active[-1] - stamps[5]) / len(active) if len(active) else None
    res = {"steps": n_steps, "wall_s_incl_load_and_accuracy": round(wall, 2), "s_per_step": step_s,
           "cuda_kernel_s_total": kernel_us / 1e6, "cuda_kernels": n_kernels, "total_steps": meta["steps"],
           "note": "recorded steps only; the callback reads the loss every step (one host sync each) while profiling"}
    (out / "train_profile.txt").write_text(
        json.dumps(res, indent=1) + "\n\n" + ev.table(sort_by="self_cpu_time_total", row_limit=25) + "\n\n"
        + (ev.table(sort_by="self_cuda_time_total", row_limit=15) if device.startswith("cuda") else ""))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen2.5-1.5b-shape")
    ap.add_argument("--run-dir", default="/tmp/profile-study")
    ap.add_argument("--out", required=True, help="directory for run.json, study.json, study_table.md")
    ap.add_argument("--small", action="store_true", help="tiny shape and a few chains: a CPU check")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE (JSON value), repeatable")
    ap.add_argument("--profile-train", type=int, default=0, help="profile this many training steps after the study")
    ap.add_argument("--keep", action="store_true",
                    help="resume the run directory (e.g. a later launch with another number of processes) "
                         "instead of starting it afresh")
    a = ap.parse_args()
    from interp.study import run_study

    shape = "tiny-shape" if a.small else a.shape
    key = arch.register_text(shape, device=a.device)
    ov = {"world.verify_familiarity": False}
    if a.small:
        ov.update(SMALL)
    for kv in a.override:
        k, _, v = kv.partition("=")
        ov[k] = json.loads(v)
    steps = [s for s in a.steps.split(",") if s]
    run_dir, out = Path(a.run_dir), Path(a.out)
    import os

    from interp.study.runner import STAGE_LOG_ENV

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun: rank 0 writes the results
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(STAGE_LOG_ENV, str(out.resolve() / "stages.jsonl"))  # every rank appends
    if not main_rank:
        for step in steps:
            run_study(None, out=run_dir, model=key, device=a.device, steps=[step], overrides=ov)
        return
    if not a.keep:  # (the other ranks cannot have written yet: they wait for rank 0 to join the group)
        shutil.rmtree(run_dir, ignore_errors=True)
    prev = json.loads((out / "study.json").read_text()) if a.keep and (out / "study.json").is_file() else {}
    launch = {"steps": steps, "processes": int(os.environ.get("WORLD_SIZE", "1")),
              "share_gpus": os.environ.get("INTERP_SHARE_GPUS") == "1"}
    res = {**prev, "shape": shape, "weights": "random-init (speed does not depend on weight values)",
           "device": a.device, "overrides": ov, "launches": prev.get("launches", []) + [launch]}
    t = time.perf_counter()
    for step in steps:  # one step at a time: the results so far are written after each
        run_study(None, out=run_dir, model=key, device=a.device, steps=[step], overrides=ov)
        rj = json.loads((run_dir / "run.json").read_text())
        shutil.copy(run_dir / "run.json", out / "run.json")
        launch["wall_s"] = round(time.perf_counter() - t, 1)
        res.update(timings=rj.get("timings"), gpu=rj.get("gpu"),
                   stages=rj.get("stages"), machine=rj.get("machine"), versions=rj.get("versions"))
        if a.device.startswith("cuda"):
            import torch

            res["gpu_name"] = torch.cuda.get_device_name(0)
        (out / "study.json").write_text(json.dumps(res, indent=1))
        (out / "study_table.md").write_text(table(rj, STEPS) + "\n" + stage_table(rj.get("stages") or {}))
        print(step, rj.get("timings", {}).get(step), (rj.get("gpu") or {}).get(step), flush=True)
    if (run_dir / "results" / "experts.csv").is_file():
        shutil.copy(run_dir / "results" / "experts.csv", out / "experts.csv")
    rj = json.loads((run_dir / "run.json").read_text())
    print(table(rj, STEPS) + "\n" + stage_table(rj.get("stages") or {}), flush=True)
    if a.profile_train:
        res["train_profile"] = profile_training(key, run_dir, a.device, a.profile_train, out)
        (out / "study.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res["train_profile"]), flush=True)


if __name__ == "__main__":
    main()
