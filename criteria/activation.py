"""Activation-aware channel criteria: Wanda and FLAP's fluctuation, per input channel.

Both weigh each input channel ``j`` of a consumer layer (a Linear, or a Conv1d/2d/3d with
``groups == 1``) by statistics of that layer's *input* on calibration data:

* :class:`Wanda` (Sun et al., "A Simple and Effective Pruning Approach for Large Language
  Models", 2023): ``||W[:, j]||_1 * ||X_j||_2``;
* :class:`Fluctuation` (An et al., "Fluctuation-based Adaptive Structured Pruning for Large
  Language Models", AAAI 2024): ``Var(X_j) * ||W[:, j]||_2^2``.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from graphprune.recovery.layers import channel_dim
from graphprune.tracer.devices import (
    calibration_batches,
    check_loader,
    check_max_batches,
    model_device,
    same_device,
)
from graphprune.tracer.state import eval_mode

from .base import Criterion, WeightCriterion, combine, coverage, per_channel
from .magnitude import LpNorm

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def reads_input_channels(module: nn.Module) -> bool:
    """Whether dim 1 of ``module.weight`` matches its input's channels one to one: a Linear,
    or a Conv1d/2d/3d with ``groups == 1``."""
    return isinstance(module, nn.Linear) or (isinstance(module, _CONVS) and module.groups == 1)


def is_consumer(model: nn.Module, member) -> bool:
    """Whether ``member`` is dim 1 of the weight of a module that :func:`reads_input_channels`."""
    if member.role != "in" or member.param != "weight" or member.dim != 1 or member.tensor.dim() < 2:
        return False
    return reads_input_channels(model.get_submodule(member.module))


class InputRecorder:
    """Forward pre-hooks that hand every floating-point input of some modules to :meth:`record`."""

    def wanted(self, module: nn.Module) -> bool:
        """Whether ``module``'s inputs are recorded at all."""
        return True

    def record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """Add one call's input ``x`` of the module ``name``."""
        raise NotImplementedError

    @contextmanager
    def recording(self, model: nn.Module, names: Iterable[str]) -> Iterator["InputRecorder"]:
        """The hooks on the modules ``names`` record their inputs while the block runs."""
        modules = [(name, model.get_submodule(name)) for name in names]
        handles = [module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                   for name, module in modules if self.wanted(module)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                self.record(name, module, x.detach())
        return hook


class InputStatistics(InputRecorder):
    """Per input channel of some modules: the float64 sums of ``x`` and ``x ** 2`` over every
    sample and position (tokens, pixels) of every call, and how many values were summed."""

    def __init__(self):
        self.sums: dict = {}
        self.squares: dict = {}
        self.counts: dict = defaultdict(int)

    def record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        dim = channel_dim(module, x.dim())
        if dim is not None and x.shape[dim] == module.weight.shape[1]:
            self.add(name, x.movedim(dim, -1).reshape(-1, x.shape[dim]))

    def add(self, name: str, rows: torch.Tensor) -> None:
        """Add the rows of a ``(values, channels)`` matrix to ``name``'s statistics."""
        rows = rows.to("cpu" if rows.device.type == "mps" else rows.device, torch.float64)  # mps has no float64
        sums, squares = rows.sum(0), rows.square().sum(0)
        if name in self.sums:
            self.sums[name] += sums
            self.squares[name] += squares
        else:
            self.sums[name], self.squares[name] = sums, squares
        self.counts[name] += rows.shape[0]

    def has(self, name: str, size: int) -> bool:
        return self.counts.get(name, 0) > 0 and self.sums[name].numel() == size

    def square_norms(self, name: str) -> np.ndarray:
        """``||X_j||_2 ** 2`` of every input channel ``j``."""
        return self.squares[name].cpu().numpy()

    def variances(self, name: str) -> np.ndarray:
        """``Var(X_j)`` (over all values, divided by their count) of every input channel ``j``."""
        count = self.counts[name]
        mean = self.sums[name].cpu().numpy() / count
        return np.maximum(self.square_norms(name) / count - mean * mean, 0.0)


class ActivationCriterion(Criterion):
    """Scores each channel by its consumers' weights and their inputs' statistics on
    ``data_loader`` (gathered in :meth:`prepare`); subclasses give the per-channel formula.

    A batch of ``data_loader`` is the model's inputs (a tensor, a dict of keyword inputs) or
    an ``(inputs, targets)`` pair whose targets are ignored; it is moved to ``device``
    (default: the model's; the model is never moved). At most ``max_batches`` batches run, in
    eval mode, without gradients; the model is left as it was. The consumers of a group are its
    members that are dim 1 of a Linear's or of a Conv's (``groups == 1``) weight; a channel's
    scores over several consumers are combined with :func:`~graphprune.criteria.base.combine`.
    A group without such a consumer (e.g. attention's query/key channels, read by a matmul)
    falls back to a weight norm and its id is listed in ``fallback_groups``.
    """

    requires_data = True
    statistics_type: type = InputStatistics  # what prepare() records

    def __init__(
        self,
        data_loader: Iterable,
        max_batches: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        *,
        progress: bool = True,
    ):
        owner = type(self).__name__
        check_loader(data_loader, f"{owner}'s data_loader")
        self.max_batches = check_max_batches(max_batches)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__}")
        self.data_loader = data_loader
        self.device = None if device is None else torch.device(device)
        self.progress = progress
        self.fallback_groups: list = []
        self.statistics: Optional[InputStatistics] = None
        self._model: Optional[nn.Module] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_batches={self.max_batches}, device={self.device})"

    def prepare(self, model, report) -> None:
        self.record(model, report)

    def record(self, model, report, device: Optional[torch.device] = None) -> None:
        """Run the calibration batches through ``model`` on ``device`` (default: the model's)
        and keep the statistics of its consumers' inputs."""
        owner = type(self).__name__
        device = device or model_device(model)
        if self.device is not None and not same_device(self.device, device):
            raise ValueError(f"{owner} was given device={self.device} but the model is on {device}; move the model first")
        names = {m.module for group in report.groups for m in group.members if is_consumer(model, m)}
        statistics = self.statistics_type()
        batches = calibration_batches(self.data_loader, f"{owner}'s data_loader", self.device or device,
                                      self.max_batches, self.progress, f"{owner} statistics")
        with statistics.recording(model, sorted(names)), eval_mode(model), torch.no_grad():
            for batch in batches:
                batch.forward(model)
        self.statistics, self._model, self.fallback_groups = statistics, model, []

    def _check_recorded(self) -> None:
        if self.statistics is None:
            raise RuntimeError(
                f"{type(self).__name__} needs prepare(model, report) before scores(); graphprune.prune calls it for you"
            )


