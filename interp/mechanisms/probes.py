"""Linear probes for the bridge entity, with control tasks (Hewitt & Liang 2019).

Per layer, a linear scikit-learn classifier decodes e₂'s identity from the residual stream
(``blocks.ℓ.hook_resid_pre``) at e₁'s last token and at the final token, cross-validated with
``StratifiedKFold``: multinomial ``LogisticRegression`` (``estimator="logistic"``, the usual
probe) or ``RidgeClassifier`` (``"ridge"``: one-vs-all least squares on ±1 targets, solved in
closed form; on SmolLM2 features, 384 examples × 576 dims × 63 classes, a 3-fold fit takes
0.06–0.16 s against 1–10 s for the logistic probe, at the same, chance-level, held-out accuracy).
Features are standardised inside each training fold. A *control task* (Hewitt & Liang 2019,
"Designing and Interpreting Probes with Control Tasks", EMNLP 2019, §2) re-runs the same probe on labels randomly permuted across
examples (class sizes preserved, seeded); *selectivity* = accuracy − control accuracy.

Few examples per class: StratifiedKFold needs every class to have at least ``n_splits`` members.
Classes with fewer are dropped (``n`` and ``n_classes`` report what remains); if fewer than two
classes remain, the table falls back to one-vs-rest on the most frequent class against all others
(a binary "e₂ is X" probe), flagged in the ``task`` column. When even that is impossible, a
clear error is raised.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import ProbeError
from interp.mechanisms.lens import (
    SpanDict,
    SpansFn,
    batches,
    named_position,
    resolve_spans,
)


@torch.no_grad()
def collect_features(hm: Any, examples: Sequence[Any], positions: Sequence[str] = ("e1_last", "final"),
                     layers: Sequence[int] | None = None, spans: Sequence[SpanDict] | None = None,
                     spans_fn: SpansFn | None = None, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Residual features ``[n_layers_sel, n_examples, d_model]`` per named position.

    Batched ``run_with_cache`` with a ``names_filter`` on ``blocks.ℓ.hook_resid_pre``.

    Raises:
        ProbeError: no examples, an unknown position, layers out of range.
    """
    if not examples:
        raise ProbeError("collect_features() got no examples")
    L = hm.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    if any(not 0 <= l < L for l in layers):
        raise ProbeError(f"layers must lie in [0, {L})")
    sp = resolve_spans(examples, hm, spans, spans_fn)
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    wanted = set(names)
    feats = {p: np.zeros((len(layers), len(examples), hm.d_model), dtype=np.float32)
             for p in positions}
    for a, b in batches(len(examples), batch_size):
        toks, lengths = hm.tokenize([ex.prompt for ex in examples[a:b]])
        _, cache = hm.bridge.run_with_cache(toks, names_filter=lambda n: n in wanted)
        stack = torch.stack([cache[n] for n in names]).float().cpu()  # [l, batch, pos, d]
        for j in range(b - a):
            for p in positions:
                idx = named_position(p, sp[a + j], int(lengths[j]))
                feats[p][:, a + j] = stack[:, j, idx].numpy()
    return feats


ESTIMATORS = ("logistic", "ridge")


def _cv_accuracy(X: np.ndarray, y: np.ndarray, n_splits: int, seed: int, C: float,
                 groups: np.ndarray | None = None, estimator: str = "logistic") -> float:
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # the same inverse-regularisation C for both: ridge penalty alpha = 1/C
    head = LogisticRegression(C=C, max_iter=2000) if estimator == "logistic" else RidgeClassifier(alpha=1.0 / C)
    clf = make_pipeline(StandardScaler(), head)
    if groups is not None:  # no group (e.g. one e₁) in both the training and the held-out fold
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return float(cross_val_score(clf, X, y, cv=cv, groups=groups, scoring="accuracy").mean())
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, X, y, cv=cv, scoring="accuracy").mean())


