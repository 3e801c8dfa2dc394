"""Evaluation: :func:`evaluate` (top-1 accuracy over a loader), and the checks of loaders and
devices that evaluation and fine-tuning share."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from graphprune.tracer.devices import LoaderBatch, model_device
from graphprune.tracer.state import eval_mode
from graphprune.validation import check_model

from . import distributed as gdist

__all__ = ["evaluate"]

Device = Union[str, torch.device, None]


def check_loader(loader: Any, name: str) -> int:
    """The number of batches ``loader`` (called ``name`` in errors) yields per epoch."""
    if loader is None or isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got {type(loader).__name__}")
    try:
        length = len(loader)
    except TypeError:
        raise TypeError(f"{name} must have a len() (batches per epoch) to build the learning-rate schedule") from None
    if length < 1:
        raise ValueError(f"{name} yields no batches")
    return length


def resolve_device(model: nn.Module, device: Device) -> torch.device:
    """``device`` checked, or by default the model's (the current CUDA device under NCCL)."""
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a string, a torch.device or None, got {type(device).__name__}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if gdist.is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return model_device(model)


def sharded(loader: Any) -> bool:
    """Whether ``loader`` draws from a ``DistributedSampler``."""
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, torch.utils.data.distributed.DistributedSampler)


def evaluate(model: nn.Module, loader: Iterable, *, device: Device = None, distributed: Optional[bool] = None) -> float:
    """Compute the top-1 accuracy of ``model`` over ``loader``'s ``(inputs, targets)`` batches.

    Runs in eval mode under ``torch.no_grad()``; training flags are restored. The model is
    not moved: every batch is sent to ``device``.

    Parameters
    ----------
    model : nn.Module
        Any module, TorchScript included.
    loader : iterable with a len()
        ``(inputs, targets)`` batches; targets are class indices, or one-hot or soft
        targets of the outputs' shape.
    device : str or torch.device, optional
        Where batches go (default: the model's device; the current CUDA device under NCCL).
    distributed : bool, optional
        Sum the counts over all ranks, so that a sharded test set gives the global accuracy
        on every rank (every rank must then call it). By default, when ``loader`` draws
        from a ``DistributedSampler`` and ``torch.distributed`` is initialised.

    Returns
    -------
    float
        The share of samples whose top prediction is the target, in [0, 1].

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, ``loader`` is not an iterable with a len(), or
        ``device`` is not a device.
    ValueError
        ``loader`` yields no batches or samples, or targets of the wrong shape.
    """
    check_model(model, allow_torchscript=True)
    check_loader(loader, "loader")
    return accuracy(model, loader, "evaluate's loader", resolve_device(model, device), distributed)


def accuracy(model: nn.Module, loader: Iterable, name: str, device: torch.device,
              distributed: Optional[bool]) -> float:
    """:func:`evaluate` without the argument checks; ``name`` is the loader's in error messages."""
    if distributed is None:
        distributed = sharded(loader) and gdist.is_distributed()
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for index, batch in enumerate(loader):
            batch = LoaderBatch(batch, index, name, device, "the top-1 accuracy (class-index or one-hot targets)")
            outputs = batch.forward(model)
            with batch.explained("the top-1 accuracy", outputs):
                hits, count = _top1(outputs, batch.targets)
            correct, total = correct + hits, total + count
    if distributed:
        correct, total = gdist.all_reduce_sum([correct, total])
    if total == 0:
        raise ValueError(f"{name} yielded no samples")
    return correct / total


def _top1(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """Correct predictions and samples in one batch; ``targets`` are class indices, or one-hot or
    soft targets with the outputs' shape."""
    if targets.dim() > 1:  # one-hot or soft targets
        targets = targets.argmax(-1)
    if targets.shape != outputs.shape[:-1]:
        raise ValueError(f"targets must be class indices of shape {tuple(outputs.shape[:-1])} (or one-hot of the "
                         f"outputs' shape {tuple(outputs.shape)}), got shape {tuple(targets.shape)}")
    return int((outputs.argmax(-1) == targets).sum()), int(targets.numel())


