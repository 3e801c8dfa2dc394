"""Calibration recovery: refit what a pruning left so that each layer gives what it gave before.

For every layer whose input lost channels (:mod:`.layers`), the original model's output of
that layer on calibration batches is the target. ``"lstsq"`` refits the layer's kept weights
and bias by ridge least squares; ``"bias"`` only adds the mean difference to the bias. By
default one pass serves all layers: each reconstructs its own output from the original
model's inputs that it kept (one-shot: no error is carried forward, none is corrected
either). ``sequential`` refits one layer per pass, in the order the forward calls them, on
the pruned model's inputs, so each fit sees what the layers refit before it give and corrects
what they could not. A layer whose kept inputs are not a slice of the original's (a grouped
or transposed convolution) is always paired with the pruned model's input. Each pass stops
once the last layer it measures was called.
"""
from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from graphprune.tracer.devices import (
    LoaderBatch,
    calibration_batches,
    check_loader,
    check_max_batches,
    model_device,
)
from graphprune.validation import check_bool

from .layers import (
    Layer,
    channel_dim,
    input_rows,
    kept_inputs,
    least_squares_fits,
    new_statistics,
    output_rows,
    refit_layers,
    write_fit,
)

METHODS = ("lstsq", "bias")
_OWNER = "the calibration batches"  # in messages


