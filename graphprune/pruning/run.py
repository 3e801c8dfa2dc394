"""Prune in steps: ratios, per-layer ratios, global ranking, schedules and budgets.

:func:`run_pruning` is the engine behind :func:`graphprune.prune`'s planning options: each
step (re-)analyses the model through a :class:`~graphprune.session.PruningSession`,
re-scores it, plans by ratio or searches a budget (:mod:`.budget`), and applies the plan
with the shape audit. :class:`PruneResult` is what ``prune(..., return_result=True)``
returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn

from graphprune.reporting.measure import count_flops, count_parameters

from .budget import Budget
from .options import PlanOptions, Schedule
from .planner import RatioSpec, floor_count, group_ratio, plan_removal, score_groups


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


def run_pruning(session: Any, criterion: Any, *, ratio: Optional[RatioSpec], target: Optional[tuple],
                options: PlanOptions, measure: bool, on_commit: Optional[Callable[[], None]] = None,
                after_step: Optional[Callable[[nn.Module, dict], None]] = None) -> PruneResult:
    """Prune ``session``'s model in ``options.steps`` steps, re-analysing and re-scoring before each.

    ``ratio`` (float or mapping) or ``target = (metric, fraction)`` says how much to remove.
    With ``measure`` the FLOPs and parameters before/after are reported. ``on_commit`` goes
    to the surgery of a single step. ``after_step(model, kept)`` runs after every step that
    pruned, with the positions of every tensor kept so far (``{(module, attribute): {dim:
    positions}}``, of the original tensor; a calibration recovery). Restoring the model after
    a failure is the caller's (:class:`~graphprune.tracer.state.ModelTransaction`).
    """
    model, inputs = session.model, session.inputs
    budget = Budget(model, inputs, *target, tolerance=options.tolerance) if target is not None else None
    before = _sizes(model, inputs) if measure or budget else {}
    results, originals, kept = [], {}, {}
    for step in range(1, options.steps + 1):
        if step > 1:
            session = session.renewed()
        criterion.prepare(model, session.report)
        if budget is None:
            step_value = _nominal_ratio(ratio, step, options)
            plan = plan_removal(session.report.groups, _step_ratio(ratio, step, options, session.report.groups, originals),
                                criterion, global_ranking=options.global_ranking, max_ratio=options.max_ratio,
                                round_to=options.round_to, uniform=options.uniform)
        else:
            goal = kept_fraction(budget.goal, step, options.steps, options.schedule)
            step_value, plan, achieved = budget.search(session, score_groups(session.report.groups, criterion), goal, options)
        if plan:
            blocked = session.apply(plan, verify=options.verify, on_commit=on_commit, fit_config=options.fit_config)
            plan = {group: index for group, index in plan.items() if group not in blocked}
            _compose(kept, session.surgery.kept_positions())
            if after_step is not None and plan:
                after_step(model, kept)
        achieved = budget.settled(model, achieved) if budget is not None else None
        results.append(StepResult(step, step_value, int(sum(len(v) for v in plan.values())), len(plan), achieved))
    after = _sizes(model, inputs) if measure or budget else {}
    achieved = results[-1].achieved
    within = budget.met(achieved) if budget is not None else True
    return PruneResult(model, budget and budget.metric, budget and budget.goal, achieved, within, before, after, results)


def _nominal_ratio(ratio: RatioSpec, step: int, options: PlanOptions) -> Union[float, dict]:
    """What step ``step`` removes of the model as it is then, as the schedule says (reported)."""
    if isinstance(ratio, Mapping):
        return {k: step_ratio(v, step, options.steps, options.schedule) for k, v in ratio.items()}
    return step_ratio(float(ratio), step, options.steps, options.schedule)


def _step_ratio(ratio: RatioSpec, step: int, options: PlanOptions, groups: list, originals: dict) -> Union[float, dict]:
    """The ratio of step ``step``: with one step, ``ratio`` itself; with several, one per group
    (by id), so that each group ends with exactly the channels one step would leave it
    (``floor(ratio * n)`` of its original ``n`` removed) rather than a floor at every step.
    ``originals`` holds every group's original size and ratio, recorded at step 1 by the
    names and dims of its members, which the re-analyses keep."""
    if options.steps == 1 or options.global_ranking:
        return _nominal_ratio(ratio, step, options)
    per_group = {}
    for group in groups:
        key = tuple(sorted((m.name, m.dim) for m in group.members))
        if step == 1:
            originals[key] = (group.size, group_ratio(group, ratio))
        n, final = originals.get(key, (group.size, 0.0))
        removed = floor_count(1.0 - kept_fraction(1.0 - final, step, options.steps, options.schedule), n)
        count = group.size - (n - removed)
        if count > 0 and group.size:
            per_group[group.id] = min((count + 1e-6) / group.size, 1.0 - 1e-9)
    return per_group


def _sizes(model: nn.Module, inputs: Any) -> dict:
    return {"flops": int(count_flops(model, inputs)), "params": int(count_parameters(model))}


def _compose(kept: dict, step: dict) -> None:
    """Fold one step's kept positions (of the tensors as the step found them) into ``kept``
    (of the original tensors)."""
    for key, dims in step.items():
        before = kept.setdefault(key, {})
        for dim, positions in dims.items():
            before[dim] = before[dim][positions] if dim in before else positions
