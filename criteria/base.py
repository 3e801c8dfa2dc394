"""The criterion interface: one importance score per channel of a group.

How members are combined
------------------------
A group spans several parameter dimensions (its *members*: producer rows, consumer columns,
norm scales...). Unless a criterion says otherwise, each member's per-channel scores are
divided by their maximum over the group, and a channel's score is the mean of these
normalised scores over the members that *cover* it (a member covers the channels that its
``index_map`` reaches; e.g. each input of a concat covers only its own slice). See
:func:`combine`.
"""
from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from typing import Optional

import numpy as np
import torch

SCORED_ROLES = ("out", "in", "scale", "shift", "param")


class Criterion(ABC):
    """Scores the channels of a group; higher means more important (pruned last).

    ``scores(group)`` reads every member of the group (producer rows, consumer columns,
    norm scales, parameters read directly) and returns ``group.size`` scores. The planner
    removes the lowest-scoring channels, so a criterion that defines a removal *order*
    (e.g. the K-means family) returns rank-based scores. Unless a criterion says otherwise,
    members are combined with :func:`combine` (mean of per-member max-normalised scores).
    """

    name: str = "criterion"
    requires_data: bool = False
    reads_values: bool = True  # False for a criterion that never reads a tensor's values (random, given scores)

    def prepare(self, model, report) -> None:
        """Called once with the model and its analysis :class:`~graphprune.Report` before any
        ``scores`` call; data-driven criteria collect their statistics here."""

    @abstractmethod
    def scores(self, group) -> np.ndarray:
        """Importance of each of ``group.size`` channels (1-D float array)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightCriterion(Criterion):
    """A criterion that reads weights alone, one tensor at a time.

    Each member it reads (:meth:`read`) gives scores per position along its dim
    (:meth:`position_scores`, from that tensor only) and :meth:`group_scores` combines them
    into the group's. A checkpoint too large for memory is scored this way shard by shard
    (:func:`graphprune.prune_checkpoint`), with the very numbers computed in memory.
    """

    def read(self, group) -> list:
        """The members whose tensors the group's scores read."""
        return scored_members(group)

    @abstractmethod
    def position_scores(self, tensor: torch.Tensor, dims: set) -> dict:
        """``{dim: scores per position along dim}`` for each of ``dims`` of ``tensor``."""

    @abstractmethod
    def group_scores(self, group, members: list, positions: list) -> np.ndarray:
        """The group's scores from ``positions[i]``, the position scores of ``members[i]``."""

    def prepare(self, model, report) -> None:
        """Read every tensor that the prunable groups' scores need once, for all its dims."""
        self._positions: dict = {}
        for tensor, dims in weight_tensors(self, report.prunable_groups).values():
            for dim, values in self.position_scores(tensor.detach(), dims).items():
                self._positions[(id(tensor), dim)] = (weakref.ref(tensor), values)

    def scores(self, group) -> np.ndarray:
        members = self.read(group)
        return self.group_scores(group, members, [self._positions_of(m) for m in members])

    def _positions_of(self, member) -> np.ndarray:
        ref, values = getattr(self, "_positions", {}).get((id(member.tensor), member.dim), (None, None))
        if ref is not None and ref() is member.tensor and len(values) == member.tensor.shape[member.dim]:
            return values
        return self.position_scores(member.tensor.detach(), {member.dim})[member.dim]


def weight_tensors(criterion: WeightCriterion, groups) -> dict:
    """``{id(tensor): (tensor, dims)}``: every tensor ``criterion`` reads to score ``groups``,
    with the dims it reads it along."""
    found: dict = {}
    for group in groups:
        for member in criterion.read(group):
            found.setdefault(id(member.tensor), (member.tensor, set()))[1].add(member.dim)
    return found


def channel_rows(member) -> torch.Tensor:
    """The member's tensor as a (positions, features) matrix along its group dim."""
    tensor = member.tensor.detach()
    return tensor.movedim(member.dim, 0).reshape(tensor.shape[member.dim], -1)


_CHUNK_ELEMENTS = 1 << 20  # bounds the temporaries of position_norms and row_and_column_norms


def _powers(chunk: torch.Tensor, p: int, buffer: torch.Tensor) -> torch.Tensor:
    """``|chunk| ** p`` in float32, written into the start of ``buffer`` (in one pass for a
    float32 ``chunk``; others are converted first, so the powers are taken in float32)."""
    powers = buffer[: chunk.numel()].view(chunk.shape)
    if chunk.dtype == powers.dtype and p in (1, 2):
        return torch.abs(chunk, out=powers) if p == 1 else torch.square(chunk, out=powers)
    powers.copy_(chunk).abs_()
    return powers.pow_(p) if p != 1 else powers


def position_norms(member, p: int) -> np.ndarray:
    """p-th power of the p-norm of each position along the member's dim (float64 numpy)."""
    return tensor_position_norms(member.tensor, member.dim, p)


