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
from interp.study.runner import Step, resolve_config, run_over_seeds, run_pipeline
from interp.study.steps import evaluate, experts, figures, mechanisms, report, seeds, subspace, world

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
#: the last step of a run over several seeds (``[study] seeds``), in ``DIR`` after every ``DIR/seed-S``
SEEDS_STEP = Step("seeds", seeds.run, ("study",))


def run_study(config: str | Path | Config | None = None, out: str | Path = "runs/demo",
              model: str | None = None, steps: list[str] | None = None, device: str | None = None,
              overrides: dict[str, Any] | None = None) -> Path:
    """Run (or resume) the study a config describes into ``out``: the two-hop reuse study, or
    with a ``[math]`` table the shared-template study (:mod:`interp.study.math`). With several
    ``study.seeds``, the study runs once per seed in ``out/seed-S`` and then the ``seeds`` step
    writes the tables and report over seeds in ``out`` (:mod:`interp.study.seeds`); one seed is
    a single run in ``out`` with that seed.

    Args:
        config: TOML path, a :class:`Config`, or ``None`` for the defaults. A missing default
            path ``experiments/two_hop.toml`` falls back to the defaults.
        out: run directory; created if absent; re-using it resumes.
        model: overrides ``study.model`` (a registered name or a local model directory).
        steps: run only these steps (upstream results must exist in ``out``); default all, with
            finished steps whose cache key matches skipped. Over seeds: these steps of every seed.
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
    pipeline = PIPELINE
    if cfg.study_kind == "math":  # a [math] table: the shared-template study
        from interp.study.math import PIPELINE as pipeline
    if len(cfg.study.seeds) > 1:
        return run_over_seeds(pipeline, cfg, out, steps, SEEDS_STEP)
    if cfg.study.seeds:  # one seed: today's single run, with that seed
        from interp.study.seeds import seed_config

        cfg = seed_config(cfg, cfg.study.seeds[0])
    return run_pipeline(pipeline, cfg, out, steps)
