"""The config of a model built from one (Hugging Face's ``model.config``), made to describe the
pruned model.

Which sizes a config field sets, and how, is read off the model class itself rather than
written per architecture: the class is rebuilt on the meta device (no memory, milliseconds)
from the config with one int field (or one int of a list field, as a stage's width in
``hidden_sizes``) doubled, and every tensor dimension and module attribute that moves follows
that field, in proportion, offset or inversely (``head_dim = hidden / heads``).
After pruning, each such size implies a value of its field; the combinations of implied
values are rebuilt in turn, and the one whose model has the pruned model's every tensor shape,
every attribute the pruning changed and every attribute its modules' methods read is the new
config. Module attributes that only ``__init__`` reads, which no rule follows (LlamaMLP's
``intermediate_size``), then take the value the new config gives them, as ``from_pretrained``
would.

When no combination fits, the config cannot describe the pruned model (layers pruned
unequally, or a config that ties sizes the pruning separated, such as BERT's attention width
and hidden width); it is left as it was and :func:`describe_pruned` says why.
"""
from __future__ import annotations

import collections
import copy
import itertools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from graphprune.analysis.sizes import read_after_init

_MAX_TRIALS = 256  # combinations of implied field values rebuilt at most


class ConfigMismatch(Exception):
    """The pruned sizes leave no config that rebuilds the model (``prune(..., fit_config=True)``
    then blocks the groups behind it); the message says why."""


class ConfigWarning(UserWarning):
    """The pruned model's config no longer describes it (see :mod:`graphprune.pruning.model_config`)."""


@dataclass
class ConfigUpdate:
    """What :func:`describe_pruned` found: ``fields`` to set on the config (empty when it
    already fits), ``attributes`` as ``{(module name, attribute): value}`` to set on modules,
    or ``problem``, why no config fits (None when one does)."""

    fields: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    problem: Optional[str] = None

    def apply(self, model: nn.Module) -> None:
        """Set the fields on ``model.config`` and the attributes on its modules."""
        for name, value in self.fields.items():
            setattr(model.config, name, value)
        for (module, attr), value in self.attributes.items():
            setattr(model.get_submodule(module), attr, value)


def builds_from_config(model: nn.Module) -> bool:
    """Whether ``model`` has a config object (``model.config`` with ``to_dict``) to keep true."""
    return callable(getattr(getattr(model, "config", None), "to_dict", None))


def _construct(model_class: type, config: Any, placement: Any) -> nn.Module:
    """``model_class(config)`` inside ``placement`` (the meta device, or
    :func:`_parameters_on_meta`), its warnings silenced."""
    with warnings.catch_warnings(), placement:
        warnings.simplefilter("ignore")
        return model_class(config)


def _rebuild(model_class: type, config: Any, values: dict) -> tuple:
    """``(config with {(field, index): value} set, model_class(that config) on the meta device)``,
    or ``(None, None)`` when the config or the class refuses the values."""
    try:
        varied = _varied(config, values)
        return varied, _construct(model_class, varied, torch.device("meta"))
    except Exception:  # noqa: BLE001 - values a config or class refuses are simply not a candidate
        return None, None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device (no memory, no initialisation) and
    every buffer real, as ``accelerate``'s ``init_empty_weights`` does: a buffer computed from the
    config (rotary frequencies, an embedding scale) is not saved, so ``from_pretrained``
    computes it again, and it must hold the pruned model's values. ``nn.Module.register_parameter``
    is replaced meanwhile (in every thread)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, parameter: Optional[nn.Parameter]) -> None:
        if parameter is not None and parameter.device.type != "meta":
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _recomputed_buffers(model: nn.Module, model_class: type, config: Any) -> list:
    """How the buffers ``model_class(config)`` computes and does not save (non-persistent ones)
    differ in value from ``model``'s; empty when they agree."""
    try:
        rebuilt = _construct(model_class, config, _parameters_on_meta())
    except Exception as exc:  # noqa: BLE001 - then it cannot be rebuilt from this config
        return [f"{model_class.__name__}(config) fails: {type(exc).__name__}: {exc}"]
    own = dict(model.named_buffers())
    if any(b.is_meta for b in own.values()):  # no values: an unpruned buffer holds what model.config computes
        own = _meta_buffer_values(model, own)
    problems = []
    for prefix, module in rebuilt.named_modules():
        for name in module._non_persistent_buffers_set:
            key, value = f"{prefix}.{name}".lstrip("."), module._buffers.get(name)
            mine = own.get(key)
            if value is None or mine is None or value.shape != mine.shape:
                continue
            if mine.is_meta:
                problems.append(f"{key}, computed from the config and not saved, was pruned on the meta device, "
                                "where its values cannot be checked")
            elif not torch.equal(value.to(mine.device, mine.dtype), mine):
                problems.append(f"{key}, computed from the config and not saved, would hold other values")
    return problems


