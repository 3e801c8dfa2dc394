"""Budgets and schedules: measure a model, prune in steps, search the ratio that meets a target.

Budget metrics, as fractions of the original model's:

* FLOPs: :func:`graphprune.count_flops` (``torch.utils.flop_counter.FlopCounterMode``);
* parameters: :func:`graphprune.count_parameters`;
* latency: :func:`latency_ratio` times the original (a copy kept aside) and the pruned
  model alternately on the example inputs, on the model's device, so that load on the
  machine affects both alike. Single-threaded CPU inference is timed by the thread's CPU
  time (immune to other processes), anything else by wall clock (:func:`latency_clock`).

:func:`run_pruning` is the engine behind :func:`graphprune.prune`'s planning options;
:class:`PruneResult` is what ``prune(..., return_result=True)`` returns.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from tracer import call_model

from .planner import RatioSpec, plan_removal, score_groups
from .surgery import PruningError, ValuesNeeded

logger = logging.getLogger("graphprune")

METRICS = ("flops", "params", "latency")
Schedule = Union[str, Callable[[int, int], float]]


class BudgetWarning(UserWarning):
    """A budget could not be met within tolerance; the closest model found was kept."""


# ----- metrics
def _flops(model: nn.Module, inputs: Any) -> float:
    from .measure import count_flops  # imported late: measure imports api, which imports this module

    return float(count_flops(model, inputs))


def _params(model: nn.Module) -> float:
    from .measure import count_parameters

    return float(count_parameters(model))


def _tensors(inputs: Any) -> list:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for v in inputs.values() for t in _tensors(v)]
    if isinstance(inputs, (tuple, list)):
        return [t for v in inputs for t in _tensors(v)]
    return []


def _synchronize(inputs: Any) -> None:
    for tensor in _tensors(inputs):
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
            return


def latency_clock(example_inputs: Any) -> str:
    """``"cpu"`` (the calling thread's CPU time) for single-threaded CPU inference, else ``"wall"``.

    With one intra-op thread the whole forward runs in the calling thread, so its CPU time
    is the latency the model would have on an idle machine and other processes do not
    disturb it; otherwise (several threads, accelerators) wall time is the only measure.
    """
    on_cpu = all(t.device.type == "cpu" for t in _tensors(example_inputs))
    return "cpu" if on_cpu and torch.get_num_threads() == 1 else "wall"


def _time_once(model: nn.Module, inputs: Any, clock: str) -> float:
    if clock == "cpu":
        start = time.thread_time()
        call_model(model, inputs)
        return time.thread_time() - start
    _synchronize(inputs)
    start = time.perf_counter()
    call_model(model, inputs)
    _synchronize(inputs)
    return time.perf_counter() - start


def latency_ratio(reference: nn.Module, model: nn.Module, example_inputs: Any, *, warmup: int = 3,
                  repeats: int = 20, clock: Optional[str] = None) -> float:
    """``latency(model) / latency(reference)`` on ``example_inputs``.

    The two models run alternately so that load on the machine affects both alike; each
    latency is the fastest run by wall clock, or the median run by CPU clock (see
    :func:`latency_clock`, the default ``clock``).
    """
    clock = clock or latency_clock(example_inputs)
    reduce = np.median if clock == "cpu" else np.min
    with torch.no_grad():
        for _ in range(warmup):
            call_model(reference, example_inputs)
            call_model(model, example_inputs)
        ref_times, times = [], []
        for _ in range(max(repeats, 1)):
            ref_times.append(_time_once(reference, example_inputs, clock))
            times.append(_time_once(model, example_inputs, clock))
    return float(reduce(times) / reduce(ref_times))


# ----- results
@dataclass
class StepResult:
    """One pruning step: the ratio applied to the model as it was then (a float, or the
    per-layer mapping), channels removed, groups touched, and the metric afterwards as a
    fraction of the original (None without a budget)."""

    step: int
    ratio: Union[float, dict]
    channels_removed: int
    groups_pruned: int
    achieved: Optional[float] = None


@dataclass
class PruneResult:
    """What ``graphprune.prune(..., return_result=True)`` returns.

    ``model`` is the pruned model (the same object ``prune`` returns otherwise); ``metric``
    and ``target`` name the budget (``None`` when pruning by ratio); ``achieved`` is the
    metric of the pruned model as a fraction of the original's; ``within_tolerance`` says
    whether ``|achieved - target| <= tolerance * target``. ``before`` / ``after`` hold the
    FLOPs and parameter counts (filled with a budget or ``return_result=True``).
    """

    model: nn.Module
    metric: Optional[str]
    target: Optional[float]
    achieved: Optional[float]
    within_tolerance: bool
    before: dict
    after: dict
    steps: list = field(default_factory=list)

    @property
    def ratio(self) -> Optional[float]:
        """The (last) searched or scheduled float ratio, if any."""
        floats = [s.ratio for s in self.steps if isinstance(s.ratio, float)]
        return floats[-1] if floats else None


# ----- schedules
def kept_fraction(final_kept: float, step: int, steps: int, schedule: Schedule) -> float:
    """Fraction of the original (channels or metric) kept after ``step`` of ``steps``.

    ``"linear"`` removes equal shares per step; ``"geometric"`` the same fraction of what is
    left each step; a callable ``schedule(step, steps)`` returns the share of the total
    reduction done after ``step`` (0 at 0, 1 at ``steps``, non-decreasing).
    """
    if step >= steps:
        return final_kept
    if schedule == "linear":
        progress = step / steps
    elif schedule == "geometric":
        return final_kept ** (step / steps) if final_kept > 0 else 0.0
    else:
        progress = float(schedule(step, steps))
        if not 0.0 <= progress <= 1.0 or math.isnan(progress):
            raise ValueError(f"schedule({step}, {steps}) must lie in [0, 1], got {progress}")
    return 1.0 - (1.0 - final_kept) * progress


def step_ratio(ratio: float, step: int, steps: int, schedule: Schedule) -> float:
    """The ratio to apply to the current model at ``step`` (1-based) so that after the last
    step a fraction ``ratio`` of the original is gone."""
    before = kept_fraction(1.0 - ratio, step - 1, steps, schedule)
    after = kept_fraction(1.0 - ratio, step, steps, schedule)
    if before <= 0:
        return 0.0
    return min(max(1.0 - after / before, 0.0), 1.0 - 1e-9)


class _Probe(Exception):
    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


@dataclass
class PlanOptions:
    """Planning options shared by every step (see :func:`graphprune.prune`)."""

    global_ranking: bool = False
    max_ratio: Optional[float] = None
    round_to: Optional[int] = None
    steps: int = 1
    schedule: Schedule = "linear"
    tolerance: float = 0.02
    latency_repeats: int = 20


def run_pruning(
    model: nn.Module,
    first_analysis: Any,
    inputs: Any,
    criterion,
    *,
    ratio: Optional[RatioSpec],
    target: Optional[tuple],
    options: PlanOptions,
    analyse: Callable[[nn.Module], Any],
    apply: Callable[[Any, dict], None],
    measure: bool,
) -> PruneResult:
    """Prune ``model`` in ``options.steps`` steps, re-analysing and re-scoring before each one.

    ``analyse(model)`` returns a fresh analysis (``.report``, ``.surgery``); ``apply(analysis,
    plan)`` commits a plan (with the caller's output check). ``ratio`` (float or mapping) or
    ``target = (metric, fraction)`` says how much to remove. With ``measure`` the FLOPs and
    parameters before/after are reported. Restoring the model after a failure is the
    caller's (:class:`graphprune.transaction.ModelTransaction`).
    """
    metric, goal = target if target is not None else (None, None)
    reference = copy.deepcopy(model) if metric == "latency" else None

    def evaluate(m: nn.Module) -> float:
        if metric == "flops":
            return _flops(m, inputs)
        if metric == "params":
            return _params(m)
        return latency_ratio(reference, m, inputs, repeats=options.latency_repeats)

    before = {"flops": int(_flops(model, inputs)), "params": int(_params(model))} if measure or metric else {}
    base = None if metric is None else (1.0 if metric == "latency" else float(before[metric]))

    step_results = []
    achieved = None
    analysis = first_analysis
    for step in range(1, options.steps + 1):
        if step > 1:
            analysis = analyse(model)
        groups = analysis.report.groups
        criterion.prepare(model, analysis.report)
        if metric is None:
            if isinstance(ratio, Mapping):
                step_value: Union[float, dict] = {k: step_ratio(v, step, options.steps, options.schedule) for k, v in ratio.items()}
            else:
                step_value = step_ratio(float(ratio), step, options.steps, options.schedule)
            plan = plan_removal(groups, step_value, criterion, global_ranking=options.global_ranking,
                                max_ratio=options.max_ratio, round_to=options.round_to)
        else:
            step_goal = kept_fraction(goal, step, options.steps, options.schedule)
            scores = score_groups(groups, criterion)
            step_value, plan, achieved = _search(analysis, scores, step_goal, base, evaluate, model, options,
                                                  noisy=metric == "latency")
        if plan:
            apply(analysis, plan)
            if metric in ("flops", "params"):  # exact, and the audit may have dropped a group
                achieved = evaluate(model) / base
        step_results.append(StepResult(step, step_value, int(sum(len(v) for v in plan.values())), len(plan), achieved))

    after = {"flops": int(_flops(model, inputs)), "params": int(_params(model))} if measure or metric else {}
    within = True
    if metric is not None:
        within = abs(achieved - goal) <= options.tolerance * goal
        message = f"graphprune: {metric} budget {goal:.4g}: achieved {achieved:.4g} of the original"
        logger.info(message)
        if not within:
            warnings.warn(f"{message}, outside the {100 * options.tolerance:g}% tolerance", BudgetWarning, stacklevel=3)
    return PruneResult(model, metric, goal, achieved, within, before, after, step_results)


def _search(analysis, scores: dict, goal: float, base: float, evaluate, model: nn.Module, options: PlanOptions,
            noisy: bool = False):
    """Bisect the uniform (or global) ratio whose pruned model's metric is ``goal * base``.

    Candidate plans are applied and measured inside the surgery's transaction (the probe
    raises, so the model is rolled back). Exact metrics measure each distinct plan once.
    A ``noisy`` metric (latency) keeps every measurement of a plan and uses their mean: a
    plan that seems to land is measured twice more before it is accepted, and if the
    bisection runs out, the closest plans are measured again and a second bisection runs
    in the bracket given by the averaged measurements.
    Returns ``(ratio, plan, achieved)``.
    """
    groups = analysis.report.groups
    upper = options.max_ratio if options.max_ratio is not None else 0.9
    tol = options.tolerance * goal
    samples: dict = {}  # plan key -> measurements (fractions of the original)
    tried: dict = {}  # plan key -> (ratio, plan)

    def plan_for(r: float) -> dict:
        return plan_removal(groups, r, scores=scores, global_ranking=options.global_ranking,
                            max_ratio=options.max_ratio, round_to=options.round_to)

    def measure(key, plan) -> float:
        samples.setdefault(key, []).append(_probe(analysis, plan, evaluate, model) / base)
        return float(np.mean(samples[key]))

    def value(r: float) -> tuple:
        plan = plan_for(r)
        key = tuple(sorted((g.id, len(v)) for g, v in plan.items()))
        tried.setdefault(key, (r, plan))
        if key not in samples:
            measure(key, plan)
        return key, float(np.mean(samples[key]))

    def lands(key) -> bool:
        mean = float(np.mean(samples[key]))
        if abs(mean - goal) > tol:
            return False
        if noisy and len(samples[key]) < 3:
            for _ in range(3 - len(samples[key])):
                mean = measure(key, tried[key][1])
            return abs(mean - goal) <= tol
        return True

    def distance(key) -> float:
        return abs(float(np.mean(samples[key])) - goal)

    def bisect(lo: float, hi: float) -> bool:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            key, _ = value(mid)
            if lands(key):
                return True
            if hi - lo < 1e-5:
                return False
            if float(np.mean(samples[key])) > goal:
                lo = mid
            else:
                hi = mid
        return False

    _, f_lo = value(0.0)
    if f_lo > goal + tol:
        key_hi, _ = value(upper)
        if not lands(key_hi) and float(np.mean(samples[key_hi])) < goal and not bisect(0.0, upper) and noisy:
            # noise may have sent the bisection astray: measure the closest plans again, then
            # bisect once more inside the bracket that the averaged measurements give
            for key in sorted(samples, key=distance)[:3]:
                while len(samples[key]) < 3:
                    measure(key, tried[key][1])
            if min(distance(k) for k in samples) > tol:
                points = sorted((tried[k][0], float(np.mean(v))) for k, v in samples.items())
                lo = max((r for r, f in points if f > goal), default=0.0)
                hi = min((r for r, f in points if f < goal and r > lo), default=upper)
                bisect(lo, hi)

    best = min(samples, key=lambda k: (distance(k), tried[k][0]))
    r, plan = tried[best]
    return float(r), plan, float(np.mean(samples[best]))


def _probe(analysis, plan: dict, evaluate, model: nn.Module) -> float:
    if not plan:
        return evaluate(model)

    def probe(removed: np.ndarray, filled: bool) -> None:  # raising rolls the surgery back
        if not filled:
            raise ValuesNeeded("the probe measures the pruned model itself")
        raise _Probe(evaluate(model))

    try:
        analysis.surgery.prune_groups(plan, verify=probe)
    except PruningError as exc:
        if isinstance(exc.__cause__, _Probe):
            return exc.__cause__.value
        raise
    raise RuntimeError("the probe did not run")  # pragma: no cover