def _prepare_labels(labels: Sequence[Any], n_splits: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Keep classes with ≥ n_splits members; fall back to one-vs-rest. Returns (mask, y, task)."""
    y = np.asarray([str(v) for v in labels])
    classes, counts = np.unique(y, return_counts=True)
    keep = set(classes[counts >= n_splits])
    if len(keep) >= 2:
        mask = np.isin(y, list(keep))
        return mask, y[mask], "identity"
    top = classes[np.argmax(counts)]
    yb = np.where(y == top, "1", "0")  # not a label name: a class called "other" must not collide
    _, c2 = np.unique(yb, return_counts=True)
    if len(c2) < 2 or c2.min() < n_splits:
        raise ProbeError(f"cannot cross-validate with {n_splits} folds: need two classes with at "
                         f">= {n_splits} examples each (class sizes {sorted(counts.tolist())})")
    return np.ones(len(y), bool), yb, f"one_vs_rest:{top}"


def probe_features(features: dict[str, np.ndarray], labels: Sequence[Any],
                   layers: Sequence[int] | None = None, n_splits: int = 5, seed: int = 0,
                   C: float = 1.0, progress: bool = True,
                   groups: Sequence[Any] | None = None, estimator: str = "logistic") -> pd.DataFrame:
    """Cross-validated linear probes with a control task, on precomputed features.

    Args:
        features: position name → ``[n_layers, n_examples, d]`` array.
        labels: one label per example (e.g. e₂'s name).
        layers: layer numbers of the features' first axis (default ``0..n-1``).
        n_splits: StratifiedKFold folds.
        seed: seeds the folds and the control relabelling.
        C: inverse L2 regularisation (``LogisticRegression(C)``, ``RidgeClassifier(alpha=1/C)``).
        progress: tqdm bar.
        groups: one group per example (e.g. e₁'s name); folds never split a group, so a probe
            cannot succeed by recognising e₁ from another template of the same prompt.
        estimator: ``"logistic"`` or ``"ridge"`` (see the module docstring).

    Returns:
        DataFrame: layer, position, accuracy, control_accuracy, selectivity, n, n_classes,
        chance (majority-class rate), task (``"identity"`` or ``"one_vs_rest:<class>"``),
        grouped, estimator.

    Raises:
        ProbeError: label count mismatch, labels that cannot be cross-validated, an unknown
            estimator.
    """
    if estimator not in ESTIMATORS:
        raise ProbeError(f"unknown probe estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    labels = list(labels)
    if not labels:
        raise ProbeError("probe_features got no labels")
    if n_splits < 2:
        raise ProbeError(f"n_splits must be >= 2, got {n_splits}")
    if not C > 0:
        raise ProbeError(f"C (inverse regularisation) must be > 0, got {C}")
    for pos, F in features.items():
        if F.ndim != 3 or F.shape[1] != len(labels):
            raise ProbeError(f"features for {pos!r} have shape {tuple(F.shape)}; expected [n_layers, "
                             f"{len(labels)} examples (one per label), d]")
        if not np.isfinite(F).all():
            raise ProbeError(f"features for {pos!r} contain NaN or inf")
        if layers is not None and len(layers) != F.shape[0]:
            raise ProbeError(f"{len(layers)} layer numbers for {F.shape[0]} feature layers of {pos!r}")
    if groups is not None and len(groups) != len(labels):
        raise ProbeError(f"{len(groups)} groups for {len(labels)} labels")
    mask, y, task = _prepare_labels(labels, n_splits)
    g = None if groups is None else np.asarray([str(v) for v in groups])[mask]
    if g is not None and len(set(g)) < n_splits:
        raise ProbeError(f"grouped folds need >= n_splits={n_splits} distinct groups, got {len(set(g))}")
    rng = np.random.default_rng(seed)
    y_control = rng.permutation(y)  # random relabelling, class sizes preserved
    _, counts = np.unique(y, return_counts=True)
    rows = []
    for pos, F in features.items():
        if F.shape[1] != len(mask):
            raise ProbeError(f"features for {pos!r} have {F.shape[1]} examples, labels {len(mask)}")
        lay = list(range(F.shape[0])) if layers is None else list(layers)
        for k in tqdm(range(F.shape[0]), desc=f"probes {pos}", leave=False, disable=not progress):
            X = F[k][mask]
            acc = _cv_accuracy(X, y, n_splits, seed, C, g, estimator)
            ctl = _cv_accuracy(X, y_control, n_splits, seed, C, g, estimator)
            rows.append({"layer": lay[k], "position": pos, "accuracy": acc,
                         "control_accuracy": ctl, "selectivity": acc - ctl, "n": int(len(y)),
                         "n_classes": int(len(counts)), "chance": float(counts.max() / len(y)),
                         "task": task, "grouped": g is not None, "estimator": estimator})
    return pd.DataFrame(rows)


def probe_scores(features: dict[str, np.ndarray], labels: Sequence[Any],
                 layers: Sequence[int] | None = None, groups: Sequence[Any] | None = None,
                 positive: Any = None, n_splits: int = 5, seed: int = 0, C: float = 1.0,
                 progress: bool = True) -> pd.DataFrame:
    """Held-out probe probability per example: each example is scored by a logistic probe
    (standardised features, ``LogisticRegression(C)``) fitted on the other folds only.

    Folds are ``StratifiedGroupKFold`` when ``groups`` is given (no group in both the fitting
    and the scored fold), else ``StratifiedKFold``; ``sklearn.model_selection.cross_val_predict``
    with ``method="predict_proba"``. Classes with fewer than ``n_splits`` members are dropped
    (their examples get NaN), as in :func:`probe_features`.

    Args:
        features: position name → ``[n_layers, n_examples, d]`` array (:func:`collect_features`).
        labels: one label per example.
        layers: layer numbers of the features' first axis (default ``0..n-1``).
        groups: one group per example (e.g. e₁), or ``None``.
        positive: score the probability of this class (e.g. ``True`` for a binary outcome
            probe); ``None`` scores each example's own label (e.g. its bridge entity).
        n_splits, seed, C, progress: folds, their seed, inverse L2 regularisation, tqdm bar.

    Returns:
        DataFrame: example_id, layer, position, score (held-out probability, NaN for dropped
        examples), n_classes.

    Raises:
        ProbeError: mismatched lengths, fewer than two classes with ``n_splits`` members, too few
            groups, or ``positive`` not among the kept classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray([str(v) for v in labels])
    if n_splits < 2:
        raise ProbeError(f"n_splits must be >= 2, got {n_splits}")
    if groups is not None and len(groups) != len(y):
        raise ProbeError(f"{len(groups)} groups for {len(y)} labels")
    classes, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, classes[counts >= n_splits])
    kept = sorted(set(y[keep]))
    if len(kept) < 2:
        raise ProbeError(f"need two classes with >= {n_splits} examples each (class sizes "
                         f"{sorted(counts.tolist())})")
    if positive is not None and str(positive) not in kept:
        raise ProbeError(f"positive class {positive!r} is not among the probed classes")
    g = None if groups is None else np.asarray([str(v) for v in groups])[keep]
    if g is not None and len(set(g)) < n_splits:
        raise ProbeError(f"grouped folds need >= n_splits={n_splits} distinct groups, got {len(set(g))}")
    cv = (StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed) if g is not None
          else StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed))
    yk = y[keep]
    col = np.searchsorted(kept, yk) if positive is None else np.full(len(yk), kept.index(str(positive)))
    rows = []
    for pos, F in features.items():
        if F.ndim != 3 or F.shape[1] != len(y):
            raise ProbeError(f"features for {pos!r} have shape {tuple(F.shape)}; expected [n_layers, "
                             f"{len(y)}, d]")
        lay = list(range(F.shape[0])) if layers is None else list(layers)
        for k in tqdm(range(F.shape[0]), desc=f"probe scores {pos}", leave=False, disable=not progress):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            proba = cross_val_predict(clf, F[k][keep], yk, cv=cv, groups=g, method="predict_proba")
            score = np.full(len(y), np.nan)
            score[keep] = proba[np.arange(len(yk)), col]
            rows += [{"example_id": i, "layer": lay[k], "position": pos, "score": float(v),
                      "n_classes": len(kept)} for i, v in enumerate(score)]
    return pd.DataFrame(rows)


