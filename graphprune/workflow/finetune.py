"""Fine-tuning after pruning: :func:`finetune`.

:func:`finetune` trains with SGD + momentum under a per-iteration learning-rate schedule
made of PyTorch's own schedulers: :class:`~torch.optim.lr_scheduler.LinearLR` warm-up
chained by :class:`~torch.optim.lr_scheduler.SequentialLR` to
:class:`~torch.optim.lr_scheduler.CosineAnnealingLR` decay to zero. Options: MixUp / CutMix
(``torchvision.transforms.v2``), knowledge distillation from an unpruned teacher, per-epoch
test accuracy (:mod:`.evaluation`), group-level sparse training (a
:class:`~graphprune.workflow.sparse.GroupRegularizer`), and
:class:`~torch.nn.parallel.DistributedDataParallel` when ``torch.distributed`` is initialised
(run the same script under ``torchrun``).
Iterative pruning (prune, fine-tune, repeat) lives in :mod:`.schedule`.

What :func:`finetune` does, in detail:

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

**Sparse training.** With a ``regularizer`` (a :class:`~graphprune.workflow.sparse.GroupRegularizer`
built on ``model``), its ``step()`` adds the penalty's gradient after every
``loss.backward()`` (under DDP, to the averaged gradients), and a growing one's
``update()`` runs at the start of every epoch. Prune afterwards with
``criterion="group_norm"`` (``"bn_scale"`` after ``mode="bn_scale"``).

**Devices.** ``device`` (default: the model's device; the current CUDA device under NCCL)
is where the model is moved and every batch is sent.

**Distributed.** When ``torch.distributed`` is initialised with several ranks the model is
wrapped in ``DistributedDataParallel`` (gradients averaged, so the ranks stay identical),
``train_loader.sampler.set_epoch(epoch)`` is called when it has one (a
``DistributedSampler``; without one every rank trains on the same batches and a warning
says so), BatchNorm running statistics are averaged over ranks after every epoch, and
the reported loss and accuracy are global. Every rank must call ``finetune`` with
loaders of the same length.

The history holds, per epoch: ``epoch`` (1-based), ``loss`` (mean training loss, without
the penalty), ``lr`` (the rate of the epoch's last iteration), ``accuracy`` (top-1 on
``eval_loader`` after the epoch, see :func:`evaluate`; None without one), ``seconds``, and
with a ``regularizer`` its ``penalty`` after the epoch. A ``tqdm`` bar shows
progress on rank 0 when ``progress`` is true. The model's training flags are restored
at the end, and its gradients cleared.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from tqdm.auto import tqdm

from graphprune.tracer.devices import LoaderBatch, describe_value
from graphprune.tracer.state import eval_mode, training_flags_kept
from graphprune.validation import check_bool, check_int, check_model, check_real

from . import distributed as gdist
from .evaluation import Device, accuracy, check_loader, resolve_device
from .sparse import GroupRegularizer

__all__ = ["finetune", "distillation_loss"]


def finetune(
    model: nn.Module, train_loader: Iterable, *, epochs: int, lr: float = 0.01, momentum: float = 0.9,
    weight_decay: float = 5e-4, warmup_epochs: float = 1, teacher: Optional[nn.Module] = None,
    temperature: float = 4.0, alpha: float = 0.5, mixup: float = 0.0, cutmix: float = 0.0,
    num_classes: Optional[int] = None, eval_loader: Optional[Iterable] = None, device: Device = None,
    progress: bool = True, regularizer: Optional[GroupRegularizer] = None,
) -> list:
    """Fine-tune ``model`` in place and return its history, one dict per epoch.

    SGD with momentum under a per-iteration schedule (linear warm-up, then cosine decay to
    0), on cross-entropy, optionally mixed (MixUp / CutMix), distilled from a teacher or
    sparsity-regularised; distributed under ``torch.distributed``. The module docstring
    details each part. Training flags are restored at the end and gradients cleared.

    Parameters
    ----------
    model : nn.Module
        The model to train, moved to ``device``.
    train_loader : iterable with a len()
        ``(inputs, targets)`` batches, targets class indices.
    epochs : int
        Epochs to train (at least 1).
    lr : float, default 0.01
        Peak learning rate (> 0).
    momentum, weight_decay : float, default 0.9 and 5e-4
        SGD's, on every parameter; ``momentum`` in [0, 1), ``weight_decay`` >= 0.
    warmup_epochs : float, default 1
        Linear warm-up length, fractional allowed, smaller than ``epochs``; 0: cosine only.
    teacher : nn.Module, optional
        A separate model to distil from (e.g. the unpruned one); kept in eval mode.
    temperature, alpha : float, default 4.0 and 0.5
        The loss is ``alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * CE``.
    mixup, cutmix : float, default 0.0
        The Beta distribution's ``alpha`` of MixUp / CutMix (0: off); inputs must then be
        ``(N, C, H, W)`` tensors.
    num_classes : int, optional
        For MixUp / CutMix (at least 2); default: the width of the model's output.
    eval_loader : iterable with a len(), optional
        Top-1 accuracy after every epoch (:func:`~graphprune.evaluate`).
    device : str or torch.device, optional
        Default: the model's device; the current CUDA device under NCCL.
    progress : bool, default True
        Show a ``tqdm`` bar on rank 0.
    regularizer : GroupRegularizer, optional
        Built on ``model``: its ``step()`` runs after every ``loss.backward()``, a growing
        one's ``update()`` at the start of every epoch.

    Returns
    -------
    list of dict
        Per epoch: ``epoch`` (from 1), ``loss`` (mean, without the penalty), ``lr`` (of its
        last iteration), ``accuracy`` (None without ``eval_loader``), ``seconds``, and with
        a ``regularizer`` its ``penalty``.

    Raises
    ------
    TypeError, ValueError
        An invalid option, or a model without trainable parameters.
    FloatingPointError
        The training loss became NaN or infinite.
    """
    settings = _Settings.checked(model, train_loader, epochs=epochs, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, warmup_epochs=warmup_epochs, teacher=teacher,
                                 temperature=temperature, alpha=alpha, mixup=mixup, cutmix=cutmix,
                                 num_classes=num_classes, eval_loader=eval_loader, progress=progress,
                                 regularizer=regularizer)
    device = resolve_device(model, device)
    with training_flags_kept(model, *([teacher] if teacher is not None else [])):
        trainer = _Trainer(model, train_loader, settings, device)
        try:
            return [trainer.epoch(epoch) for epoch in range(settings.epochs)]
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)


@dataclass
class _Settings:
    """:func:`finetune`'s options, checked."""

    epochs: int
    steps_per_epoch: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    teacher: Optional[nn.Module]
    temperature: float
    alpha: float
    mixup: float
    cutmix: float
    num_classes: Optional[int]
    eval_loader: Optional[Iterable]
    progress: bool
    regularizer: Optional[GroupRegularizer]

    @classmethod
    def checked(cls, model: nn.Module, train_loader: Iterable, **options) -> "_Settings":
        check_model(model, allow_torchscript=True)
        o = dict(options, steps_per_epoch=check_loader(train_loader, "train_loader"),
                 epochs=check_int(options["epochs"], "epochs", 1),
                 lr=check_real(options["lr"], "lr", low=0.0, low_open=True),
                 momentum=check_real(options["momentum"], "momentum", low=0.0, high=1.0, high_open=True),
                 weight_decay=check_real(options["weight_decay"], "weight_decay", low=0.0),
                 warmup_epochs=check_real(options["warmup_epochs"], "warmup_epochs", low=0.0),
                 temperature=check_real(options["temperature"], "temperature", low=0.0, low_open=True),
                 alpha=check_real(options["alpha"], "alpha", low=0.0, high=1.0),
                 mixup=check_real(options["mixup"], "mixup", low=0.0), cutmix=check_real(options["cutmix"], "cutmix", low=0.0))
        if o["warmup_epochs"] >= o["epochs"] and o["warmup_epochs"] > 0:
            raise ValueError(
                f"warmup_epochs ({o['warmup_epochs']:g}) must be smaller than epochs ({o['epochs']}) so that the cosine "
                "phase has iterations; pass warmup_epochs=0 or a fraction of an epoch such as 0.1"
            )
        if o["teacher"] is not None:
            check_model(o["teacher"], "teacher", allow_torchscript=True)
            if o["teacher"] is model:
                raise ValueError("teacher must be a separate model (e.g. a copy of the unpruned model), not model itself")
        if o["num_classes"] is not None:
            o["num_classes"] = check_int(o["num_classes"], "num_classes", 2)
        if o["eval_loader"] is not None:
            check_loader(o["eval_loader"], "eval_loader")
        if o["regularizer"] is not None:
            _check_regularizer(o["regularizer"], model)
        check_bool(o["progress"], "progress")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no trainable parameter (requires_grad=True)")
        return cls(**o)


