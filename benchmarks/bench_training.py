"""Expert training throughput: ``interp.adapters.train.train_expert`` vs a plain peft + transformers loop.

Both train the same model (same loader, same seed, so the same LoRA init), on the same data in the
same order (the epoch permutation ``randperm`` seeded ``seed·1_000_003 + epoch``), with the same
LoRA config (r, α, targets, no dropout), batch size, number of steps and optimiser (AdamW, constant
lr, no weight decay). The plain loop is what a user would write: pre-tokenise, right-pad each batch,
answer-only labels, ``loss.backward(); opt.step(); opt.zero_grad(); loss.item()``.

Throughput = padded tokens processed / wall time of the steps after ``--warmup`` steps (both loops
see exactly the same batches, so the token counts are equal). Ours runs with its default
checkpoint cadence (every 20 steps), so checkpoint cost is in the figure; ``ours_ckpt_step_extra_s``
isolates it. ``ours_end_to_end_s`` adds the model load, the final train-accuracy pass and the atomic
save. Results are compared as the max abs difference of the per-step losses and of the trained
LoRA weights (exactly 0 on the CPU; GPU kernels are not bit-deterministic).

Runs are alternated (plain, ours, plain, ours, …, ``--repeats`` each) and the medians are reported.

    python benchmarks/bench_training.py                      # SmolLM2-135M on the CPU, few steps
    python benchmarks/bench_training.py --quick              # tiny-llama, seconds
    python benchmarks/bench_training.py --device cuda --model qwen2.5-0.5b-shape llama-3.2-1b-shape

``--model`` takes registered names (``smollm2-135m``, ``tiny-llama``) or random-init shapes from
``benchmarks/gpu/arch.py``. Writes benchmarks/results/bench_training.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from gpu import arch  # noqa: E402
from gpu.measure import Peak, device_name, save_json, sync  # noqa: E402

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen",
         "Louis", "Maria", "Nancy", "Oscar", "Peter", "Rachel", "Steve", "Tina", "Victor", "Wendy",
         "Xavier", "Yvonne", "Zack", "Anna", "Brian", "Chris", "Diana", "Edward", "Fiona", "George", "Helen"]
THINGS = [" red", " blue", " green", " yellow", " purple", " orange", " black", " white"]


def text_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(THINGS), (n,), generator=g).tolist()
    return [(f"The favourite colour of {NAMES[i % len(NAMES)]} {chr(65 + i // len(NAMES))}. is", THINGS[k])
            for i, k in enumerate(pick)]


def examples_for(model: str, n: int, prompt_words: int) -> list[tuple[str, str]]:
    if model in arch.SHAPES:
        return arch.word_examples(arch.config(model).vocab_size, n, prompt_words, 1, seed=0)
    return text_examples(n)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def plain_loop(base: str, examples, cfg, device: str, total: int):
    """A plain peft + transformers loop. Returns losses, per-step end times, tokens per step, LoRA state."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from interp.models import load_hf

    hf, tok = load_hf(base)
    hf = hf.to(device)
    pad = next(c for c in (tok.pad_token_id, tok.eos_token_id, 0) if c is not None)
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"])
           for p, a in examples]
    torch.manual_seed(cfg.seed)
    pm = get_peft_model(hf, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                                       lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    pm.train()
    n, bs = len(enc), cfg.batch_size
    spe = math.ceil(n / bs)
    losses, ends, tokens = [], [], []
    sync(device)
    for step in range(total):
        epoch, k = divmod(step, spe)
        idx = _order(n, cfg.seed, epoch)[k * bs:(k + 1) * bs]
        seqs = [torch.tensor(enc[i][0] + enc[i][1]) for i in idx]
        labs = [torch.tensor([-100] * len(enc[i][0]) + enc[i][1]) for i in idx]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad).to(device)
        labels = torch.nn.utils.rnn.pad_sequence(labs, batch_first=True, padding_value=-100).to(device)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs],
                                               batch_first=True, padding_value=0).to(device)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ends.append(time.perf_counter())
        tokens.append(ids.numel())
    state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(pm).items()}
    return losses, ends, tokens, state


def ours(base: str, examples, cfg, device: str):
    """``train_expert``; per-step end times through its callback. Returns meta, ends, e2e seconds, LoRA state."""
    from safetensors.torch import load_file

    from interp.adapters.train import train_expert

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ends = []
    try:
        sync(device)
        t0 = time.perf_counter()
        meta = train_expert(base, examples, tmp / "expert", cfg, progress=False,
                            callback=lambda s, l: ends.append(time.perf_counter()), device=device)
        sync(device)
        e2e = time.perf_counter() - t0
        state = {k: v.float() for k, v in load_file(str(tmp / "expert" / "adapter_model.safetensors")).items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta, ends, e2e, state


def throughput(ends: list[float], tokens: list[int], warmup: int) -> tuple[float, float]:
    """(tokens/s, median step seconds) over the steps after ``warmup``."""
    steps = [b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:])]
    return sum(tokens[warmup:]) / (ends[-1] - ends[warmup - 1]), statistics.median(steps)