def probe_bridge_entity(hm: Any, examples: Sequence[Any],
                        positions: Sequence[str] = ("e1_last", "final"),
                        layers: Sequence[int] | None = None, label: str = "e2",
                        n_splits: int = 5, seed: int = 0, C: float = 1.0,
                        spans: Sequence[SpanDict] | None = None, spans_fn: SpansFn | None = None,
                        batch_size: int = 16, progress: bool = True,
                        group: str | None = "e1", estimator: str = "logistic") -> pd.DataFrame:
    """Per-layer probes decoding e₂'s identity from the residual (see module docstring).

    Args:
        hm: any ``HookedModel``.
        examples: objects with ``prompt``, ``char_spans`` and the ``label`` attribute.
        positions, layers, spans, spans_fn, batch_size: feature extraction
            (:func:`collect_features`).
        label, n_splits, seed, C, progress, estimator: probing (:func:`probe_features`).
        group: attribute whose value must not straddle folds (default ``"e1"``: the same prompt
            in another template would otherwise let the probe recognise e₁, not decode e₂);
            ``None`` for plain stratified folds.

    Returns:
        The :func:`probe_features` table.

    Raises:
        ProbeError: as :func:`collect_features` and :func:`probe_features`.
    """
    L = hm.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    feats = collect_features(hm, examples, positions, layers, spans, spans_fn, batch_size)
    groups = [getattr(ex, group) for ex in examples] if group and all(hasattr(ex, group) for ex in examples) else None
    return probe_features(feats, [getattr(ex, label) for ex in examples], layers, n_splits, seed,
                          C, progress, groups, estimator)
