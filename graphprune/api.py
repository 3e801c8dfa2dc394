"""The public entry points: :func:`analyze` and :func:`prune`."""
from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from torch import nn

import tracer
from tracer.state import ModelTransaction
from criteria import Criterion, get_criterion

from .analysis import Analysis, LayerRef, apply_audited, eval_mode, fingerprint, gc_paused, run_analysis
from .budget import PlanOptions, PruneResult, run_pruning
from .planner import check_ratio_value
from .report import Report
from .validation import check_int, check_model


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    ignored_layers: Iterable[LayerRef] = (),
    prune_heads: bool = False,
) -> Report:
    """Trace ``model`` and report every coupled channel group.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword
    inputs; when omitted a plausible input is built (see :func:`infer_example_inputs`).
    ``leaf_modules`` (names, classes or modules) are not traced into; their channels are
    blocked unless a rule knows them. ``ignored_layers`` marks groups that touch those
    modules as blocked. With ``prune_heads`` attention heads are whole channels (``num_heads``
    shrinks); by default every head keeps the same width and ``head_dim`` shrinks. The model
    is not modified; its train/eval flags are restored.
    """
    check_model(model)
    with eval_mode(model), gc_paused():
        return run_analysis(model, example_inputs, leaf_modules, ignored_layers, prune_heads).report


def _check_ratio_spec(model: nn.Module, ratio: Any) -> Union[float, dict, None]:
    """None, a float in [0, 1), or a mapping from module names / fnmatch globs to such floats."""
    if ratio is None:
        return None
    if not isinstance(ratio, Mapping):
        return check_ratio_value(ratio)
    if not ratio:
        raise ValueError("ratio mapping is empty; give at least one module name or glob")
    names = [name for name, _ in model.named_modules() if name]
    checked, unmatched = {}, []
    for key, value in ratio.items():
        if not isinstance(key, str):
            raise TypeError(f"ratio mapping keys must be module names or globs, got {type(key).__name__}")
        try:
            checked[key] = check_ratio_value(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"ratio[{key!r}]: {exc}") from None
        if key not in names and not fnmatch.filter(names, key):
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"ratio has keys that name no submodule of {type(model).__name__}: {unmatched}")
    return checked


