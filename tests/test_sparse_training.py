"""Group-level sparse training inside the workflow: finetune with a GroupRegularizer (growing
regularisation learns and empties the scheduled channels), and prune_schedule building a fresh
regulariser after each pruning step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune
from graphprune.workflow.sparse import GroupRegularizer


def digits(size: int = 1437, test: bool = False) -> DataLoader:
    """8x8 digits: the first ``size`` training images (shuffled batches of 32), or the 360 test images."""
    train, held_out = graphprune.data.digits_datasets(image_size=8)
    if test:
        return DataLoader(held_out, batch_size=128)
    subset = TensorDataset(train.tensors[0][:size], train.tensors[1][:size])
    return DataLoader(subset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_finetune_with_a_growing_regulariser_learns_and_empties_the_scheduled_channels():
    model = DigitsNet()
    x = torch.randn(1, 3, 8, 8)
    regularizer = GroupRegularizer(model, x, coefficient=1e-3, target_ratio=0.5, delta=0.02)
    history = graphprune.finetune(model, digits(), epochs=4, lr=0.1, warmup_epochs=0, regularizer=regularizer,
                                  eval_loader=digits(test=True), progress=False)
    assert set(history[0]) == {"epoch", "loss", "lr", "accuracy", "seconds", "penalty"}
    assert history[-1]["accuracy"] > 0.5  # well above chance (0.1)
    coefficients = regularizer.coefficients()
    for group in regularizer.groups:  # four updates (one per epoch), each raising half the channels by 0.02
        values = coefficients[group.id]
        assert values.min() == 1e-3 and values.max() <= 1e-3 + 4 * 0.02 + 1e-12
        np.testing.assert_allclose(values.sum(), group.size * 1e-3 + 4 * (group.size // 2) * 0.02)
    assert all(p.grad is None for p in model.parameters())
    graphprune.prune(model, 0.5, x, criterion="group_norm")
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 16


def test_finetune_and_prune_schedule_check_the_regulariser():
    model = DigitsNet()
    x = torch.randn(1, 3, 8, 8)
    loader = digits(64)
    with pytest.raises(TypeError, match="regularizer must be a graphprune.GroupRegularizer, got dict"):
        graphprune.finetune(model, loader, epochs=1, warmup_epochs=0, regularizer={"coefficient": 1e-3})
    with pytest.raises(ValueError, match="built on another DigitsNet object"):
        graphprune.finetune(model, loader, epochs=1, warmup_epochs=0, regularizer=GroupRegularizer(DigitsNet(), x))
    regularizer = GroupRegularizer(model, x)
    with pytest.raises(TypeError, match="mapping of GroupRegularizer settings"):
        graphprune.prune_schedule(model, x, loader, ratios=[0.25, 0.5], epochs_per_step=1, regularizer=regularizer)
    with pytest.raises(ValueError, match="regularizer may set only coefficient, mode, delta, max_coefficient, not target_ratio"):
        graphprune.prune_schedule(model, x, loader, ratios=[0.25, 0.5], epochs_per_step=1,
                                  regularizer={"target_ratio": 0.5})
    with pytest.raises(ValueError, match="mode must be one of"):
        graphprune.prune_schedule(model, x, loader, ratios=[0.25, 0.5], epochs_per_step=1, regularizer={"mode": "x"})
    assert model.conv1.out_channels == 16  # nothing pruned before the checks
    graphprune.prune(model, 0.25, x)
    with pytest.raises(ValueError, match="the model changed since"):
        graphprune.finetune(model, loader, epochs=1, warmup_epochs=0, regularizer=regularizer)


def test_prune_schedule_builds_a_fresh_regulariser_for_each_step_but_the_last():
    model = DigitsNet()
    x = torch.randn(1, 3, 8, 8)
    history = graphprune.prune_schedule(model, x, digits(128), ratios=[0.25, 0.5], epochs_per_step=1,
                                        criterion="group_norm", regularizer={"coefficient": 1e-3, "delta": 1e-2},
                                        warmup_epochs=0, progress=False)
    assert "penalty" in history[0]["finetune"][0] and "penalty" not in history[1]["finetune"][0]
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 16
    with pytest.warns(UserWarning, match="no effect with a single ratio"):
        graphprune.prune_schedule(DigitsNet(), x, digits(64), ratios=[0.5], epochs_per_step=1,
                                  regularizer={"coefficient": 1e-3}, warmup_epochs=0, progress=False)