def tensor_position_norms(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """p-th power of the p-norm of each position of ``tensor`` along ``dim`` (float64 numpy).

    The tensor is viewed as (before, positions, after) and reduced in bounded chunks, so that
    every reduction runs over contiguous memory: one strided reduction over the columns of a
    large matrix (a Linear's input features) is several times slower.
    """
    tensor = tensor.detach()
    if tensor.dim() == 1:  # a norm's scale or shift, a bias: one value per position
        return _powers(tensor, p, torch.empty(tensor.numel(), device=tensor.device)).double().cpu().numpy()
    size = tensor.shape[dim]
    after = math.prod(tensor.shape[dim + 1:])
    blocks = tensor.reshape(math.prod(tensor.shape[:dim]), size, after)
    step = max(1, min(size, _CHUNK_ELEMENTS // max(1, after)))
    rows = max(1, _CHUNK_ELEMENTS // (step * max(1, after)))
    total = torch.zeros(size, dtype=torch.float64, device=tensor.device)
    buffer = torch.empty(min(tensor.numel(), rows * step * after), device=tensor.device)  # reused: no page faults
    for start in range(0, size, step):
        for chunk in blocks[:, start:start + step].split(rows):
            powers = _powers(chunk, p, buffer)
            total[start:start + step] += powers.sum((0, 2))
    return total.cpu().numpy()


def chunk_buffer(device: torch.device) -> torch.Tensor:
    """Scratch space for :func:`row_and_column_norms`; reuse one for many tensors (a fresh
    buffer per tensor costs page faults on every call)."""
    return torch.empty(_CHUNK_ELEMENTS, device=device)


def row_and_column_norms(
    tensor: torch.Tensor, p: int, buffer: Optional[torch.Tensor] = None
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """:func:`position_norms` along dims 0 and 1 of ``tensor`` at once, reading it once (a
    weight is usually a member of two groups: its rows produce one, its columns consume
    another). ``buffer`` is a :func:`chunk_buffer` on the tensor's device. None when one slice
    along dim 0 would not fit a chunk."""
    tensor = tensor.detach()
    if tensor.dim() < 2 or not tensor.numel():
        return None
    per_row = tensor[0].numel()
    if per_row > _CHUNK_ELEMENTS:
        return None
    blocks = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    step = max(1, _CHUNK_ELEMENTS // per_row)
    rows = torch.zeros(tensor.shape[0], dtype=torch.float64, device=tensor.device)
    columns = torch.zeros(tensor.shape[1], dtype=torch.float64, device=tensor.device)
    if buffer is None or buffer.device != tensor.device or buffer.numel() < _CHUNK_ELEMENTS:
        buffer = chunk_buffer(tensor.device)
    for start in range(0, tensor.shape[0], step):
        chunk = blocks[start:start + step]
        powers = _powers(chunk, p, buffer)
        rows[start:start + step] = powers.sum((1, 2))
        columns += powers.sum((0, 2))
    return rows.cpu().numpy(), columns.cpu().numpy()


def per_channel(member, position_scores: np.ndarray, size: int) -> np.ndarray:
    """Sum position scores into the group's channels (a channel may own several positions)."""
    return np.bincount(member.index_map, weights=position_scores, minlength=size)


def coverage(member, size: int) -> np.ndarray:
    """Boolean mask of the group channels that ``member`` has at least one position of."""
    mask = np.zeros(size, dtype=bool)
    mask[np.asarray(member.index_map, dtype=np.int64)] = True
    return mask


def combine(per_member: list, size: int, covered: Optional[list] = None) -> np.ndarray:
    """Mean of the members' scores, each divided by its maximum.

    With ``covered`` (one boolean mask per member, see :func:`coverage`) a channel is
    averaged only over the members that cover it; without it, over all members.
    """
    if not per_member:
        return np.zeros(size)
    normalised = []
    for s in per_member:
        s = np.asarray(s, dtype=np.float64)
        top = np.max(s) if s.size else 0.0
        normalised.append(s / top if top > 0 else s)
    if covered is None:
        return np.mean(normalised, axis=0)
    stacked = np.stack(normalised)
    mask = np.stack(covered).astype(np.float64)
    counts = mask.sum(axis=0)
    total = (stacked * mask).sum(axis=0)
    return np.divide(total, counts, out=np.zeros(size), where=counts > 0)


def scored_members(group) -> list:
    return [m for m in group.members if m.role in SCORED_ROLES]


def producer_members(group) -> list:
    """The members that hold the group's *filters*: producer weights (role ``"out"``, at least
    2-D), else any producer (biases), else parameters read directly, else every scored member."""
    out = [m for m in group.members if m.role == "out"]
    filters = [m for m in out if m.tensor.dim() >= 2]
    if filters:
        return filters
    if out:
        return out
    params = [m for m in group.members if m.role == "param"]
    return params or scored_members(group)


def channel_matrix(member, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, covered)``: a ``(size, features)`` float64 matrix with one row per group
    channel holding the member's positions of that channel, and the coverage mask.

    When every covered channel owns the same number of positions (the usual case; several
    after a flatten or a grouped conv) their rows are concatenated in position order;
    otherwise they are summed. Uncovered channels get zero rows.
    """
    rows = channel_rows(member).double().cpu().numpy()
    index = np.asarray(member.index_map, dtype=np.int64)
    covered = coverage(member, size)
    counts = np.bincount(index, minlength=size)[covered]
    if counts.size and (counts == counts[0]).all():
        order = np.argsort(index, kind="stable")
        per = int(counts[0])
        block = rows[order].reshape(int(covered.sum()), per * rows.shape[1])
        matrix = np.zeros((size, block.shape[1]))
        matrix[covered] = block
    else:
        matrix = np.zeros((size, rows.shape[1]))
        np.add.at(matrix, index, rows)
    return matrix, covered
