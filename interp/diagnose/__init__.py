"""``interp diagnose``: your model, your PEFT adapters, your prompts → one cached report.

:func:`diagnose` checks every input before any work (:func:`preflight`), then runs the
:mod:`interp.diagnose.steps` pipeline on the study runner (cached, resumable, progress bars):
adapter inventory, ΔW geometry (:mod:`interp.subspace`), every variant (base, each expert, each
combine) scored on the prompts (:mod:`interp.evaluate`), per-adapter contributions and router
weights from the hook points (:mod:`interp.adapters.hooks`), EntRec and activation patching
(:mod:`interp.mechanisms`) where the prompts carry what they need, and a one-page report.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from interp.diagnose.inputs import (DiagnoseError, PromptFileError, Query, check_model, parse_adapter_args,
                                    oracle_labelled, parse_option_args, read_prompts)

#: combines tried when none are named; those the adapters' features rule out are dropped (noted)
DEFAULT_COMBINES = ("uniform", "ties", "arrow")

__all__ = ["diagnose", "open_diagnosis", "preflight", "DiagnoseError", "PromptFileError", "Query", "read_prompts",
           "parse_adapter_args", "parse_option_args", "DEFAULT_COMBINES"]


def _fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(Path(p).iterdir()) if Path(p).is_dir() else [Path(p)]:
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def check_tokens(queries: Sequence[Query], tokenizer: Any, max_len: int | None = None) -> None:
    """Refuse, naming the line, text that tokenises to nothing, a prompt + answer longer than the
    model's context ``max_len``, and patching pairs whose clean and corrupted prompts differ in
    token length (positions must align, Meng et al. 2022).

    Raises:
        PromptFileError: as above.
    """
    n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for q in queries:
        for key in ("prompt", "answer", "hop1_prompt", "corrupt_answer"):
            if getattr(q, key) and n(getattr(q, key)) == 0:
                raise PromptFileError(f"line {q.line}: {key!r} tokenises to no tokens")
        if max_len and n(q.prompt) + n(q.answer) > max_len:
            raise PromptFileError(f"line {q.line}: prompt + answer have {n(q.prompt) + n(q.answer)} tokens, more "
                                  f"than the model's context of {max_len}")
        if q.corrupt_prompt and n(q.corrupt_prompt) != n(q.prompt):
            raise PromptFileError(f"line {q.line}: corrupt_prompt has {n(q.corrupt_prompt)} tokens, prompt has "
                                  f"{n(q.prompt)}; patching needs equal token lengths")


def preflight(model: str, adapters: dict[str, str], combines: Sequence[str] | None = None,
              prompts: str | Path | None = None, target: tuple[str, str] | None = None,
              device: str = "cpu", batch_size: int = 16, options: dict[str, dict[str, Any]] | None = None):
    """Check every input and return the run's :class:`~interp.diagnose.steps.DiagnoseConfig`.

    Loads the base model's weights once (to validate the adapters against it) but runs nothing.

    Raises:
        interp.models.ModelLoadError: the model is neither registered and offline nor a local
            HF directory. DiagnoseError: no adapters, an unknown combine, options for a combine
            not diagnosed, ``oracle`` without
            prompts labelled with ``expert`` or ``hop1_expert``/``hop2_expert``
            (:func:`~interp.diagnose.inputs.oracle_labelled`), a batch size < 1, a target named
            like an adapter.
        PromptFileError: see :func:`read_prompts` and :func:`check_tokens`. AdapterError subclasses (from
            :class:`~interp.adapters.AdapterLibrary` and :func:`~interp.adapters.features.check_combine`):
            missing files, another base model, shapes, a feature a named combine cannot carry exactly;
            UnsupportedOptionError: an option the combine does not take (``COMBINE_OPTIONS``).
        HardwareError: an unusable ``device``.
    """
    from interp.adapters import COMBINES, AdapterLibrary
    from interp.adapters.features import AdapterFeatureError, check_combine
    from interp.diagnose.steps import DiagnoseConfig, _StudySection
    from interp.hardware import check_device
    from interp.models import load_hf

    check_model(model)
    check_device(device)
    if not adapters:
        raise DiagnoseError("no adapters given: pass at least one --adapter NAME=DIR")
    if batch_size < 1:
        raise DiagnoseError(f"batch size must be >= 1, got {batch_size}")
    explicit = combines is not None
    combines = list(combines) if explicit else list(DEFAULT_COMBINES)
    for c in combines:
        if c in ("none", "weighted"):
            raise DiagnoseError(f"combine {c!r} is not diagnosed: each expert alone is always a variant, and "
                                "'weighted' needs per-expert weights (use uniform or task_arithmetic)")
        if c not in COMBINES:
            ok = [x for x in COMBINES if x not in ("none", "weighted")]
            raise DiagnoseError(f"unknown combine {c!r}; choose from {', '.join(ok)}")
    if len(set(combines)) != len(combines):
        raise DiagnoseError(f"a combine is named twice in {combines}")
    from interp.adapters import _check_options  # the one place the combines' options are defined

    options = {c: dict(o) for c, o in (options or {}).items()}
    for c, o in options.items():
        if c not in combines:
            raise DiagnoseError(f"options given for combine {c!r}, which is not diagnosed ({', '.join(combines)})")
        _check_options(c, o)
    qs = read_prompts(prompts, list(adapters)) if prompts is not None else []
    if "oracle" in combines and not oracle_labelled(qs):
        raise DiagnoseError("combine 'oracle' routes each prompt to its labelled adapter: give --prompts whose "
                            "lines all carry 'expert', or whose hop lines all carry 'hop1_expert' and 'hop2_expert'")
    hf, tok = load_hf(model)
    check_tokens(qs, tok, getattr(hf.config, "max_position_embeddings", None))
    lib = AdapterLibrary.load(model, adapters, hf_model=hf)
    notes = []
    if len(adapters) >= 2:
        for c in list(combines):
            try:
                check_combine(lib.parts, c)
            except AdapterFeatureError as e:
                if explicit:
                    raise
                combines.remove(c)
                notes.append(f"default combine {c!r} skipped: {e}")
    else:
        notes.append("one adapter: no combine to diagnose (base vs the expert only)")
    if target is not None:
        name, d = target
        if name in adapters:
            raise DiagnoseError(f"target name {name!r} is also an adapter name")
        AdapterLibrary.load(model, {name: d}, hf_model=hf)
    files = [Path(d) for d in adapters.values()] + ([Path(target[1])] if target else []) + \
        ([Path(prompts)] if prompts is not None else [])
    section = {"adapters": dict(adapters), "combines": combines, "options": options,
               "prompts": str(Path(prompts).resolve()) if prompts is not None else None,
               "target": list(target) if target else None, "batch_size": batch_size,
               "fingerprint": _fingerprint(files), "notes": notes}
    return DiagnoseConfig(study=_StudySection(model=str(model), device=device), diagnose=section)


def diagnose(model: str, adapters: dict[str, str], combines: Sequence[str] | None = None,
             prompts: str | Path | None = None, target: tuple[str, str] | None = None,
             out: str | Path = "runs/diagnose", device: str = "cpu", batch_size: int = 16,
             steps: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None) -> Path:
    """Diagnose a merge or router of your own adapters on your own prompts.

    Args:
        model: registered name or local Hugging Face directory (never downloaded).
        adapters: ``{name: directory}`` of PEFT LoRA adapters for ``model``.
        combines: ``interp.load_hooked`` combines to compare (default :data:`DEFAULT_COMBINES`,
            minus those the adapters' features rule out).
        prompts: JSONL file (:mod:`interp.diagnose.inputs`); without it only the geometry is
            reported.
        target: ``(name, directory)`` of an adapter that does what the merge should (e.g. trained
            on the composed task): the span deficit of the library against it.
        out: run directory (created; re-using it resumes from cached steps and variants).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: prompts per forward.
        steps: re-run only these steps (``inventory, geometry, keys, variants, report``).
        options: ``{combine: {option: value}}`` for ``load_hooked`` (e.g. ``{"ties": {"density":
            0.5}, "arrow": {"top_k": 1}}``); default the combine's own defaults.

    Returns:
        ``out`` (``report.html``, ``results/*.csv``, ``summary.json``: wall seconds per step and
        per variant and stage, :func:`~interp.diagnose.steps.write_summary`).

    Raises:
        as :func:`preflight`, before any work; StudyError: an unwritable ``out``.
    """
    from interp.study.runner import run_pipeline

    from interp.diagnose.steps import PIPELINE

    from interp.diagnose.steps import write_summary

    cfg = preflight(model, adapters, combines, prompts, target, device, batch_size, options)
    out = run_pipeline(PIPELINE, cfg, out, steps)
    write_summary(open_diagnosis(out))
    return out


def open_diagnosis(out: str | Path):
    """Open a diagnosis run directory for analysis: its CSVs (``read_csv``, ``table``), its
    prompts (``queries()``), its variants (``variant_names``) and each variant reloaded hooked
    exactly as diagnosed (``load_variant``), like :func:`interp.study.open_run` for a study.

    >>> run = open_diagnosis("runs/diagnose"); bp = run.read_csv("backpatch"); hm = run.load_variant("ties")

    Returns:
        :class:`~interp.diagnose.steps.DiagnoseRun`.

    Raises:
        DiagnoseError: ``out`` has no ``run.json`` or is not a diagnosis (a study run: use
            ``interp.study.open_run``).
    """
    import json

    from interp.diagnose.steps import DiagnoseRun

    p = Path(out) / "run.json"
    if not p.is_file():
        raise DiagnoseError(f"{out} is not a diagnosis run directory (no run.json)")
    data = json.loads(p.read_text())
    if "diagnose" not in data.get("config", {}):
        raise DiagnoseError(f"{out} is a study run, not a diagnosis: open it with interp.study.open_run")
    return DiagnoseRun.from_runjson(Path(out), data)
