"""tracer.record: shapes recorded on meta tensors, and the table of module output shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune
import tracer
from tracer.record import OUTPUT_SHAPES, Recorder, record_on_meta


def _instance(cls: type) -> nn.Module:
    if cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return cls(6)
    if cls is nn.GroupNorm:
        return cls(3, 6)
    if cls is nn.LayerNorm:
        return cls([5])
    if cls is nn.Linear:
        return cls(5, 7)
    return cls()


def _accepted_input(cls: type) -> torch.Tensor:
    shape = {nn.BatchNorm1d: (2, 6, 5), nn.BatchNorm3d: (2, 6, 5, 5, 5)}.get(cls, (2, 6, 5, 5))
    return torch.randn(shape)


@pytest.mark.parametrize("cls", sorted(OUTPUT_SHAPES, key=lambda c: c.__name__))
def test_every_table_entry_gives_the_shape_the_module_produces(cls):
    module = _instance(cls).eval()
    x = _accepted_input(cls)
    with torch.no_grad():
        expected = module(x)
    assert OUTPUT_SHAPES[cls](module, x) == tuple(expected.shape)
    model = nn.Sequential(nn.Identity(), module).eval()
    graph = tracer.capture(model)
    recorder = record_on_meta(model, graph, (x,))
    assert recorder is not None
    assert recorder.values["_1"] == tracer.TensorSpec(tuple(expected.shape), expected.dtype)


@pytest.mark.parametrize(
    "module, x",
    [
        (nn.BatchNorm2d(6), torch.randn(1, 5, 4, 4)),  # wrong channel count
        (nn.BatchNorm2d(6), torch.randn(6, 4, 4)),  # wrong rank
        (nn.LayerNorm([5]), torch.randn(2, 4)),
        (nn.Linear(5, 3), torch.randn(2, 4)),
        (nn.GroupNorm(2, 6), torch.randn(2, 4, 3)),
    ],
)
def test_inputs_the_table_rejects_fail_as_in_the_model(module, x):
    """The table never accepts what the module itself rejects: analysis reports the model's error."""
    assert OUTPUT_SHAPES[type(module)](module, x) is None
    with pytest.raises(ValueError, match="raised .* on the example inputs"):
        graphprune.analyze(nn.Sequential(nn.Identity(), module), x)


def test_a_dtype_other_than_the_weight_s_is_left_to_the_module():
    assert OUTPUT_SHAPES[nn.Linear](nn.Linear(5, 3), torch.randn(2, 5, dtype=torch.float64)) is None
    assert OUTPUT_SHAPES[nn.BatchNorm1d](nn.BatchNorm1d(5), torch.randn(2, 5, dtype=torch.float64)) is None


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
