"""The worked example of README "Diagnose your own adapters", runnable offline.

Writes a small world of invented two-hop facts (``person --spouse--> person --lives in--> city``),
trains two LoRA experts on SmolLM2 with ``train_expert`` (A→B facts and B→C facts; an expert
below 90% first-token accuracy on its own facts is retrained with ``--retrain-steps``), then runs
``interp diagnose`` on the composed queries and prints the findings and the wall time::

    python experiments/diagnose_example.py [--out runs/diagnose_example] [--chains 8] [--steps 40]
        [--retrain-steps 80] [--model smollm2-135m] [--device cpu]

Everything lands under ``--out``: ``ab.jsonl``, ``bc.jsonl``, ``queries.jsonl``, ``experts/ab``,
``experts/bc``, ``diagnosis/`` (``report.html``, ``results/*.csv``, ``summary.json``) and
``summary.json`` (wall seconds per stage, the experts' training accuracies, the findings). A second
call reuses the trained experts and the cached diagnosis.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

CITIES = ["Lyon", "Madrid", "Berlin", "Tokyo", "Cairo", "Lima", "Oslo", "Dublin", "Vienna", "Prague", "Boston",
          "Sydney", "Milan", "Denver", "Seoul", "Lisbon"]
SYLLABLES = ["va", "el", "in", "os", "trov", "mi", "ra", "ten", "hold", "dor", "ian", "ke", "lo", "zar", "quen",
             "thal", "bri", "sol", "mar", "vek", "ul", "ny", "pho", "ger"]
HOP1 = "The spouse of {} is"
HOP2 = "{} lives in the city of"
QUERY = "The spouse of {} lives in the city of"


def _name(rng: random.Random, used: set[str]) -> str:
    """An invented two-word name (never a real entity of the pretraining data, by construction)."""
    while True:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        n = f"{first} {last}"
        if n not in used:
            used.add(n)
            return n


def make_world(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` chains ``{"a", "b", "c"}``: invented a, b; c a real city (distinct when n ≤ 16)."""
    rng = random.Random(seed)
    used: set[str] = set()
    cities = rng.sample(CITIES, n) if n <= len(CITIES) else [rng.choice(CITIES) for _ in range(n)]
    return [{"a": _name(rng, used), "b": _name(rng, used), "c": c} for c in cities]


def write_files(out: Path, chains: list[dict[str, str]], tokenizer) -> None:
    """``ab.jsonl`` / ``bc.jsonl`` (the user's facts) and ``queries.jsonl`` (what diagnose reads).
    Each query's ``corrupt_prompt`` swaps in another chain's subject of the same token length
    (activation patching needs aligned positions); none when no such subject exists."""
    def rows(name, items):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in items))

    rows("ab.jsonl", [{"prompt": HOP1.format(ch["a"]), "answer": " " + ch["b"]} for ch in chains])
    rows("bc.jsonl", [{"prompt": HOP2.format(ch["b"]), "answer": " " + ch["c"]} for ch in chains])
    n_tok = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    queries = []
    for i, ch in enumerate(chains):
        q = {"prompt": QUERY.format(ch["a"]), "answer": " " + ch["c"], "subject": ch["a"], "bridge": ch["b"],
             "hop1_prompt": HOP1.format(ch["a"]), "hop2_prompt": HOP2.format("{bridge}"),
             # oracle routing: each hop to its expert; the two-hop query to ab (its subject's fact)
             "expert": "ab", "hop1_expert": "ab", "hop2_expert": "bc"}
        for other in chains[i + 1:] + chains[:i]:
            cp = QUERY.format(other["a"])
            if n_tok(cp) == n_tok(q["prompt"]) and other["c"] != ch["c"]:
                q["corrupt_prompt"], q["corrupt_answer"] = cp, " " + other["c"]
                break
        queries.append(q)
    rows("queries.jsonl", queries)


#: first-token accuracy on its own facts below which an expert is retrained with more steps
GOOD_ENOUGH = 0.9


