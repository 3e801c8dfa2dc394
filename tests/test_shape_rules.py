"""tracer.shape_rules: every rule gives what the call itself gives, and declines what it rejects."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from graphprune.tracer.shape_rules import FUNCTION_RULES, MODULE_RULES, function_output, module_output

CL = torch.channels_last


def _same_output(rule_output: torch.Tensor, real: torch.Tensor) -> bool:
    return (rule_output.shape, rule_output.dtype, rule_output.stride()) == (real.shape, real.dtype, real.stride())


def _instance(cls: type) -> nn.Module:
    special = {
        nn.BatchNorm1d: lambda: cls(6), nn.BatchNorm2d: lambda: cls(6), nn.BatchNorm3d: lambda: cls(6),
        nn.GroupNorm: lambda: cls(3, 6), nn.LayerNorm: lambda: cls([5]), nn.Linear: lambda: cls(5, 7),
        nn.Conv1d: lambda: cls(6, 4, 3), nn.Conv2d: lambda: cls(6, 4, 3), nn.Conv3d: lambda: cls(6, 4, 3),
        nn.AdaptiveAvgPool1d: lambda: cls(2), nn.AdaptiveAvgPool2d: lambda: cls((2, None)), nn.AdaptiveAvgPool3d: lambda: cls(2),
    }
    return special.get(cls, cls)()


def _accepted_input(cls: type) -> torch.Tensor:
    shapes = {nn.BatchNorm1d: (2, 6, 5), nn.BatchNorm3d: (2, 6, 5, 5, 5), nn.Conv1d: (2, 6, 5), nn.AdaptiveAvgPool1d: (2, 6, 5),
              nn.Conv3d: (2, 6, 5, 5, 5), nn.AdaptiveAvgPool3d: (2, 6, 5, 5, 5)}
    return torch.randn(shapes.get(cls, (2, 6, 5, 5)))


@pytest.mark.parametrize("cls", sorted(MODULE_RULES, key=lambda c: c.__name__))
def test_every_module_rule_gives_the_module_s_output(cls):
    module = _instance(cls).eval()
    x = _accepted_input(cls)
    with torch.no_grad():
        assert _same_output(module_output(module, (x,), {}), module(x))


@pytest.mark.parametrize("cls", [nn.ReLU, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.Linear, nn.Identity])
def test_a_channels_last_input_keeps_the_layout_the_module_gives(cls):
    module = _instance(cls).eval()
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        assert _same_output(module_output(module, (x,), {}), module(x))


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
        (nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 4, 11, 13)),
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), (1, 4, 7, 7)),
        (nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 8, 9)),
        (nn.Conv2d(4, 6, 3, padding="valid"), (2, 4, 8, 9)),
        (nn.Conv2d(4, 8, 1), (1, 4, 1, 1)),
        (nn.Conv2d(4, 6, 3, stride=3), (4, 5, 5)),  # unbatched
        (nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1)), (1, 2, 3, 4, 4)),
        (nn.AdaptiveAvgPool2d(1), (3, 8, 7, 5)),
        (nn.AdaptiveAvgPool2d((None, 3)), (8, 7, 5)),
    ],
)
def test_convolution_and_pooling_shapes(module, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        assert _same_output(module_output(module.eval(), (x,), {}), module(x))


@pytest.mark.parametrize(
    "module, x",
    [
        (nn.BatchNorm2d(6), torch.randn(1, 5, 4, 4)),  # wrong channel count
        (nn.BatchNorm2d(6), torch.randn(6, 4, 4)),  # wrong rank
        (nn.LayerNorm([5]), torch.randn(2, 4)),
        (nn.Linear(5, 3), torch.randn(2, 4)),
        (nn.GroupNorm(2, 6), torch.randn(2, 4, 3)),
        (nn.Conv2d(4, 6, 3), torch.randn(1, 5, 8, 8)),
        (nn.Conv2d(4, 6, 5), torch.randn(1, 4, 3, 8)),  # smaller than the kernel
        (nn.Conv2d(4, 6, 3), torch.randn(4, 8, 8, 8, 8)),
        (nn.AdaptiveAvgPool2d(2), torch.randn(1, 4, 0, 3)),
    ],
)
def test_inputs_the_module_rejects_are_declined(module, x):
    assert module_output(module, (x,), {}) is None
    with pytest.raises((RuntimeError, ValueError)):
        module(x)


@pytest.mark.parametrize(
    "module, x",
    [
        (nn.Linear(5, 3), torch.randn(2, 5, dtype=torch.float64)),  # dtype other than the weight's
        (nn.BatchNorm1d(5), torch.randn(2, 5, dtype=torch.float64)),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), torch.randn(1, 4, 5, 5)),
        (nn.Conv2d(4, 6, 3), torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)),
        (nn.ReLU(), torch.randn(4, 6).t()),  # neither contiguous nor channels-last
    ],
)
def test_calls_outside_what_a_rule_covers_are_left_to_the_module(module, x):
    assert module_output(module, (x,), {}) is None


def test_hooked_modules_and_subclasses_get_no_rule():
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda module, args, out: out)
    x = torch.randn(2, 3)
    assert module_output(hooked, (x,), {}) is None
    assert module_output(type("MyReLU", (nn.ReLU,), {})(), (x,), {}) is None
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert module_output(nn.ReLU(), (x,), {}) is None
    finally:
        handle.remove()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_gives_the_output_shape_and_no_weights(batch_first, kdim):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    query = torch.randn(3, 5, 8)
    key = torch.randn(3, 4, kdim or 8) if batch_first else torch.randn(4, 5, kdim or 8)
    with torch.no_grad():
        expected, weights = mha(query, key, key, need_weights=False)
    output, none = module_output(mha, (query, key, key), {"need_weights": False})
    assert output.shape == expected.shape and output.dtype == expected.dtype and none is None and weights is None


def test_attention_calls_outside_the_rule_are_left_to_the_module():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    assert module_output(mha, (x, x, x), {}) is None  # need_weights defaults to True
    assert module_output(mha, (x, x, x), {"need_weights": False, "attn_mask": None}) is None
    assert module_output(mha, (x[..., :6], x, x), {"need_weights": False}) is None
    assert module_output(mha, (x, x[:1], x[:1]), {"need_weights": False}) is None  # batch sizes differ


@pytest.mark.parametrize(
    "function, args",
    [
        (operator.add, (torch.randn(2, 3, 4), torch.randn(2, 3, 4))),
        (operator.mul, (torch.randn(2, 3, 4, 5), torch.randn(1, 3, 1, 1))),  # squeeze-excitation scaling
        (operator.sub, (torch.randn(3, 1), torch.randn(4))),
        (operator.truediv, (torch.randn(2, 3), 2)),
        (operator.mul, (0.5, torch.randn(2, 3, dtype=torch.float64))),
        (torch.add, (torch.randn(2, 3), torch.randn(())),),
        (torch.cat, ([torch.randn(2, 3, 4), torch.randn(2, 5, 4)], 1)),
        (torch.cat, ([torch.randn(2, 3), torch.randn(1, 3)],)),
        (torch.cat, ((torch.randn(2, 3), torch.randn(2, 1)), -1)),
    ],
)
def test_every_function_rule_gives_the_function_s_output(function, args):
    assert function in FUNCTION_RULES
    assert _same_output(function_output(function, args, {}), function(*args))


@pytest.mark.parametrize(
    "function, args, kwargs",
    [
        (operator.add, (torch.randn(2, 3), torch.randn(4, 3)), {}),  # not broadcastable
        (torch.cat, ([torch.randn(2, 3), torch.randn(2, 4)], 0), {}),
        (torch.cat, ([torch.randn(2, 3), torch.randn(2, 3, 1)], 0), {}),
        (torch.cat, ([torch.randn(2, 3)], 2), {}),
    ],
)
def test_function_calls_that_fail_are_declined(function, args, kwargs):
    assert function_output(function, args, kwargs) is None
    with pytest.raises((RuntimeError, IndexError)):
        function(*args, **kwargs)


@pytest.mark.parametrize(
    "function, args, kwargs",
    [
        (operator.add, (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)), {}),  # type promotion
        (operator.add, (torch.arange(3), 1), {}),  # integer tensors
        (operator.mul, (torch.randn(2, 3), True), {}),
        (operator.mul, (torch.randn(3, 2).t(), torch.randn(2, 3)), {}),  # not contiguous
        (torch.add, (torch.randn(2, 3), torch.randn(2, 3)), {"alpha": 2}),
        (torch.cat, ([torch.randn(2, 3), torch.randn(2, 3).t().t()],), {"out": None}),
        (torch.cat, ([torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)],), {}),
    ],
)
def test_function_calls_outside_what_a_rule_covers_are_left_to_the_function(function, args, kwargs):
    assert function_output(function, args, kwargs) is None


def _stale_attributes() -> list:
    """Modules whose size attributes disagree with their tensors: the forward follows the tensors."""
    conv = nn.Conv2d(4, 6, 3)
    conv.weight = nn.Parameter(conv.weight[:5])
    conv.bias = nn.Parameter(conv.bias[:5])
    linear = nn.Linear(5, 7)
    linear.weight = nn.Parameter(linear.weight[:3])
    linear.bias = nn.Parameter(linear.bias[:3])
    norm = nn.BatchNorm2d(6)
    norm.num_features = 9
    group_norm = nn.GroupNorm(3, 6, affine=False)
    group_norm.num_channels = 12
    return [(conv, (1, 4, 6, 6)), (linear, (2, 5)), (norm, (2, 6, 3, 3)), (group_norm, (2, 9, 4))]


@pytest.mark.parametrize("module, shape", _stale_attributes())
def test_rules_follow_the_tensors_not_the_size_attributes(module, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        assert _same_output(module_output(module.eval(), (x,), {}), module(x))


def test_a_conv_whose_weight_no_longer_fits_the_input_is_declined():
    conv = nn.Conv2d(4, 6, 3)
    conv.weight = nn.Parameter(conv.weight[:, :3])  # in_channels still says 4
    x = torch.randn(1, 4, 6, 6)
    assert module_output(conv, (x,), {}) is None
    with pytest.raises(RuntimeError):
        conv(x)


def test_attention_whose_projections_disagree_with_its_sizes_is_left_to_the_module():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    mha.out_proj.weight = nn.Parameter(mha.out_proj.weight[:, :6])
    x = torch.randn(2, 5, 8)
    assert module_output(mha, (x, x, x), {"need_weights": False}) is None
    with pytest.raises(RuntimeError):
        mha(x, x, x, need_weights=False)


def test_batch_norm_in_training_on_one_value_per_channel_is_left_to_the_module():
    norm = nn.BatchNorm2d(3).train()
    x = torch.randn(1, 3, 1, 1)
    assert module_output(norm, (x,), {}) is None
    with pytest.raises(ValueError):
        norm(x)
