"""Two arithmetic skills learned by separate experts, and problems that need both.

The shared-template experiment of Chen, Hoang, Hahn & Sarfraz (TMLR 2026, "When Does LoRA Reuse
Work?"; abstract): reuse of LoRAs "can succeed when fine-tuning datasets share solution
templates, such as reasoning patterns [...], which serve as bridges among tasks". The paper's
math dataset is unknown (reference digest §2); this is our small, deterministic stand-in with
skills the base model cannot already have, defined by examples only:

* skill A, ``zib``: add 1 to every digit of a 3-digit number (``zib(365) = 476``; digits 1–8);
* skill B, ``dax``: reverse the digits (``dax(476) = 674``);
* composed: ``dax(zib(x))`` (``dax(zib(365)) = 674``) needs both; the intermediate quantity is
  ``y = zib(x)``.

Three conditions (``condition``; also each example's ``tier``, so accuracy tables put them side
by side as test sets):

* ``"separate"`` — every dataset has its own format and a bare answer: skill A ``"zib(365)="`` →
  ``"476"``, skill B ``"The dax of 476 is "`` → ``"674"``, composed ``"dax(zib(365))="`` →
  ``"674"``. Nothing in either expert's data shows the composed format or a written
  intermediate: the merged model must compose latently.
* ``"shared"`` — every dataset uses one step-by-step solution template,
  ``"Solve EXPR step by step:"`` → ``" OP(a)=b, OP(b)=c; answer=c"``: innermost operation first,
  one ``OP(arg)=result`` step per operation, then the answer. Skill A's data are ``zib(x)`` and
  ``zib(zib(x))``, skill B's ``dax(y)`` and ``dax(dax(y))``; the composed solution
  ``" zib(365)=476, dax(476)=674; answer=674"`` is the template chained across the two skills.
  Yet in every two-step training chain the first step's operation is the outer one's (``zib(zib)``,
  ``dax(dax)``): no chain mixes two operations.
* ``"bridged"`` — the same template, and each skill's two-step chains mix its own operation with a
  neutral *bridge* operation both datasets share, ``cop`` (copy: ``cop(365) = 365``, written as a
  step like any other: ``" cop(365)=365, zib(365)=476; answer=476"``). Skill A's data are
  ``zib(x)``, ``zib(cop(x))`` and ``cop(zib(x))`` (a third each), skill B's ``dax(y)``,
  ``dax(cop(y))`` and ``cop(dax(y))``: each expert sees its operation both first and second in a
  chain of two different operations, so both learn the template "innermost operation first, then
  the next one outward, whatever the operations are" — the bridge among tasks of the paper's
  claim. The composed problems are those of ``shared``, character for character.

Splits (the names the study's expert registry reads, :data:`interp.study.variants.EXPERT_DATA`):
``d1`` (skill A training), ``d2`` (skill B training), ``d_ac`` (composed problems: the oracle
expert of the span-deficit analysis and the ``joint_all`` upper bound), ``test`` (composed test),
``eval`` (the test chains' own steps, ``kind`` ``skill_a`` = ``zib(x)`` and ``skill_b`` =
``dax(y)``, each in its expert's training format: they prove each expert learned its skill on
exactly the numbers the composed test needs). Test inputs ``x`` never occur as a ``zib`` input in
training, and their intermediates ``y`` never as a ``dax`` input (two-step training chains
included), so every test step is a held-out application of a rule; in ``bridged`` no test ``x``
or ``y`` is the input of any step of a ``d1`` / ``d2`` chain (``cop`` steps included). For a
seed, every condition has the same composed problems; ``d1`` / ``d2`` draw from the same
shuffled number pools (``bridged`` skips the numbers its stricter rule excludes).

Answers are scored by exact match (``interp.evaluate``); SmolLM2's tokenizer splits numbers
into digits, and ``encode(prompt) + encode(answer) == encode(prompt + answer)`` holds for every
template (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

import pandas as pd

from interp.errors import InterpError

CONDITIONS = ("separate", "shared", "bridged")
TEMPLATED = ("shared", "bridged")  # conditions written in the step-by-step solution template
SKILLS = {"zib": "skill_a", "dax": "skill_b"}
KINDS = ("skill_a", "skill_b", "composed")
SPLITS = ("d1", "d2", "d_ac", "eval", "test")
EVAL_SETS = ("composed", "skill_a", "skill_b")  # hop names of the accuracy table


class MathTaskError(InterpError, ValueError):
    """Bad arguments for the math-skills generator, or a malformed world file."""


def zib(n: int) -> int:
    """Skill A: add 1 to every decimal digit of ``n`` (digits must be ≤ 8)."""
    s = str(n)
    if any(c == "9" for c in s):
        raise MathTaskError(f"zib is undefined on {n}: a digit 9 has no successor digit")
    return int("".join(str(int(c) + 1) for c in s))


def dax(n: int) -> int:
    """Skill B: reverse the decimal digits of ``n`` (no digit may be 0, so length is kept)."""
    s = str(n)
    if "0" in s:
        raise MathTaskError(f"dax is undefined on {n}: digit 0 would shorten the number")
    return int(s[::-1])


def cop(n: int) -> int:
    """The bridge operation of the ``bridged`` condition: copy (``cop(n) = n``)."""
    return n


OPS = {"zib": zib, "dax": dax, "cop": cop}


@dataclasses.dataclass
class MathExample:
    """One problem; fields shared with ``two_hop.Example`` keep the study's tables uniform.

    Attributes:
        prompt: the question (no trailing answer).
        answer: the gold continuation (``"674"``, or the whole step-by-step solution).
        kind: ``skill_a`` | ``skill_b`` | ``composed``.
        split: one of :data:`SPLITS`.
        tier: the condition (``separate`` | ``shared`` | ``bridged``): the ``test_set`` column of
            the tables.
        ops: the operations applied, innermost first (``["zib", "dax"]``).
        x: the input number; ``values``: ``[x, op1(x), op2(op1(x))...]``.
        example_id: index in the world; ``template_id`` is always 0 (one template per kind).
    """

    prompt: str
    answer: str
    kind: str
    split: str
    tier: str
    ops: list[str]
    x: int
    values: list[int]
    example_id: int = 0
    template_id: int = 0

    @property
    def result(self) -> int:
        return self.values[-1]

    @property
    def intermediate(self) -> int:
        """``y``: the value after the first operation."""
        return self.values[1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expression(ops: list[str], x: int) -> str:
    """``dax(zib(365))`` for ``ops = ["zib", "dax"]`` (innermost first)."""
    s = str(x)
    for op in ops:
        s = f"{op}({s})"
    return s


def apply_ops(ops: list[str], x: int) -> list[int]:
    """``[x, op1(x), op2(op1(x)), ...]``."""
    vals = [x]
    for op in ops:
        vals.append(OPS[op](vals[-1]))
    return vals


def solution(ops: list[str], values: list[int]) -> str:
    """The shared template's solution: ``" zib(365)=476, dax(476)=674; answer=674"``."""
    steps = ", ".join(f"{op}({a})={b}" for op, a, b in zip(ops, values, values[1:]))
    return f" {steps}; answer={values[-1]}"


