"""Propagate channel identity through the traced graph: apply each node's rule in execution
order (the rules are in :mod:`graphprune.analysis.rules`, their shared state in
:mod:`graphprune.analysis.propagation`)."""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch.fx as fx

from .propagation import Propagation
from .reasons import BlockKind, Reason
from .rules import rule_for


def propagate(graph: nx.DiGraph, prune_heads: bool = False) -> Propagation:
    """Apply the rule of every node in execution order.

    With ``prune_heads``, a reshape that splits a channel dim carries the ids on its
    second-innermost axis (the heads of ``(…, heads, head_dim)``) instead of the innermost.
    """
    state = Propagation(graph, prune_heads)
    for name, attrs in sorted(graph.nodes(data=True), key=lambda item: item[1]["index"]):
        state.part = attrs["part"]
        rule, why = rule_for(state, attrs)
        state.labels[name] = rule(state, attrs["fx"]) if why is None else _block_unknown(state, attrs, why)
        stored_as = attrs["fx"].meta.get("stored_as")
        if stored_as is not None:  # a second output, kept on a module for later
            state.block(state.labels[name], Reason(BlockKind.MODEL_OUTPUT,
                                                   f"stored on {stored_as} by forward (an output outside the graph)"))
    return state


def _block_unknown(state: Propagation, attrs: dict, why: Reason) -> Any:
    node: fx.Node = attrs["fx"]
    for source in node.all_input_nodes:
        state.block(state.labels_of(source), why)
    return state.fresh(attrs["value"], f"{node.name} (opaque)", why)
