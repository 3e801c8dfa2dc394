"""Budgets: search the ratio whose pruned model keeps a given fraction of a metric.

Metrics, as fractions of the original model's:

* ``"flops"``: :func:`graphprune.count_flops` (``torch.utils.flop_counter.FlopCounterMode``);
* ``"params"``: :func:`graphprune.count_parameters`;
* ``"latency"``: :func:`~graphprune.reporting.measure.latency_ratio` times the original
  (a copy kept aside) and the pruned model alternately on the example inputs.

Each candidate plan is measured by a :meth:`~graphprune.session.PruningSession.trial`,
which always rolls the model back.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
from torch import nn

from graphprune.reporting import measure
from graphprune.validation import warn_caller

from .planner import DEFAULT_MAX_RATIO, plan_removal

logger = logging.getLogger("graphprune")


class BudgetWarning(UserWarning):
    """A budget could not be met within tolerance; the closest model found was kept."""


class Budget:
    """Keep ``goal`` (a fraction) of ``metric`` of ``model``, within ``tolerance`` (relative)."""

    def __init__(self, model: nn.Module, inputs: Any, metric: str, goal: float, *, tolerance: float):
        self.metric, self.goal, self.tolerance, self.inputs = metric, goal, tolerance, inputs
        self._reference = copy.deepcopy(model) if metric == "latency" else None
        self._base = 1.0 if metric == "latency" else self._value(model)

    def _value(self, model: nn.Module) -> float:
        if self.metric == "flops":
            return float(measure.count_flops(model, self.inputs))
        if self.metric == "params":
            return float(measure.count_parameters(model))
        return measure.latency_ratio(self._reference, model, self.inputs)

    def fraction(self, model: nn.Module) -> float:
        """The metric of ``model`` as a fraction of the original's."""
        return self._value(model) / self._base

    def settled(self, model: nn.Module, searched: float) -> float:
        """The fraction reached once a plan was applied: measured again for an exact metric
        (the audit may have dropped a group), the search's mean for latency."""
        return searched if self.metric == "latency" else self.fraction(model)

    def met(self, achieved: float) -> bool:
        """Whether ``achieved`` lies within tolerance; logs it, and warns when it does not."""
        within = abs(achieved - self.goal) <= self.tolerance * self.goal
        message = f"graphprune: {self.metric} budget {self.goal:.4g}: achieved {achieved:.4g} of the original"
        logger.info(message)
        if not within:
            warn_caller(f"{message}, outside the {100 * self.tolerance:g}% tolerance", BudgetWarning)
        return within

    def search(self, session, scores: dict, goal: float, options) -> tuple:
        """``(ratio, plan, achieved)``: the uniform (or global) ratio whose plan comes closest to
        ``goal``, found by bisection (see :class:`_Search`)."""
        return _Search(self, session, scores, goal, options).run()


class _Search:
    """Bisect the ratio whose pruned model's metric is ``goal`` of the original.

    Exact metrics measure each distinct plan once. Latency is noisy: every measurement of a
    plan is kept and their mean used; a plan that seems to land is measured twice more
    before it is accepted, and if the bisection runs out, the closest plans are measured
    again and a second bisection runs in the bracket their means give.
    """

    def __init__(self, budget: Budget, session, scores: dict, goal: float, options):
        self.budget, self.session, self.scores, self.goal, self.options = budget, session, scores, goal, options
        self.noisy = budget.metric == "latency"
        self.upper = options.max_ratio if options.max_ratio is not None else DEFAULT_MAX_RATIO
        self.tol = options.tolerance * goal
        self.samples: dict = {}  # plan key -> measurements (fractions of the original)
        self.tried: dict = {}  # plan key -> (ratio, plan)

    def run(self) -> tuple:
        _, at_zero = self.value(0.0)
        if at_zero > self.goal + self.tol:
            key_hi, at_top = self.value(self.upper)
            if not self.lands(key_hi) and at_top < self.goal and not self.bisect(0.0, self.upper) and self.noisy:
                self.refine()
        best = min(self.samples, key=lambda k: (self.distance(k), self.tried[k][0]))
        ratio, plan = self.tried[best]
        return float(ratio), plan, self.mean(best)

    def plan_for(self, ratio: float) -> dict:
        o = self.options
        return plan_removal(self.session.report.groups, ratio, scores=self.scores, global_ranking=o.global_ranking,
                            max_ratio=o.max_ratio, round_to=o.round_to, uniform=o.uniform)

    def measure(self, key) -> float:
        plan = self.tried[key][1]
        value = self.session.trial(plan, self.budget.fraction) if plan else self.budget.fraction(self.session.model)
        self.samples.setdefault(key, []).append(value)
        return self.mean(key)

    def mean(self, key) -> float:
        return float(np.mean(self.samples[key]))

    def distance(self, key) -> float:
        return abs(self.mean(key) - self.goal)

    def value(self, ratio: float) -> tuple:
        plan = self.plan_for(ratio)
        key = tuple(sorted((g.id, len(v)) for g, v in plan.items()))
        self.tried.setdefault(key, (ratio, plan))
        if key not in self.samples:
            self.measure(key)
        return key, self.mean(key)

    def lands(self, key) -> bool:
        if self.distance(key) > self.tol:
            return False
        while self.noisy and len(self.samples[key]) < 3:
            self.measure(key)
        return self.distance(key) <= self.tol

    def bisect(self, lo: float, hi: float) -> bool:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            key, value = self.value(mid)
            if self.lands(key):
                return True
            if hi - lo < 1e-5:
                return False
            lo, hi = (mid, hi) if self.mean(key) > self.goal else (lo, mid)
        return False

    def refine(self) -> None:
        """Noise may have sent the bisection astray: measure the closest plans again, then
        bisect once more inside the bracket that the averaged measurements give."""
        for key in sorted(self.samples, key=self.distance)[:3]:
            while len(self.samples[key]) < 3:
                self.measure(key)
        if min(self.distance(k) for k in self.samples) > self.tol:
            points = sorted((self.tried[k][0], self.mean(k)) for k in self.samples)
            lo = max((r for r, f in points if f > self.goal), default=0.0)
            hi = min((r for r, f in points if f < self.goal and r > lo), default=self.upper)
            self.bisect(lo, hi)