class Recovery:
    """How :func:`graphprune.prune` refits a pruned model on its ``calibration`` batches.

    By default one calibration pass fits every layer whose input lost channels to reconstruct
    its own output from the inputs it kept (one-shot). After pruning, :attr:`layers` holds what
    happened to each layer: the method used, the rows of calibration data, and the relative
    output error ``‖y - y_pruned‖² / ‖y‖²`` before and after the refit (and ``why`` where it
    fell back).

    Parameters
    ----------
    method : {"lstsq", "bias"}, default "lstsq"
        ``"lstsq"``: ridge least squares of every such layer, with bias compensation where the
        layer's output is not a product of its input rows (a grouped convolution); ``"bias"``:
        bias compensation only (cheaper, and no new weights).
    sequential : bool, default False
        Refit the layers one after another in forward order, one pass each, on the inputs the
        model as refit so far gives, against the original model's outputs: it corrects upstream
        error at the cost of a pass per layer (on MiniLM it did not beat one-shot:
        ``benchmarks/results/recovery.md``).
    ridge : float, default 0.01
        The damping, as a fraction of the mean input energy.
    max_batches : int, optional
        The most calibration batches per pass (at least 1); default all.
    progress : bool, default True
        Show a progress bar over the batches.

    Raises
    ------
    ValueError
        ``method`` is unknown, ``ridge`` is negative or not a number, or ``max_batches`` below 1.
    TypeError
        ``sequential`` or ``progress`` is not a bool, or ``max_batches`` not an integer.
    """

    def __init__(self, method: str = "lstsq", *, sequential: bool = False, ridge: float = 1e-2,
                 max_batches: Optional[int] = None, progress: bool = True):
        if method not in METHODS:
            raise ValueError(f"recovery method must be one of {list(METHODS)}, got {method!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        check_bool(sequential, "sequential"), check_bool(progress, "progress")
        self.method, self.sequential, self.ridge = method, sequential, float(ridge)
        self.max_batches, self.progress = check_max_batches(max_batches), progress
        self.layers: dict = {}

    def __repr__(self) -> str:
        return (f"Recovery({self.method!r}, sequential={self.sequential}, ridge={self.ridge}, "
                f"max_batches={self.max_batches})")

    def run(self, reference: nn.Module, model: nn.Module, kept: dict, calibration: Any) -> dict:
        """Refit the pruned ``model`` on ``calibration``.

        Parameters
        ----------
        reference : nn.Module
            The model before pruning (its outputs are the targets of a sequential refit).
        model : nn.Module
            The pruned model, refit in place.
        kept : dict
            The positions kept of each tensor, as :meth:`ChannelSurgery.kept_positions` gives them.
        calibration : iterable
            Calibration batches: the model's inputs, or ``(inputs, targets)`` pairs.

        Returns
        -------
        dict
            :attr:`layers`, which it also stores.
        """
        layers, skipped = refit_layers(model, kept, self.method)
        self.layers = {name: {"method": "none", "why": why} for name, why in skipped.items()}
        if not layers:
            return self.layers
        device = model_device(model)
        check_loader(calibration, _OWNER, reread=True)
        survey = _Survey(model, layers, next(self._batches(calibration, device, 1)))
        rounds = [[layer] for layer in survey.ordered] if self.sequential else [survey.ordered]
        batches = len(calibration) if hasattr(calibration, "__len__") else None
        batches = min(batches, self.max_batches or batches) if batches is not None else self.max_batches
        bar = tqdm(total=None if batches is None else batches * len(rounds), unit="batch", leave=False,
                   desc=f"recovery ({self.method}, {len(layers)} layers)", disable=not self.progress)
        with bar, torch.no_grad():
            for layers_now in rounds:
                for layer in layers_now:
                    layer.statistics = new_statistics(layer, device)
                for batch in self._batches(calibration, device, self.max_batches):
                    _paired_pass(reference, model, layers_now, survey.calls, batch, own_inputs=not self.sequential)
                    bar.update(1)
                for layer in layers_now:
                    write_fit(layer, self.ridge)
                    self.layers[layer.name] = layer.outcome
                    layer.statistics = None
        return self.layers

    def _batches(self, calibration: Any, device: torch.device, limit: Optional[int]):
        return calibration_batches(calibration, _OWNER, device, limit)


class _Stop(BaseException):
    """Ends a calibration forward once every layer of the pass was called (a BaseException, so
    that a model's own ``except Exception`` cannot swallow it)."""


def _forward(model: nn.Module, batch: LoaderBatch, layers: list[Layer], calls: dict, record: Callable) -> None:
    """``batch.forward(model)``, calling ``record(layer, call index, input, output)`` at every
    call of each layer (looked up by name in ``model``); stops after the last one expected."""
    seen: dict = defaultdict(int)
    waiting = {layer.name for layer in layers if calls.get(layer.name)}

    def hook_for(layer: Layer):
        def hook(module, args, kwargs, output):
            index = seen[layer.name]
            seen[layer.name] += 1
            record(layer, index, args[0] if args else next(iter(kwargs.values())), output)
            if seen[layer.name] >= calls[layer.name]:
                waiting.discard(layer.name)
                if not waiting:
                    raise _Stop
        return hook

    handles = [model.get_submodule(layer.name).register_forward_hook(hook_for(layer), with_kwargs=True)
               for layer in layers]
    try:
        batch.forward(model)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _paired_pass(reference: nn.Module, model: nn.Module, layers: list[Layer], calls: dict, batch: LoaderBatch,
                 own_inputs: bool) -> None:
    """One batch through both models: each layer's original output (its kept rows) is paired
    with the pruned layer's input and output at the same call. With ``own_inputs`` a layer
    whose output is a product of its input rows takes its input from the original model
    instead (its kept positions), and the pruned model runs only for the others."""
    targets: dict = {}
    own = {layer.name for layer in layers if own_inputs and least_squares_fits(layer.module)}

    def keep_target(layer: Layer, index: int, x: torch.Tensor, output: torch.Tensor) -> None:
        target = output if layer.rows is None else output.index_select(channel_dim(layer.module, output.dim()), layer.rows)
        if layer.name not in own:
            targets[(layer.name, index)] = target
            return
        x = kept_inputs(layer, x)
        rows = input_rows(layer.module, x) if layer.method == "lstsq" else None
        pruned_output = layer.module.forward(x)  # no hooks
        layer.statistics.add(rows, output_rows(layer.module, target), output_rows(layer.module, pruned_output))

    def add_pair(layer: Layer, index: int, x: torch.Tensor, output: torch.Tensor) -> None:
        target = targets.pop((layer.name, index), None)
        if target is None or target.shape != output.shape:
            return
        rows = input_rows(layer.module, x) if layer.method == "lstsq" else None
        layer.statistics.add(rows, output_rows(layer.module, target), output_rows(layer.module, output))

    _forward(reference, batch, layers, calls, keep_target)
    paired = [layer for layer in layers if layer.name not in own]
    if paired:
        _forward(model, batch, paired, calls, add_pair)


class _Survey:
    """One batch through the pruned model: how often each layer is called, the order of their
    first calls (layers never called last), and the BatchNorm that reads the output of a
    layer without a bias (it takes the layer's shift: :attr:`Layer.follower`)."""

    def __init__(self, model: nn.Module, layers: list[Layer], batch: LoaderBatch):
        self.calls: dict = defaultdict(int)
        first: list = []
        outputs: dict = {}  # id(output) -> (output, layer)
        readers: dict = defaultdict(set)

        def on_call(layer: Layer, index: int, _, output: Any) -> None:
            self.calls[layer.name] = index + 1
            if index == 0:
                first.append(layer)
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = (output, layer)

        def on_norm(module: nn.Module, args: tuple) -> None:
            found = outputs.get(id(args[0])) if args else None
            if found is not None and found[0] is args[0]:
                readers[found[1].name].add(module)

        norms = [m for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
        handles = [m.register_forward_pre_hook(on_norm) for m in norms]
        unlimited = {layer.name: float("inf") for layer in layers}
        try:
            with torch.no_grad():
                _forward(model, batch, layers, unlimited, on_call)
        finally:
            for handle in handles:
                handle.remove()
        for layer in first:
            found = readers.get(layer.name, ())
            if layer.module.bias is None and len(found) == 1:
                layer.follower = next(iter(found))
        self.ordered = first + [layer for layer in layers if layer not in first]


def check_recovery(recover: Union[str, Recovery, None], calibration: Any) -> Optional[Recovery]:
    """The :class:`Recovery` that ``prune(recover=...)`` names (None: none), checked against ``calibration``."""
    if recover is None:
        return None
    if isinstance(recover, str):
        recover = Recovery(recover)
    if not isinstance(recover, Recovery):
        raise TypeError(f"recover must be 'lstsq', 'bias', a graphprune.Recovery or None, got {type(recover).__name__}")
    if calibration is None:
        raise ValueError(f"recover={recover.method!r} refits the pruned model on calibration data: pass "
                         "calibration= (a list or DataLoader of input batches)")
    check_loader(calibration, _OWNER, reread=True)  # before anything changes
    return recover
