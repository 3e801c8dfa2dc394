"""Channel importance criteria. ``get_criterion("l1")`` returns a ready criterion."""
from __future__ import annotations

from typing import Union

from .base import Criterion
from .magnitude import L1, L2

CRITERIA: dict = {"l1": L1, "l2": L2}


def get_criterion(criterion: Union[str, Criterion]) -> Criterion:
    """A criterion instance from a name (case-insensitive) or an instance."""
    if isinstance(criterion, Criterion):
        return criterion
    if not isinstance(criterion, str):
        raise TypeError(f"criterion must be a name or a Criterion instance, got {type(criterion).__name__}")
    key = criterion.lower()
    if key not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[key]()


__all__ = ["Criterion", "L1", "L2", "CRITERIA", "get_criterion"]
