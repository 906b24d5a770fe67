"""The study's result tables (``DIR/results/NAME.csv``): which step writes each and the columns
its readers (figures, findings, the report, the notebook) rely on.

:meth:`interp.study.runner.Run.write_csv` checks every table against this list, so a step
cannot silently drop a column a figure reads, nor write a table nobody declared.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from interp.errors import StudyError


@dataclass(frozen=True)
class Table:
    """One results table: the step that writes it and the columns it must have."""

    name: str
    step: str
    columns: tuple[str, ...]


_ID = ("method", "example_id", "tier")
TABLES: dict[str, Table] = {t.name: t for t in [
    Table("dataset_summary", "world", ("split", "tier", "kind", "n")),
    Table("familiarity", "world", ("tier", "measure", "n", "value")),
    Table("familiarity_names", "world", ()),
    Table("experts", "experts", ("expert", "data", "steps", "final_loss", "train_first_token_acc",
                                  "retrained", "first_attempt_acc")),
    Table("scores", "evaluate", ("method", "library", "test_set", "hop", "prompt", "answer",
                                 "first_token_correct", "exact_match")),
    Table("accuracy", "evaluate", ("method", "library", "test_set", "hop", "metric", "n",
                                   "accuracy", "ci_low", "ci_high")),
    Table("lens", "mechanisms", _ID + ("layer", "position", "target", "logprob", "rank")),
    Table("patching", "mechanisms", _ID + ("hook", "layer", "position", "position_label", "value")),
    Table("backpatch", "mechanisms", _ID + ("source_layer", "target_layer", "fixed")),
    Table("knockout", "mechanisms", _ID + ("layer", "delta")),
    Table("patchscope", "mechanisms", _ID + ("source_layer", "target", "top1")),
    Table("probes", "mechanisms", ("method", "layer", "position", "accuracy", "selectivity")),
    # the shared-template study (interp.study.math): per condition, gathered with a condition column
    Table("math_lens", "mechanisms", ("method", "example_id", "tier", "position", "layer", "target",
                                      "logprob", "rank")),
    Table("math_patching", "mechanisms", ("method", "example_id", "hook", "layer", "position",
                                          "position_label", "region", "value")),
    Table("math_contributions", "mechanisms", ("method", "layer", "adapter", "segment", "norm")),
    Table("math_summary", "report", ("method", "library", "condition")),
    Table("subspace_adapters", "subspace", ("adapter", "module", "layer", "rank")),
    Table("subspace_spectra", "subspace", ("adapter", "module", "index", "sigma")),
    Table("subspace_overlap", "subspace", ("adapter_1", "adapter_2", "module", "phi_col", "phi_row",
                                           "cosine")),
    Table("subspace_merges", "subspace", ("merged", "module", "cross_term_energy")),
    Table("subspace_span_deficit", "subspace", ("module", "layer", "span_deficit", "oracle")),
    Table("subspace_layer_energy", "subspace", ("adapter", "layer", "energy_fraction", "bridge_layer")),
    # a run over several seeds (interp.study.seeds): DIR/results/, from the seeds' own tables
    Table("accuracy_seeds", "seeds", ("method", "n_seeds", "mean", "std", "min", "max")),
    Table("findings_seeds", "seeds", ("claim", "seed", "verdict", "agree")),
    Table("subspace_key_overlap", "subspace", ("module", "layer", "kappa_composed", "kappa_native")),
]}


def check_table(name: str, df: pd.DataFrame) -> None:
    """Raise :class:`StudyError` if ``name`` is not a declared table or ``df`` (when non-empty)
    lacks one of its columns."""
    if name not in TABLES:
        raise StudyError(f"results table {name!r} is not declared in interp.study.tables.TABLES")
    missing = [c for c in TABLES[name].columns if c not in df.columns]
    if missing and len(df):
        raise StudyError(f"results table {name!r} lacks column(s) {missing}")
