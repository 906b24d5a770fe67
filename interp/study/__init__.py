"""The main job: studies (a config and a step list) run into resumable run directories.

Layout, in pipeline order:

* :mod:`~interp.study.runner` — :class:`Run`, :class:`Step`, cache keys, step markers,
  :func:`cached_csv`, :func:`open_run`;
* :mod:`~interp.study.variants` — the ONE registry of variants (experts, combine, options,
  scoring, subspace analysis); :mod:`~interp.study.oracle` — the oracle's derived scores;
* :mod:`~interp.study.tables` — the results tables and their columns;
* :mod:`~interp.study.steps` — one module per step (world, experts, evaluate, mechanisms,
  subspace, figures, report); :mod:`~interp.study.two_hop` — the two-hop study's step list
  and :func:`run_study`; :mod:`~interp.study.math` — the shared-template study's step list (a
  config with a ``[math]`` table), over :mod:`~interp.study.conditions` (one sub-run per condition);
* :mod:`~interp.study.figures` and :mod:`~interp.study.findings` — what the report shows;
  :mod:`~interp.study.seeds` — tables and findings over the seeds of ``[study] seeds``.

Names are re-exported lazily (PEP 562) so that ``interp.config`` can read the variant registry
without importing the runner, which imports the config: no import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "runner": ("Run", "Step", "cached_csv", "console", "csv_text", "open_run", "run_pipeline",
               "unit_key", "versions"),
    "two_hop": ("PIPELINE", "STEPS", "STEP_DEPS", "run_study"),
    "conditions": ("ConditionRun", "condition_run"),
    "variants": ("EXPERT_DATA", "VARIANTS", "Variant", "needed_experts"),
    "oracle": ("oracle_scores",),
    "tables": ("TABLES",),
    "findings": ("findings",),
    "figures": ("build_figures",),
    "steps.report": ("build_run_report",),
    "steps.evaluate": ("eval_sets",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["StudyError"]


def __getattr__(name: str) -> Any:
    if name == "StudyError":
        from interp.errors import StudyError

        return StudyError
    if name not in _WHERE:
        raise AttributeError(f"module 'interp.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interp.study.{_WHERE[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
