"""The study's configuration: a TOML file validated against typed dataclasses.

Unknown keys and wrong types are refused with a message naming the key, so a typo never runs a
30-minute study with a default silently substituted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from interp.adapters.recipe import TrainConfig
from interp.errors import InterpError
from interp.files import read_structured


class ConfigError(InterpError, ValueError):
    """A study config has an unknown key, a wrong type or an impossible value."""


@dataclasses.dataclass
class StudySection:
    model: str = "smollm2-135m"
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 or "auto": the cores not busy with other work (interp.hardware)
    # several seeds: one sub-run per seed in DIR/seed-S (its study.seed and training.seed = S), then
    # tables and findings over seeds (interp.study.seeds); empty or one seed: a single run in DIR
    seeds: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WorldSection:
    n_chains_per_tier: int = 64
    n_ac_chains_per_tier: int = 16
    tiers: list[str] = dataclasses.field(default_factory=lambda: ["F", "H", "R"])
    verify_familiarity: bool = True  # needs a pretrained base; off for random-init tiny models
    seed: int = 0


# the [training] section is the training recipe itself: one source of defaults and checks
TrainingSection = TrainConfig


@dataclasses.dataclass
class MethodsSection:
    # Variants evaluated; see interp.study.VARIANTS for what each name means.
    variants: list[str] = dataclasses.field(default_factory=lambda: [
        "base", "expert_ab", "expert_bc", "expert_ac", "uniform", "task_arithmetic", "ties",
        "arrow", "oracle", "uniform+ac", "arrow+ac", "joint_12", "joint_all"])
    task_arithmetic_lambda: float = 1.0
    ties_density: float = 0.5
    arrow_top_k: int = 1
    arrow_temperature: float = 1.0


@dataclasses.dataclass
class EvaluationSection:
    batch_size: int = 32
    held_out_templates: bool = True
    # precision of the models in evaluation and every analysis (evaluate, mechanisms, subspace):
    # auto (tf32 on CUDA, fp32 on the CPU) | fp32 | tf32 (CUDA only: fp32 weights, TF32 matmuls) | bf16;
    # errors of each: README "Precision policy". The runner replaces auto by what it resolved to.
    dtype: str = "auto"


@dataclasses.dataclass
class MechanismsSection:
    variants: list[str] = dataclasses.field(default_factory=lambda: [
        "base", "expert_ab", "expert_bc", "uniform", "arrow", "joint_all"])
    n_examples: int = 24          # two-hop queries per tier for the lens
    n_patching_pairs: int = 3     # clean/corrupted pairs per tier and variant
    patching_variants: list[str] = dataclasses.field(default_factory=lambda: ["base", "uniform"])
    probes: bool = True
    probe_estimator: str = "ridge"  # or "logistic": same held-out accuracy here, 20-60x slower
    probe_layer_stride: int = 1     # probe every k-th layer (and the last)
    patchscope: bool = True
    backpatch: bool = True


@dataclasses.dataclass
class MathSection:
    """The shared-template study (``interp.tasks.math_skills``); its presence selects that study."""

    conditions: list[str] = dataclasses.field(default_factory=lambda: ["separate", "shared"])  # or "bridged"
    n_train: int = 96             # problems per skill (d1, d2)
    n_test: int = 48              # composed test problems (and as many one-skill eval problems)
    n_composed_train: int = 48    # composed problems of d_ac (the ac expert, joint_all)
    n_patching_pairs: int = 8     # clean/corrupted composed pairs per condition and variant
    seed: int = 0


@dataclasses.dataclass
class Config:
    study: StudySection = dataclasses.field(default_factory=StudySection)
    world: WorldSection = dataclasses.field(default_factory=WorldSection)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    methods: MethodsSection = dataclasses.field(default_factory=MethodsSection)
    evaluation: EvaluationSection = dataclasses.field(default_factory=EvaluationSection)
    mechanisms: MechanismsSection = dataclasses.field(default_factory=MechanismsSection)
    # a [math] table makes the run the shared-template study (interp.study.math) instead of two-hop;
    # None keeps every two-hop cache key unchanged (section hashes never include it)
    math: MathSection | None = None

    @property
    def study_kind(self) -> str:
        """``"math"`` when a ``[math]`` table is present, else ``"two_hop"``."""
        return "math" if self.math is not None else "two_hop"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (the cache key of a step). Keys added after runs
        were cached (:data:`HASH_NEW_DEFAULTS`) enter it only when set off their default, so
        existing runs keep their keys."""
        d = self.to_dict()
        if d["evaluation"]["dtype"] == "auto":  # hashed as what it means on this device: on a CPU
            from interp.devices import resolve_analysis_dtype  # fp32, the old default's key

            d["evaluation"]["dtype"] = resolve_analysis_dtype("auto", self.study.device).dtype
        for (sec, key), default in NOT_HASHED.items():  # how a run executes, not what it computes
            if sec in d and key in d[sec]:
                d[sec][key] = default  # hashed as the default: existing runs keep their keys
        for (sec, key), default in HASH_NEW_DEFAULTS.items():
            if sec in d and d[sec].get(key) == default:
                d[sec] = {k: v for k, v in d[sec].items() if k != key}
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: keys that never enter a cache key: torch's thread count changes the speed, and a matmul's
#: summation order, so results move in the last bits (answer log-probs by up to ~0.1 nats on the
#: tiny model, bf16 experts by a few tenths of a point); a resume under another thread count
#: reuses what was computed under the first rather than recomputing every step (README, "Several GPUs")
NOT_HASHED: dict[tuple[str, str], Any] = {("study", "threads"): 0}

