"""Long-tail sweep over models of libraries: diffusers, open_clip, torch_geometric, peft, segment-anything,
torchtune, ultralytics RT-DETR and Hugging Face transformers families that hf_zoo.py does not cover.

Tiny configs built in code (random weights, nothing downloaded), each held to the checks of
long_tail.py at 0.3 and 0.5; a library that is not installed is skipped with a message, and the
versions found are printed with the table. Usage:

    python benchmarks/libraries.py                         # the table on stdout
    python benchmarks/libraries.py --peer --out            # with Torch-Pruning; results/long_tail_libraries.md
    python benchmarks/libraries.py --only dit,gcn --ratios 0.3
"""
from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hf_families import HF_FAMILIES, hf_case  # noqa: E402
from long_tail import Case, parse_args, sweep, versions  # noqa: E402

LIBRARIES = ["diffusers", "open_clip_torch", "torch_geometric", "peft", "segment_anything", "torchtune", "torchao",
             "ultralytics", "transformers", "speechbrain", "torch-pruning"]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4))


# ---------------------------------------------------------------------------- diffusers


def unet2d():
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), attention_head_dim=8,
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return model.eval(), (_randn(2, 3, 16, 16), torch.tensor([10, 500]))


def unet2d_condition():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                 cross_attention_dim=32, attention_head_dim=8, in_channels=4, out_channels=4,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return model.eval(), (_randn(2, 4, 16, 16), torch.tensor([10, 500]), _randn(2, 7, 32))


def autoencoder_kl():
    from diffusers import AutoencoderKL

    model = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                          layers_per_block=1, sample_size=32)
    return model.eval(), _randn(2, 3, 32, 32)


def dit():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model.eval(), (_randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 4]))


def sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    return model.eval(), {"hidden_states": _randn(2, 4, 8, 8), "encoder_hidden_states": _randn(2, 6, 32),
                          "pooled_projections": _randn(2, 16), "timestep": torch.tensor([3, 7])}


def flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    return model.eval(), {"hidden_states": _randn(2, 16, 16), "encoder_hidden_states": _randn(2, 6, 32),
                          "pooled_projections": _randn(2, 16), "timestep": torch.tensor([0.3, 0.7]),
                          "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)}


# ---------------------------------------------------------------------------- open_clip


def _text() -> torch.Tensor:
    return torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(5))


def open_clip_vit():
    import open_clip

    model = open_clip.CLIP(embed_dim=32, vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                                                     "image_size": 32},
                           text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2})
    return model.eval(), (_randn(2, 3, 32, 32), _text())


def open_clip_resnet():
    import open_clip

    model = open_clip.CLIP(embed_dim=32, vision_cfg={"layers": (1, 1, 1, 1), "width": 16, "head_width": 16,
                                                     "image_size": 64},
                           text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1})
    return model.eval(), (_randn(2, 3, 64, 64), _text())


# ---------------------------------------------------------------------------- torch_geometric


def _graph(nodes: int = 20, edges: int = 60) -> tuple:
    g = torch.Generator().manual_seed(6)
    return _randn(nodes, 8), torch.randint(0, nodes, (2, edges), generator=g)


class GCN(nn.Module):
    def __init__(self):
        from torch_geometric.nn import GCNConv

        super().__init__()
        self.conv1, self.conv2, self.conv3 = GCNConv(8, 32), GCNConv(32, 32), GCNConv(32, 4)

    def forward(self, x, edge_index):
        x = F.relu(self.conv1(x, edge_index))
        return self.conv3(F.relu(self.conv2(x, edge_index)) + x, edge_index)


class GAT(nn.Module):
    def __init__(self):
        from torch_geometric.nn import GATConv

        super().__init__()
        self.conv1, self.conv2 = GATConv(8, 16, heads=4), GATConv(64, 4, heads=1)

    def forward(self, x, edge_index):
        return self.conv2(F.elu(self.conv1(x, edge_index)), edge_index)


class SAGEPool(nn.Module):
    """GraphSAGE layers, a global mean pool over a batch of graphs and an MLP."""

    def __init__(self):
        from torch_geometric.nn import SAGEConv

        super().__init__()
        self.conv1, self.conv2, self.fc = SAGEConv(8, 32), SAGEConv(32, 32), nn.Linear(32, 3)

    def forward(self, x, edge_index, batch):
        from torch_geometric.nn import global_mean_pool

        x = F.relu(self.conv2(F.relu(self.conv1(x, edge_index)), edge_index))
        return self.fc(global_mean_pool(x, batch, size=2))


