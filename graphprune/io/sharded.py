"""A Hugging Face checkpoint directory read and written one shard at a time.

The layout is ``save_pretrained``'s: ``config.json``, the weights in ``model.safetensors``
or in shards listed by ``model.safetensors.index.json`` (``{"metadata": {"total_size": N},
"weight_map": {tensor name: shard file}}``), and other files (tokenizer, generation config)
beside them. :class:`ShardedCheckpoint` reads one tensor at a time, so that a model larger
than memory can be scored and pruned; :func:`staged_directory` writes the output into a
hidden sibling directory that becomes the output only once complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"


class ShardedCheckpoint:
    """The safetensors weights of the checkpoint in ``directory``: ``shards`` (file names, in
    order), ``weight_map`` (tensor name to shard) and each tensor's shape and dtype, read from
    the headers alone."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        if not os.path.isfile(os.path.join(self.directory, CONFIG)):
            raise ValueError(f"{self.directory}: not a checkpoint directory with a config.json (save_pretrained writes one)")
        index = os.path.join(self.directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as handle:
                    self.weight_map = {str(k): str(v) for k, v in json.load(handle)["weight_map"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{self.directory}: {INDEX} is not an index of shards ({type(exc).__name__}: {exc})") from None
        elif os.path.isfile(os.path.join(self.directory, SINGLE)):
            self.weight_map = None
        else:
            raise ValueError(f"{self.directory}: no {SINGLE} and no {INDEX}; only safetensors checkpoints stream")
        self.shards = list(dict.fromkeys(self.weight_map.values())) if self.weight_map else [SINGLE]
        self.shapes, self.dtypes, self.metadata = {}, {}, {}
        for shard in self.shards:
            with self._open(shard) as handle:
                self.metadata[shard] = handle.metadata()
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = piece.get_dtype()
        self.weight_map = self.weight_map or dict.fromkeys(self.shapes, SINGLE)
        missing = sorted(set(self.weight_map) - set(self.shapes))
        if missing:
            raise ValueError(f"{self.directory}: {INDEX} lists tensors no shard holds: {', '.join(missing[:5])}")

    def _open(self, shard: str):
        path = os.path.join(self.directory, shard)
        if not os.path.isfile(path):
            raise ValueError(f"{self.directory}: shard {shard} is missing")
        try:
            return safe_open(path, framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise ValueError(f"{self.directory}: shard {shard} is not a readable safetensors file: {exc}") from None

    def tensors(self, names: Optional[set] = None, *, desc: str = "", progress: bool = True) -> Iterator[tuple]:
        """``(shard, name, tensor)`` for every tensor (those in ``names`` only, if given), shard
        after shard; one tensor is read at a time, with a progress bar in bytes."""
        chosen = [n for n in self.weight_map if names is None or n in names]
        total = sum(_nbytes(self.shapes[n], self.dtypes[n]) for n in chosen)
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
            for shard in self.shards:
                wanted = [n for n in chosen if self.weight_map[n] == shard]
                if not wanted:
                    continue
                with self._open(shard) as handle:
                    for name in wanted:
                        tensor = handle.get_tensor(name)
                        yield shard, name, tensor
                        bar.update(tensor.numel() * tensor.element_size())


    @contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """``read(name)``, one tensor at a time, from a handle on its shard kept open until a
        tensor of another shard is read: one shard mapped at a time."""
        current: list = [None, None]  # shard, handle

        def read(name: str) -> torch.Tensor:
            shard = self.weight_map[name]
            if current[0] != shard:
                close()
                current[:] = [shard, self._open(shard).__enter__()]
            return current[1].get_tensor(name)

        def close() -> None:
            if current[1] is not None:
                current[1].__exit__(None, None, None)
            current[:] = [None, None]

        try:
            yield read
        finally:
            close()


@contextmanager
def weights_on_demand(model: nn.Module, load: Callable[[str], torch.Tensor]) -> Iterator[None]:
    """While the block runs, every module of ``model`` whose own parameters or buffers are on
    the meta device holds real ones, ``load(name)``, only while its forward runs: a model
    larger than memory runs with one layer's weights at a time. A tensor used outside its
    own module's forward stays on meta (the forward then fails on mixed devices)."""
    handles = []
    for prefix, module in model.named_modules():
        own = [k for k, t in [*module._parameters.items(), *module._buffers.items()] if t is not None and t.is_meta]
        if own:
            held: list = []
            handles.append(module.register_forward_pre_hook(partial(_load_own, prefix, own, load, held)))
            handles.append(module.register_forward_hook(partial(_put_back, held), always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _load_own(prefix: str, own: list, load: Callable, held: list, module: nn.Module, args: tuple) -> None:
    saved = {}
    for key in own:
        name = f"{prefix}.{key}" if prefix else key
        if key in module._parameters:
            saved[key] = module._parameters[key]
            module._parameters[key] = nn.Parameter(load(name), requires_grad=False)
        else:
            saved[key] = module._buffers[key]
            module._buffers[key] = load(name)
    held.append(saved)


def _put_back(held: list, module: nn.Module, args: tuple, output) -> None:
    for key, tensor in (held.pop() if held else {}).items():
        (module._parameters if key in module._parameters else module._buffers)[key] = tensor


def write_shards(source: ShardedCheckpoint, directory: str, transform: Callable[[str, torch.Tensor], torch.Tensor], *,
                 progress: bool = True) -> int:
    """Write every tensor of ``source``, as ``transform(name, tensor)`` gives it, into shards of
    the same names in ``directory`` (one shard held at a time), with an index where the source
    has one; returns the bytes written."""
    total, pending, current = 0, {}, None

    def flush() -> None:
        if pending:
            save_file(pending, os.path.join(directory, current), metadata=source.metadata.get(current) or {"format": "pt"})
            pending.clear()

    for shard, name, tensor in source.tensors(desc="writing pruned shards", progress=progress):
        if shard != current:
            flush()
            current = shard
        pending[name] = transform(name, tensor).contiguous()
        total += pending[name].numel() * pending[name].element_size()
    flush()
    if source.shards != [SINGLE]:
        with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": source.weight_map}, handle, indent=2, sort_keys=True)
    return total


def copy_other_files(source: str, directory: str, *, skip: set) -> None:
    """Copy the files of ``source`` other than its weights, index and ``skip`` (tokenizer,
    generation config) into ``directory``; subdirectories are left out."""
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name not in skip and name not in (INDEX, SINGLE) and not name.endswith(".safetensors"):
            shutil.copy2(path, os.path.join(directory, name))


@contextmanager
def staged_directory(destination: str) -> Iterator[str]:
    """A hidden directory beside ``destination`` to write into; it becomes ``destination`` when
    the block ends, and is removed if the block fails or is interrupted (``BaseException``),
    so that nothing half-written is ever in the way of a rerun. ``destination`` must not
    exist, or be an empty directory."""
    destination = os.path.abspath(os.fspath(destination))
    check_destination(destination)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.partial-", dir=parent)
    try:
        yield staging
        check_destination(destination)
        if os.path.isdir(destination):
            os.rmdir(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_destination(destination: str) -> None:
    """Raise ValueError if ``destination`` exists and is not an empty directory."""
    if os.path.exists(destination) and not (os.path.isdir(destination) and not os.listdir(destination)):
        raise ValueError(f"{destination} exists; remove it or choose another output directory")


def _nbytes(shape: tuple, dtype: str) -> int:
    size = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}.get(dtype, 4)
    return math.prod(shape) * size
