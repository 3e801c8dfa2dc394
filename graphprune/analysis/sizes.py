"""Which module attributes hold a size, and which tensor dimension each one follows.

This is the one home of that fact. The surgery reads it to set the size attributes of every
module whose tensors it shrank, :func:`graphprune.load` reads it to check a file's
attributes against its tensors, and the tests read it to compare models.

* :data:`SIZE_ATTRIBUTES` maps a module class to its size attributes. Each follows one
  dimension of one of the module's tensors (:class:`Follows`), optionally multiplied or
  divided by a *count*; a subclass is covered by the entry of its closest listed class.
* A count (a conv's ``groups``, a GroupNorm's ``num_groups``, an attention layer's head
  count ``num_heads``) cannot be read off a shape: the rule that prunes whole groups or
  heads sets it, and the table lists which sizes it must divide.
* :data:`RESIZED_HOOKS` names what a module must do once its tensors were given new
  storage (an ``nn.LSTM`` packs its weights into one buffer again).
* :data:`HEAD_ATTRIBUTES` names the attributes that hold a head count, with the per-head
  width beside it, in attention layers written in any codebase (``num_heads`` /
  ``head_dim``, ``num_attention_heads`` / ``attention_head_size``, ``num_key_value_heads``
  for grouped-query attention, ...): the reshape rule reads it to tell a split into
  ``(…, heads, head_dim)`` from any other split, and which attribute each axis follows.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize


class Follows(NamedTuple):
    """A size attribute's value read off a tensor of its module.

    ``tensor`` is the parameter or buffer (a dotted path for a child's; or a tuple of them, of
    which the first present counts, as for a norm without affine parameters); ``dim`` the dimension
    whose size it holds, or None for the whole shape (a tuple, as LayerNorm's
    ``normalized_shape``); the size is then multiplied by the count ``times`` or divided by
    the count ``per``, if given.
    """

    tensor: Union[str, tuple]  # a path, or several: the first the module has
    dim: Optional[int]
    times: str = ""
    per: str = ""


class SizeRule(NamedTuple):
    """The size attributes of one module class, its counts, and the sizes each count divides."""

    sizes: dict  # attribute -> Follows
    counts: tuple = ()  # attributes that hold a count of groups or heads
    divides: tuple = ()  # (count, size attribute): the count divides that size


_CONV = SizeRule(
    {"out_channels": Follows("weight", 0), "in_channels": Follows("weight", 1, times="groups")},
    counts=("groups",), divides=(("groups", "in_channels"), ("groups", "out_channels")),
)
_CONV_TRANSPOSED = SizeRule(
    {"in_channels": Follows("weight", 0), "out_channels": Follows("weight", 1, times="groups")},
    counts=("groups",), divides=(("groups", "in_channels"), ("groups", "out_channels")),
)
_EMBEDDING = SizeRule({"num_embeddings": Follows("weight", 0), "embedding_dim": Follows("weight", 1)})
_LAYER_NORM = SizeRule({"normalized_shape": Follows("weight", None)})

#: Module class -> its size attributes; see the module docstring. A class of an optional library
#: is named by its module and qualified name (never imported).
SIZE_ATTRIBUTES: dict = {
    nn.modules.conv._ConvNd: _CONV,
    nn.modules.conv._ConvTransposeNd: _CONV_TRANSPOSED,
    nn.Linear: SizeRule({"in_features": Follows("weight", 1), "out_features": Follows("weight", 0)}),
    nn.modules.batchnorm._NormBase: SizeRule({"num_features": Follows(("weight", "running_mean"), 0)}),
    nn.GroupNorm: SizeRule({"num_channels": Follows("weight", 0)}, counts=("num_groups",),
                           divides=(("num_groups", "num_channels"),)),
    nn.LayerNorm: _LAYER_NORM,
    **({nn.RMSNorm: _LAYER_NORM} if hasattr(nn, "RMSNorm") else {}),
    nn.Embedding: _EMBEDDING,
    nn.EmbeddingBag: _EMBEDDING,
    nn.PReLU: SizeRule({"num_parameters": Follows("weight", 0)}),
    # one size for every layer and direction (their dims keep one count: rules/recurrent.py)
    nn.RNNBase: SizeRule({"input_size": Follows("weight_ih_l0", 1), "hidden_size": Follows(("weight_hr_l0", "weight_hh_l0"), 1),
                          "proj_size": Follows("weight_hr_l0", 0)}),
    nn.RNNCellBase: SizeRule({"input_size": Follows("weight_ih", 1), "hidden_size": Follows("weight_hh", 1)}),
    nn.MultiheadAttention: SizeRule(
        {"embed_dim": Follows(("in_proj_weight", "q_proj_weight"), 1), "kdim": Follows(("in_proj_weight", "k_proj_weight"), 1),
         "vdim": Follows(("in_proj_weight", "v_proj_weight"), 1),
         "head_dim": Follows(("in_proj_weight", "q_proj_weight"), 1, per="num_heads")},
        counts=("num_heads",), divides=(("num_heads", "embed_dim"),),
    ),
    # the model width it checks its inputs against, read off a child's tensor
    nn.Transformer: SizeRule({"d_model": Follows("encoder.layers.0.linear1.weight", 1)}),
    # GPT-2's linear layer, with its weight stored as (in, out)
    "transformers.pytorch_utils.Conv1D": SizeRule({"nx": Follows("weight", 0), "nf": Follows("weight", 1)}),
}


class HeadAttributes(NamedTuple):
    """The attribute holding a head count, and the one holding each head's width."""

    count: str
    width: str


