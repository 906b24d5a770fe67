"""Real two-hop chains on a base model: which mechanism measurement separates composed from failed
chains? (issue 18, item 2; the history / geography extension of Chen et al., TMLR 2026.)

``python -m interp.study.real_chains --out DIR [--model smollm2-135m] [--layer-step N] [--png]``

1. **Chains** (:mod:`interp.tasks.real_chains`): every chain of the hand-written real-fact tables,
   verified on the base model (greedy first token, the familiarity check of the two-hop world):
   *known* = both hops answered one at a time; outcome ``composed`` / ``failed`` = the two-hop
   prompt answered or not. Only known chains are measured.
2. **Measurements**, per known chain, on its two-hop prompt (scores: higher = more bridge):

   * ``entrec`` — EntRec of the bridge e₂ (Yang et al. 2024: logit-lens log-prob of e₂'s first
     token, nats) at ``e1_last`` and ``final``, every lens layer 0..L;
   * ``patchscope`` — the residual entering layer ℓ at e₁'s last token decoded through the
     token-identity prompt (Ghandeharioun et al. 2024), log-prob of e₂'s first token;
   * ``probe_bridge`` — held-out probability of the chain's own e₂ from a multinomial logistic
     probe of ``resid_pre`` (5-fold, grouped by e₁ so no e₁ is in both the fitting and the scored
     fold; e₂ classes with < 5 chains are not probed);
   * ``probe_outcome`` — held-out probability of ``composed`` from a logistic probe of the same
     features (same folds): can a linear read-out of the residual tell the outcome at all? Its
     AUC is computed on held-out predictions, but picking the best layer afterwards is optimistic;
   * ``swap`` — causal test: the residual at e₁'s last token entering layer ℓ is replaced by the
     one of a donor chain of the same relation pair with another bridge and another answer first
     token; score = shift of ``logit[e₃ donor] − logit[e₃]`` at the final position (logits).

   Layers: every lens layer for EntRec; every ``--layer-step``-th layer (0, N, 2N, …) for the
   others. ``layer = "max"`` rows score each chain by its maximum over the measured layers (a
   label-free summary; for ``probe_outcome`` none is made).
3. **Separation** (:mod:`interp.mechanisms.separation`): AUC of composed (positive) vs failed with
   DeLong 95% and stratified-bootstrap intervals, per measurement × layer × position
   (``comparison = "pooled"``), and the same comparing only chains of one relation pair
   (``"within_pair"``: the outcome depends strongly on the relation pair, and so may the
   measurements; the within-pair AUC cannot be made by that confounder).

Outputs in ``DIR``: ``chains.csv`` (every candidate chain, its prompts, base answers, outcome and
summary scores), ``scores.csv`` (tidy per chain × measurement × layer × position),
``swap.csv`` (the causal test's raw rows), ``separation.csv``, ``config.json``, figures
``separation_auc_{pooled,within_pair}.html`` and ``entrec_by_outcome_{final,e1_last}.html``
(+ ``.png`` with ``--png``). Steps whose
file exists are not recomputed (same config; another config in the same ``DIR`` is refused).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import typer
from tqdm.auto import tqdm

from interp.errors import ProbeError, StudyError

SCORE_COLUMNS = ("chain_id", "measurement", "layer", "position", "score")


def measured_layers(n_layers: int, step: int) -> list[int]:
    """``0, step, 2·step, …`` below ``n_layers``, plus the last block ``n_layers − 1``.

    Raises:
        StudyError: ``step < 1``.
    """
    if step < 1:
        raise StudyError(f"--layer-step must be >= 1, got {step}")
    return sorted(set(range(0, n_layers, step)) | {n_layers - 1})


def _csv(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table cached at ``path`` (computed first if absent), written with its SHA-256 and
    read back checked, so a cut or edited cache is an error naming it and a fresh run and a
    resumed one see the same values."""
    from interp.files import is_checked, write_checked
    from interp.study.runner import read_cached_csv

    if not is_checked(path):
        write_checked(path, compute().to_csv(index=False).encode())
    return read_cached_csv(path)


def _with_max(df: pd.DataFrame) -> pd.DataFrame:
    """Append ``layer = "max"`` rows: each chain's maximum score over layers."""
    mx = (df.groupby(["chain_id", "measurement", "position"], sort=False)["score"].max()
          .reset_index().assign(layer="max"))
    return pd.concat([df.assign(layer=df["layer"].astype(str)), mx], ignore_index=True)[
        list(SCORE_COLUMNS)]


