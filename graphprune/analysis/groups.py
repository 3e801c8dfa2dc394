"""Coupled channel groups, built from a finished propagation."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .channels import per_array
from .propagation import ParamDim, Propagation
from .reasons import BlockKind, Reason

_UNMET = Reason(BlockKind.NOT_A_CHANNEL, "read in the graph, but no op takes this dimension as channels")


@dataclass(eq=False)
class Member:
    """One parameter dimension that shrinks when the group is pruned.

    ``index_map[i]`` is the group channel that position ``i`` along ``dim`` belongs to
    (several positions map to one channel after a flatten or a grouped conv).
    """

    module: str
    param: str
    dim: int
    index_map: np.ndarray
    role: str
    tensor: torch.Tensor = field(repr=False)
    aliases: list = field(default_factory=list)  # other (module, param) owning the same tensor (tied weights)

    @property
    def name(self) -> str:
        """The parameter's qualified name, ``"module.param"``."""
        return f"{self.module}.{self.param}" if self.module else self.param


@dataclass(eq=False)
class Group:
    """A set of channels that must be removed together from every member."""

    id: int
    size: int
    members: list
    blocked: list  # reasons; empty when prunable
    notes: list  # why pruning is approximate rather than exact; empty when exact
    param_share: float = 0.0
    assumptions: list = field(default_factory=list)  # sizes only the shape audit confirms (torch.export literals)
    units: np.ndarray = field(repr=False, default=None)  # root id of each channel
    _surgery: Optional[object] = field(repr=False, default=None)  # the ChannelSurgery it belongs to
    _session: Optional[object] = field(repr=False, default=None)  # the PruningSession that analysed it

    @property
    def prunable(self) -> bool:
        """Whether the group can be pruned: nothing blocks it and it has two channels or more."""
        return not self.blocked and self.size >= 2

    @property
    def exact(self) -> bool:
        """Whether pruning it is exact (no note says it is approximate)."""
        return not self.notes

    @property
    def root(self) -> str:
        """The first layer producing the group's channels (its name in the report). A group
        no layer produces, such as the model input's channels, is named by its first reader
        in angle brackets: ``"<input of conv1>"``."""
        producers = [m for m in self.members if m.role in ("out", "param")]
        if producers:
            return producers[0].module or producers[0].name
        return f"<input of {self.members[0].module or self.members[0].name}>"

    @property
    def status(self) -> str:
        """``"prunable"`` (with the notes when approximate) or ``"blocked: "`` and the reasons."""
        if self.blocked:
            return "blocked: " + "; ".join(self.blocked)
        if self.size < 2:
            return "blocked: a single channel"
        return "prunable" if self.exact else "prunable (approximate: " + "; ".join(self.notes) + ")"

    def layers(self) -> list:
        """List the modules with a member in this group (tied aliases included).

        Returns
        -------
        list of str
            Module names in graph order, without repeats.
        """
        return list(dict.fromkeys(name for m in self.members for name in [m.module] + [a[0] for a in m.aliases]))

    def producer_layers(self) -> list:
        """List the names a per-layer option (a ratio mapping's key) is matched against.

        Returns
        -------
        list of str
            The group's producer layers (role ``"out"``) in graph order, else :meth:`layers`.
        """
        producers = list(dict.fromkeys(m.module for m in self.members if m.role == "out"))
        return producers or self.layers()

    def lookup(self, options: Mapping, default: Any = None) -> Any:
        """Look up the value of the first key of ``options`` that names this group.

        Precedence: the group's id, then an exact name, then the first matching glob in the
        mapping's order.

        Parameters
        ----------
        options : mapping
            Keys are group ids (``int``) or module names / ``fnmatch`` globs matched against
            :meth:`producer_layers`.
        default : object, default None
            What to return when no key names the group.

        Returns
        -------
        object
            The value of the matching key, else ``default``.
        """
        if self.id in options and isinstance(self.id, int):
            return options[self.id]
        names = self.producer_layers()
        for key, value in options.items():
            if isinstance(key, str) and key in names:
                return value
        for key, value in options.items():
            if isinstance(key, str) and any(fnmatch.fnmatchcase(n, key) for n in names):
                return value
        return default

    def members_by_index_map(self) -> list:
        """Pick the first member with each distinct ``index_map`` array.

        Members bound to the same channel ids share one array, so a per-map check need run
        only once per array.

        Returns
        -------
        list of Member
            One member per distinct array, in member order.
        """
        first: dict[int, Member] = {}
        for m in self.members:
            first.setdefault(id(m.index_map), m)
        return list(first.values())

    def prune(self, indices: Sequence[int]) -> None:
        """Remove channels from every member of this group, as one transaction.

        The pruned model is audited: if the audit fails, the model is restored and the group
        blocked with the reason.

        Parameters
        ----------
        indices : sequence of int
            The channels to remove, ``0 <= i < size``.

        Raises
        ------
        RuntimeError
            The group is not attached to a model (not from :func:`graphprune.analyze`).
        TypeError
            ``indices`` are not integers.
        ValueError
            The indices are out of range, repeated or take every channel (of the group or of
            a member), the group is blocked or pruned already, or the model changed since.
        PruningError
            The pruning failed the audit or the surgery; the model was restored.
        """
        if self._session is None:
            raise RuntimeError("this group is not attached to a model; take it from graphprune.analyze's report")
        self._session.apply({self: indices}, strict=True)


