"""Two-hop examples for mechanism tests, built as the project's own ``Example``."""

from interp.tasks.two_hop import Example


def example(prompt: str, answer: str = "", e1: str = "", e2: str = "", e3: str = "", *,
            char_spans: dict | None = None, tier: str = "F", kind: str = "two_hop",
            chain_id: int = 0, template_id: int = 0, split: str = "test") -> Example:
    """An :class:`Example` with test defaults for the fields a mechanism does not read."""
    return Example(prompt=prompt, answer=answer, kind=kind, tier=tier, chain_id=chain_id,
                   template_id=template_id, e1=e1, e2=e2, e3=e3, char_spans=char_spans or {},
                   split=split)