def _check_fraction(value: Any, name: str, low_open: bool = True, high_closed: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = (value > 0.0 if low_open else value >= 0.0) and (value <= 1.0 if high_closed else value < 1.0)
    if math.isnan(value) or not ok:
        interval = ("(" if low_open else "[") + "0, 1" + ("]" if high_closed else ")")
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_planning(model, ratio, global_ranking, max_ratio, round_to, steps, schedule, targets, tolerance, return_result):
    ratio = _check_ratio_spec(model, ratio)
    given = {name: value for name, value in targets.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one budget, got {', '.join('target_' + n for n in given)}")
    target = None
    if given:
        (metric, value), = given.items()
        target = (metric, _check_fraction(value, f"target_{metric}"))
        if ratio is not None:
            raise ValueError(f"give either ratio or target_{metric}, not both: the budget search chooses the ratio")
    elif ratio is None:
        raise ValueError("prune needs a ratio or a budget (target_flops, target_params or target_latency)")
    for flag, name in ((global_ranking, "global_ranking"), (return_result, "return_result")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
    if global_ranking and isinstance(ratio, dict):
        raise ValueError("global_ranking needs a single float ratio, not a per-layer mapping")
    if max_ratio is not None:
        max_ratio = _check_fraction(max_ratio, "max_ratio", high_closed=False)
    if round_to is not None:
        round_to = check_int(round_to, "round_to", 1)
    steps = check_int(steps, "steps", 1)
    if not (schedule in ("linear", "geometric") or callable(schedule)):
        raise ValueError(f"schedule must be 'linear', 'geometric' or a callable(step, steps), got {schedule!r}")
    tolerance = _check_fraction(tolerance, "tolerance", high_closed=False)
    options = PlanOptions(global_ranking, max_ratio, round_to, steps, schedule, tolerance)
    return ratio, target, options


def prune(
    model: nn.Module,
    ratio: Union[float, Mapping[str, float], None] = None,
    example_inputs: Any = None,
    *,
    criterion: Union[str, Criterion] = "l1",
    ignored_layers: Iterable[LayerRef] = (),
    inplace: bool = True,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    verify: bool = True,
    prune_heads: bool = False,
    global_ranking: bool = False,
    max_ratio: Optional[float] = None,
    round_to: Optional[int] = None,
    steps: int = 1,
    schedule: Union[str, Callable[[int, int], float]] = "linear",
    target_flops: Optional[float] = None,
    target_params: Optional[float] = None,
    target_latency: Optional[float] = None,
    tolerance: float = 0.02,
    return_result: bool = False,
    report: Optional[Report] = None,
) -> Union[nn.Module, PruneResult]:
    """Remove ``floor(ratio * n)`` channels from every prunable group of ``n`` channels.

    Channels are ranked by ``criterion`` (a name such as ``"l1"`` or a Criterion). With
    ``inplace=False`` a deep copy is pruned and the original is left alone. With
    ``verify=True`` (default) the pruned model is traced again and every tensor must have
    the shape the analysis predicts, outputs unchanged; groups that fail this audit are
    blocked (with the reason) and dropped from the plan. On any other failure the model is
    restored bit for bit and :class:`PruningError` is raised; a ``KeyboardInterrupt`` (or
    any other ``BaseException``) also restores it and is re-raised as it is. The one step
    that cannot be undone is the final copy of the kept weights: a Ctrl-C arriving during
    it is held until it ends, and the model is then the finished pruned model. Returns the
    pruned model.

    Planning options (see :mod:`graphprune.planner` and :mod:`graphprune.budget`):

    * ``ratio`` may be a mapping ``{module name or fnmatch glob: ratio}``; a group takes the
      ratio of the first key naming one of its producer layers (exact names first), and
      groups that no key names are left alone (use ``"*"`` for a default);
    * ``global_ranking=True``: scores normalised per group (divided by their mean) are
      ranked across groups and ``floor(ratio * total channels)`` go, each group losing at
      most ``max_ratio`` (default 0.9) of its channels and never all of them;
    * ``max_ratio``: the largest fraction of any group that may go (default: 0.9 with
      ``global_ranking`` and as the top of a budget search, no limit otherwise);
    * ``round_to=N``: every pruned group keeps a multiple of ``N`` channels;
    * ``steps=n``: prune in ``n`` steps, re-analysing and re-scoring the pruned model before
      each; ``schedule`` is ``"linear"`` (equal shares), ``"geometric"`` (the same fraction
      of what is left each step) or ``schedule(step, steps) -> share of the total done``;
    * ``target_flops`` / ``target_params`` / ``target_latency`` (instead of ``ratio``): the
      fraction of the original FLOPs (``FlopCounterMode``), parameters, or latency (on the
      model's device with ``example_inputs``) to keep. The uniform ratio (or the global one
      with ``global_ranking``, at most ``max_ratio``) is searched until the pruned model
      lands within ``tolerance`` (relative, default 2%) of the target; otherwise the closest
      model is kept and a :class:`BudgetWarning` is issued. The achieved value is logged on
      the ``"graphprune"`` logger.

    With ``return_result=True`` a :class:`PruneResult` is returned instead of the model: its
    ``model`` is the pruned model, ``achieved`` the budget metric reached as a fraction of
    the original, ``before`` / ``after`` the FLOPs and parameter counts, ``steps`` one
    :class:`StepResult` per step. If a step of a multi-step prune fails, the model is
    restored to its state before the first step.

    ``report`` (from :func:`analyze` on this ``model``) skips the analysis: the groups pruned
    are those of the report, and ``leaf_modules``, ``ignored_layers`` and ``prune_heads`` are
    the ones given to ``analyze``. The model must still be the one analysed (the same
    modules, parameters and buffers, with the same shapes; weights may have been updated),
    and ``example_inputs``, if given, must have the shapes the report was made with. The
    shape audit still re-traces the pruned model.
    """
    check_model(model)
    ratio, target, options = _check_planning(
        model, ratio, global_ranking, max_ratio, round_to, steps, schedule,
        {"flops": target_flops, "params": target_params, "latency": target_latency}, tolerance, return_result,
    )
    criterion = get_criterion(criterion)
    analysis = None
    if report is not None:
        analysis = analysis_of(report, model, example_inputs, inplace, leaf_modules, ignored_layers, prune_heads)
        leaf_modules, ignored_layers, prune_heads = analysis.leaf_modules, analysis.ignored_layers, analysis.prune_heads
    elif not inplace:
        model = copy.deepcopy(model)
    # Until the surgery's final copy, any exception restores the model. Where work follows
    # that copy (more steps, a budget, measurements), the originals are held to the end.
    keep_tensors = options.steps > 1 or target is not None or return_result
    transaction = ModelTransaction(model, keep_tensors=keep_tensors)
    on_commit = None if keep_tensors else transaction.commit
    with transaction, eval_mode(model), gc_paused(pause=not criterion.requires_data):  # a data pass may run long
        if analysis is None:
            analysis = run_analysis(model, example_inputs, leaf_modules, ignored_layers, prune_heads)
        inputs = analysis.inputs
        if not analysis.report.prunable_groups:
            warnings.warn(f"{analysis.report.model_name} has no prunable channel group; the model is unchanged", stacklevel=2)
            if return_result:
                return PruneResult(model, target and target[0], target and target[1], None, target is None, {}, {}, [])
            return model

        def apply(current: Analysis, plan: dict) -> None:
            apply_audited(model, inputs, leaf_modules, current.surgery, plan, verify, on_commit)

        def analyse(current_model: nn.Module) -> Analysis:
            return run_analysis(current_model, inputs, leaf_modules, ignored_layers, prune_heads)

        result = run_pruning(
            model, analysis, inputs, criterion, ratio=ratio, target=target, options=options,
            analyse=analyse, apply=apply, measure=return_result,
        )
    return result if return_result else model


def analysis_of(report: Any, model: nn.Module, example_inputs: Any, inplace: bool, *analysis_options: Any) -> Analysis:
    """The analysis behind ``report``, checked to still describe ``model``."""
    if not isinstance(report, Report):
        raise TypeError(f"report must be a Report from graphprune.analyze, got {type(report).__name__}")
    analysis = report.analysis
    if not isinstance(analysis, Analysis):
        raise ValueError("this report was not made by graphprune.analyze; pass the one analyze() returned")
    if analysis.model is not model:
        raise ValueError(f"the report describes another {report.model_name} object than the model given")
    if not inplace:
        raise ValueError("a report prunes the analysed model itself; with inplace=False, deep-copy the model and analyze the copy")
    if not all(option is False or (isinstance(option, (tuple, list, set)) and not option) for option in analysis_options):
        raise ValueError("leaf_modules, ignored_layers and prune_heads were fixed by analyze(); pass them there, not with report")
    if fingerprint(model) != analysis.fingerprint:
        raise ValueError(
            f"{report.model_name} changed since it was analysed (modules, parameters or buffers were replaced, "
            "pruned or moved); analyze it again"
        )
    if example_inputs is not None and tracer.describe(example_inputs) != tracer.describe(analysis.inputs):
        raise ValueError(
            f"example_inputs differ from the ones the report was made with ({report.input_description}); "
            "leave them out or analyze again"
        )
    return analysis
