"""Tables of patching results: one variant minus another, and means with standard errors."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from interp.errors import PatchingError


def difference(df_a: pd.DataFrame, df_b: pd.DataFrame, on: Sequence[str],
               value: str = "value", labels: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """One variant minus another (e.g. Uniform minus oracle), matched on ``on``.

    Rows of each table are first averaged over duplicates of the ``on`` keys, then inner-joined.

    Args:
        df_a, df_b: tidy tables from the same function on two model variants.
        on: key columns (e.g. ``["hook", "layer", "position_label"]``).
        value: the numeric column to subtract.
        labels: suffixes naming the two variants in the output.

    Returns:
        DataFrame: ``on`` columns, ``value_<a>``, ``value_<b>``, ``difference`` (a − b).

    Raises:
        PatchingError: a missing column, or no key in common.
    """
    on = list(on)
    for name, df in (("df_a", df_a), ("df_b", df_b)):
        missing = [c for c in on + [value] if c not in df.columns]
        if missing:
            raise PatchingError(f"{name} lacks columns {missing}")
    a = df_a.groupby(on, as_index=False)[value].mean()
    b = df_b.groupby(on, as_index=False)[value].mean()
    out = a.merge(b, on=on, suffixes=(f"_{labels[0]}", f"_{labels[1]}"), how="inner")
    if out.empty:
        raise PatchingError(f"the two tables share no {on} key")
    out["difference"] = out[f"{value}_{labels[0]}"] - out[f"{value}_{labels[1]}"]
    return out


def summarise(df: pd.DataFrame, by: Sequence[str], value: str = "value") -> pd.DataFrame:
    """Mean, standard error and count of ``value`` per group ``by`` (NaNs dropped).

    Raises:
        PatchingError: a missing column.
    """
    missing = [c for c in list(by) + [value] if c not in df.columns]
    if missing:
        raise PatchingError(f"table lacks columns {missing}")
    g = df.dropna(subset=[value]).groupby(list(by))[value]
    out = g.agg(["mean", "sem", "count"]).reset_index()
    return out.rename(columns={"count": "n"})
