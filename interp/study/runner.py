"""The study runner: a config and a list of steps → one resumable run directory.

Each step writes its tables under ``DIR/results`` and a marker ``DIR/steps/STEP.json`` holding
its cache key (a hash of the config sections it depends on plus its upstream steps' keys); a
re-run skips steps whose key still matches, and long steps also cache per unit (per expert, per
variant) with :func:`cached_csv`, so an interrupted run resumes where it stopped. A study is a
:class:`Step` list (see :mod:`interp.study.two_hop`); the runner knows nothing of what the steps do.

Under ``torchrun`` (:mod:`interp.study.distributed`) every process runs this same loop: a
``sharded`` step runs on every rank (each computes its share of the step's units, then rank 0
assembles the tables), any other step on rank 0 alone; only rank 0 writes tables, markers and
``run.json``, and every rank waits at a barrier after each step.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from rich.console import Console

from interp.config import Config, ConfigError, load_config
from interp.errors import StudyError
from interp.files import directory_lock, is_checked, read_checked, write_checked
from interp.models import atomic_write_text
from interp.study.distributed import World, init_world
from interp.study.tables import check_table
from interp.study.variants import VARIANTS

console = Console(stderr=True)
#: a file to which every :meth:`Run.stage` appends a JSON line as it ends (benchmarks on a GPU)
STAGE_LOG_ENV = "INTERP_STAGE_LOG"


def csv_text(df: pd.DataFrame, significant: int | None = None) -> str:
    """CSV text of a table whose rows ``pd.read_csv`` reads back intact.

    Every non-numeric field is quoted (``csv.QUOTE_NONNUMERIC``): pandas leaves a field holding a
    bare carriage return unquoted, and a decoded token such as ``"\\r"`` (a random model's top
    prediction) would then split its row in two. Floats are optionally rounded to ``significant``
    digits (values, not a format string, so they stay unquoted numbers). ``read_csv`` still infers
    types per column: text that looks like a number, a boolean or ``NA`` (a decoded token ``"7"``)
    comes back as one unless the column is read with ``dtype=str``.
    """
    if significant:
        df = df.copy()
        for c in df.select_dtypes("float").columns:
            df[c] = df[c].map(lambda x: float(f"{x:.{significant}g}") if pd.notna(x) else x)
    return df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)


def read_cached_csv(path: Path) -> pd.DataFrame:
    """A table :func:`cached_csv` wrote, checked against the SHA-256 written beside it
    (``{path}.sha256``).

    Raises:
        StudyError: the file differs from its checksum, has none, or does not parse (a disk
            error or a hand edit: a cut file would otherwise give a table with rows missing),
            naming it.
    """
    data, intact = read_checked(path)
    if not intact:
        raise StudyError(f"cached table {path} is damaged (its SHA-256 is missing or differs from the "
                         f"one written beside it); delete it and run again")
    try:
        return pd.read_csv(io.BytesIO(data))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise StudyError(f"cached table {path} is damaged ({e}); delete it and run again") from None


def cached_csv(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table cached at ``path``: computed and written (atomically, then its SHA-256 beside
    it) first if absent or without its SHA-256 (:func:`interp.files.is_checked`).

    Always returned as read back from the file (:func:`read_cached_csv`, which checks it), so a
    fresh run and a resumed one see the same values (CSV round-trips floats and types; tables
    downstream are byte-identical either way).
    """
    path = Path(path)
    if not is_checked(path):
        write_checked(path, csv_text(compute()).encode())
    return read_cached_csv(path)


def write_unit_tables(cache: Path, unit: str, key: str, parts: dict[str, pd.DataFrame]) -> None:
    """Cache the tables one unit (a variant) produced: each as ``{unit}.{name}.{key}.csv`` with a
    leading ``method`` column, then the marker ``{unit}.{key}.json`` listing them (written last, so
    a unit is either complete or recomputed on resume)."""
    for name, df in parts.items():
        df = df.copy()
        df.insert(0, "method", unit)
        write_checked(cache / f"{unit}.{name}.{key}.csv", csv_text(df).encode())
    write_checked(cache / f"{unit}.{key}.json", json.dumps(sorted(parts)).encode())


