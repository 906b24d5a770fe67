"""Synthetic two-hop worlds: chains e₁ →r₁→ e₂ →r₂→ e₃ in three familiarity tiers (F / H / R).

The task of Chen, Hoang, Hahn & Sarfraz (arXiv 2506.13479; TMLR 2026, "When does LoRA reuse
work?"): expert 1 learns the first hop (A→B, D₁), expert 2 the second hop (B→C, D₂), and the query
asks the composition A→C. Test sets differ by entity familiarity (reference/paper.md §1):

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
* invented names with mean log-prob above ``INVENTED_MAX_LOGPROB`` (-2.0 nats/token) are rejected as
  too predictable (they may be real words or names);
* famous people (R's e₁) need mean log-prob ≥ ``FAMOUS_MIN_LOGPROB`` (-3.0);
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

from interp.models import atomic_write_text

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

NAME_CONTEXTS = {
    "person": "Let me tell you about",
    "city": "Let me tell you about the city of",
    "country": "Let me tell you about the country of",
    "animal": "Let me tell you about the",
}
INVENTED_MAX_LOGPROB = -2.0
FAMOUS_MIN_LOGPROB = -3.0

# Very well-known cities and their countries (one-word or two-word country names without "the").
REAL_CITY_COUNTRY: tuple[tuple[str, str], ...] = (
    ("Paris", "France"), ("Tokyo", "Japan"), ("Berlin", "Germany"), ("Rome", "Italy"),
    ("Madrid", "Spain"), ("Moscow", "Russia"), ("Beijing", "China"), ("Cairo", "Egypt"),
    ("Athens", "Greece"), ("Toronto", "Canada"), ("Sydney", "Australia"), ("Mumbai", "India"),
    ("Lisbon", "Portugal"), ("Vienna", "Austria"), ("Stockholm", "Sweden"), ("Oslo", "Norway"),
    ("Dublin", "Ireland"), ("Warsaw", "Poland"), ("Istanbul", "Turkey"), ("Bangkok", "Thailand"),
    ("Buenos Aires", "Argentina"), ("Rio de Janeiro", "Brazil"), ("Munich", "Germany"),
    ("Barcelona", "Spain"), ("Milan", "Italy"), ("Venice", "Italy"), ("Kyoto", "Japan"),
    ("Osaka", "Japan"), ("Shanghai", "China"), ("Budapest", "Hungary"),
    ("Copenhagen", "Denmark"), ("Helsinki", "Finland"), ("Brussels", "Belgium"),
    ("Geneva", "Switzerland"), ("Zurich", "Switzerland"), ("Nairobi", "Kenya"),
    ("Lagos", "Nigeria"), ("Jakarta", "Indonesia"), ("Hanoi", "Vietnam"), ("Lima", "Peru"),
    ("Havana", "Cuba"), ("Tehran", "Iran"), ("Baghdad", "Iraq"), ("Karachi", "Pakistan"),
    ("Marseille", "France"), ("Lyon", "France"), ("Hamburg", "Germany"), ("Florence", "Italy"),
    ("Naples", "Italy"), ("Seville", "Spain"), ("Porto", "Portugal"), ("Edinburgh", "Scotland"),
    ("Casablanca", "Morocco"), ("Melbourne", "Australia"), ("Vancouver", "Canada"),
    ("Montreal", "Canada"), ("Delhi", "India"), ("Santiago", "Chile"), ("Bogota", "Colombia"),
    ("Kiev", "Ukraine"), ("Prague", "Czech Republic"), ("Seoul", "Korea"), ("Manila", "Philippines"),
)

FAMOUS_PEOPLE: tuple[str, ...] = (
    "Albert Einstein", "Isaac Newton", "Barack Obama", "Donald Trump", "Taylor Swift",
    "Michael Jackson", "Elvis Presley", "William Shakespeare", "Leonardo da Vinci",
    "Napoleon Bonaparte", "Abraham Lincoln", "George Washington", "Winston Churchill",
    "Mahatma Gandhi", "Nelson Mandela", "Charles Darwin", "Marie Curie", "Pablo Picasso",
    "Vincent van Gogh", "Ludwig van Beethoven", "Lionel Messi", "Cristiano Ronaldo",
    "Michael Jordan", "Elon Musk", "Bill Gates", "Steve Jobs", "Mark Zuckerberg", "Oprah Winfrey",
    "Tom Hanks", "Brad Pitt", "Leonardo DiCaprio", "Lady Gaga", "Julius Caesar", "Martin Luther King",
    "Sigmund Freud", "Galileo Galilei", "Nikola Tesla", "Thomas Edison", "Stephen Hawking",
    "Walt Disney", "Mother Teresa", "Muhammad Ali", "Serena Williams", "Roger Federer",
    "Usain Bolt", "Tiger Woods", "Johnny Depp", "Tom Cruise", "Will Smith", "Morgan Freeman",
    "Jackie Chan", "Bruce Lee", "Marilyn Monroe", "Charlie Chaplin", "John Lennon",
    "Paul McCartney", "Bob Dylan", "Frank Sinatra", "Justin Bieber", "Kanye West", "Ed Sheeran",
    "Wolfgang Amadeus Mozart", "Johann Sebastian Bach", "Queen Elizabeth", "Princess Diana",
    "John F. Kennedy", "Joe Biden", "Hillary Clinton", "Bill Clinton", "Vladimir Putin",
    "Angela Merkel", "Karl Marx", "Adam Smith", "Aristotle", "Plato", "Socrates", "Confucius",
    "Christopher Columbus", "Neil Armstrong", "Jeff Bezos", "Warren Buffett", "Arnold Schwarzenegger",
    "Sylvester Stallone", "Keanu Reeves", "Scarlett Johansson", "Angelina Jolie", "Jennifer Lopez",
    "Madonna", "Beyonce", "Rihanna", "Eminem", "David Beckham", "Pele", "Diego Maradona",
    "Kobe Bryant", "LeBron James", "Mike Tyson", "Bob Marley", "Freddie Mercury", "Elton John",
    "Mark Twain", "Charles Dickens", "Jane Austen", "Ernest Hemingway", "Leo Tolstoy",
    "Harry Houdini", "Alexander the Great", "Genghis Khan", "Queen Victoria", "Abraham Maslow",
)

ANIMALS: tuple[str, ...] = (
    "tiger", "elephant", "eagle", "wolf", "bear", "lion", "dolphin", "owl", "fox", "horse",
    "rabbit", "penguin", "giraffe", "zebra", "monkey", "snake", "turtle", "whale", "falcon",
    "deer", "shark", "camel", "frog", "parrot", "kangaroo", "panda", "octopus", "squirrel",
)

_ONSETS = ("b", "br", "c", "cr", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "kr", "l", "m",
           "n", "p", "pr", "qu", "r", "s", "st", "t", "tr", "v", "w", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "m", "s", "x", "th", "nd", "rk", "v")
_CITY_SUFFIX = ("mar", "vale", "moor", "holt", "dun", "wick", "grad", "port", "ford", "burg")
_COUNTRY_SUFFIX = ("ia", "land", "stan", "ora", "eth", "ovia")


class WorldError(ValueError):
    """A world cannot be built or loaded: bad names, too few entities, corrupt file."""


# --------------------------------------------------------------------------------------------
# The data contract
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """One prompt with its gold answer.

    Attributes:
        prompt: the query text, ending on a word (no trailing space),
            e.g. ``"The city where Zorbin Quell works is in the country of"``.
        answer: the gold continuation with its leading space, e.g. ``" Vexmoor"``.
        kind: ``"hop1"`` (e₁ r₁ → e₂), ``"hop2"`` (e₂ r₂ → e₃), ``"two_hop"`` (e₁ r₁ r₂ → e₃) or
            ``"chain_hop2"`` (explicit chaining: the hop-2 template filled with the model's own
            hop-1 answer, see :func:`chaining_prompts`).
        tier: ``"F"`` | ``"H"`` | ``"R"``.
        chain_id: index of the chain (``-1`` for retention facts not tied to a chain).
        template_id: index into ``TEMPLATES[relation]``.
        e1, e2, e3: entity names (e₂ is the bridge entity); ``""`` when unknown.
        char_spans: character span ``[start, end)`` of each entity mentioned in ``prompt``
            (``"e1"`` for hop1/two_hop, ``"e2"`` for hop2/chain_hop2).
        split: ``"d1"``, ``"d2"``, ``"d_ac"``, ``"test"``, ``"eval"``, ``"retain"``, ...
        relation: key of ``TEMPLATES`` the prompt was built from.
        held_out_template: True when ``template_id`` is not a training template.
        e2_used: for ``chain_hop2``, the hop-1 answer actually put in the prompt (else ``""``).
    """

    prompt: str
    answer: str
    kind: str
    tier: str
    chain_id: int
    template_id: int
    e1: str
    e2: str
    e3: str
    char_spans: dict[str, tuple[int, int]]
    split: str
    relation: str = ""
    held_out_template: bool = False
    e2_used: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["char_spans"] = {k: list(v) for k, v in self.char_spans.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Example":
        d = dict(d)
        d["char_spans"] = {k: (int(v[0]), int(v[1])) for k, v in d.get("char_spans", {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise WorldError(f"Example has unknown fields {sorted(unknown)}")
        return cls(**d)


def fill_template(template: str, **names: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill ``{e1}`` / ``{e2}`` slots of ``template`` and return (prompt, char spans).

    Returns:
        ``(prompt, {"e1": (start, end), ...})`` — character spans, end exclusive, of each filled
        entity in the prompt.

    Raises:
        WorldError: a slot in the template has no name, or a name is empty.
    """
    out, spans, i = [], {}, 0
    pos = 0
    while True:
        j = template.find("{", i)
        if j < 0:
            out.append(template[i:])
            break
        k = template.index("}", j)
        key = template[j + 1:k]
        if key not in names:
            raise WorldError(f"template {template!r} needs {key!r}, got {sorted(names)}")
        name = names[key]
        if not name or not name.strip():
            raise WorldError(f"empty entity name for slot {key!r} in template {template!r}")
        out.append(template[i:j])
        pos = sum(len(s) for s in out)
        spans[key] = (pos, pos + len(name))
        out.append(name)
        i = k + 1
    return "".join(out), spans


