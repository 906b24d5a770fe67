"""The diagnosis as a study-runner pipeline: inventory → geometry → keys → variants → report.

Each step writes tidy CSVs under ``DIR/results`` (:func:`write_table`, atomic) and is cached and
resumable by :func:`interp.study.runner.run_pipeline`; the ``variants`` step also caches per
variant (:func:`interp.diagnose.variants.cached_variant`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from interp.diagnose.inputs import Query, read_prompts
from interp.study.runner import Run, Step, csv_text


@dataclasses.dataclass
class _StudySection:
    model: str
    seed: int = 0
    device: str = "cpu"
    threads: int = 0


@dataclasses.dataclass
class _TrainingSection:
    precision: str = "fp32"  # nothing is trained; fixed so that no bf16 probe runs
    seed: int = 0


@dataclasses.dataclass
class _WorldSection:
    seed: int = 0  # no world is generated; run.json records the seeds of every section


@dataclasses.dataclass
class DiagnoseConfig:
    """The run's config, shaped like :class:`interp.config.Config` where the runner reads it
    (``study``, ``training.precision``, the seeds, :meth:`section_hash`, :meth:`to_dict`).

    ``diagnose`` holds ``adapters`` (name → dir), ``combines``, ``prompts`` (path or None),
    ``target`` (``[name, dir]`` or None), ``batch_size``, ``fingerprint`` (hashes of the adapter
    files and the prompts, so a changed file invalidates the cache) and ``notes``.
    """

    study: _StudySection
    diagnose: dict
    training: _TrainingSection = dataclasses.field(default_factory=_TrainingSection)
    world: _WorldSection = dataclasses.field(default_factory=_WorldSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class DiagnoseRun(Run):
    """A diagnosis run directory opened for analysis (:func:`interp.diagnose.open_diagnosis`).

    >>> run = open_diagnosis("runs/diagnose"); bp = run.read_csv("backpatch"); hm = run.load_variant("ties")
    """

    @classmethod
    def from_runjson(cls, out: Path, data: dict[str, Any]) -> "DiagnoseRun":
        c = data["config"]
        cfg = DiagnoseConfig(study=_StudySection(**c["study"]), diagnose=c["diagnose"],
                             training=_TrainingSection(**c.get("training", {})),
                             world=_WorldSection(**c.get("world", {})))
        return cls(cfg, Path(out), timings=data.get("timings", {}))

    @property
    def variant_names(self) -> list[str]:
        """``base``, ``expert_<name>`` per adapter, then each combine (report order)."""
        from interp.diagnose.variants import plan_variants

        return [v.name for v in plan_variants(list(self.cfg.diagnose["adapters"]), self.cfg.diagnose["combines"])]

    def load_variant(self, variant: str):
        """The variant's ``HookedModel`` (hook points included), loaded exactly as the diagnosis
        loaded it (:func:`interp.diagnose.variants.load_variant`: same adapters, combine, options).

        Raises:
            DiagnoseError: ``variant`` is not one of :attr:`variant_names`.
        """
        from interp.diagnose.inputs import DiagnoseError
        from interp.diagnose.variants import load_variant, plan_variants

        plan = {v.name: v for v in plan_variants(list(self.cfg.diagnose["adapters"]), self.cfg.diagnose["combines"])}
        if variant not in plan:
            raise DiagnoseError(f"unknown variant {variant!r}; this diagnosis has {', '.join(plan)}")
        return load_variant(self, plan[variant])

    def queries(self) -> list[Query]:
        """The prompts the diagnosis read ([] without a prompts file)."""
        return queries(self)


def write_table(run: Any, df: pd.DataFrame, name: str) -> Path:
    """``DIR/results/NAME.csv`` (atomic, 6 significant digits)."""
    from interp.models import atomic_write_text

    path = run.results / f"{name}.csv"
    atomic_write_text(path, csv_text(df, significant=6))
    return path


def queries(run: Any) -> list[Query]:
    """The run's prompts ([] without a prompts file)."""
    p = run.cfg.diagnose.get("prompts")
    return read_prompts(p, list(run.cfg.diagnose["adapters"])) if p else []