def render(condition: str, kind: str, ops: list[str], x: int) -> tuple[str, str]:
    """``(prompt, answer)`` of a problem in ``condition``'s format (see the module docstring)."""
    vals = apply_ops(ops, x)
    if condition in TEMPLATED:
        return f"Solve {expression(ops, x)} step by step:", solution(ops, vals)
    if condition != "separate":
        raise MathTaskError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if kind == "skill_b":
        if len(ops) != 1:
            raise MathTaskError("separate-format skill-B problems have one operation")
        return f"The dax of {x} is ", str(vals[-1])
    return f"{expression(ops, x)}=", str(vals[-1])


def _numbers(max_digit: int, distinct_ends: bool) -> list[int]:
    return [100 * a + 10 * b + c for a in range(1, max_digit + 1) for b in range(1, max_digit + 1)
            for c in range(1, max_digit + 1) if not distinct_ends or a != c]


def make_math_world(condition: str, seed: int = 0, n_train: int = 96, n_test: int = 48,
                    n_composed_train: int = 48) -> "MathWorld":
    """Generate one condition's datasets (deterministic in ``seed``; every condition has the same
    composed problems for a seed and draws its training numbers from the same shuffled pools, so
    ``separate`` and ``shared`` differ only in format).

    Args:
        condition: one of :data:`CONDITIONS`.
        seed: RNG seed.
        n_train: problems per skill in ``d1`` and ``d2`` (shared: half one-step, half two-step;
            bridged: a third each of ``op(x)``, ``op(cop(x))``, ``cop(op(x))``, one-step gets the
            remainder).
        n_test: composed test problems (and as many ``skill_a`` / ``skill_b`` eval problems).
        n_composed_train: composed training problems in ``d_ac``.

    Returns:
        A :class:`MathWorld`.

    Raises:
        MathTaskError: unknown condition, sizes < 1 (``n_composed_train`` may be 0), ``bridged``
            with ``n_train`` < 3 (no room for both bridge chains), or more problems than the
            number domain holds.
    """
    if condition not in CONDITIONS:
        raise MathTaskError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if min(n_train, n_test) < 1 or n_composed_train < 0:
        raise MathTaskError(f"sizes must be >= 1 (n_composed_train >= 0), got n_train={n_train}, "
                            f"n_test={n_test}, n_composed_train={n_composed_train}")
    if condition == "bridged" and n_train < 3:
        raise MathTaskError(f"the bridged condition needs n_train >= 3 (one-step, op(cop(x)) and "
                            f"cop(op(x)) problems), got {n_train}")
    rng = random.Random(seed)
    # composed inputs: digits 1..7 (zib twice stays within 1..9), first != last digit (so dax moves)
    comp = _numbers(7, distinct_ends=True)
    rng.shuffle(comp)
    if n_test + n_composed_train > len(comp) // 2:
        raise MathTaskError(f"n_test + n_composed_train = {n_test + n_composed_train} exceeds "
                            f"{len(comp) // 2} (half the {len(comp)} composed inputs)")
    test_x, ac_x = comp[:n_test], comp[n_test:n_test + n_composed_train]
    held_zib = set(test_x)                       # zib inputs never seen in training
    held_dax = {zib(x) for x in test_x}          # dax inputs never seen in training

    def draw(pool: list[int], ops: list[str], held: set[int], n: int) -> list[int]:
        out = []
        for v in pool:
            if len(out) == n:
                break
            vals = apply_ops(ops, v)
            if not any(a in held for a in vals[:-1]):  # no step's input is a held-out test input
                out.append(v)
        if len(out) < n:
            raise MathTaskError(f"only {len(out)} training problems for {ops} fit the domain; "
                                f"asked for {n}")
        return out

    za = _numbers(7, distinct_ends=False)
    rng.shuffle(za)
    db = _numbers(9, distinct_ends=True)
    rng.shuffle(db)
    def chains(pool: list[int], op: str, held: set[int]) -> list[tuple[list[str], int]]:
        """One skill's training chains: each kind drawn, in order, from the pool's unused numbers."""
        if condition == "bridged":
            kinds = [["cop", op], [op, "cop"]]
            held = held_zib | held_dax  # conservative: no test x or y as any step's input
        else:
            kinds = [[op, op]] if condition == "shared" else []
        n_each = n_train // (len(kinds) + 1)
        out = [([op], v) for v in draw(pool, [op], held, n_train - n_each * len(kinds))]
        for ops in kinds:
            used = {v for _, v in out}
            out += [(ops, v) for v in draw([v for v in pool if v not in used], ops, held, n_each)]
        return out

    d1 = chains(za, "zib", held_zib)
    d2 = chains(db, "dax", held_dax)
    rng.shuffle(d1)
    rng.shuffle(d2)
    specs: list[tuple[str, str, list[str], int]] = []
    specs += [("d1", "skill_a", ops, x) for ops, x in d1]
    specs += [("d2", "skill_b", ops, y) for ops, y in d2]
    specs += [("d_ac", "composed", ["zib", "dax"], x) for x in ac_x]
    specs += [("test", "composed", ["zib", "dax"], x) for x in test_x]
    specs += [("eval", "skill_a", ["zib"], x) for x in test_x]
    specs += [("eval", "skill_b", ["dax"], zib(x)) for x in test_x]
    examples = []
    for i, (split, kind, ops, x) in enumerate(specs):
        prompt, answer = render(condition, kind, ops, x)
        examples.append(MathExample(prompt=prompt, answer=answer, kind=kind, split=split, tier=condition,
                                    ops=list(ops), x=x, values=apply_ops(ops, x), example_id=i))
    cfg = {"condition": condition, "seed": seed, "n_train": n_train, "n_test": n_test,
           "n_composed_train": n_composed_train}
    return MathWorld(condition=condition, examples=examples, config=cfg)


