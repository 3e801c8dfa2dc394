"""What the command line's MODEL arguments name, and how the CLI saves and reloads models.

A MODEL argument is one of

* ``NAME``: a torchvision model (``torchvision.models.list_models()``, built with
  ``weights=None``); a name that torchvision lacks but :mod:`graphprune.models` has (e.g.
  ``resnet20``) is the CIFAR model. Names in both (``resnet18``, ``vgg16_bn``,
  ``mobilenet_v2``, ...) mean **torchvision**; write ``cifar:NAME`` for the CIFAR one;
* ``torchvision:NAME``, ``cifar:NAME`` (:func:`graphprune.models.get_model`, 10 classes,
  32x32 input) or ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``; needs timm);
* ``hf:DIR`` (a Hugging Face checkpoint saved in DIR, with its weights; needs transformers)
  or ``yolo:CFG.yaml`` (an ultralytics YOLO model from its config; needs ultralytics), see
  :mod:`graphprune.cli.sources`;
* ``FILE``: a model written by ``graphprune prune/finetune --output``. The weights are a
  :func:`graphprune.save` safetensors file; beside it, ``FILE.json`` (the *sidecar*) names
  the model it was built from (e.g. ``cifar:resnet20``) and the input shape it was used with,
  so the CLI can build that model afresh and :func:`graphprune.load` the file into it;
* ``SOURCE=FILE``: a :func:`graphprune.save` file without a sidecar (saved from Python), e.g.
  ``cifar:resnet20=pruned.safetensors``.

Every model is built after ``torch.manual_seed(0)``, so the same name always gives the same
random weights (``report resnet18 pruned.safetensors`` compares the pruned model with the
very model that ``prune resnet18`` started from).
"""
from __future__ import annotations

import difflib
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from . import sources

SOURCES = ("torchvision", "cifar", "timm", *sources.OPTIONAL)
SIDECAR_FORMAT = "graphprune.cli-model"
SIDECAR_VERSION = 1
_PATH_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".st")

MODEL_HELP = (
    "a torchvision model name (weights=None), cifar:NAME for graphprune.models (names torchvision also has, "
    "such as resnet18, mean torchvision unless prefixed), torchvision:NAME, timm:NAME, hf:DIR (a Hugging Face "
    "checkpoint), yolo:CFG.yaml (an ultralytics config), or a FILE written by "
    "--output (FILE.json beside it names its model; SOURCE=FILE when there is none)"
)


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


@dataclass
class ModelSpec:
    """A resolved MODEL argument: ``source:name``, plus the saved weights to load into it."""

    text: str
    source: str
    name: str
    path: Optional[str] = None
    input_shape: Optional[tuple] = None  # recorded in the sidecar
    options: dict = field(default_factory=dict)  # the builder's keyword arguments (--model-arg), recorded too

    @property
    def canonical(self) -> str:
        return f"{self.source}:{self.name}"


def _torchvision_names() -> list:
    import torchvision

    return torchvision.models.list_models()


def _cifar_names() -> list:
    from graphprune import models

    return models.list_models()


