"""Put a model back bit for bit after any exception, KeyboardInterrupt included; and the
smaller guards of a model's (and the process's) state around a block.

:class:`ModelTransaction` records, by reference, everything graphprune may change on a
model: every module's attributes (``__dict__``) and the contents of the dicts, lists and
sets among them (parameters, buffers, children, hooks, caches), and every parameter's and
buffer's data, gradient and ``requires_grad``. Nothing is copied: graphprune never writes
into a tensor in place, it gives tensors new data.

Used as a context manager, it restores the model on any ``BaseException`` and re-raises it,
unless :meth:`ModelTransaction.commit` was called first: the commit is the point from which
the change is kept. Tracing uses it too, to take back what torch.fx leaves on a model.
"""
from __future__ import annotations

import gc
import signal
import threading
from contextlib import contextmanager
from collections import OrderedDict
from typing import Iterator, Optional

import torch
from torch import nn

_CONTAINERS = (dict, list, set)


def _held(value) -> bool:
    """Whether a module attribute's value is restored by content: a dict, list or set, or a
    plain object with attributes (a config, a namespace), never a module or tensor."""
    if isinstance(value, _CONTAINERS):
        return True
    return (hasattr(value, "__dict__") and not callable(value) and not isinstance(value, (nn.Module, torch.Tensor))
            and not isinstance(value, type))


def _contents(value):
    """A shallow copy of what ``value`` holds (its items, or a plain object's attributes)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, set):
        return set(value)
    return dict(vars(value))


def _unchanged(value, saved) -> bool:
    """Whether ``value`` still holds exactly ``saved``: the same keys in the same order, each with
    the very object it had (sets: equal members)."""
    if isinstance(value, set):
        return value == saved
    if isinstance(value, list):
        return len(value) == len(saved) and all(a is b for a, b in zip(value, saved))
    current = value if isinstance(value, dict) else vars(value)
    return len(current) == len(saved) and all(
        a == b and current[a] is saved[b] for a, b in zip(current, saved))


def _restore_contents(value, saved) -> None:
    """Put ``saved`` back into ``value`` if it changed, through the base types' own methods: a
    container that refuses changes (diffusers' ``FrozenDict`` overrides ``update``) is left
    alone when it was not changed, and is put back all the same when it was."""
    if _unchanged(value, saved):
        return
    if isinstance(value, list):
        list.__setitem__(value, slice(None), saved)
        return
    if isinstance(value, OrderedDict):  # dict's own methods would skip its order (a module's hook dicts)
        OrderedDict.clear(value)
        for key, item in saved.items():
            OrderedDict.__setitem__(value, key, item)
        return
    kind = set if isinstance(value, set) else dict
    target = value if isinstance(value, (dict, set)) else vars(value)
    kind.clear(target)
    kind.update(target, saved)


class ModelTransaction:
    """A restorable record of ``model`` (see the module docstring).

    With ``keep_tensors=False`` the tensors' data and gradients are not held, so that a
    surgery may free the originals as it copies; the caller must then commit before the
    first original is dropped (graphprune's surgery does, through its ``on_commit``
    argument), since nothing before it replaces tensor data without its own
    rollback.
    """

    def __init__(self, model: nn.Module, keep_tensors: bool = True):
        self.committed = False
        self._modules = []
        tensors: dict[int, object] = {}
        for module in model.modules():
            attrs = dict(vars(module))
            contents = {k: _contents(v) for k, v in attrs.items() if _held(v)}
            self._modules.append((module, attrs, contents))
            for registry in (module._parameters, module._buffers):
                tensors.update((id(t), t) for t in registry.values() if t is not None)
        self._flags = [(t, t.requires_grad) for t in tensors.values()]
        self._tensors = [(t, t.data, t.grad) for t in tensors.values()] if keep_tensors else []

    def commit(self) -> None:
        """Keep the changes: from now on nothing is restored, and no tensor is held."""
        self.committed = True
        self._modules, self._flags, self._tensors = [], [], []

    def restore(self) -> None:
        """Put every recorded attribute, container content and tensor back (a Ctrl-C during
        it is held until it is done)."""
        with interrupts_deferred():
            for module, attrs, contents in self._modules:
                state = vars(module)
                for key in [k for k in state if k not in attrs]:
                    del state[key]
                state.update(attrs)
                for key, saved in contents.items():
                    _restore_contents(attrs[key], saved)
            for tensor, data, grad in self._tensors:
                tensor.data = data
                tensor.grad = grad
            for tensor, flag in self._flags:
                if tensor.requires_grad != flag and tensor.is_leaf:
                    tensor.requires_grad_(flag)

    def __enter__(self) -> "ModelTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> Optional[bool]:
        if exc_type is not None and not self.committed:
            self.restore()
        return None


@contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Run the block, then put every module attribute, container and held object of ``model``
    back as it was, and the values of any buffer written in place (a forward's step
    counter; a BatchNorm's statistics in training mode, which its kernel updates without a
    new tensor version): whatever a trace or a run of the forward left on it goes. Parameters
    are not copied, so a forward that writes into its own parameters still does."""
    snapshot = ModelTransaction(model, keep_tensors=False)
    buffers = [(b, b._version, b.detach().clone()) for b in {id(b): b for b in model.buffers()}.values()]
    try:
        yield
    finally:
        snapshot.restore()
        with interrupts_deferred(), torch.no_grad():
            for buffer, version, values in buffers:
                if buffer.is_meta:  # no values to keep
                    continue
                if buffer._version != version or not torch.equal(buffer, values):
                    buffer.copy_(values)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) that arrives inside the block until it ends, then deliver it.

    Only the main thread receives signals; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


@contextmanager
def training_flags_kept(*models: nn.Module) -> Iterator[None]:
    """Run the block, then put every submodule's own training flag back."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            if module.training != training:
                module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block in eval mode, then put every submodule's own training flag back. A model
    already in eval mode is left alone: ``eval()`` may do more than set flags (timm's LeViT
    empties its attention-bias cache)."""
    with training_flags_kept(model):
        if any(m.training for m in model.modules()):
            model.eval()
        yield


@contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """Pause Python's cyclic garbage collector (if ``pause``), then restore it: tracing
    allocates so many small objects that it triggers full collections, each of which
    rescans every object the process holds (a large model's modules and tensors among them)."""
    enabled = gc.isenabled()
    try:
        if pause:
            gc.disable()
        yield
    finally:
        if enabled:
            gc.enable()
