"""Rules for parametrised layers: they create channel sets or consume / pass them."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch.fx as fx
from torch import nn

from graphprune.analysis.channels import NO_ID
from graphprune.analysis.propagation import Propagation

from ..reasons import BlockKind, Reason
from .reshape import merge_dims

SPATIAL = Reason(BlockKind.NOT_A_CHANNEL, "spatial dimension")
KERNEL = Reason(BlockKind.NOT_A_CHANNEL, "a convolution kernel's spatial dimension")


def _input(state: Propagation, node: fx.Node):
    return state.labels_of(node.args[0]), state.value(node.args[0]), state.value(node)


def tie_blocks(state: Propagation, groups: int, *labels: np.ndarray) -> np.ndarray:
    """Tie each of ``groups`` equal blocks of every label array into one unit; return the block ids."""
    anchors = labels[0][:: labels[0].size // groups]
    for ids in labels:
        state.unify(ids, np.repeat(anchors, ids.size // groups))
    return anchors


def resampled(state: Propagation, node: fx.Node, x: tuple, n_dims: int) -> tuple:
    """The labels out of an op that convolves, pools, pads or resamples the last ``n_dims``
    dims of ``x``: the leading dims pass; the channels the last ones carried, if any, are
    blocked (each output position mixes several of them), and the output's are new."""
    kept = max(len(x) - n_dims, 0)
    state.block(x[kept:], Reason(BlockKind.COLLAPSED, f"{node.name} convolves, pools or resamples this dimension"))
    return tuple(x[:kept]) + state.fresh(state.value(node), f"{node.name} spatial", SPATIAL, first_dim=kept)


def conv(state: Propagation, node: fx.Node):
    """A convolution module: see :func:`conv_labels`."""
    m: nn.modules.conv._ConvNd = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    return conv_labels(state, node, x, m.weight, m.bias, m.groups, m.transposed, len(m.kernel_size), state.qualname(node))


