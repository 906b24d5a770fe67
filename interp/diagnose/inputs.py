"""What ``interp diagnose`` is given, checked before any model work.

The prompts file is JSONL, one query per line (every key but ``prompt`` and ``answer`` optional):

* ``prompt``, ``answer`` — the query and its gold continuation (scored by teacher forcing,
  :func:`interp.evaluate.score_examples`; give the answer with its leading space);
* ``subject`` (e₁) and ``bridge`` (e₂, the bridge entity) — mentions for EntRec
  (:func:`interp.mechanisms.entrec`); ``subject`` must occur in ``prompt``;
* ``hop1_prompt`` / ``hop2_prompt`` — explicit chaining: the variant's own greedy answer to
  ``hop1_prompt`` replaces ``{bridge}`` in ``hop2_prompt``, which is scored against ``answer``;
  with ``bridge`` also given, each hop is scored alone (hop 1 against ``bridge``, hop 2 with the
  gold bridge filled in);
* ``corrupt_prompt`` (and optionally ``corrupt_answer``) — a corrupted run of equal token length
  for activation patching (Meng et al. 2022); without ``corrupt_answer`` the base model's own
  top prediction on the corrupted prompt is the contrast answer;
* ``expert`` — the adapter expected to cover the query (oracle routing of ``prompt``; every line
  or none);
* ``hop1_expert`` / ``hop2_expert`` — the adapters covering each hop (with hop prompts, together,
  every hop line or none): oracle routing sends ``hop1_prompt`` to ``hop1_expert`` and
  ``hop2_prompt`` to ``hop2_expert`` (explicit chaining and each hop alone), as the study's oracle
  routes each hop to that hop's expert.

Unknown keys, missing or empty required keys and malformed lines are refused with
:class:`PromptFileError` naming file and line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from interp.errors import InterpError

KEYS = ("prompt", "answer", "subject", "bridge", "hop1_prompt", "hop2_prompt", "corrupt_prompt",
        "corrupt_answer", "expert", "hop1_expert", "hop2_expert")
REQUIRED = ("prompt", "answer")
PLACEHOLDER = "{bridge}"


class DiagnoseError(InterpError, ValueError):
    """``interp diagnose`` was given inputs it cannot use (adapters, combines, target, options)."""


class PromptFileError(DiagnoseError):
    """The prompts file is missing, malformed, or has unknown / missing keys (file and line named)."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One line of the prompts file (see module docstring). ``e1``/``e2``/``e3`` mirror
    ``subject``/``bridge``/``answer`` under the names :mod:`interp.mechanisms` reads."""

    line: int
    prompt: str
    answer: str
    subject: str = ""
    bridge: str = ""
    hop1_prompt: str = ""
    hop2_prompt: str = ""
    corrupt_prompt: str = ""
    corrupt_answer: str = ""
    expert: str = ""
    hop1_expert: str = ""
    hop2_expert: str = ""

    @property
    def e1(self) -> str:
        return self.subject

    @property
    def e2(self) -> str:
        return self.bridge

    @property
    def e3(self) -> str:
        return self.answer.strip()

    @property
    def char_spans(self) -> dict[str, tuple[int, int]]:
        """Character span of the subject mention in ``prompt`` (last occurrence), if given."""
        if not self.subject:
            return {}
        i = self.prompt.rfind(self.subject)
        return {"e1": (i, i + len(self.subject))}


def read_prompts(path: str | Path, adapters: list[str] | None = None) -> list[Query]:
    """Read and check a prompts JSONL file.

    Args:
        path: the file; blank lines are skipped.
        adapters: adapter names an ``expert`` value must be one of (``None``: not checked).

    Returns:
        one :class:`Query` per non-blank line, in file order.

    Raises:
        PromptFileError: no such file, invalid JSON, a line that is not an object, an unknown key,
            a missing / empty / non-string required value, ``subject`` not in ``prompt``,
            ``hop2_prompt`` without ``{bridge}`` or without ``hop1_prompt`` (and vice versa), an
            ``expert`` / ``hop1_expert`` / ``hop2_expert`` that is not an adapter, ``hop1_expert``
            without ``hop2_expert`` (and vice versa) or without hop prompts, any of these labels on
            some lines only, or no query at all.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompts file {p} does not exist")
    out: list[Query] = []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{p}, line {n}"
        try:
            obj: Any = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(KEYS))
        if unknown:
            raise PromptFileError(f"{where}: unknown key(s) {unknown}; keys are {', '.join(KEYS)}")
        for k, v in obj.items():
            if not isinstance(v, str):
                raise PromptFileError(f"{where}: {k!r} must be a string, got {type(v).__name__}")
        for k in REQUIRED:
            if not obj.get(k, "").strip():
                raise PromptFileError(f"{where}: {k!r} is missing or empty")
        q = Query(line=n, **obj)
        if q.subject and q.subject not in q.prompt:
            raise PromptFileError(f"{where}: subject {q.subject!r} does not occur in the prompt")
        if bool(q.hop1_prompt) != bool(q.hop2_prompt):
            raise PromptFileError(f"{where}: hop1_prompt and hop2_prompt go together (explicit chaining)")
        if q.hop2_prompt and PLACEHOLDER not in q.hop2_prompt:
            raise PromptFileError(f"{where}: hop2_prompt must contain {PLACEHOLDER} (where the hop-1 answer goes)")
        if q.corrupt_answer and not q.corrupt_prompt:
            raise PromptFileError(f"{where}: corrupt_answer needs corrupt_prompt")
        for k in ("expert", "hop1_expert", "hop2_expert"):
            if getattr(q, k) and adapters is not None and getattr(q, k) not in adapters:
                raise PromptFileError(f"{where}: {k} {getattr(q, k)!r} is not one of the adapters {adapters}")
        if bool(q.hop1_expert) != bool(q.hop2_expert):
            raise PromptFileError(f"{where}: hop1_expert and hop2_expert go together (oracle routing of each hop)")
        if q.hop1_expert and not q.hop1_prompt:
            raise PromptFileError(f"{where}: hop1_expert / hop2_expert need hop1_prompt and hop2_prompt")
        out.append(q)
    if not out:
        raise PromptFileError(f"prompts file {p} has no queries")
    for key, lines in (("expert", out), ("hop1_expert", [q for q in out if q.hop1_prompt])):
        have = [getattr(q, key) != "" for q in lines]
        if any(have) and not all(have):
            first = next(q.line for q in lines if not getattr(q, key))
            where = "lines" if key == "expert" else "lines with hop prompts"
            raise PromptFileError(f"{p}, line {first}: {key!r} is given on some {where} but not this one "
                                  "(oracle routing needs it on every one)")
    return out


