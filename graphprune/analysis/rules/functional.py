"""Rules for the functional forms of layers: ``F.conv*``, ``F.linear``, ``F.batch_norm``,
``F.instance_norm``, ``F.group_norm``, ``F.embedding`` and ``F.prelu``.

They are the module rules of :mod:`.layers` applied to the call's own arguments, whoever
makes the call: a module that overrides ``forward`` (timm's ``BatchNormAct2d`` or
``Linear``), or any code. A weight that is a parameter or buffer becomes a member with its
role; one computed in the graph (a standardised weight) is followed through its labels. A
count passed as a literal (``groups``, ``num_groups``) follows the pruning only where the
calling module holds it as the attribute of that name; otherwise its channels block.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..propagation import Propagation
from ..reasons import BlockKind, Reason
from .layers import (
    conv_labels,
    linear_labels,
    note_statistics,
    per_channel,
    prelu_labels,
    tie_blocks,
)
from .reshape import arg

_CONV_TRANSPOSED = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def _count_attribute(state: Propagation, node: fx.Node, attribute: str, value: Any) -> bool:
    """Whether the literal count ``value`` is the calling module's ``attribute`` (so it can follow)."""
    return isinstance(value, int) and getattr(state.module(state.qualname(node)), attribute, None) == value


def conv(state: Propagation, node: fx.Node):
    """``F.conv{1,2,3}d`` / ``F.conv_transpose{1,2,3}d``: as the convolution modules."""
    x = state.labels_of(node.args[0])
    weight, bias, groups = arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1)
    n_spatial = len(state.shape_of(weight)) - 2
    transposed = getattr(node.target, "__name__", "") in _CONV_TRANSPOSED
    followed = groups == 1 or _count_attribute(state, node, "groups", groups)
    out = conv_labels(state, node, x, weight, bias, groups, transposed, n_spatial, state.qualname(node) if followed else None)
    if not followed:  # its channels are tied in conv groups, whose count cannot change
        state.block(out[len(out) - n_spatial - 1],
                    Reason(BlockKind.FIXED_SIZE, f"{node.name}: groups={groups!r} is no 'groups' attribute of its module"))
    return out


def linear(state: Propagation, node: fx.Node):
    """``F.linear(x, weight, bias)``."""
    return linear_labels(state, state.labels_of(node.args[0]), arg(node, 1, "weight"), arg(node, 2, "bias"))


def batch_norm(state: Propagation, node: fx.Node):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, …)``: per channel
    along dim 1; with ``training`` (or no running statistics) the statistics are computed over
    the other dims, so pruning those is approximate (NFNet standardises its conv weights so,
    over their input channels)."""
    x = state.labels_of(node.args[0])
    per_channel(state, x[1], {arg(node, 1, "running_mean"): "stat", arg(node, 2, "running_var"): "stat",
                              arg(node, 3, "weight"): "scale", arg(node, 4, "bias"): "shift"})
    if arg(node, 5, "training", False) or arg(node, 1, "running_mean") is None:
        note_statistics(state, node, x, keep=1)
    return x


def instance_norm(state: Propagation, node: fx.Node):
    """``F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, …)``: per
    channel along dim 1; with input statistics (the default) they are over the dims after it."""
    x = state.labels_of(node.args[0])
    per_channel(state, x[1], {arg(node, 1, "running_mean"): "stat", arg(node, 2, "running_var"): "stat",
                              arg(node, 3, "weight"): "scale", arg(node, 4, "bias"): "shift"})
    if arg(node, 5, "use_input_stats", True):
        note_statistics(state, node, x, keep=1, first=2)
    return x


def group_norm(state: Propagation, node: fx.Node):
    """``F.group_norm(x, num_groups, weight, bias, eps)``: a whole norm group is one channel."""
    x = state.labels_of(node.args[0])
    groups = arg(node, 1, "num_groups")
    per_channel(state, x[1], {arg(node, 2, "weight"): "scale", arg(node, 3, "bias"): "shift"})
    if not _count_attribute(state, node, "num_groups", groups):
        state.block(x[1], Reason(BlockKind.FIXED_SIZE, f"{node.name}: num_groups={groups!r} is no 'num_groups' attribute of its module"))
        return x
    tie_blocks(state, groups, x[1])
    size = state.value(node).shape[1]
    state.attr(state.qualname(node), "num_groups", x[1], lambda _, kept, g=groups, n=size: g * kept // n)
    return x


def embedding(state: Propagation, node: fx.Node):
    """``F.embedding(indices, weight, …)``: a new last dim, the weight's dim 1."""
    return tuple(state.labels_of(node.args[0])) + (state.tensor_ids(arg(node, 1, "weight"), 1, "out"),)


def prelu(state: Propagation, node: fx.Node):
    """``F.prelu(x, weight)``."""
    return prelu_labels(state, state.labels_of(node.args[0]), arg(node, 1, "weight"))


def weight_norm(state: Propagation, node: fx.Node):
    """``torch._weight_norm(v, g, dim)`` (what ``weight_norm`` computes, as torch.export records
    it): ``g · v / ‖v‖``, each slice along ``dim`` with its own norm. The output has ``v``'s
    labels; ``g``'s dims that are as long as ``v``'s join them. Removing a zero column leaves
    every norm as it was: exact."""
    v, g = node.args[0], node.args[1]
    labels, scale = state.labels_of(v), state.labels_of(g)
    for d, (size, other) in enumerate(zip(state.value(v).shape, state.value(g).shape)):
        if size == other and size > 1:
            state.unify(labels[d], scale[d])
    return labels


def bilinear(state: Propagation, node: fx.Node):
    """``F.bilinear(x1, x2, weight, bias)`` (``nn.Bilinear``): ``weight`` is ``(out, in1, in2)``; its
    dims 1 and 2 read ``x1``'s and ``x2``'s channels, its dim 0 (and the bias) make the output's."""
    x1, x2 = state.labels_of(node.args[0]), state.labels_of(node.args[1])
    weight = node.args[2] if len(node.args) > 2 else node.kwargs["weight"]
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    state.bind(x1[-1], weight, 1, "in")
    state.bind(x2[-1], weight, 2, "in")
    out = state.tensor_ids(weight, 0, "out")
    if bias is not None:
        state.bind(out, bias, 0, "out")
    for a, b in zip(reversed(x1[:-1]), reversed(x2[:-1])):  # the batch dims broadcast
        if a.size == b.size and a.size > 1:
            state.unify(a, b)
    return tuple(x1[:-1]) + (out,)
