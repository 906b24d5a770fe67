"""The two-hop LoRA-reuse study (Chen et al. 2025): its step list over the study runner.

``interp run`` = world → experts → evaluation of every variant (base, each expert, merges,
routers, joint-training upper bounds; :mod:`interp.study.variants`) → bridge-entity mechanisms →
subspace geometry → figures → report, into one resumable run directory
(:mod:`interp.study.runner`). Another study is another config and step list over the same runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interp.config import Config
from interp.study.runner import Step, resolve_config, run_pipeline
from interp.study.steps import evaluate, experts, figures, mechanisms, report, subspace, world

PIPELINE: tuple[Step, ...] = (
    Step("world", world.run, ("study", "world")),
    Step("experts", experts.run, ("training",), sharded=True),
    Step("evaluate", evaluate.run, ("methods", "evaluation"), sharded=True, analysis=True),
    Step("mechanisms", mechanisms.run, ("mechanisms",), sharded=True, analysis=True),
    Step("subspace", subspace.run, sharded=True, analysis=True),
    Step("figures", figures.run),
    Step("report", report.run),
)
STEPS = [s.name for s in PIPELINE]
STEP_DEPS = {s.name: s.deps for s in PIPELINE}


def run_study(config: str | Path | Config | None = None, out: str | Path = "runs/demo",
              model: str | None = None, steps: list[str] | None = None, device: str | None = None,
              overrides: dict[str, Any] | None = None) -> Path:
    """Run (or resume) the study a config describes into ``out``: the two-hop reuse study, or
    with a ``[math]`` table the shared-template study (:mod:`interp.study.math`).

    Args:
        config: TOML path, a :class:`Config`, or ``None`` for the defaults. A missing default
            path ``experiments/two_hop.toml`` falls back to the defaults.
        out: run directory; created if absent; re-using it resumes.
        model: overrides ``study.model`` (a registered name or a local model directory).
        steps: run only these steps (upstream results must exist in ``out``); default all, with
            finished steps whose cache key matches skipped.
        device: overrides ``study.device``.
        overrides: dotted config overrides, e.g. ``{"world.n_chains_per_tier": 8}``.

    Returns:
        The run directory.

    Raises:
        ConfigError: invalid config or unknown step. StudyError: unwritable directory, missing
        upstream step. TrainingError / FusedProjectionError: ``training.target_modules`` the model
        lacks (checked on its meta-device skeleton before any step runs).
    """
    ov = dict(overrides or {})
    if model:
        ov["study.model"] = model
    if device:
        ov["study.device"] = device
    cfg = resolve_config(config, ov)
    if steps is None or "experts" in steps:  # before the world step writes anything
        from interp.adapters.train import check_training_targets

        check_training_targets(cfg.study.model, cfg.training.target_modules)
    if cfg.study_kind == "math":  # a [math] table: the shared-template study
        from interp.study.math import PIPELINE as MATH_PIPELINE

        return run_pipeline(MATH_PIPELINE, cfg, out, steps)
    return run_pipeline(PIPELINE, cfg, out, steps)
