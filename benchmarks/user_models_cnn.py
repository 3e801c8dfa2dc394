"""The convolutional models of the user-model sweep (user_models.py): plain, residual, U-Net, depthwise,
1-D, 3-D, mixer, concat-heavy and decoder networks, written as users write them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(i: int, o: int, k: int = 3, s: int = 1, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2), cbr(32, 64))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ShuffleBlock(nn.Module):
    """A residual unit whose two halves are concatenated and channel-shuffled."""

    def __init__(self, c: int, groups: int = 2):
        super().__init__()
        self.groups, self.branch = groups, nn.Sequential(cbr(c // 2, c // 2), cbr(c // 2, c // 2, g=c // 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b) + b], dim=1)
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ResShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blocks = cbr(3, 32), nn.Sequential(ShuffleBlock(32), ShuffleBlock(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class UNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.d1, self.d2, self.mid = cbr(3, c), cbr(c, 2 * c), cbr(2 * c, 4 * c)
        self.up2, self.u2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2), cbr(4 * c, 2 * c)
        self.up1, self.u1 = nn.ConvTranspose2d(2 * c, c, 2, 2), cbr(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        b = self.u2(torch.cat([self.up2(m), b], dim=1))
        return self.out(self.u1(torch.cat([a, self.up1(b)], dim=1)))


class ESPCN(nn.Module):
    def __init__(self, r: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Tanh(), nn.Conv2d(32, 16, 3, padding=1), nn.Tanh())
        self.tail, self.r = nn.Conv2d(16, 3 * r * r, 3, padding=1), r

    def forward(self, x):
        return F.pixel_shuffle(self.tail(self.body(x)), self.r)


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class DepthwiseSE(nn.Module):
    """MobileNet-style depthwise-separable blocks with squeeze-excite."""

    def __init__(self):
        super().__init__()
        layers, c = [cbr(3, 16, s=2)], 16
        for o in (24, 32, 48):
            layers += [cbr(c, c, g=c), SE(c), cbr(c, o, k=1)]
            c = o
        self.features, self.classifier = nn.Sequential(*layers), nn.Linear(c, 10)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU())
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.body(x).amax((2, 3)))


class AudioNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 16, 9, 4, 4), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 32, 5, 2, 2),
                                 nn.BatchNorm1d(32), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.out = nn.Linear(32, 8)

    def forward(self, wave):
        return self.out(self.net(wave))


class VideoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(), nn.MaxPool3d(2),
                                 nn.Conv3d(16, 32, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU())
        self.out = nn.Linear(32, 4)

    def forward(self, clip):
        return self.out(self.net(clip).mean((2, 3, 4)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.ch = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class MLPMixer(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.Sequential(MixerBlock(16, dim), MixerBlock(16, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24)
        self.b1, self.b3, self.b5 = cbr(24, 8, 1), nn.Sequential(cbr(24, 8, 1), cbr(8, 16)), cbr(24, 8, 5)
        self.bp, self.fc = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(24, 8, 1)), nn.Linear(40, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layers = nn.ModuleList(cbr(16 + i * growth, growth) for i in range(3))
        self.fc = nn.Linear(16 + 3 * growth, 10)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.fc(torch.cat(features, 1).mean((2, 3)))


class CBAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.mlp = cbr(3, 32), nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32))
        self.spatial, self.fc = nn.Conv2d(2, 1, 7, padding=3), nn.Linear(32, 10)

    def forward(self, x):
        x = self.body(x)
        att = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
        x = x * att[:, :, None, None]
        x = x * torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)))
        return self.fc(x.mean((2, 3)))


class FPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3, self.c4, self.c5 = cbr(3, 16, s=2), cbr(16, 32, s=2), cbr(32, 64, s=2)
        self.l3, self.l4, self.l5 = nn.Conv2d(16, 24, 1), nn.Conv2d(32, 24, 1), nn.Conv2d(64, 24, 1)
        self.out = nn.Conv2d(24, 5, 3, padding=1)

    def forward(self, x):
        c3 = self.c3(x)
        c4 = self.c4(c3)
        p5 = self.l5(self.c5(c4))
        p4 = self.l4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.l3(c3) + F.interpolate(p4, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.out(p3)


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(cbr(3, 16, s=2), cbr(16, 32, s=2))
        self.dec = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(16, 3, 4, 2, 1))

    def forward(self, x):
        return torch.sigmoid(self.dec(self.enc(x)))


class LayerScaleBlock(nn.Module):
    def __init__(self, c: int = 32):
        super().__init__()
        self.stem, self.dw, self.norm = nn.Conv2d(3, c, 4, 4), nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma, self.head = nn.Parameter(1e-2 * torch.ones(c)), nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        x = x + (self.gamma * self.pw2(F.gelu(self.pw1(y)))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class PointNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 64, 1), nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, points):
        return self.fc(self.mlp(points.transpose(1, 2)).max(dim=2).values)


class TCN(nn.Module):
    """Dilated causal 1-D convolutions, left-padded with F.pad, with residuals."""

    def __init__(self, c: int = 24):
        super().__init__()
        self.inp = nn.Conv1d(4, c, 1)
        self.convs = nn.ModuleList(nn.Conv1d(c, c, 3, dilation=d) for d in (1, 2, 4))
        self.out = nn.Conv1d(c, 2, 1)

    def forward(self, x):
        x = self.inp(x)
        for conv in self.convs:
            x = x + F.relu(conv(F.pad(x, (2 * conv.dilation[0], 0))))
        return self.out(x)


class FlattenUnflatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8 * 4 * 4),
                                 nn.Unflatten(1, (8, 4, 4)), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 1, 1))

    def forward(self, x):
        return self.net(x)
