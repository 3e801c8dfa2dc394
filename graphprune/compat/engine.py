"""A layer-by-layer pruning engine compatible with an older, manual API.

:class:`PruningEngine` does not trace the model: the caller walks the layers and replaces
each one with the module the engine returns. A *main* layer (``set_layer(layer,
main_layer=True)``) is scored with a criterion from :mod:`criteria` and its lowest-ranked
filters are chosen for removal; the layers that follow it (its BatchNorm, the next
convolution or linear layer) are set without ``main_layer`` and reuse those indices::

    from graphprune import PruningEngine
    pruner = PruningEngine(pruning_method="L1norm", individual=True)
    pruner.set_pruning_ratio(0.1)
    pruner.set_layer(model.features[0], main_layer=True)
    sorted_idx = pruner.get_sorted_idx()["current_layer"]        # filters to remove
    model.features[0] = pruner.remove_filter_by_index(sorted_idx)
    pruner.set_layer(model.features[1])
    model.features[1] = pruner.remove_Bn(sorted_idx)
    pruner.set_layer(model.features[3])
    model.features[3] = pruner.remove_kernel_by_index(sorted_idx)

For models that torch.fx can trace, :func:`graphprune.prune` finds the coupled layers by
itself and is the better tool; this engine exists for code written against the old API.

Compared with the engine it replaces: the number removed is ``floor(ratio * n)`` and at
least one filter always survives; a Linear main layer is ranked by its output rows; Conv1d,
Conv2d, Conv3d (and their transposed forms and depthwise convolutions) are supported; the
returned modules stay on the layer's own device and dtype; an unknown method name raises
``ValueError``; errors are raised rather than printed.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import networkx as nx
import numpy as np
import torch
from torch import nn

from graphprune import criteria
from graphprune.analysis.groups import Group, Member
from graphprune.analysis.sizes import derived_sizes, size_problems
from graphprune.pruning.planner import floor_count, lowest_channels
from graphprune.analysis.report import Report
from graphprune.tracer.state import ModelTransaction
from graphprune.validation import check_fraction, check_model

#: Old method names and the :data:`graphprune.criteria.CRITERIA` key each one delegates to.
METHODS: dict = {
    "L1norm": "l1",
    "Taylor": "taylor",
    "K-L1norm": "k_l1",
    "K-Taylor": "k_taylor",
    "K-Distance": "k_distance",
}

# Keyword arguments of the old engine: renamed, or no longer needed.
_RENAMED = {"taylor_loader": "data_loader"}
_OBSOLETE = ("total_layer", "total_sample_size", "hook_function", "layer_store_private_variable")

Indices = Union[torch.Tensor, np.ndarray, Sequence[int], None]


@contextmanager
def _sizes_follow(layer: nn.Module) -> Iterator[None]:
    """Change ``layer``'s tensors in the block, then set its size attributes from their new
    shapes (:mod:`graphprune.analysis.sizes`); on any exception, KeyboardInterrupt included, the
    layer is put back as it was."""
    with ModelTransaction(layer):
        yield
        for attr, value in derived_sizes(layer).items():
            if value is None:
                raise ValueError(f"{type(layer).__name__}: {'; '.join(size_problems(layer))}")
            setattr(layer, attr, value)


def removal_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)`` capped at ``n - 1``: at least one filter always survives."""
    return max(0, min(floor_count(ratio, n), n - 1))