def _unknown(text: str, candidates: list, where: str) -> UsageError:
    close = difflib.get_close_matches(text, candidates, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UsageError(f"unknown model {text!r}; {hint}({where})")


def _named(text: str, source: Optional[str], name: str) -> ModelSpec:
    """A model named (not loaded from a file); ``source`` None: torchvision first, then cifar."""
    if source in sources.OPTIONAL:
        try:
            sources.check(source, name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return ModelSpec(text, source, name)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise UsageError(f"{text!r} needs timm, which is not installed (pip install timm)") from None
        names = timm.list_models()
        if name not in names:
            raise _unknown(name, names, f"timm.list_models() gives the {len(names)} names")
        return ModelSpec(text, "timm", name)
    if source == "cifar":
        names = _cifar_names()
        if name.lower() not in names:
            raise _unknown(name, names, f"cifar: takes one of {', '.join(names)}")
        return ModelSpec(text, "cifar", name.lower())
    tv = _torchvision_names()
    if name in tv:
        return ModelSpec(text, "torchvision", name)
    if source == "torchvision":
        raise _unknown(name, tv, f"torchvision.models.list_models() gives the {len(tv)} names")
    cifar = _cifar_names()
    if name.lower() in cifar:
        return ModelSpec(text, "cifar", name.lower())
    raise _unknown(name, tv + [f"cifar:{n}" for n in cifar],
                   f"torchvision.models.list_models() gives the {len(tv)} names; cifar:NAME for {', '.join(cifar)}")


def _split_source(text: str) -> tuple[Optional[str], str]:
    head, sep, tail = text.partition(":")
    if sep and head.lower() in SOURCES:
        return head.lower(), tail
    return None, text


def _looks_like_path(text: str) -> bool:
    seps = [s for s in (os.sep, os.altsep) if s]
    return any(s in text for s in seps) or text.lower().endswith(_PATH_SUFFIXES)


def sidecar_path(path: str) -> str:
    return path + ".json"


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{path!r} is a directory, not a saved model")
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path!r}")


def _read_sidecar(path: str) -> tuple[str, Optional[tuple], dict]:
    side = sidecar_path(path)
    if not os.path.isfile(side) and _plain_weights(path):
        raise UsageError(f"{path!r} looks like trained weights, not a model graphprune saved: give the architecture "
                         f"as MODEL and the file as --weights, e.g. graphprune prune resnet50 --weights {path}")
    if not os.path.isfile(side):
        raise UsageError(
            f"{path!r} has no {os.path.basename(side)!r} beside it naming the model it was saved from "
            f"(--output writes one); give it as SOURCE=FILE, e.g. cifar:resnet20={path}"
        )
    try:
        with open(side, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {side!r}: {exc}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or not isinstance(model, str):
        raise UsageError(f"{side!r} is not a graphprune model sidecar (format {SIDECAR_FORMAT!r} with a 'model' name)")
    shape = data.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise UsageError(f"{side!r}: malformed input_shape {shape!r}")
    options = data.get("model_args", {})
    if not isinstance(options, dict):
        raise UsageError(f"{side!r}: malformed model_args {options!r}")
    return model, tuple(shape) if shape is not None else None, options


def parse_model(text: str) -> ModelSpec:
    """Resolve a MODEL argument (see the module docstring); raises :class:`UsageError`."""
    if not text:
        raise UsageError("MODEL is empty")
    source, name = _split_source(text)
    if source is not None and "=" not in name:
        return _named(text, source, name)
    if "=" in text and not os.path.exists(text):
        base, _, path = text.partition("=")
        if not base or not path:
            raise UsageError(f"{text!r}: write SOURCE=FILE, e.g. cifar:resnet20=pruned.safetensors")
        spec = _named(text, *_split_source(base))
        _check_file(path)
        spec.path = path
        return spec
    if not _looks_like_path(text) and not os.path.isfile(text):
        return _named(text, None, text)
    if not _looks_like_path(text) and (text in _torchvision_names() or text.lower() in _cifar_names()):
        return _named(text, None, text)  # a model name wins over a file of that name; ./NAME for the file
    _check_file(text)
    base, shape, options = _read_sidecar(text)
    base_source, base_name = _split_source(base)
    if base_source is None or (base_source != sources.HF and _looks_like_path(base_name)) or "=" in base_name:
        raise UsageError(f"{sidecar_path(text)!r}: 'model' must be SOURCE:NAME such as cifar:resnet20, got {base!r}")
    spec = _named(text, base_source, base_name)
    spec.path, spec.input_shape, spec.options = text, shape, options
    return spec


def build_model(spec: ModelSpec, status=None):
    """A fresh model (eval mode, built after ``torch.manual_seed(0)``), with ``spec.path`` loaded."""
    import torch

    if status is not None:
        status(f"building {spec.canonical}...")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # builder notices (init schemes, deprecations) are noise here
        if spec.source in sources.OPTIONAL:
            if spec.options:
                raise UsageError(f"--model-arg: {spec.source}: models are built from their own config, not with arguments")
            try:
                model = sources.build(spec.source, spec.name)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        elif spec.source == "timm":
            import timm

            model = timm.create_model(spec.name, pretrained=False, **spec.options)
        elif spec.source == "cifar":
            from graphprune import models

            model = models.get_model(spec.name, **spec.options)
        else:
            import torchvision

            model = torchvision.models.get_model(spec.name, weights=None, **spec.options)
    if spec.path is not None:
        from graphprune.io.persist import load

        if status is not None:
            status(f"loading {spec.path} into {spec.canonical}...")
        if _plain_weights(spec.path):
            raise UsageError(f"{spec.path!r} holds trained weights, not a model graphprune saved: give them as "
                             f"--weights, e.g. graphprune prune {spec.canonical} --weights {spec.path}")
        try:
            load(model, spec.path)
        except (ValueError, OSError) as exc:
            text = " ".join(str(exc).split())
            raise UsageError(f"cannot load {spec.path!r} into {spec.canonical}: {text}") from None
    return model.eval()


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _plain_weights(path: str) -> bool:
    """Whether ``path`` holds trained weights rather than a :func:`graphprune.save` file: a
    ``torch.save`` suffix, or safetensors without graphprune's spec."""
    from graphprune.io.weights import is_graphprune_file

    try:
        return not is_graphprune_file(path)
    except ValueError:  # not safetensors: torch.save's suffixes say weights
        return path.lower().endswith(_WEIGHT_SUFFIXES)


def load_trained_weights(model, spec: ModelSpec, path: str, status=None) -> None:
    """``--weights``: :func:`graphprune.io.weights.load_weights` of ``path`` into the fresh ``model``."""
    from graphprune.io.weights import load_weights

    if spec.path is not None:
        raise UsageError(f"{spec.text} is a saved model with its own weights; --weights loads trained weights into "
                         "a freshly built MODEL, such as resnet50 or timm:convnext_atto")
    if status is not None:
        status(f"loading the weights in {path} into {spec.canonical}...")
    try:
        load_weights(model, path)
    except (ValueError, OSError) as exc:
        hint = " Give the builder's options with --model-arg, e.g. --model-arg num_classes=10." \
            if "differ in shape" in str(exc) and spec.source not in sources.OPTIONAL else ""
        raise UsageError(f"--weights: {' '.join(str(exc).split())}{hint}") from None


def default_input_shape(spec: ModelSpec) -> Optional[tuple]:
    """The recorded shape of a saved model, 1x3x32x32 for CIFAR models, else None (infer)."""
    if spec.input_shape is not None:
        return spec.input_shape
    if spec.source == "cifar":
        return (1, 3, 32, 32)
    return None


def example_inputs(model, spec: ModelSpec, shape: Optional[tuple]) -> tuple[Any, str]:
    """``(inputs, description)``: a seeded random tensor of ``shape`` (default:
    :func:`default_input_shape`, else inferred by :func:`graphprune.analysis.inputs.infer_example_inputs`)."""
    import torch

    from graphprune.analysis.inputs import infer_example_inputs

    if spec.source in sources.OPTIONAL:
        return sources.example_inputs(spec.source, model, shape or spec.input_shape)
    shape = shape or default_input_shape(spec)
    if shape is None:
        try:
            return infer_example_inputs(model)
        except ValueError as exc:
            raise UsageError(f"{exc.args[0] if exc.args else exc}; give --input-shape") from None
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator), f"a random tensor of shape {tuple(shape)}"


def save_model(model, path: str, spec: ModelSpec, inputs: Any, command: str) -> list:
    """:func:`graphprune.save` to ``path`` plus the sidecar ``path.json``; returns both paths."""
    from graphprune.io.persist import save

    save(model, path)
    shape = list(inputs.shape) if hasattr(inputs, "shape") and getattr(inputs, "is_floating_point", lambda: False)() else None
    sidecar = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "model": spec.canonical, "input_shape": shape,
        "weights": os.path.basename(path), "written_by": f"graphprune {command}",
    }
    if spec.options:
        sidecar["model_args"] = spec.options
    side = sidecar_path(path)
    tmp = side + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(sidecar, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, side)
    return [path, side]


