"""Entities of the two-hop worlds: the real and invented names they draw from, checks that a name
is usable (non-empty, distinct, tokenises to something), and the base model's familiarity with a
name (mean log-prob of its tokens in a neutral context), which sorts entities into the F / H / R
tiers of Chen et al. (arXiv 2506.13479). :mod:`interp.tasks.two_hop` builds worlds from these.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from interp.errors import InterpError

class WorldError(InterpError, ValueError):
    """A world cannot be built or loaded: bad names, too few entities, corrupt file."""


NAME_CONTEXTS = {
    "person": "Let me tell you about",
    "city": "Let me tell you about the city of",
    "country": "Let me tell you about the country of",
    "animal": "Let me tell you about the",
}
INVENTED_MAX_LOGPROB = -6.0
FAMOUS_MIN_LOGPROB = -8.0

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


def _tokenizer_of(hm_or_tokenizer: Any) -> Any:
    return getattr(hm_or_tokenizer, "tokenizer", hm_or_tokenizer)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def invented_name(rng: random.Random, etype: str) -> str:
    """One invented name of type ``"person"`` (two words), ``"city"`` or ``"country"``."""
    if etype == "person":
        return (_syllable(rng) + _syllable(rng)).capitalize() + " " + \
            (_syllable(rng) + rng.choice(("", _syllable(rng)))).capitalize()
    if etype == "city":
        return (_syllable(rng) + rng.choice(_CITY_SUFFIX)).capitalize()
    if etype == "country":
        return (_syllable(rng) + rng.choice(("", _syllable(rng))) + rng.choice(_COUNTRY_SUFFIX)).capitalize()
    raise WorldError(f"unknown entity type {etype!r}")


def validate_names(names: Sequence[str], tokenizer: Any = None) -> None:
    """Check a list of entity names: non-empty, unique, and (if a tokenizer is given) non-empty
    after tokenisation with a leading space.

    Raises:
        WorldError: an empty/blank name, a name with surrounding whitespace, a duplicate
            (case-insensitive), or a name that tokenises to no tokens.
    """
    seen: dict[str, str] = {}
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise WorldError(f"empty entity name {n!r}")
        if n != n.strip():
            raise WorldError(f"entity name {n!r} has surrounding whitespace")
        key = n.lower()
        if key in seen:
            raise WorldError(f"duplicate entity name {n!r} (collides with {seen[key]!r})")
        seen[key] = n
        if tokenizer is not None:
            ids = _tokenizer_of(tokenizer)(" " + n, add_special_tokens=False)["input_ids"]
            if not ids or not _tokenizer_of(tokenizer).decode(ids).strip():
                raise WorldError(f"entity name {n!r} tokenises to nothing")


def _first_token(tok: Any, name: str) -> int:
    ids = tok(" " + name, add_special_tokens=False)["input_ids"]
    if not ids:
        raise WorldError(f"entity name {name!r} tokenises to nothing")
    return int(ids[0])


def first_token_is_informative(tokenizer: Any) -> bool:
    """False for byte-level tokenizers, where every ``" Name"`` starts with the same space token."""
    tok = _tokenizer_of(tokenizer)
    return _first_token(tok, "Paris") != _first_token(tok, "Tokyo")


# --------------------------------------------------------------------------------------------
# Base-model measurements (familiarity)
# --------------------------------------------------------------------------------------------


def name_logprobs(hm: Any, names: Sequence[str], etype: str, batch_size: int = 32) -> list[float]:
    """Mean log-probability per token (nats) of ``" " + name`` after ``NAME_CONTEXTS[etype]``.

    A familiarity score: high for names the base model has seen (the later tokens of "Albert
    Einstein" are nearly certain), low for invented ones.

    Returns:
        one float per name (≤ 0).

    Raises:
        WorldError: unknown ``etype``; a name that tokenises to nothing.
    """
    import torch

    if etype not in NAME_CONTEXTS:
        raise WorldError(f"unknown entity type {etype!r}; expected one of {sorted(NAME_CONTEXTS)}")
    ctx = hm.encode(NAME_CONTEXTS[etype])
    out: list[float] = []
    for b in range(0, len(names), batch_size):
        chunk = list(names[b:b + batch_size])
        rows = []
        for n in chunk:
            ids = hm.encode(" " + n)
            if not ids:
                raise WorldError(f"entity name {n!r} tokenises to nothing")
            rows.append(ids)
        width = len(ctx) + max(len(r) for r in rows)
        toks = torch.full((len(rows), width), hm.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            toks[i, :len(ctx) + len(r)] = torch.tensor(ctx + r)
        logp = torch.log_softmax(hm.logits(toks.to(hm.device)).float(), dim=-1)
        for i, r in enumerate(rows):
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(r))
            lp = logp[i, pos, torch.tensor(r)]
            out.append(float(lp.mean()))
    return out


def first_token_predictions(hm: Any, prompts: Sequence[str], batch_size: int = 16) -> list[int]:
    """Greedy first token (argmax at the last prompt position) of each prompt, batched."""
    preds: list[int] = []
    for b in range(0, len(prompts), batch_size):
        preds.extend(int(t) for t in hm.final_logits(list(prompts[b:b + batch_size])).argmax(-1))
    return preds
