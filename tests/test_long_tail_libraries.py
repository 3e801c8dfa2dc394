"""A fast subset of the library sweep (``benchmarks/libraries.py``): one tiny model each of diffusers,
torch_geometric and open_clip, built from code (random weights, nothing downloaded). Each is
analysed (the model must not change, its config's contents included), pruned at 0.3 (output
shape kept), saved and loaded (equal outputs), and checked with the dead-channel oracle on a
few groups. A library that is not installed skips its test with a message."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_model_unchanged, assert_same_state, model_state, state_snapshot
from oracle import dead_channel_oracle, flat_outputs

import graphprune
from graphprune.tracer import call_model


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4))


def _diffusers_unet():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    model = diffusers.UNet2DModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    return model.eval(), (_randn(1, 3, 8, 8), torch.tensor([10]))


def _pyg_sage():
    pyg = pytest.importorskip("torch_geometric.nn",
                              reason="torch_geometric is not installed (pip install torch_geometric)")

    class SAGE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = pyg.SAGEConv(8, 32), pyg.SAGEConv(32, 32), torch.nn.Linear(32, 3)

        def forward(self, x, edge_index):
            x = F.relu(self.conv2(F.relu(self.conv1(x, edge_index)), edge_index))
            return self.fc(x)

    edges = torch.randint(0, 20, (2, 60), generator=torch.Generator().manual_seed(6))
    return SAGE().eval(), (_randn(20, 8), edges)


def _open_clip():
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (pip install open_clip_torch)")
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                                                     "image_size": 16},
                           text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1})
    text = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(5))
    return model.eval(), (_randn(2, 3, 16, 16), text)


def _outputs(model, inputs) -> list:
    with torch.no_grad():
        return flat_outputs(call_model(model, inputs))


@pytest.mark.parametrize("build", [_diffusers_unet, _pyg_sage, _open_clip], ids=["diffusers", "pyg", "open_clip"])
def test_library_model_analyses_purely_prunes_and_round_trips(build, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = build()
        before, weights = model_state(model), state_snapshot(model)
        graphprune.analyze(model, inputs)
        assert_model_unchanged(model, before)
        assert_same_state(model, weights)

        shapes, params = [t.shape for t in _outputs(model, inputs)], graphprune.count_parameters(model)
        graphprune.prune(model, 0.3, inputs)
        assert [t.shape for t in _outputs(model, inputs)] == shapes
        assert graphprune.count_parameters(model) < params

        graphprune.save(model, tmp_path / "pruned.safetensors")
        fresh = graphprune.load(build()[0], tmp_path / "pruned.safetensors")
        assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, inputs), _outputs(model, inputs)))

        torch.manual_seed(0)
        assert dead_channel_oracle(build()[0], inputs, max_groups=4)["groups_tested"] >= 1