def python_builder(spec: ModelSpec) -> str:
    """The Python expression that builds ``spec``'s fresh model (for messages)."""
    if spec.source in sources.OPTIONAL:
        return sources.builder(spec.source, spec.name)
    extra = "".join(f", {k}={v!r}" for k, v in spec.options.items())
    if spec.source == "timm":
        return f"timm.create_model({spec.name!r}, pretrained=False{extra})"
    if spec.source == "cifar":
        return f"graphprune.models.get_model({spec.name!r}{extra})"
    return f"torchvision.models.get_model({spec.name!r}, weights=None{extra})"


def check_output_path(path: Optional[str], option: str = "--output") -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path!r}: directory {parent!r} is not writable")


# ---------------------------------------------------------------- digits data


class FirstBatches:
    """The first ``n`` batches of a loader, with a ``len()`` (for quick runs: ``--limit-batches``)."""

    def __init__(self, loader, n: Optional[int]):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return len(self.loader) if self.n is None else min(self.n, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


def digits_for(inputs: Any, batch_size: int, limit: Optional[int]) -> tuple:
    """``(train, test)`` digits loaders shaped like ``inputs`` (an (N, C, S, S) image batch)."""
    from graphprune.data import digits_loaders

    shape = tuple(getattr(inputs, "shape", ()))
    if len(shape) != 4 or shape[2] != shape[3] or shape[2] < 8 or not inputs.is_floating_point():
        raise UsageError(
            f"the digits data set needs square image inputs of at least 8x8 pixels (N,C,S,S), but the model's input is "
            f"{shape or type(inputs).__name__}; give --input-shape such as 1,3,32,32"
        )
    train, test = digits_loaders(batch_size=batch_size, image_size=shape[2], channels=shape[1])
    return FirstBatches(train, limit), FirstBatches(test, limit)
