"""The state the rules share while channel identity propagates through the traced graph.

A tensor's *labels* are a tuple with one id array per dimension (``[-1]`` for size-1 dims);
a multi-output node carries a tuple of labels, a non-tensor value carries ``None``.
Rules (see :mod:`graphprune.analysis.rules`) read their inputs' labels, unify ids and return the
output labels. Parameters take part through their own ids: a module rule unifies tensor
labels with its parameters' dimensions, which makes those dimensions group *members*.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphprune.tracer import TensorSpec

from .channels import NO_ID, ChannelSpace
from .parametrized import follow, parametrized_weights
from .reasons import Assumption, BlockKind, Reason


@dataclass
class ParamDim:
    """One dimension of one parameter or buffer, with the ids of its positions."""

    tensor: torch.Tensor
    dim: int
    ids: np.ndarray
    role: str  # "out" (producer rows), "in" (consumer columns), "scale", "shift", "stat", "param"
    owners: list = field(default_factory=list)  # [(module name, attribute name)]

    @property
    def name(self) -> str:
        module, attr = self.owners[0]
        return f"{module}.{attr}" if module else attr


@dataclass
class AttrMember:
    """A module attribute (``out_channels``, ``groups``...) that follows the kept count of ``ids``.

    ``update(current_value, kept_count)`` returns the attribute's new value.
    """

    module: str
    attr: str
    ids: np.ndarray
    update: Callable[[Any, int], Any]


@dataclass
class SizeConstraint:
    """A dim (``ids``) whose size is read off another dim (``source``) divided by ``divisor``:
    after pruning, ``len(kept ids) * divisor`` must equal ``len(kept source)``."""

    ids: np.ndarray
    source: np.ndarray
    divisor: int
    node: str


class Propagation:
    """State shared by the rules while walking the graph."""

    def __init__(self, graph: nx.DiGraph, prune_heads: bool = False):
        self.graph = graph
        self.prune_heads = prune_heads  # splits (…, heads, head_dim) keep whole heads as channels
        self.model: nn.Module = graph.graph["model"]
        self.space = ChannelSpace()
        self.labels: dict[str, Any] = {}
        self.param_dims: dict[tuple[int, int], ParamDim] = {}
        self.attr_members: list[AttrMember] = []
        self.notes: dict[int, str] = {}  # set index -> why pruning it is approximate
        self.assumptions: dict[int, Assumption] = {}  # set index -> a size only the shape audit can confirm follows
        # node key -> (ids of the tensor dim a size was read off, divisor), or a tuple of
        # them for a whole shape: sizes computed from shapes, which follow the pruning
        self.size_sources: dict[str, Any] = {}
        self.size_constraints: list[SizeConstraint] = []
        self.part = ""  # graph-key prefix of the traced part being processed (see tracer.fallback)
        self._modules = dict(self.model.named_modules(remove_duplicate=False))  # every path, for lookups
        self._owner_names = _tensor_owners(self._modules)
        self._parametrized = parametrized_weights(self._modules)  # inside parametrize.cached(): see propagate()
        self._computed: dict[tuple[int, int], np.ndarray] = {}  # (id of a parametrized weight, dim) -> ids

    # ----- reading the node being processed
    def node_attrs(self, node: fx.Node) -> dict:
        """The graph attributes of an fx node of the part being processed."""
        return self.graph.nodes[self.part + node.name]

    def value(self, arg: Any) -> Any:
        """The recorded value (TensorSpec, tuple, int...) of an fx argument."""
        if isinstance(arg, fx.Node):
            return self.node_attrs(arg)["value"]
        return arg

    def labels_of(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.labels.get(self.part + arg.name)
        return None

    def size_source(self, arg: Any) -> Any:
        """Where the size ``arg`` (an fx node) was read: see ``size_sources``; None if unknown."""
        return self.size_sources.get(self.part + arg.name) if isinstance(arg, fx.Node) else None

    def qualname(self, node: fx.Node) -> str:
        """Qualified name (from the model's root) of the module a node calls or runs in."""
        return self.node_attrs(node)["module"] or ""

    def module(self, name: str) -> nn.Module:
        found = self._modules.get(name or "")
        return found if found is not None else self.model.get_submodule(name)

    # ----- creating ids
    def fresh(self, value: Any, description: str, blocked: Optional[str], first_dim: int = 0) -> Any:
        """Fresh labels for every tensor in ``value`` (blocked with ``blocked`` if given); for
        a tensor with ``first_dim``, only for its dims from that one on (the caller has the rest)."""
        if isinstance(value, TensorSpec):
            return tuple(
                np.array([NO_ID]) if size == 1 else self.space.new_set(size, f"{description} dim {d}", blocked)
                for d, size in enumerate(value.shape) if d >= first_dim
            )
        if isinstance(value, (tuple, list)):
            return tuple(self.fresh(v, description, blocked, first_dim) for v in value)
        if isinstance(value, dict):
            return {k: self.fresh(v, f"{description}[{k!r}]", blocked, first_dim) for k, v in value.items()}
        return None

    def param_ids(self, tensor: torch.Tensor, dim: int, role: str, like: Optional[np.ndarray] = None) -> np.ndarray:
        """Ids of ``tensor``'s dimension ``dim``; the same ids every time (shared and tied weights).

        A dimension seen for the first time gets fresh ids, or ``like`` itself when those are
        as many channel ids of one set (the caller unifies the two anyway, see :meth:`bind`;
        ids from several sets, as after a concat, need a set of their own to join them).
        """
        dim = dim % tensor.dim()
        if tensor.shape[dim] == 0:  # no position to label (a zero-size layer): no member either
            return np.zeros(0, dtype=np.int64)
        key = (id(tensor), dim)
        member = self.param_dims.get(key)
        if member is None:
            owners = self._owner_names.get(id(tensor))
            if owners is None and id(tensor) in self._parametrized:
                return self._computed_ids(tensor, dim, role)
            if owners is None or not (tensor.is_floating_point() or tensor.is_complex()):
                return self._not_a_member(tensor, dim, owners)
            size = tensor.shape[dim]
            if size == 1:
                ids = np.array([NO_ID])
            elif like is not None and like.size == size and like.min() >= 0 and self.space.one_set(like):
                ids = like
            else:
                ids = self.space.new_set(size, f"{owners[0][0]}.{owners[0][1]} dim {dim}")
            member = ParamDim(tensor, dim, ids, role, owners)
            self.param_dims[key] = member
        elif member.role == "param" and role != "param":  # read directly first, then found to be a layer's
            member.role = role
        return member.ids

    def _computed_ids(self, weight: torch.Tensor, dim: int, role: str) -> np.ndarray:
        """Ids of dim ``dim`` of a weight a parametrization computes, tied to the tensors it is
        computed from (see :mod:`graphprune.analysis.parametrized`), or blocked."""
        key = (id(weight), dim)
        if key in self._computed:
            return self._computed[key]
        module, attr = self._parametrized[id(weight)]
        if weight.shape[dim] == 1:
            ids = np.array([NO_ID])
        else:
            ids = self.space.new_set(weight.shape[dim], f"{attr} of {type(module).__name__} dim {dim}")

        def bind(source: torch.Tensor, source_dim: int, spread: Optional[Callable]) -> None:
            kind = role if isinstance(source, nn.Parameter) else "stat"
            self.unify(ids if spread is None else spread(ids), self.param_ids(source, source_dim, kind))

        why, approximate = follow(bind, module, attr, weight, dim) if ids.size > 1 else (None, None)
        if approximate is not None:
            self.note(ids, approximate)
        if why is not None:
            self.space.block(ids, Reason(BlockKind.NOT_A_PARAMETER, f"{why}; remove it (torch.nn.utils.parametrize."
                                                                    "remove_parametrizations) to prune these channels"))
        self._computed[key] = ids
        return ids

    def _not_a_member(self, tensor: torch.Tensor, dim: int, owners: Optional[list]) -> np.ndarray:
        """Blocked ids for a tensor dim that cannot be pruned: an integer tensor (indices,
        not channels), or one that no module holds (computed on each call)."""
        if owners is None:
            reason = Reason(BlockKind.NOT_A_PARAMETER, (
                "a weight computed on each call, not a parameter or buffer (a parametrization such as "
                "weight_norm or spectral_norm?); remove it (torch.nn.utils.parametrize."
                "remove_parametrizations) to prune these channels"))
            name = "<computed tensor>"
        else:
            name = f"{owners[0][0]}.{owners[0][1]}" if owners[0][0] else owners[0][1]
            reason = Reason(BlockKind.NOT_A_PARAMETER, f"{name} holds {tensor.dtype} values (indices, not channels)")
        size = tensor.shape[dim]
        return np.array([NO_ID]) if size == 1 else self.space.new_set(size, f"{name} dim {dim}", reason)

    def attr(self, module: str, attr: str, ids: np.ndarray, update: Callable[[Any, int], Any]) -> None:
        self.attr_members.append(AttrMember(module, attr, ids, update))

    # ----- taking back a failed rule
    def checkpoint(self) -> tuple:
        """What :meth:`rollback` needs to take back everything recorded after this point (sizes
        only: a checkpoint is taken before every rule)."""
        return (self.space.checkpoint(), len(self.param_dims), len(self._computed), len(self.attr_members),
                len(self.size_constraints), len(self.size_sources), len(self.notes), len(self.assumptions))

    def rollback(self, mark: tuple) -> None:
        """Forget the links, blocks, members, attributes, sizes and notes recorded since ``mark``
        (sets allocated since stay, unlinked: they join no group)."""
        space, members, computed, attrs, constraints, sources, notes, assumptions = mark
        self.space.rollback(space)
        tables = ((self.param_dims, members), (self._computed, computed), (self.size_sources, sources),
                  (self.notes, notes), (self.assumptions, assumptions))
        for table, size in tables:
            for key in list(table)[size:]:  # dicts keep insertion order
                del table[key]
        del self.attr_members[attrs:], self.size_constraints[constraints:]

    # ----- relations
    def tensor_ids(self, ref: Any, dim: int, role: str, like: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Ids of dimension ``dim`` of ``ref``: a parameter or buffer (a member with ``role``),
        an fx argument (the parameter it reads, or the labels of a tensor computed in the
        graph, such as a standardised weight), or None for no tensor."""
        if isinstance(ref, torch.Tensor):
            return self.param_ids(ref, dim, role, like)
        if not isinstance(ref, fx.Node):
            return None
        tensor = self.node_attrs(ref).get("tensor") if ref.op == "get_attr" else None
        if tensor is not None:
            return self.param_ids(tensor, dim, role, like)
        labels = self.labels_of(ref)
        return labels[dim] if isinstance(labels, tuple) and labels and isinstance(labels[0], np.ndarray) else None

    def shape_of(self, ref: Any) -> Optional[tuple]:
        """The shape of a tensor ``ref`` (as for :meth:`tensor_ids`), or None."""
        if isinstance(ref, torch.Tensor):
            return tuple(ref.shape)
        value = self.value(ref) if isinstance(ref, fx.Node) else None
        return tuple(value.shape) if isinstance(value, TensorSpec) else None

    def bind(self, ids: np.ndarray, ref: Any, dim: int, role: str) -> None:
        """Make dimension ``dim`` of the tensor ``ref`` (see :meth:`tensor_ids`) carry the channels ``ids``."""
        other = self.tensor_ids(ref, dim, role, like=ids)
        if other is not None:
            self.unify(ids, other)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self.space.union(a, b)

    def block(self, labels: Any, reason: str) -> None:
        """Block every id found in (nested) ``labels``."""
        for ids in iter_arrays(labels):
            self.space.block(ids, reason)

    def note(self, ids: np.ndarray, why: str) -> None:
        """Record that pruning ``ids`` is not exact (e.g. it changes normalisation statistics)."""
        _record(self.space, self.notes, ids, why)

    def assume(self, ids: np.ndarray, why: Assumption) -> None:
        """Record that pruning ``ids`` relies on a size that only the shape audit can confirm."""
        _record(self.space, self.assumptions, ids, why)


def _record(space: ChannelSpace, table: dict, ids: np.ndarray, why: str) -> None:
    """``table[set index] = why`` (the first reason kept) for every set ``ids`` fall in."""
    ids = ids[ids >= 0]
    for set_index in np.unique(space.set_of(ids)) if ids.size else ():
        table.setdefault(int(set_index), why)


def iter_arrays(labels: Any):
    """Every id array in (nested) ``labels``."""
    if isinstance(labels, np.ndarray):
        yield labels
    elif isinstance(labels, (tuple, list, dict)):
        for item in labels.values() if isinstance(labels, dict) else labels:
            yield from iter_arrays(item)


def _tensor_owners(modules: dict[str, nn.Module]) -> dict[int, list]:
    """Every (module name, attribute) under which each parameter or buffer is registered."""
    owners: dict[int, list] = {}
    for module_name, module in modules.items():
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                entry = (module_name, attr)
                if entry not in owners.setdefault(id(tensor), []):
                    owners[id(tensor)].append(entry)
    return owners
