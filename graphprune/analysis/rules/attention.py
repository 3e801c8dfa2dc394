"""Rule for nn.MultiheadAttention: the embedding width, tied across q, k, v, heads and output."""
from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import nn

from graphprune.tracer import TensorSpec

from ..propagation import Propagation
from ..reasons import BlockKind, Reason


def _arg(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def multihead_attention(state: Propagation, node: fx.Node):
    """``embed_dim`` is both the stream width and the q/k/v width, so stream channel ``c`` is
    internal channel ``c`` of q, k and v. Each head must keep the same ``head_dim``, so the
    ``d``-th channel of every head is one unit (removing it removes ``num_heads`` channels);
    with ``prune_heads`` a whole head is one unit instead and ``num_heads`` shrinks."""
    m: nn.MultiheadAttention = state.module(state.qualname(node))
    q, k, v = (state.labels_of(_arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
    value = state.value(node)
    weights = (state.fresh(value[1], f"{node.name} attention weights", Reason(BlockKind.NOT_A_CHANNEL, "attention weights"))
               if isinstance(value[1], TensorSpec) else None)
    if not m._qkv_same_embed_dim or m.bias_k is not None:
        reason = Reason(BlockKind.NO_RULE, f"{node.name}: MultiheadAttention with separate kdim/vdim or bias_k")
        state.block((q, k, v), reason)
        return state.fresh(value[0], node.name, reason), weights
    stream = q[-1]
    for other in (k, v):
        state.unify(stream, other[-1])
    state.bind(stream, m.in_proj_weight, 1, "in")
    rows = state.param_ids(m.in_proj_weight, 0, "out")
    if m.in_proj_bias is not None:
        state.bind(rows, m.in_proj_bias, 0, "out")
    grid = rows.reshape(3, m.num_heads, m.head_dim)
    for part in grid:
        state.unify(part.ravel(), stream)
    # A channel is either one head (prune_heads) or the d-th width channel of every head.
    anchor = grid[:1, :, :1] if state.prune_heads else grid[:, :1, :]
    state.unify(grid, np.broadcast_to(anchor, grid.shape))
    state.bind(stream, m.out_proj.weight, 1, "in")
    out_ids = state.param_ids(m.out_proj.weight, 0, "out")
    if m.out_proj.bias is not None:
        state.bind(out_ids, m.out_proj.bias, 0, "out")
    # embed_dim, kdim, vdim and head_dim follow in_proj_weight (sizes.py); the head count
    # changes only when whole heads go.
    if state.prune_heads:
        state.attr(state.qualname(node), "num_heads", stream, lambda _, kept, d=m.head_dim: kept // d)
    else:
        state.note(stream, "attention scale 1/sqrt(head_dim) changes with head_dim")
    return tuple(q[:-1]) + (out_ids,), weights
