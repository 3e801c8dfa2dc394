"""The error a least-squares refit cannot recover: a structured Optimal Brain Surgeon.

For a consumer layer with weight ``W`` (outputs x inputs, a bias column appended) and the
Gram matrix ``H = Σ [x 1]ᵀ [x 1]`` of its inputs on calibration data, removing the inputs
``B`` and refitting the others optimally costs ``tr(W_B (H⁻¹)_BB⁻¹ W_Bᵀ)`` of output error
(Hassibi & Stork's OBS, applied to whole channels as in ZipLM and SlimGPT). :class:`OBS`
removes a group's channels greedily, cheapest first, updating ``H⁻¹`` and ``W`` after each
removal as the refit would (in at most 128 steps: a wider group loses several channels per
step); the order is the score. It pairs with ``recover="lstsq"``, which
performs that refit.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from graphprune.recovery.layers import input_rows, least_squares_fits

from .activation import ActivationCriterion, InputRecorder, is_consumer
from .magnitude import L1

_STEPS = 128  # greedy steps per group at most: larger groups lose several channels per step
_MAX_INPUTS = 4096  # a consumer with more inputs (channels times kernel) is not read: H would be too large


class GramStatistics(InputRecorder):
    """Per consumer module: ``Σ [x 1]ᵀ [x 1]`` over the rows its kernel reads (float64)."""

    def __init__(self):
        self.grams: dict = {}

    def wanted(self, module: nn.Module) -> bool:  # what a refit can fit: its inputs are rows of a matrix
        return least_squares_fits(module) and module.weight[0].numel() < _MAX_INPUTS

    def record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        rows = input_rows(module, x)
        rows = torch.cat([rows.float(), torch.ones(rows.shape[0], 1, device=rows.device)], 1)
        gram = (rows.T @ rows).double().cpu()
        self.grams[name] = self.grams[name] + gram if name in self.grams else gram

    def has(self, name: str, size: int) -> bool:
        return name in self.grams


class OBS(ActivationCriterion):
    """Structured OBS: the error a least-squares refit cannot recover, per channel.

    Channels are ranked by the order in which removing them one at a time, each refit
    optimally, adds the least relative output error to the group's consumers (Linear, or
    Conv1d/2d with one group and fewer than 4096 inputs; others are not read). ``ridge``
    damps ``H`` by that fraction of its mean diagonal. Scores are ranks (removed first = lowest).
    A group without such a consumer falls back to L1 (listed in ``fallback_groups``).

    Parameters
    ----------
    data_loader, max_batches, device, progress
        As in :class:`~graphprune.criteria.Wanda`.
    ridge : float, default 1e-3
        The damping of ``H``, as a fraction of its mean diagonal.
    """

    name = "obs"
    statistics_type = GramStatistics

    def __init__(self, data_loader, max_batches=None, device=None, *, progress: bool = True, ridge: float = 1e-3):
        super().__init__(data_loader, max_batches, device, progress=progress)
        self.ridge = float(ridge)
        self._l1 = L1()

    def scores(self, group) -> np.ndarray:
        self._check_recorded()
        consumers = [_Consumer(self._model, m, self.statistics.grams[m.module], self.ridge, group.size)
                     for m in group.members if is_consumer(self._model, m) and self.statistics.has(m.module, 0)]
        if not consumers:
            if group.id not in self.fallback_groups:
                self.fallback_groups.append(group.id)
            return self._l1.scores(group)
        scores = np.full(group.size, float(group.size + 1))  # a channel no consumer reads goes last
        alive = np.unique(np.concatenate([c.channels for c in consumers]))
        step, rank = max(1, math.ceil(alive.size / _STEPS)), 0
        while alive.size:
            order = np.argsort(sum(c.costs(alive) for c in consumers), kind="stable")[:step]
            cheapest = alive[order]
            scores[cheapest] = rank + np.arange(cheapest.size)
            rank += cheapest.size
            alive = np.delete(alive, order)
            for consumer in consumers:
                consumer.remove(cheapest)
        return scores


class _Consumer:
    """One consumer's weight and inverse Gram matrix, as the greedy removal changes them."""

    def __init__(self, model: nn.Module, member, gram: torch.Tensor, ridge: float, size: int):
        module = model.get_submodule(member.module)
        weight = module.weight.detach().double().cpu().reshape(module.weight.shape[0], -1)
        bias = torch.zeros(weight.shape[0], 1, dtype=torch.float64) if module.bias is None else \
            module.bias.detach().double().cpu().reshape(-1, 1)
        self.weight = torch.cat([weight, bias], 1)
        per = weight.shape[1] // member.tensor.shape[1]  # inputs of one channel: the kernel's positions
        positions = np.repeat(np.asarray(member.index_map, dtype=np.int64), per)
        self.channels = np.unique(positions)
        self.blocks = [torch.as_tensor(np.flatnonzero(positions == c)) for c in self.channels]
        self.row = np.full(size, -1)  # group channel -> its block
        self.row[self.channels] = np.arange(self.channels.size)
        sizes = {block.numel() for block in self.blocks}
        self.index = torch.stack(self.blocks) if len(sizes) == 1 else None  # (channels, b) when alike
        damping = ridge * float(torch.diagonal(gram)[:-1].mean().clamp_min(1e-12))
        gram = gram + torch.diag(torch.cat([torch.full((gram.shape[0] - 1,), damping), torch.zeros(1)]).double())
        self.energy = float((self.weight @ gram * self.weight).sum().clamp_min(1e-30))
        factor, info = torch.linalg.cholesky_ex(gram)
        self.inverse = torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(gram, hermitian=True)

    def costs(self, channels: np.ndarray) -> np.ndarray:
        """The relative error that removing each of ``channels`` alone (then refitting) adds
        (0 for a channel this consumer does not read)."""
        rows = self.row[channels]
        mine = np.flatnonzero(rows >= 0)
        costs = np.zeros(len(channels))
        if self.index is None:
            for i in mine:
                block = self.blocks[rows[i]]
                w = self.weight[:, block].T
                costs[i] = float((w * torch.linalg.solve(self.inverse[block][:, block], w)).sum())
        elif self.index.shape[1] == 1:  # one input per channel: ‖w_j‖² / (H⁻¹)_jj
            index = self.index[rows[mine], 0]
            costs[mine] = (self.weight[:, index].square().sum(0) / torch.diagonal(self.inverse)[index]).numpy()
        else:  # blocks alike (heads, conv kernels): one batched solve
            index = self.index[rows[mine]]  # (n, b)
            pivots = self.inverse[index[:, :, None], index[:, None, :]]  # (n, b, b)
            w = self.weight[:, index].permute(1, 2, 0)  # (n, b, outputs)
            costs[mine] = (w * torch.linalg.solve(pivots, w)).sum((1, 2)).numpy()
        return costs / self.energy

    def remove(self, channels: np.ndarray) -> None:
        """Remove the inputs of ``channels`` and move the others' weights as the refit would."""
        rows = self.row[channels]
        rows = rows[rows >= 0]
        if not rows.size:
            return
        self.row[channels] = -1
        block = torch.cat([self.blocks[r] for r in rows])
        pivot = torch.linalg.solve(self.inverse[block][:, block], self.inverse[block])  # (b, k)
        self.weight.addmm_(self.weight[:, block], pivot, alpha=-1)  # in place: no new k x k matrix per step
        self.inverse.addmm_(self.inverse[:, block], pivot, alpha=-1)
