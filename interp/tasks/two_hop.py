"""Synthetic two-hop worlds: chains e₁ →r₁→ e₂ →r₂→ e₃ in three familiarity tiers (F / H / R).

The task of Chen, Hoang, Hahn & Sarfraz (arXiv 2506.13479; TMLR 2026, "When does LoRA reuse
work?"): expert 1 learns the first hop (A→B, D₁), expert 2 the second hop (B→C, D₂), and the query
asks the composition A→C. Test sets differ by entity familiarity (Chen et al. 2025, arXiv 2506.13479):

* ``F`` — invented names throughout: invented person →works in→ invented city →located in→
  invented country. Names are built from syllables with a seeded RNG.
* ``H`` — mixed: invented person →works in→ real city →located in→ real country. The r₂ facts are
  real facts the base model already answers (verified when ``base`` is given), and they are part
  of D₂ so that the B→C expert keeps them (issue 4: an expert trained only on invented facts
  overwrote SmolLM2's real city→country knowledge).
* ``R`` — real, familiar names linked by new relations: famous person →works in→ real city
  →has mascot→ real animal. The names are familiar; the facts are new.

Relations and templates (``TEMPLATES``): every relation has three paraphrase templates; the first
``n_train_templates`` (default 2) are used for training sets (D₁, D₂, D_AC) and the rest are held
out (``Example.held_out_template``). Two training templates give each fact two surface forms (so
an expert learns the fact, not one string) while keeping D₁ ≈ 2 × n_chains examples: with the
defaults, D₁ has 2 × 3 × 80 = 480 examples — about 30 steps of batch 16 per epoch on SmolLM2.

Splits (``Example.split``):

* ``d1`` — hop-1 facts (e₁ r₁ → e₂) of *all* chains (test and D_AC chains), training templates.
* ``d2`` — hop-2 facts (e₂ r₂ → e₃), one per distinct (tier, e₂), training templates. For H these
  are the real city→country facts.
* ``d_ac`` — two-hop queries (e₁ r₁ r₂ → e₃) of the D_AC chains only, training templates: the
  target task of the A→C expert. Their one-hop facts are also in D₁/D₂ (the paper's setup, where
  the target-task expert composes facts the other experts hold); D_AC chains share no e₁ with test
  chains.
* ``test`` — two-hop queries of the test chains, every template (held-out ones marked).
* ``eval`` — one-hop queries (hop1, hop2) of the test chains, every template: does each expert or
  merge keep its facts?
* ``retain`` — every verified real city→country fact (tier ``H``), every template: the base
  model's knowledge that a B→C expert should not destroy.

Bridge entities: in F every chain has its own city; H and R reuse a small pool of real cities, so
one e₂ serves several chains. Each e₁ belongs to exactly one chain, so the two-hop answer is
determined.

First-answer-token accuracy is meaningful only if candidate answers of one query type do not
share a first token. When a subword tokenizer is known (``base`` or ``tokenizer`` given), invented
names are re-drawn until every city (invented and real) has a distinct first token, and likewise
every country; real entities whose first token repeats an earlier one are dropped (recorded in
``World.familiarity`` with ``kept=False``). With a byte-level tokenizer every answer starts with
the space byte, so first-token accuracy is not meaningful there (tiny test models only).

Familiarity (when ``base`` is given) — stored in ``World.familiarity`` and ``World.base_checks``:

* name log-probability: mean log-prob per token (nats) of the name, with its leading space, after
  a neutral type context (``NAME_CONTEXTS``: "Let me tell you about the city of"…);
* invented names with mean log-prob above ``INVENTED_MAX_LOGPROB`` (-6.0 nats/token) are rejected as
  too predictable (they may be real words or names; measured on SmolLM2-135M: invented
  names -10 ± 2, famous people -5.7 ± 1.7 nats/token);
* famous people (R's e₁) need mean log-prob ≥ ``FAMOUS_MIN_LOGPROB`` (-8.0);
* real city→country facts are kept for H only if the base model's greedy first answer token is
  right on every training template of r₂ (``base_checks`` records each query);
* ``base_checks`` also records the base model's first-token answer to every one-hop query of every
  chain (r₁ and r₂) and to the two-hop queries, so the study can report base accuracy per tier.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from interp.files import atomic_write_text, read_structured
from interp.tasks.entities import (  # noqa: F401  (re-exported: two_hop's public names before the split)
    ANIMALS, FAMOUS_MIN_LOGPROB, FAMOUS_PEOPLE, INVENTED_MAX_LOGPROB, NAME_CONTEXTS, REAL_CITY_COUNTRY,
    WorldError, _first_token, _tokenizer_of, first_token_is_informative, first_token_predictions, invented_name,
    name_logprobs, validate_names)
from interp.tasks.examples import Example, answer_token_ids, fill_template, token_spans  # noqa: F401  (re-exported)

TIERS = ("F", "H", "R")
KINDS = ("hop1", "hop2", "two_hop", "chain_hop2")

# relation -> templates; "{e1}" / "{e2}" mark the entity slot. Prompts end on a word, answers start
# with a space, so encode(prompt) + encode(answer) == encode(prompt + answer) for BPE tokenizers.
TEMPLATES: dict[str, tuple[str, ...]] = {
    # r1: person -> city (all tiers)
    "works_in": (
        "{e1} works in the city of",
        "The city where {e1} works is",
        "{e1} is employed in the city of",
    ),
    # r2 for F and H: city -> country
    "located_in": (
        "{e2} is a city in the country of",
        "The city of {e2} is located in the country of",
        "{e2} lies in the country of",
    ),
    # r2 for R: city -> mascot animal (a new relation between familiar names)
    "mascot": (
        "The mascot of {e2} is the",
        "The city of {e2} has a mascot, the",
        "The official animal of {e2} is the",
    ),
    # two-hop (r1 then located_in)
    "works_in+located_in": (
        "The city where {e1} works is in the country of",
        "{e1} works in a city located in the country of",
        "{e1} is employed in a city in the country of",
    ),
    # two-hop (r1 then mascot)
    "works_in+mascot": (
        "The mascot of the city where {e1} works is the",
        "{e1} works in a city whose mascot is the",
        "The official animal of the city where {e1} works is the",
    ),
}
R1 = "works_in"
R2_BY_TIER = {"F": "located_in", "H": "located_in", "R": "mascot"}



# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    """A generated two-hop world: chains, every dataset as :class:`Example` lists, measurements.

    Attributes:
        seed: RNG seed it was generated from.
        config: the generator arguments (JSON-able).
        chains: one row per chain: ``chain_id, tier, role ("test"|"d_ac"), e1, e2, e3``.
        examples: every example of every split.
        familiarity: one row per candidate name measured on the base model: ``name, etype,
            tier, role, n_tokens, mean_logprob, kept, reason`` (empty without ``base``).
        base_checks: one row per query asked of the base model: ``tier, kind, relation,
            template_id, chain_id, prompt, answer, pred, correct`` (empty without ``base``).
    """

    seed: int
    config: dict[str, Any]
    chains: pd.DataFrame
    examples: list[Example]
    familiarity: pd.DataFrame
    base_checks: pd.DataFrame

    def get(self, split: str | None = None, tier: str | None = None, kind: str | None = None,
            held_out: bool | None = None) -> list[Example]:
        """Examples filtered by split / tier / kind / held-out template (``None`` = any).

        Raises:
            WorldError: a filter value that no example has (likely a typo).
        """
        for field, val in (("split", split), ("tier", tier), ("kind", kind)):
            if val is not None and val not in {getattr(e, field) for e in self.examples}:
                raise WorldError(f"no example has {field}={val!r}")
        return [e for e in self.examples
                if (split is None or e.split == split) and (tier is None or e.tier == tier)
                and (kind is None or e.kind == kind)
                and (held_out is None or e.held_out_template == held_out)]

    def train_pairs(self, split: str) -> list[tuple[str, str]]:
        """``(prompt, answer)`` pairs of a split, the input format of ``train_expert``."""
        return [(e.prompt, e.answer) for e in self.get(split=split)]

    def summary(self) -> pd.DataFrame:
        """Number of examples, chains and templates per ``split, tier, kind``."""
        df = pd.DataFrame([e.to_dict() for e in self.examples])
        return (df.groupby(["split", "tier", "kind"], sort=True)
                .agg(n=("prompt", "size"), n_chains=("chain_id", "nunique"),
                     n_templates=("template_id", "nunique"),
                     n_held_out=("held_out_template", "sum"))
                .reset_index())

    def familiarity_summary(self) -> pd.DataFrame:
        """Per tier: base first-token accuracy per (kind, relation) and mean name log-prob per
        entity role, from ``base_checks`` and ``familiarity`` (empty without ``base``)."""
        rows = []
        if len(self.base_checks):
            g = self.base_checks.groupby(["tier", "kind", "relation"])["correct"]
            for (tier, kind, rel), s in g:
                rows.append({"tier": tier, "measure": f"base_acc_{kind}", "relation": rel,
                             "n": int(s.size), "value": float(s.mean())})
        if len(self.familiarity):
            kept = self.familiarity[self.familiarity["kept"]]
            for (tier, role), s in kept.groupby(["tier", "role"])["mean_logprob"]:
                rows.append({"tier": tier, "measure": f"name_logprob_{role}", "relation": "",
                             "n": int(s.size), "value": float(s.mean())})
        return pd.DataFrame(rows, columns=["tier", "measure", "relation", "n", "value"])

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the world to ``path`` as JSON, atomically."""
        blob = {"format": "interp.two_hop.World/1", "seed": self.seed, "config": self.config,
                "chains": self.chains.to_dict(orient="records"),
                "examples": [e.to_dict() for e in self.examples],
                "familiarity": self.familiarity.to_dict(orient="records"),
                "base_checks": self.base_checks.to_dict(orient="records")}
        atomic_write_text(path, json.dumps(blob, indent=0))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "World":
        """Read a world written by :meth:`to_json`.

        Raises:
            WorldError: missing file, invalid JSON, wrong format tag or bad example fields.
        """
        p = Path(path)
        blob = read_structured(p, json.loads, WorldError, "world file", "JSON")
        if not isinstance(blob, dict) or blob.get("format") != "interp.two_hop.World/1":
            raise WorldError(f"{p} is not an interp two-hop world file")
        return cls(seed=int(blob["seed"]), config=blob["config"],
                   chains=pd.DataFrame(blob["chains"], columns=_CHAIN_COLS),
                   examples=[Example.from_dict(d) for d in blob["examples"]],
                   familiarity=pd.DataFrame(blob["familiarity"], columns=_FAM_COLS),
                   base_checks=pd.DataFrame(blob["base_checks"], columns=_CHECK_COLS))


