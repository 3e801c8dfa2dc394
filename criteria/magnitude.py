"""Magnitude criteria: L1 (the default) and L2 norm of each channel's weights."""
from __future__ import annotations

import numpy as np

from .base import Criterion, combine, coverage, per_channel, position_norms, scored_members


class LpNorm(Criterion):
    """Mean over members of the max-normalised p-norm of each channel's weights.

    Every scored member counts (producer rows, consumer columns, norm scale and shift):
    a channel that feeds nothing downstream scores low even if its filter is large.
    """

    def __init__(self, p: int):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = p
        self.name = f"l{p}"

    def scores(self, group) -> np.ndarray:
        per_member, covered = [], []
        for member in scored_members(group):
            channel = per_channel(member, position_norms(member, self.p), group.size)
            per_member.append(channel if self.p == 1 else np.sqrt(channel))
            covered.append(coverage(member, group.size))
        return combine(per_member, group.size, covered)

    def __repr__(self) -> str:
        return f"LpNorm(p={self.p})"


class L1(LpNorm):
    """Sum of absolute weights per channel (the classic filter-pruning criterion)."""

    def __init__(self):
        super().__init__(1)

    def __repr__(self) -> str:
        return "L1()"


class L2(LpNorm):
    """Euclidean norm of each channel's weights."""

    def __init__(self):
        super().__init__(2)

    def __repr__(self) -> str:
        return "L2()"
