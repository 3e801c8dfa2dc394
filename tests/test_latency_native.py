"""The native rebuild of ``benchmarks/latency_native.py`` (no timing): the rebuilt model gives the pruned
model's outputs, every parameter of it is fresh and contiguous, and the layout check flags a strided weight."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "latency_native.py"


def _load():
    saved = list(sys.path)  # the script appends benchmarks/ to sys.path for itself; the suite keeps its own
    try:
        spec = importlib.util.spec_from_file_location("latency_native", _PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


native_bench = _load()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1), nn.GroupNorm(4, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


class SmallTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 50)

    def forward(self, ids):
        return self.out(self.norm(self.block(self.embed(ids))))


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, use_cache=False)
    return transformers.LlamaForCausalLM(config).eval(), {"uniform": True}


def _model(kind):
    if kind == "cnn":
        return SmallCNN().eval(), torch.randn(1, 3, 16, 16), {}
    ids = torch.randint(0, 50 if kind == "transformer" else 100, (1, 12))
    if kind == "transformer":
        return SmallTransformer().eval(), ids, {}
    model, extra = _tiny_llama()
    return model, ids, extra


def _fresh_storage(pruned, native) -> bool:
    ours = {p.data_ptr() for p in pruned.parameters()}
    return not any(p.data_ptr() in ours for p in native.parameters())


@pytest.mark.parametrize("kind", ["cnn", "transformer", "llama"])
def test_rebuild_gives_the_same_outputs_with_fresh_contiguous_parameters(kind):
    model, x, extra = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = graphprune.prune(model, 0.5, x, inplace=False, **extra)
    assert graphprune.count_parameters(pruned) < graphprune.count_parameters(model)
    native = native_bench.rebuild_native(pruned)
    gap, close = native_bench.output_gap(pruned, native, x)
    assert close, gap
    assert all(p.is_contiguous() for p in native.parameters())
    assert _fresh_storage(pruned, native)
    rebuilt = [m for m in native.modules() if native_bench.constructor_args(m) is not None]
    assert rebuilt and not set(map(id, rebuilt)) & set(map(id, pruned.modules()))
    report = native_bench.layout_report(pruned, native)
    assert report["dense"] == report["same_strides"] == report["params"] and not report["odd"]


def test_layout_report_flags_a_strided_weight():
    model = SmallCNN().eval()
    weight = model.head.weight.detach()
    model.head.weight = nn.Parameter(weight.t().contiguous().t())  # same values, column-major
    native = native_bench.rebuild_native(model)
    assert native.head.weight.is_contiguous() and torch.equal(native.head.weight, weight)
    report = native_bench.layout_report(model, native)
    assert report["dense"] == report["params"] - 1 and [o.split()[0] for o in report["odd"]] == ["head.weight"]
    assert native_bench.output_gap(model, native, torch.randn(2, 3, 16, 16))[1]


def test_rebuild_keeps_shared_modules_shared():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    native = native_bench.rebuild_native(model)
    assert native[0] is native[2] and native[0] is not shared
