"""The torch call each aten operator of a ``torch.export`` graph stands for.

torch.export (non-strict, pre-dispatch) records aten operators: ``aten.conv2d.default``,
``aten.view.default``, ``aten.batch_norm.default`` … Most have the signature of the torch
function they come from; some order their arguments differently (``aten.batch_norm``,
``aten.embedding``) or name one indexing step each (``aten.slice``, ``aten.select``).
:func:`torch_call` rewrites each into the torch call the rule table
(:mod:`graphprune.analysis.rules`) already knows, so that both front-ends share one rule per
op. An operator without an entry here is kept as it is: no rule knows it, so the channels
it touches block (nothing is guessed).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

aten = torch.ops.aten

Call = tuple  # (op, target, args, kwargs): op is "call_function" or "call_method"


def _same(target: Any, count: Optional[int] = None) -> Callable:
    """The torch function ``target`` with the aten op's arguments (the first ``count``)."""
    return lambda args, kwargs: ("call_function", target, args[:count], kwargs)


def _method(name: str) -> Callable:
    """The tensor method ``name`` on the aten op's arguments, a size list spread out."""
    def call(args: tuple, kwargs: dict) -> Call:
        rest = tuple(args[1]) if len(args) > 1 and isinstance(args[1], (list, tuple)) else args[1:]
        return "call_method", name, (args[0],) + rest, {}
    return call


def _reordered(target: Any, order: tuple) -> Callable:
    """``target`` with the aten op's positional arguments taken in ``order``."""
    return lambda args, kwargs: ("call_function", target, tuple(args[i] for i in order if i < len(args)), {})


def _index(args: tuple, ndim: int, dim: int, item: Any) -> Call:
    return "call_function", operator.getitem, (args[0], (slice(None),) * (dim % ndim) + (item,)), {}


def _slice(args: tuple, kwargs: dict, ndim: int) -> Call:
    """``aten.slice.Tensor(x, dim, start, end, step)`` is ``x[:, …, start:end:step]``."""
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
    return _index(args, ndim, dim, slice(start, end, step))


def _select(args: tuple, kwargs: dict, ndim: int) -> Call:
    """``aten.select.int(x, dim, i)`` is ``x[:, …, i]``."""
    return _index(args, ndim, args[1], args[2])


def _advanced(args: tuple, kwargs: dict, ndim: int) -> Call:
    """``aten.index.Tensor(x, [None, idx])`` is ``x[:, idx]``."""
    return "call_function", operator.getitem, (args[0], tuple(slice(None) if i is None else i for i in args[1])), {}


def _reduced(target: Any) -> Callable:
    """A reduction: ``(x, dim, keepdim)`` as torch takes them; dtype and correction dropped."""
    def call(args: tuple, kwargs: dict) -> Call:
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        return "call_function", target, args[:2], {"keepdim": keepdim}
    return call


def _vector_norm(args: tuple, kwargs: dict) -> Call:
    """``aten.linalg_vector_norm(x, ord, dim, keepdim)``: a reduction over ``dim``."""
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    return "call_function", torch.sum, (args[0], dim), {"keepdim": keepdim}


def _sized(args: tuple, kwargs: dict) -> Call:
    return "call_method", "size", args, {}


_CONVS = {aten.conv1d: F.conv1d, aten.conv2d: F.conv2d, aten.conv3d: F.conv3d,
          aten.conv_transpose1d: F.conv_transpose1d, aten.conv_transpose2d: F.conv_transpose2d,
          aten.conv_transpose3d: F.conv_transpose3d}
