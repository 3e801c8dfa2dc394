"""The rule table: one entry per op kind, keyed by module class, function or method name.

A node whose op has no entry blocks every channel set it touches, with the op named as
the reason (see :func:`graphprune.analysis.propagate.propagate`). Nothing is ever guessed.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from graphprune.tracer import TensorSpec
from graphprune.tracer.fx_capture import forward_hooks

from ..propagation import Propagation
from ..reasons import BlockKind, Reason
from . import attention, contraction, creation, functional, indexing, layers, pointwise, recurrent, reorder, reshape, shape

Rule = Callable

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)
_RESAMPLE = (
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d,
)
_ELEMENTWISE = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.pow, torch.lerp, torch.addcmul, torch.addcdiv, "lerp", "addcmul", "addcdiv",
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "pow", "maximum", "minimum",
)
_MASKS = (  # masked_fill (its mask broadcast) and the comparisons that make masks
    torch.masked_fill, "masked_fill", "masked_fill_", operator.lt, operator.le, operator.gt, operator.ge, operator.eq,
    operator.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, "lt", "le", "gt", "ge", "eq", "ne",
)
_UNARY = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.sigmoid, F.tanh, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.clamp,
    torch.clip, torch.erf, torch.log, torch.square, torch.cos, torch.sin, torch.reciprocal, operator.neg, operator.pos,
    torchvision.ops.stochastic_depth,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "clamp", "clamp_", "clip",
    "square", "erf", "log", "cos", "sin", "reciprocal", "contiguous", "clone", "detach", "float", "double", "half",
    "bfloat16", "to", "type_as", "requires_grad_", torch.sign, torch.nan_to_num, "sign", "nan_to_num", "clamp_min",
    "clamp_max",
)
_REDUCTIONS = (
    torch.prod, "prod", torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.max, torch.min, torch.logsumexp,
    "mean", "sum", "amax", "amin", "std", "var", "max", "min", "logsumexp",
)
_SPATIAL = (
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate, F.upsample,
)
_LIKE = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like)
_SCATTERS = (torch.scatter, torch.scatter_add, torch.scatter_reduce, "scatter", "scatter_", "scatter_add",
             "scatter_add_", "scatter_reduce", "scatter_reduce_")
_INDEX_WRITES = (torch.index_add, torch.index_copy, torch.index_fill, "index_add", "index_add_", "index_copy",
                 "index_copy_", "index_fill", "index_fill_")
_ACCUMULATIONS = (torch.cumsum, torch.cumprod, torch.cummax, torch.cummin, torch.logcumsumexp,
                  "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp")
_METADATA = ("size", "dim", "numel", "type", len)

RULES: dict = {
    nn.Conv1d: layers.conv, nn.Conv2d: layers.conv, nn.Conv3d: layers.conv,
    nn.ConvTranspose1d: layers.conv, nn.ConvTranspose2d: layers.conv, nn.ConvTranspose3d: layers.conv,
    nn.Linear: layers.linear,
    nn.BatchNorm1d: layers.batch_norm, nn.BatchNorm2d: layers.batch_norm, nn.BatchNorm3d: layers.batch_norm,
    nn.SyncBatchNorm: layers.batch_norm,
    nn.InstanceNorm1d: layers.instance_norm, nn.InstanceNorm2d: layers.instance_norm,
    nn.InstanceNorm3d: layers.instance_norm,
    nn.GroupNorm: layers.group_norm, nn.LayerNorm: layers.layer_norm, nn.RMSNorm: layers.layer_norm, nn.PReLU: layers.prelu,
    nn.Embedding: layers.embedding, nn.Flatten: layers.flatten_module,
    nn.MultiheadAttention: attention.multihead_attention,
    nn.LSTM: recurrent.recurrent_module, nn.GRU: recurrent.recurrent_module, nn.RNN: recurrent.recurrent_module,
    **{op: recurrent.recurrent_function for op in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)},
    nn.LSTMCell: recurrent.cell_module, nn.GRUCell: recurrent.cell_module, nn.RNNCell: recurrent.cell_module,
    **{op: recurrent.cell_function
       for op in (torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell)},
    nn.Softmax: layers.softmax, nn.LogSoftmax: layers.softmax,
    **{cls: layers.passthrough for cls in _ACTIVATIONS},
    **{cls: layers.pooling for cls in _POOLS},
    **{cls: layers.resample for cls in _RESAMPLE},
    **{op: pointwise.elementwise for op in _ELEMENTWISE},
    **{op: pointwise.unary for op in _UNARY},
    **{op: pointwise.reduction for op in _REDUCTIONS},
    **{op: pointwise.spatial for op in _SPATIAL},
    **{op: pointwise.metadata for op in _METADATA}, getattr: indexing.attribute,
    F.softmax: pointwise.softmax, F.log_softmax: pointwise.softmax, torch.softmax: pointwise.softmax,
    "softmax": pointwise.softmax, "log_softmax": pointwise.softmax,
    F.layer_norm: pointwise.layer_norm, F.rms_norm: pointwise.rms_norm, F.normalize: pointwise.normalize,
    F.pad: pointwise.pad,
    F.conv1d: functional.conv, F.conv2d: functional.conv, F.conv3d: functional.conv,
    F.conv_transpose1d: functional.conv, F.conv_transpose2d: functional.conv, F.conv_transpose3d: functional.conv,
    F.linear: functional.linear, F.batch_norm: functional.batch_norm, F.instance_norm: functional.instance_norm,
    torch._weight_norm: functional.weight_norm, F.group_norm: functional.group_norm, F.embedding: functional.embedding, F.prelu: functional.prelu,
    "view_as": reshape.view_as, "reshape_as": reshape.view_as,
    torch.flatten: reshape.flatten, "flatten": reshape.flatten, torch.unflatten: reshape.unflatten, "unflatten": reshape.unflatten,
    "view": reshape.view, "reshape": reshape.view, torch.reshape: reshape.view,
    torch.permute: shape.permute, "permute": shape.permute,
    torch.transpose: shape.transpose, "transpose": shape.transpose, "t": shape.transpose, torch.t: shape.transpose,
    torch.unsqueeze: shape.unsqueeze, "unsqueeze": shape.unsqueeze, torch.squeeze: shape.squeeze, "squeeze": shape.squeeze,
    "expand": shape.expand, "expand_as": shape.expand, "repeat": shape.repeat,
    torch.repeat_interleave: shape.repeat_interleave, "repeat_interleave": shape.repeat_interleave,
    torch.cat: shape.cat, torch.concat: shape.cat, torch.concatenate: shape.cat, torch.stack: shape.stack,
    torch.split: shape.split, "split": shape.split, torch.chunk: shape.chunk, "chunk": shape.chunk,
    operator.getitem: shape.getitem,
    **{op: pointwise.unary for op in _LIKE},  # a new tensor of its argument's shape
    **{getattr(torch, name): creation.factory for name in creation.FACTORIES},
    torch.norm: pointwise.vector_norm, "norm": pointwise.vector_norm, torch.linalg.vector_norm: pointwise.vector_norm,
    torch.cdist: contraction.cdist, F.bilinear: functional.bilinear,
    torch.flip: reorder.flip, "flip": reorder.flip, torch.roll: reorder.roll, "roll": reorder.roll,
    **{op: reorder.accumulate for op in _ACCUMULATIONS},
    torch.channel_shuffle: reorder.channel_shuffle, nn.ChannelShuffle: reorder.channel_shuffle,
    F.unfold: reorder.unfold, F.fold: reorder.fold, F.grid_sample: reorder.grid_sample,
    **{f"new_{name}": creation.new_factory for name in creation.FACTORIES},
    torch.gather: indexing.gather, "gather": indexing.gather,
    torch.index_select: indexing.index_select, "index_select": indexing.index_select,
    torch.index_put: indexing.index_put, "index_put": indexing.index_put,
    "index_put_": indexing.index_put, torch.where: indexing.where, "where": indexing.where,
    torch.nonzero: indexing.nonzero, "nonzero": indexing.nonzero, torch.argwhere: indexing.nonzero,
    torch.topk: indexing.top_k, "topk": indexing.top_k, torch.sort: indexing.sort, "sort": indexing.sort,
    torch.argsort: indexing.argsort, "argsort": indexing.argsort, torch.argmax: indexing.arg_extreme,
    torch.argmin: indexing.arg_extreme, "argmax": indexing.arg_extreme, "argmin": indexing.arg_extreme,
    **{op: indexing.scatter for op in _SCATTERS}, **{op: indexing.index_add for op in _INDEX_WRITES},
    **{op: indexing.grouped_mm for op in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None))
       if op},  # torch >= 2.8
    operator.matmul: contraction.matmul, torch.matmul: contraction.matmul, torch.bmm: contraction.matmul,
    "matmul": contraction.matmul, "bmm": contraction.matmul, torch.addmm: contraction.addmm,
    torch.baddbmm: contraction.baddbmm, "baddbmm": contraction.baddbmm,
    F.scaled_dot_product_attention: contraction.scaled_dot_product_attention,
    torch.unbind: contraction.unbind, "unbind": contraction.unbind,
    torch.einsum: contraction.einsum, torch.outer: contraction.outer, torch.ger: contraction.outer,
    "outer": contraction.outer, "ger": contraction.outer,
    nn.PixelShuffle: layers.pixel_shuffle, F.pixel_shuffle: layers.pixel_shuffle,
    nn.PixelUnshuffle: layers.pixel_unshuffle, F.pixel_unshuffle: layers.pixel_unshuffle,
    nn.GLU: shape.glu, F.glu: shape.glu, torch.tensor_split: shape.tensor_split, "tensor_split": shape.tensor_split,
    torch.view_as_complex: reshape.view_as_complex, torch.view_as_real: reshape.view_as_real,
    nn.CosineSimilarity: pointwise.cosine_similarity, F.cosine_similarity: pointwise.cosine_similarity,
    **{op: pointwise.elementwise for op in _MASKS},
}

_BOUNDARIES = {"placeholder": pointwise.placeholder, "get_attr": pointwise.get_attr, "output": pointwise.output}


def has_module_rule(module: nn.Module, qualname: str = "") -> bool:
    """True for modules the table knows: graphprune keeps them as leaves when tracing."""
    return _module_rule(module) is not None


def _module_rule(module: nn.Module) -> Optional[Rule]:
    """The rule of the closest table class, if the module does not override its forward."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


