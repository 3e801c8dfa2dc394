"""Capture a model's forward as a torch.fx graph that refers to the user's own modules."""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from .state import interrupts_deferred

LeafSpec = Union[str, type, nn.Module, Callable[[nn.Module, str], bool]]

_TORCH_DIR = os.path.dirname(torch.__file__)


class TraceError(RuntimeError):
    """torch.fx could not capture the model; the message names where and what to do."""

    def __init__(self, message: str, module_name: Optional[str] = None, location: Optional[str] = None,
                 node_name: Optional[str] = None):
        super().__init__(message)
        self.module_name = module_name
        self.location = location
        self.node_name = node_name  # the traced node that failed, when the graph was captured


def forward_hooks(module: nn.Module) -> list:
    """Names of the forward and forward-pre hooks that run when ``module`` is called: its own
    and those registered for every module (empty if none)."""
    from torch.nn.modules import module as registry

    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values(),
             *getattr(registry, "_global_forward_pre_hooks", {}).values(),
             *getattr(registry, "_global_forward_hooks", {}).values()]
    return [getattr(h, "__qualname__", None) or type(h).__name__ for h in hooks]


def torch_nn_module(m: nn.Module, qualified_name: str = "") -> bool:
    """torch.fx's own choice of leaves: torch.nn's modules, but Sequential."""
    return type(m).__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)


#: The leaves when the caller names none: torch.fx's own. graphprune's analysis names its own
#: (the user's and those the rule table reads), so any other torch.nn module is traced into.
DEFAULT_LEAVES: tuple = (torch_nn_module,)


class LeafTest:
    """Whether a module is one of ``leaf_modules`` (names, classes, instances or predicates)."""

    def __init__(self, leaf_modules: Iterable[LeafSpec]):
        leaves = list(leaf_modules)
        self._types = tuple(x for x in leaves if isinstance(x, type))
        self._names = {x for x in leaves if isinstance(x, str)}
        self._ids = {id(x) for x in leaves if isinstance(x, nn.Module)}
        self._tests = [x for x in leaves if callable(x) and not isinstance(x, (type, nn.Module))]

    def __call__(self, m: nn.Module, qualified_name: str) -> bool:
        return (
            qualified_name in self._names
            or id(m) in self._ids
            or bool(self._types and isinstance(m, self._types))
            or any(test(m, qualified_name) for test in self._tests)
        )


@contextmanager
def reference_paths() -> Iterator[None]:
    """While tracing, torch.nn's attention and transformer layers take their reference path.
    The fused fast path they may choose at run time (``torch.backends.mha``) computes the same,
    but the choice is a check of values torch.fx cannot trace (``src.dim() == 3``, ...).
    (torch.export takes the reference path by itself: its fake tensors rule the fast path out.)"""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class _LeafAwareTracer(fx.Tracer):
    """fx tracer that keeps user-chosen modules as leaves and remembers where tracing failed.

    Every other module is traced into, torch.nn's own too unless the leaves name them
    (:data:`DEFAULT_LEAVES` do): a leaf is opaque, so graphprune's analysis names only the
    modules a rule reads and the user's. A module whose forward cannot be traced raises, and
    is made opaque by :mod:`graphprune.tracer.fallback`, which may then try torch.export.
    Buffers are read through ``get_attr`` nodes like parameters (not folded into constants),
    and a module with forward hooks is a leaf, so that its hooks run when the graph is run.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[LeafSpec]):
        super().__init__()
        self._is_leaf = LeafTest(leaf_modules)
        self.failed_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(forward_hooks(m)) or self._is_leaf(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame that lies outside torch itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    return frames[-1] if frames else None


def check_leaf_names(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> None:
    """Raise ``ValueError`` for leaf names that are not submodules of ``model``."""
    names = {name for name, _ in model.named_modules()}
    unknown = [x for x in leaf_modules if isinstance(x, str) and x not in names]
    if unknown:
        raise ValueError(f"leaf_modules names {unknown} are not submodules of {type(model).__name__}")
    bad = [x for x in leaf_modules if not (isinstance(x, (str, type, nn.Module)) or callable(x))]
    if bad:
        raise TypeError(f"leaf_modules entries must be module names, classes, modules or predicates; got {bad!r}")


def _proxies(value: Any, seen: set) -> Iterator[fx.Proxy]:
    """Every fx Proxy in ``value`` and in the dicts, lists, tuples and plain objects inside it."""
    if isinstance(value, fx.Proxy):
        yield value
    elif id(value) in seen or isinstance(value, (nn.Module, torch.Tensor, type)) or callable(value):
        return
    elif isinstance(value, (dict, list, tuple, set)):
        seen.add(id(value))
        for item in value.values() if isinstance(value, dict) else value:
            yield from _proxies(item, seen)
    elif hasattr(value, "__dict__"):  # a namespace or config object holding values
        seen.add(id(value))
        yield from _proxies(vars(value), seen)


def _mark_stored_values(model: nn.Module) -> None:
    """Mark each traced value that the forward stored on a module (``self.aux = x``, or in a
    dict or list held by a module): ``node.meta["stored_as"]`` is where. Such a value is
    an output that the graph's own output does not show."""
    seen: set = set()
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            for proxy in _proxies(value, seen):
                proxy.node.meta.setdefault("stored_as", f"{name}.{key}" if name else key)


def capture(model: nn.Module, leaf_modules: Iterable[LeafSpec] = DEFAULT_LEAVES) -> fx.Graph:
    """Symbolically trace ``model`` into an fx Graph whose module and attribute targets are
    qualified names in ``model`` itself (run it with ``fx.Interpreter(model, graph=...)``),
    tracing into every module but ``leaf_modules`` and those with forward hooks.

    What the trace leaves on the model (values stored by the forward, constants torch.fx
    attaches to it) stays until the caller restores it (:func:`graphprune.tracer.trace` does).
    """
    leaf_modules = list(leaf_modules)
    check_leaf_names(model, leaf_modules)
    tracer = _LeafAwareTracer(leaf_modules)
    try:
        with interrupts_deferred(), reference_paths():  # an interrupt inside fx's patching would leave nn.Module patched
            graph = tracer.trace(model)
        _mark_stored_values(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable as written"
        frame = _user_frame(exc)
        where = f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else "unknown line"
        module = tracer.failed_module
        owner = f"in module '{module}' ({type(model.get_submodule(module)).__name__})" if module else "in the model's own forward"
        hint = (
            f"Pass leaf_modules=['{module}'] to treat it as an opaque layer (its channels are then blocked), "
            "or make that forward traceable by torch.fx."
            if module
            else "Make that line traceable by torch.fx (no Python control flow on tensor values or shapes), "
            "or mark the offending submodules with leaf_modules=[...]."
        )
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} {owner}, at {where}: "
            f"{type(exc).__name__}: {exc}. {hint}",
            module_name=module,
            location=where,
        ) from exc
    return graph
