"""The shared-template study ("when reuse works", Chen et al. TMLR 2026): its step list.

``interp run --config experiments/math.toml`` (a config with a ``[math]`` table): for each
condition of ``math.conditions`` (``separate``: each skill's data in its own format, bare answers;
``shared``: one step-by-step solution template; ``bridged``: that template, each skill's chains
mixing its operation with a shared bridge operation; :mod:`interp.tasks.math_skills`) the two-hop
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

from pathlib import Path
from typing import Any

from interp.study.conditions import ConditionRun, condition_run, gather, per_condition  # noqa: F401
from interp.study.runner import Step
from interp.study.steps import experts, math_mechanisms, math_report, math_world, subspace
from interp.study.steps import evaluate as evaluate_step


PIPELINE: tuple[Step, ...] = (
    Step("world", math_world.run, ("study", "math")),
    Step("experts", per_condition(experts.run), ("training",)),
    Step("evaluate", per_condition(evaluate_step.run), ("methods", "evaluation"), analysis=True),
    Step("mechanisms", per_condition(math_mechanisms.run), ("mechanisms",), analysis=True),
    Step("subspace", per_condition(subspace.run), analysis=True),
    Step("report", math_report.run),
)
STEPS = [s.name for s in PIPELINE]


def condition_dirs(out: str | Path, cfg: Any) -> dict[str, Path]:
    """``{condition: DIR/<condition>}`` of a math run (for interactive analysis)."""
    return {c: Path(out) / c for c in cfg.math.conditions}
