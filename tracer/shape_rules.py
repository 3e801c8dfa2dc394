"""Outputs of common modules and functions, computed from their input shapes.

On meta tensors, most of PyTorch's kernels are Python decompositions that cost more than the
rest of a shape recording (a meta convolution takes about 100 µs; an add, 150 µs). The rules
here give the output directly: a fresh empty tensor of the shape, dtype, device and memory
layout the call would produce. A rule answers only for inputs it knows the call accepts and
returns None otherwise, so that the call itself runs and fails (or succeeds) exactly as in the
model. Module rules are looked up by exact type (a subclass may override ``forward``) and are
skipped for modules with hooks.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
from torch import nn

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dense_layout(x: torch.Tensor) -> Optional[torch.memory_format]:
    """The memory format of ``x`` if it is contiguous or channels-last; else None."""
    if x.is_contiguous():
        return torch.contiguous_format
    layout = _CHANNELS_LAST.get(x.dim())
    return layout if layout is not None and x.is_contiguous(memory_format=layout) else None


def _empty(shape: tuple, like: torch.Tensor, layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)


def _same_as_input(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Elementwise: the input's shape and (dense) layout."""
    layout = dense_layout(x)
    return _empty(tuple(x.shape), x, layout) if layout is not None else None


def _sized(x: torch.Tensor, shape: tuple, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``x`` is floating and every given tensor has ``shape`` and ``x``'s dtype (the
    forwards use their tensors, not their size attributes, which the audit checks)."""
    return x.is_floating_point() and all(t is None or (tuple(t.shape) == shape and t.dtype == x.dtype) for t in tensors)


# ----- modules: rule(module, x) for a module called with one tensor


def _elementwise(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    return _same_as_input(x) if x.is_floating_point() else None


def _batch_norm(ranks: tuple) -> Callable:
    def rule(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> Optional[torch.Tensor]:
        if x.dim() not in ranks or not x.numel():
            return None
        stats = (module.running_mean, module.running_var) if not module.training or module.track_running_stats else ()
        ok = _sized(x, (x.shape[1],), module.weight, module.bias, *stats)
        one_value = x.numel() == x.shape[1]  # training on one value per channel raises
        return _same_as_input(x) if ok and not (module.training and one_value) else None

    return rule


def _group_norm(module: nn.GroupNorm, x: torch.Tensor) -> Optional[torch.Tensor]:
    ok = x.dim() >= 2 and x.shape[1] % module.num_groups == 0 and _sized(x, (x.shape[1],), module.weight, module.bias)
    return _same_as_input(x) if ok else None


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> Optional[torch.Tensor]:
    normalized = tuple(module.normalized_shape)
    ok = (
        x.dim() >= len(normalized) and tuple(x.shape[x.dim() - len(normalized):]) == normalized
        and _sized(x, normalized, module.weight, module.bias)
    )
    return _empty(tuple(x.shape), x) if ok else None  # contiguous, whatever the input's layout


def _linear(module: nn.Linear, x: torch.Tensor) -> Optional[torch.Tensor]:
    weight = module.weight
    ok = weight.dim() == 2 and x.dim() >= 1 and _sized(x, (weight.shape[0], x.shape[-1]), weight) and _sized(x, weight.shape[:1], module.bias)
    return _empty((*x.shape[:-1], weight.shape[0]), x) if ok else None


def _convolution(spatial: int) -> Callable:
    def rule(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> Optional[torch.Tensor]:
        weight, groups = module.weight, module.groups
        if not (
            weight.dim() == spatial + 2 and x.dim() in (spatial + 1, spatial + 2) and x.is_contiguous() and x.numel()
            and weight.is_contiguous() and module.padding_mode == "zeros" and weight.shape[0] % groups == 0
            and _sized(x, tuple(weight.shape), weight) and x.shape[-spatial - 1] == weight.shape[1] * groups
            and _sized(x, weight.shape[:1], module.bias)
        ):
            return None
        if module.padding == "same" and any(stride != 1 for stride in module.stride):
            return None
        sizes = []
        for d in range(spatial):
            size, kernel, stride, dilation = x.shape[x.dim() - spatial + d], weight.shape[2 + d], module.stride[d], module.dilation[d]
            if module.padding == "same":
                sizes.append(size)
                continue
            padding = 0 if module.padding == "valid" else module.padding[d]
            span = size + 2 * padding - dilation * (kernel - 1) - 1
            if span < 0:
                return None
            sizes.append(span // stride + 1)
        return _empty((*x.shape[:-spatial - 1], weight.shape[0], *sizes), x)

    return rule


def _adaptive_pool(spatial: int) -> Callable:
    def rule(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not (x.is_floating_point() and x.dim() in (spatial + 1, spatial + 2) and x.is_contiguous() and x.numel()):
            return None
        requested = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * spatial
        if len(requested) != spatial:
            return None
        sizes = [x.shape[x.dim() - spatial + d] if out is None else out for d, out in enumerate(requested)]
        return _empty((*x.shape[:-spatial], *sizes), x)

    return rule


MODULE_RULES: dict[type, Callable[[Any, torch.Tensor], Optional[torch.Tensor]]] = {
    nn.BatchNorm1d: _batch_norm((2, 3)),
    nn.BatchNorm2d: _batch_norm((4,)),
    nn.BatchNorm3d: _batch_norm((5,)),
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Linear: _linear,
    nn.Conv1d: _convolution(1),
    nn.Conv2d: _convolution(2),
    nn.Conv3d: _convolution(3),
    nn.AdaptiveAvgPool1d: _adaptive_pool(1),
    nn.AdaptiveAvgPool2d: _adaptive_pool(2),
    nn.AdaptiveAvgPool3d: _adaptive_pool(3),
    **dict.fromkeys(
        (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
            nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
            nn.Dropout, nn.AlphaDropout, nn.Identity,
        ),
        _elementwise,
    ),
}


def _attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(output, None)`` for ``mha(q, k, v, need_weights=False)`` with batched 3-d inputs, no
    masks, no extra key/value biases, and projection weights the size attributes agree with."""
    if len(args) != 3 or kwargs != {"need_weights": False} or not all(isinstance(t, torch.Tensor) for t in args):
        return None
    query, key, value = args
    embed, heads = module.embed_dim, module.num_heads
    if any(t.dim() != 3 or not t.numel() for t in args) or embed % heads or module.bias_k is not None or module.add_zero_attn:
        return None
    batch = 0 if module.batch_first else 1
    if (
        query.shape[-1] != embed or key.shape[-1] != module.kdim or value.shape[-1] != module.vdim
        or key.shape[:2] != value.shape[:2] or query.shape[batch] != key.shape[batch]
    ):
        return None
    if module._qkv_same_embed_dim:
        projections_ok = module.kdim == module.vdim == embed and _sized(query, (3 * embed, embed), module.in_proj_weight)
    else:
        projections_ok = (
            _sized(query, (embed, embed), module.q_proj_weight) and _sized(query, (embed, module.kdim), module.k_proj_weight)
            and _sized(query, (embed, module.vdim), module.v_proj_weight)
        )
    out_weight = module.out_proj.weight
    if not (
        projections_ok and _sized(query, (3 * embed,), module.in_proj_bias) and key.dtype == value.dtype == query.dtype
        and _sized(query, (out_weight.shape[0], embed), out_weight) and _sized(query, out_weight.shape[:1], module.out_proj.bias)
    ):
        return None
    length, batch_size = (query.shape[1], query.shape[0]) if module.batch_first else query.shape[:2]
    output = _empty((length, batch_size, out_weight.shape[0]), query)  # (L, N, E), as the attention computes it
    return (output.transpose(0, 1) if module.batch_first else output), None


