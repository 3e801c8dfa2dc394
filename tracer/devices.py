"""Where a model and its inputs live, and running a model on a data loader's batches."""
from __future__ import annotations

import numbers
from collections.abc import Iterator as IteratorABC
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .graph import call_model

INPUTS_CONVENTION = "a tensor is the one input, a tuple holds positional inputs, a dict keyword inputs"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def to_device(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (nested) tuple / list / mapping to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    return value


def tensors_in(value: Any) -> list:
    """Every tensor in a (nested) tuple / list / mapping of inputs (``torch.utils._pytree``'s
    leaves): the one place inputs are flattened."""
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def describe_value(value: Any, dtypes: bool = True) -> str:
    """A short description of (nested) inputs or a batch: ``tensor(2, 3, 8, 8) float32`` (without
    the dtype unless ``dtypes``), ``(…, …)`` for a tuple, ``[…]`` for a list, ``{key: …}``, else
    the type's name."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}" + (f" {str(value.dtype).replace('torch.', '')}" if dtypes else "")
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe_value(v, dtypes)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe_value(v, dtypes) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return type(value).__name__


class LoaderBatch:
    """The ``index``-th ``(inputs, targets)`` batch of ``loader`` (a name such as "Taylor's
    data_loader"), moved to ``device``.

    :meth:`forward` and :meth:`loss` run a model and a loss on it. When one raises an
    ``Exception`` (not a ``BaseException`` such as ``KeyboardInterrupt``, and not running out
    of memory), a ``ValueError`` names the loader, the batch, what it held, what failed, and
    the remedy; the original exception is its ``__cause__``. A batch that is not a pair is a
    ``TypeError``.
    """

    def __init__(self, batch: Any, index: int, loader: str, device: torch.device, loss_name: str = "loss_fn"):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"each batch of {loader} must be an (inputs, targets) pair, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        self.index, self.loader, self.loss_name = index, loader, loss_name
        self.inputs, self.targets = to_device(batch[0], device), to_device(batch[1], device)

    def forward(self, model: nn.Module, inputs: Any = None, role: str = "the model") -> Any:
        """``model`` called on the batch's inputs (or on ``inputs``, e.g. mixed ones)."""
        with self.explained(f"{role}'s forward ({type(model).__name__})"):
            return call_model(model, self.inputs if inputs is None else inputs)

    def loss(self, loss_fn: Callable[[Any, Any], Any], outputs: Any, targets: Any = None) -> Any:
        """``loss_fn(outputs, targets)`` on the batch's targets (or on ``targets``)."""
        with self.explained(self.loss_name, outputs):
            return loss_fn(outputs, self.targets if targets is None else targets)

    @contextmanager
    def explained(self, what: str, outputs: Any = None) -> Iterator[None]:
        """Turn an ``Exception`` raised in the block by ``what`` into the ValueError described above."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:  # a resource problem, not the batch's
            raise
        except Exception as exc:
            held = f"inputs {describe_value(self.inputs)}, targets {describe_value(self.targets)}"
            held += "" if outputs is None else f", model outputs {describe_value(outputs)}"
            raise ValueError(
                f"batch {self.index} of {self.loader} ({held}): {what} raised {type(exc).__name__}: "
                f"{str(exc).rstrip('.')}. {self.loader} must yield (inputs, targets) batches that the model and "
                f"{self.loss_name} accept; inputs as in example_inputs: {INPUTS_CONVENTION}."
            ) from exc


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` name the same device (``cuda`` matches ``cuda:0``)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_max_batches(value: Any) -> Any:
    """``value`` as the most batches of a loader to read: None (all), or a positive int (not a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"max_batches must be a positive integer or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"max_batches must be at least 1, got {value}")
    return int(value)


def check_loader(loader: Any, owner: str, reread: bool = False) -> None:
    """A ``TypeError`` unless ``loader`` is an iterable of batches (and, with ``reread``, one that
    can be read more than once: not an iterator)."""
    if loader is None or isinstance(loader, (torch.Tensor, Mapping)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"{owner} must be an iterable of batches (a DataLoader, a list), got {type(loader).__name__}")
    if reread and isinstance(loader, IteratorABC):
        raise TypeError(f"{owner} are read more than once: pass a list or a DataLoader, not an iterator")


def calibration_batches(loader: Any, owner: str, device: torch.device, max_batches: Any = None,
                        progress: bool = False, desc: str = "calibration") -> Iterator[LoaderBatch]:
    """The batches of a calibration ``loader`` as :class:`LoaderBatch` es (at most ``max_batches``).

    A batch is its model's inputs (a tensor, a dict of keyword inputs), or an ``(inputs,
    targets)`` pair whose targets are ignored: a list or tuple of two is always read as such a
    pair, so two positional inputs are passed as ``((a, b), None)``. ``owner`` names the loader
    in errors ("Recovery's calibration"). A loader that yields nothing is a ``ValueError``.
    """
    check_loader(loader, owner)
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    total = max_batches if total is None else min(total, max_batches or total)
    count = 0
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            pair = batch if isinstance(batch, (tuple, list)) else (batch, None)
            yield LoaderBatch(pair, index, owner, device)
            count += 1
            bar.update(1)
    if count == 0:
        raise ValueError(f"{owner} yielded no batches")
