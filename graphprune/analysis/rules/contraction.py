"""Rules for products that contract a dimension: matmul / bmm, addmm, baddbmm and scaled dot-product attention.

A contracted dimension must shrink on both operands together, so its two label arrays are
unified; a dead channel contributes nothing to the sum, so removing it is exact.
"""
from __future__ import annotations

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
