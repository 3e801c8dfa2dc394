"""Prune a Hugging Face checkpoint larger than memory, shard by shard.

:func:`prune_checkpoint` never holds the model's weights: it builds the model from its config
on the meta device and analyses it there (shapes decide the groups), reads the shards once
to score every channel with a criterion that reads one tensor at a time
(:class:`~graphprune.criteria.WeightCriterion`), plans and prunes the meta model (its config
follows), then reads the shards again, writing each pruned shard, the index and the config.

The output's config must describe the pruned model, so groups whose pruning it cannot say are
left whole (``fit_config=True``; ``uniform=True`` prunes repeated layers alike, as a config
with one size per kind of layer needs). Files other than the weights and the config
(tokenizer, generation config) are copied. The output is written beside the destination and
moved there when complete: a failure or Ctrl-C leaves nothing in the way of a rerun. A
criterion that needs data (``"wanda"``, ``"flap"``) runs its ``calibration`` batches through
the model on the CPU, each module's weights read from the checkpoint while it runs.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from .analysis.analyzer import LayerRef
from .api import analyze, prune
from .criteria import Criterion, Precomputed, WeightCriterion, get_criterion
from .criteria.base import weight_tensors
from .io.sharded import (
    CONFIG,
    ShardedCheckpoint,
    check_destination,
    copy_other_files,
    staged_directory,
    weights_on_demand,
    write_shards,
)
from .io.pretrained import build_from_config
from .pruning.model_config import config_buffers
from .pruning.options import check_options, check_ratio, check_target
from .pruning.run import PruneResult
from .analysis.report import Report
from .validation import check_bool


@dataclass
class CheckpointResult:
    """What :func:`prune_checkpoint` did.

    The output ``path``, the pruned ``model`` on the meta device (its config is the one
    written), the analysis ``report`` (why a group was left whole), the pruning ``result``
    (parameters and FLOPs before and after) and the ``seconds`` each stage took.
    """

    path: str
    model: nn.Module
    report: Report
    result: PruneResult
    seconds: dict = field(default_factory=dict)


def prune_checkpoint(
    source: Union[str, os.PathLike], destination: Union[str, os.PathLike], ratio: Union[float, Mapping[str, float], None] = None,
    *, criterion: Union[str, Criterion] = "l1", uniform: bool = False, prune_heads: bool = False,
    ignored_layers: Iterable[LayerRef] = (), global_ranking: bool = False, max_ratio: Optional[float] = None,
    round_to: Optional[int] = None, target_flops: Optional[float] = None, target_params: Optional[float] = None,
    tolerance: float = 0.02, example_inputs: Any = None, calibration: Optional[Iterable] = None, progress: bool = True,
) -> CheckpointResult:
    """Prune the Hugging Face checkpoint in directory ``source`` into ``destination``.

    One source tensor and one output shard are held at a time; the result is what
    :func:`graphprune.prune` gives the model loaded whole with ``fit_config=True``, bit for bit
    (see the module docstring). :func:`graphprune.from_pretrained` loads it.

    Parameters
    ----------
    source, destination : str or os.PathLike
        A safetensors checkpoint directory, and the output directory (absent, or empty).
    ratio, global_ranking, max_ratio, round_to, target_flops, target_params, tolerance
        As in :func:`graphprune.prune`.
    criterion : str or Criterion, default "l1"
        One that reads a tensor at a time (``"l1"``, ``"l2"``, ``"bn_scale"``), none
        (``"random"``), or weights and inputs (``"wanda"``, ``"flap"``, on ``calibration``).
    uniform, prune_heads, ignored_layers, example_inputs
        As in :func:`graphprune.prune`; ``example_inputs`` lie on the meta device (default: 1x16
        token ids, or an image of the config's size).
    calibration : iterable of input batches, optional
        Run on the CPU, each module's weights read from the checkpoint while it runs.
    progress : bool, default True
        Show progress bars.

    Returns
    -------
    CheckpointResult
        The output path, the pruned meta model, the report, the PruneResult and the timings.

    Raises
    ------
    TypeError, ValueError
        An invalid option, or a checkpoint, destination or criterion that does not fit.
    """
    seconds, start = {}, time.perf_counter()
    check_bool(progress, "progress")
    checkpoint = ShardedCheckpoint(source)
    check_destination(os.path.abspath(os.fspath(destination)))
    criterion = _streaming_criterion(criterion, calibration)
    model = _meta_model(checkpoint.directory)
    checked = check_ratio(model, ratio)  # before minutes of reading; prune() checks them again
    check_target(checked, {"flops": target_flops, "params": target_params})
    check_options(checked, global_ranking=global_ranking, max_ratio=max_ratio, round_to=round_to, steps=1,
                  schedule="linear", tolerance=tolerance, verify=True, uniform=uniform)
    example_inputs = _meta_inputs(model) if example_inputs is None else example_inputs
    report = analyze(model, example_inputs, prune_heads=prune_heads, ignored_layers=ignored_layers)
    names, renamed = _checkpoint_names(model, checkpoint)
    seconds["analysis"], start = time.perf_counter() - start, time.perf_counter()
    if criterion.requires_data:
        with checkpoint.reader() as read, weights_on_demand(model, _loader(report, checkpoint, names, read)):
            criterion.record(model, report, torch.device("cpu"))
        seconds["calibration"], start = time.perf_counter() - start, time.perf_counter()
    if criterion.reads_values:
        criterion = Precomputed(_stream_scores(criterion, report, checkpoint, names, progress))
    seconds["scoring"], start = time.perf_counter() - start, time.perf_counter()
    result = prune(model, ratio, report=report, criterion=criterion, uniform=uniform, global_ranking=global_ranking,
                   max_ratio=max_ratio, round_to=round_to, target_flops=target_flops, target_params=target_params,
                   tolerance=tolerance, fit_config=True, return_result=True)
    kept = {".".join(filter(None, key)): dims for key, dims in report.session.surgery.kept_positions().items()}
    kept = {name: kept.get(renamed[name]) for name in checkpoint.weight_map}
    seconds["planning"], start = time.perf_counter() - start, time.perf_counter()
    with staged_directory(destination) as staging:
        write_shards(checkpoint, staging, lambda name, tensor: _kept(tensor, kept.get(name)), progress=progress)
        copy_other_files(checkpoint.directory, staging, skip={CONFIG})
        model.config.save_pretrained(staging)
    seconds["writing"] = time.perf_counter() - start
    return CheckpointResult(os.path.abspath(os.fspath(destination)), model, report, result, seconds)


def _streaming_criterion(criterion: Union[str, Criterion], calibration: Optional[Iterable]) -> Criterion:
    """The criterion, which must read weights one tensor at a time (their inputs too, from a
    data pass), or no values at all."""
    criterion = get_criterion(criterion, calibration)
    if criterion.reads_values and not isinstance(criterion, WeightCriterion):
        raise ValueError(f"criterion {criterion.name!r} cannot score a checkpoint shard by shard (it reads several "
                         "weights at once, or gradients); use 'l1', 'l2', 'bn_scale', 'random', or 'wanda' or 'flap' "
                         "with calibration")
    return criterion


def _loader(report: Report, checkpoint: ShardedCheckpoint, names: dict, read) -> Any:
    """``load(model name)``: the tensor from the checkpoint (``read``), where a name of it is
    there, else as the model's config computes it (a buffer not saved)."""
    model, source, computed = report.session.model, {}, []
    for aliases in names.values():
        source.update(dict.fromkeys(aliases, _saved_name(aliases, checkpoint)))

    def load(name: str) -> torch.Tensor:
        if source.get(name) is not None:
            return read(source[name])
        if not computed:
            computed.append(config_buffers(model))
        if name not in computed[0]:
            raise ValueError(f"{checkpoint.directory}: no tensor {name}, which the calibration pass reads")
        return computed[0][name]

    return load


def _saved_name(aliases: Iterable[str], checkpoint: ShardedCheckpoint) -> Optional[str]:
    """The first of a tensor's names (the checkpoint's own come first) that the checkpoint holds; None if none."""
    return next((name for name in aliases if name in checkpoint.weight_map), None)


def _meta_model(directory: str) -> nn.Module:
    """The model the checkpoint's config describes, built on the meta device (no memory),
    as the class its config names (``architectures``), else ``AutoModel``."""
    try:
        import transformers
    except ImportError:
        raise ValueError("prune_checkpoint reads Hugging Face checkpoints, which needs transformers "
                         "(pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(directory)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # as from_pretrained builds it
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = build_from_config(transformers, config, **({"dtype": dtype} if isinstance(dtype, torch.dtype) else {}))
    return model.eval()


def _meta_inputs(model: nn.Module) -> Any:
    """Inputs on the meta device for a Hugging Face model: 1x16 token ids for a text model,
    an image of its config's size for a vision model; None (inferred) otherwise."""
    config, name = model.config, getattr(model, "main_input_name", "")
    if name == "input_ids":
        return {"input_ids": torch.zeros((1, 16), dtype=torch.long, device="meta")}
    size = getattr(config, "image_size", None)
    if name == "pixel_values" and size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.zeros((1, getattr(config, "num_channels", 3), *size), device="meta")}
    return None


def _checkpoint_names(model: nn.Module, checkpoint: ShardedCheckpoint) -> tuple:
    """``(names, renamed)``: ``{id(tensor): [names in the checkpoint or the model]}`` and
    ``{checkpoint name: model name}``, once every checkpoint tensor is found to be one of the
    model's (as transformers renames it on load, or one it ignores) with the model's shape."""
    state = model.state_dict(keep_vars=True)
    rename = _load_renaming(model, state)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    renamed, unknown = {}, []
    for name in checkpoint.weight_map:
        renamed[name] = rename(name)
        if renamed[name] not in state and not any(p.search(name) for p in ignored):
            unknown.append(name)
    if unknown:
        raise ValueError(f"{checkpoint.directory}: tensors that {type(model).__name__} (built from config.json) does not "
                         f"have: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    wrong = [f"{n} {list(checkpoint.shapes[n])} (the config says {list(state[m].shape)})"
             for n, m in renamed.items() if m in state and tuple(state[m].shape) != checkpoint.shapes[n]]
    if wrong:
        raise ValueError(f"{checkpoint.directory}: tensors whose shape config.json does not give: {', '.join(wrong[:3])}")
    names: dict = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    for name, model_name in renamed.items():
        if model_name in state:
            names[id(state[model_name])].insert(0, name)
    return names, renamed


def _load_renaming(model: nn.Module, state: dict):
    """The name ``from_pretrained`` gives each checkpoint tensor (transformers renames legacy
    names on load); a tensor it converts (fused or split experts) raises ValueError."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - an older transformers renames nothing
        return lambda name: name
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(name: str) -> str:
        renamed, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise ValueError(f"{name}: transformers converts this tensor on load ({converted}), which prune_checkpoint "
                             "does not follow; load the model whole and prune it with graphprune.prune")
        return renamed

    return rename


def _stream_scores(criterion: WeightCriterion, report: Report, checkpoint: ShardedCheckpoint, names: dict,
                   progress: bool) -> dict:
    """``{group id: scores}`` of every prunable group, from the checkpoint's tensors read one
    at a time (each once, for every dim the scores read it along)."""
    wanted = weight_tensors(criterion, report.prunable_groups)
    where, computed = {}, None
    table = {}
    for key, (tensor, dims) in wanted.items():
        saved = _saved_name(names.get(key, ()), checkpoint)
        if saved is not None:
            where[saved] = key
            continue
        computed = config_buffers(report.session.model) if computed is None else computed  # not saved: from the config
        value = next((computed[n] for n in names.get(key, ()) if n in computed), None)
        if value is None or value.shape != tensor.shape:
            raise ValueError(f"{checkpoint.directory}: no tensor {names.get(key, ['?'])[0]}, which the scores read")
        table.update({(key, dim): values for dim, values in criterion.position_scores(value, dims).items()})
    for _, name, tensor in checkpoint.tensors(set(where), desc="scoring channels", progress=progress):
        for dim, values in criterion.position_scores(tensor, wanted[where[name]][1]).items():
            table[(where[name], dim)] = values
    scores = {}
    for group in report.prunable_groups:
        members = criterion.read(group)
        scores[group.id] = criterion.group_scores(group, members, [table[(id(m.tensor), m.dim)] for m in members])
    return scores


def _kept(tensor: torch.Tensor, dims: Optional[dict]) -> torch.Tensor:
    """``tensor`` restricted to the positions ``dims[dim]`` kept along each dim."""
    for dim, positions in (dims or {}).items():
        tensor = tensor.index_select(dim, torch.as_tensor(np.asarray(positions), dtype=torch.long))
    return tensor