_UNARY = {
    aten.relu: F.relu, aten.relu_: F.relu_, aten.gelu: F.gelu, aten.silu: F.silu, aten.silu_: F.silu,
    aten.sigmoid: torch.sigmoid, aten.sigmoid_: torch.sigmoid, aten.tanh: torch.tanh, aten.tanh_: torch.tanh,
    aten.hardswish: F.hardswish, aten.hardswish_: F.hardswish, aten.hardsigmoid: F.hardsigmoid,
    aten.hardsigmoid_: F.hardsigmoid, aten.hardtanh: F.hardtanh, aten.hardtanh_: F.hardtanh,
    aten.leaky_relu: F.leaky_relu, aten.leaky_relu_: F.leaky_relu, aten.elu: F.elu, aten.elu_: F.elu,
    aten.mish: F.mish, aten.mish_: F.mish, aten.softplus: F.softplus, aten.dropout: F.dropout,
    aten.dropout_: F.dropout, aten.feature_dropout: F.dropout, aten.alpha_dropout: F.dropout,
    aten.exp: torch.exp, aten.abs: torch.abs, aten.neg: torch.neg, aten.sqrt: torch.sqrt, aten.rsqrt: torch.rsqrt,
    aten.clamp: torch.clamp, aten.clamp_: torch.clamp, aten.clip: torch.clip, aten.erf: torch.erf, aten.log: torch.log,
    aten.square: torch.square, aten.cos: torch.cos, aten.sin: torch.sin,
    aten.reciprocal: torch.reciprocal, aten.clamp_min: torch.clamp, aten.clamp_max: torch.clamp,
    aten.sign: torch.sign, aten.nan_to_num: torch.nan_to_num, aten.log_sigmoid: F.logsigmoid,
}
_METHODS = {aten.contiguous: "contiguous", aten.clone: "clone", aten.detach: "detach", aten.alias: "clone",
            aten.lift_fresh_copy: "clone", aten.to: "to", aten._to_copy: "to", aten.type_as: "type_as"}
_ELEMENTWISE = {
    aten.add: torch.add, aten.add_: torch.add, aten.sub: torch.sub, aten.sub_: torch.sub, aten.rsub: torch.sub,
    aten.mul: torch.mul, aten.mul_: torch.mul, aten.div: torch.div, aten.div_: torch.div,
    aten.maximum: torch.maximum, aten.minimum: torch.minimum, aten.where: torch.where, aten.pow: torch.pow,
    aten.lerp: torch.lerp, aten.addcmul: torch.addcmul, aten.addcdiv: torch.addcdiv,
}
_SPATIAL = {aten.max_pool1d: F.max_pool1d, aten.max_pool2d: F.max_pool2d, aten.max_pool3d: F.max_pool3d,
            aten.avg_pool1d: F.avg_pool1d, aten.avg_pool2d: F.avg_pool2d, aten.avg_pool3d: F.avg_pool3d,
            aten.adaptive_avg_pool1d: F.adaptive_avg_pool1d, aten.adaptive_avg_pool2d: F.adaptive_avg_pool2d,
            aten.adaptive_avg_pool3d: F.adaptive_avg_pool3d}
_UPSAMPLE = (aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_linear1d,
             aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d, aten._upsample_bilinear2d_aa,
             aten._upsample_bicubic2d_aa)

