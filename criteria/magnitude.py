"""Magnitude criteria: L1 (the default) and L2 norm of each channel's weights."""
from __future__ import annotations

import weakref

import numpy as np

from .base import (
    Criterion,
    chunk_buffer,
    combine,
    coverage,
    per_channel,
    position_norms,
    row_and_column_norms,
    scored_members,
)


class LpNorm(Criterion):
    """Mean over members of the max-normalised p-norm of each channel's weights.

    Every scored member counts (producer rows, consumer columns, norm scale and shift):
    a channel that feeds nothing downstream scores low even if its filter is large.
    ``prepare`` reads every weight that two prunable groups share (rows in one, columns in
    the other) once for both; ``scores`` then uses those norms, as of ``prepare``.
    """

    def __init__(self, p: int):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = p
        self.name = f"l{p}"
        self._norms: dict[tuple[int, int], tuple] = {}  # (id(tensor), dim) -> (weakref, norms)

    def prepare(self, model, report) -> None:
        self._norms = {}
        dims: dict[int, tuple] = {}
        for group in report.prunable_groups:
            for member in scored_members(group):
                dims.setdefault(id(member.tensor), (member.tensor, set()))[1].add(member.dim)
        buffers: dict = {}
        for tensor, wanted in dims.values():
            if wanted != {0, 1}:
                continue
            if tensor.device not in buffers:
                buffers[tensor.device] = chunk_buffer(tensor.device)
            both = row_and_column_norms(tensor, self.p, buffers[tensor.device])
            if both is not None:
                self._norms.update({(id(tensor), d): (weakref.ref(tensor), both[d]) for d in (0, 1)})

    def _position_norms(self, member) -> np.ndarray:
        ref, norms = self._norms.get((id(member.tensor), member.dim), (None, None))
        return norms if ref is not None and ref() is member.tensor else position_norms(member, self.p)

    def scores(self, group) -> np.ndarray:
        per_member, covered = [], []
        for member in scored_members(group):
            channel = per_channel(member, self._position_norms(member), group.size)
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
