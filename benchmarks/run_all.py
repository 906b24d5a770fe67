"""Run every benchmark and write one side-by-side table (Markdown + JSON).

    python benchmarks/run_all.py                      # CPU, full sizes -> results/latest.{json,md}
    python benchmarks/run_all.py --quick              # small sizes (minutes)
    python benchmarks/run_all.py --device cuda        # GPU suite -> results/gpu_latest.{json,md}
    python benchmarks/run_all.py --render-gpu DIR     # rebuild gpu_latest.{json,md} from a GPU run's
                                                      # files (gpu_latest.json, multigpu_w*.json)

Each row: our time (or throughput), the baseline's, the speed-up of ours (baseline time / our time;
for training, our tokens/s / plain tokens/s: > 1 means ours is faster), the max abs difference of
the two results, and peak memory. Baselines: TransformerLens ``patching.get_act_patch_resid_pre``;
dense ``torch.linalg.svdvals(B @ A)``; peft ``add_weighted_adapter(combination_type="svd")``; a plain
peft + transformers training loop.

The benchmark scripts are run as they are (CPU: subprocesses, whose JSON is read back); peak
memory is what each script reports for ours and the baseline separately where it does (patching,
training), else the benchmark process's peak RSS (CPU, ``wait4`` rusage, includes the model) or
``torch.cuda.max_memory_allocated`` over the benchmark (CUDA).

On the CUDA device the patching and training benchmarks use random-init models with real shapes
(``benchmarks/gpu/arch.py``): no weights travel. SmolLM2 is used on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_script(args: list[str], log: list) -> tuple[float, float]:
    """Run ``python args...`` to completion; returns (wall seconds, peak RSS MiB of it and its children)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, cwd=str(HERE.parent))
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)  # this child's own rusage (its waited-for children included)
    rc = p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t
    tail = "\n".join(out.strip().splitlines()[-6:])
    log.append({"cmd": " ".join(args), "rc": rc, "seconds": secs, "tail": tail})
    print(f"[{rc}] {' '.join(args)} ({secs:.0f} s)\n{tail}", flush=True)
    if rc != 0:
        raise RuntimeError(f"{args[0]} failed (rc {rc}):\n{tail}")
    return secs, ru.ru_maxrss / 1024


