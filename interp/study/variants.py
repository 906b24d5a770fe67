"""The study's variants, in ONE registry: what each is, how it is loaded, scored and analysed.

Named as in the paper (Chen et al. 2025): experts ``ab`` (D₁: e₁ r₁ → e₂), ``bc`` (D₂: e₂ r₂ →
e₃), ``ac`` (D_AC: the target two-hop task); libraries "2-comb" = {ab, bc} and "2-comb+AC" =
{ab, bc, ac}; upper bounds ``joint_12`` (one LoRA on D₁ ∪ D₂) and ``joint_all`` (D₁ ∪ D₂ ∪ D_AC).
``oracle`` is routing's upper bound: per query, the library expert that does best on it (hop-1
queries → ab, hop-2 → bc, two-hop → the better of the two, per example).

A new variant is one :class:`Variant` entry in :data:`VARIANTS`; the steps read everything
else (experts to train, load options, scoring, subspace analysis, the findings' groups) from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from interp.study.oracle import score_oracle

# expert name -> training splits of the world
EXPERT_DATA: dict[str, tuple[str, ...]] = {
    "ab": ("d1",), "bc": ("d2",), "ac": ("d_ac",),
    "joint_12": ("d1", "d2"), "joint_all": ("d1", "d2", "d_ac"),
}
TARGET_SPLIT = "d_ac"  # the two-hop task itself: a variant with an expert trained on it "has A→C data"
# Oracles of the span-deficit analysis: updates that do compose, compared with the 2-comb library's
# spans. ``ac`` is always trained for it; ``joint_all`` is used when some variant needs it anyway.
SPAN_DEFICIT_ORACLES = ("ac", "joint_all")
LIBRARY = ("ab", "bc")  # the 2-comb library whose merges the subspace step analyses

Options = Callable[[Any], dict[str, Any]]  # cfg.methods -> keyword options of load_hooked
# (library expert deltas in LIBRARY order, cfg.methods) -> merged {module: LoraDelta}
MergeDeltas = Callable[[Sequence[Mapping[str, Any]], Any], Mapping[str, Any]]


def _none(methods: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Variant:
    """One model the study evaluates.

    Attributes:
        name: the ``method`` column of every table.
        library: the ``library`` column ("2-comb", "single expert"...).
        experts: expert adapters loaded (names of :data:`EXPERT_DATA`); ``()`` = the base model.
        combine: ``interp.load_hooked``'s ``combine`` (``"oracle"``: loaded unmerged, scored from
            its ``scored_from`` variants).
        options: ``cfg.methods`` -> keyword options for ``load_hooked`` (λ, density, top-k...).
        role: ``"base"``, ``"expert"``, ``"reuse"`` (a merge or router of the 2-comb library:
            the paper's claim 1), ``"upper bound"``.
        scored_from: variants whose per-query scores this one is derived from (the oracle:
            the hop-1 expert, then the hop-2 expert); empty = the variant answers itself.
        derive: ``(run, query sets, [scores of scored_from]) -> scores`` for a derived variant
            (:func:`interp.study.oracle.score_oracle`).
        merge_deltas: the merged ΔW computed from the library's factors, for the subspace step
            (analysed in every run, whether or not the variant is evaluated).
        deltas_from_model: analyse the loaded model's own ``info["deltas"]`` when the variant
            is evaluated (merges we cannot rebuild from the factors, e.g. peft's).
        target_weights: ``cfg.methods`` -> the weight of each expert in the merge's own target
            ``Σ wᵢ ΔWᵢ`` (``None``: the 1/n average); cross terms are measured against it.
    """

    name: str
    library: str
    experts: tuple[str, ...]
    combine: str
    options: Options = _none
    role: str = "reuse"
    scored_from: tuple[str, ...] = ()
    derive: Callable[..., Any] | None = None
    merge_deltas: MergeDeltas | None = None
    deltas_from_model: bool = False
    target_weights: Callable[[Any], float] | None = None

    @property
    def load_combine(self) -> str:
        return "none" if self.scored_from else self.combine

    @property
    def has_target_data(self) -> bool:
        """Some expert of this variant was trained on the two-hop task itself (D_AC)."""
        return any(TARGET_SPLIT in EXPERT_DATA[e] for e in self.experts)


def _uniform(pair, m):
    from interp.adapters.merge import weighted_average

    return weighted_average(pair, [0.5, 0.5])


def _task_arithmetic(pair, m):
    from interp.adapters.merge import task_arithmetic

    return task_arithmetic(pair, m.task_arithmetic_lambda)


def _ties(pair, m):
    from interp.adapters.merge import ties

    return ties(pair, m.ties_density, [1.0, 1.0])


_COMB, _COMB_AC = LIBRARY, LIBRARY + ("ac",)
_V = [
    Variant("base", "none", (), "none", role="base"),
    Variant("expert_ab", "single expert", ("ab",), "none", role="expert"),
    Variant("expert_bc", "single expert", ("bc",), "none", role="expert"),
    Variant("expert_ac", "single expert", ("ac",), "none", role="expert"),
    Variant("uniform", "2-comb", _COMB, "uniform", merge_deltas=_uniform),
    Variant("task_arithmetic", "2-comb", _COMB, "task_arithmetic",
            options=lambda m: {"lam": m.task_arithmetic_lambda}, merge_deltas=_task_arithmetic,
            target_weights=lambda m: m.task_arithmetic_lambda),
    Variant("ties", "2-comb", _COMB, "ties", options=lambda m: {"density": m.ties_density},
            merge_deltas=_ties),
    Variant("peft_linear", "2-comb", _COMB, "peft_linear", deltas_from_model=True),
    Variant("arrow", "2-comb", _COMB, "arrow",
            options=lambda m: {"top_k": m.arrow_top_k, "temperature": m.arrow_temperature}),
    Variant("mixture", "2-comb", _COMB, "mixture"),
    Variant("oracle", "2-comb", _COMB, "oracle", role="upper bound",
            scored_from=("expert_ab", "expert_bc"), derive=score_oracle),
    Variant("uniform+ac", "2-comb+AC", _COMB_AC, "uniform"),
    Variant("arrow+ac", "2-comb+AC", _COMB_AC, "arrow",
            options=lambda m: {"top_k": m.arrow_top_k, "temperature": m.arrow_temperature}),
    Variant("joint_12", "joint D1+D2", ("joint_12",), "none", role="upper bound"),
    Variant("joint_all", "joint D1+D2+D_AC", ("joint_all",), "none", role="upper bound"),
]
VARIANTS: dict[str, Variant] = {v.name: v for v in _V}


def expert_label(expert: str) -> str:
    """The name of the variant that is ``expert`` alone (``ab`` -> ``expert_ab``)."""
    return next((v.name for v in _V if v.experts == (expert,)), expert)


def reuse_variants(names: Sequence[str]) -> list[str]:
    """Those of ``names`` that merge or route the 2-comb library, in registry order."""
    have = set(names)
    return [v.name for v in _V if v.role == "reuse" and v.name in have]


def target_data_variants(names: Sequence[str]) -> list[str]:
    """Those of ``names`` with an expert trained on D_AC: library reuses first, then single
    experts and joint training (so ties in the findings go to a reuse of the library)."""
    have = set(names)
    vs = [v for v in _V if v.has_target_data and v.name in have]
    return [v.name for v in sorted(vs, key=lambda v: len(v.experts) == 1)]


def evaluated_inputs(variants: Sequence[str]) -> list[str]:
    """The variants that must be scored by the model itself so that ``variants`` can be
    tabulated: each one, or for a derived variant (the oracle) the ones it is scored from."""
    out: list[str] = [v for v in variants if not VARIANTS[v].scored_from]
    for v in variants:
        out += [u for u in VARIANTS[v].scored_from if u not in out]
    return out


def needed_experts(cfg: Any) -> list[str]:
    """Experts to train: those of every configured variant (evaluation and mechanisms), plus the
    span-deficit oracle ``ac`` of the subspace step."""
    names: list[str] = []
    for v in list(cfg.methods.variants) + list(cfg.mechanisms.variants):
        for e in VARIANTS[v].experts:
            if e not in names:
                names.append(e)
    if SPAN_DEFICIT_ORACLES[0] not in names:
        names.append(SPAN_DEFICIT_ORACLES[0])
    return names