def _tokenizer_of(hm_or_tokenizer: Any) -> Any:
    return getattr(hm_or_tokenizer, "tokenizer", hm_or_tokenizer)


def token_spans(example: Example, hm_or_tokenizer: Any) -> dict[str, tuple[int, int]]:
    """Token span ``[start, end)`` of each entity mention of ``example.prompt``.

    Positions index ``hm.encode(example.prompt)`` (no BOS); a token belongs to a mention when
    its character offsets overlap the mention's ``char_spans`` entry (so a token that also
    carries the preceding space, like SmolLM2's ``"ĠZ"``, counts). Uses the fast tokenizer's
    offset mapping.

    Args:
        example: an :class:`Example` (or any object with ``prompt`` and ``char_spans``).
        hm_or_tokenizer: a ``HookedModel`` or a fast Hugging Face tokenizer.

    Returns:
        ``{"e1": (tok_start, tok_end), ...}`` for every key of ``example.char_spans``.

    Raises:
        WorldError: the tokenizer is not a fast tokenizer (no offsets), or a mention covers no
            token.
    """
    tok = _tokenizer_of(hm_or_tokenizer)
    if not getattr(tok, "is_fast", False):
        raise WorldError("token_spans needs a fast tokenizer (offset mappings)")
    enc = tok(example.prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = {}
    for key, (cs, ce) in example.char_spans.items():
        idx = [t for t, (a, b) in enumerate(offsets) if a < ce and b > cs and b > a]
        if not idx:
            raise WorldError(f"mention {key!r} {example.prompt[cs:ce]!r} covers no token of "
                             f"{example.prompt!r}")
        out[key] = (idx[0], idx[-1] + 1)
    return out


def answer_token_ids(example: Example, hm: Any) -> list[int]:
    """Token ids of the answer as it follows the prompt: ``hm.encode(example.answer)``.

    For every template here, ``encode(prompt) + encode(answer) == encode(prompt + answer)`` on
    BPE tokenizers (prompts end on a word and answers start with a space; tested on SmolLM2).

    Raises:
        WorldError: the answer tokenises to nothing.
    """
    ids = list(_tokenizer_of(hm)(example.answer, add_special_tokens=False)["input_ids"])
    if not ids:
        raise WorldError(f"answer {example.answer!r} tokenises to no tokens")
    return ids