def library(run: Any, adapters: dict[str, str] | None = None):
    """The adapters as a validated :class:`~interp.adapters.AdapterLibrary`, checked against a
    fresh, unbridged copy of the base (DoRA/PiSSA rebuilds read the plain module tree)."""
    from interp.adapters import AdapterLibrary
    from interp.models import load_hf

    hf, _ = load_hf(run.model)
    return AdapterLibrary.load(run.model, adapters or run.cfg.diagnose["adapters"], hf_model=hf)


def inventory_table(lib: Any) -> pd.DataFrame:
    """One row per adapter: PEFT features, ranks, alphas, scales s, targets, layers, sites."""
    from interp.adapters.factors import layer_of, short_module

    rows = []
    for a in lib.names:
        cfg, fac = lib.configs[a], (lib.factors or lib.deltas)[a]
        ranks = sorted({d.rank for d in fac.values()})
        scales = sorted({round(d.scale, 6) for d in fac.values()})
        layers = sorted({layer_of(m) for m in fac if layer_of(m) is not None})
        rows.append(dict(
            adapter=a, directory=lib.dirs[a], r=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"),
            ranks=" ".join(map(str, ranks)), scales=" ".join(f"{s:g}" for s in scales),
            use_rslora=bool(cfg.get("use_rslora")), use_dora=bool(cfg.get("use_dora")),
            features=(lib.parts[a].describe(tuple(lib.parts[a].features)) if a in lib.parts else "") or "plain LoRA",
            targets=" ".join(sorted({short_module(m) for m in fac})), n_sites=len(fac),
            layers=f"{layers[0]}–{layers[-1]}" if layers else "",
            init=str(cfg.get("init_lora_weights")), base_model=str(cfg.get("base_model_name_or_path") or "")))
    return pd.DataFrame(rows)


def inventory(run: Any) -> None:
    """Write ``inventory``."""
    write_table(run, inventory_table(library(run)), "inventory")


def geometry(run: Any) -> None:
    """Write ``adapters`` (ranks, norms, amplification), ``spectra``, ``overlap`` (principal
    angles / φ between experts per module), ``layer_energy`` and, with a target, ``span_deficit``.
    Every number comes from :mod:`interp.subspace`, on each site's exact update (DoRA and PiSSA
    rebuilt, :attr:`AdapterLibrary.deltas`)."""
    from interp import subspace as S

    lib = library(run)
    base = run.base()
    deltas = lib.deltas
    write_table(run, S.adapter_table(deltas, base_hf=base.hf_model), "adapters")
    write_table(run, S.spectra_table(deltas), "spectra")
    write_table(run, S.layer_energy_table(deltas, n_layers=base.n_layers), "layer_energy")
    if len(deltas) >= 2:
        try:
            write_table(run, S.overlap_table(deltas), "overlap")
        except S.SubspaceError:  # no module in common: nothing to compare (the report says so)
            pass
    target = run.cfg.diagnose.get("target")
    if target:
        name, d = target
        t = library(run, {name: d}).deltas[name]
        write_table(run, S.span_deficit_table(t, deltas).assign(target=name), "span_deficit")


def keys(run: Any) -> None:
    """Write ``key_overlap`` when the prompts carry hop prompts: per adapter and module, κ (the
    fraction of the module's input at the final token inside the adapter's row space) and the
    triggered output ‖ΔW x‖, on the composed queries vs the single-hop prompts (``hop1_prompt``;
    ``hop2_prompt`` with the gold ``bridge``), on the base model
    (:func:`interp.subspace.key_overlap_table`; theory.md §2.5: a second-hop expert whose keys are
    not triggered by the composed query cannot complete it)."""
    from interp import subspace as S

    qs = [q for q in queries(run) if q.hop1_prompt]
    if not qs:
        return
    native = [q.hop1_prompt for q in qs] + [q.hop2_prompt.replace("{bridge}", q.bridge.strip()) for q in qs if q.bridge]
    lib = library(run)
    base = run.base()
    frames = [S.key_overlap_table(base, d, [q.prompt for q in qs], native).assign(adapter=a)
              for a, d in lib.deltas.items()]
    write_table(run, pd.concat(frames, ignore_index=True), "key_overlap")


