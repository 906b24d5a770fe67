"""How well a per-example measurement separates two groups (e.g. composed vs failed chains): the
area under the ROC curve with a DeLong or a bootstrap interval.

``AUC = P(score of a positive > score of a negative) + ½·P(tie)`` — the Mann-Whitney U statistic
divided by ``n_pos · n_neg`` (Hanley & McNeil 1982). 0.5 = no separation; below 0.5 the negatives
score higher. Intervals:

* :func:`delong_interval` — DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two
  or more correlated ROC curves", Biometrics 44: the variance of the AUC from its structural
  components ``V10_i = mean_j ψ(x_i, y_j)`` (per positive) and ``V01_j = mean_i ψ(x_i, y_j)``
  (per negative), ``ψ = 1 / ½ / 0`` for ``x > y`` / ``=`` / ``<``::

      Var(AUC) = s²(V10) / n_pos + s²(V01) / n_neg

  computed from mid-ranks (Sun & Xu 2014, IEEE SPL 21), with the normal interval
  ``AUC ± z·√Var`` clipped to [0, 1];
* :func:`bootstrap_interval` — percentile interval of the AUC over resamples drawn within each
  group (stratified, so every resample has both groups).

:func:`stratified_delong_interval` compares positives only with negatives of the same stratum
(e.g. the same relation pair), so a confounder between strata cannot make separation.
:func:`separation_table` runs these on a tidy table of per-example scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from interp.errors import MechanismError


class SeparationError(MechanismError):
    """Scores and labels that cannot give an AUC (mismatched, non-finite, one group empty)."""


def _split(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise SeparationError(f"need one label per score: scores {s.shape}, labels {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, [0, 1]).all():
            raise SeparationError("labels must be booleans or 0/1 (1 = positive group)")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise SeparationError("scores contain NaN or inf; drop those examples first")
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise SeparationError(f"AUC needs both groups: {len(pos)} positive, {len(neg)} negative")
    return pos, neg


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (Mann-Whitney U / (n_pos·n_neg)).

    Args:
        scores: ``[n]`` real scores (higher = more like the positive group).
        labels: ``[n]`` booleans or 0/1; True / 1 = positive.

    Returns:
        AUC in [0, 1]; ties count ½.

    Raises:
        SeparationError: lengths differ, non-finite scores, or a group is empty.
    """
    pos, neg = _split(scores, labels)
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return float(u / (len(pos) * len(neg)))


def _delong_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the structural components V10 ``[n_pos]``, V01 ``[n_neg]`` from mid-ranks."""
    m, n = len(pos), len(neg)
    r_all = stats.rankdata(np.concatenate([pos, neg]))  # mid-ranks: ties count ½
    r_pos, r_neg = stats.rankdata(pos), stats.rankdata(neg)
    v10 = (r_all[:m] - r_pos) / n           # per positive: share of negatives below it
    v01 = 1.0 - (r_all[m:] - r_neg) / m     # per negative: share of positives above it
    return float(v10.mean()), v10, v01


def _delong_var(v10: np.ndarray, v01: np.ndarray) -> float:
    """DeLong's variance of the AUC from its structural components (module docstring)."""
    return float(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))


def _normal_interval(a: float, var: float, level: float) -> tuple[float, float]:
    """``a ± z·√var`` at coverage ``level``, clipped to [0, 1]."""
    half = stats.norm.ppf(0.5 + level / 2) * np.sqrt(var)
    return float(max(0.0, a - half)), float(min(1.0, a + half))


