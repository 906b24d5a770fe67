"""The shared-template study ("when reuse works", Chen et al. TMLR 2026): its step list.

``interp run --config experiments/math.toml`` (a config with a ``[math]`` table): for each
condition of ``math.conditions`` (``separate``: each skill's data in its own format, bare answers;
``shared``: one step-by-step solution template; :mod:`interp.tasks.math_skills`) the two-hop
study's machinery runs unchanged on that condition's world — experts ``ab`` (skill A, split
``d1``), ``bc`` (skill B, ``d2``), ``ac`` (composed problems, ``d_ac``), the joint upper bounds,
and every variant of :mod:`interp.study.variants` — in ``DIR/<condition>/``; each step then
gathers the conditions' tables into ``DIR/results/NAME.csv`` with a ``condition`` column, so
success and failure sit side by side (in ``accuracy``, ``test_set`` is the condition).

Steps: world → experts → evaluate → mechanisms (:mod:`interp.study.steps.math_mechanisms`:
logit lens and probes of the intermediate result at each solution step, patching of that step,
per-adapter contributions per step) → subspace → report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from interp.study.runner import Run, Step
from interp.study.steps import experts, math_mechanisms, math_report, math_world, subspace
from interp.study.steps import evaluate as evaluate_step


@dataclasses.dataclass
class ConditionRun(Run):
    """The run of one condition, in ``DIR/<condition>/``: its own world, experts, cache and
    tables; the base model is the parent run's (loaded once)."""

    parent: Run | None = None
    condition: str = ""

    def base(self):
        return self.parent.base()

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


PIPELINE: tuple[Step, ...] = (
    Step("world", math_world.run, ("study", "math")),
    Step("experts", per_condition(experts.run), ("training",)),
    Step("evaluate", per_condition(evaluate_step.run), ("methods", "evaluation")),
    Step("mechanisms", per_condition(math_mechanisms.run), ("mechanisms",)),
    Step("subspace", per_condition(subspace.run)),
    Step("report", math_report.run),
)
STEPS = [s.name for s in PIPELINE]


def condition_dirs(out: str | Path, cfg: Any) -> dict[str, Path]:
    """``{condition: DIR/<condition>}`` of a math run (for interactive analysis)."""
    return {c: Path(out) / c for c in cfg.math.conditions}
