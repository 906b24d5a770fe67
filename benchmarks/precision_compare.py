"""The error of a precision against fp32, engine by engine, from two run directories of one study.

Both runs share the world and the experts (the second is a copy of the first re-run with
``--steps evaluate,mechanisms,subspace --dtype bf16|tf32``, or, for training, a run with another
``training.precision``); each results table is compared row by row (same rows, same order, checked
on the key columns), giving one error figure per engine:

* scoring: max |Δ answer log-prob| (nats) and the fraction of queries whose first-token correctness
  and exact match agree (explicit chaining apart: the fraction of greedy hop-1 answers equal); accuracy: max |Δ accuracy| over the accuracy table's cells;
* logit lens / EntRec: fraction of (query, layer, target) ranks equal, and of top-1 (rank 0) flags equal;
* Patchscope: fraction of top-1 flags equal; patching, back-patching, knockout: max |Δ value| and
  that relative to max |value| of the fp32 grid;
* probes: max |Δ held-out accuracy| and |Δ selectivity|; spectra: max |Δσ| / σ_max per spectrum;
  key overlap: max |Δκ|; training: max relative |Δ final loss| and max |Δ training accuracy|.

    python benchmarks/precision_compare.py REF_DIR OTHER_DIR [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def _read(d: Path, name: str) -> pd.DataFrame | None:
    p = Path(d) / "results" / f"{name}.csv"
    return pd.read_csv(p) if p.is_file() else None


def _aligned(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> bool:
    if len(a) != len(b):
        return False
    keys = [k for k in keys if k in a.columns and k in b.columns]
    return all((a[k].astype(str).values == b[k].astype(str).values).all() for k in keys)


def _maxdiff(a: pd.Series, b: pd.Series) -> float:
    x, y = a.to_numpy(float), b.to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.abs(x[ok] - y[ok]).max()) if ok.any() else float("nan")


def _agree(a: pd.Series, b: pd.Series) -> float:
    return float((a.astype(str).values == b.astype(str).values).mean())


def compare(ref: str | Path, other: str | Path) -> dict[str, dict]:
    """Engine -> error figures of ``other`` against ``ref`` (see the module docstring)."""
    out: dict[str, dict] = {}

    def pair(name, keys):
        a, b = _read(ref, name), _read(other, name)
        if a is None or b is None or not len(a):
            return None
        if name == "scores":  # explicit chaining asks each variant's own greedy hop-1 answer
            ca, cb = a[a["hop"] == "chain"], b[b["hop"] == "chain"]
            if len(ca) and len(ca) == len(cb):
                out["chaining"] = {"rows": len(ca), "same_prompt": _agree(ca["prompt"], cb["prompt"])}
            a, b = a[a["hop"] != "chain"].reset_index(drop=True), b[b["hop"] != "chain"].reset_index(drop=True)
        if not _aligned(a, b, keys):
            out[name] = {"error": "rows differ"}
            return None
        return a, b

    if (p := pair("scores", ["method", "hop", "prompt", "answer"])):
        a, b = p
        out["scoring"] = {"rows": len(a), "max_abs_logprob": _maxdiff(a["answer_logprob"], b["answer_logprob"]),
                          "first_token_agree": _agree(a["first_token_correct"], b["first_token_correct"]),
                          "exact_agree": _agree(a["exact_match"], b["exact_match"])}
    if (p := pair("accuracy", ["method", "library", "test_set", "hop", "metric"])):
        out["accuracy"] = {"cells": len(p[0]), "max_abs": _maxdiff(p[0]["accuracy"], p[1]["accuracy"])}
    if (p := pair("lens", ["method", "example_id", "layer", "target"])):
        a, b = p
        out["lens"] = {"rows": len(a), "rank_agree": _agree(a["rank"], b["rank"]),
                       "top1_agree": _agree(a["rank"] == 0, b["rank"] == 0),
                       "median_abs_rank_diff": float((a["rank"] - b["rank"]).abs().median()),
                       "max_abs_logprob": _maxdiff(a["logprob"], b["logprob"])}
    if (p := pair("patchscope", ["method", "example_id", "source_layer", "target"])):
        out["patchscope"] = {"rows": len(p[0]), "top1_agree": _agree(p[0]["top1"], p[1]["top1"])}
    for name, col, keys in (("patching", "value", ["method", "example_id", "hook", "layer", "position"]),
                            ("backpatch", "fixed", ["method", "example_id", "source_layer", "target_layer"]),
                            ("knockout", "delta", ["method", "example_id", "layer"])):
        if (p := pair(name, keys)):
            a, b = p
            scale = float(np.nanmax(np.abs(a[col].to_numpy(float)))) or 1.0
            d = _maxdiff(a[col], b[col])
            out[name] = {"rows": len(a), "max_abs": d, "rel_to_max": d / scale,
                         "agree": _agree(a[col], b[col]) if a[col].dtype == bool else None}
    if (p := pair("probes", ["method", "layer", "position"])):
        a, b = p
        out["probes"] = {"rows": len(a), "max_abs_accuracy": _maxdiff(a["accuracy"], b["accuracy"]),
                         "max_abs_selectivity": _maxdiff(a["selectivity"], b["selectivity"])}
    if (p := pair("subspace_spectra", ["adapter", "module", "index"])):
        a, b = p
        smax = a.groupby(["adapter", "module"])["sigma"].transform("max").to_numpy(float)
        rel = np.abs(a["sigma"].to_numpy(float) - b["sigma"].to_numpy(float)) / np.where(smax > 0, smax, 1)
        out["spectra"] = {"rows": len(a), "max_rel_to_sigma_max": float(rel.max())}
    if (p := pair("subspace_key_overlap", ["module", "layer"])):
        a, b = p
        out["key_overlap"] = {"rows": len(a), "max_abs_kappa": max(_maxdiff(a["kappa_composed"], b["kappa_composed"]),
                                                                   _maxdiff(a["kappa_native"], b["kappa_native"]))}
    if (p := pair("experts", ["expert"])):
        a, b = p
        la, lb = a["final_loss"].to_numpy(float), b["final_loss"].to_numpy(float)
        out["training"] = {"experts": len(a), "max_rel_final_loss": float((np.abs(la - lb) / np.abs(la)).max()),
                           "max_abs_train_acc": _maxdiff(a["train_first_token_acc"], b["train_first_token_acc"])}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref")
    ap.add_argument("other")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = compare(a.ref, a.other)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
