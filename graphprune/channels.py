"""Channel identities and their equivalence classes.

Every position of every dimension that may carry channels gets an integer id. Ids are
allocated in *sets* (one set per parameter dimension or per fresh tensor dimension) and
unified position by position with a vectorised union-find. After propagation:

* a *unit* is an equivalence class of ids: positions that must be removed together;
* a *group* is a connected component of sets: everything whose size changes together.

A set may be *blocked*, with a reason; a group containing a blocked set is not prunable.
The id ``-1`` labels a size-1 dimension, which couples nothing (broadcasting).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

NO_ID = -1


@dataclass
class ChannelSet:
    """A contiguous range of ids created together."""

    start: int
    size: int
    description: str
    blocked: Optional[str] = None


class ChannelSpace:
    """Allocator of channel ids plus a union-find over them."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self._set_of_id = np.zeros(1024, dtype=np.int64)
        self._n_ids = 0
        self.sets: list[ChannelSet] = []

    @property
    def n_ids(self) -> int:
        return self._n_ids

    def new_set(self, size: int, description: str, blocked: Optional[str] = None) -> np.ndarray:
        """Allocate ``size`` fresh ids; return them as an array."""
        start = self._n_ids
        end = start + size
        if end > self._parent.size:
            capacity = max(end, 2 * self._parent.size)
            self._parent = np.resize(self._parent, capacity)
            self._set_of_id = np.resize(self._set_of_id, capacity)
        self._parent[start:end] = np.arange(start, end)
        self._set_of_id[start:end] = len(self.sets)
        self._n_ids = end
        self.sets.append(ChannelSet(start, size, description, blocked))
        return np.arange(start, end, dtype=np.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Roots of ``ids`` (all must be valid ids), compressing the queried paths."""
        parent = self._parent
        roots = parent[ids]
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        parent[ids] = roots
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unify ``a[i]`` with ``b[i]`` for every ``i`` where neither is ``NO_ID``."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"cannot unify label arrays of sizes {a.size} and {b.size}")
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        while a.size:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb = ra[differ], rb[differ]
            # Conflicting writes to the same root lose some links; the loop retries those.
            self._parent[np.maximum(ra, rb)] = np.minimum(ra, rb)
            a, b = a[differ], b[differ]

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

    def set_of(self, ids: np.ndarray) -> np.ndarray:
        return self._set_of_id[ids]

    def all_roots(self) -> np.ndarray:
        """Root of every allocated id (fully compressed by pointer jumping)."""
        parent = self._parent[: self._n_ids]
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        self._parent[: self._n_ids] = parent
        return parent.copy()

    def set_components(self, roots: np.ndarray) -> np.ndarray:
        """Component label of every set: sets sharing a unit are in one component."""
        n_sets = len(self.sets)
        if n_sets == 0:
            return np.zeros(0, dtype=np.int64)
        owner = self._set_of_id[: self._n_ids]
        linked = self._set_of_id[roots]
        comp = np.arange(n_sets, dtype=np.int64)
        # Label propagation to a fixed point: each set takes the minimum label of its links.
        while True:
            before = comp.copy()
            lo = np.minimum(comp[owner], comp[linked])
            np.minimum.at(comp, owner, lo)
            np.minimum.at(comp, linked, lo)
            comp = comp[comp]
            if np.array_equal(comp, before):
                return comp