def merge_check(device: str = "cpu", d: int = 4096, r: int = 8) -> dict:
    """Max abs difference of the top-r singular values: ours (exact Uniform + factored SVD) vs peft svd."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from interp.adapters import merge as M
    from interp.adapters.factors import LoraDelta

    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(nn.Linear(d, d, bias=False))
        cfg = lambda: LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
        pm = get_peft_model(model, cfg(), adapter_name="e1")
        pm.add_adapter("e2", cfg())
    lin = pm.base_model.model[0]
    experts = [{"0": LoraDelta(lin.lora_A[n].weight.detach(), lin.lora_B[n].weight.detach(), float(lin.scaling[n]))}
               for n in ("e1", "e2")]
    ours = M.factored_svd(M.uniform(experts)["0"])[1][:r]
    pm.add_weighted_adapter(["e1", "e2"], [0.5, 0.5], "svd", combination_type="svd", svd_rank=r)
    dw = (lin.lora_B["svd"].weight @ lin.lora_A["svd"].weight).double() * float(lin.scaling["svd"])
    theirs = torch.linalg.svdvals(dw)[:r]
    return {"max_abs_diff_top_r_sigma": float((ours.cpu() - theirs.cpu()).abs().max()),
            "sigma_max": float(ours.max())}


def in_process_cuda(fn, device: str):
    """Run ``fn()`` under a CUDA peak-memory meter; returns (result, seconds, peak MiB)."""
    from gpu.measure import Peak

    with Peak(device) as pk:
        t = time.perf_counter()
        out = fn()
    return out, time.perf_counter() - t, pk.mib


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def row(bench, case, ours, base, unit, speedup, diff, mem_ours, mem_base, target="", note="", **extra):
    return {"benchmark": bench, "case": case, "ours": ours, "baseline": base, "unit": unit, "speedup": speedup,
            "max_abs_diff": diff, "peak_mib_ours": mem_ours, "peak_mib_baseline": mem_base, "target": target,
            "note": note, **extra}


def rows_patching_cpu(j: dict) -> list[dict]:
    out = [row("patching", f"SmolLM2-135M resid_pre sweep, {j['n_layers']} layers × {j['n_tokens']} pos × "
                           f"{j['n_tl']} prompts", j["ours_seconds_same_prompts"], j["tl_seconds"], "s",
               j["speedup_same_prompts"], j["max_abs_diff_same_prompts"], j["ours_peak_rss_growth_mib_same_prompts"],
               j["tl_peak_rss_growth_mib"], "≥ 5×", "TL get_act_patch_resid_pre; RSS growth")]
    out.append(row("patching", f"same, ours on {j['n_ours']} prompts (per prompt)", j["ours_seconds_per_prompt_n_ours"],
                   j["tl_seconds_per_prompt"], "s/prompt", j["speedup_per_prompt_n_ours"], None,
                   j["ours_peak_rss_growth_mib_n_ours"], j["tl_peak_rss_growth_mib"], "≥ 5×"))
    return out


def rows_spectrum(j: dict, mem: float | None) -> list[dict]:
    return [row("spectrum", f"ΔW d={x['d']} r={x['r']} ({j.get('dtype', 'float64')})", x["factors_s"], x["dense_s"], "s",
                x["ratio"], x["max_rel_diff"], mem, mem, "≥ 1000× at d=4096" if x["d"] == 4096 else "",
                "dense svdvals(B@A); diff = max relative diff of σ; memory = whole benchmark")
            for x in j["rows"]]


def rows_merge(j: dict, mem: float | None, check: dict | None) -> list[dict]:
    out, q = [], " (bench_merge --quick sizes)" if j.get("quick") else ""
    for x in j["results"]:
        out.append(row("merge", f"Uniform + spectrum, {x['label']}{q}", x["ours_s"], x["peft_svd_s"], "s", x["speedup"],
                       check["max_abs_diff_top_r_sigma"] if check and "4096" in x["label"] else None, mem, mem, "",
                       "peft add_weighted_adapter(svd); diff = top-r σ ours vs peft (4096-wide check); "
                       "memory = whole benchmark"))
    return out


def rows_training(j: dict) -> list[dict]:
    return [row("training", f"LoRA expert {x['model']}, {x['lora']}, batch {x['batch']} "
                            f"({x['tokens_per_step_mean']:.0f} tok/step), {x['steps_timed']} steps ×{x['repeats']}",
                x["ours_tokens_per_s"], x["plain_tokens_per_s"], "tokens/s", x["ours_over_plain"],
                max(x["max_abs_diff_losses"], x["max_abs_diff_lora_weights"]), x["ours_peak_mib"],
                x["plain_peak_mib"], "≥ 0.9 (within 10%)",
                f"plain peft+transformers loop; ours incl. checkpoint every {x['checkpoint_every']} "
                f"(extra s per checkpoint step: {_f(x['ours_ckpt_step_extra_s'])}); median step ours "
                f"{x['ours_step_s_median']:.3g} s vs plain {x['plain_step_s_median']:.3g} s "
                f"(ratio {x['plain_step_s_median'] / x['ours_step_s_median']:.3f}); diff = losses & LoRA weights")
            for x in j["rows"]]


def rows_machine(j: dict) -> list[dict]:
    cpu = j["cpu"]
    where = f"{cpu['model']}, torch capability {cpu['capability']}, AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}"
    out = []
    for x in j["rows"]:
        if x["benchmark"] == "training step":
            out.append(row("precision", f"training step {x['model']} ({x['case']}): bf16 vs fp32 on {where}",
                           x["bf16_s"], x["fp32_s"], "s/step", x["bf16_speedup"], None, None, None,
                           "auto picks the faster", f"auto chose {x['auto_choice']} "
                           f"({'the faster' if x['auto_is_faster'] else 'NOT the faster'}): {x['auto_reason']}"))
        else:
            out.append(row("threads", f"forward {x['model']} 16×32 fp32, {x['case']}: 1 vs 2 torch threads",
                           x["threads1_s"], x["threads2_s"], "s", x["threads2_s"] / x["threads1_s"], None, None, None,
                           "", "ours = 1 thread, baseline = 2 threads; speed-up > 1: one thread is faster"))
    return out


def rows_packing(j: dict) -> list[dict]:
    out = []
    for prec in dict.fromkeys(x["precision"] for x in j["rows"]):
        rs = {x["layout"]: x for x in j["rows"] if x["precision"] == prec}
        pad, ours = rs["padded"], rs["packed 2x"]
        cpu = ours["cpu"]
        out.append(row("training", f"training step {ours['base_model']} {prec}, joint_all's data: packed rows (2x the "
                                   f"longest) vs right padding on {cpu['model']}, torch capability {cpu['capability']}",
                       ours["step_s"], pad["step_s"], "s/step", pad["step_s"] / ours["step_s"], None, None, None, "",
                       "tokens computed / real: " + ", ".join(f"{k} {v['tokens_computed_over_real']:.2f} "
                                                              f"({v['step_s']:.3g} s)" for k, v in rs.items())))
    return out


def rows_inference(j: dict) -> list[dict]:
    sc, bp = j["scoring"], j["backpatch"]
    return [
        row("inference", f"score_examples, SmolLM2 Uniform merge of 2 rank-8 experts (7 projections), "
                         f"{sc['n_prompts']} prompts: fold_static_update vs peft forward", sc["fold_s"], sc["peft_s"], "s",
            sc["speedup_fold_vs_peft"], sc["max_abs_diff_fold_vs_peft"], None, None, "",
            f"peft add_weighted_adapter(cat); unfolded hooked runtime {sc['hooked_s']:.3g} s "
            f"({sc['speedup_fold_vs_hooked']:.2f}x slower than folded); diff = answer log-prob (nats)"),
        row("inference", f"back_patching, SmolLM2, {bp['n_prompts']} prompts × {bp['cells']} cells "
                         f"(layers {bp['layers'][0]}, {bp['layers'][1] if len(bp['layers']) > 1 else ''}, … {bp['layers'][-1]})",
            bp["ours_s"], bp["tl_s"], "s", bp["speedup"], bp["max_abs_diff"], None, None, "",
            "TransformerLens run_with_hooks, one full forward per cell; diff = answer log-prob (nats)"),
    ]


def rows_patching_gpu(j: dict) -> list[dict]:
    out = []
    for x in j["head_to_head"]:
        case = f"{x['model']} resid_pre sweep, {x['n_layers']} × {x['positions']} × {x['prompts']}"
        both_tf32 = "tl_tf32_s" in x  # TL timed in TF32 too: the ≥ 20× target is in the GPU default, TF32
        out.append(row("patching", case + " (fp32)", x["ours_s"], x["tl_s"], "s", x["speedup"], x["max_abs_diff"],
                       x["ours_peak_mib"], x["tl_peak_mib"], "" if both_tf32 else "≥ 20×",
                       f"max_batch {x['best_max_batch']}"
                       + ("; copies whose clean activation equals the corrupted one are not recomputed"
                          if "ours_noskip_s" in x else "")))
        if "ours_noskip_s" in x:
            out.append(row("patching", case + " (fp32, every copy recomputed)", x["ours_noskip_s"], x["tl_s"], "s",
                           x["tl_s"] / x["ours_noskip_s"], x["noskip_max_abs_diff"], x["ours_noskip_peak_mib"],
                           x["tl_peak_mib"], "", "skip_unchanged=False"))
        if both_tf32:
            out.append(row("patching", case + " (TF32, both: the GPU default)", x["ours_tf32_s"], x["tl_tf32_s"], "s",
                           x["tf32_speedup"], x["tf32_max_abs_diff_vs_fp32"], x["ours_tf32_peak_mib"],
                           x["tl_tf32_peak_mib"], "≥ 20× (GPU default)",
                           "TF32 matmuls for both (interp.devices.analysis_precision); error vs the fp32 TL grid: "
                           f"ours {x['tf32_max_abs_diff_vs_fp32']:.2e} ({x['tf32_rel_diff_vs_grid_max']:.1e} of max|grid|), "
                           f"TL TF32 {x['tl_tf32_max_abs_diff_vs_fp32']:.2e} "
                           f"({x['tl_tf32_rel_diff_vs_grid_max']:.1e} of max|grid|)"))
        if "ours_tf32_s" in x:
            out.append(row("patching", case + " (ours TF32 vs TL fp32)", x["ours_tf32_s"], x["tl_s"], "s",
                           x["tl_s"] / x["ours_tf32_s"], x["tf32_max_abs_diff_vs_fp32"], x["ours_tf32_peak_mib"],
                           x["tl_peak_mib"], "", f"rel. to max|grid| {x['tf32_rel_diff_vs_grid_max']:.1e}"))
        if "ours_bf16_s" in x:
            out.append(row("patching", case + " (ours bf16 vs TL fp32)", x["ours_bf16_s"], x["tl_s"], "s",
                           x["tl_s"] / x["ours_bf16_s"], x["bf16_max_abs_diff_vs_fp32"], x["ours_bf16_peak_mib"],
                           x["tl_peak_mib"], "", f"rel. to max|grid| {x['bf16_rel_diff_vs_grid_max']:.1e}"))
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _f(v, unit=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, str):
        return v
    if unit == "x":
        return f"{v:,.1f}×" if v < 1000 else f"{v:,.0f}×"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"


def to_markdown(res: dict) -> str:
    lines = [f"# Benchmarks — {res['device']}", "",
             f"{res['when']} · torch {res['torch']} · {res['host']}" + (" · **quick sizes**" if res.get("quick") else ""),
             "", res.get("note", ""), "",
             "| benchmark | case | ours | baseline | unit | speed-up (ours) | max abs diff | peak MiB ours / baseline | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mem = f"{_f(r['peak_mib_ours'])} / {_f(r['peak_mib_baseline'])}" if r["peak_mib_ours"] != r["peak_mib_baseline"] \
            else f"{_f(r['peak_mib_ours'])} (both)"
        lines.append(f"| {r['benchmark']} | {r['case']} | {_f(r['ours'])} | {_f(r['baseline'])} | {r['unit']} | "
                     f"{_f(r['speedup'], 'x')} | {_f(r['max_abs_diff'])} | {mem} | {r['target']} |")
    notes = [f"- {r['benchmark']} / {r['case']}: {r['note']}" for r in res["rows"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    if res.get("errors"):
        lines += ["", "Errors:", *[f"- {k}: {v}" for k, v in res["errors"].items()]]
    sc = res.get("scaling")
    if sc:
        lines += ["", "## Patching sweep scaling (ours)", "",
                  "| layers L | positions T | prompts B | patches | seconds | peak MiB | prompt chunk |",
                  "|---|---|---|---|---|---|---|"]
        for p in sc["points"]:
            lines.append(f"| {p['layers']} | {p['positions']} | {p['prompts']} | {p['patches']:,} | "
                         f"{p['seconds']:.3f} | {p['peak_mib']:.0f} | {p['prompt_chunk'] or '–'} |")
        lines += ["", f"Fit (log-linear least squares): time {sc['fit_time']['formula']} (R² {sc['fit_time']['r2_log']:.3f}); "
                      f"memory {sc['fit_memory']['formula']} (R² {sc['fit_memory']['r2_log']:.3f})."]
        if sc.get("chunk_memory"):
            lines.append("Memory of one sweep by prompt chunk (same prompts; peak CUDA memory incl. the model): " + "; ".join(
                f"L={c['layers']} T={c['positions']} B={c['prompts']} in chunks of {c['prompt_chunk']}: "
                f"{c['seconds']:.2f} s, {c['peak_mib']:.0f} MiB (max abs diff {c['max_abs_diff_vs_first']:.1e})"
                for c in sc["chunk_memory"]) + ".")
        elif sc.get("unchunked_largest"):
            u = sc["unchunked_largest"]
            lines.append(f"Without prompt chunking, L={u['layers']} T={u['positions']} B={u['prompts']}: "
                         f"{u['seconds']:.2f} s, {u['peak_mib']:.0f} MiB.")
    mg = res.get("multigpu")
    if mg:
        lines += ["", "## Scale-out (torch.distributed, torchrun, one host)", "",
                  "| job | 1 GPU (s) | 2 GPUs (s) | speed-up | results equal |", "|---|---|---|---|---|"]
        for job in ("patching", "library"):
            if job in mg:
                m = mg[job]
                lines.append(f"| {m['case']} | {m['w1_s']:.2f} | {m['w2_s']:.2f} | {m['speedup']:.2f}× | {m['equal']} |")
    tp = res.get("tune_patching")
    if tp:
        lines += ["", "## Our patching sweep vs max_batch and TF32 (8 prompts × 16 positions, fp32 unless TF32)", "",
                  "| shape | max_batch | TF32 | seconds | max abs diff vs fp32 max_batch 64 |", "|---|---|---|---|---|"]
        lines += [f"| {t['shape']} | {t['max_batch']} | {t['tf32']} | {t['seconds']:.3f} | {t['max_abs_diff_vs_fp32']:.1e} |"
                  for t in tp]
    for sec in res.get("sections") or []:  # extra measured tables, already in markdown
        lines += ["", f"## {sec['title']}", "", sec["markdown"]]
    return "\n".join(lines) + "\n"


def write(res: dict, stem: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(to_markdown(res))
    print(f"wrote {out_dir / stem}.json / .md", flush=True)


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def header(device: str, quick: bool) -> dict:
    import torch

    from gpu.measure import device_name

    return {"device": device_name(device), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "host": f"{platform.node()} ({os.cpu_count()} cores)", "quick": quick, "rows": [], "errors": {},
            "log": []}


def cpu_suite(quick: bool, out_dir: Path, reuse: tuple[str, ...] = ()) -> dict:
    res = header("cpu", quick)
    res["note"] = ("Rows may come from runs at different times (see each row's note and the load average "
                   "recorded in its JSON); ratios always come from ours and the baseline in one run.")
    steps = [
        ("patching", ["benchmarks/bench_patching.py"] + (["--n-tl", "2", "--n-ours", "4"] if quick else []),
         "bench_patching.json", lambda j, mem: rows_patching_cpu(j)),
        ("spectrum", ["benchmarks/bench_spectrum.py", "--device", "cpu", "--out", str(RESULTS / "bench_spectrum.json")]
         + (["--sizes", "576", "4096", "--ranks", "8", "--dense-reps", "1", "--fast-reps", "5"] if quick else []),
         "bench_spectrum.json", lambda j, mem: rows_spectrum(j, mem)),
        ("merge", ["benchmarks/bench_merge.py"] + (["--quick"] if quick else []), "bench_merge.json",
         lambda j, mem: rows_merge(j, mem, merge_check("cpu"))),
        ("training", ["benchmarks/bench_training.py", "--device", "cpu"] + (["--quick"] if quick else []),
         "bench_training.json", lambda j, mem: rows_training(j)),
        ("machine", ["benchmarks/bench_machine.py"] + (["--quick"] if quick else []), "bench_machine.json",
         lambda j, mem: rows_machine(j)),
        ("packing", ["benchmarks/bench_packing.py"] + (["--quick"] if quick else []), "bench_packing.json",
         lambda j, mem: rows_packing(j)),
        ("inference", ["benchmarks/bench_inference.py"] + (["--n", "32", "--n-backpatch", "4", "--stride", "6"] if quick else []),
         "bench_inference.json", lambda j, mem: rows_inference(j)),
    ]
    for name, args, js, conv in steps:
        try:
            if name in reuse and (RESULTS / js).is_file():  # read the JSON its own script wrote earlier
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime((RESULTS / js).stat().st_mtime))
                rows = conv(json.loads((RESULTS / js).read_text()), None)
                for r in rows:
                    r["note"] = (r["note"] + "; " if r["note"] else "") + f"reused {js} written {made}"
                res["rows"] += rows
                res["log"].append({"reused": js, "written": made})
            else:
                _, mem = run_script(args, res["log"])
                res["rows"] += conv(json.loads((RESULTS / js).read_text()), mem)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others
            res["errors"][name] = repr(e)[-500:]
        write(res, "latest", out_dir)
    return res


def gpu_suite(quick: bool, out_dir: Path, device: str = "cuda", small: bool = False) -> dict:
    import torch

    res = header(device, quick)
    res["note"] = ("Random-init models with the real shapes (Qwen2.5-0.5B, Llama-3.2-1B), fp32 and eager attention "
                   "unless a row says bf16; one GPU (CUDA_VISIBLE_DEVICES=0).")
    out_dir.mkdir(parents=True, exist_ok=True)

    def step(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res["errors"][name] = repr(e)[-500:]
        write(res, "gpu_latest", out_dir)
        torch.cuda.empty_cache()

    def spectrum():
        import bench_spectrum

        argv = sys.argv
        sys.argv = ["bench_spectrum", "--device", device, "--out", str(out_dir / "bench_spectrum_gpu.json")] + \
            (["--sizes", "576", "--ranks", "8"] if small else ["--sizes", "4096", "--ranks", "8"] if quick
             else ["--dense-reps", "3"])
        try:
            _, _, mem = in_process_cuda(bench_spectrum.main, device)
        finally:
            sys.argv = argv
        res["rows"] += rows_spectrum(json.loads((out_dir / "bench_spectrum_gpu.json").read_text()), mem)

    def merge():
        import torch
        import bench_merge

        smol = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
        wide = {"q_proj": (4096, 4096), "down_proj": (11008, 4096)}
        with torch.device(device):
            bench_merge.run("warm-up", 1, {"q_proj": (64, 64)})
            results, _, mem = in_process_cuda(lambda: [
                bench_merge.run("smollm2-shaped (30 layers x 7 modules, d=576/1536, r=8)", 6 if quick else 30, smol),
                bench_merge.run("4096-wide (2 layers x q + down 11008, r=8)", 1 if quick else 2, wide)], device)
            check = merge_check(device, d=512 if small else 4096)
        res["rows"] += rows_merge({"results": results}, mem, check)

    def training():
        import bench_training

        j = bench_training.main(["--device", device, "--out", str(out_dir / "bench_training_gpu.json")]
                                + (["--model", "tiny-shape", "--steps", "3", "--repeats", "1", "--prompt-words", "8"]
                                   if small else
                                   ["--model", "qwen2.5-0.5b-shape", "--steps", "10", "--repeats", "1"] if quick else []))
        res["rows"] += rows_training(j)

    def patching():
        from gpu import bench_patching_gpu

        j = bench_patching_gpu.main(["--device", device, "--out", str(out_dir / "bench_patching_gpu.json")]
                                    + (["--small"] if small else
                                       ["--shapes", "qwen2.5-0.5b-shape", "--no-scaling"] if quick else []))
        res["rows"] = rows_patching_gpu(j) + res["rows"]
        if j.get("scaling"):
            res["scaling"] = {"points": j["scaling"], "fit_time": j["scaling_fit_time"],
                              "fit_memory": j["scaling_fit_memory"], "unchunked_largest": j.get("unchunked_largest"),
                              "chunk_memory": j.get("chunk_memory")}

    step("patching", patching)
    step("spectrum", spectrum)
    step("merge", merge)
    step("training", training)
    return res


def render_gpu(src: Path, out_dir: Path) -> dict:
    """Rebuild gpu_latest.{json,md} from a GPU run's directory, adding the multi-GPU scale-out."""
    res = json.loads((src / "gpu_latest.json").read_text())
    w1, w2 = src / "multigpu_w1.json", src / "multigpu_w2.json"
    if w1.is_file() and w2.is_file():
        a, b = json.loads(w1.read_text()), json.loads(w2.read_text())
        eq = {}
        if "max_abs_diff_vs_compare" in b["patching"]:
            eq["patching"] = f"max abs diff of grids {b['patching']['max_abs_diff_vs_compare']:.1e}"
        if "max_abs_diff_losses_vs_compare" in b["library"]:
            eq["library"] = f"max abs diff of losses {b['library']['max_abs_diff_losses_vs_compare']:.1e}"
        p, l = a["patching"], a["library"]
        res["multigpu"] = {
            "device": b.get("device"), "w1": a, "w2": b,
            "patching": {"case": f"patching sweep {a['shape']}, {p['layers']} × {p['positions']} × {p['prompts']} prompts "
                                 f"(chunks of {p['prompt_chunk']})", "w1_s": p["seconds"], "w2_s": b["patching"]["seconds"],
                         "speedup": p["seconds"] / b["patching"]["seconds"], "equal": eq.get("patching", "?")},
            "library": {"case": f"library of {l['experts']} experts × {l['steps']} steps (train_expert)",
                        "w1_s": l["seconds"], "w2_s": b["library"]["seconds"],
                        "speedup": l["seconds"] / b["library"]["seconds"], "equal": eq.get("library", "?")},
        }
    tune = src / "tune_patching.json"
    if tune.is_file():
        res["tune_patching"] = json.loads(tune.read_text())
    write(res, "gpu_latest", out_dir)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--small", action="store_true", help="GPU suite with tiny shapes (a smoke test on any device)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--render-gpu", default=None, metavar="DIR")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="BENCH",
                    help="CPU: read the existing results/bench_<BENCH>.json instead of re-running "
                         "(patching, spectrum, merge, training)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.render_gpu:
        return render_gpu(Path(a.render_gpu), Path(a.out_dir))
    if a.device.startswith("cuda") or a.small:
        return gpu_suite(a.quick or a.small, Path(a.out_dir), a.device, a.small)
    return cpu_suite(a.quick, Path(a.out_dir), tuple(a.reuse))


if __name__ == "__main__":
    main()