class InputWeighted(ActivationCriterion, WeightCriterion):
    """A consumer's weight norm per input channel (the ``p``-th power of its p-norm) times a
    statistic of that input (:meth:`input_weights`). It reads one weight at a time, so it
    scores a checkpoint shard by shard once :meth:`record` ran the data through the model. A
    group without a consumer falls back to the plain p-norm (:class:`~graphprune.criteria.LpNorm`)."""

    p = 1

    def __init__(self, data_loader: Iterable, max_batches: Optional[int] = None,
                 device: Union[str, torch.device, None] = None, *, progress: bool = True):
        super().__init__(data_loader, max_batches, device, progress=progress)
        self._norms = LpNorm(self.p)

    def input_weights(self, name: str) -> np.ndarray:
        """The statistic of each input channel of the consumer ``name`` that its weight norms are multiplied by."""
        raise NotImplementedError

    def prepare(self, model, report) -> None:
        self.record(model, report)
        WeightCriterion.prepare(self, model, report)

    def read(self, group) -> list:
        self._check_recorded()
        consumers = [m for m in group.members
                     if is_consumer(self._model, m) and self.statistics.has(m.module, m.tensor.shape[1])]
        if consumers:
            return consumers
        if group.id not in self.fallback_groups:
            self.fallback_groups.append(group.id)
        return self._norms.read(group)

    def position_scores(self, tensor: torch.Tensor, dims: set) -> dict:
        return self._norms.position_scores(tensor, dims)

    def group_scores(self, group, members: list, positions: list) -> np.ndarray:
        if group.id in self.fallback_groups:
            return self._norms.group_scores(group, members, positions)
        per_member = [per_channel(m, values * self.input_weights(m.module), group.size) for m, values in zip(members, positions)]
        return combine(per_member, group.size, [coverage(m, group.size) for m in members])

    def scores(self, group) -> np.ndarray:
        self._check_recorded()
        return WeightCriterion.scores(self, group)


class Wanda(InputWeighted):
    """Wanda per input channel (Sun et al., 2023): ``||W[:, j]||_1 * ||X_j||_2``.

    ``X_j`` is the consumer's input channel ``j`` over all calibration samples and
    positions; L1 where a group has no consumer. The data pass is described in
    :class:`ActivationCriterion`.

    Parameters
    ----------
    data_loader : iterable
        Calibration batches: the model's inputs, or ``(inputs, targets)`` pairs.
    max_batches : int, optional
        The most batches to run (at least 1); default all.
    device : str or torch.device, optional
        Where batches go; it must be the model's device (default: the model's).
    progress : bool, default True
        Show a progress bar over the batches.

    Raises
    ------
    TypeError
        ``data_loader`` is not an iterable of batches, or ``max_batches`` / ``device`` has
        the wrong type.
    ValueError
        ``max_batches`` is below 1.
    """

    name = "wanda"
    p = 1

    def input_weights(self, name: str) -> np.ndarray:
        return np.sqrt(self.statistics.square_norms(name))


class Fluctuation(InputWeighted):
    """FLAP's weighted input feature variance (An et al., AAAI 2024): ``Var(X_j) * ||W[:, j]||_2^2``.

    A channel whose input hardly varies can be replaced by a bias. L2 where a group has no
    consumer.

    Parameters
    ----------
    data_loader, max_batches, device, progress
        As in :class:`Wanda`.
    """

    name = "flap"
    p = 2

    def input_weights(self, name: str) -> np.ndarray:
        return self.statistics.variances(name)
