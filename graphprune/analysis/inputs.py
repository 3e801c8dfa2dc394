"""Build a plausible example input from what a model declares about itself."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphprune.tracer.devices import model_device
from graphprune.validation import warn_caller


class InferredInputWarning(UserWarning):
    """``example_inputs`` was not given and graphprune built one itself."""




def infer_example_inputs(model: nn.Module) -> tuple[Any, str]:
    """``(inputs, description)`` built from timm's ``pretrained_cfg``, torchvision's ``image_size``,
    or the first layer of the model. Raises ``ValueError`` when nothing fits."""
    generator = torch.Generator().manual_seed(0)
    device = model_device(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        shape = (1, *cfg["input_size"])
        source = "pretrained_cfg['input_size']"
    elif isinstance(getattr(model, "image_size", None), int):
        shape = (1, 3, model.image_size, model.image_size)
        source = "model.image_size"
    else:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding))), None)
        if isinstance(first, nn.Embedding):
            tokens = torch.randint(0, first.num_embeddings, (1, 16), generator=generator).to(device)
            return tokens, f"a LongTensor of shape (1, 16) (first layer {type(first).__name__})"
        if isinstance(first, nn.Conv1d):
            shape = (1, first.in_channels, 224)
        elif isinstance(first, nn.Conv2d):
            shape = (1, first.in_channels, 224, 224)
        elif isinstance(first, nn.Conv3d):
            shape = (1, first.in_channels, 16, 112, 112)
        elif isinstance(first, nn.Linear):
            shape = (1, first.in_features)
        else:
            raise ValueError(f"cannot infer example inputs for {type(model).__name__}; pass example_inputs")
        source = f"first layer {type(first).__name__}"
    return torch.randn(shape, generator=generator).to(device), f"a random tensor of shape {tuple(shape)} ({source})"


def resolve_example_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, bool]:
    """The given inputs, or inferred ones (with an :class:`InferredInputWarning`). Second item: inferred?"""
    if example_inputs is not None:
        return example_inputs, False
    inputs, description = infer_example_inputs(model)
    warn_caller(f"example_inputs not given; using {description}", InferredInputWarning)
    return inputs, True
