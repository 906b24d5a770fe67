"""Step ``world`` of the shared-template study: one world per condition (``DIR/<condition>/world.json``)."""

from __future__ import annotations


def run(run) -> None:
    """Write each condition's ``world.json`` and ``dataset_summary``, gathered into
    ``DIR/results/dataset_summary.csv`` (``condition`` column)."""
    from interp.study.conditions import condition_run, gather
    from interp.tasks.math_skills import make_math_world

    m = run.cfg.math
    for c in m.conditions:
        sub = condition_run(run, c)
        world = make_math_world(c, seed=m.seed, n_train=m.n_train, n_test=m.n_test,
                                n_composed_train=m.n_composed_train)
        world.to_json(sub.out / "world.json")
        sub.write_csv(world.summary(), "dataset_summary")
    gather(run, ["dataset_summary"])