#: Attribute pairs that hold a head count and the per-head width (see the module docstring).
HEAD_ATTRIBUTES = (
    HeadAttributes("num_heads", "head_dim"),
    HeadAttributes("num_attention_heads", "attention_head_size"),
    HeadAttributes("num_key_value_heads", "head_dim"),
    HeadAttributes("num_kv_heads", "head_dim"),
    HeadAttributes("n_head", "head_dim"),
    HeadAttributes("n_heads", "head_dim"),
)


def head_attributes(module: nn.Module, heads: int, width: int) -> Optional[HeadAttributes]:
    """The pair of :data:`HEAD_ATTRIBUTES` by which ``module`` declares ``heads`` heads of
    ``width`` channels (its width attribute may be absent, as where the width is computed
    inline, or its count, as where that is; not both); None when it declares no such heads."""
    values = vars(module)
    for pair in HEAD_ATTRIBUTES:
        if values.get(pair.count) == heads and values.get(pair.width, width) == width:
            return pair
    for pair in HEAD_ATTRIBUTES:  # a count computed from the shape (``view(…, -1, self.head_dim)``)
        if pair.count not in values and values.get(pair.width) == width:
            return pair
    return None


def attributes_of_value(module: nn.Module, value: int, exclude: tuple = ()) -> list:
    """The names of ``module``'s public int attributes equal to ``value`` (but ``exclude``)."""
    return [k for k, v in vars(module).items()
            if type(v) is int and v == value and not k.startswith("_") and k not in exclude]


def read_after_init(module: nn.Module, names: list) -> list:
    """Those of the attribute ``names`` that ``module``'s class reads outside ``__init__``:
    of GPT-2's ``split_size`` and ``embed_dim`` (one value), its forward reads ``split_size``."""
    read = _names_read(type(module))
    return [name for name in names if name in read]


@functools.lru_cache(maxsize=None)
def _names_read(cls: type) -> frozenset:
    """Every name the methods of ``cls`` (and its bases up to nn.Module) but ``__init__`` use."""
    names: set = set()
    for klass in cls.__mro__[: cls.__mro__.index(nn.Module)] if nn.Module in cls.__mro__ else ():
        for name, member in vars(klass).items():
            function = inspect.unwrap(getattr(member, "__func__", member))  # past decorators
            if name != "__init__" and isinstance(getattr(function, "__code__", None), types.CodeType):
                names |= _code_names(function.__code__)
    return frozenset(names)