def variants(run: Any) -> None:
    """Every variant (:func:`~interp.diagnose.variants.plan_variants`) loaded once; writes
    ``faithfulness``, ``energy_kept``, ``scores``, ``accuracy`` (Wilson 95%), ``contributions``,
    ``router``, ``lens``, ``patching``, ``patchscope``, ``backpatch`` and ``knockout`` — each only
    where the inputs carry what it needs."""
    from interp.diagnose.variants import TABLE_NAMES, cached_variant, patch_pairs, variant_key
    from interp.evaluate import accuracy_table

    qs = queries(run)
    dg = run.cfg.diagnose
    plan = diagnosed_variants(run)  # without prompts: just the merges, for what each keeps
    pairs = patch_pairs(run.base(), qs) if qs else []
    key = variant_key(run)
    tgt = dg.get("target")
    target = library(run, {tgt[0]: tgt[1]}).deltas[tgt[0]] if tgt else None
    got: dict[str, list[pd.DataFrame]] = {n: [] for n in TABLE_NAMES}
    for v in tqdm(plan, desc="variants"):
        for n, df in cached_variant(run, v, qs, pairs, key, target).items():
            if len(df):
                got[n].append(df)
    for n, frames in got.items():
        if not frames:
            continue
        df = pd.concat(frames, ignore_index=True)
        write_table(run, df, "contributions" if n == "contrib" else n)
        if n == "scores":
            acc = accuracy_table(df.assign(method=df["variant"], library="diagnose", test_set="prompts"))
            role = {v.name: v.role for v in plan}
            acc.insert(1, "role", acc["method"].map(role))
            write_table(run, acc.rename(columns={"method": "variant"}).drop(columns=["library", "test_set"]),
                        "accuracy")


def diagnosed_variants(run: Any) -> list:
    """The variants the ``variants`` step computes (all of them with prompts; without, the merges only)."""
    from interp.diagnose.variants import ROUTED, plan_variants

    dg = run.cfg.diagnose
    plan = plan_variants(list(dg["adapters"]), dg["combines"])
    if not dg.get("prompts"):
        plan = [v for v in plan if v.role == "combine" and v.combine not in ROUTED]
    return plan


def write_summary(run: Any) -> Path:
    """``DIR/summary.json``: wall seconds of each pipeline step (``stage_seconds``: from ``run.json``,
    the last time each step ran; ``total_this_invocation``: this call) and of each variant and its
    stages (``variants.variant_seconds``, ``variants.stage_seconds``: when the variant was computed,
    a cached variant keeps its first timing; ``null`` for a variant cached before timings existed).

    Returns:
        the file's path.
    """
    from interp.diagnose.variants import variant_seconds
    from interp.models import atomic_write_text

    data = json.loads((run.out / "run.json").read_text())
    per = {v.name: variant_seconds(run, v) for v in diagnosed_variants(run)}
    summary = {"stage_seconds": data.get("timings", {}),
               "variants": {"variant_seconds": {k: (s or {}).get("total") for k, s in per.items()},
                            "stage_seconds": per},
               "units": "seconds of wall time"}
    path = run.out / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1))
    return path


def report(run: Any) -> None:
    """Write ``DIR/report.html`` (:func:`interp.diagnose.page.build_diagnose_report`)."""
    from interp.diagnose.page import build_diagnose_report

    build_diagnose_report(run)


PIPELINE: tuple[Step, ...] = (
    Step("inventory", inventory, ("study", "diagnose")),
    Step("geometry", geometry),
    Step("keys", keys),
    Step("variants", variants),
    Step("report", report),
)