def _pyg(cls):
    return lambda: (cls().eval(), _graph())


# ---------------------------------------------------------------------------- peft, SAM, torchtune, RT-DETR


def peft_lora(kind: str, targets: list):
    def build():
        import peft

        model, inputs = hf_case(kind).build()
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        model = peft.get_peft_model(model, config).eval()
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give it values
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(7))
        return model, inputs
    return build


class SamPrompted(nn.Module):
    """segment-anything's three parts called as its predictor does: image -> embedding, points ->
    prompts, both -> masks and IoU scores."""

    def __init__(self):
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

        super().__init__()
        self.image_encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                             out_chans=16, window_size=2, global_attn_indexes=(1,), use_rel_pos=True)
        self.prompt_encoder = PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                            mask_in_chans=8)
        self.mask_decoder = MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(
            depth=1, embedding_dim=16, mlp_dim=32, num_heads=2), iou_head_hidden_dim=16)

    def forward(self, image, point_coords, point_labels):
        embedding = self.image_encoder(image)
        sparse, dense = self.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=True)


def sam():
    return SamPrompted().eval(), (_randn(1, 3, 64, 64), torch.tensor([[[10.0, 20.0], [40.0, 33.0]]]),
                                  torch.tensor([[1, 0]]))


def torchtune_llama(tied: bool):
    def build():
        from torchtune.models.llama3_2 import llama3_2

        model = llama3_2(vocab_size=100, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
                         intermediate_dim=64, tie_word_embeddings=tied)
        return model.eval(), torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(8))
    return build


def rtdetr():
    from ultralytics.nn.tasks import RTDETRDetectionModel

    return RTDETRDetectionModel("rtdetr-l.yaml", nc=4, verbose=False).eval(), _randn(1, 3, 160, 160)


# ---------------------------------------------------------------------------- the sweep


def cases() -> tuple:
    """``(cases, skipped)``: the cases of every installed library, and a line per missing one."""
    groups = [
        ("diffusers", [Case("diffusers_unet2d", unet2d), Case("diffusers_unet2d_condition", unet2d_condition),
                       Case("diffusers_autoencoder_kl", autoencoder_kl), Case("diffusers_dit", dit),
                       Case("diffusers_sd3", sd3), Case("diffusers_flux", flux)]),
        ("open_clip", [Case("open_clip_vit", open_clip_vit), Case("open_clip_modified_resnet", open_clip_resnet)]),
        ("torch_geometric", [Case("pyg_gcn", _pyg(GCN)), Case("pyg_gat", _pyg(GAT)),
                             Case("pyg_sage_pool", lambda: (SAGEPool().eval(), (*_graph(), torch.arange(20) // 10)))]),
        ("peft", [Case("peft_lora_llama", peft_lora("llama", ["q_proj", "v_proj", "up_proj"])),
                  Case("peft_lora_bert", peft_lora("bert", ["query", "value"]))]),
        ("segment_anything", [Case("sam_tiny_prompted", sam)]),
        ("torchtune", [Case("torchtune_llama3_2", torchtune_llama(False)),
                       Case("torchtune_llama3_2_tied", torchtune_llama(True))]),
        ("ultralytics", [Case("ultralytics_rtdetr_l", rtdetr)]),
        ("transformers", [hf_case(kind) for kind in HF_FAMILIES]),
    ]
    found, skipped = [], []
    for module, group in groups:
        if importlib.util.find_spec(module) is None:
            skipped.append(f"{module} not installed: {', '.join(c.name for c in group)} not run")
        else:
            found += group
    skipped.append("speechbrain: not run; it needs torchaudio, which cannot be installed beside this torch")
    return found, skipped


def main(argv=None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv, "long_tail_libraries.md")
    found, skipped = cases()
    title = (f"# Long tail: models of libraries\n\n{versions(LIBRARIES)}\n\n"
             f"Ratios {', '.join(map(str, args.ratios))}, L1, one thread, {args.timeout:g} s per case; the checks of "
             "benchmarks/long_tail.py (analysis pure and raising only graphprune's errors, prune, output shape kept "
             "and finite, params <= 0.9, a train step, save/load equal).")
    return sweep(found, args, title, skipped)


if __name__ == "__main__":
    sys.exit(main())
