"""Save a pruned model and load it back into a freshly built, unpruned one, without pickle.

On-disk layout: **one safetensors file** (``.safetensors`` is the suggested suffix).

* The tensors are the model's ``state_dict()`` entries, stored under their state-dict names
  (CPU, contiguous), and its non-persistent buffers under the same kind of name (pruning
  shrinks them too, and the model's code may read them: BEiT's ``k_bias``). They may be
  caches a forward built (ConViT's ``rel_indices``), larger than the fresh model's, and are
  loaded as saved all the same, so the loaded model is the saved one; one of another rank or
  dtype than the fresh model's, or one the file lacks, is left as built. A name whose tensor is the very same tensor as an earlier name (tied
  weights) is stored once and listed in the spec's ``aliases``.
* The file's string metadata holds three keys:

  - ``"graphprune.spec"``: a JSON document, the *pruning spec*::

        {"format": "graphprune.pruned-model", "version": 2, "model": "<class name>",
         "tensors": {"<state-dict name>": {"shape": [..], "dtype": "float32"}, ...},
         "aliases": {"<state-dict name>": "<stored name>", ...},
         "modules": {"<module name>": {"type": "Conv2d",
                                       "attributes": {"in_channels": 3, "out_channels": 40, ...}}, ...}}

    ``modules`` lists, for every module that has any, its integer attributes (ints and
    tuples of ints in its ``__dict__``, such as ``in_channels``, ``normalized_shape``,
    ``num_heads``, ``head_dim`` or a model's own ``hidden_dim``) with the values they have
    in the pruned model;
  - ``"graphprune.spec_sha256"``: the SHA-256 of that JSON text;
  - ``"graphprune.data_sha256"``: the SHA-256 of every stored tensor's name and bytes, in
    name order, so that damaged or edited weights are detected too.

:func:`load` reads and checks everything before it touches the model: the file must parse,
both digests must match, the state-dict names and module types must be those of the fresh
model, every stored tensor must have the spec's shape, the fresh tensor's rank and no
dimension larger than the fresh one (pruning only removes), every recorded attribute must
have the kind of value the fresh module holds, and every size attribute
(:mod:`graphprune.analysis.sizes`) must agree with its module's new tensor shapes. Only then are
parameters resized, the weights copied and the attributes set; should anything still fail,
KeyboardInterrupt included, all of it is undone. Any problem with the file raises
:class:`ValueError` and leaves the model as it was. Attributes that the fresh model does not
have (values a forward caches on its module) are not set. Nothing is unpickled:
safetensors stores raw tensor bytes and the spec is plain JSON. Files of version 1 (no data
digest; only the table's size attributes) still load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Union

import torch
from torch import nn

from graphprune.analysis.parametrized import shaped_like
from graphprune.analysis.sizes import after_resize, size_problems, size_rule, tensor_paths
from graphprune.tracer.state import ModelTransaction
from graphprune.validation import check_materialised, check_model

FORMAT = "graphprune.pruned-model"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SPEC_KEY = "graphprune.spec"
DIGEST_KEY = "graphprune.spec_sha256"
DATA_DIGEST_KEY = "graphprune.data_sha256"

PathLike = Union[str, "os.PathLike[str]"]


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise ImportError("graphprune.save/load need the 'safetensors' package: pip install safetensors") from exc
    return safetensors.torch, safe_open


def _attribute_value(value: Any) -> Any:
    """An int, or a tuple / list of ints as a list; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def _integer_attributes(module: nn.Module) -> dict:
    """The module's public int and int-tuple attributes (the values pruning may change)."""
    values = {}
    for key, value in vars(module).items():
        recorded = None if key.startswith("_") else _attribute_value(value)
        if recorded is not None:
            values[key] = recorded
    return values


def _non_persistent(model: nn.Module) -> dict:
    """``{name: buffer}`` of every buffer registered with ``persistent=False``."""
    return {f"{prefix}.{name}" if prefix else name: module._buffers[name]
            for prefix, module in model.named_modules(remove_duplicate=False)
            for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None}


def model_tensors(model: nn.Module) -> dict:
    """What :func:`save` stores: the ``state_dict`` (tensors kept as they are) and the
    non-persistent buffers."""
    return {**model.state_dict(keep_vars=True), **_non_persistent(model)}


