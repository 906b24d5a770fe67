"""The main job: the paper's two-hop LoRA-reuse study, end to end, into one run directory.

``interp run`` = world → experts → evaluation of every variant (base, each expert, merges,
routers, joint-training upper bounds) → bridge-entity mechanisms → subspace geometry → figures →
report. Each step writes its tables under ``DIR/results`` and a marker ``DIR/steps/STEP.json``
holding the cache key (a hash of the config sections it depends on plus its upstream keys); a
re-run skips steps whose key still matches, and long steps also cache per unit (per expert, per
variant), so an interrupted run resumes where it stopped. ``--steps`` re-runs a subset.

Variants (``VARIANTS``), named as in the paper: experts ``ab`` (D₁: e₁ r₁ → e₂), ``bc`` (D₂:
e₂ r₂ → e₃), ``ac`` (D_AC: the target two-hop task); libraries "2-comb" = {ab, bc} and
"2-comb+AC" = {ab, bc, ac}; upper bounds ``joint_12`` (one LoRA on D₁ ∪ D₂) and ``joint_all``
(D₁ ∪ D₂ ∪ D_AC). ``oracle`` is routing's upper bound: per query, the library expert that does
best on it (hop-1 queries → ab, hop-2 → bc, two-hop → the better of the two, per example).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from rich.console import Console

from interp.config import Config, ConfigError, load_config
from interp.models import atomic_write_text

console = Console(stderr=True)

STEPS = ["world", "experts", "evaluate", "mechanisms", "subspace", "figures", "report"]

# name -> (library label, experts used, combine)
VARIANTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "base": ("none", (), "none"),
    "expert_ab": ("single expert", ("ab",), "none"),
    "expert_bc": ("single expert", ("bc",), "none"),
    "expert_ac": ("single expert", ("ac",), "none"),
    "uniform": ("2-comb", ("ab", "bc"), "uniform"),
    "task_arithmetic": ("2-comb", ("ab", "bc"), "task_arithmetic"),
    "ties": ("2-comb", ("ab", "bc"), "ties"),
    "peft_linear": ("2-comb", ("ab", "bc"), "peft_linear"),
    "arrow": ("2-comb", ("ab", "bc"), "arrow"),
    "mixture": ("2-comb", ("ab", "bc"), "mixture"),
    "oracle": ("2-comb", ("ab", "bc"), "oracle"),
    "uniform+ac": ("2-comb+AC", ("ab", "bc", "ac"), "uniform"),
    "arrow+ac": ("2-comb+AC", ("ab", "bc", "ac"), "arrow"),
    "joint_12": ("joint D1+D2", ("joint_12",), "none"),
    "joint_all": ("joint D1+D2+D_AC", ("joint_all",), "none"),
}

# expert name -> training splits of the world
EXPERT_DATA: dict[str, tuple[str, ...]] = {
    "ab": ("d1",), "bc": ("d2",), "ac": ("d_ac",),
    "joint_12": ("d1", "d2"), "joint_all": ("d1", "d2", "d_ac"),
}

# which config sections each step's results depend on (besides its upstream steps)
STEP_DEPS: dict[str, tuple[str, ...]] = {
    "world": ("study", "world"),
    "experts": ("training",),
    "evaluate": ("methods", "evaluation"),
    "mechanisms": ("mechanisms",),
    "subspace": (),
    "figures": (),
    "report": (),
}


def csv_text(df: pd.DataFrame, significant: int | None = None) -> str:
    """CSV text of a table whose rows ``pd.read_csv`` reads back intact.

    Every non-numeric field is quoted (``csv.QUOTE_NONNUMERIC``): pandas leaves a field holding a
    bare carriage return unquoted, and a decoded token such as ``"\\r"`` (a random model's top
    prediction) would then split its row in two. Floats are optionally rounded to ``significant``
    digits (values, not a format string, so they stay unquoted numbers). ``read_csv`` still infers
    types per column: text that looks like a number, a boolean or ``NA`` (a decoded token ``"7"``)
    comes back as one unless the column is read with ``dtype=str``.
    """
    import csv

    if significant:
        df = df.copy()
        for c in df.select_dtypes("float").columns:
            df[c] = df[c].map(lambda x: float(f"{x:.{significant}g}") if pd.notna(x) else x)
    return df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)


class StudyError(RuntimeError):
    """A study step cannot run (missing upstream results, unwritable directory...)."""


@dataclass
class Run:
    """State shared by the steps of one study run."""

    cfg: Config
    out: Path
    timings: dict[str, float]
    machine: dict[str, Any] | None = None  # threads and precision chosen, and why (run.json)
    _base: Any = None

    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def model(self) -> str:
        return self.cfg.study.model

    def base(self):
        """The base model as a HookedModel (loaded once)."""
        if self._base is None:
            from interp.models import load_model

            self._base = load_model(self.model, device=self.cfg.study.device)
        return self._base

    def write_csv(self, df: pd.DataFrame, name: str) -> Path:
        path = self.results / f"{name}.csv"
        atomic_write_text(path, csv_text(df, significant=6))
        return path

    def read_csv(self, name: str) -> pd.DataFrame:
        path = self.results / f"{name}.csv"
        if not path.is_file():
            raise StudyError(f"{path} is missing: run the step that writes it first")
        return pd.read_csv(path)

    def world(self):
        from interp.tasks.two_hop import World

        p = self.out / "world.json"
        if not p.is_file():
            raise StudyError(f"{p} is missing: run the 'world' step first")
        return World.from_json(p)

    def expert_dir(self, name: str) -> Path:
        return self.out / "adapters" / name

    def variant_adapters(self, variant: str) -> dict[str, str]:
        return {e: str(self.expert_dir(e)) for e in VARIANTS[variant][1]}

    def load_variant(self, variant: str):
        """The HookedModel of one variant (base, an expert, a merge or a router)."""
        if variant == "base":
            return self.base()
        from interp import load_hooked

        library, experts, combine = VARIANTS[variant]
        m = self.cfg.methods
        options: dict[str, Any] = {}
        if combine == "task_arithmetic":
            options["lam"] = m.task_arithmetic_lambda
        elif combine == "ties":
            options["density"] = m.ties_density
        elif combine == "arrow":
            options.update(top_k=m.arrow_top_k, temperature=m.arrow_temperature)
        elif combine == "oracle":
            combine = "none"  # the oracle is computed from per-expert scores (see module doc)
        return load_hooked(self.model, self.variant_adapters(variant), combine=combine, **options)


# ----------------------------------------------------------------------------------------------
# step bookkeeping
# ----------------------------------------------------------------------------------------------


def _step_key(cfg: Config, step: str, upstream: dict[str, str]) -> str:
    import hashlib

    i = STEPS.index(step)
    blob = json.dumps({"own": cfg.section_hash(*STEP_DEPS[step]) if STEP_DEPS[step] else "",
                       "up": [upstream.get(s, "") for s in STEPS[:i]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _marker(out: Path, step: str) -> Path:
    return out / "steps" / f"{step}.json"


def _done(out: Path, step: str) -> dict | None:
    p = _marker(out, step)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour the results depend on."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("interp", "torch", "transformers", "transformer-lens", "peft", "scikit-learn", "numpy",
                "pandas", "plotly", "kaleido", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StudyError(f"run directory {out} is not writable: {e}") from e


def run_study(config: str | Path | Config | None = None, out: str | Path = "runs/two_hop",
              model: str | None = None, steps: list[str] | None = None, device: str | None = None,
              overrides: dict[str, Any] | None = None) -> Path:
    """Run (or resume) the two-hop reuse study into ``out``.

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
        ConfigError: invalid config. StudyError: unwritable directory, missing upstream step.
    """
    ov = dict(overrides or {})
    if model:
        ov["study.model"] = model
    if device:
        ov["study.device"] = device
    if isinstance(config, Config):
        cfg = config
        if ov:
            cfg = load_config(None, {**_flatten(cfg.to_dict()), **ov})
    else:
        path = Path(config) if config is not None else None
        if path is not None and not path.is_file() and str(path) == "experiments/two_hop.toml":
            path = None
        cfg = load_config(path, ov)
    unknown = [s for s in (steps or []) if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown step {unknown[0]!r}; steps are {', '.join(STEPS)}")
    out = Path(out)
    _check_writable(out)
    machine = _resolve_machine(cfg)
    run = Run(cfg, out, timings={}, machine=machine)
    prev = {}
    runjson = out / "run.json"
    if runjson.is_file():
        try:
            prev = json.loads(runjson.read_text())
        except json.JSONDecodeError:
            prev = {}
    timings = dict(prev.get("timings", {}))
    keys: dict[str, str] = {}
    t_all = time.perf_counter()
    for step in STEPS:
        key = _step_key(cfg, step, keys)
        keys[step] = key
        marker = _done(out, step)
        if steps is not None and step not in steps:
            continue  # --steps: run exactly those, on the results already in `out`
        if steps is None and marker is not None and marker.get("key") == key:
            console.print(f"[dim]✓ {step}: cached ({marker.get('seconds', 0):.1f} s when run)[/dim]")
            continue
        console.rule(f"[bold]{step}")
        t0 = time.perf_counter()
        STEP_FUNCS[step](run)
        dt = time.perf_counter() - t0
        timings[step] = round(dt, 2)
        atomic_write_text(_marker(out, step), json.dumps({"key": key, "seconds": dt, "finished": time.time()}))
        _write_runjson(run, keys, timings)
        console.print(f"[green]✓ {step}[/green] {dt:.1f} s")
    timings["total_this_invocation"] = round(time.perf_counter() - t_all, 2)
    _write_runjson(run, keys, timings)
    console.print(f"[bold green]done[/bold green]: {out}/report.html")
    return out


def _resolve_machine(cfg: Config) -> dict[str, Any]:
    """Set torch's thread count and resolve ``training.precision = "auto"`` for this machine.

    The resolved precision replaces ``"auto"`` in ``cfg`` before any cache key is computed, so
    experts trained in bf16 on one processor are not reused as if fp32 on another. The choice and
    its reason are printed once and written to ``run.json``.
    """
    from interp.hardware import check_device, choose_precision, cpu_description, set_threads

    check_device(cfg.study.device)
    threads = set_threads(cfg.study.threads)
    choice = choose_precision(cfg.training.precision, cfg.study.device)
    cfg.training.precision = choice.precision
    why_threads = "as configured" if cfg.study.threads else "the cores not busy with other work"
    console.print(f"[bold]machine[/bold]: {threads} torch thread(s) ({why_threads}); "
                  f"training precision {choice.precision}: {choice.reason}")
    return {"threads": threads, "threads_requested": cfg.study.threads or "auto",
            "precision": choice.to_json(), "cpu": cpu_description()}


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}


def _write_runjson(run: Run, keys: dict[str, str], timings: dict[str, float]) -> None:
    cfg = run.cfg
    data = {"config": cfg.to_dict(), "seeds": {"study": cfg.study.seed, "world": cfg.world.seed,
                                               "training": cfg.training.seed},
            "step_keys": keys, "timings": timings, "machine": run.machine, "versions": versions()}
    atomic_write_text(run.out / "run.json", json.dumps(data, indent=1))


# Step functions are defined in interp/steps.py-like sections below to keep one file per job.
from interp import study_steps as _steps  # noqa: E402

STEP_FUNCS: dict[str, Callable[[Run], None]] = {s: getattr(_steps, f"step_{s}") for s in STEPS}


def open_run(out: str | Path) -> Run:
    """Open a finished (or partial) run directory for interactive analysis.

    >>> run = open_run("runs/demo"); acc = run.read_csv("accuracy"); hm = run.load_variant("uniform")

    Raises:
        StudyError: ``out`` has no ``run.json``.
    """
    out = Path(out)
    p = out / "run.json"
    if not p.is_file():
        raise StudyError(f"{out} is not a study run directory (no run.json)")
    data = json.loads(p.read_text())
    cfg = load_config(None, _flatten(data["config"]))
    return Run(cfg, out, timings=data.get("timings", {}))