# Rules for calls with more than one argument: rule(module, args, kwargs).
MODULE_CALL_RULES: dict[type, Callable[[Any, tuple, dict], Any]] = {nn.MultiheadAttention: _attention}


# ----- functions: rule(args, kwargs) for call_function nodes


def _binary(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``a op b`` for contiguous floating tensors of one dtype (and plain Python numbers)."""
    if len(args) != 2 or kwargs:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    numbers = [a for a in args if not isinstance(a, torch.Tensor)]
    if not tensors or any(type(n) not in (int, float) for n in numbers):
        return None
    first = tensors[0]
    if not all(t.is_floating_point() and t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors):
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None
    return _empty(tuple(shape), first)


def _concatenate(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``torch.cat(tensors, dim)`` of contiguous tensors of one dtype and rank."""
    if not args or len(args) + len(kwargs) > 2 or set(kwargs) - {"dim"} or not isinstance(args[0], (list, tuple)):
        return None
    tensors, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not tensors or type(dim) is not int or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    first = tensors[0]
    rank = first.dim()
    if rank == 0 or not -rank <= dim < rank:
        return None
    dim %= rank
    if not all(t.dtype == first.dtype and t.device == first.device and t.dim() == rank and t.is_contiguous() for t in tensors):
        return None
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:] for t in tensors):
        return None
    return _empty((*first.shape[:dim], sum(t.shape[dim] for t in tensors), *first.shape[dim + 1:]), first)


FUNCTION_RULES: dict[Callable, Callable[[tuple, dict], Any]] = {
    **dict.fromkeys((operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul), _binary),
    torch.cat: _concatenate,
}


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_internals

    return bool(module_internals._global_forward_hooks or module_internals._global_forward_pre_hooks)


def module_output(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Any]:
    """The output of ``module(*args, **kwargs)`` from a rule, or None where no rule answers."""
    if module._forward_hooks or module._forward_pre_hooks or _global_hooks():
        return None
    rule = MODULE_RULES.get(type(module))
    if rule is not None:
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return rule(module, args[0])
        return None
    call_rule = MODULE_CALL_RULES.get(type(module))
    return call_rule(module, args, kwargs) if call_rule is not None else None


def function_output(function: Callable, args: tuple, kwargs: dict) -> Optional[Any]:
    """The output of ``function(*args, **kwargs)`` from a rule, or None where no rule answers."""
    rule = FUNCTION_RULES.get(function)
    return rule(args, kwargs) if rule is not None else None
