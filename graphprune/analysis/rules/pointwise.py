"""Rules for elementwise ops, reductions, functional pooling and graph boundaries."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from graphprune.analysis.channels import NO_ID
from graphprune.analysis.propagation import Propagation
from graphprune.tracer import TensorSpec

from ..reasons import BlockKind, Reason
from .layers import SPATIAL, normalize_over, resampled
from .reshape import arg, carries_ids


def elementwise(state: Propagation, node: fx.Node):
    """Broadcasting n-ary op (``masked_fill``'s mask and comparisons too): dims of equal size
    unify; a size-1 dim couples nothing."""
    tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    return broadcast(state, tensors, state.value(node).shape)


def broadcast(state: Propagation, tensors: list, out_shape: tuple) -> tuple:
    """The labels of ``tensors`` (fx arguments; non-tensors skipped) broadcast to ``out_shape``."""
    operands = [(state.labels_of(a), state.value(a).shape) for a in tensors if isinstance(state.value(a), TensorSpec)]
    out = []
    for d, size in enumerate(out_shape):
        lead = len(out_shape) - d
        aligned = [x[len(x) - lead] for x, shape in operands if len(shape) >= lead and shape[len(shape) - lead] == size]
        for other in aligned[1:]:
            state.unify(aligned[0], other)
        out.append(aligned[0] if aligned else np.array([NO_ID]))
    return tuple(out)


def unary(state: Propagation, node: fx.Node):
    """Ops applied value by value to their first argument (activations, casts, clones)."""
    return state.labels_of(node.args[0])


_AVERAGES = ("mean", "var", "std")  # statistics divided by the count of what they reduce


def _uses_indices(node: fx.Node) -> bool:
    """Whether the positions ``max`` / ``min`` found are read (``[1]``, ``.indices``): along
    channels they are channel numbers, which pruning renumbers."""
    return any((user.target is operator.getitem and user.args[1:] == (1,) or
                user.target is getattr and user.args[1:] == ("indices",)) and user.users for user in node.users)


def reduction(state: Propagation, node: fx.Node):
    """sum/mean/amax...: reduced dims vanish (or become size 1). A sum over channels is exact
    (dead channels add nothing); an average over them (a hand-written RMSNorm's ``mean``)
    changes with their count, and a max, a min or a logsumexp (CBAM's channel pooling) with
    the values left, which makes pruning approximate (a note); the positions of a max or min
    over channels are channel numbers, which block."""
    x = state.labels_of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    if isinstance(dims, fx.Node):  # torch.max(a, b) is elementwise
        return elementwise(state, node)
    keepdim = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else node.kwargs.get("keepdim", False)
    dims, out = _reduced(x, dims, keepdim)
    name = _name(node)
    for d in dims:
        if name in _AVERAGES:
            state.note(x[d], f"{node.name} averages over this dimension (a {name} of fewer values after pruning)")
        elif name == "prod":  # a zero (dead) channel zeroes the product
            state.block(x[d], Reason(BlockKind.COLLAPSED, f"{node.name} multiplies over this dimension"))
        elif not isinstance(state.value(node), TensorSpec) and _uses_indices(node):
            state.block(x[d], Reason(BlockKind.COLLAPSED, f"{node.name} finds positions along this dimension"))
        elif name != "sum":
            state.note(x[d], f"{node.name} reduces over this dimension (a {name} of fewer values after pruning)")
    if not isinstance(state.value(node), TensorSpec):  # max/min with a dim also return indices
        return (out, out)
    return out


def vector_norm(state: Propagation, node: fx.Node):
    """``torch.norm(x, p, dim, keepdim)`` / ``x.norm(...)`` / ``torch.linalg.vector_norm(x, ord, dim,
    keepdim)``: a p-norm over ``dim`` reduces as a sum does (a dead channel adds nothing to it),
    exactly; a norm of order 0 or below (a count) blocks the dims it reduces."""
    x = state.labels_of(node.args[0])
    p = arg(node, 1, "ord" if "vector" in _name(node) else "p", 2)
    p = 2 if p == "fro" else p  # torch.norm's default: the 2-norm over the dims
    dims, out = _reduced(x, arg(node, 2, "dim"), bool(arg(node, 3, "keepdim", False)))
    if not isinstance(p, (int, float)) or p <= 0:
        state.block(tuple(x[d] for d in dims), Reason(BlockKind.COLLAPSED, f"{node.name}: a norm of order {p!r}"))
    return out


def _reduced(x: tuple, dims, keepdim: bool) -> tuple:
    """``(the set of dims reduced, the labels left)`` for a reduction of ``x`` over ``dims``
    (an int, a sequence, or None for all), which vanish or, with ``keepdim``, become size 1."""
    dims = range(len(x)) if dims is None else dims if isinstance(dims, (tuple, list, range)) else [dims]
    dims = {d % len(x) for d in dims}
    return dims, tuple(np.array([NO_ID]) if d in dims else ids for d, ids in enumerate(x) if keepdim or d not in dims)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def spatial(state: Propagation, node: fx.Node):
    """Functional pooling and interpolation: the dims they change are those the name says
    (``avg_pool2d``: two), or every dim after the channels."""
    x = state.labels_of(node.args[0])
    name = getattr(node.target, "__name__", "")
    if name[-2:] in ("1d", "2d", "3d"):
        n_dims = int(name[-2])
    else:
        n_dims = len(x) - 2
    return resampled(state, node, x, n_dims)


def cosine_similarity(state: Propagation, node: fx.Node):
    """``F.cosine_similarity(x1, x2, dim, eps)`` and ``nn.CosineSimilarity``: ``x1 · x2 / (|x1| |x2|)``
    over ``dim`` of the broadcast inputs, which unify as an elementwise product's and lose ``dim``.
    A dead channel (zero in both) adds nothing to the dot product nor to either norm, so removing
    it is exact, as for a sum."""
    if node.op == "call_module":
        dim = state.module(state.qualname(node)).dim
    else:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 1)
    x1, x2 = node.args[:2]
    full = broadcast(state, [x1, x2], torch.broadcast_shapes(state.value(x1).shape, state.value(x2).shape))
    dim %= len(full)
    return full[:dim] + full[dim + 1 :]


def pad(state: Propagation, node: fx.Node):
    """``F.pad(x, pad)``: ``pad`` holds a (before, after) pair per dim, from the last dim
    back. A dim padded by (0, 0) passes through; any other gets new positions (its ids blocked)."""
    x = state.labels_of(node.args[0])
    amounts = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
    out, fresh = list(x), state.fresh(state.value(node), f"{node.name} padded", SPATIAL)
    for i in range(len(amounts) // 2):
        d = len(x) - 1 - i
        if amounts[2 * i] == 0 and amounts[2 * i + 1] == 0:  # Nodes (computed amounts) compare unequal
            continue
        state.block(x[d], Reason(BlockKind.COLLAPSED, f"{node.name} pads this dimension"))
        out[d] = fresh[d]
    return tuple(out)


def softmax(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    state.block(x[dim] if dim is not None else x, Reason(BlockKind.COLLAPSED, f"{node.name} normalises over this dimension"))
    return x


def normalize(state: Propagation, node: fx.Node):
    """``F.normalize(x, p, dim)``: every value is divided by the p-norm over ``dim``. A dead
    channel (zero) adds nothing to a norm of positive order, so removing it is exact, as for
    a sum (torch.export writes the same as a norm, then a division by it expanded); a norm of
    order 0 or below counts or inverts zeros, and blocks."""
    x = state.labels_of(node.args[0])
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 2.0)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 1)
    if not isinstance(p, (int, float)) or p <= 0:
        state.block(x[dim], Reason(BlockKind.COLLAPSED, f"{node.name} normalises over this dimension by a norm of order {p}"))
    return x


def rms_norm(state: Propagation, node: fx.Node):
    """``F.rms_norm(x, normalized_shape, weight, eps)``: as :func:`layer_norm`, without a bias."""
    return layer_norm(state, node, has_bias=False)


def layer_norm(state: Propagation, node: fx.Node, has_bias: bool = True):
    """F.layer_norm: the shape literal must come from a module attribute we can update."""
    x = state.labels_of(node.args[0])
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = (node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")) if has_bias else None
    owner = state.qualname(node)
    module = state.module(owner)
    if tuple(getattr(module, "normalized_shape", ())) != tuple(shape):
        state.block(x[-len(shape) :], Reason(BlockKind.FIXED_SIZE, f"{node.name}: layer_norm shape is not a module attribute"))
        return x
    normalize_over(state, owner, x, weight, bias, len(shape))
    return x


def metadata(state: Propagation, node: fx.Node):
    """size(), dim(), .shape, len() and arithmetic on them: values, not tensors. A size read
    off a tensor's dim (``x.shape[2]``, ``x.size(-1)``, ``C // heads``) is remembered with
    that dim's ids, so that a reshape sized by it follows the pruning (see
    :func:`graphprune.analysis.rules.reshape.reshape_labels`)."""
    source = _size_source(state, node)
    if source is not None:
        state.size_sources[state.part + node.name] = source
    return None


def attribute(state: Propagation, node: fx.Node):
    """``getattr(x, name)``: ``x.T`` / ``x.H`` reverse the dims, ``x.mT`` / ``x.mH`` swap the
    last two (tensors, as ``transpose``); any other attribute (``x.shape``) is :func:`metadata`."""
    name = node.args[1] if len(node.args) > 1 else None
    if name in ("T", "H", "mT", "mH") and isinstance(state.value(node), TensorSpec):
        x = state.labels_of(node.args[0])
        return tuple(reversed(x)) if name in ("T", "H") else x[:-2] + (x[-1], x[-2])
    return metadata(state, node)


def _size_source(state: Propagation, node: fx.Node):
    """``(ids, divisor)`` of a size node, a tuple of them for a whole shape, or None."""
    args = node.args
    if node.op == "call_method" and node.target == "size" or node.target is getattr and args[1:] == ("shape",):
        x = state.labels_of(args[0])
        if not isinstance(x, tuple) or not x or not isinstance(x[0], np.ndarray):
            return None
        dim = args[1] if node.target == "size" and len(args) > 1 else node.kwargs.get("dim")
        return (x[dim], 1) if isinstance(dim, int) else tuple((ids, 1) for ids in x)
    source = state.size_source(args[0]) if args else None
    if node.target is operator.getitem and isinstance(source, tuple) and isinstance(args[1], (int, slice)):
        return source[args[1]] if not isinstance(source[0], np.ndarray) else None
    if node.target is operator.add and len(args) == 2 and all(isinstance(a, (fx.Node, tuple)) for a in args):
        return _joined_shape(state, args)
    if node.target is operator.mul and len(args) == 2:
        return _product(state, args)
    if node.target is operator.floordiv and source is not None and isinstance(source[0], np.ndarray) \
            and isinstance(args[1], int) and args[1] > 0:
        return source[0], source[1] * args[1]
    return None


def _product(state: Propagation, factors: tuple):
    """``a * b`` of sizes read off shapes, one of a dim that may carry channels and the other of
    one that does not (``c * h`` of ``b, c, h, w = x.shape``): the size of that dim flattened
    with the other's positions (each of its ids as many times as the other's value), so that it
    follows the pruning as a flatten does. None where both, or neither, may carry channels, or
    a factor is not read off a shape (a literal, or ``c + 1``, may not stay what it was)."""
    sources = [state.size_source(f) for f in factors]
    if any(s is None or not isinstance(s[0], np.ndarray) for s in sources):
        return None
    carriers = [i for i, s in enumerate(sources) if carries_ids(state, s[0])]
    other = state.value(factors[1 - carriers[0]]) if len(carriers) == 1 else None
    if type(other) is not int or other < 1:
        return None
    ids, divisor = sources[carriers[0]]
    return np.repeat(ids, other), divisor


def _joined_shape(state: Propagation, parts: tuple):
    """``shape + shape``: the sources of both (literal sizes kept as ints), or None."""
    joined = ()
    for part in parts:
        source = state.size_source(part) if isinstance(part, fx.Node) else tuple(part)
        if not isinstance(source, tuple) or source and isinstance(source[0], np.ndarray):
            return None  # not a whole shape
        joined += source
    return joined


def placeholder(state: Propagation, node: fx.Node):
    if state.part:
        where = Reason(BlockKind.UNTRACED_INPUT, f"input of traced part '{state.part[:-1]}'")
    else:
        where = Reason(BlockKind.MODEL_INPUT, "model input")
    return state.fresh(state.value(node), f"input {node.name}", where)


def get_attr(state: Propagation, node: fx.Node):
    """A parameter read directly (layer scale, class token...): each dim is a member."""
    tensor = state.node_attrs(node).get("tensor")
    if tensor is None:
        return state.fresh(state.value(node), node.name, Reason(BlockKind.NOT_A_PARAMETER, "constant created by the tracer"))
    return tuple(state.param_ids(tensor, d, "param") for d in range(tensor.dim()))


def output(state: Propagation, node: fx.Node):
    if state.part:
        where = Reason(BlockKind.UNTRACED_OUTPUT, f"leaves traced part '{state.part[:-1]}'")
    else:
        where = Reason(BlockKind.MODEL_OUTPUT, "reaches output")
    for source in node.all_input_nodes:
        state.block(state.labels_of(source), where)
    return None
