"""Every pruned model of the test zoo saves and loads: graphprune.save -> graphprune.load into
a freshly built model gives bit-identical outputs, tensors and integer attributes.

The zoo is test_models.py's torchvision models plus the attention models: ViT (both head
modes), Swin, MaxViT and nn.MultiheadAttention. Size attributes that only the model's own
code knows (torchvision ViT's ``hidden_dim``, which its forward reshapes with) must travel
too.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import graphprune
from test_attention import build
from test_models import MODELS

from conftest import size_attrs

ATTENTION = {
    "vit": (lambda: torchvision.models.vit_b_32(image_size=64), 64, {}),
    "vit_heads": (lambda: torchvision.models.vit_b_32(image_size=64), 64, {"prune_heads": True}),
    "swin_t": (lambda: torchvision.models.swin_t(), 64, {}),
    "maxvit_t": (lambda: torchvision.models.maxvit_t(), 224, {}),
    "mha": (lambda: build("mha"), None, {}),
    "mha_heads": (lambda: build("mha"), None, {"prune_heads": True}),
}


class _SplitBias(torch.nn.Module):
    """A qkv bias put together from two parameters and a non-persistent zero buffer (as in
    BEiT): pruning shrinks the buffer, which is no state_dict entry."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Linear(3, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = torch.nn.Parameter(torch.randn(dim)), torch.nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        x = self.embed(x)
        qkv = torch.nn.functional.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj(q * k.sigmoid() + v)


ATTENTION["split_bias"] = (_SplitBias, None, {})
CNNS = {name: (lambda name=name: getattr(torchvision.models, name)(weights=None, **MODELS[name]), 64, {}) for name in MODELS}


def _integer_attributes(model: torch.nn.Module) -> dict:
    return {(name, key): value for name, m in model.named_modules() for key, value in vars(m).items()
            if not key.startswith("_") and isinstance(value, (int, tuple)) and not isinstance(value, bool)}


@pytest.mark.parametrize("name", [*CNNS, *ATTENTION])
def test_pruned_model_saves_and_loads_bit_identical(name, tmp_path):
    build_model, size, options = {**CNNS, **ATTENTION}[name]
    torch.manual_seed(0)
    model = build_model().eval()
    x = torch.randn(2, 5, 3) if name == "split_bias" else torch.randn(2, 7, 12) if size is None \
        else torch.randn(1, 3, size, size)
    graphprune.prune(model, 0.5, x, **options)
    path = tmp_path / f"{name}.safetensors"
    graphprune.save(model, path)

    fresh = build_model().eval()
    assert graphprune.load(fresh, path) is fresh
    assert _integer_attributes(fresh) == _integer_attributes(model)
    assert size_attrs(fresh) == size_attrs(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    assert {k: b.shape for k, b in fresh.named_buffers()} == {k: b.shape for k, b in model.named_buffers()}
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
