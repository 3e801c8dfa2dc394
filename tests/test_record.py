"""tracer.record: shapes recorded on meta tensors (the rules themselves: test_shape_rules.py)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from graphprune import tracer
from graphprune.analysis.analyzer import traced_leaves
from graphprune.tracer.record import Recorder, record_on_meta


class _Doubling(nn.ReLU):
    """A subclass with its own forward: not covered by the ReLU entry."""

    def forward(self, x):
        return torch.cat([x, x], dim=1)


def test_subclasses_and_hooked_modules_run_their_own_forward():
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda module, args, out: out[:, :2])
    model = nn.Sequential(_Doubling(), hooked).eval()
    graph = tracer.capture(model, [type(hooked)])
    meta = record_on_meta(model, graph, (torch.randn(1, 3, 4),))
    assert meta.values["_0"].shape == (1, 6, 4) and meta.values["_1"].shape == (1, 2, 4)


def test_meta_run_leaves_the_model_alone_and_matches_a_real_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = tracer.capture(model)
    x = torch.randn(2, 3, 6, 6)
    meta = record_on_meta(model, graph, (x,))
    real = Recorder(model, graph)
    with torch.no_grad():
        real.run(x)
    assert meta.values == real.values
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())


class _KeepsReferences(nn.Module):
    """Reads its weight through a plain attribute, as RNNs (flat weight lists) and tied heads do."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4))
        self.refs = (self.weight,)

    def forward(self, x):
        return x @ self.refs[0]


def test_modules_that_keep_extra_references_to_their_weights_run_on_meta_too():
    keeper = _KeepsReferences()
    model = nn.Sequential(keeper, nn.ReLU()).eval()
    meta = record_on_meta(model, tracer.capture(model, [keeper]), (torch.randn(2, 8),))
    assert meta is not None and meta.values["_0"] == tracer.TensorSpec((2, 4), torch.float32)
    assert keeper.refs[0] is keeper.weight and keeper.weight.device.type == "cpu"


class _SizedByValues(nn.Module):
    """Slices by a value it computes from a tensor it creates on the CPU."""

    def forward(self, x):
        positions = torch.arange(x.shape[1], dtype=torch.float32) * 2.0  # [0, 2, 4, ...]: no rule may touch it
        return x[:, : (positions < 6).sum()] + 1.0


def test_tensors_the_forward_creates_on_the_cpu_keep_their_values_in_a_meta_run():
    model = _SizedByValues()
    graph = tracer.capture(model)
    x = torch.randn(2, 10)
    meta = record_on_meta(model, graph, (x,))
    real = Recorder(model, graph)
    real.run(x)
    assert meta is not None and meta.values == real.values
    assert real.values[list(graph.nodes)[-2].name] == tracer.TensorSpec((2, 3), torch.float32)


@pytest.mark.parametrize(
    "name, size",
    [("resnet18", 32), ("mobilenet_v3_small", 32), ("efficientnet_b0", 32), ("densenet121", 32),
     ("convnext_tiny", 32), ("vit_b_16", 224), ("swin_t", 64), ("inception_v3", 75)],
)
def test_a_meta_run_records_what_a_real_run_records_on_torchvision_models(name, size):
    """The shape rules and meta kernels together agree with real kernels on every node."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    graph = tracer.capture(model, traced_leaves([]))
    x = torch.randn(1, 3, size, size)
    meta = record_on_meta(model, graph, (x,))
    real = Recorder(model, graph)
    with torch.no_grad():
        real.run(x)
    assert meta is not None and meta.values == real.values
