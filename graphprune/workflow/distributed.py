"""Helpers for pruning and fine-tuning under ``torch.distributed`` (e.g. ``torchrun``).

Every rank prunes its own copy of the model, so every rank must remove the *same*
channels. Weight-based criteria (``"l1"``, ``"fpgm"``...) agree by themselves when the
ranks start from the same weights; data-driven ones (``Taylor``) see a different shard of
data on each rank and do not. :func:`sync_criterion` wraps a criterion so that its scores
are averaged over all ranks before the planner uses them::

    torch.distributed.init_process_group("gloo")           # or "nccl" on GPUs
    train_loader, _ = graphprune.data.digits_loaders()     # sharded with DistributedSampler
    criterion = graphprune.sync_criterion(criteria.Taylor(train_loader, max_batches=10))
    graphprune.prune(model, 0.3, example_inputs, criterion=criterion)
    graphprune.finetune(model, train_loader, epochs=5)     # wrapped in DistributedDataParallel

The average is taken over the wrapped criterion's final per-channel scores (for ``Taylor``,
each rank's per-group scores after combining its activation sites), which is what makes the
ranks agree; it is close to, but not bit-identical with, the scores one process would get
from all shards together. Every helper here is a no-op when ``torch.distributed`` is not
initialised or has a single rank.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from graphprune.criteria import Criterion, get_criterion

__all__ = [
    "is_distributed", "world_size", "rank", "collective_device", "all_reduce_scores", "all_reduce_sum",
    "SyncedCriterion", "sync_criterion", "average_buffers",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values) -> list:
    """Element-wise sum over ranks of a list of numbers (float64); unchanged without distribution."""
    values = [float(v) for v in values]
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def all_reduce_scores(scores: Any) -> np.ndarray:
    """The element-wise mean over ranks of a 1-D score array (float64).

    Every rank must call it, in the same order, with arrays of the same length; a length
    mismatch raises ``RuntimeError`` on every rank instead of hanging. Without distribution
    it returns the scores as a float64 array.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, got shape {scores.shape}")
    if not is_distributed():
        return scores
    device = collective_device()
    size = torch.tensor([scores.size, -scores.size], dtype=torch.float64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    largest, smallest = int(size[0]), -int(size[1])
    if largest != smallest:
        raise RuntimeError(
            f"ranks scored groups of different sizes ({smallest} to {largest} channels) on rank {rank()}: "
            "every rank must prune the same model (same weights, same analysis)"
        )
    tensor = torch.from_numpy(scores.copy()).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).cpu().numpy()


class SyncedCriterion(Criterion):
    """A criterion whose scores are the mean of ``criterion``'s scores over all ranks.

    ``prepare`` runs the wrapped criterion's ``prepare`` on each rank (each on its own data),
    ``scores(group)`` all-reduces. Without distribution it behaves exactly like ``criterion``.
    """

    def __init__(self, criterion: Criterion):
        if not isinstance(criterion, Criterion):
            raise TypeError(f"criterion must be a Criterion instance, got {type(criterion).__name__}")
        self.criterion = criterion
        self.name = f"synced_{criterion.name}"
        self.requires_data = criterion.requires_data

    def prepare(self, model, report) -> None:
        self.criterion.prepare(model, report)

    def scores(self, group) -> np.ndarray:
        return all_reduce_scores(self.criterion.scores(group))

    def __repr__(self) -> str:
        return f"SyncedCriterion({self.criterion!r})"


def sync_criterion(criterion: Union[str, Criterion]) -> SyncedCriterion:
    """Wrap ``criterion`` (a name or an instance) in :class:`SyncedCriterion`; an already
    synced criterion is returned as is."""
    criterion = get_criterion(criterion)
    return criterion if isinstance(criterion, SyncedCriterion) else SyncedCriterion(criterion)


def average_buffers(model: nn.Module) -> None:
    """Make the buffers agree across ranks: floating-point ones (BatchNorm running statistics)
    are averaged, the others (``num_batches_tracked``) copied from rank 0."""
    if not is_distributed():
        return
    device = collective_device()
    size = dist.get_world_size()
    with torch.no_grad():
        for buffer in model.buffers():
            staged = buffer.detach().to(device)
            if staged.is_floating_point():
                dist.all_reduce(staged, op=dist.ReduceOp.SUM)
                staged /= size
            else:
                dist.broadcast(staged, 0)
            if staged is not buffer:
                buffer.copy_(staged)