class _Trainer:
    """The state of one :func:`finetune` run: devices, the (DDP-wrapped) network, the optimizer,
    the learning-rate schedule and the mixer."""

    def __init__(self, model: nn.Module, train_loader: Iterable, settings: _Settings, device: torch.device):
        self.model, self.loader, self.s, self.device = model, train_loader, settings, device
        model.to(device)
        if settings.teacher is not None:
            settings.teacher.to(device).eval()
        self.distributed, self.rank = gdist.is_distributed(), gdist.rank()
        self.net = self._wrapped(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
        self.scheduler = _scheduler(self.optimizer, settings.steps_per_epoch, settings.epochs, settings.warmup_epochs)
        self.mixer = None

    def _wrapped(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if not hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
            warnings.warn("finetune runs distributed but train_loader has no DistributedSampler: every rank trains on "
                          "the same batches", stacklevel=4)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def epoch(self, epoch: int) -> dict:
        """Train one epoch; its record for the history."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.model.train()
        start = time.perf_counter()
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=self.device), 0
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(self.loader, total=self.s.steps_per_epoch, desc=f"fine-tune {epoch + 1}/{self.s.epochs}",
                   unit="batch", disable=not self.s.progress or self.rank != 0, leave=False)
        if self.s.regularizer is not None and self.s.regularizer.growing:
            self.s.regularizer.update()
        for index, batch in enumerate(bar):
            loss, count = self.step(LoaderBatch(batch, index, "train_loader", self.device, "cross-entropy"), epoch)
            loss_sum += loss.detach().double() * count
            seen += count
            if not bar.disable:  # .item() waits for the device: only when the bar is shown
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.last_lr:.2g}", refresh=False)
        bar.close()
        return self.record(epoch, loss_sum.item(), seen, time.perf_counter() - start)

    def step(self, batch: LoaderBatch, epoch: int) -> tuple:
        """One optimisation step on ``batch``; ``(loss, batch size)``."""
        if (self.s.mixup > 0 or self.s.cutmix > 0) and self.mixer is None:
            self.mixer = _mixer(self.s.mixup, self.s.cutmix, self.s.num_classes or _output_width(self.model, batch))
        outputs, loss = _batch_loss(batch, self.net, self.mixer, self.s.teacher, self.s.alpha, self.s.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at epoch {epoch + 1}; lower lr (now {self.last_lr:g})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.s.regularizer is not None:
            self.s.regularizer.step()
        self.optimizer.step()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return loss, outputs.shape[0]

    def record(self, epoch: int, loss_sum: float, seen: int, seconds: float) -> dict:
        """The epoch's history entry (global under torch.distributed), after its evaluation."""
        total_loss, total_seen = gdist.all_reduce_sum([loss_sum, seen]) if self.distributed else (loss_sum, seen)
        if self.distributed:
            gdist.average_buffers(self.model)
        eval_loader = self.s.eval_loader
        top1 = accuracy(self.model, eval_loader, "eval_loader", self.device, None) if eval_loader is not None else None
        record = {"epoch": epoch + 1, "loss": total_loss / max(total_seen, 1), "lr": self.last_lr, "accuracy": top1,
                  "seconds": seconds}
        if self.s.regularizer is not None:
            with torch.no_grad():
                record["penalty"] = float(self.s.regularizer.penalty())
        if self.s.progress and self.rank == 0:
            text = f"epoch {epoch + 1}/{self.s.epochs}: loss {record['loss']:.4f}, lr {self.last_lr:.3g}"
            tqdm.write(text + (f", accuracy {100 * top1:.2f}%" if top1 is not None else ""))
        return record


def _check_regularizer(regularizer: object, model: nn.Module) -> None:
    if not isinstance(regularizer, GroupRegularizer):
        raise TypeError(f"regularizer must be a graphprune.GroupRegularizer, got {type(regularizer).__name__}")
    if regularizer.model is not model:
        raise ValueError(f"the regularizer was built on another {type(regularizer.model).__name__} object than the model "
                         "given; build it on this model (after any pruning)")
    regularizer.check()


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
    with eval_mode(model), torch.no_grad():
        inputs = batch.inputs
        out = batch.forward(model, inputs[:1] if isinstance(inputs, torch.Tensor) else inputs)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError("cannot infer num_classes for mixup / cutmix from the model's output; pass num_classes")
    return int(out.shape[-1])
