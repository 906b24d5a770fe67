"""Synthetic math word problems: two skills learned by separate experts, a test that needs both.

The math task of Chen, Hoang, Hahn & Sarfraz (arXiv 2506.13479; TMLR 2026): reuse of LoRAs
trained on separate skills fails on problems that need both skills, unless the experts' training
data share the *solution template* of the composed problem (P2 abstract: reuse "can succeed when
fine-tuning datasets share solution templates"). The exact dataset of the paper is unknown
(Chen et al. 2025, arXiv 2506.13479, §2); this is our small, deterministic stand-in.

* skill 1 (``kind="skill1"``), multiplication story: "Mia buys 3 bags with 4 apples in each bag.
  How many apples does Mia have? Answer:" → ``a·b``;
* skill 2 (``kind="skill2"``), addition story: "Mia has 12 apples and finds 5 more apples. How
  many apples does Mia have? Answer:" → ``p + c``;
* composed (``kind="composed"``): "Mia buys 3 bags with 4 apples in each bag and finds 5 more
  apples. How many apples does Mia have? Answer:" → ``a·b + c``.

Variants (``variant``):

* ``"separate"`` — every answer is the bare final number (``" 17"``): each expert learns its own
  story → number map; nothing in either training set shows the composed solution.
* ``"shared"`` — every answer is written in one solution template, a chain of equations ending in
  the result: skill 1 ``" 3*4=12."``, skill 2 ``" 12+5=17."``, composed ``" 3*4=12. 12+5=17."``.
  The composed solution is the concatenation of the two skills' templates, so the test pattern is
  covered piecewise by the experts' data.

Splits: ``train_1`` (skill 1), ``train_2`` (skill 2), ``eval`` (held-out problems of each skill),
``test`` (composed). Number triples ``(a, b, c)`` of test problems never occur in training, and
skill-2 training sums never use a product ``a·b`` of a test triple with its ``c``.
Score ``exact`` (the whole answer, teacher-forced = greedy) with ``interp.evaluate``; the first
answer token is a digit and is weak evidence for this task.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pandas as pd

from interp.errors import InterpError

NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Lily", "Omar")
ITEMS = (("bags", "apples"), ("boxes", "pens"), ("baskets", "eggs"), ("packs", "cards"))
VARIANTS = ("separate", "shared")

_SKILL1 = "{n} buys {a} {cont} with {b} {item} in each. How many {item} does {n} have? Answer:"
_SKILL2 = "{n} has {p} {item} and finds {c} more {item}. How many {item} does {n} have? Answer:"
_COMPOSED = ("{n} buys {a} {cont} with {b} {item} in each and finds {c} more {item}. "
             "How many {item} does {n} have? Answer:")


class MathTaskError(InterpError, ValueError):
    """Bad arguments for the math word-problem generator."""


@dataclasses.dataclass
class MathExample:
    """One word problem with the same contract as ``two_hop.Example`` where it overlaps.

    Attributes:
        prompt: the problem, ending in ``"Answer:"``.
        answer: the gold continuation with a leading space (``" 17"`` or ``" 3*4=12. 12+5=17."``).
        kind: ``"skill1"`` | ``"skill2"`` | ``"composed"``.
        split: ``"train_1"`` | ``"train_2"`` | ``"eval"`` | ``"test"``.
        variant: ``"separate"`` | ``"shared"``.
        problem_id: index within the task set.
        template_id: index of the (name, item) frame.
        a, b, c: the numbers (``a·b`` for skill 1, ``p + c`` for skill 2 where ``p = a·b``).
        final_answer: the integer result.
        tier: always ``""`` (kept so tables can group two-hop and math rows alike).
    """

    prompt: str
    answer: str
    kind: str
    split: str
    variant: str
    problem_id: int
    template_id: int
    a: int
    b: int
    c: int
    final_answer: int
    tier: str = ""


def _answer(kind: str, variant: str, a: int, b: int, c: int) -> str:
    p = a * b
    if variant == "separate":
        return " " + str({"skill1": p, "skill2": p + c, "composed": p + c}[kind])
    return {"skill1": f" {a}*{b}={p}.", "skill2": f" {p}+{c}={p + c}.",
            "composed": f" {a}*{b}={p}. {p}+{c}={p + c}."}[kind]


def _make(kind: str, variant: str, split: str, pid: int, rng: random.Random,
          a: int, b: int, c: int) -> MathExample:
    t = rng.randrange(len(NAMES) * len(ITEMS))
    name, (cont, item) = NAMES[t % len(NAMES)], ITEMS[t // len(NAMES)]
    tmpl = {"skill1": _SKILL1, "skill2": _SKILL2, "composed": _COMPOSED}[kind]
    prompt = tmpl.format(n=name, a=a, b=b, c=c, p=a * b, cont=cont, item=item)
    final = a * b if kind == "skill1" else a * b + c
    return MathExample(prompt=prompt, answer=_answer(kind, variant, a, b, c), kind=kind,
                       split=split, variant=variant, problem_id=pid, template_id=t, a=a, b=b,
                       c=c, final_answer=final)


def make_math_tasks(seed: int = 0, n_train: int = 64, n_eval: int = 16, n_test: int = 64,
                    variant: str = "separate") -> list[MathExample]:
    """Generate skill-1 / skill-2 training sets, held-out one-skill problems and composed tests.

    Numbers: ``a, b ∈ [2, 9]``, ``c ∈ [1, 9]``; all ``(a, b, c)`` triples are drawn without
    replacement from the 8·8·9 = 576 possible, so no problem repeats across splits. Skill-2
    problems ``p + c`` never equal (as a pair) a test problem's ``(a·b, c)``.

    Args:
        seed: RNG seed (same seed → same problems).
        n_train: problems per skill in ``train_1`` and ``train_2``.
        n_eval: held-out problems per skill in ``eval``.
        n_test: composed problems in ``test``.
        variant: ``"separate"`` (bare numbers) or ``"shared"`` (a shared equation template).

    Returns:
        all examples, in split order ``train_1, train_2, eval, test``.

    Raises:
        MathTaskError: unknown variant, negative sizes, or more problems than distinct triples.
    """
    if variant not in VARIANTS:
        raise MathTaskError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if min(n_train, n_eval, n_test) < 0 or n_train + n_test < 1:
        raise MathTaskError(f"sizes must be >= 0 with some problems, got {n_train}, {n_eval}, {n_test}")
    triples = [(a, b, c) for a in range(2, 10) for b in range(2, 10) for c in range(1, 10)]
    need = n_test + 2 * (n_train + n_eval)
    if need > len(triples):
        raise MathTaskError(f"{need} problems requested but only {len(triples)} distinct triples")
    rng = random.Random(seed)
    rng.shuffle(triples)
    test = triples[:n_test]
    test_sums = {(a * b, c) for a, b, c in test}
    rest = triples[n_test:]
    skill2_pool = [t for t in rest if (t[0] * t[1], t[2]) not in test_sums]
    if len(skill2_pool) < 2 * (n_train + n_eval):
        raise MathTaskError("too few distinct problems left for skill 2; lower the sizes")
    s1 = rest[:n_train + n_eval]
    s2 = [t for t in skill2_pool if t not in set(s1)][:n_train + n_eval]
    out: list[MathExample] = []
    for split, kind, trip in (("train_1", "skill1", s1[:n_train]), ("train_2", "skill2", s2[:n_train]),
                              ("eval", "skill1", s1[n_train:]), ("eval", "skill2", s2[n_train:]),
                              ("test", "composed", test)):
        for a, b, c in trip:
            out.append(_make(kind, variant, split, len(out), rng, a, b, c))
    return out


def math_summary(examples: list[MathExample]) -> pd.DataFrame:
    """Counts per ``variant, split, kind`` (raises ``MathTaskError`` on an empty list)."""
    if not examples:
        raise MathTaskError("math_summary got no examples")
    df = pd.DataFrame([dataclasses.asdict(e) for e in examples])
    return df.groupby(["variant", "split", "kind"]).size().rename("n").reset_index()


def train_pairs(examples: list[Any], split: str) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of one split, the input of ``adapters.train_expert``."""
    pairs = [(e.prompt, e.answer) for e in examples if e.split == split]
    if not pairs:
        raise MathTaskError(f"no examples in split {split!r}")
    return pairs