def pruning_spec(model: nn.Module) -> dict:
    """The spec :func:`save` writes for ``model`` (see the module docstring)."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in model_tensors(model).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        tensors[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
    modules = {}
    for name, module in model.named_modules():
        attributes = _integer_attributes(module)
        if attributes:
            modules[name] = {"type": type(module).__name__, "attributes": attributes}
    return {"format": FORMAT, "version": VERSION, "model": type(model).__name__, "tensors": tensors, "aliases": aliases, "modules": modules}


def _data_digest(tensors: dict) -> str:
    """SHA-256 over every tensor's name and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        data = tensors[name].detach().cpu().contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _file_path(path: PathLike, verb: str) -> str:
    """``path`` as a string (a link resolved to its target); IsADirectoryError when it names a
    directory, ValueError when something other than a regular file is there."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fsdecode(path)
    if "\0" in path:
        raise ValueError(f"cannot {verb} {path!r}: the path holds a NUL character")
    path = os.path.realpath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot {verb} {path}: it is a directory; give the path of a file such as "
                                f"{os.path.join(path, 'model.safetensors')}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"cannot {verb} {path}: it is not a regular file (a device, a pipe or a socket)")
    return path


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s weights and pruning spec to the safetensors file ``path``.

    Missing parent directories are created; the file is written beside ``path`` and renamed
    into place, so an interrupted save never leaves a half-written file. :func:`load` puts it
    into a freshly built model of the same architecture.

    Parameters
    ----------
    model : nn.Module
        The (pruned) model to save.
    path : str or os.PathLike
        The file to write (``.safetensors`` is the suggested suffix); replaced if it exists.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, or ``path`` not a path.
    ValueError, IsADirectoryError
        ``path`` is not a regular file (IsADirectoryError: a directory), or a tensor is not dense.
    OSError
        The file cannot be written.
    """
    check_model(model)
    st, _ = _safetensors()
    path = _file_path(path, "save to")
    spec = pruning_spec(model)
    state = model_tensors(model)
    tensors, storages = {}, set()
    for name in spec["tensors"]:
        if state[name].layout != torch.strided:
            raise ValueError(f"cannot save {name!r}: it is a {state[name].layout} tensor; safetensors stores dense "
                             "tensors only (make it dense with .to_dense() first)")
        tensor = state[name].detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        if tensor.numel():
            storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    metadata = {SPEC_KEY: text, DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest(), DATA_DIGEST_KEY: _data_digest(tensors)}
    _write_atomically(lambda tmp: st.save_file(tensors, tmp, metadata=metadata), path)


def _write_atomically(write, path: str) -> None:
    """``write(temporary path)`` beside ``path``, then rename it to ``path``; an OSError
    names ``path`` (not the temporary file)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".graphprune-", suffix=".tmp", dir=directory)
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
        os.replace(tmp, path)
    except OSError as exc:
        message = f"cannot write {path}: {exc.strerror or exc}"
        raise (type(exc)(exc.errno, message) if exc.errno is not None else OSError(message)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- loading


def _read(path: str) -> tuple[dict, dict]:
    """(spec, tensors) from the file, fully read into memory and checked against its digests;
    ValueError if unreadable or damaged."""
    _, safe_open = _safetensors()
    if not os.path.exists(path):
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
    if metadata.get(DIGEST_KEY) != hashlib.sha256(text.encode()).hexdigest():
        raise ValueError(f"{path} is damaged: the pruning spec does not match its checksum (the file was modified or corrupted)")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the pruning spec is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path}: not a graphprune pruning spec (format {spec.get('format') if isinstance(spec, dict) else None!r})")
    if spec.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported pruning spec version {spec.get('version')!r}; this graphprune reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if spec["version"] >= 2 and metadata.get(DATA_DIGEST_KEY) != _data_digest(tensors):
        raise ValueError(f"{path} is damaged: the stored weights do not match their checksum (the file was modified or corrupted)")
    for key in ("tensors", "aliases", "modules"):
        if not isinstance(spec.get(key), dict):
            raise ValueError(f"{path}: the pruning spec's {key!r} entry is missing or malformed")
    return spec, tensors


def _shape(entry: Any, name: str) -> tuple:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"the spec's shape for {name!r} is malformed: {shape!r}")
    return tuple(shape)


def _module_shapes(module: nn.Module, name: str, shapes: dict) -> dict:
    """The new shapes of the tensors ``module``'s size attributes follow, by path within it."""
    rule = size_rule(module)
    paths = {path for follows in rule.sizes.values() for path in tensor_paths(follows)} if rule is not None else ()
    # a parametrized weight has the shape of the tensor it is computed from
    full = {path: shaped_like(module, path) or path for path in paths}
    full = {path: f"{name}.{source}" if name else source for path, source in full.items()}
    return {path: shapes[key] for path, key in full.items() if key in shapes}


