"""A pruning session: one analysis of one model, and everything done with it.

:func:`graphprune.prune`, the budget search, multi-step pruning, sensitivity analysis and
the command line all work through a :class:`PruningSession`: it holds the analysis (as a
fitted estimator holds its state), applies plans with the shape audit, runs trials that
are always rolled back, and analyses the pruned model again for the next step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

import numpy as np
from torch import nn

from . import tracer
from .analysis.analyzer import (
    Analysis,
    AnalysisOptions,
    LayerRef,
    fingerprint,
    run_analysis,
    traced_leaves,
)
from .analysis.groups import Group
from .analysis.reasons import BlockKind, Reason
from .pruning.audit import AuditError, audit, run_failure
from .pruning.model_config import ConfigMismatch, ConfigWarning, builds_from_config, describe_pruned
from .pruning.planner import repeated_groups
from .pruning.surgery import ChannelSurgery, PruningError
from .analysis.report import Report
from .tracer.fallback import check_capture
from .tracer.state import interrupts_deferred
from .validation import check_model, warn_caller

T = TypeVar("T")


class PruningSession:
    """One analysis of ``model`` on ``example_inputs``, and the means to prune it.

    ``report`` is the analysis report; each of its groups can prune itself
    (:meth:`Group.prune`) through this session. :meth:`apply` removes a plan's channels
    with the shape audit, :meth:`trial` measures a plan and always rolls it back, and
    :meth:`renewed` analyses the pruned model again with the same inputs and options.
    Building one analyses the model, and raises what :func:`graphprune.analyze` raises.

    Parameters
    ----------
    model : nn.Module
        The model to analyse and prune.
    example_inputs, leaf_modules, ignored_layers, prune_heads, capture
        As in :func:`graphprune.analyze`.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, leaf_modules: Iterable[tracer.LeafSpec] = (),
                 ignored_layers: Iterable[LayerRef] = (), prune_heads: bool = False, capture: str = "auto"):
        check_model(model)
        options = AnalysisOptions.checked(model, leaf_modules, ignored_layers, prune_heads, capture)
        self.analysis: Analysis = run_analysis(model, example_inputs, options)
        self.surgery = ChannelSurgery(self.analysis.state, self.analysis.roots, self.analysis.groups)
        self.report.session = self
        for group in self.report.groups:
            group._session = self

    @property
    def model(self) -> nn.Module:
        """The model analysed (and pruned in place)."""
        return self.analysis.model

    @property
    def inputs(self) -> Any:
        """The example inputs, as resolved (inferred when none were given)."""
        return self.analysis.inputs

    @property
    def report(self) -> Report:
        """The analysis report, whose groups belong to this session."""
        return self.analysis.report

    def renewed(self) -> "PruningSession":
        """Analyse the model again, as it is now (after pruning).

        Returns
        -------
        PruningSession
            A new session on the same model, with the same inputs and options.
        """
        a = self.analysis
        return PruningSession(a.model, a.inputs, **a.options.as_kwargs())

    def apply(self, plan: Mapping[Group, Sequence[int]], *, verify: bool = True, strict: bool = False,
              on_commit: Optional[Callable[[], None]] = None, fit_config: bool = False) -> list:
        """Remove ``plan[group]`` channels from each group, as one transaction.

        With ``verify`` the pruned model is audited. Groups whose pruning breaks it are found
        (those the audit blames, or else by bisecting the plan in trials), blocked with the
        reason (kind :attr:`BlockKind.AUDIT`), and the rest of the plan is applied without
        them. The model ends unpruned only when every group fails. Without ``verify``, groups
        whose sizes only the audit can confirm (``Group.assumptions``) are blocked, not pruned.

        Parameters
        ----------
        plan : mapping of Group to sequence of int
            The channels (``0 <= i < group.size``) to remove from each group of :attr:`report`.
        verify : bool, default True
            Audit the pruned model's shapes.
        strict : bool, default False
            Restore the model and raise :class:`PruningError` when a group fails, instead of
            blocking it and pruning the rest.
        on_commit : callable, optional
            Called at the point of no return (see :meth:`ChannelSurgery.prune_groups`).
        fit_config : bool, default False
            Block the groups whose pruning ``model.config`` cannot describe (kind
            :attr:`BlockKind.CONFIG`, see :meth:`_config_culprits`).

        Returns
        -------
        list of Group
            The groups blocked and left unpruned.

        Raises
        ------
        TypeError, ValueError
            Invalid channel indices (see :meth:`Group.prune`), a model changed since it was
            analysed, or ``fit_config`` without a ``model.config``.
        PruningError
            The surgery failed (the model is restored), or a group failed with ``strict``.
        """
        self.check_unchanged()
        if fit_config and not builds_from_config(self.model):
            raise ValueError(f"fit_config=True, but {type(self.model).__name__} has no config (model.config) to fit")
        blocked, plan = [], dict(plan)
        if not verify:
            blocked = [g for g in plan if g.assumptions]
            for group in blocked:
                group.blocked.append(Reason(BlockKind.FIXED_SIZE, f"{group.assumptions[0]} (verify=False: nothing checks it)"))
            plan = {g: index for g, index in plan.items() if not g.assumptions}
        while plan:
            found: list = []  # the config update, described while the pruned sizes are in place
            try:
                self.surgery.prune_groups(plan, verify=self._checks(verify, found, fit_config), on_commit=on_commit)
                self.analysis.fingerprint = fingerprint(self.model)  # this session's own change
                self._update_config(found)
                return blocked
            except PruningError as exc:
                cause = exc.__cause__
                if not exc.restored or not isinstance(cause, (AuditError, ConfigMismatch)):
                    raise  # not the pruned model's failure: no group is to blame
                if isinstance(cause, ConfigMismatch):
                    culprits, kind, prefix = self._config_culprits(plan, str(cause)), BlockKind.CONFIG, "model.config cannot describe it: "
                else:
                    culprits, kind, prefix = self._culprits(plan, cause), BlockKind.AUDIT, "shape audit: "
                    culprits.update(_same_code(plan, culprits))
                for group, why in culprits.items():
                    group.blocked.append(Reason(kind, prefix + why))
                if strict:
                    raise
                blocked += list(culprits)
                plan = {g: index for g, index in plan.items() if g not in culprits}
        return blocked

    def _checks(self, verify: bool, found: list, fit_config: bool) -> Optional[Callable[[np.ndarray, bool], None]]:
        """What runs on the pruned sizes before they are committed: the audit (with ``verify``),
        and for a model built from a config the config update, put in ``found`` (with
        ``fit_config``, a :class:`ConfigMismatch` where the config cannot describe them)."""
        describe = builds_from_config(self.model)
        if not (verify or describe):
            return None

        def check(removed: np.ndarray, filled: bool) -> None:
            if describe:  # first: it costs less than the audit
                found[:] = [describe_pruned(self.model)]
                if fit_config and found[0].problem is not None:
                    raise ConfigMismatch(found[0].problem)
            if verify:
                self._audit(removed, filled)

        return check

    def _config_culprits(self, plan: dict, why: str) -> dict:
        """``{group: why}`` for the groups of ``plan`` whose pruning ``model.config`` cannot
        describe: each class of repeated groups (:func:`repeated_groups`; pruned alike, as a
        config with one size per kind of layer needs) is tried alone, by its shapes; the whole
        plan when no class fails alone."""
        found = {}
        for repeated in repeated_groups(plan):
            problem = self.surgery.trial({g: plan[g] for g in repeated}, lambda removed: describe_pruned(self.model).problem,
                                         values=False)
            if problem is not None:
                found.update(dict.fromkeys(repeated, problem))
        return found or dict.fromkeys(plan, why)

    def _update_config(self, found: list) -> None:
        """Make ``model.config`` describe the pruned model, or warn why it cannot."""
        if not found:
            return
        update = found[0]
        if update.problem is None:
            with interrupts_deferred():
                update.apply(self.model)
            return
        warn_caller(f"model.config no longer describes the pruned {type(self.model).__name__}: {update.problem}; "
                    "graphprune.save_pretrained / graphprune.from_pretrained round-trip it, model.save_pretrained "
                    "would not (or prune with uniform=True and fit_config=True: only what the config can say)",
                    ConfigWarning)

    def _culprits(self, plan: dict, failure: AuditError) -> dict:
        """``{group: why}`` for the groups of ``plan`` behind the audit's ``failure``: those that
        rely on a size read at a line the failure passed through, or in the module where the
        pruned model fails; else those it blames; among
        those it suspects, or else among all, those whose pruning fails alone (bisection,
        :meth:`_failing`)."""
        at_site = {g: str(failure) for g in plan if any(a.site and a.site in failure.sites for a in g.assumptions)}
        if at_site:  # the sizes they rely on were read at a line the failure passed through
            return at_site
        runs_only = not failure.runs  # then a trial only asks whether the model runs
        inside = {g: plan[g] for g in plan if failure.module is not None and any(
            a.module == failure.module or a.module.startswith(failure.module + ".") for a in g.assumptions)}
        if inside:  # relying on sizes read in the module that fails: those of them that fail alone
            return self._failing(inside, str(failure), runs_only)
        blamed = {g: str(failure) for g in plan if np.isin(g.units, failure.suspects).any()}
        if blamed and not failure.precise:
            return self._failing({g: plan[g] for g in blamed}, str(failure), runs_only)
        return blamed or self._failing(plan, str(failure), runs_only)

    def _failing(self, plan: dict, why: str, runs_only: bool = False) -> dict:
        """The groups of ``plan`` (known to fail together, for ``why``) that fail on their own
        or, when no part fails alone, the whole plan; each with the reason of its failure. With
        ``runs_only`` (the pruned model did not run) a trial asks only whether it runs; where no
        part fails so, the audit is asked instead."""
        if len(plan) == 1:
            return {group: why for group in plan}
        groups = list(plan)
        found = {}
        for half in (groups[: len(groups) // 2], groups[len(groups) // 2 :]):
            sub = {g: plan[g] for g in half}
            failure = self._trial_failure(sub, runs_only)
            if failure is not None:
                found.update(self._failing(sub, failure, runs_only))
        if not found and runs_only:  # no part keeps it from running, yet together they fail: ask the audit
            return self._failing(plan, why)
        return found or {group: why for group in plan}

    def _trial_failure(self, plan: dict, runs_only: bool = False) -> Optional[str]:
        """Why ``plan`` fails the audit in a trial (None if it passes); the model is put back.
        With ``runs_only``, why the pruned model no longer runs (:func:`run_failure`)."""
        if runs_only:
            return self.surgery.trial(plan, lambda removed: run_failure(self.model, self.inputs))
        try:
            self.trial(plan, lambda model: None, verify=True)
        except AuditError as exc:
            return str(exc)
        return None

    def check_unchanged(self) -> None:
        """Check that the model is as this session analysed (or last pruned) it.

        Raises
        ------
        ValueError
            Modules, parameters or buffers were replaced, pruned elsewhere or moved.
        """
        if fingerprint(self.model) != self.analysis.fingerprint:
            raise ValueError(
                f"{self.report.model_name} changed since it was analysed (modules, parameters or buffers were "
                "replaced, pruned or moved); analyze it again"
            )

    def trial(self, plan: Mapping[Group, Sequence[int]], measure: Callable[[nn.Module], T], *, verify: bool = False) -> T:
        """Measure the model with ``plan`` applied, then put it back as it was.

        The model is restored whatever happens, ``KeyboardInterrupt`` included.

        Parameters
        ----------
        plan : mapping of Group to sequence of int
            The channels to remove from each group, as for :meth:`apply`.
        measure : callable
            ``measure(model)``, called on the pruned model.
        verify : bool, default False
            Audit the pruned model first.

        Returns
        -------
        object
            What ``measure`` returned.

        Raises
        ------
        AuditError
            With ``verify``, the pruned model fails the audit; the message says why.
        ValueError
            The model changed since it was analysed.
        """

        def run(removed: np.ndarray) -> T:
            if verify:
                self._audit(removed, True)
            return measure(self.model)

        self.check_unchanged()
        return self.surgery.trial(plan, run)

    def _audit(self, removed: np.ndarray, filled: bool) -> None:
        a = self.analysis
        audit(a.model, a.inputs, traced_leaves(a.options.leaf_modules), a.state, a.roots, removed, filled, capture=a.front_end)


def _same_code(plan: dict, culprits: dict) -> dict:
    """``{group: why}`` for the groups of ``plan`` outside ``culprits`` with an assumption made
    at the same source line as a culprit's (see :class:`~.analysis.reasons.Assumption`): the same code, run by
    other modules, which would fail the audit alike, each found with one more capture."""
    sites = {a.site: g for g in culprits for a in g.assumptions if a.site}
    found = {}
    for group in plan:
        site = next((a.site for a in group.assumptions if a.site in sites), None)
        if group not in culprits and site is not None:
            found[group] = f"the size it relies on at {site} failed the audit in group {sites[site].id}"
    return found


def session_of(report: Any, model: nn.Module, example_inputs: Any, inplace: bool, *analysis_options: Any,
               capture: str = "auto") -> PruningSession:
    """The session behind ``report`` (from :func:`graphprune.analyze`), checked to still describe
    ``model``; ``capture`` other than ``"auto"`` must be the report's."""
    check_capture(capture)
    if not isinstance(report, Report):
        raise TypeError(f"report must be a Report from graphprune.analyze, got {type(report).__name__}")
    session = getattr(report, "session", None)
    if not isinstance(session, PruningSession):
        raise ValueError("this report was not made by graphprune.analyze; pass the one analyze() returned")
    if session.model is not model:
        raise ValueError(f"the report describes another {report.model_name} object than the model given")
    if not inplace:
        raise ValueError("a report prunes the analysed model itself; with inplace=False, deep-copy the model and analyze the copy")
    if not all(option is False or (isinstance(option, (tuple, list, set)) and not option) for option in analysis_options):
        raise ValueError("leaf_modules, ignored_layers and prune_heads were fixed by analyze(); pass them there, not with report")
    if capture not in ("auto", session.analysis.options.capture):
        raise ValueError(f"the report was made with capture={session.analysis.options.capture!r}, not {capture!r}; "
                         "pass capture to analyze(), not with report")
    session.check_unchanged()
    if session.surgery.pruned:
        raise ValueError(f"{report.model_name} changed since it was analysed: this report's groups were pruned "
                         "already; analyze it again")
    if example_inputs is not None and tracer.describe(example_inputs) != tracer.describe(session.inputs):
        raise ValueError(
            f"example_inputs differ from the ones the report was made with ({report.input_description}); "
            "leave them out or analyze again"
        )
    return session