# aten overload packet -> how its call is written as the torch call the rule table knows
TORCH_FORMS: dict = {
    **{packet: _same(target) for packet, target in _CONVS.items()},
    **{packet: _same(target) for packet, target in _UNARY.items()},
    **{packet: _same(target) for packet, target in _ELEMENTWISE.items()},
    **{packet: _same(target) for packet, target in _SPATIAL.items()},
    **{packet: (lambda args, kwargs: ("call_function", F.interpolate, args[:1], {})) for packet in _UPSAMPLE},
    **{packet: (lambda args, kwargs, name=name: ("call_method", name, args[:1], {})) for packet, name in _METHODS.items()},
    aten.linear: _same(F.linear), aten.prelu: _same(F.prelu), aten._weight_norm: _same(torch._weight_norm),
    aten.layer_norm: _same(F.layer_norm, 5), aten.group_norm: _same(F.group_norm, 5), aten.rms_norm: _same(F.rms_norm, 4),
    aten.batch_norm: _reordered(F.batch_norm, (0, 3, 4, 1, 2, 5, 6, 7)),
    aten.instance_norm: _reordered(F.instance_norm, (0, 3, 4, 1, 2, 5, 6, 7)),
    aten.embedding: _reordered(F.embedding, (1, 0)),
    aten.pad: _same(F.pad, 2), aten.constant_pad_nd: _same(F.pad, 2),
    aten.softmax: _same(F.softmax, 2), aten._softmax: _same(F.softmax, 2), aten.log_softmax: _same(F.log_softmax, 2),
    aten.mean: _reduced(torch.mean), aten.sum: _reduced(torch.sum), aten.amax: _reduced(torch.amax),
    aten.amin: _reduced(torch.amin), aten.var: _reduced(torch.var), aten.std: _reduced(torch.std),
    aten.max: _reduced(torch.max), aten.min: _reduced(torch.min), aten.logsumexp: _reduced(torch.logsumexp),
    aten.view: _method("view"), aten._unsafe_view: _method("view"), aten.reshape: _method("reshape"),
    aten.expand: lambda args, kwargs: _method("expand")(args[:2], {}), aten.repeat: _method("repeat"),
    aten.repeat_interleave: lambda args, kwargs: ("call_function", torch.repeat_interleave,
                                                  (args[0], args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                   args[2] if len(args) > 2 else kwargs.get("dim")), {}),
    aten.expand_as: lambda args, kwargs: ("call_method", "expand_as", args[:2], {}),
    aten.permute: _same(torch.permute), aten.transpose: _same(torch.transpose), aten.t: _same(torch.t),
    **{packet: (lambda args, kwargs: ("call_function", torch.transpose, (args[0], -2, -1), {}))
       for packet in (aten.mT, aten.mH, aten.adjoint)},  # x.mT: the last two dims swapped
    aten.unsqueeze: _same(torch.unsqueeze), aten.squeeze: _same(torch.squeeze),
    aten.flatten: _same(torch.flatten), aten.unflatten: _same(torch.unflatten),
    aten.cat: _same(torch.cat), aten.concat: _same(torch.cat), aten.stack: _same(torch.stack),
    aten.split: _same(torch.split), aten.split_with_sizes: _same(torch.split), aten.chunk: _same(torch.chunk),
    aten.unbind: _same(torch.unbind),
    aten.matmul: _same(torch.matmul), aten.mm: _same(torch.matmul), aten.bmm: _same(torch.bmm),
    aten.addmm: _same(torch.addmm, 3), aten.baddbmm: _same(torch.baddbmm),
    aten.scaled_dot_product_attention: _same(F.scaled_dot_product_attention),
    aten.linalg_vector_norm: _vector_norm, aten.sym_size: _sized,
    # ops that pick or write positions given by an index (graphprune/analysis/rules/indexing.py)
    **{packet: _same(getattr(torch, packet.__name__.rstrip("_"))) for packet in (
        aten.gather, aten.index_select, aten.topk, aten.sort, aten.argsort, aten.argmax, aten.argmin, aten.nonzero,
        aten.argwhere, aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce,
        aten.scatter_reduce_, aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_, aten.index_fill,
        aten.index_fill_, aten.index_put, aten.index_put_, aten.zeros_like, aten.ones_like, aten.empty_like,
        aten.full_like, aten.rand_like, aten.randn_like)},
    # ops that reorder, sample or accumulate along a dim (graphprune/analysis/rules/reorder.py)
    aten.cdist: _same(torch.cdist, 2), aten._cdist_forward: _same(torch.cdist, 2), aten.bilinear: _same(F.bilinear, 4),
    aten.prod: _reduced(torch.prod),
    aten.flip: _same(torch.flip), aten.roll: _same(torch.roll), aten.channel_shuffle: _same(torch.channel_shuffle),
    **{getattr(aten, name): _same(getattr(torch, name), 2) for name in ("cumsum", "cumprod", "cummax", "cummin",
                                                                         "logcumsumexp")},
    aten.im2col: _same(F.unfold, 2), aten.col2im: _same(F.fold, 3),
    aten.grid_sampler: _same(F.grid_sample, 2), aten.grid_sampler_2d: _same(F.grid_sample, 2),
    # tensors made from a size (graphprune/analysis/rules/creation.py)
    **{getattr(aten, name): _same(getattr(torch, name), 2 if name == "full" else 1)
       for name in ("zeros", "ones", "empty", "full")},
    **{getattr(aten, f"new_{name}"): (lambda args, kwargs, n=f"new_{name}", k=3 if name == "full" else 2:
                                      ("call_method", n, args[:k], {})) for name in ("zeros", "ones", "empty", "full")},
    aten.nonzero_numpy: lambda args, kwargs: ("call_function", torch.where, args[:1], {}),
    # grouped products of mixture-of-experts layers (torch >= 2.8); a library's op is named: it may not be loaded
    **({aten._grouped_mm: _same(torch._grouped_mm), "transformers::grouped_mm_fallback": _same(torch._grouped_mm)}
       if hasattr(torch, "_grouped_mm") else {}),
    aten.einsum: lambda args, kwargs: ("call_function", torch.einsum, (args[0], *args[1]), {}),
    aten.outer: _same(torch.outer), aten.glu: _same(F.glu), aten.tensor_split: _same(torch.tensor_split),
    aten.pixel_shuffle: _same(F.pixel_shuffle), aten.pixel_unshuffle: _same(F.pixel_unshuffle),
    aten.cosine_similarity: _same(F.cosine_similarity, 3), aten.masked_fill: _same(torch.masked_fill),
    aten.masked_fill_: _same(torch.masked_fill), aten.view_as_complex: _same(torch.view_as_complex),
    aten.view_as_real: _same(torch.view_as_real),
    **{packet: _same(getattr(torch, packet.__name__)) for packet in (aten.lt, aten.le, aten.gt, aten.ge, aten.eq, aten.ne)},
    **{packet: (lambda args, kwargs, name=name: ("call_method", name, args[:2], {}))
       for packet, name in ((aten.reshape_as, "reshape_as"), (aten.view_as, "view_as"))},
    # recurrent layers; both overloads (.input, and .data for a PackedSequence) are the one torch call
    aten.lstm: _same(torch.lstm), aten.gru: _same(torch.gru), aten.rnn_tanh: _same(torch.rnn_tanh),
    aten.rnn_relu: _same(torch.rnn_relu),
    **{getattr(aten, name): _same(getattr(torch, name))
       for name in ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")},
}
def _reversed_dims(args: tuple, kwargs: dict, ndim: int) -> Call:
    """``aten.numpy_T(x)`` (``x.T``) is ``x.permute(ndim - 1, …, 0)``."""
    return "call_function", torch.permute, (args[0], tuple(range(ndim - 1, -1, -1))), {}


# ops whose torch form needs the number of dims of their first argument
_INDEXING: dict = {aten.slice: _slice, aten.select: _select, aten.index: _advanced, aten.numpy_T: _reversed_dims}
# checks torch.export inserts; they compute nothing
_CHECKS = (aten._assert_tensor_metadata, aten._assert_scalar, aten._assert_async, aten.sym_constrain_range_for_size,
           aten.sym_constrain_range)


def is_check(target: Any) -> bool:
    """Whether ``target`` is an assertion torch.export inserted (it can be left out)."""
    return getattr(target, "overloadpacket", None) in _CHECKS


def torch_call(target: Any, args: tuple, kwargs: dict, ndim: Optional[int]) -> Optional[Call]:
    """``(op, target, args, kwargs)`` of the torch call the aten ``target`` stands for, or
    None where there is none (the node is kept as it is). ``ndim`` is the number of dims of
    the first argument, where it is a tensor."""
    packet = getattr(target, "overloadpacket", None)
    if packet in _INDEXING and ndim:
        return _INDEXING[packet](args, kwargs, ndim)
    form = TORCH_FORMS.get(packet, TORCH_FORMS.get(getattr(packet, "_qualified_op_name", None)))
    return None if form is None else form(tuple(args), dict(kwargs))
