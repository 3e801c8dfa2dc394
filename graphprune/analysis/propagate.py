"""Propagate channel identity through the traced graph: apply each node's rule in execution
order (the rules are in :mod:`graphprune.analysis.rules`, their shared state in
:mod:`graphprune.analysis.propagation`)."""
from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np
import torch.fx as fx
from torch.nn.utils import parametrize

from .propagation import Propagation, SizeConstraint
from .reasons import BlockKind, Reason
from .rules import rule_for


def propagate(graph: nx.DiGraph, prune_heads: bool = False) -> Propagation:
    """Apply the rule of every node in execution order.

    With ``prune_heads``, a reshape that splits a channel dim carries the ids on its
    second-innermost axis (the heads of ``(…, heads, head_dim)``) instead of the innermost.
    """
    with parametrize.cached():  # a parametrized weight is one tensor throughout (see Propagation._computed_ids)
        state = Propagation(graph, prune_heads)
        for name, attrs in sorted(graph.nodes(data=True), key=lambda item: item[1]["index"]):
            state.part = attrs["part"]
            rule, why = rule_for(state, attrs)
            state.labels[name] = _apply(state, rule, attrs) if why is None else _block_unknown(state, attrs, why)
            stored_as = attrs["fx"].meta.get("stored_as")
            if stored_as is not None:  # a second output, kept on a module for later
                state.block(state.labels[name], Reason(BlockKind.MODEL_OUTPUT,
                                                       f"stored on {stored_as} by forward (an output outside the graph)"))
    share_attributes(state)
    note_computed_scales(state)
    enforce_sizes(state)
    return state


def share_attributes(state: Propagation) -> None:
    """Tie together the dims that follow one module attribute: the attribute holds one value
    (a ``head_dim`` that sizes the views of q, k and v alike), so each must keep the same count.
    Dims of equal length are tied position by position (they then prune together); dims of
    different lengths cannot keep one count for any pruning, and block."""
    by_attribute: dict = {}
    for member in state.attr_members:
        by_attribute.setdefault((member.module, member.attr), []).append(member.ids)
    for (module, attr), arrays in by_attribute.items():
        first = arrays[0]
        for ids in arrays[1:]:
            if ids.size == first.size and (ids >= 0).all() and (first >= 0).all():
                state.unify(first, ids)
            else:
                state.block((first, ids), Reason(BlockKind.FIXED_SIZE, f"{module}.{attr} sizes dims that cannot keep "
                                                 "one count (of different lengths)"))


def note_computed_scales(state: Propagation) -> None:
    """A number in the graph equal to ``sqrt(n)`` or ``1 / sqrt(n)``, where ``n`` is the value of
    an attribute a rule follows, and held by no float attribute of the model, was computed from
    that attribute in the forward (``scores / math.sqrt(self.head_dim)``): it changes with the
    pruning, so the dims that follow the attribute prune approximately (a note). A scale set
    once (``self.scaling = head_dim ** -0.5`` in ``__init__``) stays, and the pruning is exact."""
    followed: dict = {}
    for member in state.attr_members:
        value = getattr(state.module(member.module), member.attr, None)
        if type(value) is int and value > 1:
            followed.setdefault(value, []).append(member)
    held = {v for m in state.model.modules() for v in vars(m).values() if type(v) is float}
    for _, attrs in state.graph.nodes(data=True):
        numbers = (a for a in (*attrs["fx"].args, *attrs["fx"].kwargs.values()) if type(a) is float and a not in held)
        for number in numbers:
            for value, members in followed.items():
                if any(math.isclose(number, r, rel_tol=1e-6) for r in (value**0.5, value**-0.5)):
                    for member in members:
                        attribute = f"{member.module}.{member.attr}".lstrip(".")
                        state.note(member.ids, f"{attrs['fx'].name} scales by {number:g}, computed from "
                                               f"{attribute} = {value} in forward")


def enforce_sizes(state: Propagation) -> None:
    """Make every :class:`SizeConstraint` hold for any pruning: a size read off a tensor's dim
    must shrink as that dim does. A constraint holds when every channel unit has ``divisor``
    times as many positions in the source as in the dim; one that does not is made to by
    tying dim position ``p`` to source positions ``p, p + n, …`` (the two then prune
    together), and one that still does not, blocks both."""
    pending = list(state.size_constraints)
    for attempt in range(2):
        roots = state.space.all_roots()
        failing = [c for c in pending if not _holds(roots, c)]
        for c in failing:
            if attempt == 0:
                state.unify(c.source.reshape(c.divisor, c.ids.size), np.broadcast_to(c.ids, (c.divisor, c.ids.size)))
            else:
                state.block((c.ids, c.source), Reason(BlockKind.RESHAPE, f"{c.node}: a size read off another tensor's "
                                                      "shape cannot follow the pruning"))
        pending = failing
        if not pending:
            return


def _holds(roots: np.ndarray, c: SizeConstraint) -> bool:
    """Whether every unit has ``divisor`` times as many positions in the source as in the dim."""
    if (c.ids < 0).any() or (c.source < 0).any():
        return False
    units, counts = np.unique(roots[c.ids], return_counts=True)
    source_units, source_counts = np.unique(roots[c.source], return_counts=True)
    return np.array_equal(units, source_units) and np.array_equal(counts * c.divisor, source_counts)


def _apply(state: Propagation, rule, attrs: dict) -> Any:
    """The rule's output labels; a rule that fails on this node (an input it was not written
    for) takes back what it recorded and blocks what the op touches, the exception in the
    reason: analysis never raises for one op it cannot read."""
    mark = state.checkpoint()
    try:
        return rule(state, attrs["fx"])
    except Exception as exc:  # noqa: BLE001 - any failure of a rule is a block, never an escape
        state.rollback(mark)
        message = f"{exc}".splitlines()[0][:200] if f"{exc}" else ""
        why = Reason(BlockKind.NO_RULE, f"the rule for {attrs['target_name']} ('{attrs['fx'].name}') failed: "
                                        f"{type(exc).__name__}: {message}")
        return _block_unknown(state, attrs, why)


def _block_unknown(state: Propagation, attrs: dict, why: Reason) -> Any:
    node: fx.Node = attrs["fx"]
    for source in node.all_input_nodes:
        state.block(state.labels_of(source), why)
    return state.fresh(attrs["value"], f"{node.name} (opaque)", why)
