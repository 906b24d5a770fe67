"""A run's merged ΔW, computed once: the evaluate step writes each merge it loads, the subspace
step reads it back instead of merging again.

A TIES merge of SmolLM2's two experts costs ~40 s on one CPU thread (dense float64 ΔW per
module, top-k trim, an SVD to re-factor it); the demo computed it three times (evaluate, then the
subspace step on each rank). Files: ``DIR/cache/merges/{variant}.{key}.safetensors``, ``key`` the
hash of the config sections the experts and the merge options come from, so a run with other
experts or options never reads them. Tensors only (safetensors, no pickle); written atomically,
with the file's SHA-256 beside it (``.sha256``), checked on every read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from interp.adapters.factors import LoraDelta
from interp.errors import StudyError
from interp.files import is_checked, read_checked, write_checked

#: the config sections a merge of the study's experts depends on (experts: study, world, training;
#: merge options: methods)
MERGE_SECTIONS = ("study", "world", "training", "methods")


def merge_path(run, variant: str) -> Path:
    """Where ``variant``'s merged ΔW of this run's config is cached."""
    return run.cache / "merges" / f"{variant}.{run.cfg.section_hash(*MERGE_SECTIONS)}.safetensors"


def save_merge(run, variant: str, deltas: dict[str, LoraDelta]) -> None:
    """Cache ``{module: LoraDelta}`` (``A [r, d_in]``, ``B [d_out, r]``, scale, optional bias) of
    ``variant``, as float tensors on the CPU, exactly as given (no dtype change)."""
    from safetensors.torch import save

    tensors, scales = {}, {}
    for m, d in deltas.items():
        tensors[f"{m}.A"] = d.A.detach().cpu().contiguous()
        tensors[f"{m}.B"] = d.B.detach().cpu().contiguous()
        if d.bias is not None:
            tensors[f"{m}.bias"] = d.bias.detach().cpu().contiguous()
        scales[m] = float(d.scale)
    write_checked(merge_path(run, variant), save(tensors, metadata={"scales": json.dumps(scales)}))


def load_merge(run, variant: str) -> dict[str, LoraDelta] | None:
    """``variant``'s cached merged ΔW on the CPU, or ``None`` if this config has none cached (or
    the file has no SHA-256 beside it).

    Raises:
        StudyError: the file is there but is not a merge this module wrote (damaged).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = merge_path(run, variant)
    if not is_checked(path):  # absent, or without its SHA-256: not a merge we can vouch for
        return None
    try:
        from safetensors import safe_open

        data, intact = read_checked(path)
        if not intact:
            raise ValueError("its SHA-256 differs from the one written beside it")
        with safe_open(str(path), "pt") as f:
            scales = json.loads((f.metadata() or {})["scales"])
        tensors = load(data)
        return {m: LoraDelta(tensors[f"{m}.A"], tensors[f"{m}.B"], s, tensors.get(f"{m}.bias"))
                for m, s in scales.items()}
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise StudyError(f"cached merge {path} is damaged ({e}); delete it and run again") from e


def cached_merge(run, variant: str, compute) -> dict[str, LoraDelta]:
    """``variant``'s merged ΔW: read from the cache, else ``compute()``-d and cached."""
    hit = load_merge(run, variant)
    if hit is not None:
        return hit
    out = compute()
    save_merge(run, variant, out)
    return out


def same_merge(a: dict[str, LoraDelta], b: dict[str, LoraDelta]) -> bool:
    """Bit-identical factors, scales and biases, module by module."""
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x.cpu(), y.cpu()))
    return a.keys() == b.keys() and all(
        eq(a[m].A, b[m].A) and eq(a[m].B, b[m].B) and a[m].scale == b[m].scale and eq(a[m].bias, b[m].bias)
        for m in a)
