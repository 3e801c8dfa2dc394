"""The models memory.py measures: the largest model of each sweep, built by the sweep's own code.

A model is named ``sweep:name`` (``torchvision:vit_h_14``, ``timm:deepseek_vit_412m``,
``hf:falcon``, ``yolo:yolov3-tiny.yaml``, ``llama:1.1b``); :func:`build` returns it in eval
mode with its example inputs and the options ``analyze`` and ``prune`` get.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Callable

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))

# The largest model each sweep runs (parameter counts from a run of every candidate):
# torchvision: memory.py's own two 630M+ models; timm: timm_zoo.py's smallest-per-family
# choice peaks at deepseek_vit_412m (411.8M; results/timm.md); hf: hf_zoo.py's small configs
# peak at falcon (4.7M; hf_families.py's are all smaller); yolo: the largest config yolo.py has
# run (results/yolo_more.md; its defaults peak at yolov8n-seg, 3.4M); llama: TinyLlama-1.1B's shape.
SWEEPS = {
    "torchvision": ["vit_h_14", "regnet_y_128gf"],
    "timm": ["deepseek_vit_412m"],
    "hf": ["falcon"],
    "yolo": ["yolov3-tiny.yaml"],
    "llama": ["1.1b"],
}
LLAMA = {"1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
         "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)}
YOLO_ANALYSIS_SIDE = 64  # yolo.py analyses on a 64x64 image: the same graph as 640x640


@dataclasses.dataclass
class Built:
    """A model ready to measure: its inputs, and the options of its analyze and prune (prune
    alone, which analyses itself, gets both)."""

    model: nn.Module
    inputs: Any
    ratio: float = 0.5
    analyze_kwargs: dict = dataclasses.field(default_factory=dict)
    prune_kwargs: dict = dataclasses.field(default_factory=dict)

    def forward(self) -> Any:
        """One forward pass on the inputs (keyword arguments when they are a dict)."""
        return self.model(**self.inputs) if isinstance(self.inputs, dict) else self.model(self.inputs)


def _sweep_modules() -> None:
    """Let the sweep scripts (benchmarks/) be imported, last on sys.path so that they shadow nothing."""
    if _HERE not in sys.path:
        sys.path.append(_HERE)


def _image(side: int) -> torch.Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def _torchvision(name: str, size: int) -> Built:
    import torchvision

    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    return Built(torchvision.models.get_model(name, weights=None, **kwargs).eval(), _image(size))


def _timm(name: str, size: int) -> Built:
    import timm_zoo

    model = timm_zoo.make_model(name)
    return Built(model, timm_zoo.make_input(timm_zoo.input_shape(model)))


def _hf(kind: str, size: int) -> Built:
    import hf_zoo

    model, inputs = hf_zoo.build(kind)
    return Built(model, inputs)


def _yolo(config: str, size: int) -> Built:
    import yolo

    return Built(yolo._build(config).model, _image(YOLO_ANALYSIS_SIDE))


def _llama(name: str, size: int) -> Built:
    """A LLaMA of random bf16 weights (normal, std 0.02), built on meta and materialised on the
    CPU; pruned as scale.py prunes its checkpoints (0.25, whole heads, one width per layer)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(**LLAMA[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers are computed, not loaded
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    ids = torch.randint(3, config.vocab_size, (1, 16), generator=generator)
    return Built(model, ids, ratio=0.25, analyze_kwargs={"prune_heads": True}, prune_kwargs={"uniform": True})


BUILDERS: dict[str, Callable[[str, int], Built]] = {
    "torchvision": _torchvision, "timm": _timm, "hf": _hf, "yolo": _yolo, "llama": _llama}


def parse(spec: str) -> tuple[str, str]:
    """``sweep:name`` -> (sweep, name); a bare name is a torchvision model."""
    sweep, _, name = spec.rpartition(":")
    sweep = sweep or "torchvision"
    if sweep not in BUILDERS:
        raise ValueError(f"unknown sweep {sweep!r} in {spec!r} (one of {', '.join(BUILDERS)})")
    return sweep, name


def build(spec: str, size: int) -> Built:
    """Build ``spec`` (``sweep:name``) with ``torch.manual_seed(0)``, in eval mode."""
    sweep, name = parse(spec)
    _sweep_modules()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[sweep](name, size)


def default_specs(sweeps: list[str]) -> list[str]:
    """The largest model of each of ``sweeps``, as ``sweep:name``."""
    unknown = [s for s in sweeps if s not in SWEEPS]
    if unknown:
        raise ValueError(f"unknown sweeps: {', '.join(unknown)} (one of {', '.join(SWEEPS)})")
    return [f"{sweep}:{name}" for sweep in sweeps for name in SWEEPS[sweep]]