def measure(hm: Any, examples: Sequence[Any], layers: Sequence[int], out: Path, *,
            composed: Sequence[bool], batch_size: int = 16, n_splits: int = 5, seed: int = 0,
            progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Every measurement of the module docstring on the two-hop ``examples`` of known chains.

    Returns:
        ``(scores, swap_rows, notes)``: tidy :data:`SCORE_COLUMNS` rows (``layer`` as text,
        ``"max"`` for the summaries), the raw :func:`~interp.mechanisms.swap_patching` rows, and
        notes on measurements that could not run (e.g. too few chains per e₂ for the probe).
    """
    from interp.mechanisms import (collect_features, entrec, patchscope, pick_donors, probe_scores,
                                   swap_patching)
    from interp.tasks.examples import answer_token_ids

    ids = np.asarray([e.chain_id for e in examples])
    notes: list[str] = []
    bar = tqdm(total=5, desc="real chains: measurements", disable=not progress)

    def do_entrec() -> pd.DataFrame:
        d = entrec(hm, examples, positions=("e1_last", "final"), targets=("e2",),
                   batch_size=batch_size)
        return pd.DataFrame({"chain_id": ids[d["example_id"]], "measurement": "entrec",
                             "layer": d["layer"], "position": d["position"], "score": d["logprob"]})

    parts = [_with_max(_csv(out / "scores_entrec.csv", do_entrec))]
    bar.update()

    def do_patchscope() -> pd.DataFrame:
        d = patchscope(hm, examples, source_position="e1_last", target="identity",
                       source_layers=layers, targets=("e2",), progress=progress)
        return pd.DataFrame({"chain_id": ids[d["example_id"]], "measurement": "patchscope",
                             "layer": d["source_layer"], "position": "e1_last",
                             "score": d["logprob"]})

    parts.append(_with_max(_csv(out / "scores_patchscope.csv", do_patchscope)))
    bar.update()

    def do_probes() -> pd.DataFrame:
        feats = collect_features(hm, examples, ("e1_last", "final"), layers, batch_size=batch_size)
        groups = [e.e1 for e in examples]
        frames = []
        for name, labels, positive in (("probe_bridge", [e.e2 for e in examples], None),
                                       ("probe_outcome", list(composed), True)):
            try:
                d = probe_scores(feats, labels, layers, groups, positive, n_splits, seed,
                                 progress=progress)
            except ProbeError as err:
                notes.append(f"{name} not run: {err}")
                continue
            frames.append(pd.DataFrame({"chain_id": ids[d["example_id"]], "measurement": name,
                                        "layer": d["layer"], "position": d["position"],
                                        "score": d["score"]}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=list(SCORE_COLUMNS))

    probes = _csv(out / "scores_probes.csv", do_probes)
    parts.append(_with_max(probes[probes["measurement"] == "probe_bridge"]))
    parts.append(probes[probes["measurement"] == "probe_outcome"].assign(
        layer=lambda d: d["layer"].astype(str)))
    bar.update()

    def do_swap() -> pd.DataFrame:
        first = [answer_token_ids(e, hm)[0] for e in examples]
        donor = pick_donors(examples, group="relation", bridge="e2", answer_first=first, seed=seed)
        keep = [i for i, d in enumerate(donor) if d is not None]
        if len(keep) < len(examples):
            notes.append(f"swap: {len(examples) - len(keep)} chains have no donor")
        if not keep:
            return pd.DataFrame(columns=["chain_id", "layer", "shift", "follows"])
        return swap_patching(hm, [examples[i] for i in keep], [examples[donor[i]] for i in keep],
                             layers=layers, position="e1_last", batch_size=batch_size,
                             progress=progress)

    swap = _csv(out / "swap.csv", do_swap)
    if len(swap):
        parts.append(_with_max(pd.DataFrame({"chain_id": swap["chain_id"], "measurement": "swap",
                                             "layer": swap["layer"], "position": "e1_last",
                                             "score": swap["shift"]})))
    bar.update()
    bar.close()
    return pd.concat(parts, ignore_index=True), swap, notes


def run_real_chains(hm: Any, out: str | Path, *, layer_step: int = 1, png: bool = False,
                    chains: Sequence[Any] | None = None, verifier: Callable | None = None,
                    batch_size: int = 16, n_splits: int = 5, n_boot: int = 1000, seed: int = 0,
                    progress: bool = True) -> dict[str, pd.DataFrame]:
    """The whole study (module docstring) into ``out``; returns its tables.

    Args:
        hm: the base ``HookedModel``.
        out: run directory (created; resumes from the CSVs already there).
        layer_step: every how many layers Patchscope, probes and the swap test are run.
        png: also write static PNG figures.
        chains: default every chain of :func:`interp.tasks.real_chains.make_chains`.
        verifier: passed to :func:`~interp.tasks.real_chains.verify_chains` (tests use a stub).
        batch_size, n_splits, n_boot, seed: forwards, probe folds, bootstrap resamples, seeds.

    Returns:
        ``{"chains", "scores", "swap", "separation"}`` DataFrames.

    Raises:
        StudyError: ``out`` holds a run of another config, or fewer than two composed or failed
            known chains.
    """
    from interp.files import atomic_write_text
    from interp.mechanisms.separation import separation_table
    from interp.tasks.real_chains import chain_examples, make_chains, verify_chains

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chains = make_chains() if chains is None else list(chains)
    layers = measured_layers(hm.n_layers, layer_step)
    config = {"model": getattr(hm, "name", str(type(hm))), "layer_step": layer_step,
              "layers": layers, "n_chains": len(chains), "n_splits": n_splits, "n_boot": n_boot,
              "seed": seed, "batch_size": batch_size,
              "verifier": "first_token" if verifier is None else getattr(verifier, "__name__", "custom")}
    cfg_path = out / "config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != config:
        raise StudyError(f"{out} holds a run of another configuration ({cfg_path}); use another --out")
    atomic_write_text(cfg_path, json.dumps(config, indent=1))

    verified = _csv(out / "verified.csv", lambda: verify_chains(hm, chains, batch_size, verifier,
                                                                      progress))
    known = verified[verified["known"]]
    n_comp, n_fail = int((known["outcome"] == "composed").sum()), int((known["outcome"] == "failed").sum())
    if n_comp < 2 or n_fail < 2:
        raise StudyError(f"need >= 2 composed and >= 2 failed known chains, got {n_comp} and {n_fail}")
    by_id = {c.chain_id: c for c in chains}
    examples = [chain_examples(by_id[int(i)])["two_hop"] for i in known["chain_id"]]
    composed = (known["outcome"] == "composed").tolist()
    scores, swap, notes = measure(hm, examples, layers, out, composed=composed,
                                  batch_size=batch_size, n_splits=n_splits, seed=seed,
                                  progress=progress)
    labels = pd.Series(composed, index=known["chain_id"].to_numpy())
    pairs = pd.Series(known["pair"].to_numpy(), index=known["chain_id"].to_numpy())
    sep = pd.concat([
        separation_table(scores, labels, n_boot=n_boot, seed=seed).assign(comparison="pooled"),
        separation_table(scores, labels, strata=pairs).assign(comparison="within_pair")],
        ignore_index=True)
    atomic_write_text(out / "scores.csv", scores.to_csv(index=False))
    atomic_write_text(out / "separation.csv", sep.to_csv(index=False))

    summary = scores[scores["layer"] == "max"].pivot_table(
        index="chain_id", columns=["measurement", "position"], values="score")
    summary.columns = [f"{m}_{p}_max" for m, p in summary.columns]
    chains_df = verified.merge(summary, left_on="chain_id", right_index=True, how="left")
    if len(swap):
        follows = swap.groupby("chain_id")["follows"].mean().rename("swap_follows_share")
        chains_df = chains_df.merge(follows, left_on="chain_id", right_index=True, how="left")
    atomic_write_text(out / "chains.csv", chains_df.to_csv(index=False))
    if notes:
        atomic_write_text(out / "notes.txt", "\n".join(notes) + "\n")
        for n in notes:
            warnings.warn(n)

    from interp.figures import lens_figure, save_figures, separation_figure

    lens = pd.read_csv(out / "scores_entrec.csv").merge(
        known[["chain_id", "outcome"]], on="chain_id").rename(
        columns={"outcome": "method", "measurement": "target"}).assign(target="e2")
    figs = {f"separation_auc_{c}": separation_figure(
        sep[sep["comparison"] == c], "Does a mechanism measurement separate composed from failed "
        "real two-hop chains? " + ("(all pairs)" if c == "pooled" else "(within relation pair)"),
        "AUC, composed vs failed (DeLong 95% CI)") for c in ("pooled", "within_pair")}

    for pos in ("final", "e1_last"):
        fig = lens_figure(lens.rename(columns={"score": "logprob"}), "logprob", pos)
        fig.update_layout(title=f"EntRec of the bridge e₂ at {pos}, composed vs failed chains "
                                f"(mean ± s.e.m.)")
        figs[f"entrec_by_outcome_{pos}"] = fig
    save_figures(figs, out, png=png)
    return {"chains": chains_df, "scores": scores, "swap": swap, "separation": sep}


app = typer.Typer(add_completion=False)


@app.command()
def main(out: Path = typer.Option(..., "--out", "-o", help="run directory (resumable)"),
         model: str = typer.Option("smollm2-135m", "--model", help="registered model or directory"),
         layer_step: int = typer.Option(1, "--layer-step", help="measure every N-th layer "
                                        "(Patchscope, probes, swap test; EntRec: every layer)"),
         png: bool = typer.Option(False, "--png", help="also write PNG figures (needs Chromium)"),
         batch_size: int = typer.Option(16, "--batch-size"),
         device: str = typer.Option("cpu", "--device")) -> None:
    """Real two-hop chains on a base model: AUC of each mechanism measurement, composed vs failed."""
    from interp.models import load_model

    measured_layers(2, layer_step)  # refuse a bad step before loading the model
    hm = load_model(model, device=device)
    res = run_real_chains(hm, out, layer_step=layer_step, png=png, batch_size=batch_size)
    ch = res["chains"]
    known = ch[ch["known"]]
    typer.echo(f"{len(ch)} chains, both hops known {len(known)}: "
               f"{(known['outcome'] == 'composed').sum()} composed / "
               f"{(known['outcome'] == 'failed').sum()} failed")
    sep = res["separation"]
    typer.echo(sep[sep["layer"].astype(str) == "max"].round(3).to_string(index=False))
    typer.echo(f"written to {out}")


if __name__ == "__main__":
    app()