def _code_names(code: types.CodeType) -> set:
    return set(code.co_names).union(*(_code_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def size_rule(module: nn.Module) -> Optional[SizeRule]:
    """The :class:`SizeRule` of the closest class of ``module`` in the table, if any."""
    for cls in type(module).__mro__:
        rule = SIZE_ATTRIBUTES.get(cls) or SIZE_ATTRIBUTES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


#: Module class -> what to call on a module once its tensors hold new storage (after the surgery's
#: final copy, after :func:`graphprune.load`): a recurrent layer packs its weights into one cuDNN
#: buffer again (a no-op off CUDA; unpacked weights still run, copied on every call, with a warning).
RESIZED_HOOKS: dict = {nn.RNNBase: nn.RNNBase.flatten_parameters}


def after_resize(module: nn.Module) -> None:
    """Run the :data:`RESIZED_HOOKS` entry of the closest class of ``module``, if any."""
    for cls in type(module).__mro__:
        hook = RESIZED_HOOKS.get(cls)
        if hook is not None:
            hook(module)
            return


def size_attribute_names(module: nn.Module) -> tuple:
    """Every size and count attribute the table lists for ``module`` (empty if none)."""
    rule = size_rule(module)
    return () if rule is None else (*rule.sizes, *rule.counts)


def _tensor(module: nn.Module, path: str) -> Optional[torch.Tensor]:
    owner = module
    *parents, name = path.split(".")
    for parent in parents:
        owner = owner._modules.get(parent)
        if owner is None:
            return None
    tensor = owner._parameters.get(name, owner._buffers.get(name))
    if tensor is None and parametrize.is_parametrized(owner, name):  # computed on each call from its own tensors
        with torch.no_grad():
            tensor = getattr(owner, name)
    return tensor if isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.parameter.UninitializedTensorMixin) else None


def tensor_paths(follows: Follows) -> tuple:
    """The paths a :class:`Follows` may read, in order of preference."""
    return follows.tensor if isinstance(follows.tensor, tuple) else (follows.tensor,)


def _shape_of(module: nn.Module, follows: Follows, shapes: dict) -> Optional[tuple]:
    """The shape of the first of ``follows``' tensors that ``shapes`` or the module has."""
    for path in tensor_paths(follows):
        if path in shapes:
            return tuple(shapes[path])
        tensor = _tensor(module, path)
        if tensor is not None:
            return tuple(tensor.shape)
    return None


def derived_sizes(module: nn.Module, shapes: Optional[dict] = None, attrs: Optional[dict] = None) -> dict:
    """The value each size attribute of ``module`` must have for its tensors' shapes.

    ``shapes`` (tensor path -> shape) and ``attrs`` (attribute -> value) override the
    module's own, as for a file about to be loaded. A size whose tensor is absent (a norm
    without affine parameters) is left out; a division that leaves a remainder gives None.
    """
    rule = size_rule(module)
    if rule is None:
        return {}
    shapes, attrs = shapes or {}, attrs or {}

    def count(name: str) -> Any:
        return attrs[name] if name in attrs else getattr(module, name)

    derived = {}
    for attr, follows in rule.sizes.items():
        shape = _shape_of(module, follows, shapes)
        if shape is None:
            continue
        if follows.dim is None:
            derived[attr] = tuple(shape)
            continue
        if follows.dim >= len(shape):
            derived[attr] = None
            continue
        size = shape[follows.dim] * (count(follows.times) if follows.times else 1)
        per = count(follows.per) if follows.per else 1
        derived[attr] = size // per if per and size % per == 0 else None
    return derived


def size_problems(module: nn.Module, shapes: Optional[dict] = None, attrs: Optional[dict] = None) -> list:
    """Why ``module``'s size attributes (``attrs`` over its own) do not fit its tensors'
    ``shapes`` (over its own); empty when they fit."""
    attrs = attrs or {}
    rule = size_rule(module)
    if rule is None:
        return []

    def value(name: str) -> Any:
        return attrs[name] if name in attrs else getattr(module, name, None)

    problems = []
    for attr, expected in derived_sizes(module, shapes, attrs).items():
        actual = value(attr)
        if expected is None or (tuple(actual) if isinstance(actual, (list, tuple)) else actual) != expected:
            follows = rule.sizes[attr]
            problems.append(f"{attr}={actual!r} does not fit {' or '.join(tensor_paths(follows))} of shape "
                            f"{_shape_of(module, follows, shapes or {})}")
    for count, attr in rule.divides:
        n, size = value(count), value(attr)
        if isinstance(n, int) and isinstance(size, int) and (n < 1 or size % n):
            problems.append(f"{count}={n} does not divide {attr}={size}")
    return problems
