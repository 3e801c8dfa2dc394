"""Channel identities and their equivalence classes.

Every position of every dimension that may carry channels gets an integer id. Ids are
allocated in *sets* (one set per parameter dimension or per fresh tensor dimension) and
unified position by position; the links are resolved into classes once, as the
connected components of the graph they make. After propagation:

* a *unit* is an equivalence class of ids: positions that must be removed together;
* a *group* is a connected component of sets: everything whose size changes together.

A set may be *blocked*, with a reason; a group containing a blocked set is not prunable.
The id ``-1`` labels a size-1 dimension, which couples nothing (broadcasting).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

NO_ID = -1


def per_array(compute: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
    """``compute`` memoised by the identity of its array argument: nodes share their inputs'
    label arrays and bound members share their ids, so one result serves all of them. The
    cache keeps each array alive, so an ``id`` is never reused while it is a key."""
    results: dict[int, tuple] = {}

    def cached(array: np.ndarray) -> Any:
        found = results.get(id(array))
        if found is None:
            found = results[id(array)] = (array, compute(array))
        return found[1]

    return cached


def _grown(array: np.ndarray, used: int, capacity: int) -> np.ndarray:
    """A ``capacity``-long array starting with the first ``used`` entries of ``array``."""
    grown = np.empty(capacity, dtype=array.dtype)
    grown[:used] = array[:used]
    return grown


def _components(n: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    """``(count, label)``: the connected components of ``n`` nodes linked by ``a[i]``–``b[i]``,
    labelled in the order of their smallest node. Each round hooks the root of every link's
    larger end onto the smaller root, then points every node at its root: vectorised union-find,
    as fast as scipy's graph routine here, without importing scipy (tens of MiB) into every
    analysis."""
    parent = np.arange(n)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots, label = np.unique(parent, return_inverse=True)
    return roots.size, label


@dataclass
class ChannelSet:
    """A contiguous range of ids created together."""

    start: int
    size: int
    description: str
    blocked: Optional[str] = None


class ChannelSpace:
    """Allocator of channel ids plus the links that unify them; :meth:`all_roots` resolves
    the links into equivalence classes once, after propagation."""

    def __init__(self) -> None:
        self._set_of_id = np.zeros(1024, dtype=np.int64)
        self._n_ids = 0
        self._links: list[tuple[np.ndarray, np.ndarray]] = []
        self._blocks: list[int] = []  # the sets blocked, in order (so that a failed rule's blocks can be taken back)
        self.sets: list[ChannelSet] = []

    @property
    def n_ids(self) -> int:
        return self._n_ids

    def new_set(self, size: int, description: str, blocked: Optional[str] = None) -> np.ndarray:
        """Allocate ``size`` fresh ids; return them as an array."""
        start = self._n_ids
        end = start + size
        if end > self._set_of_id.size:
            self._set_of_id = _grown(self._set_of_id, start, max(end, 2 * self._set_of_id.size))
        self._set_of_id[start:end] = len(self.sets)
        self._n_ids = end
        self.sets.append(ChannelSet(start, size, description, blocked))
        return np.arange(start, end, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unify ``a[i]`` with ``b[i]`` for every ``i`` where neither is ``NO_ID``."""
        if a is b:
            return
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"cannot unify label arrays of sizes {a.size} and {b.size}")
        keep = (a >= 0) & (b >= 0)
        if keep.any():
            self._links.append((a[keep], b[keep]))

    def checkpoint(self) -> tuple:
        """The number of links and of blocks made so far (see :meth:`rollback`)."""
        return len(self._links), len(self._blocks)

    def rollback(self, mark: tuple) -> None:
        """Drop the links made, and the blocks set, since :meth:`checkpoint`."""
        links, blocks = mark
        del self._links[links:]
        for set_index in reversed(self._blocks[blocks:]):
            self.sets[set_index].blocked = None
        del self._blocks[blocks:]

    def block(self, ids: np.ndarray, reason: str) -> None:
        """Mark every set that owns one of ``ids`` as blocked (first reason wins)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[ids >= 0]
        if not ids.size:
            return
        for set_index in np.unique(self._set_of_id[ids]):
            channel_set = self.sets[set_index]
            if channel_set.blocked is None:
                channel_set.blocked = reason
                self._blocks.append(int(set_index))

    def blocked_by_links(self, ids: np.ndarray) -> bool:
        """Whether some id of ``ids`` is linked, through the links made so far, to a blocked set
        (resolving every link: call it only where that is rare)."""
        ids = ids[ids >= 0]
        if not ids.size:
            return False
        components = self.set_components(self.all_roots())
        blocked = {int(components[i]) for i, s in enumerate(self.sets) if s.blocked is not None}
        return any(int(c) in blocked for c in components[self._set_of_id[ids]])

    def set_of(self, ids: np.ndarray) -> np.ndarray:
        return self._set_of_id[ids]

    def one_set(self, ids: np.ndarray) -> bool:
        """Whether all of ``ids`` (none of them ``NO_ID``) belong to one set."""
        sets = self._set_of_id[ids]
        return bool((sets == sets[0]).all())

    def all_roots(self) -> np.ndarray:
        """The root of every allocated id: the smallest id it is unified with."""
        n = self._n_ids
        a, b = (np.concatenate(side) for side in zip(*self._links)) if self._links else (np.zeros(0, np.int64),) * 2
        count, label = _components(n, a, b)
        smallest = np.full(count, n, dtype=np.int64)
        np.minimum.at(smallest, label, np.arange(n))
        return smallest[label]

    def set_components(self, roots: np.ndarray) -> np.ndarray:
        """Component label of every set: sets sharing a unit are in one component."""
        return _components(len(self.sets), self._set_of_id[: self._n_ids], self._set_of_id[roots])[1].astype(np.int64)
