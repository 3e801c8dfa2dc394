"""Save a pruned model and load it back into a freshly built, unpruned one, without pickle.

On-disk layout: **one safetensors file** (``.safetensors`` is the suggested suffix).

* The tensors are the model's ``state_dict()`` entries, stored under their state-dict names
  (CPU, contiguous). A name whose tensor is the very same tensor as an earlier name (tied
  weights) is stored once and listed in the spec's ``aliases``.
* The file's string metadata holds two keys:

  - ``"graphprune.spec"``: a JSON document, the *pruning spec*::

        {"format": "graphprune.pruned-model", "version": 1, "model": "<class name>",
         "tensors": {"<state-dict name>": {"shape": [..], "dtype": "float32"}, ...},
         "aliases": {"<state-dict name>": "<stored name>", ...},
         "modules": {"<module name>": {"type": "Conv2d",
                                       "attributes": {"in_channels": 3, "out_channels": 40, ...}}, ...}}

    ``modules`` lists every module that has one of :data:`ATTRIBUTES` (``in_channels``,
    ``out_channels``, ``groups``, ``num_features``, ``in_features``, ``out_features``,
    ``normalized_shape``, ``num_groups``, ``num_channels``, ``embedding_dim``,
    ``num_parameters``) with the value it has in the pruned model;
  - ``"graphprune.spec_sha256"``: the SHA-256 of that JSON text, so that a damaged or edited
    spec is detected.

:func:`load` reads and checks everything before it touches the model: the file must parse,
the spec's digest must match, the state-dict names and module types must be those of the
fresh model, every stored tensor must have the spec's shape, the fresh tensor's rank and no
dimension larger than the fresh one (pruning only removes), and every listed module's
attributes must agree with its new parameter shapes. Only then are parameters resized, the
weights copied and the attributes set; should anything still fail, all of it is undone. Any
problem with the file raises :class:`ValueError` and leaves the model as it was. Nothing is
unpickled: safetensors stores raw tensor bytes and the spec is plain JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Union

import torch
from torch import nn

from .validation import check_model

FORMAT = "graphprune.pruned-model"
VERSION = 1
SPEC_KEY = "graphprune.spec"
DIGEST_KEY = "graphprune.spec_sha256"

#: Module attributes that pruning may change; :func:`save` records them, :func:`load` sets them.
ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
    "normalized_shape", "num_groups", "num_channels", "embedding_dim", "num_parameters",
)

PathLike = Union[str, "os.PathLike[str]"]


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise ImportError("graphprune.save/load need the 'safetensors' package: pip install safetensors") from exc
    return safetensors.torch, safe_open


def _attribute_value(value: Any) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def pruning_spec(model: nn.Module) -> dict:
    """The spec :func:`save` writes for ``model`` (see the module docstring)."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        tensors[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
    modules = {}
    for name, module in model.named_modules():
        attributes = {}
        for attr in ATTRIBUTES:
            value = _attribute_value(getattr(module, attr, None))
            if value is not None:
                attributes[attr] = value
        if attributes:
            modules[name] = {"type": type(module).__name__, "attributes": attributes}
    return {"format": FORMAT, "version": VERSION, "model": type(model).__name__, "tensors": tensors, "aliases": aliases, "modules": modules}


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s weights and pruning spec to the safetensors file ``path``.

    The file is written to a temporary name beside ``path`` and renamed into place, so an
    interrupted save never leaves a half-written file under ``path``. Load it with
    :func:`load` into a freshly built model of the same architecture.
    """
    check_model(model)
    st, _ = _safetensors()
    spec = pruning_spec(model)
    state = model.state_dict(keep_vars=True)
    tensors, storages = {}, set()
    for name in spec["tensors"]:
        tensor = state[name].detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        if tensor.numel():
            storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    metadata = {SPEC_KEY: text, DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".graphprune-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- loading


def _read(path: str) -> tuple[dict, dict]:
    """(spec, tensors) from the file, fully read into memory; ValueError if unreadable."""
    _, safe_open = _safetensors()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, RuntimeError on a damaged file
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {type(exc).__name__}: {exc}") from exc
    text = metadata.get(SPEC_KEY)
    if text is None:
        raise ValueError(f"{path} has no graphprune pruning spec; was it written by graphprune.save?")
    digest = metadata.get(DIGEST_KEY)
    if digest != hashlib.sha256(text.encode()).hexdigest():
        raise ValueError(f"{path}: the pruning spec does not match its checksum; the file was modified or damaged")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the pruning spec is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path}: not a graphprune pruning spec (format {spec.get('format') if isinstance(spec, dict) else None!r})")
    if spec.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported pruning spec version {spec.get('version')!r}; this graphprune reads version {VERSION}")
    for key in ("tensors", "aliases", "modules"):
        if not isinstance(spec.get(key), dict):
            raise ValueError(f"{path}: the pruning spec's {key!r} entry is missing or malformed")
    return spec, tensors


def _shape(entry: Any, name: str) -> tuple:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"the spec's shape for {name!r} is malformed: {shape!r}")
    return tuple(shape)


def _check_attributes(module: nn.Module, name: str, attrs: dict, shapes: dict) -> None:
    """The new attributes must agree with the new parameter shapes of ``module``."""

    def new(attr):
        return attrs.get(attr, getattr(module, attr))

    def shape(param):
        return shapes.get(f"{name}.{param}" if name else param, tuple(getattr(module, param).shape))

    problems = []
    if isinstance(module, nn.modules.conv._ConvNd):
        w = shape("weight")
        out_c, in_c, groups = new("out_channels"), new("in_channels"), new("groups")
        if groups < 1 or in_c % groups or out_c % groups:
            problems.append(f"groups={groups} does not divide in_channels={in_c} and out_channels={out_c}")
        elif module.transposed and (w[0] != in_c or w[1] * groups != out_c):
            problems.append(f"weight {w} does not fit in_channels={in_c}, out_channels={out_c}, groups={groups}")
        elif not module.transposed and (w[0] != out_c or w[1] * groups != in_c):
            problems.append(f"weight {w} does not fit in_channels={in_c}, out_channels={out_c}, groups={groups}")
        if module.bias is not None and shape("bias") != (out_c,):
            problems.append(f"bias {shape('bias')} does not fit out_channels={out_c}")
    elif isinstance(module, nn.Linear):
        if shape("weight") != (new("out_features"), new("in_features")):
            problems.append(f"weight {shape('weight')} does not fit in_features={new('in_features')}, out_features={new('out_features')}")
    elif isinstance(module, (nn.modules.batchnorm._NormBase)):
        n = new("num_features")
        for param in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, param, None) is not None and shape(param) != (n,):
                problems.append(f"{param} {shape(param)} does not fit num_features={n}")
    elif isinstance(module, nn.GroupNorm):
        n, g = new("num_channels"), new("num_groups")
        if g < 1 or n % g:
            problems.append(f"num_groups={g} does not divide num_channels={n}")
        for param in ("weight", "bias"):
            if getattr(module, param, None) is not None and shape(param) != (n,):
                problems.append(f"{param} {shape(param)} does not fit num_channels={n}")
    elif isinstance(module, nn.LayerNorm):
        normalized = tuple(new("normalized_shape"))
        for param in ("weight", "bias"):
            if getattr(module, param, None) is not None and shape(param) != normalized:
                problems.append(f"{param} {shape(param)} does not fit normalized_shape={normalized}")
    elif isinstance(module, nn.Embedding):
        if shape("weight")[1:] != (new("embedding_dim"),):
            problems.append(f"weight {shape('weight')} does not fit embedding_dim={new('embedding_dim')}")
    elif isinstance(module, nn.PReLU):
        if shape("weight") != (new("num_parameters"),):
            problems.append(f"weight {shape('weight')} does not fit num_parameters={new('num_parameters')}")
    if problems:
        raise ValueError(f"module {name!r} ({type(module).__name__}): " + "; ".join(problems))


def _plan(model: nn.Module, spec: dict, stored: dict, path: str) -> tuple[dict, list]:
    """Check the file against ``model``; return ({state name: new tensor}, [(module, attr, value)])."""
    state = model.state_dict(keep_vars=True)
    wanted = set(spec["tensors"]) | set(spec["aliases"])
    if wanted != set(state):
        missing, unexpected = sorted(set(state) - wanted), sorted(wanted - set(state))
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: it was saved from {spec.get('model')!r}; "
            f"missing from the file: {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"not in the model: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    if set(stored) != set(spec["tensors"]):
        raise ValueError(f"{path}: the stored tensors do not match the pruning spec's list")
    for alias, target in spec["aliases"].items():
        if target not in spec["tensors"] or state[alias] is not state[target]:
            raise ValueError(f"{path}: {alias!r} is saved as an alias of {target!r}, but they are distinct tensors in the model")

    values, shapes = {}, {}
    for name, entry in spec["tensors"].items():
        shape, current, tensor = _shape(entry, name), state[name], stored[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but the spec says {shape}")
        if len(shape) != current.dim() or any(s > c for s, c in zip(shape, current.shape)):
            raise ValueError(
                f"{path} does not fit {type(model).__name__}: {name!r} is {shape} in the file but {tuple(current.shape)} "
                "in the model (a pruned model is never larger than the unpruned one)"
            )
        if tensor.is_floating_point() != current.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype} in the file but {current.dtype} in the model")
        values[name] = tensor
        shapes[name] = shape
    for alias, target in spec["aliases"].items():
        shapes[alias] = shapes[target]

    modules = dict(model.named_modules())
    changes = []
    for name, entry in spec["modules"].items():
        module = modules.get(name)
        if module is None or not isinstance(entry, dict) or not isinstance(entry.get("attributes"), dict):
            raise ValueError(f"{path} does not fit {type(model).__name__}: no module {name!r}" if module is None else f"{path}: malformed spec entry for module {name!r}")
        if entry.get("type") != type(module).__name__:
            raise ValueError(f"{path} does not fit {type(model).__name__}: module {name!r} is {type(module).__name__} but the file has {entry.get('type')!r}")
        attrs = {}
        for attr, value in entry["attributes"].items():
            if attr not in ATTRIBUTES or not hasattr(module, attr):
                raise ValueError(f"{path}: unexpected attribute {attr!r} for module {name!r}")
            current = getattr(module, attr)
            if _attribute_value(current) is None or type(_attribute_value(value)) is not type(_attribute_value(current)) or value != _attribute_value(value):
                raise ValueError(f"{path}: attribute {name}.{attr} = {value!r} does not fit its current value {current!r}")
            if isinstance(value, list):
                if len(value) != len(current):
                    raise ValueError(f"{path}: attribute {name}.{attr} = {value!r} does not fit its current value {current!r}")
                value = type(current)(value)
            attrs[attr] = value
        _check_attributes(module, name, attrs, shapes)
        changes += [(module, attr, value) for attr, value in attrs.items() if value != getattr(module, attr)]
    return values, changes


def load(model: nn.Module, path: PathLike) -> nn.Module:
    """Make the freshly built, unpruned ``model`` the pruned model saved at ``path``; return it.

    Parameters and buffers are resized to the spec's shapes (keeping their Parameter objects,
    devices and dtypes), the saved values are copied in and the listed module attributes are
    set. Raises :class:`ValueError` for a damaged file or one saved from another architecture;
    the model is then left untouched. See the module docstring for the checks and the layout.
    """
    check_model(model)
    path = os.fspath(path)
    spec, stored = _read(path)
    values, changes = _plan(model, spec, stored, path)

    state = model.state_dict(keep_vars=True)
    undo_tensors, undo_attrs = [], []
    try:
        with torch.no_grad():
            for name, value in values.items():
                tensor = state[name]
                undo_tensors.append((tensor, tensor.data, tensor.grad))
                tensor.data = value.to(device=tensor.device, dtype=tensor.dtype).clone()
                if tensor.grad is not None and tensor.grad.shape != tensor.shape:
                    tensor.grad = None
        for module, attr, value in changes:
            undo_attrs.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
    except Exception as exc:
        for tensor, data, grad in reversed(undo_tensors):
            tensor.data = data
            tensor.grad = grad
        for module, attr, value in reversed(undo_attrs):
            setattr(module, attr, value)
        raise ValueError(f"loading {path} failed and the model was restored: {type(exc).__name__}: {exc}") from exc
    return model


__all__ = ["save", "load", "pruning_spec", "ATTRIBUTES", "FORMAT", "VERSION"]
