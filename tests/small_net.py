"""SmallNet: a stem, one residual block and a head, with known group widths (16, 12, 24);
shared by the API, atomicity and Group.prune tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_batch_norms


class SmallNet(nn.Module):
    """stem -> residual block (inner width 12) -> conv3 -> pool -> fc.

    Prunable groups: the residual stream (16), the block's inner width (12), conv3's width (24).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conva = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(12)
        self.convb = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bnb(self.convb(F.relu(self.bna(self.conva(x)))))
        x = F.relu(x + y)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def small_net() -> SmallNet:
    """A SmallNet in eval mode with non-trivial norm statistics and affine parameters."""
    return randomize_batch_norms(SmallNet()).eval()


def widths(model: SmallNet) -> tuple:
    return model.conv1.out_channels, model.conva.out_channels, model.conv3.out_channels


def assert_consistent(model: SmallNet) -> None:
    """Every size attribute agrees with the tensors it describes."""
    s, inner, w = widths(model)
    assert model.conv1.weight.shape == (s, 3, 3, 3)
    assert model.bn1.num_features == model.bn1.weight.numel() == model.bn1.running_mean.numel() == s
    assert model.conva.in_channels == s and model.conva.weight.shape == (inner, s, 3, 3)
    assert model.bna.num_features == model.bna.running_var.numel() == inner
    assert model.convb.in_channels == inner and model.convb.out_channels == s
    assert model.convb.weight.shape == (s, inner, 3, 3)
    assert model.bnb.num_features == s and model.conv3.in_channels == s
    assert model.conv3.weight.shape == (w, s, 3, 3)
    assert model.bn3.num_features == w and model.fc.in_features == w and model.fc.weight.shape == (10, w)
