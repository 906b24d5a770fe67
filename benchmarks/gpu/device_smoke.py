"""Every analysis on one GPU: load_hooked + merges + fold + scoring + patching on CUDA, and rows
at a real shape (random-init weights: speed and memory do not depend on weight values).

``smoke``: a random-init model of ``--shape`` (default Llama-3.2-1B, fp32) and two random
rank-16 all-linear adapters (:func:`interp.adapters.make_random_adapter`); for each combine it
checks that every parameter, LoRA factor, ``info`` delta and cached activation is on the GPU,
that the folded forward equals the hooked one (an independent path: ``W+ΔW`` in the weights vs
``Wx + Σ sBAx`` in hooks), then scores prompts and runs a resid_pre patching sweep.

``bench``: at ``--shape`` (default Llama-3.1-8B) in ``--dtype`` (bf16): time and peak CUDA memory
of load_hooked (Uniform of two rank-16 all-linear adapters; the base built on the GPU once, never
a second copy), fold_static_update, score_examples of ``--n-prompts`` prompts, the patching sweep.

    python benchmarks/gpu/device_smoke.py smoke --out $OUT/smoke.json
    python benchmarks/gpu/device_smoke.py bench --out $OUT/bench8b.json
    python benchmarks/gpu/device_smoke.py smoke --device cpu --shape tiny-shape   # CPU check

``score``: scoring throughput of ``score_examples`` (base; Uniform merge folded and hooked) vs a
plain transformers loop computing the same answer log-probs, at ``--shapes`` in ``--precisions``.

    python benchmarks/gpu/device_smoke.py score --out $OUT/score.json
    python benchmarks/gpu/device_smoke.py score --device cpu --shapes tiny-shape --n-prompts 16 --reps 1
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
from gpu.measure import Peak, device_name, sync  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapters(shape: str, key: str, dtype, d: Path, r: int = 16, n_layers: int | None = None) -> dict[str, str]:
    from interp.adapters import make_random_adapter

    sk = arch.skeleton(shape, dtype, n_layers)  # shapes only: no weights are initialised or sent to the GPU
    out = {n: str(make_random_adapter(key, d / n, r=r, target_modules=ALL_LINEAR, seed=i + 1, hf_model=sk))
           for i, n in enumerate(("ab", "bc"))}
    del sk
    return out


def where(hm) -> dict:
    """Devices and dtypes of everything the hooked model holds (parameters, LoRA factors, deltas)."""
    params = {(str(p.device), str(p.dtype)) for p in hm.hf_model.parameters()}
    lora = {(str(p.device), str(p.dtype)) for n, p in hm.hf_model.named_parameters() if "lora_" in n}
    deltas = set()
    for group in ([hm.info.get("deltas") or {}] + list((hm.info.get("expert_deltas") or {}).values())):
        for dl in group.values():
            deltas |= {str(t.device) for t in (dl.A, dl.B, dl.bias) if t is not None}
    return {"params": sorted(map(list, params)), "lora": sorted(map(list, lora)), "deltas": sorted(deltas)}


def smoke(a) -> dict:
    from interp.adapters import fold_static_update, load_hooked
    from interp.evaluate import score_examples
    from interp.mechanisms.patching import patch_layer_pos
    from interp.tasks.two_hop import Example  # noqa: F401  (score_examples reads .prompt/.answer)

    dev, dt = a.device, getattr(torch, a.dtype)
    # built on the CPU (load_hooked must move it); real widths, --layers layers (CPU init is slow)
    key = arch.register(a.shape, "cpu", dtype=dt, n_layers=a.layers)
    tmp = Path(tempfile.mkdtemp(prefix="smoke-"))
    ads = _adapters(a.shape, key, dt, tmp, n_layers=a.layers)
    res = {"device": device_name(dev), "shape": a.shape, "layers": a.layers, "dtype": a.dtype, "combines": {}}
    V = arch.config(a.shape).vocab_size
    exs = [type("Ex", (), {"prompt": p, "answer": ans})() for p, ans in arch.word_examples(V, 32, 12)]
    for comb in a.combines:
        row: dict = {}
        t = time.perf_counter()
        hm = load_hooked(key, ads, combine=comb, device=dev, dtype=dt)
        sync(dev)
        row["load_s"] = round(time.perf_counter() - t, 2)
        row["where"] = where(hm)
        toks, _ = hm.tokenize([e.prompt for e in exs[:4]])
        with torch.no_grad():
            logits, cache = hm.bridge.run_with_cache(toks)
        row["cache"] = sorted({f"{v.device}/{v.dtype}" for v in cache.values() if v.is_floating_point()})
        row["n_delta_hooks"] = sum(".lora." in k for k in cache.keys())
        del cache
        with fold_static_update(hm) as folded, torch.no_grad():
            lf = hm.logits(toks)
        row["folded"] = bool(folded)
        row["fold_vs_hooked_max_abs"] = float((lf - logits).abs().max())
        row["logit_scale"] = float(logits.abs().max())
        with Peak(dev) as pk:
            t = time.perf_counter()
            with fold_static_update(hm):
                sc = score_examples(hm, exs, batch_size=16)
            sync(dev)
        row["score_s"], row["score_peak_mib"] = round(time.perf_counter() - t, 3), round(pk.mib)
        row["score_n"] = len(sc)
        clean, corr, ca, xa = (x.to(dev) for x in arch.random_pairs(V, 4, 12))
        t = time.perf_counter()
        g = patch_layer_pos(hm, clean, corr, ca, xa, progress=False)
        sync(dev)
        row["patch_s"] = round(time.perf_counter() - t, 3)
        row["patch_grid"] = list(g.value.shape)
        row["patch_device"] = str(g.value.device)
        res["combines"][comb] = row
        print(comb, json.dumps(row), flush=True)
        del hm, g, logits, lf
        torch.cuda.empty_cache() if dev.startswith("cuda") else None
    return res


def bench(a) -> dict:
    from interp.adapters import fold_static_update, load_hooked
    from interp.evaluate import score_examples
    from interp.mechanisms.patching import patch_layer_pos

    dev, dt = a.device, getattr(torch, a.dtype)
    key = arch.register(a.shape, dev, dtype=dt)  # built on the GPU in dt: one copy, never moved
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    t = time.perf_counter()
    ads = _adapters(a.shape, key, dt, tmp)
    rows = {"device": device_name(dev), "shape": a.shape, "dtype": a.dtype, "adapters_write_s":
            round(time.perf_counter() - t, 1), "rank": 16, "targets": "all-linear", "combine": "uniform"}
    with Peak(dev) as pk:
        t = time.perf_counter()
        hm = load_hooked(key, ads, combine="uniform", device=dev, dtype=dt)
        sync(dev)
    rows["load_hooked"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib)}
    rows["weights_mib"] = round(sum(p.numel() * p.element_size() for p in hm.hf_model.parameters()) / 2**20)
    rows["where"] = where(hm)
    print(json.dumps(rows), flush=True)
    with Peak(dev) as pk:
        t = time.perf_counter()
        with fold_static_update(hm) as folded:
            sync(dev)
            rows["fold"] = {"s": round(time.perf_counter() - t, 2), "folded": bool(folded)}
    rows["fold"]["peak_mib"] = round(pk.mib)  # fold and unfold (the float64 ΔW of one site at a time)
    V = arch.config(a.shape).vocab_size
    exs = [type("Ex", (), {"prompt": p, "answer": ans})() for p, ans in arch.word_examples(V, a.n_prompts, 24, 2)]
    from interp.adapters import hooks

    probe = {n: p.detach().clone() for n, p in list(hm.hf_model.named_parameters())[:40] if "base_layer" in n}
    for label, fold in (("score_folded", True), ("score_folded_host", "host"), ("score_hooked", False)):
        park = hooks._park_originals_on_host
        if fold == "host":  # force the low-memory path: originals wait in host memory while folded
            hooks._park_originals_on_host = lambda ws: True
        with Peak(dev) as pk:
            t = time.perf_counter()
            if fold:
                with fold_static_update(hm) as folded:
                    score_examples(hm, exs, batch_size=64)
            else:
                folded = False
                score_examples(hm, exs, batch_size=64)
            sync(dev)
        hooks._park_originals_on_host = park
        live = dict(hm.hf_model.named_parameters())
        rows[label] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib), "n": len(exs),
                       "tokens": 26, "folded": bool(folded),
                       "weights_restored_bit_for_bit": all(torch.equal(live[n], v) for n, v in probe.items())}
        print(label, rows[label], flush=True)
    if a.fold_only:
        return rows
    clean, corr, ca, xa = (x.to(dev) for x in arch.random_pairs(V, a.patch_prompts, 16))
    for rep in range(2):  # the first call includes warm-up
        with Peak(dev) as pk:
            t = time.perf_counter()
            g = patch_layer_pos(hm, clean, corr, ca, xa, progress=False)
            sync(dev)
        rows["patching"] = {"s": round(time.perf_counter() - t, 2), "peak_mib": round(pk.mib),
                            "grid": list(g.value.shape), "prompts": a.patch_prompts, "tokens": 16}
    print("patching", rows["patching"], flush=True)
    return rows


def plain_answer_logprobs(model, tok, examples, batch_size: int, device) -> list[float]:
    """The baseline a user writes with transformers alone: per batch of ``prompt + answer`` ids
    (right-padded, batched in the order ``score_examples`` uses: by length), the full logits,
    ``log_softmax``, and the answer tokens' log-probs summed per example (nats)."""
    P = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    A = [tok(e.answer, add_special_tokens=False)["input_ids"] for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(P[i]) + len(A[i]))
    out = [0.0] * len(examples)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids = torch.full((len(idx), max(len(P[i]) + len(A[i]) for i in idx)), tok.pad_token_id or 0)
            rows, cols, gold = [], [], []
            for j, i in enumerate(idx):
                ids[j, :len(P[i]) + len(A[i])] = torch.tensor(P[i] + A[i])
                rows += [j] * len(A[i])
                cols += range(len(P[i]) - 1, len(P[i]) - 1 + len(A[i]))
                gold += A[i]
            logp = model(input_ids=ids.to(device)).logits.float().log_softmax(-1)
            r = torch.tensor(rows, device=device)
            lp = logp[r, torch.tensor(cols, device=device), torch.tensor(gold, device=device)]
            sums = torch.zeros(len(idx), device=device, dtype=lp.dtype).index_add_(0, r, lp)
            for i, v in zip(idx, sums.tolist()):
                out[i] = v
    return out