def read_unit_tables(cache: Path, unit: str, key: str) -> dict[str, pd.DataFrame] | None:
    """The tables :func:`write_unit_tables` cached for ``unit``, or None if it has not finished
    (no marker, or a marker or table without its SHA-256: the unit is computed again).

    Raises:
        StudyError: the marker or a table differs from its checksum, or the marker is not a
            list of table names (naming the file).
    """
    done = cache / f"{unit}.{key}.json"
    if not is_checked(done):
        return None
    data, intact = read_checked(done)
    try:
        names = json.loads(data) if intact else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StudyError(f"cached unit marker {done} is damaged; delete it and run again")
    paths = {name: cache / f"{unit}.{name}.{key}.csv" for name in names}
    if not all(is_checked(p) for p in paths.values()):
        return None
    return {name: read_cached_csv(p) for name, p in paths.items()}


def unit_key(inputs: Any) -> str:
    """16-hex cache key of one unit of work (a variant's tables): a hash of its JSON inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Step:
    """One step of a study: ``run(Run)`` writes its outputs; ``deps`` are the config sections its
    results depend on besides its upstream steps (they enter its cache key). A ``sharded`` step
    is run by every rank of a distributed run and splits its units with ``run.dist.shard``;
    only rank 0 may write its tables (``run.dist.is_main``)."""

    name: str
    run: Callable[["Run"], None]
    deps: tuple[str, ...] = ()
    sharded: bool = False
    analysis: bool = False  # runs its models in ``evaluation.dtype`` (TF32 matmuls on for "tf32")


@dataclass
class Run:
    """State shared by the steps of one study run (config, directory, the base model once)."""

    cfg: Config
    out: Path
    timings: dict[str, float]
    machine: dict[str, Any] | None = None  # threads and precision chosen, and why (run.json)
    dist: World = World()  # this process's rank among those of a torchrun launch (one by default)
    gpu: dict[str, Any] | None = None  # per step: GPU utilisation and peak memory (CUDA runs only)
    stages: dict[str, Any] = field(default_factory=dict)  # step -> unit -> stage -> seconds (run.json)
    step: str | None = None  # the step being run (where :meth:`stage` files its seconds)
    _base: Any = None

    @contextlib.contextmanager
    def stage(self, unit: str, name: str):
        """Time one stage (``name``: ``load``, ``lens``...) of one unit (a variant, an expert) of
        the running step: its wall seconds are added to ``stages[step][unit][name]``, which
        ``run.json`` keeps under ``stages`` (every rank's units, gathered by rank 0). On CUDA the
        device is synchronised at the end, so queued kernels count in the stage that launched
        them. With ``$INTERP_STAGE_LOG`` set, each stage also appends one JSON line to that file
        as it ends (a run cut off mid-step keeps what it measured)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            per = self.stages.setdefault(self.step or "-", {}).setdefault(unit, {})
            per[name] = round(per.get(name, 0.0) + dt, 3)
            log = os.environ.get(STAGE_LOG_ENV)
            if log:
                with open(log, "a") as f:  # one short line per write: appends of ranks do not interleave
                    f.write(json.dumps({"step": self.step, "unit": unit, "stage": name, "seconds": round(dt, 3),
                                        "rank": self.dist.rank}) + "\n")

    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def model(self) -> str:
        return self.cfg.study.model

    @property
    def device(self) -> str:
        """The device this process computes on: ``cfg.study.device``, or this rank's own GPU
        (``cuda:LOCAL_RANK``) when several processes share the host. The config is not changed,
        so cache keys are the same as a one-process run's."""
        return self.dist.device(self.cfg.study.device)

    @property
    def analysis_dtype(self) -> str:
        """The precision of evaluation and every analysis: ``evaluation.dtype`` with ``"auto"``
        resolved for :attr:`device` (``"tf32"`` on CUDA, ``"fp32"`` on the CPU); ``"fp32"`` for
        pipelines whose config has no such section, e.g. ``interp diagnose``."""
        from interp.devices import resolve_analysis_dtype

        return resolve_analysis_dtype(getattr(getattr(self.cfg, "evaluation", None), "dtype", "fp32"),
                                      self.device).dtype

    @property
    def dtype(self):
        """The torch dtype of the models in evaluation and every analysis (of :attr:`analysis_dtype`:
        float32 for fp32 and tf32, bfloat16 for bf16)."""
        from interp.devices import ANALYSIS_DTYPES

        return ANALYSIS_DTYPES[self.analysis_dtype]

    def base(self, dtype=None):
        """The base model as a HookedModel in ``dtype`` (default :attr:`dtype`), loaded once; asking
        for another dtype (the world step's familiarity checks run in float32) replaces it."""
        dt = dtype or self.dtype
        if self._base is None or next(self._base.hf_model.parameters()).dtype != dt:
            from interp.models import load_model

            self._base = None
            gc.collect()
            self._base = load_model(self.model, device=self.device, dtype=dt)
        return self._base

    def release(self, hm: Any) -> None:
        """Free a loaded variant's model now (not the base model, which the run keeps)."""
        if hm is not self._base:
            del hm
            gc.collect()

    def write_csv(self, df: pd.DataFrame, name: str) -> Path:
        """``DIR/results/NAME.csv`` (6 significant digits), checked against its schema."""
        check_table(name, df)
        path = self.results / f"{name}.csv"
        atomic_write_text(path, csv_text(df, significant=6))
        return path

    def read_csv(self, name: str) -> pd.DataFrame:
        """``DIR/results/NAME.csv``. Raises :class:`StudyError` if the step has not written it."""
        path = self.results / f"{name}.csv"
        if not path.is_file():
            raise StudyError(f"{path} is missing: run the step that writes it first")
        return pd.read_csv(path)

    def table(self, name: str) -> pd.DataFrame | None:
        """``DIR/results/NAME.csv`` or ``None`` when that optional table was not written."""
        path = self.results / f"{name}.csv"
        return pd.read_csv(path) if path.is_file() else None

    def world(self):
        """The run's :class:`~interp.tasks.two_hop.World` (``DIR/world.json``)."""
        from interp.tasks.two_hop import World

        p = self.out / "world.json"
        if not p.is_file():
            raise StudyError(f"{p} is missing: run the 'world' step first")
        return World.from_json(p)

    def expert_dir(self, name: str) -> Path:
        return self.out / "adapters" / name

    def variant_adapters(self, variant: str) -> dict[str, str]:
        return {e: str(self.expert_dir(e)) for e in VARIANTS[variant].experts}

    def load_variant(self, variant: str):
        """The HookedModel of one variant (base, an expert, a merge or a router), loaded as its
        :class:`~interp.study.variants.Variant` entry says, on :attr:`device`."""
        v = VARIANTS[variant]
        if not v.experts:
            return self.base()
        from interp import load_hooked

        # on the study's device, like the base: every step's model lives on this rank's device
        return load_hooked(self.model, self.variant_adapters(variant), combine=v.load_combine,
                           device=self.device, dtype=self.dtype, **v.options(self.cfg.methods))


# ----------------------------------------------------------------------------------------------
# step bookkeeping
# ----------------------------------------------------------------------------------------------


def _step_key(cfg: Config, steps: Sequence[Step], i: int, upstream: dict[str, str]) -> str:
    deps = steps[i].deps
    blob = json.dumps({"own": cfg.section_hash(*deps) if deps else "",
                       "up": [upstream.get(s.name, "") for s in steps[:i]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _marker(out: Path, step: str) -> Path:
    return out / "steps" / f"{step}.json"


def _done(out: Path, step: str) -> dict | None:
    p = _marker(out, step)
    if not p.is_file():
        return None
    try:
        marker = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) else None  # an edited marker: the step runs again


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


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in d.items() if sec is not None for k, v in sec.items()}


def resolve_config(config: str | Path | Config | None, overrides: dict[str, Any]) -> Config:
    """A validated config from a path, a :class:`Config` or ``None`` (defaults), plus dotted
    overrides. A missing default path ``experiments/two_hop.toml`` falls back to the defaults."""
    if isinstance(config, Config):
        return load_config(None, {**_flatten(config.to_dict()), **overrides}) if overrides else config
    path = Path(config) if config is not None else None
    if path is not None and not path.is_file() and str(path) == "experiments/two_hop.toml":
        path = None
    return load_config(path, overrides)


def run_pipeline(pipeline: Sequence[Step], cfg: Config, out: str | Path,
                 steps: list[str] | None = None) -> Path:
    """Run (or resume) ``pipeline`` on ``cfg`` into ``out``; see :func:`interp.study.run_study`.

    Raises:
        ConfigError: an unknown step name. StudyError: unwritable directory, missing upstream.
    """
    names = [s.name for s in pipeline]
    unknown = [s for s in (steps or []) if s not in names]
    if unknown:
        raise ConfigError(f"unknown step {unknown[0]!r}; steps are {', '.join(names)}")
    out = Path(out)
    from interp.hardware import check_threads

    check_threads(cfg.study.threads)  # a bad $INTERP_THREADS is refused before DIR is made
    world = init_world(cfg.study.device)
    if not world.is_main:
        console.quiet = True  # rank 0 tells the story; the others show only their units' progress
    _check_writable(out)
    with _holding(out, world):
        return _run_steps(pipeline, cfg, out, steps, world)


@contextlib.contextmanager
def _holding(out: Path, world: World):
    """Rank 0 holds ``out`` for the run (:func:`interp.files.directory_lock`: a second run on the
    same directory, whose experts would train into the same checkpoints, is refused on every
    rank), and clears the claim files a killed run left (no other run can be using them now)."""
    import shutil

    with contextlib.ExitStack() as held:
        busy = None
        if world.is_main:
            try:
                held.enter_context(directory_lock(out))
                shutil.rmtree(out / "cache" / "claims", ignore_errors=True)
            except StudyError as e:
                busy = str(e)
        busy = world.broadcast(busy)
        if busy is not None:
            raise StudyError(busy)
        yield


def _run_steps(pipeline: Sequence[Step], cfg: Config, out: Path, steps: list[str] | None,
               world: World) -> Path:
    machine = _resolve_machine(cfg, world)
    run = Run(cfg, out, timings={}, machine=machine, dist=world)
    prev = {}
    runjson = out / "run.json"
    if runjson.is_file():
        try:
            prev = json.loads(runjson.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            prev = None
    kept = {k: v for k, v in prev.items() if isinstance(v, dict)} if isinstance(prev, dict) else {}
    timings = dict(kept.get("timings", {}))
    if torch_device_type(cfg.study.device) == "cuda":
        run.gpu = dict(kept.get("gpu") or {})
    run.stages = dict(kept.get("stages") or {})  # each step's entry is replaced when it runs again
    if runjson.is_file() and world.is_main and (not isinstance(prev, dict) or kept.keys() != prev.keys()):
        _write_runjson(run, {}, timings)  # an edited run.json, rewritten before a step reads it
    keys: dict[str, str] = {}
    t_all = time.perf_counter()
    for i, step in enumerate(pipeline):
        key = _step_key(cfg, pipeline, i, keys)
        keys[step.name] = key
        if steps is not None and step.name not in steps:
            continue  # --steps: run exactly those, on the results already in `out`
        marker = world.broadcast(_done(out, step.name))  # rank 0's view: every rank decides alike
        if steps is None and marker is not None and marker.get("key") == key:
            console.print(f"[dim]✓ {step.name}: cached ({marker.get('seconds', 0):.1f} s when run)[/dim]")
            continue
        console.rule(f"[bold]{step.name}")
        t0 = time.perf_counter()
        if step.sharded and world.size > 1:
            if world.is_main:
                run.base()  # a registered model is converted into its cache once, not by every rank at once
            world.barrier()
        run.step = step.name
        run.stages.pop(step.name, None)
        ran = step.sharded or world.is_main
        if ran:
            # the other ranks wait at the barrier below (blocked in a socket read, not spinning), so
            # rank 0 alone may use the threads they were given
            alone = run.machine.get("threads_alone") if not step.sharded else None
            with _step_context(run, step), _threads(alone):
                step.run(run)
        world.barrier()  # every shard written, and rank 0's tables, before anyone reads them
        dt = time.perf_counter() - t0
        timings[step.name] = round(dt, 2)
        _gather_step_records(run, step.name, ran)
        if world.is_main:
            atomic_write_text(_marker(out, step.name),
                              json.dumps({"key": key, "seconds": dt, "finished": time.time()}))
            _write_runjson(run, keys, timings)
        console.print(f"[green]✓ {step.name}[/green] {dt:.1f} s")
    timings["total_this_invocation"] = round(time.perf_counter() - t_all, 2)
    if world.is_main:
        _write_runjson(run, keys, timings)
    world.barrier()
    report = out / "report.html"
    console.print(f"[bold green]done[/bold green]: {report if report.is_file() else out}")
    return out


def run_over_seeds(pipeline: Sequence[Step], cfg: Config, out: str | Path, steps: list[str] | None,
                   aggregate: Step) -> Path:
    """Run ``pipeline`` once per seed of ``cfg.study.seeds`` into ``out/seed-S`` (each an ordinary,
    resumable one-seed run of :func:`interp.study.seeds.seed_config`), then the ``aggregate`` step
    over them in ``out`` (always re-run: it reads only the seeds' tables).

    Raises:
        As :func:`run_pipeline`.
    """
    from interp.study.seeds import seed_config, seed_dir_name

    out = Path(out)
    _check_writable(out)
    with _holding(out, init_world(cfg.study.device)):  # DIR too, not only each seed-S in turn
        for seed in cfg.study.seeds:
            console.rule(f"[bold]seed {seed}[/bold] → {out / seed_dir_name(seed)}")
            run_pipeline(pipeline, seed_config(cfg, seed), out / seed_dir_name(seed), steps)
        return run_pipeline([aggregate], cfg, out, [aggregate.name])


def torch_device_type(device: str) -> str:
    """``"cuda"`` or ``"cpu"``: the kind of a (validated) device string."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


@contextlib.contextmanager
def _step_context(run: Run, step: Step):
    """Around one step: the analysis precision (``evaluation.dtype``) for steps marked
    ``analysis``, and on CUDA a sample of GPU utilisation and the peak memory, kept in
    ``run.gpu[step]`` (``run.json``; absent on a CPU run)."""
    from interp.devices import analysis_precision
    from interp.hardware import GpuMonitor

    prec = analysis_precision(run.analysis_dtype, run.device) if step.analysis else contextlib.nullcontext()
    if run.gpu is None:
        with prec:
            yield
        return
    with prec, GpuMonitor(run.device) as mon:
        yield
    run.gpu[step.name] = mon.summary()


def _resolve_machine(cfg: Config, world: World = World()) -> dict[str, Any]:
    """Set torch's thread count and resolve ``training.precision = "auto"`` and
    ``evaluation.dtype = "auto"`` for this machine.

    The resolved precisions replace ``"auto"`` in ``cfg`` before any cache key is computed, so
    experts trained in bf16 on one processor are not reused as if fp32 on another, and analyses
    run in TF32 on a GPU are not reused as fp32 ones (on a CPU ``auto`` is fp32, whose key is the
    one runs had before ``auto`` existed). Each choice and its reason are printed once and
    written to ``run.json`` (``machine.precision``, ``machine.analysis_dtype``). With several processes on the host
    (torchrun), automatic threads are rank 0's free cores divided among them, and rank 0's
    precision choice is every rank's (experts trained by different ranks agree).
    """
    import torch

    from interp.devices import resolve_analysis_dtype
    from interp.hardware import check_device, choose_precision, cpu_description, oversubscription, resolve_threads

    device = world.device(cfg.study.device)
    check_device(device)
    auto = not cfg.study.threads and os.environ.get("INTERP_THREADS", "").strip() in ("", "0", "auto")
    shared = world.local_size > 1 and auto
    if shared:  # measured once, on rank 0, before the others load anything
        threads = max(1, world.broadcast(resolve_threads(0) if world.is_main else None) // world.local_size)
    else:
        threads = resolve_threads(cfg.study.threads)  # auto: $INTERP_THREADS, else the free cores
    torch.set_num_threads(threads)
    if (warn := oversubscription(threads * max(1, world.local_size))) is not None:
        console.print(f"[yellow]warning[/yellow]: {warn}")
    choice = world.broadcast(choose_precision(cfg.training.precision, device) if world.is_main else None)
    cfg.training.precision = choice.precision
    evaluation = getattr(cfg, "evaluation", None)  # absent from interp diagnose's config
    analysis = resolve_analysis_dtype(evaluation.dtype, device) if evaluation is not None else None
    if analysis is not None:
        evaluation.dtype = analysis.dtype
    why_threads = "as configured" if cfg.study.threads else "the cores not busy with other work"
    if shared:
        why_threads += f", shared by {world.local_size} processes"
    console.print(f"[bold]machine[/bold]: {threads} torch thread(s) ({why_threads}); "
                  f"training precision {choice.precision}: {choice.reason}"
                  + (f"; analyses {analysis.dtype}: {analysis.reason}" if analysis is not None else ""))
    out = {"threads": threads, "threads_requested": cfg.study.threads or "auto",
           "precision": choice.to_json(), "cpu": cpu_description()}
    if analysis is not None:
        out["analysis_dtype"] = analysis.to_json()
    if world.size > 1:
        out["processes"] = {"world_size": world.size, "per_host": world.local_size, "backend": "gloo"}
    if shared and world.is_main:  # a step rank 0 runs alone (world, figures, report) takes every shared thread
        out["threads_alone"] = threads * world.local_size
    return out


@contextlib.contextmanager
def _threads(n: int | None):
    """Run the block with ``n`` torch threads (``None``: unchanged), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gather_step_records(run: Run, step: str, ran: bool) -> None:
    """Bring every rank's stage seconds of ``step`` to rank 0 (``run.stages[step]``; a unit timed
    on several ranks gets the sum of their seconds: processor time, not wall time) and, on CUDA, each rank's peak memory (``run.gpu[step]["peak_mib_ranks"]``,
    in rank order; ``None`` for a rank that did not run the step). A no-op in a one-process run."""
    if run.dist.size == 1:
        return
    mine = {"stages": run.stages.get(step, {}),
            "peak": (run.gpu or {}).get(step, {}).get("peak_mib") if ran and run.gpu is not None else None}
    parts = run.dist.gather(mine)
    if not run.dist.is_main:
        return
    merged: dict[str, dict[str, float]] = {}
    for p in parts:  # a unit all ranks share (subspace's modules): seconds summed over ranks
        for unit, st in p["stages"].items():
            into = merged.setdefault(unit, {})
            for name, sec in st.items():
                into[name] = round(into.get(name, 0.0) + sec, 3)
    if merged:
        run.stages[step] = merged
    if run.gpu is not None and step in run.gpu and run.gpu[step] is not None:
        run.gpu[step]["peak_mib_ranks"] = [p["peak"] for p in parts]


def _write_runjson(run: Run, keys: dict[str, str], timings: dict[str, float]) -> None:
    cfg = run.cfg
    data = {"config": cfg.to_dict(), "seeds": {"study": cfg.study.seed, "world": cfg.world.seed,
                                               "training": cfg.training.seed},
            "step_keys": keys, "timings": timings, "machine": run.machine, "versions": versions()}
    if run.gpu is not None:
        data["gpu"] = run.gpu
    if run.stages:
        data["stages"] = run.stages
    atomic_write_text(run.out / "run.json", json.dumps(data, indent=1))


def open_run(out: str | Path) -> Run:
    """Open a finished (or partial) run directory for interactive analysis.

    >>> run = open_run("runs/demo"); acc = run.read_csv("accuracy"); hm = run.load_variant("uniform")

    A directory written by ``interp diagnose`` opens with
    :func:`interp.diagnose.open_diagnosis` (a :class:`Run` whose ``load_variant`` knows the
    diagnosis's variants).

    Raises:
        StudyError: ``out`` has no ``run.json``, or is a diagnosis (use ``open_diagnosis``).
    """
    out = Path(out)
    p = out / "run.json"
    if not p.is_file():
        raise StudyError(f"{out} is not a study run directory (no run.json)")
    data = json.loads(p.read_text())
    if "diagnose" in data["config"]:  # its config and variants are interp.diagnose's (no import cycle)
        raise StudyError(f"{out} is an `interp diagnose` run: open it with interp.diagnose.open_diagnosis")
    cfg = load_config(None, _flatten(data["config"]))
    return Run(cfg, out, timings=data.get("timings", {}))