def compare(model: str, device: str = "cpu", steps: int = 4, warmup: int = 1, batch: int = 16,
            n_examples: int = 32, prompt_words: int = 48, r: int = 8, repeats: int = 1,
            checkpoint_every: int = 20) -> dict:
    """One row: ours vs plain on ``model`` (registered name or random-init shape)."""
    from interp.adapters.train import TrainConfig

    base = arch.register(model, device) if model in arch.SHAPES else model
    examples = examples_for(model, n_examples, prompt_words)
    # the plain loop's recipe: constant lr, no clipping, fp32, right-padded batches (the study's
    # defaults differ; packed rows are timed against padding by bench_packing.py)
    cfg = TrainConfig(r=r, lora_alpha=2 * r, batch_size=batch, max_steps=warmup + steps, seed=0,
                      checkpoint_every=checkpoint_every, schedule="constant", max_grad_norm=0.0,
                      loraplus_lr_ratio=0.0, precision="fp32", packing=False)
    plain_tps, ours_tps, plain_step, ours_step, e2es, loss_d, w_d = [], [], [], [], [], [], []
    ckpt_extra, mem_plain, mem_ours = [], [], []
    tokens = None
    for _ in range(repeats):
        with Peak(device) as pk:
            losses, ends_p, tokens, state_p = plain_loop(base, examples, cfg, device, warmup + steps)
        mem_plain.append(pk.mib)
        tps, st = throughput(ends_p, tokens, warmup)
        plain_tps.append(tps), plain_step.append(st)
        if device != "cpu":
            torch.cuda.empty_cache()
        with Peak(device) as pk:
            meta, ends_o, e2e, state_o = ours(base, examples, cfg, device)
        mem_ours.append(pk.mib)
        tps, st = throughput(ends_o, tokens, warmup)
        ours_tps.append(tps), ours_step.append(st), e2es.append(e2e)
        durs = [b - a for a, b in zip(ends_o[:-1], ends_o[1:])]  # durs[i] ends at step i + 2
        ck = [d for i, d in enumerate(durs) if checkpoint_every and (i + 1) % checkpoint_every == 0]
        if ck:
            ckpt_extra.append(statistics.mean(ck) - statistics.median(durs))
        loss_d.append(max(abs(a - b) for a, b in zip(meta["losses"], losses)))
        if set(state_o) != set(state_p):
            raise RuntimeError(f"LoRA keys differ: {sorted(set(state_o) ^ set(state_p))[:3]}")
        w_d.append(max(float((state_o[k] - state_p[k]).abs().max()) for k in state_o))
        if device != "cpu":
            torch.cuda.empty_cache()
    med = statistics.median
    row = {
        "benchmark": "training", "model": model, "device": device_name(device), "dtype": "float32",
        "lora": f"r={r}, alpha={2 * r}, {len(cfg.target_modules)} projections", "batch": batch,
        "steps_timed": steps, "warmup_steps": warmup, "repeats": repeats, "checkpoint_every": checkpoint_every,
        "tokens_per_step_mean": sum(tokens) / len(tokens),
        "plain_tokens_per_s": med(plain_tps), "ours_tokens_per_s": med(ours_tps),
        "ours_over_plain": med(ours_tps) / med(plain_tps),
        "plain_tokens_per_s_all": plain_tps, "ours_tokens_per_s_all": ours_tps,
        "plain_step_s_median": med(plain_step), "ours_step_s_median": med(ours_step),
        "ours_ckpt_step_extra_s": med(ckpt_extra) if ckpt_extra else None,
        "ours_end_to_end_s": med(e2es),
        "max_abs_diff_losses": max(loss_d), "max_abs_diff_lora_weights": max(w_d),
        "plain_peak_mib": max(mem_plain), "ours_peak_mib": max(mem_ours), "peak_kind": pk.kind,
        "within_10pct": med(ours_tps) >= 0.9 * med(plain_tps),
    }
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 3 steps (seconds; a smoke test)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_training.json"))
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    models = a.model or (["tiny-llama"] if a.quick else
                         ["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"] if gpu else ["smollm2-135m"])
    steps = a.steps or (3 if a.quick else 40 if gpu else 4)
    repeats = a.repeats or (2 if gpu else 1)
    rows = []
    for m in models:
        row = compare(m, a.device, steps=steps, warmup=a.warmup, batch=a.batch, repeats=repeats,
                      prompt_words=a.prompt_words)
        rows.append(row)
        print(f"{m}: plain {row['plain_tokens_per_s']:.0f} tok/s, ours {row['ours_tokens_per_s']:.0f} tok/s, "
              f"ours/plain {row['ours_over_plain']:.3f}, loss diff {row['max_abs_diff_losses']:.2e}, "
              f"ckpt extra {row['ours_ckpt_step_extra_s']}", flush=True)
    res = {"benchmark": "bench_training", "device": a.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "rows": rows}
    return save_json(res, a.out)


if __name__ == "__main__":
    main()