def _new_attributes(module: nn.Module, name: str, entry: Any, path: str) -> dict:
    """The attributes a spec entry sets on ``module``, checked to be of the kinds it holds."""
    if not isinstance(entry, dict) or not isinstance(entry.get("attributes"), dict):
        raise ValueError(f"{path}: malformed spec entry for module {name!r}")
    if entry.get("type") != type(module).__name__:
        raise ValueError(f"{path} does not fit: module {name!r} is {type(module).__name__} but the file has {entry.get('type')!r}")
    attrs = {}
    for attr, value in entry["attributes"].items():
        if attr not in vars(module):
            continue  # a value some forward caches on its module: not part of the built model
        current = _attribute_value(vars(module)[attr])
        if (current is None or type(_attribute_value(value)) is not type(current) or value != _attribute_value(value)
                or (isinstance(value, list) and len(value) != len(current))):
            raise ValueError(f"{path}: attribute {name}.{attr} = {value!r} does not fit its current value {vars(module)[attr]!r}")
        attrs[attr] = type(vars(module)[attr])(value) if isinstance(value, list) else value
    return attrs


def _plan(model: nn.Module, spec: dict, stored: dict, path: str) -> tuple[dict, list]:
    """Check the file against ``model``; return ({state name: new tensor}, [(module, attr, value)])."""
    state, caches = model_tensors(model), set(_non_persistent(model))
    wanted = set(spec["tensors"]) | set(spec["aliases"])
    if wanted != set(state) - (caches - wanted):  # older files lack non-persistent buffers
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
        if name in caches and (len(shape) != current.dim() or tensor.dtype != current.dtype):
            continue  # a non-persistent buffer that is something else in the fresh model: left as built
        if name not in caches and (len(shape) != current.dim() or any(s > c for s, c in zip(shape, current.shape))):
            raise ValueError(
                f"{path} does not fit {type(model).__name__}: {name!r} is {shape} in the file but {tuple(current.shape)} "
                "in the model (a pruned model is never larger than the unpruned one)"
            )
        if tensor.is_floating_point() != current.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype} in the file but {current.dtype} in the model")
        values[name] = tensor
        shapes[name] = shape
    for alias, target in spec["aliases"].items():
        if target in shapes:
            shapes[alias] = shapes[target]

    modules = dict(model.named_modules())
    unknown = sorted(set(spec["modules"]) - set(modules))
    if unknown:
        raise ValueError(f"{path} does not fit {type(model).__name__}: no module {unknown[0]!r}")
    changes = []
    for name, module in modules.items():
        attrs = _new_attributes(module, name, spec["modules"][name], path) if name in spec["modules"] else {}
        problems = size_problems(module, _module_shapes(module, name, shapes), attrs)
        if problems:
            raise ValueError(f"{path}: module {name!r} ({type(module).__name__}): " + "; ".join(problems))
        changes += [(module, attr, value) for attr, value in attrs.items() if value != getattr(module, attr)]
    return values, changes


def load(model: nn.Module, path: PathLike) -> nn.Module:
    """Make the freshly built, unpruned ``model`` the pruned model saved at ``path``.

    Parameters and buffers are resized to the spec's shapes (keeping their Parameter objects,
    devices and dtypes), the saved values are copied in and the listed module attributes are
    set. The module docstring lists the checks, all made before the model is touched.

    Parameters
    ----------
    model : nn.Module
        A freshly built model of the saved architecture, materialised (not on meta).
    path : str or os.PathLike
        A file written by :func:`save`.

    Returns
    -------
    nn.Module
        ``model`` itself, now the saved pruned model.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is damaged or was saved from another architecture, or ``model`` is on the
        meta device; the model is left untouched.
    TypeError, IsADirectoryError
        As for :func:`save`.
    """
    check_model(model)
    check_materialised(model)
    path = _file_path(path, "load")
    spec, stored = _read(path)
    values, changes = _plan(model, spec, stored, path)

    state = model_tensors(model)
    try:
        with ModelTransaction(model), torch.no_grad():
            for name, value in values.items():
                tensor = state[name]
                tensor.data = value.to(device=tensor.device, dtype=tensor.dtype).clone()
                if tensor.grad is not None and tensor.grad.shape != tensor.shape:
                    tensor.grad = None
            for module, attr, value in changes:
                setattr(module, attr, value)
    except Exception as exc:
        raise ValueError(f"loading {path} failed and the model was restored: {type(exc).__name__}: {exc}") from exc
    for name in dict.fromkeys(name.rpartition(".")[0] for name in values):
        after_resize(model.get_submodule(name))
    return model


__all__ = ["save", "load", "pruning_spec", "FORMAT", "VERSION"]
