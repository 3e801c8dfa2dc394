"""Digits loaders, finetune (schedule, distillation, MixUp/CutMix, validation), evaluate, prune_schedule."""
from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.utils.data import DataLoader, Subset, TensorDataset

import graphprune
from graphprune.data import digits_datasets, digits_loaders
from graphprune.workflow.finetune import _scheduler, distillation_loss

ft = importlib.import_module("graphprune.workflow.finetune")


def small_cnn(channels: int = 1, width: int = 8, norm: bool = True) -> nn.Module:
    layers = [nn.Conv2d(channels, width, 3, padding=1)]
    layers += [nn.BatchNorm2d(width)] if norm else []
    layers += [nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)]
    layers += [nn.BatchNorm2d(2 * width)] if norm else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10)]
    return nn.Sequential(*layers)


def digits8(batch_size=32, samples=None, shuffle=True):
    """8x8 single-channel digits; optionally only the first ``samples`` training images."""
    train, test = digits_datasets(image_size=8, channels=1)
    if samples is not None:
        train = Subset(train, range(samples))
    generator = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=generator),
            DataLoader(test, batch_size=120))


# ------------------------------------------------------------------ data
def test_digits_loaders_shapes_split_and_normalisation():
    train, test = digits_loaders(batch_size=64)
    assert len(train.dataset) == 1437 and len(test.dataset) == 360
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) <= 9
    assert torch.equal(images[:, 0], images[:, 2])  # replicated channels
    everything = train.dataset.tensors[0]
    assert abs(float(everything.mean())) < 0.05 and abs(float(everything.std()) - 1) < 0.1
    assert sorted(set(test.dataset.tensors[1].tolist())) == list(range(10))  # stratified
    one, _ = digits_loaders(batch_size=16, image_size=8, channels=1)
    assert next(iter(one))[0].shape == (16, 1, 8, 8)
    # the split is fixed by the seed, and differs for another seed
    again, _ = digits_loaders(batch_size=64)
    assert torch.equal(again.dataset.tensors[1], train.dataset.tensors[1])
    other, _ = digits_loaders(batch_size=64, seed=1)
    assert not torch.equal(other.dataset.tensors[1], train.dataset.tensors[1])