def delong_interval(scores: Sequence[float], labels: Sequence[bool],
                    level: float = 0.95) -> tuple[float, float, float]:
    """AUC with DeLong's (1988) normal interval (module docstring).

    Args:
        scores, labels: as :func:`auc`.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``(auc, lo, hi)``; the interval is clipped to [0, 1]. With one positive or one negative
        a variance term is undefined and the interval is ``(nan, nan)``.

    Raises:
        SeparationError: as :func:`auc`, or ``level`` outside (0, 1).
    """
    if not 0 < level < 1:
        raise SeparationError(f"level must lie in (0, 1), got {level}")
    pos, neg = _split(scores, labels)
    a, v10, v01 = _delong_components(pos, neg)
    if len(pos) < 2 or len(neg) < 2:
        return a, float("nan"), float("nan")
    return (a, *_normal_interval(a, _delong_var(v10, v01), level))


def bootstrap_interval(scores: Sequence[float], labels: Sequence[bool], level: float = 0.95,
                       n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """AUC with a stratified percentile bootstrap interval.

    Each resample draws ``n_pos`` positives and ``n_neg`` negatives with replacement
    (``numpy.random.default_rng(seed)``).

    Returns:
        ``(auc, lo, hi)``: the AUC of the data and the ``(1−level)/2``, ``(1+level)/2``
        quantiles of the resampled AUCs.

    Raises:
        SeparationError: as :func:`auc`, ``level`` outside (0, 1), ``n_boot < 1``.
    """
    if not 0 < level < 1:
        raise SeparationError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise SeparationError(f"n_boot must be >= 1, got {n_boot}")
    pos, neg = _split(scores, labels)
    rng = np.random.default_rng(seed)
    m, n = len(pos), len(neg)
    bp = pos[rng.integers(0, m, size=(n_boot, m))]
    bn = neg[rng.integers(0, n, size=(n_boot, n))]
    # vectorised Mann-Whitney per resample: rank the pooled values row by row
    r = stats.rankdata(np.concatenate([bp, bn], axis=1), axis=1)
    aucs = (r[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return auc(np.concatenate([pos, neg]), np.r_[np.ones(m, bool), np.zeros(n, bool)]), \
        float(lo), float(hi)


def stratified_delong_interval(scores: Sequence[float], labels: Sequence[bool],
                               strata: Sequence, level: float = 0.95) -> tuple[float, float, float, int, int]:
    """AUC comparing positives only with negatives of the same stratum, with a DeLong interval.

    ``AUC_s = Σ_s U_s / Σ_s m_s n_s`` — the share of same-stratum (positive, negative) pairs
    ordered right (the stratified Mann-Whitney statistic, cf. van Elteren 1960), i.e. the
    per-stratum AUCs averaged with weights ``w_s ∝ m_s n_s``. Strata are independent, so
    ``Var = Σ_s w_s² Var_DeLong(AUC_s)``. A confounder that shifts both the score and the outcome
    between strata (e.g. the relation pair of a chain) cannot create separation here.

    Args:
        scores, labels: as :func:`auc`.
        strata: ``[n]`` stratum of each example.
        level: interval coverage.

    Returns:
        ``(auc, lo, hi, n_pos, n_neg)``; only strata with at least two positives and two negatives
        are used, and ``n_pos``/``n_neg`` count the examples in them. ``(nan, nan, nan, 0, 0)``
        when no stratum qualifies.

    Raises:
        SeparationError: as :func:`auc` (lengths, non-finite scores), ``level`` outside (0, 1).
    """
    if not 0 < level < 1:
        raise SeparationError(f"level must lie in (0, 1), got {level}")
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    g = np.asarray(strata)
    if not (s.shape == y.shape == g.shape) or s.ndim != 1:
        raise SeparationError(f"need one label and one stratum per score: {s.shape}, {y.shape}, {g.shape}")
    parts = []
    for key in dict.fromkeys(g.tolist()):
        m = g == key
        pos, neg = s[m & y], s[m & ~y]
        if len(pos) < 2 or len(neg) < 2:
            continue
        if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
            raise SeparationError("scores contain NaN or inf; drop those examples first")
        a, v10, v01 = _delong_components(pos, neg)
        parts.append((len(pos) * len(neg), a, _delong_var(v10, v01), len(pos), len(neg)))
    if not parts:
        return float("nan"), float("nan"), float("nan"), 0, 0
    w = np.array([p[0] for p in parts], float)
    w /= w.sum()
    a = float(np.dot(w, [p[1] for p in parts]))
    lo, hi = _normal_interval(a, float(np.dot(w ** 2, [p[2] for p in parts])), level)
    return a, lo, hi, sum(p[3] for p in parts), sum(p[4] for p in parts)


SEPARATION_COLUMNS = ("measurement", "layer", "position", "n_pos", "n_neg", "auc", "lo", "hi",
                      "boot_lo", "boot_hi")


def separation_table(scores: pd.DataFrame, labels: pd.Series | dict, *, id_col: str = "chain_id",
                     score_col: str = "score",
                     keys: Sequence[str] = ("measurement", "layer", "position"),
                     level: float = 0.95, n_boot: int = 0, seed: int = 0,
                     strata: pd.Series | dict | None = None) -> pd.DataFrame:
    """AUC of every measurement (one per ``keys`` group) for separating the two label groups.

    Args:
        scores: tidy rows ``id_col, *keys, score_col`` (one score per example and group; rows
            with a NaN score are dropped, so ``n_pos``/``n_neg`` count what each AUC used).
        labels: ``id → bool`` (True = positive, e.g. composed), a Series indexed by id or a dict.
        keys: columns naming a measurement; a missing one is filled with ``""``.
        level: interval coverage.
        n_boot: bootstrap resamples for ``boot_lo``/``boot_hi`` (0 = none, NaN columns).
        seed: bootstrap seed.
        strata: ``id → stratum``; when given, every AUC is the within-stratum one of
            :func:`stratified_delong_interval` (no bootstrap) and ``n_pos``/``n_neg`` count the
            strata it used.

    Returns:
        DataFrame with :data:`SEPARATION_COLUMNS` (``lo``/``hi``: DeLong), in the order the groups
        first appear; groups that lack one of the two classes get NaN AUC.

    Raises:
        SeparationError: missing ``id_col``/``score_col``, or an id without a label.
    """
    for c in (id_col, score_col):
        if c not in scores.columns:
            raise SeparationError(f"scores table lacks column {c!r} (has {list(scores.columns)})")
    lab = pd.Series(labels) if isinstance(labels, dict) else labels
    missing = set(scores[id_col]) - set(lab.index)
    if missing:
        raise SeparationError(f"{len(missing)} ids have no label, e.g. {sorted(missing)[:3]}")
    df = scores.copy()
    for k in keys:
        if k not in df.columns:
            df[k] = ""
    df = df[np.isfinite(df[score_col].astype(float))]
    df["_y"] = lab.loc[df[id_col]].astype(bool).to_numpy()
    rows = []
    for key, g in df.groupby(list(keys), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n_pos, n_neg = int(g["_y"].sum()), int((~g["_y"]).sum())
        row = dict(zip(keys, key), n_pos=n_pos, n_neg=n_neg, auc=np.nan, lo=np.nan, hi=np.nan,
                   boot_lo=np.nan, boot_hi=np.nan)
        if strata is not None:
            st = (pd.Series(strata) if isinstance(strata, dict) else strata).loc[g[id_col]]
            a, lo, hi, row["n_pos"], row["n_neg"] = stratified_delong_interval(
                g[score_col], g["_y"], st.to_numpy(), level)
            row.update(auc=a, lo=lo, hi=hi)
        elif n_pos and n_neg:
            row["auc"], row["lo"], row["hi"] = delong_interval(g[score_col], g["_y"], level)
            if n_boot:
                _, row["boot_lo"], row["boot_hi"] = bootstrap_interval(g[score_col], g["_y"], level,
                                                                       n_boot, seed)
        rows.append(row)
    out = pd.DataFrame(rows)
    return out[list(keys) + [c for c in SEPARATION_COLUMNS if c not in ("measurement", "layer",
                                                                         "position")]]