def conv_labels(state: Propagation, node: fx.Node, x: tuple, weight, bias, groups: int, transposed: bool,
                n_spatial: int, owner: Optional[str]) -> tuple:
    """A convolution's output labels; ``weight`` and ``bias`` are tensors or fx arguments (see
    :meth:`Propagation.tensor_ids`). The input channels are the weight's input dim and the
    output channels its output dim. In a grouped conv a conv group is one unit, so its in and
    out blocks go together, and ``owner``'s ``groups`` attribute follows the count (the
    caller blocks the channels when no module holds it: ``owner`` None)."""
    c = len(x) - n_spatial - 1
    in_ids = x[c]
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups == 1:
        state.bind(in_ids, weight, in_dim, "in")
        out_ids = state.tensor_ids(weight, out_dim, "out")
    else:
        out_size = state.shape_of(weight)[out_dim] * (groups if transposed else 1)
        if transposed:
            state.bind(in_ids, weight, 0, "in")
            out_ids = state.space.new_set(out_size, f"{owner or node.name} out")
        else:
            out_ids = state.tensor_ids(weight, 0, "out")
        tie_blocks(state, groups, out_ids, in_ids)
        if owner is not None:
            state.attr(owner, "groups", out_ids, lambda _, kept, g=groups, n=out_size: g * kept // n)
    if bias is not None:
        state.bind(out_ids, bias, 0, "out")
    if isinstance(weight, fx.Node):  # read in the graph: its kernel dims are members too, never channels
        for dim in range(2, 2 + n_spatial):
            state.block(state.tensor_ids(weight, dim, "param"), KERNEL)
    spatial = resampled(state, node, x, n_spatial)
    return spatial[:c] + (out_ids,) + spatial[c + 1 :]


def linear(state: Propagation, node: fx.Node):
    m: nn.Linear = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    return linear_labels(state, x, m.weight, m.bias)


def linear_labels(state: Propagation, x: tuple, weight, bias) -> tuple:
    """``x @ weight.T + bias``: the input's last dim is the weight's dim 1, the output's its dim 0."""
    state.bind(x[-1], weight, 1, "in")
    out_ids = state.tensor_ids(weight, 0, "out")
    if bias is not None:
        state.bind(out_ids, bias, 0, "out")
    return tuple(x[:-1]) + (out_ids,)


def per_channel(state: Propagation, ids: np.ndarray, tensors: dict) -> bool:
    """Bind each per-channel tensor of ``tensors`` (tensor or fx argument -> role) to ``ids``;
    whether any was bound."""
    bound = False
    for ref, role in tensors.items():
        shape = state.shape_of(ref) if ref is not None else None
        if shape is not None and len(shape) == 1:
            state.bind(ids, ref, 0, role)
            bound = True
    return bound


def _norm_tensors(m: nn.Module) -> dict:
    refs = {getattr(m, a, None): role for a, role in (("weight", "scale"), ("bias", "shift"), ("running_mean", "stat"),
                                                     ("running_var", "stat"))}
    refs.pop(None, None)
    return refs


def _per_channel(state: Propagation, node: fx.Node, m: nn.Module, ids: np.ndarray, count_attr: str) -> None:
    if not per_channel(state, ids, _norm_tensors(m)):  # no tensor to read the count off (see sizes.py)
        state.attr(state.qualname(node), count_attr, ids, lambda _, kept: kept)


def batch_norm(state: Propagation, node: fx.Node):
    m = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    _per_channel(state, node, m, x[1], "num_features")
    if m.training or not m.track_running_stats:  # statistics of the batch, over every other dim
        note_statistics(state, node, x, keep=1)
    return x


def instance_norm(state: Propagation, node: fx.Node):
    m: nn.modules.instancenorm._InstanceNorm = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    c = 0 if len(x) == m._get_no_batch_dim() else 1
    _per_channel(state, node, m, x[c], "num_features")
    if m.training or not m.track_running_stats:  # statistics of each instance, over the dims after the channels
        note_statistics(state, node, x, keep=c, first=c + 1)
    return x


def note_statistics(state: Propagation, node: fx.Node, x: tuple, keep: int, first: int = 0) -> None:
    """Note every dim of ``x`` from ``first`` on but ``keep`` (the channels) as normalised over:
    statistics computed over them change when they are pruned."""
    for d in range(first, len(x)):
        if d != keep:
            state.note(x[d], f"{node.name} computes normalisation statistics over this dimension")


def group_norm(state: Propagation, node: fx.Node):
    m: nn.GroupNorm = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    # Removing a whole norm group leaves the statistics of the other groups unchanged.
    tie_blocks(state, m.num_groups, x[1])
    _per_channel(state, node, m, x[1], "num_channels")
    state.attr(state.qualname(node), "num_groups", x[1], lambda _, kept, g=m.num_groups, n=m.num_channels: g * kept // n)
    return x


def layer_norm(state: Propagation, node: fx.Node):
    """nn.LayerNorm, and nn.RMSNorm (no bias)."""
    m: nn.LayerNorm = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    normalize_over(state, state.qualname(node), x, m.weight, getattr(m, "bias", None), len(m.normalized_shape))
    return x


def normalize_over(state: Propagation, module: str, x: tuple, weight, bias, n_dims: int) -> None:
    """Couple the last ``n_dims`` dims of ``x`` with a LayerNorm's affine parameters (tensors or
    fx arguments) and ``module``'s ``normalized_shape``."""
    for k in range(n_dims):
        d = len(x) - n_dims + k
        for ref, role in ((weight, "scale"), (bias, "shift")):
            if ref is not None:
                state.bind(x[d], ref, k, role)
        state.note(x[d], "LayerNorm statistics are recomputed over the remaining channels")
        state.attr(module, "normalized_shape", x[d], lambda shape, kept, k=k: (*shape[:k], kept, *shape[k + 1 :]))


def prelu(state: Propagation, node: fx.Node):
    m: nn.PReLU = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    return prelu_labels(state, x, m.weight)


def prelu_labels(state: Propagation, x: tuple, weight) -> tuple:
    """One slope per channel (dim 1, or 0 without a batch) unless there is a single slope."""
    shape = state.shape_of(weight)
    if shape and shape[0] > 1:
        state.bind(x[1 if len(x) >= 2 else 0], weight, 0, "scale")
    return x


def embedding(state: Propagation, node: fx.Node):
    m: nn.Embedding = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    return tuple(x) + (state.tensor_ids(m.weight, 1, "out"),)


def pooling(state: Propagation, node: fx.Node):
    m = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    if getattr(m, "return_indices", False):
        reason = Reason(BlockKind.NO_RULE, f"{type(m).__name__} with return_indices")
        state.block(x, reason)
        return state.fresh(state.value(node), node.name, reason)
    n_spatial = int(type(m).__name__[-2])  # MaxPool2d -> 2
    return resampled(state, node, x, min(n_spatial, len(x) - 1))


def resample(state: Propagation, node: fx.Node):
    """Upsampling and padding layers: a padding layer changes the dims its ``padding`` covers
    (two numbers per dim, from the last), an upsampling layer every dim after the channels."""
    m = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    padding = getattr(m, "padding", None)
    return resampled(state, node, x, len(padding) // 2 if isinstance(padding, (tuple, list)) else len(x) - 2)


def softmax(state: Propagation, node: fx.Node):
    m = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    dim = m.dim if m.dim is not None else (0 if len(x) in (0, 1, 3) else 1)
    state.block(x[dim], Reason(BlockKind.COLLAPSED, f"{type(m).__name__} normalises over this dimension"))
    return x


def flatten_module(state: Propagation, node: fx.Node):
    m: nn.Flatten = state.module(state.qualname(node))
    x, _, _ = _input(state, node)
    return merge_dims(state, node, x, m.start_dim, m.end_dim)


def passthrough(state: Propagation, node: fx.Node):
    """Elementwise layers (activations, dropout, identity): labels pass unchanged."""
    x, _, _ = _input(state, node)
    return x


def pixel_shuffle(state: Propagation, node: fx.Node):
    """``F.pixel_shuffle(x, r)`` / ``nn.PixelShuffle``: channel ``c * r² + k`` goes to channel
    ``c`` (at spatial offset ``k``), so each output channel owns ``r²`` input channels, one unit.
    The spatial dims are resampled (new ids)."""
    x = state.labels_of(node.args[0])
    c = len(x) - 3
    out = list(resampled(state, node, x, 2))
    channels, count = x[c], state.value(node).shape[c]
    if count == 1 and channels.size > 1:
        state.block(channels, Reason(BlockKind.FIXED_SIZE, f"{node.name} shuffles these channels into a single one"))
        out[c] = np.array([NO_ID])
    elif channels.size > 1:
        out[c] = tie_blocks(state, count, channels)
    return tuple(out)


def pixel_unshuffle(state: Propagation, node: fx.Node):
    """``F.pixel_unshuffle(x, r)`` / ``nn.PixelUnshuffle``: channel ``c`` becomes channels
    ``c * r² … c * r² + r² - 1`` (its spatial offsets), each carrying its id. The spatial dims
    are resampled (new ids)."""
    x = state.labels_of(node.args[0])
    c = len(x) - 3
    out = list(resampled(state, node, x, 2))
    count = state.value(node).shape[c]
    if x[c].size > 1:
        out[c] = np.repeat(x[c], count // x[c].size)
    elif count > 1:  # a single channel: the offsets are positions, not channels
        out[c] = state.space.new_set(count, f"{node.name} offsets", SPATIAL)
    return tuple(out)
