"""Which layers a recovery refits, their calibration rows, and writing a fit back.

A layer is refit when its *input* lost channels: an ``nn.Linear`` or convolution whose
weight's input dim was pruned (:meth:`ChannelSurgery.kept_positions`). Least squares needs the
layer's output to be linear in a matrix of its inputs: a Linear, or a Conv1d / Conv2d with
one group (its inputs are the patches the kernel reads), and more rows of calibration data
(samples times positions) than inputs. Other layers (grouped, transposed or 3-D
convolutions, and too little data) get bias compensation. A layer without a bias puts its shift into the
BatchNorm that reads its output, where one does (eval mode: ``running_mean`` moves); with
neither, least squares fits no intercept and bias compensation has nowhere to go.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .statistics import LayerStatistics


@dataclass
class Layer:
    """One layer to refit: its name and module in the pruned model, the original output
    channels it kept (``rows``; None: all), the method it gets, and what happened."""

    name: str
    module: nn.Module
    rows: Optional[torch.Tensor]
    inputs: torch.Tensor  # the original input positions kept (features, or channels of one group)
    method: str
    follower: Optional[nn.Module] = None  # a BatchNorm that takes the bias this layer lacks
    statistics: Optional[LayerStatistics] = None
    outcome: dict = field(default_factory=dict)

    @property
    def shiftable(self) -> bool:
        """Whether a constant per output channel can be added (a bias, or a BatchNorm after)."""
        return self.module.bias is not None or self.follower is not None


def refit_layers(model: nn.Module, kept: dict, method: str) -> tuple[list[Layer], dict]:
    """``(layers, skipped)``: the layers of ``model`` whose input lost channels (``kept`` as
    :meth:`ChannelSurgery.kept_positions` gives, composed over steps), and ``{name: why}`` for
    those that cannot be refit (a weight shared or computed by a parametrization)."""
    holders: dict = {}
    for module in model.modules():
        weight = module._parameters.get("weight") if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) else None
        if weight is not None:
            holders[id(weight)] = holders.get(id(weight), 0) + 1
    layers, skipped = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        transposed = getattr(module, "transposed", False)
        dims = kept.get((name, "weight"), {})
        if (0 if transposed else 1) not in dims:
            continue
        if parametrize.is_parametrized(module) or "weight" not in module._parameters:
            skipped[name] = "its weight is computed by a parametrization"
            continue
        if holders.get(id(module.weight), 0) > 1:
            skipped[name] = "its weight is shared with another layer"
            continue
        rows, inputs = (_positions(dims.get(d), module.weight.device) for d in ((1, 0) if transposed else (0, 1)))
        layers.append(Layer(name, module, rows, inputs, method if least_squares_fits(module) else "bias"))
    return layers, skipped


def _positions(kept: Optional[object], device: torch.device) -> Optional[torch.Tensor]:
    return None if kept is None else torch.as_tensor(kept, dtype=torch.long, device=device)


def least_squares_fits(module: nn.Module) -> bool:
    """Whether the module's output is a matrix product of its input rows (see the module doc)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and not module.transposed


def input_width(module: nn.Module) -> int:
    """The number of inputs of one output row: features, or channels times the kernel's size."""
    return module.weight[0].numel()


def channel_dim(module: nn.Module, ndim: int) -> Optional[int]:
    """The dim of a Linear's or a convolution's input or output of ``ndim`` dims that holds its
    channels: the last for a Linear, the one before the spatial dims for a convolution (None
    if there is none)."""
    dim = ndim - 1 if isinstance(module, nn.Linear) else ndim - len(module.kernel_size) - 1
    return dim if dim >= 0 else None


def kept_inputs(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The original model's input of a layer that :func:`least_squares_fits`, restricted to
    the input positions the pruned layer kept (the input it would get if nothing upstream changed)."""
    return x.index_select(channel_dim(layer.module, x.dim()), layer.inputs)


def output_rows(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """The output as (samples and positions, channels)."""
    channels = output.movedim(channel_dim(module, output.dim()), -1)
    return channels.reshape(-1, channels.shape[-1])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as (samples and positions, inputs), each row what one output row reads."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)  # explicit ("same" too)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (n, c * kernel, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def new_statistics(layer: Layer, device: torch.device) -> LayerStatistics:
    outputs = layer.module.weight.shape[1 if getattr(layer.module, "transposed", False) else 0]
    if getattr(layer.module, "transposed", False):
        outputs *= layer.module.groups
    return LayerStatistics(input_width(layer.module), outputs, device, gram=layer.method == "lstsq")


def write_fit(layer: Layer, ridge: float) -> None:
    """Put the fit of ``layer.statistics`` into the pruned module (new tensors, so that a
    transaction restores the old ones), and describe it in ``layer.outcome``."""
    module, statistics = layer.module, layer.statistics
    before = statistics.relative_error
    layer.outcome = {"method": layer.method, "rows": statistics.rows, "error_before": before}
    if statistics.rows == 0:
        layer.outcome.update(method="none", why="never called on the calibration data")
        return
    if layer.method == "lstsq" and statistics.rows <= statistics.gram.shape[0]:
        layer.outcome.update(method="bias", why=f"{statistics.rows} rows of calibration data for "
                             f"{statistics.gram.shape[0] - 1} inputs: too few for least squares")
    if layer.outcome["method"] == "lstsq":
        weight, bias, after = statistics.solve(ridge, intercept=layer.shiftable)
        module.weight.data = weight.reshape(module.weight.shape).to(module.weight.dtype)
        if bias is not None:
            _shift(layer, bias - (0 if module.bias is None else module.bias.detach().double()))
    elif layer.shiftable:
        shift = statistics.mean_shift
        _shift(layer, shift)
        after = before - float(shift.square().sum() * statistics.rows / statistics.target_squares.clamp_min(1e-30))
    else:
        layer.outcome.update(method="none", why="no bias, and no BatchNorm reads its output")
        return
    layer.outcome["error_after"] = max(after, 0.0)


def _shift(layer: Layer, shift: torch.Tensor) -> None:
    """Add ``shift`` to every output row: to the bias, else to what the BatchNorm subtracts."""
    if layer.module.bias is not None:
        bias = layer.module.bias
        bias.data = (bias.detach().double() + shift).to(bias.dtype)
    else:
        mean = layer.follower.running_mean
        mean.data = (mean.double() - shift).to(mean.dtype)
