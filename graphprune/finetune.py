"""Fine-tuning after pruning: :func:`finetune` and :func:`evaluate`.

:func:`finetune` trains with SGD + momentum under a per-iteration learning-rate schedule
made of PyTorch's own schedulers: :class:`~torch.optim.lr_scheduler.LinearLR` warm-up
chained by :class:`~torch.optim.lr_scheduler.SequentialLR` to
:class:`~torch.optim.lr_scheduler.CosineAnnealingLR` decay to zero. Options: MixUp / CutMix
(``torchvision.transforms.v2``), knowledge distillation from an unpruned teacher, per-epoch
test accuracy, and :class:`~torch.nn.parallel.DistributedDataParallel` when
``torch.distributed`` is initialised (run the same script under ``torchrun``).
Iterative pruning (prune, fine-tune, repeat) lives in :mod:`graphprune.schedule`.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from tqdm.auto import tqdm

from tracer.devices import LoaderBatch, describe_value, model_device

from . import distributed as gdist
from .validation import check_int, check_model, check_real

__all__ = ["finetune", "evaluate", "distillation_loss"]

Device = Union[str, torch.device, None]


# ----------------------------------------------------------------------------- validation
def _check_loader(loader: Any, name: str) -> int:
    if loader is None or isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got {type(loader).__name__}")
    try:
        length = len(loader)
    except TypeError:
        raise TypeError(f"{name} must have a len() (batches per epoch) to build the learning-rate schedule") from None
    if length < 1:
        raise ValueError(f"{name} yields no batches")
    return length


def _resolve_device(model: nn.Module, device: Device) -> torch.device:
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


def _sharded(loader: Any) -> bool:
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, torch.utils.data.distributed.DistributedSampler)


# ----------------------------------------------------------------------------- losses
def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    averaged over the batch (the ``T^2`` keeps its gradients on the scale of cross-entropy)."""
    t = float(temperature)
    return F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean", log_target=True
    ) * (t * t)


def _mixer(mixup: float, cutmix: float, num_classes: int):
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2

    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def _scheduler(optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float):
    total = steps_per_epoch * epochs
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    if warmup <= 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    return SequentialLR(
        optimizer,
        schedulers=[
            LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup),
            CosineAnnealingLR(optimizer, T_max=total - warmup),
        ],
        milestones=[warmup],
    )


# ----------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, loader: Iterable, *, device: Device = None, distributed: Optional[bool] = None) -> float:
    """Top-1 accuracy (in [0, 1]) of ``model`` over ``loader``'s ``(inputs, targets)`` batches.

    Runs in eval mode under ``torch.no_grad()``; training flags are restored. ``distributed``
    (default: when ``loader`` draws from a ``DistributedSampler``) sums the counts over all
    ranks, so a sharded test set gives the global accuracy on every rank; every rank must
    then call it. An unsharded loader needs no communication (it may run on one rank only).
    """
    check_model(model, allow_torchscript=True)
    _check_loader(loader, "loader")
    return _accuracy(model, loader, "evaluate's loader", _resolve_device(model, device), distributed)


def _accuracy(model: nn.Module, loader: Iterable, name: str, device: torch.device,
              distributed: Optional[bool]) -> float:
    """:func:`evaluate` without the argument checks; ``name`` is the loader's in error messages."""
    if distributed is None:
        distributed = _sharded(loader) and gdist.is_distributed()
    flags = [(m, m.training) for m in model.modules()]
    correct = total = 0
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(loader):
                batch = LoaderBatch(batch, index, name, device, "the top-1 accuracy (class-index or one-hot targets)")
                outputs = batch.forward(model)
                with batch.explained("the top-1 accuracy", outputs):
                    hits, count = _top1(outputs, batch.targets)
                correct, total = correct + hits, total + count
    finally:
        for module, flag in flags:
            module.training = flag
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


