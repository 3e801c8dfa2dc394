"""Group-level sparse training: :class:`GroupRegularizer`.

Before pruning, train with a penalty that pushes whole coupled channels toward zero, so that
removing them afterwards costs little (DepGraph, Fang et al., CVPR 2023). The regulariser is
built from an analysis of the model and penalises only its *prunable* groups: for every
channel ``c`` of a group, the L2 norm over every parameter entry of the group whose position
maps to ``c`` (producer rows and biases, norm scales and shifts, consumer columns, residual
partners, whole attention heads with ``prune_heads=True``). One line in any training loop::

    regularizer = graphprune.GroupRegularizer(model, x, coefficient=1e-3)
    loss.backward()
    regularizer.step()          # adds the penalty's gradient to .grad (or: loss + regularizer.penalty())
    optimizer.step()

Then ``graphprune.prune(model, 0.5, x, criterion="group_norm")`` removes the channels with the
smallest group norm, the ones the training emptied. Options: growing regularisation (Wang et
al., "Neural Pruning via Growing Regularization", ICLR 2021: :meth:`GroupRegularizer.update`
raises the coefficient of the channels scheduled for removal) and network slimming
(``mode="bn_scale"``: an L1 penalty on the scales of the groups' norm layers, Liu et al.,
ICCV 2017; prune with ``criterion="bn_scale"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from graphprune.analysis.analyzer import LayerRef
from graphprune.analysis.groups import Group
from graphprune.api import analyze
from graphprune.criteria.group_norm import channel_sums, group_norms, norm_members
from graphprune.pruning.options import check_ratio
from graphprune.pruning.planner import RatioSpec, lowest_channels, removal_counts
from graphprune.analysis.report import Report
from graphprune.session import session_of
from graphprune.validation import check_model, check_real

__all__ = ["GroupRegularizer", "RegularizerSettings", "check_settings", "MODES"]

#: ``"group_norm"``: group lasso over every parameter member; ``"bn_scale"``: L1 of the norm scales.
MODES = ("group_norm", "bn_scale")


@dataclass(frozen=True)
class RegularizerSettings:
    """The penalty's settings, checked by :func:`check_settings`."""

    mode: str
    coefficient: float
    delta: Optional[float]  # None: no growing regularisation
    max_coefficient: float


def check_settings(mode: str = "group_norm", coefficient: float = 1e-4, delta: Optional[float] = None,
                   max_coefficient: Optional[float] = None, *, growing: bool = False) -> RegularizerSettings:
    """Check a regulariser's settings (see :class:`GroupRegularizer`); precise errors otherwise.
    ``growing`` says whether a target ratio was given, which ``delta`` and ``max_coefficient``
    need; ``delta`` defaults to ``coefficient`` and ``max_coefficient`` to
    ``coefficient + 100 * delta``."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    coefficient = check_real(coefficient, "coefficient", low=0.0)
    if not growing:
        for name, value in (("delta", delta), ("max_coefficient", max_coefficient)):
            if value is not None:
                raise ValueError(f"{name} sets growing regularisation, which needs target_ratio (the share of "
                                 "channels whose coefficient grows); pass target_ratio or leave it out")
        return RegularizerSettings(mode, coefficient, None, coefficient)
    delta = coefficient if delta is None else check_real(delta, "delta", low=0.0)
    if delta <= 0:
        raise ValueError("delta must be > 0 for growing regularisation (with coefficient=0, pass delta explicitly)")
    cap = coefficient + 100 * delta if max_coefficient is None else check_real(max_coefficient, "max_coefficient", low=0.0)
    if cap < coefficient:
        raise ValueError(f"max_coefficient ({cap:g}) must be at least coefficient ({coefficient:g})")
    return RegularizerSettings(mode, coefficient, delta, cap)


class _Entry(NamedTuple):
    """One penalised parameter dim: positions along ``dim`` map to group channels by ``index``."""

    parameter: nn.Parameter
    dim: int
    index: torch.Tensor
    name: str


@dataclass(eq=False)
class _Term:
    """One penalised group: its parameter dims and a coefficient per channel (float64)."""

    group: Group
    entries: list
    coefficients: torch.Tensor

    def checked(self) -> list:
        """``(parameter, dim, index)`` of every entry, the index and coefficients on the
        parameters' device (moved once after the model moved); the shapes checked."""
        device = self.entries[0].parameter.device
        if self.coefficients.device != device:
            self.coefficients = self.coefficients.to(device)
        for i, entry in enumerate(self.entries):
            if entry.parameter.dim() <= entry.dim or entry.parameter.shape[entry.dim] != entry.index.numel():
                raise ValueError(
                    f"{entry.name} has shape {tuple(entry.parameter.shape)}, but the analysis saw {entry.index.numel()} "
                    f"positions along dim {entry.dim}: the model changed since the GroupRegularizer was built "
                    "(pruned?); build a new one on the model as it is now")
            if entry.index.device != entry.parameter.device:
                self.entries[i] = entry = entry._replace(index=entry.index.to(entry.parameter.device))
        return [(e.parameter, e.dim, e.index) for e in self.entries]


