"""graphprune.channels: ids, links and their equivalence classes."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from graphprune.analysis.channels import NO_ID, ChannelSpace, per_array


def _naive_roots(n: int, links: list) -> np.ndarray:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in links:
        for x, y in zip(a, b):
            if x >= 0 and y >= 0:
                rx, ry = find(int(x)), find(int(y))
                parent[max(rx, ry)] = min(rx, ry)
    return np.array([find(i) for i in range(n)])


@pytest.mark.parametrize("seed", range(5))
def test_roots_are_the_smallest_id_of_each_class_as_a_plain_union_find_says(seed):
    rng = np.random.default_rng(seed)
    space = ChannelSpace()
    sizes = rng.integers(30, 80, size=30)
    sets = [space.new_set(int(s), f"set {i}") for i, s in enumerate(sizes)]  # grows past the initial capacity
    links = []
    for _ in range(25):
        a = sets[rng.integers(len(sets))]
        b = sets[rng.integers(len(sets))]
        n = min(a.size, b.size)
        pair = (a[:n].copy(), rng.permutation(b)[:n])
        pair[0][rng.random(n) < 0.1] = NO_ID  # broadcast positions link nothing
        space.union(*pair)
        links.append(pair)
    assert space.n_ids == sizes.sum() > 1024
    np.testing.assert_array_equal(space.all_roots(), _naive_roots(space.n_ids, links))


def test_sets_sharing_a_unit_form_one_component():
    space = ChannelSpace()
    a, b = space.new_set(3, "a"), space.new_set(3, "b")
    space.new_set(2, "c")
    space.union(a[:1], b[2:])
    roots = space.all_roots()
    component = space.set_components(roots)
    assert component[0] == component[1] != component[2]
    np.testing.assert_array_equal(roots, [0, 1, 2, 3, 4, 0, 6, 7])


def test_union_rejects_arrays_of_different_sizes():
    space = ChannelSpace()
    with pytest.raises(ValueError, match="sizes 2 and 3"):
        space.union(space.new_set(2, "a"), space.new_set(3, "b"))



def test_per_array_computes_once_per_array_object_and_keeps_it_alive():
    calls = []
    total = per_array(lambda ids: calls.append(ids) or int(ids.sum()))
    shared, equal = np.arange(4), np.arange(4)
    assert [total(shared), total(shared), total(equal)] == [6, 6, 6]
    assert len(calls) == 2  # equal values but another object: computed again
    alive = weakref.ref(shared)
    del shared, equal, calls[:]
    gc.collect()
    assert alive() is not None  # so its id cannot be reused for another array while cached
