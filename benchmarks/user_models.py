"""Long-tail sweep over models written the way users write their own: from code, random weights.

Convolutional (user_models_cnn.py), recurrent and attention (user_models_seq.py) models and, here,
models with odd inputs, outputs and attributes (a dict input, a read-only mapping, parametrised
weights, shared weights, several heads, a no-grad teacher), each pruned at 0.3 and 0.5 and held
to the checks of long_tail.py: analysis pure and raising only graphprune's errors, prune
succeeds, output shape kept and finite, params <= 0.9, a train step, save/load bit-identical.
Usage:

    python benchmarks/user_models.py                       # the table on stdout
    python benchmarks/user_models.py --peer --out          # with Torch-Pruning; results/long_tail_users.md
    python benchmarks/user_models.py --only unet,espcn --ratios 0.3
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations  # noqa: E402

from long_tail import Case, parse_args, sweep, versions  # noqa: E402
from user_models_cnn import (AudioNet, AutoEncoder, CBAM, DenseNet, DepthwiseSE, ESPCN, FlattenUnflatten,  # noqa: E402
                             FPN, GroupNormNet, Inception, LayerScaleBlock, MLPMixer, PlainCNN, PointNet,
                             ResShuffleNet, TCN, UNet, VideoNet, cbr)
from user_models_seq import SEQUENCE_CASES  # noqa: E402


def img(c: int = 3, s: int = 32, b: int = 2) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(1))


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.compare = nn.Linear(32, 1)

    def forward(self, a, b):
        return self.compare((self.encoder(a) - self.encoder(b)).abs())


class MultiHead(nn.Module):
    """A backbone with a classification, a box and a mask head, returned as a dict."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 16), cbr(16, 32, s=2), cbr(32, 32))
        self.cls, self.box, self.mask = nn.Linear(32, 7), nn.Linear(32, 4), nn.Conv2d(32, 1, 1)

    def forward(self, x):
        f = self.backbone(x)
        pooled = f.mean((2, 3))
        return {"logits": self.cls(pooled), "boxes": self.box(pooled).sigmoid(), "mask": self.mask(f)}


class ReshapeProducts(nn.Module):
    """``x.reshape(b, c * h, w)``: a conv map read as a 1-D sequence of c*h channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.seq = cbr(1, 8), nn.Conv1d(8 * 16, 32, 3, padding=1)
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), (2, 1))
        b, c, h, w = x.shape
        return self.head(self.seq(x.reshape(b, c * h, w)).mean(-1))


class FrozenDict(dict):
    """A read-only mapping, like diffusers' FrozenDict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__frozen = True

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(f"cannot change a {type(self).__name__}")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = popitem = _refuse


class FrozenConfigNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = FrozenDict(width=32, classes=5, act="gelu")
        self.body, self.head = nn.Sequential(cbr(3, self.config["width"]), cbr(32, 32)), nn.Linear(32, 5)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        return self.head(F.gelu(x) if self.config["act"] == "gelu" else x)


class DictInput(nn.Module):
    """``model({"rgb": x, "depth": d})``: one positional dict argument."""

    def __init__(self):
        super().__init__()
        self.rgb, self.depth = cbr(3, 16), cbr(1, 8)
        self.fuse, self.head = cbr(24, 32), nn.Linear(32, 3)

    def forward(self, batch):
        x = torch.cat([self.rgb(batch["rgb"]), self.depth(batch["depth"])], dim=1)
        return self.head(self.fuse(x).mean((2, 3)))