def test_digits_loaders_validate():
    with pytest.raises(ValueError, match="image_size must be at least 8"):
        digits_loaders(image_size=4)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        digits_loaders(batch_size=1.5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        digits_loaders(distributed=True)


def test_digits_loader_never_ends_with_a_single_image():
    train, _ = digits_loaders(batch_size=2, image_size=8)  # 1437 = 2 * 718 + 1
    assert train.drop_last and len(train) == 718


# ------------------------------------------------------------------ schedule
def test_schedule_is_built_from_torch_schedulers_only():
    source = inspect.getsource(ft)
    assert "WarmUpLR" not in source and "LambdaLR" not in source
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = _scheduler(optimizer, steps_per_epoch=10, epochs=3, warmup_epochs=1)
    assert isinstance(scheduler, SequentialLR)
    assert [type(s) for s in scheduler._schedulers] == [LinearLR, CosineAnnealingLR]
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1 / 11)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # warm-up rises to the peak
    assert rates[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # cosine decays
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    plain = _scheduler(torch.optim.SGD([param], lr=0.1), steps_per_epoch=10, epochs=3, warmup_epochs=0)
    assert isinstance(plain, CosineAnnealingLR)


# ------------------------------------------------------------------ finetune
def test_finetune_learns_digits_and_reports_history():
    train, test = digits8(batch_size=32)
    model = small_cnn()
    before = graphprune.evaluate(model, test)
    history = graphprune.finetune(model, train, epochs=4, lr=0.1, warmup_epochs=0.5, eval_loader=test, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert set(history[0]) == {"epoch", "loss", "lr", "accuracy", "seconds"}
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["accuracy"] > max(0.6, before + 0.3)
    assert history[-1]["accuracy"] == pytest.approx(graphprune.evaluate(model, test))
    assert history[0]["lr"] > history[-1]["lr"] and history[-1]["lr"] < 0.01  # cosine end
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # flags restored


def test_finetune_restores_eval_mode_and_device_argument():
    train, _ = digits8(samples=64)
    model = small_cnn().eval()
    history = graphprune.finetune(model, train, epochs=1, warmup_epochs=0, device="cpu", progress=False)
    assert history[0]["accuracy"] is None
    assert not any(m.training for m in model.modules())


def test_distillation_loss_formula():
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    t = 3.0
    p = F.softmax(teacher / t, -1)
    expected = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert distillation_loss(student, teacher, t) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_finetune_with_teacher_uses_distillation():
    train, _ = digits8(samples=64)
    model = small_cnn(norm=False)
    teacher = copy.deepcopy(model).train()
    # alpha=1: only the KL to a teacher identical to the student, so the loss starts at ~0
    history = graphprune.finetune(model, train, epochs=1, lr=1e-6, warmup_epochs=0, teacher=teacher, alpha=1.0,
                                  progress=False)
    assert history[0]["loss"] < 1e-6
    assert teacher.training  # its flag was restored
    assert all(p.grad is None for p in teacher.parameters())
    # alpha=0: plain cross-entropy, far from 0 for an untrained model
    history = graphprune.finetune(model, train, epochs=1, lr=1e-6, warmup_epochs=0, teacher=teacher, alpha=0.0,
                                  progress=False)
    assert history[0]["loss"] > 1.0


class Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("option", ["mixup", "cutmix", "both"])
def test_finetune_mixes_batches(option):
    train, _ = digits8(batch_size=32, samples=64, shuffle=False)
    model = Recorder(small_cnn())
    kwargs = {"mixup": 0.4, "cutmix": 1.0} if option == "both" else {option: 1.0}
    history = graphprune.finetune(model, train, epochs=1, warmup_epochs=0, progress=False, **kwargs)
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    original = next(iter(train))[0]
    assert len(model.seen) == 2 and model.seen[0].shape == original.shape
    assert not torch.equal(model.seen[0], original)  # the model saw mixed images


def test_finetune_validates_arguments():
    train, _ = digits8(samples=32)
    model = small_cnn()
    cases = [
        (dict(epochs=0), ValueError, "epochs must be at least 1"),
        (dict(epochs=1.5), TypeError, "epochs must be an integer"),
        (dict(epochs=1, lr=0), ValueError, "lr must be > 0"),
        (dict(epochs=1, lr=float("nan")), ValueError, "lr must be finite"),
        (dict(epochs=1, momentum=1.0), ValueError, "momentum must be < 1"),
        (dict(epochs=1, weight_decay=-1), ValueError, "weight_decay must be >= 0"),
        (dict(epochs=1), ValueError, r"warmup_epochs \(1\) must be smaller than epochs \(1\)"),
        (dict(epochs=2, warmup_epochs=-1), ValueError, "warmup_epochs must be >= 0"),
        (dict(epochs=1, warmup_epochs=0, teacher=model), ValueError, "teacher must be a separate model"),
        (dict(epochs=1, warmup_epochs=0, teacher="resnet"), TypeError, "teacher must be a torch.nn.Module"),
        (dict(epochs=1, warmup_epochs=0, alpha=1.5), ValueError, "alpha must be <= 1"),
        (dict(epochs=1, warmup_epochs=0, temperature=0), ValueError, "temperature must be > 0"),
        (dict(epochs=1, warmup_epochs=0, mixup=-0.1), ValueError, "mixup must be >= 0"),
        (dict(epochs=1, warmup_epochs=0, num_classes=1), ValueError, "num_classes must be at least 2"),
        (dict(epochs=1, warmup_epochs=0, eval_loader=5), TypeError, "eval_loader must be an iterable"),
        (dict(epochs=1, warmup_epochs=0, device=3), TypeError, "device must be a string"),
        (dict(epochs=1, warmup_epochs=0, progress="yes"), TypeError, "progress must be True or False"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            graphprune.finetune(model, train, **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        graphprune.finetune("model", train, epochs=1)
    with pytest.raises(TypeError, match="must have a len"):
        graphprune.finetune(model, (b for b in train), epochs=1, warmup_epochs=0)
    with pytest.raises(ValueError, match="yields no batches"):
        graphprune.finetune(model, [], epochs=1, warmup_epochs=0)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair, got tuple of length 3"):
        graphprune.finetune(model, [(torch.zeros(2, 1, 8, 8),) * 3], epochs=1, warmup_epochs=0, progress=False)
    frozen = small_cnn().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        graphprune.finetune(frozen, train, epochs=1, warmup_epochs=0)
    with pytest.raises(FloatingPointError, match="lower lr"):
        graphprune.finetune(small_cnn(norm=False), digits8(samples=96)[0], epochs=1, warmup_epochs=0, lr=1e30,
                            momentum=0, progress=False)


def test_evaluate_counts_correct_predictions():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return F.one_hot(torch.full((x.shape[0],), 3), 10).float() + 0 * self.w

    labels = torch.tensor([3, 3, 1, 0, 3])
    loader = DataLoader(TensorDataset(torch.zeros(5, 2), labels), batch_size=2)
    assert graphprune.evaluate(Fixed(), loader) == pytest.approx(3 / 5)


def test_prune_schedule_reaches_cumulative_ratios():
    train, _ = digits8(batch_size=32, samples=64)
    model = small_cnn(width=16)
    x = torch.randn(1, 1, 8, 8)
    history = graphprune.prune_schedule(model, x, train, ratios=[0.25, 0.5], epochs_per_step=1, warmup_epochs=0,
                                        progress=False)
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["step_ratio"] == pytest.approx(0.25) and history[1]["step_ratio"] == pytest.approx(1 / 3)
    assert model[0].out_channels == 8 and model[3].out_channels == 16  # 16 -> 12 -> 8 and 32 -> 24 -> 16
    assert history[1]["parameters"] == graphprune.count_parameters(model) < history[0]["parameters"]
    assert len(history[0]["finetune"]) == 1 and history[0]["finetune"][0]["loss"] > 0


def test_prune_schedule_validates():
    train, _ = digits8(samples=32)
    model, x = small_cnn(), torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="increase strictly"):
        graphprune.prune_schedule(model, x, train, ratios=[0.5, 0.3], epochs_per_step=1)
    with pytest.raises(ValueError, match=r"ratios\[0\] must be > 0"):
        graphprune.prune_schedule(model, x, train, ratios=[0.0], epochs_per_step=1)
    with pytest.raises(TypeError, match="non-empty sequence"):
        graphprune.prune_schedule(model, x, train, ratios=0.5, epochs_per_step=1)
    with pytest.raises(ValueError, match="prune_kwargs may not set ratio"):
        graphprune.prune_schedule(model, x, train, ratios=[0.5], epochs_per_step=1, prune_kwargs={"ratio": 0.1})
    with pytest.raises(ValueError, match="pass epochs_per_step"):
        graphprune.prune_schedule(model, x, train, ratios=[0.5], epochs_per_step=1, epochs=3)