_CHAIN_COLS = ["chain_id", "tier", "role", "e1", "e2", "e3"]
_FAM_COLS = ["name", "etype", "tier", "role", "n_tokens", "mean_logprob", "kept", "reason"]
_CHECK_COLS = ["tier", "kind", "relation", "template_id", "chain_id", "prompt", "answer", "pred",
               "correct"]


def _examples_for(chain: dict, kind: str, relation: str, template_ids: Iterable[int],
                  split: str, n_train: int) -> list[Example]:
    key = "e2" if kind == "hop2" else "e1"
    answer = {"hop1": chain["e2"], "hop2": chain["e3"], "two_hop": chain["e3"]}[kind]
    out = []
    for t in template_ids:
        prompt, spans = fill_template(TEMPLATES[relation][t], **{key: chain[key]})
        out.append(Example(prompt=prompt, answer=" " + answer, kind=kind, tier=chain["tier"],
                           chain_id=int(chain["chain_id"]), template_id=t, e1=chain["e1"],
                           e2=chain["e2"], e3=chain["e3"], char_spans=spans, split=split,
                           relation=relation, held_out_template=t >= n_train))
    return out


def make_world(seed: int = 0, n_chains_per_tier: int = 64, base: Any = None, *,
               n_dac_chains_per_tier: int = 16, n_train_templates: int = 2,
               n_invented_countries: int = 16, tokenizer: Any = None,
               real_city_country: Sequence[tuple[str, str]] = REAL_CITY_COUNTRY,
               famous_people: Sequence[str] = FAMOUS_PEOPLE, animals: Sequence[str] = ANIMALS,
               check_templates: Sequence[int] = (0,), batch_size: int = 16,
               max_draws: int = 20000) -> World:
    """Generate a seeded two-hop world (module docstring: tiers, splits, familiarity checks).

    Args:
        seed: RNG seed; the same seed (and base model) gives the same world.
        n_chains_per_tier: test chains per tier.
        base: a ``HookedModel``; when given, familiarity is measured and enforced (real
            city→country facts filtered to those the base model answers, names scored).
        n_dac_chains_per_tier: extra chains per tier whose two-hop queries form D_AC.
        n_train_templates: templates per relation used for training (the rest are held out).
        n_invented_countries: size of the invented country pool of tier F.
        tokenizer: tokenizer for name checks when ``base`` is not given.
        real_city_country, famous_people, animals: the real entity lists.
        check_templates: templates of the base-model accuracy checks on the chains' facts.
        batch_size: base-model batch size.
        max_draws: cap on invented-name draws before giving up.

    Returns:
        a :class:`World`.

    Raises:
        WorldError: non-positive sizes, bad entity lists (empty/duplicate names, names that
            tokenise to nothing), or too few entities surviving the checks.
    """
    t0 = time.perf_counter()
    if n_chains_per_tier < 1 or n_dac_chains_per_tier < 0:
        raise WorldError(f"need n_chains_per_tier >= 1 and n_dac_chains_per_tier >= 0, got "
                         f"{n_chains_per_tier}, {n_dac_chains_per_tier}")
    n_templates = min(len(v) for v in TEMPLATES.values())
    if not 1 <= n_train_templates < n_templates:
        raise WorldError(f"n_train_templates must be in [1, {n_templates - 1}] so that at least "
                         f"one template is held out; got {n_train_templates}")
    if n_invented_countries < 1:
        raise WorldError("n_invented_countries must be >= 1")
    tok = _tokenizer_of(base) if base is not None else (_tokenizer_of(tokenizer) if tokenizer else None)
    cities = [c for c, _ in real_city_country]
    validate_names(cities, tok)
    validate_names(list(famous_people), tok)
    validate_names(list(animals), tok)
    validate_names(sorted({k for _, k in real_city_country}), tok)
    rng = random.Random(seed)
    n_per_tier = n_chains_per_tier + n_dac_chains_per_tier
    informative = tok is not None and first_token_is_informative(tok)
    fam_rows: list[dict] = []
    check_rows: list[dict] = []

    # -- real entities: city -> country facts the base model knows (tier H) ------------------
    known_pairs = list(real_city_country)
    if base is not None:
        known_pairs = []
        rel = "located_in"
        queries = [(c, k, t) for c, k in real_city_country for t in range(n_train_templates)]
        prompts = [fill_template(TEMPLATES[rel][t], e2=c)[0] for c, k, t in queries]
        preds = first_token_predictions(base, prompts, batch_size)
        ok: dict[str, bool] = {}
        for (c, k, t), p, pr in zip(queries, prompts, preds):
            good = pr == _first_token(tok, k)
            ok[c] = ok.get(c, True) and good
            check_rows.append({"tier": "H", "kind": "real_fact", "relation": rel, "template_id": t,
                               "chain_id": -1, "prompt": p, "answer": " " + k,
                               "pred": tok.decode([pr]), "correct": bool(good)})
        known_pairs = [(c, k) for c, k in real_city_country if ok[c]]
    # distinct first tokens among countries and among cities (answers of one query type)
    used_first: dict[str, set[int]] = {"city": set(), "country": set(), "animal": set()}

    def claim(etype: str, name: str) -> bool:
        if not informative:
            return True
        ft = _first_token(tok, name)
        if ft in used_first[etype]:
            return False
        used_first[etype].add(ft)
        return True

    country_first: dict[str, int] = {}
    kept_pairs = []
    for c, k in known_pairs:  # real countries may repeat (several cities per country)
        if informative and k not in country_first:
            ft = _first_token(tok, k)
            if ft in used_first["country"]:
                continue
            used_first["country"].add(ft)
            country_first[k] = ft
        kept_pairs.append((c, k))
    known_pairs = kept_pairs
    real_cities = []
    for c in cities:
        if claim("city", c):
            real_cities.append(c)
    known_pairs = [(c, k) for c, k in known_pairs if c in set(real_cities)]
    animal_pool = [a for a in animals if claim("animal", a)]

    people = list(famous_people)
    if base is not None:
        for etype, names, tier, role in (("person", people, "R", "e1"),
                                         ("city", real_cities, "HR", "e2"),
                                         ("animal", animal_pool, "R", "e3")):
            lps = name_logprobs(base, names, etype)
            for n, lp in zip(names, lps):
                keep = etype != "person" or lp >= FAMOUS_MIN_LOGPROB
                fam_rows.append({"name": n, "etype": etype, "tier": tier, "role": role,
                                 "n_tokens": len(base.encode(" " + n)), "mean_logprob": lp,
                                 "kept": keep, "reason": "" if keep else
                                 f"mean log-prob {lp:.2f} < {FAMOUS_MIN_LOGPROB}"})
        low = {r["name"] for r in fam_rows if r["etype"] == "person" and not r["kept"]}
        people = [p for p in people if p not in low]
        countries = sorted({k for _, k in known_pairs})
        for n, lp in zip(countries, name_logprobs(base, countries, "country")):
            fam_rows.append({"name": n, "etype": "country", "tier": "H", "role": "e3",
                             "n_tokens": len(base.encode(" " + n)), "mean_logprob": lp,
                             "kept": True, "reason": ""})
    if len(known_pairs) < 2:
        raise WorldError(f"only {len(known_pairs)} real city->country facts survive the checks; "
                         "tier H needs at least 2")
    if len(people) < n_per_tier:
        raise WorldError(f"tier R needs {n_per_tier} famous people but only {len(people)} survive "
                         f"(log-prob >= {FAMOUS_MIN_LOGPROB}); lower n_chains_per_tier or add names")
    if len(animal_pool) < 2:
        raise WorldError("tier R needs at least 2 animals with distinct first tokens")

    # -- invented names --------------------------------------------------------------------
    taken = {n.lower() for n in cities + people + list(animals) + list(famous_people)}
    taken |= {k.lower() for _, k in real_city_country}
    words = set()
    for n in taken:
        words |= set(n.split())

    def draw(etype: str, n: int) -> list[str]:
        out: list[str] = []
        draws = 0
        while len(out) < n:
            batch, firsts = [], set()
            while len(batch) < max(3 * (n - len(out)), 32):
                draws += 1
                if draws > max_draws:
                    raise WorldError(f"could not draw {n} distinct invented {etype} names in "
                                     f"{max_draws} draws (first-token collisions?)")
                name = invented_name(rng, etype)
                if name.lower() in taken or any(w.lower() in words for w in name.split()):
                    continue
                if informative and etype in used_first:  # cheap first-token pre-filter
                    ft = _first_token(tok, name)
                    if ft in used_first[etype] or ft in firsts:
                        continue
                    firsts.add(ft)
                taken.add(name.lower())
                batch.append(name)
            lps = name_logprobs(base, batch, etype) if base is not None else [None] * len(batch)
            for name, lp in zip(batch, lps):
                if len(out) >= n:
                    break
                reason = ""
                if lp is not None and lp > INVENTED_MAX_LOGPROB:
                    reason = f"mean log-prob {lp:.2f} > {INVENTED_MAX_LOGPROB}"
                elif etype in used_first and not claim(etype, name):
                    reason = "first token collides with another candidate answer"
                if base is not None:
                    fam_rows.append({"name": name, "etype": etype, "tier": "FH" if etype == "person"
                                     else "F", "role": {"person": "e1", "city": "e2",
                                                        "country": "e3"}[etype],
                                     "n_tokens": len(base.encode(" " + name)), "mean_logprob": lp,
                                     "kept": not reason, "reason": reason})
                if not reason:
                    out.append(name)
        return out

    inv_countries = draw("country", n_invented_countries)
    inv_cities = draw("city", n_per_tier)
    inv_people = draw("person", 2 * n_per_tier)

    # -- chains ------------------------------------------------------------------------------
    chains: list[dict] = []
    shuffled_known = known_pairs[:]
    rng.shuffle(shuffled_known)
    r_cities = real_cities[:]
    rng.shuffle(r_cities)
    mascot = {c: rng.choice(animal_pool) for c in r_cities}
    country_of_inv = {c: rng.choice(inv_countries) for c in inv_cities}
    famous = people[:]
    rng.shuffle(famous)
    for tier in TIERS:
        for i in range(n_per_tier):
            role = "test" if i < n_chains_per_tier else "d_ac"
            if tier == "F":
                e1, e2 = inv_people[i], inv_cities[i]
                e3 = country_of_inv[e2]
            elif tier == "H":
                e1 = inv_people[n_per_tier + i]
                e2, e3 = shuffled_known[i % len(shuffled_known)]
            else:
                e1 = famous[i]
                e2 = r_cities[i % len(r_cities)]
                e3 = mascot[e2]
            chains.append({"chain_id": len(chains), "tier": tier, "role": role,
                           "e1": e1, "e2": e2, "e3": e3})

    # -- datasets ----------------------------------------------------------------------------
    train_t = range(n_train_templates)
    all_t = range(n_templates)
    examples: list[Example] = []
    seen_hop2: set[tuple[str, str]] = set()
    for ch in chains:
        r2 = R2_BY_TIER[ch["tier"]]
        examples += _examples_for(ch, "hop1", R1, train_t, "d1", n_train_templates)
        if (ch["tier"], ch["e2"]) not in seen_hop2:
            seen_hop2.add((ch["tier"], ch["e2"]))
            examples += _examples_for(ch, "hop2", r2, train_t, "d2", n_train_templates)
        two = f"{R1}+{r2}"
        if ch["role"] == "d_ac":
            examples += _examples_for(ch, "two_hop", two, train_t, "d_ac", n_train_templates)
        else:
            examples += _examples_for(ch, "two_hop", two, all_t, "test", n_train_templates)
            examples += _examples_for(ch, "hop1", R1, all_t, "eval", n_train_templates)
            examples += _examples_for(ch, "hop2", r2, all_t, "eval", n_train_templates)
    for c, k in known_pairs:
        examples += _examples_for({"chain_id": -1, "tier": "H", "e1": "", "e2": c, "e3": k},
                                  "hop2", "located_in", all_t, "retain", n_train_templates)

    # -- base-model accuracy on the chains' own facts ------------------------------------------
    if base is not None:
        probe = [e for e in examples if e.split in ("eval", "test")
                 and e.template_id in set(check_templates)]
        preds = first_token_predictions(base, [e.prompt for e in probe], batch_size)
        for e, pr in zip(probe, preds):
            check_rows.append({"tier": e.tier, "kind": e.kind, "relation": e.relation,
                               "template_id": e.template_id, "chain_id": e.chain_id,
                               "prompt": e.prompt, "answer": e.answer, "pred": tok.decode([pr]),
                               "correct": pr == answer_token_ids(e, base)[0]})

    config = {"seed": seed, "n_chains_per_tier": n_chains_per_tier,
              "n_dac_chains_per_tier": n_dac_chains_per_tier,
              "n_train_templates": n_train_templates, "n_invented_countries": n_invented_countries,
              "base": getattr(base, "name", None), "first_token_distinct": informative,
              "check_templates": list(check_templates),
              "thresholds": {"invented_max_logprob": INVENTED_MAX_LOGPROB,
                             "famous_min_logprob": FAMOUS_MIN_LOGPROB},
              "seconds": round(time.perf_counter() - t0, 2)}
    return World(seed=seed, config=config, chains=pd.DataFrame(chains, columns=_CHAIN_COLS),
                 examples=examples, familiarity=pd.DataFrame(fam_rows, columns=_FAM_COLS),
                 base_checks=pd.DataFrame(check_rows, columns=_CHECK_COLS))