# ----------------------------------------------------------------------------- fine-tuning
def finetune(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 1,
    teacher: Optional[nn.Module] = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    num_classes: Optional[int] = None,
    eval_loader: Optional[Iterable] = None,
    device: Device = None,
    progress: bool = True,
) -> list:
    """Fine-tune ``model`` in place and return its history, one dict per epoch.

    **Optimisation.** SGD with ``momentum`` and ``weight_decay`` (on every parameter). The
    learning rate is stepped every iteration: ``LinearLR`` warm-up from ``lr / (w + 1)`` to
    ``lr`` over the first ``w = round(warmup_epochs * len(train_loader))`` iterations, then
    ``CosineAnnealingLR`` to 0 at the end of the last epoch (both chained by ``SequentialLR``;
    ``warmup_epochs=0`` means cosine only). ``warmup_epochs`` may be fractional and must be
    smaller than ``epochs``.

    **Loss.** Cross-entropy on ``train_loader``'s ``(inputs, targets)`` batches (``targets``
    class indices). With ``mixup`` / ``cutmix`` > 0 (the Beta distribution's ``alpha``; both:
    one of the two at random per batch, ``v2.RandomChoice``) the batch is mixed by
    ``torchvision.transforms.v2.MixUp`` / ``CutMix`` and the loss uses the mixed soft
    targets; inputs must then be image tensors ``(N, C, H, W)``, and ``num_classes``
    defaults to the width of the model's output. With a ``teacher`` (e.g. the unpruned
    model; kept in eval mode, never updated, moved to the training device) the loss is
    ``alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE`` with
    ``T = temperature`` (:func:`distillation_loss`); the teacher sees the same (mixed) inputs.

    **Devices.** ``device`` (default: the model's device; the current CUDA device under NCCL)
    is where the model is moved and every batch is sent.

    **Distributed.** When ``torch.distributed`` is initialised with several ranks the model is
    wrapped in ``DistributedDataParallel`` (gradients averaged, so the ranks stay identical),
    ``train_loader.sampler.set_epoch(epoch)`` is called when it has one (a
    ``DistributedSampler``; without one every rank trains on the same batches and a warning
    says so), BatchNorm running statistics are averaged over ranks after every epoch, and
    the reported loss and accuracy are global. Every rank must call ``finetune`` with
    loaders of the same length.

    The history holds, per epoch: ``epoch`` (1-based), ``loss`` (mean training loss), ``lr``
    (the rate of the epoch's last iteration), ``accuracy`` (top-1 on ``eval_loader`` after the
    epoch, see :func:`evaluate`; None without one) and ``seconds``. A ``tqdm`` bar shows
    progress on rank 0 when ``progress`` is true. The model's training flags are restored
    at the end, and its gradients cleared.
    """
    check_model(model, allow_torchscript=True)
    steps_per_epoch = _check_loader(train_loader, "train_loader")
    epochs = check_int(epochs, "epochs", 1)
    lr = check_real(lr, "lr", low=0.0, low_open=True)
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    weight_decay = check_real(weight_decay, "weight_decay", low=0.0)
    warmup_epochs = check_real(warmup_epochs, "warmup_epochs", low=0.0)
    if warmup_epochs >= epochs and warmup_epochs > 0:
        raise ValueError(
            f"warmup_epochs ({warmup_epochs:g}) must be smaller than epochs ({epochs}) so that the cosine phase "
            "has iterations; pass warmup_epochs=0 or a fraction of an epoch such as 0.1"
        )
    if teacher is not None:
        check_model(teacher, "teacher", allow_torchscript=True)
        if teacher is model:
            raise ValueError("teacher must be a separate model (e.g. a copy of the unpruned model), not model itself")
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    mixup = check_real(mixup, "mixup", low=0.0)
    cutmix = check_real(cutmix, "cutmix", low=0.0)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", 2)
    if eval_loader is not None:
        _check_loader(eval_loader, "eval_loader")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameter (requires_grad=True)")

    device = _resolve_device(model, device)
    model.to(device)
    teacher_flags = []
    if teacher is not None:
        teacher.to(device)
        teacher_flags = [(m, m.training) for m in teacher.modules()]
        teacher.eval()
    distributed = gdist.is_distributed()
    rank = gdist.rank()
    net: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if not hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            warnings.warn(
                "finetune runs distributed but train_loader has no DistributedSampler: every rank trains on "
                "the same batches", stacklevel=2,
            )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = _scheduler(optimizer, steps_per_epoch, epochs, warmup_epochs)
    mixer, mixer_classes = None, None
    flags = [(m, m.training) for m in model.modules()]
    history = []
    try:
        for epoch in range(epochs):
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            model.train()
            start = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            last_lr = optimizer.param_groups[0]["lr"]
            bar = tqdm(
                train_loader, total=steps_per_epoch, desc=f"fine-tune {epoch + 1}/{epochs}", unit="batch",
                disable=not progress or rank != 0, leave=False,
            )
            for index, batch in enumerate(bar):
                batch = LoaderBatch(batch, index, "train_loader", device, "cross-entropy")
                if (mixup > 0 or cutmix > 0) and mixer is None:
                    mixer_classes = num_classes or _output_width(model, batch)
                    mixer = _mixer(mixup, cutmix, mixer_classes)
                outputs, loss = _batch_loss(batch, net, mixer, teacher, alpha, temperature)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss became {loss.item()} at epoch {epoch + 1}; lower lr (now {last_lr:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last_lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                count = outputs.shape[0]
                loss_sum += loss.detach().double() * count
                seen += count
                if not bar.disable:  # .item() waits for the device: only when the bar is shown
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{last_lr:.2g}", refresh=False)
            bar.close()
            total_loss, total_seen = gdist.all_reduce_sum([loss_sum.item(), seen]) if distributed else (loss_sum.item(), seen)
            if distributed:
                gdist.average_buffers(model)
            accuracy = _accuracy(model, eval_loader, "eval_loader", device, None) if eval_loader is not None else None
            record = {
                "epoch": epoch + 1,
                "loss": total_loss / max(total_seen, 1),
                "lr": last_lr,
                "accuracy": accuracy,
                "seconds": time.perf_counter() - start,
            }
            history.append(record)
            if progress and rank == 0:
                text = f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, lr {last_lr:.3g}"
                tqdm.write(text + (f", accuracy {100 * accuracy:.2f}%" if accuracy is not None else ""))
    finally:
        optimizer.zero_grad(set_to_none=True)
        for module, flag in flags:
            module.training = flag
        for module, flag in teacher_flags:
            module.training = flag
        del net
    return history


def _batch_loss(batch: LoaderBatch, net: nn.Module, mixer, teacher: Optional[nn.Module], alpha: float,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, loss)`` on one training batch, mixed by ``mixer`` and distilled from ``teacher`` if given."""
    inputs, targets = batch.inputs, batch.targets
    if mixer is not None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise TypeError("mixup / cutmix need image batches: inputs must be one (N, C, H, W) tensor")
        with batch.explained("mixup / cutmix"):
            inputs, targets = mixer(inputs, targets)
    outputs = batch.forward(net, inputs)
    loss = batch.loss(F.cross_entropy, outputs, targets)
    if teacher is None:
        return outputs, loss
    with torch.no_grad():
        teacher_outputs = batch.forward(teacher, inputs, role="the teacher")
    if getattr(teacher_outputs, "shape", None) != outputs.shape:
        raise ValueError(
            f"the teacher outputs {describe_value(teacher_outputs)} but the model {describe_value(outputs)} on "
            f"batch {batch.index} of train_loader; distillation needs a teacher with the model's outputs "
            "(e.g. the unpruned model)"
        )
    return outputs, alpha * distillation_loss(outputs, teacher_outputs, temperature) + (1 - alpha) * loss


def _output_width(model: nn.Module, batch: LoaderBatch) -> int:
    """The number of classes: the last dim of the model's output on one sample (eval, no grad)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            inputs = batch.inputs
            out = batch.forward(model, inputs[:1] if isinstance(inputs, torch.Tensor) else inputs)
    finally:
        for module, flag in flags:
            module.training = flag
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError("cannot infer num_classes for mixup / cutmix from the model's output; pass num_classes")
    return int(out.shape[-1])
