"""The ``interp`` command: list models, run the two-hop reuse study.

Only typer is imported at start (``interp --help`` must not pay for torch); each command imports
what it needs. A user error (bad config key, unknown step or device, missing model or file) prints
one line and exits with status 2; ``--debug`` shows the traceback instead. Ctrl-C exits with 130
and leaves every finished unit cached, so the same command resumes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

# the study's steps, for --help without importing the study (tests check it equals interp.study.STEPS)
STEP_NAMES = "world,experts,evaluate,mechanisms,subspace,figures,report"
DEFAULT_OUT = Path("runs/demo")  # the same directory `make demo` and the notebook use

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="interp: mechanistic interpretability of LoRA reuse (merge, route, patch, measure).")
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks of errors")) -> None:
    _state["debug"] = debug


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug in interp (shown as one line)."""
    from interp.errors import InterpError

    return (InterpError, FileNotFoundError, PermissionError)


# Library warnings our own calls trigger on every run, which a user can do nothing about:
# peft asks transformers' deprecated `is_gradient_checkpointing` when it wraps a model, and looks for
# a hub config of registered names such as "tiny-llama" when saving an adapter (interp is offline).
# `--debug` shows them.
QUIET_WARNINGS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
                  (UserWarning, r"Could not find a config file in "))