#: (section, key) -> default of keys that enter a cache key only when changed from the default
#: (``evaluation.dtype`` "auto" is first resolved for the device: fp32 on a CPU, which is dropped)
HASH_NEW_DEFAULTS: dict[tuple[str, str], Any] = {("evaluation", "dtype"): "fp32", ("study", "seeds"): [],
                                                  ("training", "min_accuracy"): 0.0, ("training", "packing"): False}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # "int | None": None comes from run.json, not TOML
        if value is None and type(None) in typing.get_args(tp):
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check_type(value, tp, key)
    if origin is tuple:  # tuple[str, ...] from a TOML array
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got a boolean")
    if not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (allowed in [{prefix.rstrip('.') or 'top'}]: "
                          f"{', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        optional = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if optional and value is None:  # an absent optional table, as run.json writes it
            kwargs[name] = None
            continue
        tp = optional[0] if optional else tp
        if key == "study.threads" and value == "auto":  # as --threads and $INTERP_THREADS take it
            value = 0
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a table [{key}]")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Value checks beyond types. Raises :class:`ConfigError` naming the key."""
    from interp.study.variants import VARIANTS

    if cfg.world.n_chains_per_tier < 2:
        raise ConfigError("world.n_chains_per_tier must be >= 2")
    bad = [t for t in cfg.world.tiers if t not in ("F", "H", "R")]
    if bad or not cfg.world.tiers:
        raise ConfigError(f"world.tiers must be a non-empty subset of F, H, R (got {cfg.world.tiers})")
    for key, names in (("methods.variants", cfg.methods.variants),
                       ("mechanisms.variants", cfg.mechanisms.variants),
                       ("mechanisms.patching_variants", cfg.mechanisms.patching_variants)):
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ConfigError(f"{key} has unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if cfg.evaluation.batch_size <= 0:
        raise ConfigError(f"evaluation.batch_size must be positive, got {cfg.evaluation.batch_size}")
    bad = cfg.training.problems()
    if bad:
        raise ConfigError(f"training.{bad[0]}")
    seeds = cfg.study.seeds
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"study.seeds must be distinct non-negative integers, got {seeds}")
    if cfg.study.threads < 0:
        raise ConfigError(f"study.threads must be >= 0 (0: automatic), got {cfg.study.threads}")
    from interp.mechanisms.probes import ESTIMATORS

    if cfg.mechanisms.probe_estimator not in ESTIMATORS:
        raise ConfigError(f"mechanisms.probe_estimator must be one of {', '.join(ESTIMATORS)}, "
                          f"got {cfg.mechanisms.probe_estimator!r}")
    if cfg.mechanisms.probe_layer_stride < 1:
        raise ConfigError(f"mechanisms.probe_layer_stride must be >= 1, got {cfg.mechanisms.probe_layer_stride}")
    if not 0 < cfg.methods.ties_density <= 1:
        raise ConfigError("methods.ties_density must be in (0, 1]")
    if cfg.math is not None:
        from interp.tasks.math_skills import CONDITIONS

        bad = [c for c in cfg.math.conditions if c not in CONDITIONS]
        if bad or not cfg.math.conditions or len(set(cfg.math.conditions)) != len(cfg.math.conditions):
            raise ConfigError(f"math.conditions must be distinct names from {', '.join(CONDITIONS)} "
                              f"(got {cfg.math.conditions})")
        for k in ("n_train", "n_test"):
            if getattr(cfg.math, k) < 2:
                raise ConfigError(f"math.{k} must be >= 2, got {getattr(cfg.math, k)}")
        if "bridged" in cfg.math.conditions and cfg.math.n_train < 3:
            raise ConfigError(f"math.n_train must be >= 3 with the bridged condition (one-step and both "
                              f"bridge chains), got {cfg.math.n_train}")
        if cfg.math.n_composed_train < 1 or cfg.math.n_patching_pairs < 0:
            raise ConfigError("math.n_composed_train must be >= 1 (the ac expert) and "
                              "math.n_patching_pairs >= 0")
    if cfg.study.device not in ("cpu", "cuda") and not cfg.study.device.startswith("cuda:"):
        raise ConfigError(f"study.device must be cpu or cuda[:N], got {cfg.study.device!r}")
    from interp.devices import ANALYSIS_CHOICES

    if cfg.evaluation.dtype not in ANALYSIS_CHOICES:
        raise ConfigError(f"evaluation.dtype must be one of {', '.join(ANALYSIS_CHOICES)}, "
                          f"got {cfg.evaluation.dtype!r}")
    if cfg.evaluation.dtype == "tf32" and not cfg.study.device.startswith("cuda"):
        raise ConfigError(f"evaluation.dtype 'tf32' needs study.device cuda (TF32 is a GPU matmul mode), "
                          f"got device {cfg.study.device!r}")
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a study config (TOML). ``None`` gives the defaults.

    Args:
        path: TOML file with tables ``[study] [world] [training] [methods] [evaluation] [mechanisms]``.
        overrides: ``{"study.model": "tiny-llama", ...}`` applied after the file.

    Raises:
        ConfigError: missing file, TOML syntax error, unknown key, wrong type, impossible value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_structured(path, tomllib.loads, ConfigError, "config file", "TOML")
    for dotted, value in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        if not sec or not key:
            raise ConfigError(f"override {dotted!r} must name a section and a key, e.g. 'study.model'")
        data.setdefault(sec, {})[key] = value
    return validate(_build(Config, data, ""))
