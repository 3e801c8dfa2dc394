"""The command line's model sources that live in optional libraries: a Hugging Face checkpoint
in a local directory (``hf:DIR``, with transformers) and an ultralytics YOLO config
(``yolo:CFG.yaml``, with ultralytics). Each source can check a name, build its model, say
how to build it in Python, and make example inputs. Problems raise ValueError with a
one-line message (the command line shows it as a usage error)."""
from __future__ import annotations

import os
from typing import Any, Optional

HF, YOLO = "hf", "yolo"
OPTIONAL = (HF, YOLO)
_YOLO_SUFFIXES = (".yaml", ".yml")


def _library(source: str):
    package = "transformers" if source == HF else "ultralytics"
    try:
        return __import__(package)
    except ImportError:
        raise ValueError(f"{source}: models need {package}, which is not installed (pip install {package})") from None


def check(source: str, name: str) -> None:
    """Raise ValueError unless ``name`` can name a model of ``source``."""
    _library(source)
    if source == HF and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"hf:{name}: not a directory with a Hugging Face config.json (save_pretrained writes one)")
    if source == YOLO and not name.lower().endswith(_YOLO_SUFFIXES):
        raise ValueError(f"yolo:{name}: give a model config such as yolov8n.yaml (random weights; a .pt would be "
                         "downloaded, which graphprune never does)")


def build(source: str, name: str):
    """The model ``source:name``: a checkpoint with its weights, or a YOLO config's model (random weights)."""
    library = _library(source)
    if source == HF:
        from graphprune.io.pretrained import from_pretrained

        return from_pretrained(name)  # a plain checkpoint, or one graphprune.save_pretrained wrote
    try:
        return library.YOLO(name, verbose=False).model
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(f"yolo:{name}: {exc}") from None


def builder(source: str, name: str) -> str:
    """The Python expression that builds ``source:name`` (for messages)."""
    if source == HF:
        return f"graphprune.from_pretrained({name!r})"
    return f"ultralytics.YOLO({name!r}).model"


def example_inputs(source: str, model, shape: Optional[tuple]) -> tuple[Any, str]:
    """``(inputs, description)``: seeded random token ids ``shape`` (default 1x16) for a text
    model, images for a vision model (default: its config's size; 1x3x640x640 for YOLO)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if source == HF and getattr(model, "main_input_name", "") == "input_ids":
        shape = tuple(shape or (1, 16))
        ids = torch.randint(0, config.vocab_size, shape, generator=generator)
        return {"input_ids": ids}, f"random token ids of shape {shape}"
    if shape is None and source == HF:
        size = config.image_size
        shape = (1, config.num_channels, *((size, size) if isinstance(size, int) else size))
    shape = tuple(shape or (1, 3, 640, 640))
    return torch.randn(shape, generator=generator), f"a random tensor of shape {shape}"