def _guarded(fn: Callable[[], None]) -> None:
    import warnings

    from interp.interrupts import EXIT_INTERRUPTED, handle_interrupts

    try:
        with handle_interrupts(), warnings.catch_warnings():  # one Ctrl-C ends any step within seconds
            if not _state["debug"]:
                for category, message in QUIET_WARNINGS:
                    warnings.filterwarnings("ignore", message=message, category=category)
            fn()
    except KeyboardInterrupt:
        typer.echo("interrupted: finished units are cached; run the same command again to resume", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if _state["debug"] or not isinstance(e, _user_errors()):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("models")
def models_cmd() -> None:
    """Registered models: name, kind, size, and whether they are available offline."""

    def body() -> None:
        from rich.console import Console
        from rich.table import Table

        from interp.files import cache_dir
        from interp.registry import list_models

        t = Table(title=f"interp models (cache: {cache_dir()})")
        for col in ("name", "kind", "params", "offline", "description"):
            t.add_column(col)
        for m in list_models():
            t.add_row(m["name"], m["kind"], m["params"], "yes" if m["available"] else "no", m["description"])
        Console().print(t)

    _guarded(body)


@app.command("run")
def run_cmd(
    config: Path = typer.Option(Path("experiments/two_hop.toml"), "--config", "-c",
                                help="study config (TOML); keys are validated"),
    out: Path = typer.Option(DEFAULT_OUT, "--out", "-o", help="run directory (resumable)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="registered name or local model dir"),
    steps: Optional[str] = typer.Option(None, "--steps", help=f"comma-separated subset of: {STEP_NAMES}"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: the config's)"),
    threads: Optional[str] = typer.Option(
        None, "--threads", help="torch threads (default: the config's study.threads; 0 or 'auto': "
                                "the cores not busy with other work, measured at start)"),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="training precision: auto (bf16 where measured faster), fp32 or bf16"),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="precision of evaluation and every analysis: auto (default: tf32 on CUDA, fp32 "
                              "on the CPU), fp32, tf32 (CUDA) or bf16 (config evaluation.dtype; errors in "
                              "the README's precision policy)"),
    procs: str = typer.Option(
        "1", "--procs", help="processes sharing the study's units (experts, variants) on this host, under "
                             "torchrun: N, or 'auto' (one per free CPU core, each with one thread; one per "
                             "GPU with --device cuda); 1: this process alone"),
) -> None:
    """Run the two-hop reuse study end to end (world -> experts -> merges/routes -> evaluation ->
    mechanisms -> subspace -> figures -> report), or with a config holding a [math] table
    (experiments/math.toml) the shared-template study. Re-running resumes from cached steps."""

    def body() -> None:
        from interp.config import ConfigError, load_config
        from interp.study import run_study

        step_list = [s.strip() for s in steps.split(",") if s.strip()] if steps is not None else None
        unknown = [s for s in step_list or [] if s not in STEP_NAMES.split(",")]
        if unknown or step_list == []:
            raise ConfigError(f"unknown step {unknown[0]!r}; steps are {STEP_NAMES}" if unknown
                              else f"--steps is empty; steps are {STEP_NAMES}")
        overrides: dict = {}
        if threads is not None:
            overrides["study.threads"] = _int_option("--threads", threads)
        if precision is not None:
            overrides["training.precision"] = precision
        if dtype is not None:
            overrides["evaluation.dtype"] = dtype
        if model:
            overrides["study.model"] = model
        if device:
            overrides["study.device"] = device
        default = config == Path("experiments/two_hop.toml") and not config.is_file()
        cfg = load_config(None if default else config, overrides)  # every key checked before any work
        from interp.diagnose.inputs import check_model

        check_model(cfg.study.model)
        from interp.hardware import check_device

        check_device(cfg.study.device)  # before the run directory is created
        from interp.hardware import check_threads

        check_threads(cfg.study.threads)  # a bad $INTERP_THREADS, before the directory (and the ranks)
        import os

        from interp.study.distributed import launch_command, resolve_procs, terminate_with_parent

        n = resolve_procs(_int_option("--procs", procs), cfg.study.device) if "RANK" not in os.environ else 1
        if n > 1:  # the same command, every option checked above, as n torchrun processes
            if Path(out).is_dir():  # a busy DIR in one line here, not in every rank's torchrun traceback
                from interp.files import directory_lock

                with directory_lock(out):
                    pass
            args = (["--debug"] if _state["debug"] else []) + ["run", "--config", str(config), "--out", str(out)]
            for flag, value in (("--model", model), ("--steps", steps), ("--device", device),
                                ("--threads", threads), ("--precision", precision), ("--dtype", dtype)):
                if value:
                    args += [flag, str(value)]
            print(f"interp run: {n} processes (torchrun)", flush=True)
            # torchrun dies with this launcher, even by SIGKILL (the ranks watch torchrun in turn)
            proc = subprocess.Popen(launch_command(n, args), preexec_fn=terminate_with_parent)
            terminated = []

            def forward(signum, _frame):  # SIGTERM (kill, timeout, a CI cancel): stop the ranks too
                terminated.append(signum)
                proc.send_signal(signum)

            previous = signal.signal(signal.SIGTERM, forward)
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # torchrun passes the signal on to every rank, which saves its units
                proc.send_signal(signal.SIGINT)
                proc.wait()
                raise
            finally:
                signal.signal(signal.SIGTERM, previous)
            if terminated:
                raise typer.Exit(128 + terminated[0])
            if code:
                raise typer.Exit(code)
            return
        run_study(config=cfg, out=out, steps=step_list)

    _guarded(body)


@app.command("diagnose")
def diagnose_cmd(
    model: str = typer.Option(..., "--model", "-m", help="registered name or local model dir"),
    adapter: list[str] = typer.Option(..., "--adapter", "-a", help="NAME=DIR of a PEFT LoRA adapter (repeat)"),
    combine: Optional[str] = typer.Option(None, "--combine", help="comma-separated combines to compare "
                                          "(default uniform,ties,arrow where the adapters allow)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", "-p", help="JSONL: prompt, answer; optional "
                                           "subject, bridge, hop1_prompt, hop2_prompt, corrupt_prompt, "
                                           "corrupt_answer, expert, hop1_expert, hop2_expert"),
    target: Optional[str] = typer.Option(None, "--target", help="NAME=DIR of an adapter that does the "
                                         "target task (span deficit of the library against it)"),
    out: Path = typer.Option(Path("runs/diagnose"), "--out", "-o", help="run directory (resumable)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    batch_size: int = typer.Option(16, "--batch-size", help="prompts per forward"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="COMBINE.KEY=VALUE option of a combine "
                                               "(repeat), e.g. ties.density=0.5, arrow.top_k=1"),
) -> None:
    """Diagnose a merge or router of your own adapters on your own prompts: inventory, geometry,
    accuracy, contributions, router weights, EntRec and patching -> DIR/report.html."""

    def body() -> None:
        from interp.diagnose import diagnose, parse_adapter_args, parse_option_args

        adapters = parse_adapter_args(adapter)
        tgt = None
        if target is not None:
            (name, d), = parse_adapter_args([target]).items()
            tgt = (name, d)
        combines = [c.strip() for c in combine.split(",") if c.strip()] if combine is not None else None
        diagnose(model, adapters, combines=combines, prompts=prompts, target=tgt, out=out, device=device,
                 batch_size=batch_size, options=parse_option_args(option or []))

    _guarded(body)


def _int_option(flag: str, value: str) -> int:
    from interp.config import ConfigError

    if value.strip().lower() == "auto":
        return 0
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer or 'auto', got {value!r}") from None


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