class GroupRegularizer:
    """A sparsity penalty on the prunable channel groups of ``model``.

    The groups come from ``graphprune.analyze(model, example_inputs, prune_heads=...,
    ignored_layers=..., leaf_modules=..., capture=...)``, or from ``report`` (that analysis of
    this very model, unchanged since; the analysis options then come from it). Only
    ``report.prunable_groups`` are penalised: a blocked group (an ignored layer, an op without a
    rule, the model's output) never is. A model wrapped in ``DistributedDataParallel`` or
    ``DataParallel`` is regularised through its ``.module``.

    **The penalty** is ``sum over groups and channels of coefficient[c] * norm[c]``. With
    ``mode="group_norm"`` (default) ``norm[c]`` is the channel's L2 norm over every parameter
    of its group (the ``"group_norm"`` criterion; each ``(tensor, dim)`` once, buffers left
    out). With ``mode="bn_scale"`` (network slimming) it is the L1 norm of the channel's
    norm-layer scales (BatchNorm, LayerNorm, GroupNorm weights); groups without one are not
    penalised. :meth:`penalty` is differentiable (add it to the loss); :meth:`step`, called
    after ``loss.backward()``, adds the same gradient to ``.grad`` in place (cheaper, no graph;
    a channel whose norm is 0 gets none; frozen parameters are never written).

    **Growing regularisation**: with ``target_ratio`` (a float in [0, 1) or
    ``{module name or glob: ratio}``, as for :func:`graphprune.prune`), each :meth:`update`
    ranks every group's channels by ``norm`` with the pruning planner and raises the
    coefficient of those that ``prune`` would remove at that ratio by ``delta`` (default
    ``coefficient``), up to ``max_coefficient`` (default ``coefficient + 100 * delta``); call
    it, e.g., once per epoch. Every coefficient starts at ``coefficient`` (which may be 0).

    The regulariser holds the model's parameters (it never copies them): moving the model to
    another device is fine, but after pruning build a new one (its groups are gone).

    Parameters
    ----------
    model : nn.Module
        The model, or a ``DistributedDataParallel`` / ``DataParallel`` wrapping it.
    example_inputs, prune_heads, ignored_layers, leaf_modules, capture
        As in :func:`graphprune.analyze`; with ``report``, leave the options out.
    coefficient : float, default 1e-4
        Every channel's starting coefficient (>= 0).
    mode : {"group_norm", "bn_scale"}, default "group_norm"
        The norm penalised (see above).
    target_ratio : float or {module name or glob: float}, optional
        Makes it a growing regulariser: the ratio :meth:`update` ranks channels for.
    delta, max_coefficient : float, optional
        Growing only: the raise per :meth:`update` (default ``coefficient``, > 0) and the
        cap (default ``coefficient + 100 * delta``, at least ``coefficient``).
    report : Report, optional
        :func:`graphprune.analyze`'s report on this very model, unchanged since.

    Raises
    ------
    TypeError, ValueError
        An invalid setting (``delta`` or ``max_coefficient`` without ``target_ratio``
        included), a report of another or a changed model, or as :func:`graphprune.analyze`.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any = None, *, coefficient: float = 1e-4, mode: str = "group_norm",
        target_ratio: Optional[RatioSpec] = None, delta: Optional[float] = None,
        max_coefficient: Optional[float] = None, report: Optional[Report] = None, prune_heads: bool = False,
        ignored_layers: Iterable[LayerRef] = (), leaf_modules: Iterable[Any] = (), capture: str = "auto",
    ):
        model = _unwrapped(model)
        self.settings = check_settings(mode, coefficient, delta, max_coefficient, growing=target_ratio is not None)
        self.target_ratio = None if target_ratio is None else check_ratio(model, target_ratio)
        if report is None:
            report = analyze(model, example_inputs, prune_heads=prune_heads, ignored_layers=ignored_layers,
                             leaf_modules=leaf_modules, capture=capture)
        else:
            session_of(report, model, example_inputs, True, leaf_modules, ignored_layers, prune_heads, capture=capture)
        self._model = model
        self.report = report
        self._terms = [term for term in (self._term(g) for g in report.prunable_groups) if term.entries]

    def _term(self, group: Group) -> _Term:
        members = norm_members(group)
        if self.settings.mode == "bn_scale":
            members = [m for m in members if m.role == "scale"]
        entries = []
        for member in members:
            parameter = self._model.get_parameter(member.name)  # the model's own, by name
            index = torch.as_tensor(np.asarray(member.index_map, dtype=np.int64), device=parameter.device)
            entries.append(_Entry(parameter, member.dim, index, member.name))
        term = _Term(group, entries, torch.full((group.size,), self.settings.coefficient, dtype=torch.float64))
        if entries:
            term.checked()
        return term

    # ----- what is penalised
    @property
    def model(self) -> nn.Module:
        """The regularised model (a wrapper's ``.module``)."""
        return self._model

    @property
    def mode(self) -> str:
        """The norm penalised: ``"group_norm"`` or ``"bn_scale"``."""
        return self.settings.mode

    @property
    def growing(self) -> bool:
        """Whether :meth:`update` raises coefficients (a ``target_ratio`` was given)."""
        return self.target_ratio is not None

    @property
    def groups(self) -> list:
        """The penalised groups (prunable ones; with ``"bn_scale"``, those with a norm layer)."""
        return [term.group for term in self._terms]

    def parameters(self) -> list:
        """List every parameter the penalty reads.

        Returns
        -------
        list of nn.Parameter
            Each once, in group order.
        """
        return list({id(e.parameter): e.parameter for term in self._terms for e in term.entries}.values())

    def check(self) -> None:
        """Check that every penalised parameter still has the shape the analysis saw.

        Raises
        ------
        ValueError
            The model was pruned since: build a new regulariser.
        """
        for term in self._terms:
            term.checked()

    def coefficients(self) -> dict:
        """Copy the current coefficients.

        Returns
        -------
        dict
            ``{group id: coefficient per channel}``, float64 numpy copies.
        """
        return {term.group.id: term.coefficients.cpu().numpy().copy() for term in self._terms}

    def channel_norms(self) -> dict:
        """Compute the per-channel norms as penalised now.

        Returns
        -------
        dict
            ``{group id: norm per channel}`` (float64 numpy): the group L2 norm, or with
            ``"bn_scale"`` the L1 norm of the scales.
        """
        with torch.no_grad():
            return {term.group.id: self._norms(term).double().cpu().numpy() for term in self._terms}

    # ----- the penalty
    def penalty(self) -> torch.Tensor:
        """Compute the penalty, to add to the loss.

        Returns
        -------
        torch.Tensor
            A 0-d tensor, differentiable with respect to the model's parameters; zero when
            no group is penalised.
        """
        total = None
        for term in self._terms:
            norms = self._norms(term)
            value = (term.coefficients.to(norms.dtype) * norms).sum()
            total = value if total is None else total + value.to(total.device, total.dtype)
        return torch.zeros((), device=_device(self._model)) if total is None else total

    @torch.no_grad()
    def step(self) -> None:
        """Add the gradient of :meth:`penalty` to every penalised parameter's ``.grad``.

        Call it after ``loss.backward()`` and before ``optimizer.step()``. A parameter without
        a gradient gets the penalty's alone; frozen ones (``requires_grad=False``) are skipped.
        """
        updates = []
        for term in self._terms:
            norms = self._norms(term)
            coefficients = term.coefficients.to(norms.dtype)
            if self.settings.mode == "bn_scale":  # d|x|/dx = sign(x), 0 at 0
                scale = coefficients
            else:  # d||g||/dx = x / ||g||, none where the norm is 0
                positive = norms > 0
                scale = torch.where(positive, coefficients / torch.where(positive, norms, torch.ones_like(norms)), 0.0)
            updates.extend((e.parameter, e.dim, scale[e.index]) for e in term.entries if e.parameter.requires_grad)
        for parameter, dim, factor in updates:  # every norm was read before any gradient changed
            shape = [1] * parameter.dim()
            shape[dim] = -1
            values = parameter.sign() if self.settings.mode == "bn_scale" else parameter
            gradient = (factor.view(shape) * values).to(parameter.dtype)
            if parameter.grad is None:
                parameter.grad = gradient
            else:
                parameter.grad.add_(gradient)

    # ----- growing regularisation
    @torch.no_grad()
    def update(self) -> dict:
        """Raise the coefficients of the channels that pruning at ``target_ratio`` would remove now.

        Channels are ranked by :meth:`channel_norms` with the planner
        (:func:`~graphprune.pruning.planner.removal_counts` and
        :func:`~graphprune.pruning.planner.lowest_channels`, so every member keeps its best
        channel); each chosen coefficient grows by ``delta``, up to ``max_coefficient``.

        Returns
        -------
        dict
            ``{group id: the channels raised}``.

        Raises
        ------
        RuntimeError
            The regulariser is not a growing one (no ``target_ratio``).
        """
        if not self.growing:
            raise RuntimeError("update() is growing regularisation, which needs target_ratio; build the "
                               "GroupRegularizer with target_ratio=... (and delta=...)")
        norms = self.channel_norms()
        scores = {term.group: norms[term.group.id] for term in self._terms}
        counts = removal_counts(scores, self.target_ratio)
        raised = {}
        for term in self._terms:
            chosen = lowest_channels(term.group, scores[term.group], counts.get(term.group, 0))
            index = torch.as_tensor(chosen, dtype=torch.int64, device=term.coefficients.device)
            term.coefficients[index] = (term.coefficients[index] + self.settings.delta).clamp_max(self.settings.max_coefficient)
            raised[term.group.id] = chosen
        return raised

    def _norms(self, term: _Term) -> torch.Tensor:
        """The per-channel norms of one group, differentiable."""
        entries = term.checked()
        if self.settings.mode == "group_norm":
            return group_norms(entries, term.group.size)
        total = None
        for parameter, dim, index in entries:
            sums = channel_sums(parameter, dim, index, term.group.size, 1)
            total = sums if total is None else total + sums.to(total.dtype)
        return total

    def __repr__(self) -> str:
        growing = f", growing to {self.target_ratio} by {self.settings.delta:g}" if self.growing else ""
        return (f"GroupRegularizer({self.settings.mode}, coefficient={self.settings.coefficient:g}{growing}: "
                f"{len(self._terms)} groups of {self.report.model_name})")


def _unwrapped(model: Any) -> nn.Module:
    """``model``, or the module a ``DistributedDataParallel`` / ``DataParallel`` wraps."""
    check_model(model)
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")