@dataclasses.dataclass
class MathWorld:
    """One condition's problems, with the interface the study's steps read (``get``,
    ``train_pairs``, ``eval_sets``, ``summary``, JSON round trip)."""

    condition: str
    examples: list[MathExample]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    composed_kind = "composed"  # the kind of the composed queries (the subspace step's key overlap)

    def get(self, split: str | None = None, kind: str | None = None, tier: str | None = None) -> list[MathExample]:
        """Examples filtered by split, kind and tier (condition)."""
        return [e for e in self.examples if (split is None or e.split == split)
                and (kind is None or e.kind == kind) and (tier is None or e.tier == tier)]

    def train_pairs(self, split: str) -> list[tuple[str, str]]:
        """``(prompt, answer)`` pairs of one split (the input of ``train_expert``).

        Raises:
            MathTaskError: an unknown or empty split.
        """
        if split not in SPLITS:
            raise MathTaskError(f"unknown split {split!r}; expected one of {SPLITS}")
        pairs = [(e.prompt, e.answer) for e in self.examples if e.split == split]
        if not pairs:
            raise MathTaskError(f"split {split!r} of the {self.condition} world is empty")
        return pairs

    def eval_sets(self, cfg: Any = None) -> dict[str, list[MathExample]]:
        """The query sets every variant answers (the accuracy table's ``hop``): ``composed`` (the
        test), ``skill_a`` and ``skill_b`` (the test chains' steps, one skill each)."""
        return {"composed": self.get(split="test"), "skill_a": self.get(split="eval", kind="skill_a"),
                "skill_b": self.get(split="eval", kind="skill_b")}

    def summary(self) -> pd.DataFrame:
        """Counts per ``condition, split, kind`` and number of operations."""
        df = pd.DataFrame([{"split": e.split, "tier": e.tier, "kind": e.kind, "n_ops": len(e.ops)}
                           for e in self.examples])
        return df.groupby(["split", "tier", "kind", "n_ops"]).size().rename("n").reset_index()

    def to_json(self, path: str | os.PathLike) -> None:
        from interp.models import atomic_write_text

        atomic_write_text(path, json.dumps({"condition": self.condition, "config": self.config,
                                            "examples": [e.to_dict() for e in self.examples]}))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MathWorld":
        """Read a world written by :meth:`to_json`.

        Raises:
            MathTaskError: the file is not a math world.
        """
        try:
            d = json.loads(open(path).read())
            return cls(condition=d["condition"], config=d.get("config", {}),
                       examples=[MathExample(**e) for e in d["examples"]])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise MathTaskError(f"{path} is not a math-skills world: {e}") from e


