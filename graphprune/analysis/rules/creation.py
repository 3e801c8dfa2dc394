"""Rules for tensors made from a size: ``torch.zeros(b, c)``, ``x.new_zeros(size)``,
``torch.full(size, v)``. Their values do not depend on any channel, so each dim is new
positions that may carry channels (a buffer that ``index_add`` or ``+`` fills with channel
values), as long as its size follows the pruning: read off a tensor's shape, or a literal a
module attribute holds (or, under torch.export, an audited assumption). A size that cannot
follow blocks its dim (see :func:`graphprune.analysis.rules.reshape.follow_sizes`)."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from graphprune.analysis.propagation import Propagation

from ..reasons import BlockKind, Reason
from .reshape import follow_sizes

FACTORIES = ("zeros", "ones", "empty", "full")  # torch.<name>(size, ...), x.new_<name>(size, ...)


def _sizes(state: Propagation, node: fx.Node, first: int, filled: bool) -> list:
    """The size arguments from position ``first`` on: a list or tuple, a whole shape read in the
    graph (``x.new_zeros(h.shape)``: where each of its sizes was read), or the sizes spread out
    (the fill value of ``full`` / ``new_full`` follows a list)."""
    rest = list(node.args[first:])
    if not rest:
        rest = [node.kwargs.get("size")]
    if isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if isinstance(rest[0], fx.Node) and isinstance(state.value(rest[0]), (list, tuple)):
        whole = state.size_source(rest[0])
        return list(whole) if isinstance(whole, tuple) and not isinstance(whole[0], np.ndarray) else [rest[0]]
    return rest[:-1] if filled and len(rest) > 1 else rest


def _made(state: Propagation, node: fx.Node, first: int) -> tuple:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    out = list(state.fresh(state.value(node), f"{node.name} new", None))
    sizes = _sizes(state, node, first, name.endswith("full"))
    if len(sizes) == len(out):
        follow_sizes(state, node, out, state.value(node).shape, sizes)
    else:  # sizes this rule cannot pair with the dims
        state.block(tuple(out), Reason(BlockKind.FIXED_SIZE, f"{node.name}: sizes not understood"))
    return tuple(out)


def factory(state: Propagation, node: fx.Node):
    """``torch.zeros(*size)`` and the like: a new tensor whose dims follow their sizes."""
    return _made(state, node, 0)


def new_factory(state: Propagation, node: fx.Node):
    """``x.new_zeros(*size)`` and the like: as :func:`factory` (``x`` gives dtype and device only)."""
    return _made(state, node, 1)
