"""Iterative pruning: :func:`prune_schedule` alternates :func:`graphprune.prune` and
:func:`graphprune.finetune` over a list of cumulative ratios, e.g. ``ratios=[0.2, 0.35, 0.5]``,
optionally with group-level sparse training (:mod:`.sparse`) between the pruning steps.

``ratios`` are *cumulative* fractions of each group's original channels, strictly
increasing in (0, 1): ``[0.2, 0.35, 0.5]`` removes 20% of every group, fine-tunes, goes
on to 35% of the original width, fine-tunes, and ends at 50%. Step ``i`` calls
``graphprune.prune(model, 1 - (1 - r_i) / (1 - r_{i-1}), example_inputs, criterion=...,
**prune_kwargs)`` on the current model (re-analysed and re-scored each step), then
``finetune(model, train_loader, epochs=epochs_per_step, **finetune_kwargs)``. Each step
floors its channel counts, so a group may end a channel or so wider than
``floor(r * n)`` would give. ``criterion`` is a name or a Criterion (data-driven ones are
prepared again every step); under ``torch.distributed`` it is wrapped in
:func:`graphprune.workflow.distributed.sync_criterion` so that every rank removes the same channels.
``prune_kwargs`` may not set ``ratio``, ``example_inputs``, ``criterion``, ``inplace``,
budgets or ``return_result``.

``regularizer`` adds group-level sparse training: the settings (``coefficient``, ``mode``,
``delta``, ``max_coefficient``) of a :class:`~graphprune.workflow.sparse.GroupRegularizer`,
not an instance, because every pruning step changes the groups. After each step but the
last, a fresh regulariser is built on the pruned model (with ``example_inputs`` and
``prune_kwargs``' analysis options) and passed to that step's fine-tune, so that it
prepares the next step; the last fine-tune, after which nothing is pruned, runs without.
With ``delta`` (or ``max_coefficient``) it is a growing regulariser whose ``target_ratio``
is the next step's ratio. Pair it with ``criterion="group_norm"`` (or ``"bn_scale"`` for
``mode="bn_scale"``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from torch import nn

from graphprune.analysis.analyzer import AnalysisOptions
from graphprune.api import prune
from graphprune.criteria import get_criterion
from graphprune.reporting.measure import count_parameters
from graphprune.validation import check_int, check_model, check_real, warn_caller

from . import distributed as gdist
from .finetune import finetune
from .sparse import GroupRegularizer, check_settings

__all__ = ["prune_schedule"]

_RESERVED = ("ratio", "example_inputs", "criterion", "inplace", "return_result", "target_flops", "target_params",
             "target_latency")
_SETTINGS = ("coefficient", "mode", "delta", "max_coefficient")  # GroupRegularizer's, the schedule sets the rest


def prune_schedule(
    model: nn.Module,
    example_inputs: Any,
    train_loader: Iterable,
    *,
    ratios: Sequence[float],
    epochs_per_step: int,
    criterion: Any = "l1",
    prune_kwargs: Optional[Mapping[str, Any]] = None,
    regularizer: Optional[Mapping[str, Any]] = None,
    **finetune_kwargs: Any,
) -> list:
    """Prune then fine-tune ``model`` in place, once per entry of ``ratios``.

    Step ``i`` prunes the model (analysed and scored again) from ``r_{i-1}`` to ``r_i`` of each
    group's original channels, then fine-tunes it; the module docstring details both.

    Parameters
    ----------
    model : nn.Module
    example_inputs, criterion
        As in :func:`graphprune.prune`; under ``torch.distributed`` the criterion is synced.
    train_loader : iterable with a len()
        Fine-tuning batches, as in :func:`graphprune.finetune`.
    ratios : sequence of float
        Cumulative fractions of each group's original channels, strictly increasing in (0, 1).
    epochs_per_step : int
        Fine-tuning epochs after each pruning (at least 1).
    prune_kwargs : mapping, optional
        More :func:`graphprune.prune` options; not ``ratio``, ``example_inputs``,
        ``criterion``, ``inplace``, budgets or ``return_result``.
    regularizer : mapping, optional
        Settings of a :class:`GroupRegularizer` for the fine-tunes between pruning steps.
    **finetune_kwargs
        More :func:`graphprune.finetune` options (not ``epochs``).

    Returns
    -------
    list of dict
        Per step: ``step`` (from 1), ``ratio`` (cumulative), ``step_ratio`` (passed to
        prune), ``parameters`` (after pruning) and ``finetune`` (its history).

    Raises
    ------
    TypeError, ValueError
        An invalid argument, checked before anything is pruned; or as prune and finetune.
    """
    check_model(model)
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise TypeError(f"ratios must be a non-empty sequence of cumulative ratios, got {ratios!r}")
    checked = [check_real(r, f"ratios[{i}]", low=0.0, high=1.0, low_open=True, high_open=True) for i, r in enumerate(ratios)]
    for i in range(1, len(checked)):
        if checked[i] <= checked[i - 1]:
            raise ValueError(f"ratios must increase strictly (they are cumulative), got {list(ratios)}")
    epochs_per_step = check_int(epochs_per_step, "epochs_per_step", 1)
    prune_kwargs = dict(prune_kwargs or {})
    clash = sorted(set(prune_kwargs) & set(_RESERVED))
    if clash:
        raise ValueError(f"prune_kwargs may not set {', '.join(clash)}: prune_schedule sets them")
    if "epochs" in finetune_kwargs:
        raise ValueError("pass epochs_per_step, not epochs: prune_schedule fine-tunes that many epochs per step")
    settings = _checked_settings(regularizer, len(checked))
    criterion = get_criterion(criterion)
    if gdist.is_distributed():
        criterion = gdist.sync_criterion(criterion)
    history, previous = [], 0.0
    for step, target in enumerate(checked, start=1):
        step_ratio = ratio_between(target, previous)
        prune(model, step_ratio, example_inputs, criterion=criterion, inplace=True, **prune_kwargs)
        record = {"step": step, "ratio": target, "step_ratio": step_ratio, "parameters": count_parameters(model)}
        options = dict(finetune_kwargs)
        if settings is not None and step < len(checked):
            next_ratio = ratio_between(checked[step], target) if "delta" in settings else None
            analysis = {key: prune_kwargs[key] for key in AnalysisOptions.NAMES if key in prune_kwargs}
            options["regularizer"] = GroupRegularizer(model, example_inputs, target_ratio=next_ratio, **settings,
                                                      **analysis)
        record["finetune"] = finetune(model, train_loader, epochs=epochs_per_step, **options)
        history.append(record)
        previous = target
    return history


def ratio_between(target: float, previous: float) -> float:
    """The ratio that takes a model pruned to ``previous`` to ``target`` (both cumulative)."""
    # +1e-9: 1 - 0.5 / 0.75 must floor like 1/3 does
    return min(1.0 - (1.0 - target) / (1.0 - previous) + 1e-9, 1.0 - 1e-9)


def _checked_settings(regularizer: Any, steps: int) -> Optional[dict]:
    """The regulariser's settings, checked before anything is pruned (growing ones with
    ``delta`` set, so that each step's regulariser grows)."""
    if regularizer is None:
        return None
    if isinstance(regularizer, GroupRegularizer) or not isinstance(regularizer, Mapping):
        raise TypeError(
            f"regularizer must be a mapping of GroupRegularizer settings such as {{'coefficient': 1e-3}}, got "
            f"{type(regularizer).__name__}: every pruning step changes the groups, so prune_schedule builds a fresh "
            "regulariser on each pruned model")
    unknown = [key for key in regularizer if key not in _SETTINGS]
    if unknown:
        raise ValueError(f"regularizer may set only {', '.join(_SETTINGS)}, not {', '.join(map(str, unknown))} "
                         "(the analysis options come from prune_kwargs, target_ratio from the next step's ratio)")
    growing = "delta" in regularizer or "max_coefficient" in regularizer
    checked = check_settings(**regularizer, growing=growing)
    if steps == 1:
        warn_caller("regularizer has no effect with a single ratio: it trains the fine-tunes between pruning steps")
    settings = dict(regularizer)
    if growing:
        settings["delta"] = checked.delta
    return settings