def _meta_buffer_values(model: nn.Module, own: dict) -> dict:
    """``own`` (``model``'s buffers, some on the meta device) with each meta buffer that keeps
    its shape replaced by the value ``model.config`` computes for it: a model built on meta
    from its config holds those values. A pruned one stays on meta."""
    computed = config_buffers(model)
    return {key: computed[key] if b.is_meta and key in computed and computed[key].shape == b.shape else b
            for key, b in own.items()}


def config_buffers(model: nn.Module) -> dict:
    """``{name: value}`` of the buffers ``type(model)(model.config)`` computes (rotary
    frequencies, position ids), built with its parameters on the meta device: the values of
    a model on meta, which holds none, as its config gives them. Empty if it cannot be built."""
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(floating[0] if floating else previous)  # as from_pretrained builds it
        return dict(_construct(type(model), model.config, _parameters_on_meta()).named_buffers())
    except Exception:  # noqa: BLE001 - then no value is known
        return {}
    finally:
        torch.set_default_dtype(previous)


def _refusal(config: Any) -> Optional[str]:
    """Why ``config``'s own ``validate()`` (run by ``save_pretrained``) refuses it; None if it
    accepts it or has none."""
    validate = getattr(config, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception as exc:  # noqa: BLE001 - its reason is the answer
        cause = exc.__cause__ or exc
        return f"{type(cause).__name__}: {cause}"
    return None


class _Sizes(NamedTuple):
    """A model's shapes (``{(tensor name, dim): size}``) and its int and float attributes
    (``{(module name, attribute): value}``), read once."""

    shapes: dict
    attributes: dict

    @classmethod
    def of(cls, model: nn.Module) -> "_Sizes":
        return cls(_shapes(model), _attributes(model))

    def merged(self) -> dict:
        return {**self.shapes, **self.attributes}


def _attributes(model: nn.Module) -> dict:
    """``{(module name, attribute): value}`` for every public int or float attribute."""
    found = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if type(value) in (int, float) and not attr.startswith("_"):
                found[(name, attr)] = value
    return found


def _shapes(model: nn.Module) -> dict:
    """``{(tensor name, dim): size}`` for every parameter and buffer."""
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {(name, dim): size for name, tensor in tensors for dim, size in enumerate(tensor.shape)}


def _implied(value: int, doubled: int, base: float, moved: float, pruned: float) -> Optional[int]:
    """The field value that gives a size ``pruned``, where it gives ``base`` at ``value`` and
    ``moved`` at ``doubled``: a linear size (``a * value + b``) or an inverse one (``a / value``)."""
    if pruned == base or not all(isinstance(x, int) for x in (base, moved, pruned)):
        return None
    slope, rest = divmod(moved - base, doubled - value)
    if slope and not rest and (pruned - base) % slope == 0:
        implied = value + (pruned - base) // slope
        return implied if implied > 0 else None
    if base * value == moved * doubled and pruned and (base * value) % pruned == 0:
        return base * value // pruned
    return None


def _size_fields(config: Any) -> dict:
    """``{(field, index): value}`` for every positive int field of ``config``, and every int
    of a list field (a stage's width in ``hidden_sizes``), index None for a plain int."""
    found = {}
    for name, value in config.to_dict().items():
        if getattr(config, name, None) != value:
            continue
        items = [(None, value)] if type(value) is int else enumerate(value) if isinstance(value, list) else ()
        found.update({(name, i): v for i, v in items if type(v) is int and v >= 1})
    return found


def _varied(config: Any, values: dict) -> Any:
    """A copy of ``config`` with ``{(field, index): value}`` set."""
    varied = copy.deepcopy(config)
    for (name, index), value in values.items():
        if index is None:
            setattr(varied, name, value)
        else:
            items = list(getattr(varied, name))
            items[index] = value
            setattr(varied, name, items)
    return varied


def _candidates(model_class: type, config: Any, base: dict, pruned: dict) -> tuple:
    """``({(field, index): values}, why no values fit or None)``: the values each size field of
    ``config`` may take, those implied by the most sizes that no other field moves first (on a
    tie its own value first), so that the combination that fits is among the first rebuilt.
    No values fit where a tensor's size changed that no field moves, or where the tensor sizes
    only one field moves ask for different values of it (layers pruned unequally)."""
    moves = {}
    for key, value in _size_fields(config).items():
        rebuilt = _rebuild(model_class, config, {key: 2 * value})[1]
        moved = {} if rebuilt is None else _Sizes.of(rebuilt).merged()
        moves[key] = value, {k: moved[k] for k in base.keys() & moved.keys() & pruned.keys() if moved[k] != base[k]}
    movers = collections.Counter(k for _, changed in moves.values() for k in changed)
    unmoved = sorted((k for k in base.keys() & pruned.keys() if _is_dim(k) and pruned[k] != base[k] and not movers[k]),
                     key=str)
    if unmoved:
        return {}, f"{unmoved[0][0]} has {pruned[unmoved[0]]} along dim {unmoved[0][1]}, which no field of the config sets"
    candidates = {}
    for key, (value, changed) in moves.items():
        implied = {k: _implied(value, 2 * value, base[k], size, pruned[k]) for k, size in changed.items()}
        # the value each size only this field moves asks of it
        asks = {k: value if pruned[k] == base[k] else implied[k] for k in changed if movers[k] == 1}
        votes = collections.Counter(asks.values())
        asked = sorted({v for k, v in asks.items() if _is_dim(k)} - {None})  # tensor sizes must all agree
        if len(asked) > 1:
            return {}, f"{key[0]} would have to be {asked[0]} and {asked[1]} at once (the sizes it sets differ)"
        values = [value, *sorted(set(implied.values()) - {None, value})]
        candidates[key] = sorted(values, key=lambda v: -votes[v])  # stable: its own value first on a tie
    return candidates, None


def _is_dim(key: tuple) -> bool:
    """Whether a key of :meth:`_Sizes.merged` is a tensor's dim (which every rebuilt model must
    match), not a module's attribute."""
    return isinstance(key[1], int)


def _mismatches(model: nn.Module, pruned: _Sizes, rebuilt: nn.Module, base_attributes: dict) -> tuple:
    """``(how the rebuilt model differs from the pruned ``model`` (of sizes ``pruned``), attributes to set)``.

    Every shape must agree, and every float attribute (a scale), every attribute the pruning
    changed and every one a method reads; the int attributes only ``__init__`` reads are to take
    the rebuilt value."""
    (shapes, attributes), (rebuilt_shapes, rebuilt_attributes) = pruned, _Sizes.of(rebuilt)
    problems = [f"{key[0]} would have {rebuilt_shapes[key]} along dim {key[1]}, not {shapes[key]}"
                for key in sorted(shapes.keys() & rebuilt_shapes.keys()) if shapes[key] != rebuilt_shapes[key]]
    stale = {}
    for key in sorted(attributes.keys() & rebuilt_attributes.keys()):
        value, wanted = attributes[key], rebuilt_attributes[key]
        if value == wanted:
            continue
        if type(value) is float or value != base_attributes.get(key) or read_after_init(model.get_submodule(key[0]), [key[1]]):
            problems.append(f"{key[0] or type(model).__name__}.{key[1]} would be {wanted!r}, not {value!r}")
        else:
            stale[key] = wanted
    return problems, stale


def describe_pruned(model: nn.Module) -> ConfigUpdate:
    """The :class:`ConfigUpdate` that makes ``model.config`` describe the pruned ``model``
    (see the module docstring); ``model`` is not changed."""
    model_class, config = type(model), model.config
    original = _rebuild(model_class, config, {})[1]
    if original is None:
        return ConfigUpdate(problem=f"{model_class.__name__} cannot be rebuilt from its config on the meta device")
    base, pruned = _Sizes.of(original), _Sizes.of(model)
    candidates, unfit = _candidates(model_class, config, base.merged(), pruned.merged())
    if unfit is not None:
        return ConfigUpdate(problem=unfit)
    choices = [[(name, v) for v in values] for name, values in candidates.items() if len(values) > 1]
    closest = None
    for combination in itertools.islice(itertools.product(*choices), _MAX_TRIALS):
        varied, rebuilt = _rebuild(model_class, config, dict(combination))
        if rebuilt is None:
            continue
        problems, stale = _mismatches(model, pruned, rebuilt, base.attributes)
        fields = {name: getattr(varied, name) for (name, _), _ in combination if getattr(varied, name) != getattr(config, name)}
        if not problems:
            refusal = _refusal(varied)
            problems = [f"{type(config).__name__} refuses it: {refusal}"] if refusal else \
                _recomputed_buffers(model, model_class, varied)
            if not problems:
                return ConfigUpdate(fields, stale)
        if closest is None or len(problems) < len(closest[1]):
            closest = fields, problems
    if closest is None:
        return ConfigUpdate(problem="no value of its fields builds a model")
    fields, problems = closest
    setting = ", ".join(f"{k}={v}" for k, v in fields.items()) or "the config as it is"
    more = f" (and {len(problems) - 1} more sizes)" if len(problems) > 1 else ""
    return ConfigUpdate(problem=f"with {setting}, {problems[0]}{more}")
