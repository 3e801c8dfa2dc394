"""The criterion interface: one importance score per channel of a group."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

SCORED_ROLES = ("out", "in", "scale", "shift", "param")


class Criterion(ABC):
    """Scores the channels of a group; higher means more important (pruned last).

    ``scores(group)`` reads every member of the group (producer rows, consumer columns,
    norm scales, parameters read directly) and returns ``group.size`` scores. Unless a
    criterion says otherwise, each member's per-channel scores are divided by their
    maximum and the members are averaged with equal weight.
    """

    name: str = "criterion"
    requires_data: bool = False

    def prepare(self, model, report) -> None:
        """Called once with the model and its analysis :class:`~graphprune.Report` before any
        ``scores`` call; data-driven criteria collect their statistics here."""

    @abstractmethod
    def scores(self, group) -> np.ndarray:
        """Importance of each of ``group.size`` channels (1-D float array)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def channel_rows(member) -> torch.Tensor:
    """The member's tensor as a (positions, features) matrix along its group dim."""
    tensor = member.tensor.detach()
    return tensor.movedim(member.dim, 0).reshape(tensor.shape[member.dim], -1)


def position_norms(member, p: int) -> np.ndarray:
    """p-th power of the p-norm of each position along the member's dim (float64 numpy)."""
    tensor = member.tensor.detach()
    other = [d for d in range(tensor.dim()) if d != member.dim]
    norms = torch.linalg.vector_norm(tensor.float(), ord=p, dim=other) if other else tensor.float().abs()
    return norms.double().cpu().numpy() ** p


def per_channel(member, position_scores: np.ndarray, size: int) -> np.ndarray:
    """Sum position scores into the group's channels (a channel may own several positions)."""
    return np.bincount(member.index_map, weights=position_scores, minlength=size)


def combine(per_member: list[np.ndarray], size: int) -> np.ndarray:
    """Average of the members' scores, each divided by its maximum."""
    normalised = [s / s.max() if s.max() > 0 else s for s in per_member]
    return np.mean(normalised, axis=0) if normalised else np.zeros(size)


def scored_members(group) -> list:
    return [m for m in group.members if m.role in SCORED_ROLES]