def train_pair(model: str, out: Path, device: str, steps: int, retrain_steps: int) -> tuple[dict, dict]:
    """Train experts ``ab`` and ``bc`` (the study's recipe, :class:`~interp.adapters.recipe.TrainConfig`
    defaults but lr 1.5e-3, the rate its README figures were measured at: LoRA+ ratio 8, r 8; fp32, so no bf16 speed probe) for ``steps`` steps each,
    and once more for ``retrain_steps`` where the first is below :data:`GOOD_ENOUGH` on its facts.

    Returns:
        (``{name: metadata of the kept expert + attempts}``, ``{"train_ab": s, "train_bc": s}``).
    """
    from interp.adapters.train import TrainConfig, train_expert

    pairs = lambda f: [(d["prompt"], d["answer"]) for d in map(json.loads, open(out / f))]  # noqa: E731
    meta, seconds = {}, {}
    for name in ("ab", "bc"):
        t0 = time.time()
        d = out / "experts" / name
        old = json.loads((d / "interp_meta.json").read_text()) if (d / "interp_meta.json").is_file() else {}
        # a rerun starts from the expert kept last time (the 80-step one if it was retrained)
        plan = [retrain_steps] if old.get("steps") == retrain_steps != steps else [steps, retrain_steps]
        attempts = []
        for n in plan:
            m = train_expert(model, pairs(f"{name}.jsonl"), d, TrainConfig(max_steps=n, precision="fp32", lr=1.5e-3),
                             device=device, expert=name)
            attempts.append({"steps": n, "train_first_token_acc": m["train_first_token_acc"]})
            if m["train_first_token_acc"] >= GOOD_ENOUGH:
                break
        meta[name] = {**{k: m[k] for k in ("steps", "final_loss", "train_first_token_acc", "train_exact_match")},
                      "attempts": attempts}
        seconds[f"train_{name}"] = round(time.time() - t0, 1)
    return meta, seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/diagnose_example")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per expert")
    ap.add_argument("--retrain-steps", type=int, default=80,
                    help=f"steps of the retraining of an expert below {GOOD_ENOUGH:.0%} on its own facts")
    a = ap.parse_args(argv)

    from interp.diagnose import diagnose, open_diagnosis
    from interp.diagnose.findings import findings
    from interp.models import load_hf

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _, tok = load_hf(a.model)
    write_files(out, make_world(a.chains), tok)
    meta, seconds = train_pair(a.model, out, a.device, a.steps, a.retrain_steps)
    t_train = time.time() - t0
    run = diagnose(a.model, {"ab": str(out / "experts" / "ab"), "bc": str(out / "experts" / "bc")},
                   combines=["uniform", "ties", "arrow", "oracle"], prompts=out / "queries.jsonl",
                   out=out / "diagnosis", device=a.device, batch_size=16)
    wall = time.time() - t0
    r = open_diagnosis(run)
    names = ("inventory", "adapters", "spectra", "overlap", "layer_energy", "faithfulness", "energy_kept", "accuracy",
             "router", "key_overlap", "lens", "patching", "patchscope", "backpatch", "knockout")
    found = findings({n: r.table(n) for n in names})
    diag = json.loads((run / "summary.json").read_text())
    summary = {"model": a.model, "chains": a.chains, "steps": a.steps, "retrain_steps": a.retrain_steps,
               "experts": meta,
               "wall_s": {"train": round(t_train, 1), "total": round(wall, 1)},
               "stage_seconds": {**seconds, **{f"diagnose_{k}": v for k, v in diag["stage_seconds"].items()}},
               "variant_seconds": diag["variants"]["variant_seconds"],
               "findings": [f["text"] + " [" + f["evidence"] + "]" for f in found]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print("\nexperts (training accuracy, first token; steps): " + ", ".join(
        f"{k} {v['train_first_token_acc']:.0%} ({v['steps']})" for k, v in meta.items()))
    print(f"wall time: {wall:.0f} s (training {t_train:.0f} s); report: {run / 'report.html'}")
    print("seconds per stage: " + ", ".join(f"{k} {v:g}" for k, v in summary["stage_seconds"].items()))
    print("seconds per variant: " + ", ".join(f"{k} {v:g}" for k, v in summary["variant_seconds"].items()
                                               if v is not None))
    print("findings:")
    for f in summary["findings"]:
        print(" -", f)
    return summary


if __name__ == "__main__":
    main()
