"""Runs of one condition of a multi-condition study (the shared-template study's ``separate`` and
``shared``): each in ``DIR/<condition>/`` with its own world, experts, cache and tables, sharing
the parent run's base model; :func:`gather` puts the conditions' tables side by side."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pandas as pd

from interp.study.runner import Run


@dataclasses.dataclass
class ConditionRun(Run):
    """The run of one condition, in ``DIR/<condition>/``: its own world, experts, cache and
    tables; the base model is the parent run's (loaded once)."""

    parent: Run | None = None
    condition: str = ""

    def base(self, dtype=None):
        return self.parent.base(dtype)

    def world(self):
        """This condition's :class:`~interp.tasks.math_skills.MathWorld`."""
        from interp.errors import StudyError
        from interp.tasks.math_skills import MathWorld

        p = self.out / "world.json"
        if not p.is_file():
            raise StudyError(f"{p} is missing: run the 'world' step first")
        return MathWorld.from_json(p)


def condition_run(run: Run, condition: str) -> ConditionRun:
    """The :class:`ConditionRun` of ``condition`` inside ``run``'s directory."""
    # dist stays the one-process default: the math steps are not sharded, so they run on rank 0
    # alone and must not split their units with ranks that are not running them
    return ConditionRun(cfg=run.cfg, out=run.out / condition, timings=run.timings, machine=run.machine,
                        parent=run, condition=condition)


def gather(run: Run, names: list[str] | None = None) -> list[str]:
    """Concatenate each condition's ``results/NAME.csv`` into ``DIR/results/NAME.csv`` with a
    ``condition`` column first; ``names=None``: every table some condition wrote. Returns the
    names written."""
    conds = list(run.cfg.math.conditions)
    if names is None:
        names = sorted({p.stem for c in conds for p in (run.out / c / "results").glob("*.csv")})
    written = []
    for name in names:
        frames = []
        for c in conds:
            df = condition_run(run, c).table(name)
            if df is not None:
                df = df.copy()
                df.insert(0, "condition", c)
                frames.append(df)
        if frames:
            run.write_csv(pd.concat(frames, ignore_index=True), name)
            written.append(name)
    return written


def per_condition(fn: Callable[[Any], None]) -> Callable[[Run], None]:
    """A step that runs ``fn`` on every condition's run, then :func:`gather` s the tables."""

    def step(run: Run) -> None:
        for c in run.cfg.math.conditions:
            fn(condition_run(run, c))
        gather(run)

    step.__doc__ = f"{fn.__module__}.run on every condition, tables gathered"
    return step
