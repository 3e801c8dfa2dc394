"""Per-group pruning sensitivity: how much does the model suffer when one group is pruned?

:func:`sensitivity` prunes every prunable group *alone*, at each of several ratios, in a
trial of a :class:`~graphprune.session.PruningSession` (the model is put back after each)
and records ``eval_fn(model)`` and its drop from the unpruned baseline. The channels removed are exactly those that ``graphprune.prune`` removes from
that group at that ratio with the same criterion (same scores, same plan, same shape
audit), so :meth:`SensitivityResult.ratios_for` can turn the measurements into a
per-layer ratio mapping for :func:`graphprune.prune`::

    result = graphprune.sensitivity(model, x, lambda m: graphprune.evaluate(m, test_loader))
    result.plot("/tmp/sensitivity.png")
    graphprune.prune(model, result.ratios_for(max_drop=0.01), x)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from graphprune import tracer
from graphprune.analysis.groups import Group
from graphprune.criteria import Criterion, get_criterion
from graphprune.pruning.audit import AuditError
from graphprune.pruning.planner import plan_removal, score_groups
from graphprune.reporting.tables import text_table
from graphprune.session import PruningSession
from graphprune.tracer.state import eval_mode
from graphprune.validation import check_bool, check_fraction, check_model

__all__ = ["sensitivity", "SensitivityResult", "group_keys"]


def group_keys(groups: Sequence[Group]) -> dict:
    """``{group id: module name}``: for every prunable group, the first of its producer layers
    (:meth:`Group.producer_layers`) that belongs to no other prunable group.

    A ratio mapping ``{key: r}`` built from these names gives each group exactly its own
    ratio in :func:`graphprune.prune` (blocked groups are never pruned, so sharing a name with
    one is harmless). Groups whose every layer is shared have no key.
    """
    prunable = [g for g in groups if g.prunable]
    owners: dict = {}
    for group in prunable:
        for name in group.producer_layers():
            owners.setdefault(name, set()).add(group.id)
    keys = {}
    for group in prunable:
        own = [n for n in group.producer_layers() if n and owners[n] == {group.id}]
        if own:
            keys[group.id] = own[0]
    return keys


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass
class SensitivityResult:
    """What :func:`sensitivity` measured.

    ``baseline`` is ``eval_fn`` on the unpruned model; ``ratios`` the ratios tried; ``table``
    one row (a dict) per group and ratio: ``group`` (id), ``key`` (the module name that
    addresses the group in a ratio mapping, or None), ``root``, ``layers`` (its producer
    layers), ``channels``, ``ratio``, ``removed`` (channels removed; ``floor(ratio *
    channels)`` unless the planner spares a member's last channel), ``metric``
    (``eval_fn`` on the pruned copy), ``drop`` (``baseline - metric``: positive when the
    metric gets worse, for an ``eval_fn`` where higher is better) and ``note`` (why a row
    has no metric, e.g. the shape audit rejected the pruned copy).
    """

    baseline: float
    ratios: tuple
    table: list = field(default_factory=list)
    criterion: str = "l1"
    model_name: str = ""

    @property
    def groups(self) -> list:
        """Ids of the groups measured, in order."""
        return list(dict.fromkeys(row["group"] for row in self.table))

    def rows_of(self, group: int) -> list:
        """Select the rows of one group.

        Parameters
        ----------
        group : int
            A group id.

        Returns
        -------
        list of dict
            Its rows of :attr:`table`, one per ratio.
        """
        return [row for row in self.table if row["group"] == group]

    def ratios_for(self, max_drop: float, *, conservative: bool = False) -> dict:
        """Turn the measurements into a per-layer ratio mapping for :func:`graphprune.prune`.

        Keys are :func:`group_keys` names, so each group gets exactly its own ratio when the
        mapping is passed to ``prune`` for the model that was measured (same architecture,
        unpruned), e.g. ``prune(model, result.ratios_for(0.01), x, criterion=<the same>)``.

        Parameters
        ----------
        max_drop : float
            The largest drop allowed (in ``eval_fn``'s units).
        conservative : bool, default False
            Stop at the first ratio (in increasing order) whose drop exceeds ``max_drop``, so
            that noise at one large ratio cannot allow it.

        Returns
        -------
        dict
            ``{module name: ratio}``: for every measured group with a key, the largest ratio
            whose drop is at most ``max_drop`` (0.0 when none is).

        Raises
        ------
        TypeError
            ``max_drop`` is not a real number (NaN included).
        """
        if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or math.isnan(max_drop):
            raise TypeError(f"max_drop must be a real number, got {max_drop!r}")
        mapping = {}
        for group in self.groups:
            rows = sorted(self.rows_of(group), key=lambda row: row["ratio"])
            if rows[0]["key"] is None:
                continue
            best = 0.0
            for row in rows:
                ok = row["drop"] is not None and row["drop"] <= max_drop
                if ok:
                    best = row["ratio"]
                elif conservative:
                    break
            mapping[rows[0]["key"]] = best
        return mapping

    def __str__(self) -> str:
        header = ["group", "key", "channels"] + [f"r={r:g}" for r in self.ratios]
        lines = []
        for group in self.groups:
            rows = {row["ratio"]: row for row in self.rows_of(group)}
            first = next(iter(rows.values()))
            cells = [str(group), str(first["key"] or first["root"]), str(first["channels"])]
            cells += [_fmt(rows[r]["drop"]) if r in rows else "" for r in self.ratios]
            lines.append(cells)
        title = (
            f"sensitivity of {self.model_name or 'the model'} ({self.criterion}): baseline {self.baseline:.4g}; "
            "drop (baseline - metric) per group and ratio"
        )
        return title + "\n" + text_table(header, lines, right=[i for i in range(len(header)) if i != 1])

    def plot(self, path: str, *, metric: str = "metric", title: Optional[str] = None, dpi: int = 120) -> str:
        """Write a PNG with one curve per group against the ratio, the baseline dashed.

        Uses matplotlib's Agg canvas (no display needed, the global backend is left alone).

        Parameters
        ----------
        path : str
            The image file to write.
        metric : {"metric", "drop"}, default "metric"
            What the curves show: ``eval_fn``'s value or its drop.
        title : str, optional
            The plot's title (default: the model, "per group" and the criterion).
        dpi : int, default 120
            The image's resolution.

        Returns
        -------
        str
            ``path``.

        Raises
        ------
        ValueError
            ``metric`` is neither name.
        ImportError
            matplotlib is not installed.
        """
        if metric not in ("metric", "drop"):
            raise ValueError(f"metric must be 'metric' or 'drop', got {metric!r}")
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("SensitivityResult.plot needs matplotlib: pip install matplotlib") from exc
        groups = self.groups
        figure = Figure(figsize=(8, 5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        colours = _colours(len(groups))
        markers = "os^Dv<>p"
        for i, (colour, group) in enumerate(zip(colours, groups)):
            rows = sorted((r for r in self.rows_of(group) if r[metric] is not None), key=lambda r: r["ratio"])
            first = self.rows_of(group)[0]
            xs = [0.0] + [r["ratio"] for r in rows]
            ys = [self.baseline if metric == "metric" else 0.0] + [r[metric] for r in rows]
            label = f"{group}: {first['key'] or first['root']} ({first['channels']})"
            axes.plot(xs, ys, marker=markers[i % len(markers)], markersize=4, linewidth=1.2, color=colour, label=label)
        axes.axhline(self.baseline if metric == "metric" else 0.0, color="black", linestyle="--", linewidth=1,
                     label=f"baseline {self.baseline:.4g}" if metric == "metric" else "no drop")
        axes.set_xlabel("ratio of the group's channels removed")
        axes.set_ylabel("eval_fn" if metric == "metric" else "drop (baseline - eval_fn)")
        axes.set_title(title or f"Sensitivity of {self.model_name or 'the model'} per group ({self.criterion})")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="group: key (channels)",
                    title_fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=dpi)
        return path

    def to_dict(self) -> dict:
        """Convert the result to plain data (tuples become lists).

        Returns
        -------
        dict
            ``model``, ``criterion``, ``baseline``, ``ratios`` and ``table``.
        """
        table = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()} for row in self.table]
        return {"model": self.model_name, "criterion": self.criterion, "baseline": self.baseline,
                "ratios": list(self.ratios), "table": table}


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _select(report_groups: list, groups: Any) -> list:
    prunable = [g for g in report_groups if g.prunable]
    if groups is None:
        return prunable
    if isinstance(groups, (int, str, Group)):
        groups = [groups]
    chosen, unknown = [], []
    by_id = {g.id: g for g in report_groups}
    for item in groups:
        if isinstance(item, Group):
            item = item.id
        if isinstance(item, bool) or not isinstance(item, (numbers.Integral, str)):
            raise TypeError(f"groups entries must be group ids or module names / globs, got {type(item).__name__}")
        if isinstance(item, numbers.Integral):
            if int(item) not in by_id:
                unknown.append(item)
                continue
            group = by_id[int(item)]
            if not group.prunable:
                raise ValueError(f"group {group.id} ({group.root}) is not prunable: {group.status}")
            matched = [group]
        else:
            matched = [g for g in prunable if g.lookup({item: True}, False)]
            if not matched:
                unknown.append(item)
        chosen.extend(g for g in matched if g not in chosen)
    if unknown:
        raise ValueError(f"groups has entries that name no prunable group: {unknown}")
    return sorted(chosen, key=lambda g: g.id)


def _check_ratios(ratios: Any) -> tuple:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise TypeError(f"ratios must be a sequence of floats in (0, 1), got {type(ratios).__name__}")
    checked = [check_fraction(value, "every ratio", low_open=True) for value in ratios]
    if not checked:
        raise ValueError("ratios is empty")
    return tuple(sorted(set(checked)))


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: Callable[[nn.Module], float],
    ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7),
    *,
    groups: Optional[Iterable[Union[int, str, Group]]] = None,
    criterion: Union[str, Criterion] = "l1",
    progress: bool = True,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    verify: bool = True,
) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and evaluate the model so pruned.

    Each pruning runs in a trial that puts the model back afterwards, whatever happens.
    Channels are ranked once by ``criterion``, and the channels that ``graphprune.prune``
    would remove from the group at that ratio
    (:func:`~graphprune.pruning.planner.plan_removal`, sparing each member's best channel)
    are removed, with the same shape audit as ``prune``. A ratio too small to remove any
    channel records the baseline without evaluating.

    Parameters
    ----------
    model : nn.Module
        The model to measure; it is put back after every trial.
    example_inputs, leaf_modules
        As in :func:`graphprune.analyze`.
    eval_fn : callable
        ``eval_fn(model) -> float``, higher is better (e.g. accuracy); called once for the
        baseline and once per (group, ratio). It must not change the model itself.
    ratios : sequence of float, default (0.1, 0.3, 0.5, 0.7)
        The ratios to try, each in (0, 1); sorted, repeats dropped.
    groups : iterable of int, str or Group, optional
        Only these groups: ids, :class:`Group` s or module names / globs matched against
        their producer layers. By default every prunable group.
    criterion : str or Criterion, default "l1"
        A name or an instance (one that needs data cannot be named; pass an instance,
        prepared once).
    progress : bool, default True
        Show a progress bar.
    verify : bool, default True
        Audit each pruned model's shapes; a row the audit rejects has no metric.

    Returns
    -------
    SensitivityResult
        The baseline and one row per group and ratio.

    Raises
    ------
    TypeError, ValueError
        An invalid argument, a group that is not prunable or not found, an ``eval_fn``
        that returns no real number, or as :func:`graphprune.analyze`.
    """
    check_model(model)
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable(model) -> float, got {type(eval_fn).__name__}")
    ratios = _check_ratios(ratios)
    criterion = get_criterion(criterion)
    check_bool(progress, "progress"), check_bool(verify, "verify")
    with eval_mode(model):
        session = PruningSession(model, example_inputs, leaf_modules=leaf_modules)
        selected = _select(session.report.groups, groups)
        criterion.prepare(model, session.report)
        scores = score_groups(selected, criterion)
    result = SensitivityResult(_score(eval_fn, model, "the unpruned model"), ratios,
                               criterion=getattr(criterion, "name", repr(criterion)), model_name=type(model).__name__)
    keys = group_keys(session.report.groups)
    with tqdm(total=len(selected) * len(ratios), desc="sensitivity", unit="prune", disable=not progress, leave=False) as bar:
        for group in selected:
            for ratio in ratios:
                row = {"group": group.id, "key": keys.get(group.id), "root": group.root, "layers": group.producer_layers(),
                       "channels": group.size, "ratio": ratio, "removed": 0, "metric": result.baseline, "drop": 0.0, "note": ""}
                indices = plan_removal([group], ratio, scores={group: scores[group]}).get(group)
                row.update(_measure(session, group, indices, ratio, eval_fn, verify, result.baseline))
                result.table.append(row)
                bar.update(1)
    return result


def _score(eval_fn: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    value = eval_fn(model)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise TypeError(f"eval_fn must return a real number, got {value!r} for {what}")
    return float(value) + 0.0  # -0.0 -> 0.0


def _measure(session: PruningSession, group: Group, indices, ratio: float, eval_fn, verify: bool, baseline: float) -> dict:
    """The row's measurement of ``group`` pruned by ``indices``, in a trial."""
    if indices is None or not len(indices):
        return {"note": "no channel removed at this ratio"}
    what = f"group {group.id} at ratio {ratio:g}"
    try:
        metric = session.trial({group: np.asarray(indices)}, lambda m: _score(eval_fn, m, what), verify=verify)
    except AuditError as exc:  # this pruning would not run: nothing to measure
        return {"metric": None, "drop": None, "note": f"shape audit: {exc}"}
    return {"removed": int(len(indices)), "metric": metric, "drop": baseline - metric}
