"""Before / after comparison of a pruned model: :func:`report` -> :class:`Comparison`.

>>> pruned = graphprune.prune(model, 0.5, x, inplace=False)      # doctest: +SKIP
>>> print(graphprune.report(model, pruned, x))                   # a table
>>> graphprune.report(model, pruned, x, latency=False).to_json()  # for scripts
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from graphprune.analysis.analyzer import describe_inputs
from graphprune.analysis.inputs import resolve_example_inputs
from graphprune.api import analyze
from graphprune.validation import check_bool, check_int, check_model

from graphprune.reporting.measure import SPREAD_LIMIT, compare_latency, count_flops, count_parameters, measure_latency
from graphprune.reporting.tables import text_table

__all__ = ["report", "Comparison", "group_widths"]


def _ratio(after: Optional[float], before: Optional[float]) -> Optional[float]:
    if after is None or before is None or before == 0:
        return None
    return after / before


@dataclass
class Comparison:
    """Size and speed of a model before and after pruning (see :func:`report`).

    ``parameters``, ``flops`` and ``latency`` are ``(before, after)`` pairs (``latency`` in
    seconds, None when not measured); ``ratio(metric)`` is after / before; ``groups`` has one
    dict per channel group of the *before* model: ``group``, ``root``, ``status``
    (``prunable`` / ``blocked``), ``before`` and ``after`` channel counts (``after`` None when
    the pruned model's shapes do not tell) and ``kept`` (after / before).
    """

    model_name: str
    input_description: str
    parameters: tuple
    flops: tuple
    latency: Optional[tuple] = None
    groups: list = field(default_factory=list)
    latency_spread: Optional[tuple] = None  # interquartile range over the median, per model (interleaved rounds)

    def ratio(self, metric: str) -> Optional[float]:
        """Give after / before for one metric.

        Parameters
        ----------
        metric : {"parameters", "flops", "latency"}

        Returns
        -------
        float or None
            None when the metric was not measured or its value before is 0.

        Raises
        ------
        ValueError
            ``metric`` is none of the three.
        """
        if metric not in ("parameters", "flops", "latency"):
            raise ValueError(f"metric must be 'parameters', 'flops' or 'latency', got {metric!r}")
        pair = getattr(self, metric)
        return None if pair is None else _ratio(pair[1], pair[0])

    @property
    def speedup(self) -> Optional[float]:
        """Latency before / after (> 1 when the pruned model is faster); None without latency."""
        ratio = self.ratio("latency")
        return None if not ratio else 1.0 / ratio

    def to_dict(self) -> dict:
        """Convert the comparison to plain data.

        Returns
        -------
        dict
            ``model``, ``input``, ``parameters`` / ``flops`` / ``latency`` (each ``{before,
            after, ratio}`` or None), ``speedup``, ``latency_spread`` and ``groups``.
        """
        out = {"model": self.model_name, "input": self.input_description}
        for metric in ("parameters", "flops", "latency"):
            pair = getattr(self, metric)
            out[metric] = None if pair is None else {"before": pair[0], "after": pair[1], "ratio": self.ratio(metric)}
        out["speedup"] = self.speedup
        out["latency_spread"] = None if self.latency_spread is None else list(self.latency_spread)
        out["groups"] = [dict(row) for row in self.groups]
        return out

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Serialise :meth:`to_dict` as JSON.

        Parameters
        ----------
        indent : int or None, default 2
            As for :func:`json.dumps`.

        Returns
        -------
        str
            The JSON text.
        """
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        rows = [("parameters", *self.parameters), ("FLOPs", *self.flops)]

        def number(value: float) -> str:
            return f"{value:,.0f}"

        lines = [(name, number(b), number(a), _fmt_ratio(_ratio(a, b))) for name, b, a in rows]
        if self.latency is not None:
            b, a = self.latency
            lines.append(("latency (ms)", f"{1e3 * b:.3f}", f"{1e3 * a:.3f}", _fmt_ratio(_ratio(a, b))))
        header = ("metric", "before", "after", "after/before")
        table = text_table(header, lines, right=(1, 2, 3))
        title = f"graphprune comparison of {self.model_name} (input: {self.input_description})"
        parts = [title, table]
        if self.speedup is not None:
            spread = "" if self.latency_spread is None else f" (times spread ±{50 * max(self.latency_spread):.0f}%)"
            parts.append(f"speed-up: {self.speedup:.2f}x{spread}")
            if self.latency_spread is not None and max(self.latency_spread) > SPREAD_LIMIT:
                parts.append("WARNING: the times spread too widely to trust this speed-up: the machine was busy; "
                             "close other programs or time more rounds")
        if self.groups:
            group_lines = [
                (str(r["group"]), r["root"], r["status"], str(r["before"]),
                 "?" if r["after"] is None else str(r["after"]), _fmt_ratio(r["kept"]))
                for r in self.groups
            ]
            parts += ["", "channel groups (of the model before pruning):",
                      text_table(("id", "root layer", "status", "before", "after", "kept"), group_lines, right=(0, 3, 4, 5))]
        return "\n".join(parts)


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def group_widths(groups: list, model_after: nn.Module) -> dict:
    """``{group id: channels left}`` read off ``model_after``'s parameter shapes, for groups
    of an analysis of the unpruned model; None when no member tells, or members disagree.

    A member contributes when its module and parameter still exist in ``model_after`` and
    each of its channels owns the same number of positions along its dim (e.g. 49 after a
    flatten of 7x7 maps): the channels left are ``shape[dim] / positions per channel``.
    """
    modules = dict(model_after.named_modules())
    widths = {}
    for group in groups:
        found = set()
        for member in group.members:
            module = modules.get(member.module)
            tensor = getattr(module, member.param, None) if module is not None else None
            if not isinstance(tensor, torch.Tensor) or tensor.dim() <= member.dim:
                continue
            counts = np.bincount(np.asarray(member.index_map, dtype=np.int64), minlength=group.size)
            if counts.size == 0 or not (counts == counts[0]).all() or counts[0] == 0:
                continue
            positions = tensor.shape[member.dim]
            if positions % int(counts[0]):
                continue
            found.add(positions // int(counts[0]))
        widths[group.id] = found.pop() if len(found) == 1 else None
    return widths


def report(
    model_before: nn.Module,
    model_after: nn.Module,
    example_inputs: Any = None,
    *,
    latency: bool = True,
    repeats: int = 20,
    warmup: int = 3,
    device: Union[str, torch.device, None] = None,
    groups: bool = True,
    progress: bool = False,
) -> Comparison:
    """Compare ``model_before`` with its pruned ``model_after`` on ``example_inputs``.

    Parameters (:func:`~graphprune.count_parameters`), FLOPs (:func:`~graphprune.count_flops`)
    and, with ``latency=True``, the median latency of both models. Neither model is modified.

    Parameters
    ----------
    model_before, model_after : nn.Module
        The original and the pruned model (``model_after`` may be TorchScript, and
        ``model_before`` too with ``groups=False``).
    example_inputs : tensor, tuple or dict, optional
        As in :func:`graphprune.analyze` (inferred from ``model_before`` when omitted).
    latency : bool, default True
        Time both models.
    repeats, warmup : int, default 20 and 3
        Timed rounds (at least 4 are run without ``device``) and untimed ones before them.
    device : str or torch.device, optional
        Move each model there and time them one after the other
        (:func:`~graphprune.measure_latency`); by default they are timed on their devices in
        interleaved rounds (:func:`~graphprune.reporting.measure.compare_latency`), and
        ``latency_spread`` says how far to trust it.
    groups : bool, default True
        Analyse ``model_before``; list each group's channels before and after (:func:`group_widths`).
    progress : bool, default False
        Show a progress bar over the interleaved rounds.

    Returns
    -------
    Comparison
        Parameters, FLOPs and latency before and after, and the groups' widths.

    Raises
    ------
    TypeError
        A model is not an ``nn.Module``, ``latency`` / ``groups`` is not a bool, or
        ``repeats`` / ``warmup`` not an integer.
    ValueError
        ``example_inputs`` cannot be inferred, ``repeats`` is below 1 or ``warmup`` below 0.
    """
    check_model(model_before, "model_before", allow_torchscript=groups is not True)  # analysed only with groups
    check_model(model_after, "model_after", allow_torchscript=True)  # only measured
    check_bool(latency, "latency"), check_bool(groups, "groups")
    repeats, warmup = check_int(repeats, "repeats", 1), check_int(warmup, "warmup", 0)
    inputs, _ = resolve_example_inputs(model_before, example_inputs)
    parameters = (count_parameters(model_before), count_parameters(model_after))
    flops = (count_flops(model_before, inputs), count_flops(model_after, inputs))
    timing = spread = None
    if latency and device is None:  # on their devices: interleaved rounds, so that load falls on both alike
        measured = compare_latency([model_before, model_after], inputs, rounds=max(repeats, 4), warmup=warmup,
                                   progress=progress)
        timing, spread = measured.medians, measured.spreads
    elif latency:
        timing = tuple(
            measure_latency(m, inputs, repeats=repeats, warmup=warmup, device=device) for m in (model_before, model_after)
        )
    rows = []
    if groups:
        analysis = analyze(model_before, inputs)
        widths = group_widths(analysis.groups, model_after)
        for group in analysis.groups:
            after = widths[group.id]
            rows.append({
                "group": group.id, "root": group.root, "status": "prunable" if group.prunable else "blocked",
                "before": group.size, "after": after, "kept": _ratio(after, group.size),
            })
    return Comparison(type(model_before).__name__, describe_inputs(inputs), parameters, flops, timing, rows, spread)
