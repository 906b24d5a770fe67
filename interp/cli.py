"""The ``interp`` command: list models, run the two-hop reuse study."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="interp: mechanistic interpretability of LoRA reuse (merge, route, patch, measure).")


@app.command("models")
def models_cmd() -> None:
    """Registered models: name, kind, size, and whether they are available offline."""
    from rich.console import Console
    from rich.table import Table

    from interp.models import cache_dir, list_models

    t = Table(title=f"interp models (cache: {cache_dir()})")
    for col in ("name", "kind", "params", "offline", "description"):
        t.add_column(col)
    for m in list_models():
        t.add_row(m["name"], m["kind"], m["params"], "yes" if m["available"] else "no", m["description"])
    Console().print(t)


@app.command("run")
def run_cmd(
    config: Path = typer.Option(Path("experiments/two_hop.toml"), "--config", "-c",
                                help="study config (TOML); keys are validated"),
    out: Path = typer.Option(Path("runs/two_hop"), "--out", "-o", help="run directory (resumable)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="registered name or local model dir"),
    steps: Optional[str] = typer.Option(None, "--steps", help="comma-separated subset of steps to run"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    threads: Optional[str] = typer.Option(
        None, "--threads", help="torch threads (default: the config's study.threads; 0 or 'auto': "
                                "the cores not busy with other work, measured at start)"),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="training precision: auto (bf16 where measured faster), fp32 or bf16"),
) -> None:
    """Run the two-hop reuse study end to end (world -> experts -> merges/routes -> evaluation ->
    mechanisms -> subspace -> figures -> report). Re-running resumes from cached steps."""
    from interp.study import run_study

    overrides: dict = {}
    if threads is not None:
        overrides["study.threads"] = 0 if threads.strip().lower() == "auto" else _int_option("--threads", threads)
    if precision is not None:
        overrides["training.precision"] = precision
    run_study(config=config, out=out, model=model,
              steps=[s.strip() for s in steps.split(",")] if steps else None, device=device, overrides=overrides)


def _int_option(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{flag} must be an integer or 'auto', got {value!r}") from None


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
