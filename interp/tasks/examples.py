"""The data contract of every task: :class:`Example` (a prompt, its gold answer and the character
spans of its entity mentions), filling templates with names, and mapping mentions to token spans.

Task generators (:mod:`interp.tasks.two_hop`, …) produce Examples; evaluation and every mechanism
analysis consume them, so they never parse prompts themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from interp.tasks.entities import WorldError, _tokenizer_of


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
