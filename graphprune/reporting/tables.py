"""Plain-text tables, as the reports print them."""
from __future__ import annotations

from typing import Iterable, Sequence


def text_table(header: Sequence[str], lines: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """``header``, a rule of dashes and ``lines`` as aligned columns; the columns whose
    indices are in ``right`` are right-aligned, the others left-aligned."""
    right = set(right)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])