def _has_tensor(value) -> bool:
    if isinstance(value, TensorSpec):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)


def rule_for(state: Propagation, attrs: dict) -> tuple[Optional[Rule], Optional[Reason]]:
    """``(rule, None)`` for a known op, else ``(None, reason)`` naming the op."""
    op, node = attrs["op"], attrs["fx"]
    if op in _BOUNDARIES:
        return _BOUNDARIES[op], None
    tensor_out = _has_tensor(attrs["value"])
    if not tensor_out and not any(state.labels_of(n) is not None for n in node.all_input_nodes):
        return pointwise.metadata, None
    if op == "call_module":
        return _module_rule_for(state, attrs["module"])
    rule = RULES.get(node.target) if op == "call_method" or callable(node.target) else None
    if rule is pointwise.metadata and tensor_out:
        rule = None
    if rule is None:
        kind = "method" if op == "call_method" else "function"
        return None, Reason(BlockKind.NO_RULE, f"no rule for {kind} {attrs['target_name']} ('{node.name}')")
    return rule, None


def _module_rule_for(state: Propagation, name: str) -> tuple[Optional[Rule], Optional[Reason]]:
    module = state.module(name)
    hooks = forward_hooks(module)
    if hooks:
        return None, Reason(BlockKind.NO_RULE, (
            f"'{name}' ({type(module).__name__}) has forward hooks ({', '.join(hooks)}) that may change its inputs "
            "or outputs unseen; remove them to prune these channels"))
    rule = _module_rule(module)
    if rule:
        return rule, None
    why = state.graph.graph["opaque"].get(name)
    return None, Reason(BlockKind.NO_RULE, f"'{name}' ({type(module).__name__}) {why or 'has no rule'}")