def plain_uniform_merge(hf, adapter_dirs) -> None:
    """Add the Uniform merge ``ΔW = Σ_e (1/n) · (alpha/r) · B_e A_e`` of peft adapter directories
    to ``hf``'s weights in place, read straight from the safetensors files (float64 products): an
    independent path to the merged model, for the baseline and the error check."""
    from safetensors.torch import load_file

    params = dict(hf.named_parameters())
    for d in map(Path, adapter_dirs):
        cfg = json.loads((d / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"] / len(adapter_dirs)
        t = load_file(str(d / "adapter_model.safetensors"))
        for k, a in t.items():
            if ".lora_A." in k:
                b = t[k.replace(".lora_A.", ".lora_B.")]
                w = params[k.split("base_model.model.", 1)[1].rsplit(".lora_A.", 1)[0] + ".weight"]
                w.data += (scale * (b.double() @ a.double())).to(w.device, w.dtype)


def score(a) -> dict:
    """Scoring throughput: ``score_examples`` on the base and on a Uniform merge of two rank-16
    all-linear adapters (folded, and hooked), vs :func:`plain_answer_logprobs` on a plain
    transformers model with the same weights (the merge added by :func:`plain_uniform_merge`),
    in each precision of ``--precisions`` (``auto``: the GPU default, TF32). Median of ``--reps``
    runs after one warm-up, ours and the plain loop timed alternately; max |Δ answer log-prob| of ours against the plain loop."""
    import statistics

    from interp.adapters import fold_static_update, load_hooked
    from interp.devices import analysis_precision
    from interp.evaluate import score_examples
    from interp.models import load_model

    dev = a.device
    res = {"device": device_name(dev), "torch": torch.__version__,
           "when": f"{time.strftime('%Y-%m-%d')}, one {device_name(dev)}, torch {torch.__version__}, "
                   "random-init weights of real shapes", "n_prompts": a.n_prompts, "tokens": 26,
           "batch_size": a.batch_size, "reps": a.reps, "rank": 16, "targets": "all-linear", "shapes": {}}

    def once(fn):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        return time.perf_counter() - t, out

    def paired(fn_ours, fn_plain):
        """Medians of ours and the plain loop, timed alternately (ours, plain, ours, ...) after a
        warm-up of each, so a drift of the machine (clocks, allocator) falls on both alike."""
        fn_ours(), fn_plain()
        ts: dict = {0: [], 1: []}
        outs: dict = {}
        for _ in range(a.reps):
            for i, fn in enumerate((fn_ours, fn_plain)):
                t, outs[i] = once(fn)
                ts[i].append(t)
        return statistics.median(ts[0]), outs[0], statistics.median(ts[1]), outs[1]

    for shape in a.shapes:
        key = arch.register(shape, dev)  # float32, built on the device
        ads = _adapters(shape, key, torch.float32, Path(tempfile.mkdtemp(prefix="score-")))
        V = arch.config(shape).vocab_size
        exs = [type("Ex", (), {"prompt": p, "answer": ans})() for p, ans in arch.word_examples(V, a.n_prompts, 24, 2)]
        base = load_model(key, device=dev)
        hm = load_hooked(key, ads, combine="uniform", device=dev)
        plain, tok = arch.build(shape, dev)  # the same seeded weights, no interp wrapper
        merged, _ = arch.build(shape, dev)
        plain_uniform_merge(merged, list(ads.values()))
        per: dict = {}
        for prec in a.precisions:
            with analysis_precision(prec, dev) as ap:
                bs = a.batch_size
                r: dict = {"precision": ap.name}
                r["ours_base_s"], ob, r["plain_base_s"], pb = paired(
                    lambda: score_examples(base, exs, batch_size=bs), lambda: plain_answer_logprobs(plain, tok, exs, bs, dev))
                t = time.perf_counter()
                with fold_static_update(hm) as folded:
                    sync(dev)
                    r["fold_s"] = time.perf_counter() - t
                    r["folded"] = bool(folded)
                    r["ours_uniform_folded_s"], of, r["plain_uniform_s"], pu = paired(
                        lambda: score_examples(hm, exs, batch_size=bs),
                        lambda: plain_answer_logprobs(merged, tok, exs, bs, dev))
                r["ours_uniform_hooked_s"], oh, _, _ = paired(lambda: score_examples(hm, exs, batch_size=bs), lambda: None)
                for name, ours, ref in (("base", ob, pb), ("uniform_folded", of, pu), ("uniform_hooked", oh, pu)):
                    diffs = (abs(x - y) for x, y in zip(ours["answer_logprob"], ref))
                    r[f"{name}_max_abs_logprob_diff"] = float(max(diffs))
                # whether score_examples ran the transformers modules without the bridge's wrappers
                r["bridge_bypassed"] = {"base": base.info.get("bridge_bypass_exact"),
                                        "uniform": hm.info.get("bridge_bypass_exact")}
                r["base_ratio"] = r["plain_base_s"] / r["ours_base_s"]  # ours throughput / plain throughput
                r["uniform_folded_ratio"] = r["plain_uniform_s"] / r["ours_uniform_folded_s"]
                r["uniform_hooked_ratio"] = r["plain_uniform_s"] / r["ours_uniform_hooked_s"]
            per[prec] = r
            print(shape, prec, json.dumps(r), flush=True)
        res["shapes"][shape] = per
        del base, hm, plain, merged
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("smoke", "bench", "score"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--combines", default="uniform,none,ties,arrow,merge_and_unload")
    ap.add_argument("--n-prompts", type=int, default=256)
    ap.add_argument("--patch-prompts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="smoke: layers of the shape (default all)")
    ap.add_argument("--fold-only", action="store_true", help="bench: only load + fold + scoring (for fp32)")
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b-shape", "qwen2.5-1.5b-shape"], help="score: shapes")
    ap.add_argument("--precisions", nargs="+", default=["auto", "fp32"], help="score: analysis precisions")
    ap.add_argument("--batch-size", type=int, default=32, help="score: prompts per forward (the study's default)")
    ap.add_argument("--reps", type=int, default=5, help="score: timed runs (median)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.combines = a.combines.split(",")
    if a.what == "score":
        res = score(a)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        return
    if a.what == "smoke":
        a.shape, a.dtype = a.shape or "llama-3.2-1b-shape", a.dtype or "float32"
        res = smoke(a)
    else:
        a.shape, a.dtype = a.shape or "llama-3.1-8b-shape", a.dtype or "bfloat16"
        res = bench(a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
