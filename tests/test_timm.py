"""A fast subset of the timm sweep (``benchmarks/timm_zoo.py``): one small model per failure
class found on timm, each analysed (twice: analysis changes nothing and finds the same groups),
pruned at 0.5, saved and loaded, and checked with the dead-channel oracle. timm is a test
extra; without it these tests are skipped. Each class also has a self-written model without
timm (``test_functional``, ``test_sizes_from_shapes``, ``test_generality``, ``test_export_capture``,
``test_unseen``)."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_model_unchanged, count_params, model_state
from oracle import dead_channel_oracle, flat_outputs

import graphprune
from graphprune.tracer import call_model

timm = pytest.importorskip("timm")

# model -> (failure class it reproduced, input size)
CASES = {
    "test_efficientnet": ("functional forward inside module subclasses (BatchNormAct2d)", 64),
    "test_vit": ("head sizes in attention", 160),
    "levit_128s": ("integer index tensors and a cache in __dict__", 224),
    "convit_tiny": ("sizes from another tensor's shape; a failing group isolated by the audit", 224),
    "coat_tiny": ("a module called twice (cpe@1)", 224),
    "xcit_nano_12_p16_224": ("a repeat count from a shape; F.normalize", 224),
    "crossvit_tiny_240": ("control flow on the input's shape in the root: torch.export", 240),
    "fasternet_t0": ("split sizes held in module attributes", 224),
}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_timm_family(name, tmp_path):
    x = torch.randn(1, 3, CASES[name][1], CASES[name][1], generator=torch.Generator().manual_seed(0))
    model = _build(name)
    with torch.no_grad():  # first: a forward may build caches (ConViT's rel_indices), which changes the model
        expected = flat_outputs(call_model(model, x))
    before = model_state(model)
    report = graphprune.analyze(model, x)
    again = graphprune.analyze(model, x)
    assert_model_unchanged(model, before)
    assert [(g.root, g.size, g.prunable) for g in report.groups] == [(g.root, g.size, g.prunable) for g in again.groups]

    params = count_params(model)
    graphprune.prune(model, 0.5, report=report)
    assert count_params(model) < 0.8 * params
    with torch.no_grad():
        produced = flat_outputs(call_model(model, x))
    assert [t.shape for t in produced] == [t.shape for t in expected] and all(t.isfinite().all() for t in produced)

    graphprune.save(model, tmp_path / "m.safetensors")
    fresh = graphprune.load(_build(name), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(flat_outputs(call_model(fresh, x)), produced))

    summary = dead_channel_oracle(_build(name), x, max_groups=4)
    assert summary["groups_tested"] > 0
