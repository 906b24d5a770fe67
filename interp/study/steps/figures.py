"""Step ``figures``: every figure the run's tables allow, into ``DIR/figures``."""

from __future__ import annotations

from interp.study.figures import build_figures


def run(run) -> None:
    """Write ``DIR/figures/NAME.{html,png,json}`` and ``index.json`` (captions)."""
    build_figures(run)
