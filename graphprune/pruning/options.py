"""The planning options of :func:`graphprune.prune`, validated: how much to prune, and how.

* ``ratio``: ``floor(ratio * n)`` channels go from every prunable group of ``n``; or a
  mapping ``{module name or fnmatch glob: ratio}``: a group takes the ratio of the first
  key naming one of its producer layers (exact names first), and groups that no key names
  are left alone (use ``"*"`` for a default);
* ``global_ranking=True``: scores normalised per group (divided by their mean) are ranked
  across groups and ``floor(ratio * total channels)`` go, each group losing at most
  ``max_ratio`` (default 0.9) of its channels and never all of them;
* ``max_ratio``: the largest fraction of any group that may go (default: 0.9 with
  ``global_ranking`` and as the top of a budget search, no limit otherwise);
* ``round_to=N``: every pruned group keeps a multiple of ``N`` channels;
* ``steps=n``: prune in ``n`` steps, re-analysing and re-scoring the pruned model before
  each; ``schedule`` is ``"linear"`` (equal shares), ``"geometric"`` (the same fraction of
  what is left each step) or ``schedule(step, steps) -> share of the total done``;
* ``target_flops`` / ``target_params`` / ``target_latency`` (instead of ``ratio``): the
  fraction of the original FLOPs (``FlopCounterMode``), parameters, or latency (on the
  model's device with ``example_inputs``) to keep. The uniform ratio (or the global one with
  ``global_ranking``, at most ``max_ratio``) is searched until the pruned model lands within
  ``tolerance`` (relative, default 2%) of the target; otherwise the closest model is kept
  and a :class:`~graphprune.pruning.budget.BudgetWarning` is issued. The achieved value is
  logged on the ``"graphprune"`` logger;
* ``uniform=True``: a group repeated layer after layer (same size, members named alike but
  for their numbers) loses as many channels in every layer, and none if it is blocked in
  one, so that a config with one size per kind of layer (Hugging Face's) describes the
  pruned model (see :mod:`graphprune.pruning.planner`);
* ``fit_config=True``: only what ``model.config`` can describe is pruned. Where the pruned
  sizes leave no config that rebuilds the model, the classes of repeated groups (or single
  groups) that the config cannot describe, each tried alone, are blocked (kind
  :attr:`~graphprune.analysis.reasons.BlockKind.CONFIG`) and the rest is pruned, so that
  ``save_pretrained`` / ``from_pretrained`` round-trip the result;
* ``verify``: audit the pruned model's shapes (default on).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn

from graphprune.validation import check_bool, check_fraction, check_int

Schedule = Union[str, Callable[[int, int], float]]


@dataclass
class PlanOptions:
    """Planning options shared by every step (see :func:`graphprune.prune`)."""

    global_ranking: bool = False
    max_ratio: Optional[float] = None
    round_to: Optional[int] = None
    steps: int = 1
    schedule: Schedule = "linear"
    tolerance: float = 0.02
    verify: bool = True
    uniform: bool = False
    fit_config: bool = False


def check_ratio(model: nn.Module, ratio: Any) -> Union[float, dict, None]:
    """None, a float in [0, 1), or a mapping from module names / fnmatch globs to such floats."""
    if ratio is None:
        return None
    if not isinstance(ratio, Mapping):
        return check_fraction(ratio, "ratio")
    if not ratio:
        raise ValueError("ratio mapping is empty; give at least one module name or glob")
    names = [name for name, _ in model.named_modules() if name]
    checked, unmatched = {}, []
    for key, value in ratio.items():
        if not isinstance(key, str):
            raise TypeError(f"ratio mapping keys must be module names or globs, got {type(key).__name__}")
        try:
            checked[key] = check_fraction(value, "ratio")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"ratio[{key!r}]: {exc}") from None
        if key not in names and not fnmatch.filter(names, key):
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"ratio has keys that name no submodule of {type(model).__name__}: {unmatched}")
    return checked


def check_target(ratio: Any, targets: Mapping[str, Any]) -> Optional[tuple]:
    """``(metric, fraction)`` of the one budget given (``targets`` maps ``"flops"``,
    ``"params"`` and ``"latency"`` to a value or None), or None when pruning by ``ratio``."""
    given = {name: value for name, value in targets.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one budget, got {', '.join('target_' + n for n in given)}")
    if not given:
        if ratio is None:
            raise ValueError("prune needs a ratio or a budget (target_flops, target_params or target_latency)")
        return None
    (metric, value), = given.items()
    if ratio is not None:
        raise ValueError(f"give either ratio or target_{metric}, not both: the budget search chooses the ratio")
    return metric, check_fraction(value, f"target_{metric}", low_open=True, high_open=False)


def check_options(ratio: Any, *, global_ranking: Any, max_ratio: Any, round_to: Any, steps: Any, schedule: Any,
                  tolerance: Any, verify: Any, uniform: Any = False, fit_config: Any = False) -> PlanOptions:
    """The :class:`PlanOptions`, each checked (``ratio`` as :func:`check_ratio` returned it)."""
    for flag, name in ((global_ranking, "global_ranking"), (verify, "verify"), (uniform, "uniform"),
                       (fit_config, "fit_config")):
        check_bool(flag, name)
    if global_ranking and isinstance(ratio, dict):
        raise ValueError("global_ranking needs a single float ratio, not a per-layer mapping")
    if max_ratio is not None:
        max_ratio = check_fraction(max_ratio, "max_ratio", low_open=True)
    if round_to is not None:
        round_to = check_int(round_to, "round_to", 1)
    if not (schedule in ("linear", "geometric") or callable(schedule)):
        raise ValueError(f"schedule must be 'linear', 'geometric' or a callable(step, steps), got {schedule!r}")
    tolerance = check_fraction(tolerance, "tolerance", low_open=True)
    return PlanOptions(global_ranking, max_ratio, round_to, check_int(steps, "steps", 1), schedule, tolerance, verify,
                       uniform, fit_config)
