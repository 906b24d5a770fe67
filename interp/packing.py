"""First-fit-decreasing packing of variable-length segments into fixed-capacity rows.

Shared by the patching engine (copies of prompt suffixes in one forward) and LoRA training
(examples in one batch row instead of right padding): both trade padded tokens for rows
that hold several independent segments.
"""

from __future__ import annotations

from typing import Sequence


def first_fit_decreasing(lengths: Sequence[int], capacity: int,
                         max_per_row: int | None = None) -> list[list[tuple[int, int]]]:
    """Pack segments of ``lengths`` (tokens) into rows of ``capacity`` tokens, longest first,
    each into the first row with room.

    Returns rows as lists of ``(segment index, offset in row)``; a row holds at most
    ``max_per_row`` segments (``None``: no limit). A segment longer than ``capacity`` gets a
    row of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[tuple[int, int]]] = []
    used: list[int] = []
    for i in order:
        s = lengths[i]
        for r in range(len(rows)):
            if used[r] + s <= capacity and (max_per_row is None or len(rows[r]) < max_per_row):
                rows[r].append((i, used[r]))
                used[r] += s
                break
        else:
            rows.append([(i, 0)])
            used.append(s)
    return rows
