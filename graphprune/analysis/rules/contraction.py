"""Rules for products that contract a dimension: matmul / bmm, addmm, baddbmm, einsum, outer and
scaled dot-product attention.

A contracted dimension must shrink on both operands together, so its two label arrays are
unified; a dead channel contributes nothing to the sum, so removing it is exact.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch.fx as fx

from graphprune.analysis.channels import NO_ID

from ..propagation import Propagation
from ..reasons import BlockKind, Reason


def _broadcast_batch(state: Propagation, *batches: tuple) -> tuple:
    """Unify right-aligned batch dims of equal size; a size-1 dim couples nothing."""
    width = max(len(b) for b in batches)
    out = []
    for d in range(width):
        present = [b[len(b) - width + d] for b in batches if len(b) - width + d >= 0]
        sized = [ids for ids in present if ids.size > 1]
        for other in sized[1:]:
            state.unify(sized[0], other)
        out.append(sized[0] if sized else np.array([NO_ID]))
    return tuple(out)


def _product(state: Propagation, node: fx.Node, first: int) -> tuple:
    """The labels of ``node.args[first] @ node.args[first + 1]``."""
    a, b = state.labels_of(node.args[first]), state.labels_of(node.args[first + 1])
    if len(a) < 2 or len(b) < 2:
        reason = Reason(BlockKind.NO_RULE, f"{node.name}: matmul with a 1-D operand")
        state.block((a, b), reason)
        return state.fresh(state.value(node), node.name, reason)
    state.unify(a[-1], b[-2])
    return _broadcast_batch(state, a[:-2], b[:-2]) + (a[-2], b[-1])


def matmul(state: Propagation, node: fx.Node):
    return _product(state, node, 0)


def baddbmm(state: Propagation, node: fx.Node):
    """``torch.baddbmm(input, b1, b2)`` is ``beta * input + alpha * (b1 @ b2)``: the product,
    broadcast with ``input`` (BLOOM's ALiBi bias added to the attention scores)."""
    product = _product(state, node, 1)
    return _broadcast_batch(state, state.labels_of(node.args[0]), product)


def addmm(state: Propagation, node: fx.Node):
    """``torch.addmm(bias, x, w)`` is ``bias + x @ w`` (GPT-2's ``Conv1D`` keeps its weight as
    ``(in, out)``): ``w``'s rows take ``x``'s channels, its columns and the bias are the output's."""
    bias, x, w = node.args[:3]
    x_ids = state.labels_of(x)
    state.bind(x_ids[-1], w, 0, "in")
    out_ids = state.tensor_ids(w, 1, "out")
    state.bind(out_ids, bias, len(state.shape_of(bias)) - 1, "out")
    return (x_ids[0], out_ids)


def scaled_dot_product_attention(state: Propagation, node: fx.Node):
    """Queries and keys share the contracted width; the output has the values' width; an
    ``attn_mask`` broadcasts with the scores. The default scale is 1/sqrt(width), so pruning
    that width is approximate."""
    q, k, v = (state.labels_of(node.args[i]) for i in range(3))
    state.unify(q[-1], k[-1])
    state.unify(k[-2], v[-2])
    if node.kwargs.get("scale") is None and len(node.args) < 7:
        state.note(q[-1], "attention scale 1/sqrt(width) changes with the width")
    batch = _broadcast_batch(state, q[:-2], k[:-2], v[:-2])
    mask = state.labels_of(node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask"))
    if isinstance(mask, tuple):  # added to the scores (batch…, queries, keys): a bias per head joins the heads
        _broadcast_batch(state, mask, batch + (q[-2], k[-2]))
    return batch + (q[-2], v[-1])


def unbind(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(x)
    state.block(x[dim], Reason(BlockKind.COLLAPSED, f"{node.name} unbinds this dimension"))
    rest = tuple(x[:dim]) + tuple(x[dim + 1 :])
    return tuple(rest for _ in range(len(state.value(node))))


def outer(state: Propagation, node: fx.Node):
    """``torch.outer(a, b)``: the rows are ``a``'s positions, the columns ``b``'s."""
    return state.labels_of(node.args[0]) + state.labels_of(node.args[1])


def einsum(state: Propagation, node: fx.Node):
    """``torch.einsum(equation, *operands)`` (or the operands as one list): the dims of each
    letter (or of each position an ellipsis covers) unify across operands, a size-1 dim
    broadcasting; a letter kept in the output carries them there, a summed one vanishes (a dead
    channel adds nothing to the sum, so removing it is exact). The sublist form blocks."""
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    labels = [state.labels_of(o) if isinstance(o, fx.Node) else None for o in operands]
    equation = node.args[0]
    parsed = None
    if isinstance(equation, str) and all(isinstance(x, tuple) for x in labels):
        parsed = _einsum_dims(equation, [len(x) for x in labels])
    if parsed is None or len(parsed[1]) != len(state.value(node).shape):
        reason = Reason(BlockKind.NO_RULE, f"{node.name}: einsum equation {equation!r} not understood")
        state.block([state.labels_of(a) for a in node.all_input_nodes], reason)
        return state.fresh(state.value(node), node.name, reason)
    terms, output = parsed
    dims: dict = {}  # letter -> the ids of its dims of more than one position
    for x, term in zip(labels, terms):
        for ids, letter in zip(x, term):
            if ids.size > 1:
                dims.setdefault(letter, []).append(ids)
    for arrays in dims.values():
        for other in arrays[1:]:
            state.unify(arrays[0], other)
    return tuple(dims[letter][0] if letter in dims else np.array([NO_ID]) for letter in output)


def _einsum_dims(equation: str, ndims: list) -> Optional[tuple]:
    """``(terms, output)``: the letter of each dim of each operand and of the output (the
    positions an ellipsis covers named ``...0``, ``...1``, right-aligned across operands),
    or None for an equation that does not fit the operands."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ndims):
        return None
    widths = [n - len(term.replace("...", "")) if "..." in term else 0 for term, n in zip(inputs, ndims)]
    width = max(widths, default=0)
    if not arrow:
        letters = "".join(term.replace("...", "") for term in inputs)
        once = sorted(c for c in set(letters) if letters.count(c) == 1)  # the implicit output: letters seen once
        rhs = ("..." if any("..." in t for t in inputs) else "") + "".join(once)
    terms = [_expanded(term, width - w, width) for term, w in zip(inputs, widths)]
    output = _expanded(rhs, 0, width)
    if any(t is None or len(t) != n for t, n in zip(terms, ndims)) or output is None or len(set(output)) != len(output):
        return None
    return terms, output


def _expanded(term: str, first: int, width: int) -> Optional[list]:
    """The letters of ``term``, its ellipsis as the positions ``first`` to ``width`` of the
    ellipsis; None for a term that is not letters around at most one ellipsis."""
    before, dots, after = term.partition("...")
    if before + after and not (before + after).isalpha():
        return None
    return list(before) + ([f"...{k}" for k in range(first, width)] if dots else []) + list(after)


def cdist(state: Propagation, node: fx.Node):
    """``torch.cdist(x1, x2)``: ``(…, P, M)`` and ``(…, R, M)`` give the ``(…, P, R)`` distances over
    ``M``, which both share. A dead channel (zero in both) adds nothing to any distance: exact."""
    a, b = state.labels_of(node.args[0]), state.labels_of(node.args[1])
    state.unify(a[-1], b[-1])
    return _broadcast_batch(state, a[:-2], b[:-2]) + (a[-2], b[-2])
