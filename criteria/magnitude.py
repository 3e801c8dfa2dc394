"""Magnitude criteria: L1 (the default) and L2 norm of each channel's weights."""
from __future__ import annotations

import numpy as np
import torch

from .base import WeightCriterion, chunk_buffer, combine, coverage, per_channel, row_and_column_norms, tensor_position_norms


class LpNorm(WeightCriterion):
    """Mean over members of the max-normalised p-norm of each channel's weights.

    Every scored member counts (producer rows, consumer columns, norm scale and shift):
    a channel that feeds nothing downstream scores low even if its filter is large.
    ``prepare`` reads every weight once, for all the dims the prunable groups read it along
    (a weight's rows produce one group and its columns consume another); ``scores`` then
    uses those norms, as of ``prepare``.
    """

    def __init__(self, p: int):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = p
        self.name = f"l{p}"
        self._scratch = None  # a chunk buffer reused across tensors (a fresh one per tensor costs page faults)

    def position_scores(self, tensor: torch.Tensor, dims: set) -> dict:
        """The p-th power of the p-norm of every position along each of ``dims``; rows and
        columns of a weight in one read."""
        if set(dims) == {0, 1}:
            if self._scratch is None or self._scratch.device != tensor.device:
                self._scratch = chunk_buffer(tensor.device)
            both = row_and_column_norms(tensor, self.p, self._scratch)
            if both is not None:
                return {0: both[0], 1: both[1]}
        return {dim: tensor_position_norms(tensor, dim, self.p) for dim in dims}

    def group_scores(self, group, members: list, positions: list) -> np.ndarray:
        per_member, covered = [], []
        for member, values in zip(members, positions):
            channel = per_channel(member, values, group.size)
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
