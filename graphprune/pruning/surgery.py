"""Remove channels from every member of their groups, atomically."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from graphprune.analysis.channels import per_array
from graphprune.analysis.groups import Group
from graphprune.analysis.propagation import Propagation
from graphprune.analysis.sizes import after_resize, derived_sizes, size_problems, size_rule
from graphprune.tracer.shape_rules import dense_layout
from graphprune.tracer.state import interrupts_deferred

T = TypeVar("T")


class PruningError(RuntimeError):
    """Surgery failed; the model was restored to its state before the call (``restored``),
    except after a failure inside the final copy of the kept weights, once an original was
    dropped, which the message says."""

    def __init__(self, message: str, restored: bool = True):
        super().__init__(message)
        self.restored = restored


_CHUNK_BYTES = 1 << 22  # intermediate of a selection along several dims, per chunk


class ValuesNeeded(Exception):
    """Raised by a ``verify`` callback of :meth:`ChannelSurgery.prune_groups` that cannot judge
    the pruned model by its shapes alone; it is called again once the kept values are in place."""


def _selection_shape(data: torch.Tensor, index: dict) -> list:
    return [index[d].numel() if d in index else size for d, size in enumerate(data.shape)]


def _uninitialised(data: torch.Tensor, index: dict) -> torch.Tensor:
    """Uninitialised storage for ``data`` restricted to ``index``, in the layout of ``data``
    (contiguous, or channels-last where ``data`` is)."""
    layout = dense_layout(data) or torch.contiguous_format
    return torch.empty(_selection_shape(data, index), dtype=data.dtype, device=data.device, memory_format=layout)


def _empty_selection(data: torch.Tensor, index: dict) -> torch.Tensor:
    """The storage the kept values of ``data`` are copied into (:func:`_uninitialised`)."""
    return _uninitialised(data, index)


def _select_into(out: torch.Tensor, data: torch.Tensor, index: dict) -> None:
    """Write ``data`` restricted to ``index[dim]`` along each dim into ``out``.

    Along one dim this is one ``index_select``. Along several, ``out`` is filled in chunks of
    the outermost dim, each selected along every dim while it is small: a whole-tensor
    intermediate would be the largest allocation of the surgery.
    """
    dims = sorted(index)
    if len(dims) == 1:
        torch.index_select(data, dims[0], index[dims[0]], out=out)
        return
    outer, inner = dims[0], dims[1:]
    step = max(1, _CHUNK_BYTES * data.shape[outer] // max(data.numel() * data.element_size(), 1))
    for start in range(0, out.shape[outer], step):
        chunk = data.index_select(outer, index[outer][start:start + step])
        for dim in inner:
            chunk = chunk.index_select(dim, index[dim])
        out.narrow(outer, start, chunk.shape[outer]).copy_(chunk)


def _new_storage(data: torch.Tensor, grad: Optional[torch.Tensor], index: dict) -> tuple:
    """Uninitialised storage for the kept part of a tensor and of its gradient (None if none)."""
    return _empty_selection(data, index), None if grad is None else _empty_selection(grad, index)


def _reuses_freed_memory(device: torch.device) -> bool:
    """Whether memory freed on ``device`` is cheaper to allocate again than fresh memory
    (the CPU's: fresh pages fault on first write; see :meth:`_Transaction.commit`)."""
    return device.type == "cpu"


def _placeholder(data: torch.Tensor, index: dict) -> torch.Tensor:
    """A tensor of the selection's shape whose values are not set: where fresh memory costs
    nothing until written (:func:`placeholders_alike`), uninitialised storage laid out as the kept
    values will be; elsewhere a zero that every position aliases, which owns no memory."""
    if placeholders_alike(data.device):
        return _uninitialised(data, index)
    return torch.zeros((), dtype=data.dtype, device=data.device).expand(_selection_shape(data, index))


def placeholders_alike(device: torch.device) -> bool:
    """Whether the placeholders on ``device`` are laid out as the kept values will be (the CPU's
    pages and the meta device cost nothing until written), so that a model that cannot be traced
    on them fails on its shapes, not on positions that alias one another."""
    return device.type in ("cpu", "meta")


class _Transaction:
    """Changes tensor shapes and attributes so that they can be put back bit for bit.

    :meth:`shrink` gives a tensor its new shape at once but not its values: until
    :meth:`commit`, it holds a placeholder and the original is kept aside.
    """

    def __init__(self) -> None:
        self._tensors: list[tuple] = []  # (tensor, original data, original grad, {dim: kept positions})
        self._attrs: dict[tuple[int, str], tuple] = {}
        self.released = False  # some original was dropped: a rollback can no longer restore everything

    def shrink(self, tensor: torch.Tensor, keep: dict) -> None:
        """Keep only the positions ``keep[dim]`` of ``tensor`` (and of its gradient) along each dim."""
        index = {dim: torch.as_tensor(k, dtype=torch.long, device=tensor.device) for dim, k in keep.items()}
        self._tensors.append((tensor, tensor.data, tensor.grad, index))
        tensor.data = _placeholder(tensor.data, index)

    def set_attr(self, module: nn.Module, name: str, value) -> None:
        key = (id(module), name)
        if key not in self._attrs:
            self._attrs[key] = (module, name, getattr(module, name))
        setattr(module, name, value)

    def commit(self, release: bool) -> None:
        """Copy the kept values of every shrunk tensor into new storage.

        Without ``release`` every original stays until the transaction ends. With it, each
        original is dropped as soon as it is copied, and only the tensors not yet copied can
        be rolled back. Then, on the CPU, each new tensor is allocated just before its copy,
        after the originals before it were dropped: the allocator hands back memory that the
        process has already touched (writing fresh pages costs more than the copy), and the
        process never holds more than the model and one new tensor. Elsewhere (GPUs, whose
        caching allocators reuse freed blocks anyway), and without ``release``, all of it is
        allocated first, so that running out of memory still leaves everything to roll back.
        The copy itself allocates nothing but chunks of at most ``_CHUNK_BYTES``.
        """
        allocate_first = not release or not all(_reuses_freed_memory(data.device) for _, data, _, _ in self._tensors)
        targets = [_new_storage(data, grad, index) for _, data, grad, index in self._tensors] if allocate_first else None
        for i in range(len(self._tensors)):
            tensor, data, grad, index = self._tensors[i]
            new_data, new_grad = targets[i] if allocate_first else _new_storage(data, grad, index)
            if release:
                self._tensors[i] = None
                self.released = True
            _select_into(new_data, data, index)
            tensor.data = new_data
            if grad is not None:
                _select_into(new_grad, grad, index)
                tensor.grad = new_grad

    def rollback(self) -> None:
        """Put back every tensor not yet released and every attribute (a Ctrl-C is held meanwhile)."""
        with interrupts_deferred():
            for tensor, data, grad, _ in filter(None, self._tensors):
                tensor.data = data
                tensor.grad = grad
            for module, name, value in self._attrs.values():
                setattr(module, name, value)


def _verified(verify: Optional[Callable[[np.ndarray, bool], None]], removed: np.ndarray, transaction: _Transaction) -> bool:
    """Run ``verify`` on the placeholders, and on the values if it asks for them; returns
    whether the values are in place already (then the originals are still held)."""
    try:
        if verify is not None:
            verify(removed, False)
    except ValuesNeeded:
        transaction.commit(release=False)
        verify(removed, True)
        return True
    return False


def _failure(exc: Exception, restored: bool) -> PruningError:
    """The :class:`PruningError` to raise for ``exc``."""
    if not restored:  # a failure inside the final copy, after an original was dropped
        return PruningError(f"pruning failed while copying the kept weights, and the model could not be "
                            f"restored; load it again: {type(exc).__name__}: {exc}", restored=False)
    return PruningError(f"pruning failed and the model was restored: {type(exc).__name__}: {exc}")


class ChannelSurgery:
    """Applies pruning plans to the model that ``state`` was propagated from.

    Removed channels accumulate across calls, so groups may be pruned one after another;
    each group only once.
    """

    def __init__(self, state: Propagation, roots: np.ndarray, groups: list[Group]):
        self.state = state
        self.roots = roots
        self.groups = groups
        self._removed = np.zeros(roots.size, dtype=bool)  # by root id
        self._pruned: set[int] = set()
        for group in groups:
            group._surgery = self

    @property
    def pruned(self) -> bool:
        """Whether any group of this surgery was pruned."""
        return bool(self._pruned)

    def kept_positions(self) -> dict[tuple[str, str], dict[int, np.ndarray]]:
        """``{(module name, attribute): {dim: positions kept}}`` for every tensor this surgery
        shrank, as positions of the tensor before its first plan (a tensor several modules
        hold appears under each)."""
        kept: dict = {}
        for member in self.state.param_dims.values():
            if member.ids[0] < 0:
                continue
            alive = ~self._removed[self.roots[member.ids]]
            if not alive.all():
                for owner in member.owners:
                    kept.setdefault(tuple(owner), {})[member.dim] = np.flatnonzero(alive)
        return kept

    def _validate(self, plan: Mapping[Group, Sequence[int]]) -> dict[Group, np.ndarray]:
        checked = {}
        for group, indices in plan.items():
            if group._surgery is not self:
                raise ValueError(f"group {group.id} belongs to another analysis")
            if group.blocked:
                raise ValueError(f"group {group.id} ({group.root}) is blocked: {'; '.join(group.blocked)}")
            index = np.asarray(indices).ravel()
            if index.size and not np.issubdtype(index.dtype, np.integer):
                raise TypeError(f"channel indices for group {group.id} must be integers, got {index.dtype}")
            index = index.astype(np.int64)
            if index.size == 0:
                continue
            if group.id in self._pruned:
                raise ValueError(f"group {group.id} was already pruned; run analyze() again on the pruned model")
            if index.min() < 0 or index.max() >= group.size:
                raise ValueError(f"channel indices for group {group.id} must lie in [0, {group.size}); got {index.min()}..{index.max()}")
            if np.unique(index).size != index.size:
                raise ValueError(f"channel indices for group {group.id} contain duplicates")
            if index.size >= group.size:
                raise ValueError(f"cannot remove all {group.size} channels of group {group.id} ({group.root})")
            removing = np.zeros(group.size, dtype=bool)
            removing[index] = True
            emptied = [m for m in group.members_by_index_map() if removing[m.index_map].all()]
            if emptied:
                raise ValueError(f"removing these channels of group {group.id} would empty {emptied[0].name} (dim {emptied[0].dim})")
            checked[group] = index
        return checked

    def prune_groups(
        self,
        plan: Mapping[Group, Sequence[int]],
        verify: Optional[Callable[[np.ndarray, bool], None]] = None,
        on_commit: Optional[Callable[[], None]] = None,
    ) -> None:
        """Remove ``plan[group]`` channels from each group, as one transaction.

        ``verify(removed, filled)`` runs inside the transaction, with the removed flag of every
        root id, once every tensor and size attribute has its new value: first with
        ``filled=False``, while the tensors hold placeholders (values unset) of their new shapes (the
        kept values are copied in only after it passed, each original freed as soon as it is
        copied, so pruning needs little memory beyond the model). If it needs the values it
        raises :class:`ValuesNeeded`; it is then called again with ``filled=True`` after a
        copy that keeps the originals.

        Any exception before the final copy, ``KeyboardInterrupt`` included, restores the
        model bit for bit; an ``Exception`` is then re-raised as :class:`PruningError` (the
        original is its ``__cause__``), anything else as it is. ``on_commit()`` is called at
        the point of no return, just before the first original is dropped. A Ctrl-C during
        the final copy is held until the copy ends; an error inside it restores only what
        was not yet copied, and says so.
        """
        checked = self._validate(plan)
        if not checked:
            return
        removed = self._removed_after(checked)
        transaction = _Transaction()
        try:
            resized = self._apply(transaction, removed)
            filled = _verified(verify, removed, transaction)
        except BaseException as exc:
            transaction.rollback()
            if not isinstance(exc, Exception):
                raise
            raise _failure(exc, restored=True) from exc
        with interrupts_deferred():
            if on_commit is not None:
                on_commit()
            if not filled:
                try:
                    transaction.commit(release=True)
                except BaseException as exc:
                    transaction.rollback()
                    if not isinstance(exc, Exception):
                        raise
                    raise _failure(exc, restored=not transaction.released) from exc
        self._removed = removed
        self._pruned.update(group.id for group in checked)
        for name in resized:
            after_resize(self.state.module(name))

    def trial(self, plan: Mapping[Group, Sequence[int]], measure: Callable[[np.ndarray], T], *, values: bool = True) -> T:
        """``measure(removed)`` while the model has ``plan`` applied, values included unless
        ``values=False`` (then the tensors hold placeholders (values unset) of their new shapes; the
        removed flag of every root id, as for ``verify`` above); then everything is rolled
        back, whatever happens. The groups are not marked as pruned."""
        removed = self._removed_after(self._validate(plan))
        transaction = _Transaction()
        try:
            self._apply(transaction, removed)
            if values:
                transaction.commit(release=False)
            return measure(removed)
        finally:
            transaction.rollback()

    def _removed_after(self, checked: Mapping[Group, np.ndarray]) -> np.ndarray:
        """The removed flag of every root id once the ``checked`` plan is applied too."""
        removed = self._removed.copy()
        for group, index in checked.items():
            removed[group.units[index]] = True
        return removed

    def _apply(self, transaction: _Transaction, removed: np.ndarray) -> list:
        """Give every member its new shape and every size attribute its value; returns the
        names of the modules whose tensors changed."""
        roots = self.roots

        @per_array
        def keep_of(ids: np.ndarray) -> Optional[np.ndarray]:
            """Positions kept of those alive before; None when nothing changes."""
            alive_before = ~self._removed[roots[ids]]
            alive_after = ~removed[roots[ids]]
            return None if np.array_equal(alive_before, alive_after) else np.flatnonzero(alive_after[alive_before])

        @per_array
        def counts(ids: np.ndarray) -> tuple[int, int]:
            """Positions alive before and after (``NO_ID`` positions always stay)."""
            valid = ids[ids >= 0]
            fixed = ids.size - valid.size
            return int((~self._removed[roots[valid]]).sum()) + fixed, int((~removed[roots[valid]]).sum()) + fixed

        shrinking: dict[int, tuple] = {}  # id(tensor) -> (tensor, {dim: kept positions})
        owners: dict[str, None] = {}  # modules owning a shrunk tensor, in graph order
        for member in self.state.param_dims.values():
            keep = keep_of(member.ids) if member.ids[0] >= 0 else None
            if keep is not None:
                shrinking.setdefault(id(member.tensor), (member.tensor, {}))[1][member.dim] = keep
                owners.update(dict.fromkeys(module for module, _ in member.owners))
        # sizes read off a child's tensor follow too: nn.Transformer's d_model, and a parametrized
        # module's, whose weight is computed from tensors its parametrizations hold
        for name in list(owners):
            owners.update(dict.fromkeys(a for a in _ancestors(name) if size_rule(self.state.module(a)) is not None))
        for tensor, keep in shrinking.values():
            transaction.shrink(tensor, keep)
        for attr in self.state.attr_members:  # counts (groups, heads) and sizes the rules follow
            before, kept = counts(attr.ids)
            if kept != before:
                module = self.state.module(attr.module)
                transaction.set_attr(module, attr.attr, attr.update(getattr(module, attr.attr), kept))
        for name in owners:  # then every size attribute that the table reads off the new shapes
            module = self.state.module(name)
            for attr, value in derived_sizes(module).items():
                if value is None:
                    raise ValueError(f"{name} ({type(module).__name__}): pruned to sizes that leave "
                                     f"{attr} fractional ({'; '.join(size_problems(module))})")
                if value != getattr(module, attr, None):
                    transaction.set_attr(module, attr, value)
        return list(owners)


def _ancestors(name: str) -> list:
    """The names of the modules that hold the module ``name``, innermost first."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]
