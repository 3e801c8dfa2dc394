"""Rule for nn.MultiheadAttention: the embedding width, tied across q, k, v, heads and output;
with separate projections (``kdim`` / ``vdim``) the key and value streams keep their own widths."""
from __future__ import annotations

import operator

import numpy as np
import torch.fx as fx
from torch import nn

from graphprune.tracer import TensorSpec

from ..propagation import Propagation
from ..reasons import BlockKind, Reason


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _projections(state: Propagation, m: nn.MultiheadAttention, streams: tuple) -> np.ndarray:
    """Bind each input stream to the columns of its projection; return the ids of the q, k and
    v rows (and of the packed bias), ``(3, embed_dim)``. Packed (``in_proj_weight``), one
    width serves all three inputs; separate (``q/k/v_proj_weight``), the key and value inputs
    are read with widths ``kdim`` and ``vdim`` of their own."""
    if m._qkv_same_embed_dim:
        for other in streams[1:]:
            state.unify(streams[0], other)
        state.bind(streams[0], m.in_proj_weight, 1, "in")
        rows = state.param_ids(m.in_proj_weight, 0, "out").reshape(3, -1)
    else:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        for stream, weight in zip(streams, weights):
            state.bind(stream, weight, 1, "in")
        rows = np.stack([state.param_ids(weight, 0, "out") for weight in weights])
    if m.in_proj_bias is not None:
        state.bind(rows.ravel(), m.in_proj_bias, 0, "out")
    for rows_of, extra in ((rows[1], m.bias_k), (rows[2], m.bias_v)):  # a learnt key / value appended to the sequence
        if extra is not None:
            state.bind(rows_of, extra, 2, "out")
    return rows


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the attention weights (the call's second output)."""
    return any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)


def _weights(state: Propagation, node: fx.Node, head_units: np.ndarray, stream: np.ndarray):
    """Labels of the attention weights: no channel, but where whole heads go (``head_units``:
    one id per head) the head dim of per-head weights is the heads', and weights averaged over
    the heads change with their count."""
    spec = state.value(node)[1]
    if not isinstance(spec, TensorSpec):
        return None
    labels = state.fresh(spec, f"{node.name} attention weights", Reason(BlockKind.NOT_A_CHANNEL, "attention weights"))
    if state.prune_heads and not _arg(node, 6, "average_attn_weights", True):
        return labels[:-3] + (head_units,) + labels[-2:]
    if state.prune_heads and _weights_used(node):
        state.note(stream, "attention weights averaged over the heads change with the head count")
    return labels


def multihead_attention(state: Propagation, node: fx.Node):
    """The query's width is ``embed_dim``, which is also the q/k/v width, so query channel ``c``
    is internal channel ``c`` of q, k and v. Each head must keep the same ``head_dim``, so the
    ``d``-th channel of every head is one unit (removing it removes ``num_heads`` channels);
    with ``prune_heads`` a whole head is one unit instead and ``num_heads`` shrinks. The key
    and value inputs have the query's width, or with separate projections ``kdim`` and
    ``vdim`` (sizes.py), which follow their own streams; ``bias_k`` / ``bias_v`` are more key
    and value rows, ``add_zero_attn`` adds zeros that prune with anything, ``batch_first`` moves
    only the dims that carry no channel."""
    name = state.qualname(node)
    m: nn.MultiheadAttention = state.module(name)
    q, k, v = (state.labels_of(_arg(node, i, arg)) for i, arg in enumerate(("query", "key", "value")))
    stream = q[-1]
    grid = _projections(state, m, (stream, k[-1], v[-1])).reshape(3, m.num_heads, m.head_dim)
    for part in grid:
        state.unify(part.ravel(), stream)
    # A channel is either one head (prune_heads) or the d-th width channel of every head.
    anchor = grid[:1, :, :1] if state.prune_heads else grid[:, :1, :]
    state.unify(grid, np.broadcast_to(anchor, grid.shape))
    state.bind(stream, m.out_proj.weight, 1, "in")
    out_ids = state.param_ids(m.out_proj.weight, 0, "out")
    if m.out_proj.bias is not None:
        state.bind(out_ids, m.out_proj.bias, 0, "out")
    # embed_dim, kdim, vdim and head_dim follow the projections (sizes.py); the head count
    # changes only when whole heads go.
    if state.prune_heads:
        state.attr(name, "num_heads", stream, lambda _, kept, d=m.head_dim: kept // d)
    else:
        state.note(stream, "attention scale 1/sqrt(head_dim) changes with head_dim")
    return tuple(q[:-1]) + (out_ids,), _weights(state, node, grid[0, :, 0], stream)