def build_groups(state: Propagation, roots: np.ndarray) -> list[Group]:
    """Cut the channel space into groups; keep those with at least one member.

    ``roots`` is the root (smallest unified id) of every id (``state.space.all_roots()``).
    """
    space = state.space
    component = space.set_components(roots)
    set_starts = np.array([s.start for s in space.sets], dtype=np.int64)
    set_sizes = np.array([s.size for s in space.sets], dtype=np.int64)

    by_component: dict[int, list[ParamDim]] = {}
    for member in state.param_dims.values():
        if member.ids[0] >= 0:
            by_component.setdefault(int(component[space.set_of(member.ids[:1])[0]]), []).append(member)
    sets_by_component: dict[int, list[int]] = {}
    for set_index, comp in enumerate(component):
        if int(comp) in by_component:
            sets_by_component.setdefault(int(comp), []).append(set_index)

    total = sum(p.numel() for p in state.model.parameters()) or 1
    groups = []
    for comp, param_dims in by_component.items():
        set_indices = sets_by_component[comp]
        ids = np.concatenate([np.arange(set_starts[s], set_starts[s] + set_sizes[s]) for s in set_indices])
        units = np.unique(roots[ids])
        blocked = list(dict.fromkeys(space.sets[s].blocked for s in set_indices if space.sets[s].blocked))
        if all(pd.role == "param" for pd in param_dims) and blocked and all(getattr(r, "kind", None) is BlockKind.NOT_A_CHANNEL for r in blocked):
            continue  # dims read in the graph that never carry channels (a kernel's): no group
        if len(param_dims) == 1 and len(set_indices) == 1 and param_dims[0].role == "param":
            blocked.append(_UNMET)  # a dim read in the graph that no op took as channels (a kernel, a vocabulary)
        notes = list(dict.fromkeys(state.notes[s] for s in set_indices if s in state.notes))
        assumptions = list(dict.fromkeys(state.assumptions[s] for s in set_indices if s in state.assumptions))
        index_map = per_array(lambda ids: np.searchsorted(units, roots[ids]))
        members = [
            Member(pd.owners[0][0], pd.owners[0][1], pd.dim, index_map(pd.ids), pd.role, pd.tensor, pd.owners[1:])
            for pd in param_dims
        ]
        distinct = {id(m.tensor): m.tensor.numel() for m in members if isinstance(m.tensor, torch.nn.Parameter)}
        groups.append(
            Group(
                id=len(groups),
                size=int(units.size),
                members=members,
                blocked=blocked,
                notes=notes,
                param_share=sum(distinct.values()) / total,
                assumptions=assumptions,
                units=units,
            )
        )
    return groups