def oracle_labelled(queries: list[Query]) -> bool:
    """Whether oracle routing has labels to route by: ``expert`` on every line, or
    ``hop1_expert`` / ``hop2_expert`` on every line with hop prompts (at least one)."""
    hop = [q for q in queries if q.hop1_prompt]
    return bool(queries) and (all(q.expert for q in queries) or (bool(hop) and all(q.hop1_expert for q in hop)))


def check_model(name: str) -> None:
    """Refuse, before any work, a model that is neither registered and available offline nor a
    local Hugging Face directory (``config.json`` inside); used by ``interp run`` and
    ``interp diagnose``.

    Raises:
        interp.models.ModelLoadError: naming the model and what was looked for.
    """
    from interp.models import ModelLoadError, list_models

    known = {m["name"]: m for m in list_models()}
    if name in known:
        if not known[name]["available"]:
            raise ModelLoadError(f"model {name!r} is registered but not available offline; see `interp models`")
        return
    p = Path(name).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"model {name!r} is neither a registered name ({', '.join(known)}) nor a local "
                             "directory; interp never downloads models")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model directory {p} has no config.json (expected a Hugging Face model directory)")


def parse_adapter_args(items: list[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` → ``{name: dir}``.

    Raises:
        DiagnoseError: an item without ``=``, an empty name or directory, a repeated name.
    """
    out: dict[str, str] = {}
    for it in items:
        name, sep, d = it.partition("=")
        if not sep or not name.strip() or not d.strip():
            raise DiagnoseError(f"adapter {it!r}: expected NAME=DIR")
        if name in out:
            raise DiagnoseError(f"adapter name {name!r} given twice")
        out[name.strip()] = d.strip()
    return out


def parse_option_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["COMBINE.KEY=VALUE", ...]`` → ``{combine: {key: value}}``; values are read as JSON
    (``0.5``, ``1``, ``"total"``), bare words as strings (``ties.majority_sign_method=frequency``).

    Raises:
        DiagnoseError: an item not of the form COMBINE.KEY=VALUE, or a key given twice.
    """
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        lhs, sep, val = it.partition("=")
        combine, dot, key = lhs.partition(".")
        if not sep or not dot or not combine.strip() or not key.strip() or not val.strip():
            raise DiagnoseError(f"option {it!r}: expected COMBINE.KEY=VALUE, e.g. ties.density=0.5")
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val.strip()
        opts = out.setdefault(combine.strip(), {})
        if key.strip() in opts:
            raise DiagnoseError(f"option {lhs!r} given twice")
        opts[key.strip()] = v
    return out