def chaining_prompts(world_or_examples: World | Sequence[Example],
                     hop1_predictions: Sequence[str], placeholder: str = "unknown") -> list[Example]:
    """Explicit chaining: the hop-2 prompt filled with the model's own hop-1 answer.

    For hop-1 example *i* (``e₁ r₁ → ?``) and the model's answer ``hop1_predictions[i]`` (e.g.
    from ``evaluate.greedy_answers``), build ``e₂' r₂ → e₃`` with the same template index of the
    tier's r₂ relation; its gold answer is the chain's true e₃. The prediction is cut at the first
    newline / period / comma and stripped; an empty one is replaced by ``placeholder`` (the
    example then records ``e2_used=""``). This separates missing knowledge from failed latent
    composition (cf. Biran et al. 2024; Balesni et al. 2024).

    Args:
        world_or_examples: a :class:`World` (its ``eval`` hop1 examples are used, in order) or
            a list of ``hop1`` examples.
        hop1_predictions: one predicted continuation per hop-1 example.

    Returns:
        ``chain_hop2`` examples (split ``"chain"``), aligned with the input.

    Raises:
        WorldError: lengths differ, an example is not ``hop1``, or the list is empty.
    """
    exs = world_or_examples.get(split="eval", kind="hop1") if isinstance(world_or_examples, World) \
        else list(world_or_examples)
    if not exs:
        raise WorldError("chaining_prompts got no hop-1 examples")
    if len(exs) != len(hop1_predictions):
        raise WorldError(f"{len(exs)} hop-1 examples but {len(hop1_predictions)} predictions")
    out = []
    for e, pred in zip(exs, hop1_predictions):
        if e.kind != "hop1":
            raise WorldError(f"chaining_prompts needs hop1 examples, got kind {e.kind!r}")
        p = str(pred).split("\n")[0]
        for stop in (".", ","):
            p = p.split(stop)[0]
        p = p.strip()
        rel = R2_BY_TIER[e.tier]
        t = min(e.template_id, len(TEMPLATES[rel]) - 1)
        prompt, spans = fill_template(TEMPLATES[rel][t], e2=p or placeholder)
        out.append(dataclasses.replace(e, prompt=prompt, answer=" " + e.e3, kind="chain_hop2",
                                       template_id=t, char_spans=spans, split="chain",
                                       relation=rel, e2_used=p))
    return out