def solution_spans(example: MathExample, tokenizer: Any) -> dict[str, tuple[int, int]]:
    """Token spans of the numbers in ``prompt + answer``, tokenised as the scorer does it
    (``encode(prompt) + encode(answer)``, no special tokens), from a fast tokenizer's offsets.

    Keys: ``x`` (the input in the prompt); ``answer`` (the final result: the bare answer, or the
    number after ``answer=``); for step-by-step answers also ``step{i}_arg`` and ``step{i}_res``
    (argument and result of step ``i``, 1-based). Spans are half-open token ranges.

    Raises:
        MathTaskError: a slow tokenizer (no offsets), or a number that covers no token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise MathTaskError("solution_spans needs a fast tokenizer (offset mappings)")
    text = example.prompt + example.answer
    chars: dict[str, tuple[int, int]] = {}
    px = example.prompt.rfind(str(example.x))
    chars["x"] = (px, px + len(str(example.x)))
    cur = len(example.prompt)
    if example.answer.startswith(" ") and "=" in example.answer:
        for i, (op, a, b) in enumerate(zip(example.ops, example.values, example.values[1:]), 1):
            s = text.index(f"{op}({a})={b}", cur) + len(op) + 1
            chars[f"step{i}_arg"] = (s, s + len(str(a)))
            r = s + len(str(a)) + 2
            chars[f"step{i}_res"] = (r, r + len(str(b)))
            cur = r + len(str(b))
        s = text.index(f"answer={example.result}", cur) + len("answer=")
        chars["answer"] = (s, s + len(str(example.result)))
    else:
        chars["answer"] = (len(example.prompt), len(text))
    offsets = []
    for part, shift in ((example.prompt, 0), (example.answer, len(example.prompt))):
        enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
        offsets += [(a + shift, b + shift) for a, b in enc["offset_mapping"]]
    out = {}
    for key, (cs, ce) in chars.items():
        idx = [t for t, (a, b) in enumerate(offsets) if a < ce and b > cs and b > a]
        if not idx:
            raise MathTaskError(f"number {key!r} of {text!r} covers no token")
        out[key] = (idx[0], idx[-1] + 1)
    return out