def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _out_dim(layer: nn.Module) -> int:
    """The weight dimension that holds the layer's output filters."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return 1 if layer.transposed and layer.groups == 1 else 0
    return 0


class PruningEngine:
    """Layer-level pruning with the old ``set_layer`` / ``get_sorted_idx`` / ``remove_*`` API.

    ``pruning_method`` is one of :data:`METHODS` (``"L1norm"``, ``"Taylor"``, ``"K-L1norm"``,
    ``"K-Taylor"``, ``"K-Distance"``); scoring delegates to the matching criterion of
    :data:`graphprune.criteria.CRITERIA`, applied to a one-member group holding just the main layer's
    filters (so "L1norm" ranks filters by the L1 norm of their own weights).

    ``individual=True`` forgets the previous main layer whenever a new one is set; with
    ``individual=False`` ``get_sorted_idx()["previous_layer"]`` keeps the removal indices of
    the main layer before, which :meth:`remove_conv_filter_kernel` uses for the input side.

    ``model`` is required by the data-driven methods ("Taylor", "K-Taylor"): the main layer
    must be one of its submodules, and ``criterion_kwargs`` must give ``data_loader`` (the
    old ``taylor_loader`` and ``tool_net`` are accepted as aliases of ``data_loader`` and
    ``model``). Every other keyword goes to the criterion's constructor, e.g.
    ``loss_fn``, ``max_batches``, ``device``, ``progress`` for Taylor, ``k`` or ``seed`` for
    the K-means methods. ``list_k`` (old API) gives the K-means ``k`` of each successive
    main layer.
    """

    def __init__(
        self,
        pruning_method: str,
        pruning_ratio: float = 0.0,
        individual: bool = False,
        *,
        model: Optional[nn.Module] = None,
        list_k: Optional[Sequence[Optional[int]]] = None,
        **criterion_kwargs: Any,
    ):
        if not isinstance(pruning_method, str) or pruning_method not in METHODS:
            raise ValueError(f"unknown pruning_method {pruning_method!r}; choose one of {list(METHODS)}")
        if "tool_net" in criterion_kwargs:
            tool_net = criterion_kwargs.pop("tool_net")
            model = model if model is not None else tool_net
        for old, new in _RENAMED.items():
            if old in criterion_kwargs:
                if new in criterion_kwargs:
                    raise TypeError(f"give {new}= or its old name {old}=, not both")
                criterion_kwargs[new] = criterion_kwargs.pop(old)
        obsolete = [k for k in _OBSOLETE if k in criterion_kwargs]
        if obsolete:
            warnings.warn(f"PruningEngine ignores the old arguments {obsolete}; they are no longer needed", DeprecationWarning, stacklevel=2)
            for key in obsolete:
                criterion_kwargs.pop(key)
        if model is not None:
            check_model(model)

        key = METHODS[pruning_method]
        cls = criteria.CRITERIA.get(key)
        if cls is None:
            raise NotImplementedError(
                f"pruning_method {pruning_method!r} needs the {key!r} criterion, which this version of "
                f"criteria does not provide (available: {sorted(criteria.CRITERIA)})"
            )
        if list_k is not None:
            if key not in ("k_l1", "k_taylor", "k_distance"):
                raise TypeError(f"list_k only applies to the K-means methods, not {pruning_method!r}")
            if "k" in criterion_kwargs:
                raise TypeError("give k= or list_k=, not both")
            criterion_kwargs["k"] = {i: k for i, k in enumerate(list_k)}
        if cls.requires_data:
            if model is None:
                raise ValueError(f"pruning_method {pruning_method!r} needs data: pass model=... and data_loader=...")
            if "data_loader" not in criterion_kwargs:
                raise ValueError(f"pruning_method {pruning_method!r} needs data_loader=... (batches of (inputs, targets))")
        try:
            self.criterion: criteria.Criterion = cls(**criterion_kwargs)
        except TypeError as exc:
            raise TypeError(f"cannot build the {key!r} criterion for {pruning_method!r} from {sorted(criterion_kwargs)}: {exc}") from exc

        self.pruning_method = pruning_method
        self.pruning_ratio = check_fraction(pruning_ratio, "pruning ratio", high_open=False)
        self.individual = bool(individual)
        self.model = model
        self.sorted_idx_history: dict = {"previous_layer": None, "current_layer": None}
        self._layer: Optional[nn.Module] = None
        self._working: Optional[nn.Module] = None
        self._main_size: Optional[int] = None
        self._main_count = 0

    def __repr__(self) -> str:
        return f"PruningEngine(pruning_method={self.pruning_method!r}, pruning_ratio={self.pruning_ratio}, individual={self.individual})"

    # ----------------------------------------------------------------- choosing
    def set_pruning_ratio(self, pruning_ratio: float) -> None:
        """Fraction of the next main layer's filters to remove (``floor(ratio * n)``, at most ``n - 1``)."""
        self.pruning_ratio = check_fraction(pruning_ratio, "pruning ratio", high_open=False)

    def set_layer(self, layer: nn.Module, main_layer: bool = False) -> bool:
        """Make ``layer`` the one the next ``remove_*`` call edits.

        With ``main_layer=True`` its output filters are scored and the lowest-ranked
        ``floor(ratio * n)`` become ``get_sorted_idx()["current_layer"]``; otherwise the
        indices of the last main layer are kept for this (following) layer. Returns True.
        """
        check_model(layer, "layer")
        if main_layer:
            removed = self._choose(layer)
            previous = None if self.individual else self.sorted_idx_history["current_layer"]
            self.sorted_idx_history = {"previous_layer": previous, "current_layer": removed}
        self._layer = layer
        self._working = None
        return True

    def get_sorted_idx(self) -> dict:
        """``{"current_layer": ..., "previous_layer": ...}``: the filters to remove from the last main
        layer (a LongTensor, least important first) and from the main layer before it (None when
        ``individual`` or at the first main layer)."""
        return dict(self.sorted_idx_history)

    get_remove_filter_idx = get_sorted_idx  # name used by later versions of the old engine

    def _choose(self, layer: nn.Module) -> torch.Tensor:
        if isinstance(layer, nn.modules.conv._ConvNd):
            if layer.groups > 1 and not _is_depthwise(layer):
                raise ValueError(
                    f"cannot rank the filters of {layer}: a grouped convolution loses whole groups, "
                    "not single filters; use graphprune.prune for it"
                )
        elif not isinstance(layer, nn.Linear):
            raise TypeError(f"a main layer must be a Conv1d/2d/3d (or transposed) or a Linear, got {type(layer).__name__}")
        weight = layer.weight
        dim = _out_dim(layer)
        n = weight.shape[dim]
        gid = self._main_count
        self._main_count += 1
        name = self._layer_name(layer)
        member = Member(module=name, param="weight", dim=dim, index_map=np.arange(n), role="out", tensor=weight)
        group = Group(id=gid, size=n, members=[member], blocked=[], notes=[], units=np.arange(n))
        self.criterion.prepare(self.model, self._layer_report(layer, name, group))
        scores = np.asarray(self.criterion.scores(group), dtype=np.float64)
        if scores.shape != (n,):
            raise ValueError(f"{self.criterion!r} returned {scores.shape} scores for {n} filters")
        chosen = lowest_channels(group, scores, removal_count(self.pruning_ratio, n))
        chosen = chosen[np.argsort(scores[chosen], kind="stable")]
        self._main_size = n
        return torch.as_tensor(chosen, dtype=torch.long)

    def _layer_name(self, layer: nn.Module) -> str:
        if self.model is None:
            return ""
        for name, module in self.model.named_modules():
            if module is layer:
                return name
        if self.criterion.requires_data:
            raise ValueError(f"the main layer ({type(layer).__name__}) is not a submodule of the engine's model")
        return ""

    def _layer_report(self, layer: nn.Module, name: str, group: Group) -> Report:
        """A report with the one group and a one-node graph whose output carries its channels
        on dim 1 (what data-driven criteria hook)."""
        graph = nx.DiGraph(model=self.model)
        rank = len(layer.kernel_size) + 2 if isinstance(layer, nn.modules.conv._ConvNd) else 2
        channels = tuple((group.id, np.arange(group.size)) if d == 1 else None for d in range(rank))
        graph.add_node(name or "layer", op="call_module", target=name, module=name, part="", index=0, channels=channels)
        return Report(type(self.model).__name__ if self.model is not None else type(layer).__name__, [group], graph, "layer-level engine")

    # ----------------------------------------------------------------- removing
    def _target(self) -> nn.Module:
        if self._layer is None:
            raise RuntimeError("call set_layer(layer) before a remove_* method")
        if self._working is None:
            self._working = copy.deepcopy(self._layer)
        return self._working

    @staticmethod
    def _indices(indices: Indices, n: int, what: str) -> np.ndarray:
        if indices is None:
            raise ValueError(f"no {what} indices: set a main layer first (set_layer(layer, main_layer=True))")
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        index = np.asarray(indices).ravel()
        if index.size and not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"{what} indices must be integers, got {index.dtype}")
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"{what} indices must lie in [0, {n}); got {index.min()}..{index.max()}")
        if np.unique(index).size != index.size:
            raise ValueError(f"{what} indices contain duplicates")
        if index.size >= n:
            raise ValueError(f"cannot remove all {n} {what}s: at least one must remain")
        return index

    @staticmethod
    def _shrink(module: nn.Module, names: Sequence[str], dim: int, remove: np.ndarray) -> int:
        """Drop positions ``remove`` along ``dim`` of each named parameter/buffer; return the new size."""
        size = None
        for name in names:
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            keep = np.setdiff1d(np.arange(tensor.shape[dim]), remove)
            index = torch.as_tensor(keep, dtype=torch.long, device=tensor.device)
            with torch.no_grad():
                data = tensor.detach().index_select(dim, index).clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(data, requires_grad=tensor.requires_grad))
            else:
                setattr(module, name, data)
            size = data.shape[dim]
        return size

    def remove_filter_by_index(self, sorted_idx: Indices, linear: bool = False, group: bool = False) -> nn.Module:
        """The set layer without the output filters ``sorted_idx`` (conv filters or Linear rows).

        A depthwise convolution (``groups == in_channels == out_channels``; ``group=True`` in the
        old API) loses the matching input channels and groups too. ``linear`` is accepted for
        compatibility; the layer's type decides.
        """
        layer = self._target()
        if isinstance(layer, nn.modules.conv._ConvNd):
            depthwise = _is_depthwise(layer)
            if layer.groups > 1 and not depthwise:
                raise ValueError(f"cannot remove single filters from a grouped convolution ({layer}); use graphprune.prune")
            if group and not depthwise:
                raise ValueError(f"group=True expects a depthwise convolution, got {layer}")
            dim = _out_dim(layer)
            index = self._indices(sorted_idx, layer.weight.shape[dim], "filter")
            with _sizes_follow(layer):
                n = self._shrink(layer, ["weight"], dim, index)
                self._shrink(layer, ["bias"], 0, index)
                if depthwise:
                    layer.groups = n
        elif isinstance(layer, nn.Linear):
            index = self._indices(sorted_idx, layer.out_features, "output feature")
            with _sizes_follow(layer):
                self._shrink(layer, ["weight", "bias"], 0, index)
        else:
            raise TypeError(f"remove_filter_by_index needs a convolution or Linear layer, got {type(layer).__name__}")
        return layer

    def remove_kernel_by_index(self, sorted_idx: Indices, linear: bool = False) -> nn.Module:
        """The set layer without the input channels ``sorted_idx`` (conv kernels or Linear columns).

        For a Linear layer after a flatten, whose ``in_features`` is ``k`` times the channel
        count of the last main layer, channel ``c`` removes columns ``c*k .. c*k + k - 1``
        (NCHW flatten order). A depthwise convolution loses filters and groups as well.
        ``linear`` is accepted for compatibility; the layer's type decides.
        """
        layer = self._target()
        if isinstance(layer, nn.modules.conv._ConvNd):
            if _is_depthwise(layer):
                return self.remove_filter_by_index(sorted_idx)
            if layer.groups > 1:
                raise ValueError(f"cannot remove single input channels from a grouped convolution ({layer}); use graphprune.prune")
            dim = 0 if layer.transposed else 1
            index = self._indices(sorted_idx, layer.weight.shape[dim], "input channel")
            with _sizes_follow(layer):
                self._shrink(layer, ["weight"], dim, index)
        elif isinstance(layer, nn.Linear):
            n_in = layer.in_features
            channels = self._main_size if self._main_size and n_in % self._main_size == 0 else n_in
            index = self._indices(sorted_idx, channels, "input channel")
            per = n_in // channels
            columns = (index[:, None] * per + np.arange(per)).ravel()
            with _sizes_follow(layer):
                self._shrink(layer, ["weight"], 1, columns)
        else:
            raise TypeError(f"remove_kernel_by_index needs a convolution or Linear layer, got {type(layer).__name__}")
        return layer

    def remove_Bn(self, sorted_idx: Indices) -> nn.Module:  # noqa: N802 - the old API's name
        """The set BatchNorm (or InstanceNorm) layer without the features ``sorted_idx``."""
        layer = self._target()
        if not isinstance(layer, nn.modules.batchnorm._NormBase):
            raise TypeError(f"remove_Bn needs a BatchNorm or InstanceNorm layer, got {type(layer).__name__}")
        index = self._indices(sorted_idx, layer.num_features, "feature")
        with _sizes_follow(layer):
            n = self._shrink(layer, ["weight", "bias", "running_mean", "running_var"], 0, index)
            if n is None:  # no tensor to read the count off
                layer.num_features -= index.size
        return layer

    def remove_conv_filter_kernel(self) -> nn.Module:
        """The set layer without the current main layer's filters (outputs) and the previous main
        layer's filters (inputs, when ``individual=False`` and there was one)."""
        history = self.sorted_idx_history
        layer = self.remove_filter_by_index(history["current_layer"])
        if history["previous_layer"] is not None and not (isinstance(layer, nn.modules.conv._ConvNd) and _is_depthwise(layer)):
            layer = self.remove_kernel_by_index(history["previous_layer"])
        return layer


__all__ = ["PruningEngine", "METHODS", "removal_count"]