class NormedLayers(nn.Module):
    """weight_norm and spectral_norm parametrisations, as in GAN discriminators and vocoders."""

    def __init__(self):
        super().__init__()
        self.c1 = parametrizations.weight_norm(nn.Conv2d(3, 16, 3, padding=1))
        self.c2 = parametrizations.spectral_norm(nn.Conv2d(16, 32, 3, 2, 1))
        self.c3 = parametrizations.weight_norm(nn.Conv2d(32, 32, 3, padding=1))
        self.out = parametrizations.spectral_norm(nn.Linear(32, 1))

    def forward(self, x):
        x = F.leaky_relu(self.c2(F.leaky_relu(self.c1(x), 0.2)), 0.2)
        x = F.leaky_relu(self.c3(x), 0.2)
        return self.out(x.mean((2, 3)))


class FrozenTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(cbr(3, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    @torch.no_grad()
    def forward(self, x):
        return self.net(x).softmax(-1)


class DistilledStudent(nn.Module):
    """A student whose forward also runs a teacher under ``@torch.no_grad()``."""

    def __init__(self):
        super().__init__()
        self.teacher, self.student = FrozenTeacher(), nn.Sequential(cbr(3, 24), cbr(24, 24), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        logits = self.head(self.student(x).flatten(1))
        return logits, (logits.log_softmax(-1) * self.teacher(x)).sum(-1)


CASES = [
    Case("plain_cnn", lambda: (PlainCNN().eval(), img())),
    Case("res_concat_shuffle", lambda: (ResShuffleNet().eval(), img())),
    Case("unet_convtranspose", lambda: (UNet().eval(), img())),
    Case("espcn_pixel_shuffle", lambda: (ESPCN().eval(), img())),
    Case("depthwise_se", lambda: (DepthwiseSE().eval(), img())),
    Case("groupnorm", lambda: (GroupNormNet().eval(), img())),
    Case("audio_conv1d", lambda: (AudioNet().eval(), torch.randn(2, 1, 800))),
    Case("video_conv3d", lambda: (VideoNet().eval(), torch.randn(2, 3, 4, 16, 16))),
    Case("mlp_mixer", lambda: (MLPMixer().eval(), img())),
    Case("siamese_shared", lambda: (Siamese().eval(), (img(), img(b=2) * 0.5))),
    Case("multi_output_heads", lambda: (MultiHead().eval(), img()), head=("cls", "box", "mask")),
    Case("reshape_products", lambda: (ReshapeProducts().eval(), img(1, 32))),
    Case("frozen_dict_attr", lambda: (FrozenConfigNet().eval(), img())),
    Case("dict_input", lambda: (DictInput().eval(), ({"rgb": img(), "depth": img(1)},))),
    Case("weight_spectral_norm", lambda: (NormedLayers().eval(), img())),
    Case("inception_concat", lambda: (Inception().eval(), img())),
    Case("dense_concat", lambda: (DenseNet().eval(), img())),
    Case("cbam", lambda: (CBAM().eval(), img())),
    Case("fpn_interpolate", lambda: (FPN().eval(), img())),
    Case("autoencoder", lambda: (AutoEncoder().eval(), img())),
    Case("layer_scale", lambda: (LayerScaleBlock().eval(), img())),
    Case("pointnet", lambda: (PointNet().eval(), torch.randn(2, 64, 3))),
    Case("tcn_causal", lambda: (TCN().eval(), torch.randn(2, 4, 50))),
    Case("flatten_unflatten", lambda: (FlattenUnflatten().eval(), torch.randn(2, 1, 8, 8))),
    Case("no_grad_teacher", lambda: (DistilledStudent().eval(), img()), head=("head", "teacher.net.3")),
]


def main(argv=None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv, "long_tail_users.md")
    title = (f"# Long tail: models written by users ({versions(['torch-pruning'] if args.peer else [])})\n\n"
             f"Ratios {', '.join(map(str, args.ratios))}, L1, one thread, {args.timeout:g} s per case. "
             "A case passes when analysis is pure and raises only graphprune's errors, prune succeeds, the output "
             "shape is kept and finite, params <= 0.9, a train step runs and save/load gives equal outputs.")
    return sweep(CASES + SEQUENCE_CASES, args, title)


if __name__ == "__main__":
    sys.exit(main())
