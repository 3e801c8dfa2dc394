"""First-order Taylor importance from activations and gradients (Molchanov et al., CVPR 2019)."""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphprune.tracer.devices import (
    LoaderBatch,
    check_max_batches,
    model_device,
    same_device,
)
from graphprune.tracer.state import eval_mode

from .base import Criterion, combine
from .magnitude import L1


def _is_dim_entry(entry: Any) -> bool:
    return isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], np.ndarray)


def activation_sites(report) -> dict:
    """For every group, the module calls whose output tensor carries its channels.

    Returns ``{group id: [(module name, call index, dim, index_map), ...]}`` where ``call
    index`` counts the calls of that module in graph order (a module may be called more
    than once) and ``dim`` (never the batch dim 0) is the output dim holding the channels.
    For each group the sites are, by preference: the outputs of its normalisation layers
    (members with role ``"scale"``), else of its producer layers (role ``"out"``), else of
    every module whose output carries the group. torch.export records no module calls: there
    a call's output is the node of a module without children whose users are all outside it.
    """
    graph = report.graph
    calls: dict = defaultdict(int)
    found: dict = defaultdict(list)
    for key, attrs in sorted(graph.nodes(data=True), key=lambda item: item[1]["index"]):
        if not (attrs["op"] == "call_module" or _leaf_call_output(report, key, attrs)):
            continue
        name = attrs["module"]  # qualified (``target`` is relative inside a per-child part)
        index = calls[name]
        calls[name] += 1
        channels = attrs.get("channels")
        if not isinstance(channels, tuple) or not all(e is None or _is_dim_entry(e) for e in channels):
            continue  # no tensor output, or several outputs
        for dim, entry in enumerate(channels):
            if dim > 0 and entry is not None:
                found[int(entry[0])].append((name, index, dim, np.asarray(entry[1], dtype=np.int64)))
    sites = {}
    for group in report.groups:
        candidates = found.get(group.id, [])
        for role in ("scale", "out"):
            modules = {m.module for m in group.members if m.role == role}
            preferred = [s for s in candidates if s[0] in modules]
            if preferred:
                candidates = preferred
                break
        if candidates:
            sites[group.id] = candidates
    return sites






def _leaf_call_output(report, key: str, attrs: dict) -> bool:
    """Whether the node ``key`` of a torch.export graph is the output of a call of a module
    without children (a Linear, a norm): its users all lie outside that module."""
    name = attrs.get("module")
    if attrs.get("front_end") != "export" or attrs["op"] != "call_function" or not name:
        return False
    if next(report.session.model.get_submodule(name).children(), None) is not None:
        return False
    return all(report.graph.nodes[user]["module"] != name for user in report.graph.successors(key))


class Taylor(Criterion):
    """First-order Taylor importance of each channel's activation.

    For every sample ``n`` and channel ``c`` of an activation ``a`` with gradient ``g =
    dL/da``, the importance is ``|sum over the other (spatial) dims of a * g|``, averaged
    over all samples of ``data_loader`` (Molchanov et al., "Importance Estimation for Neural
    Network Pruning", CVPR 2019, on feature maps).

    ``data_loader`` yields ``(inputs, targets)`` pairs; ``inputs`` is a tensor, a tuple of
    positional inputs or a dict of keyword inputs, moved to ``device`` (default: the model's
    device; the model is never moved). ``loss_fn(output, targets)`` defaults to
    cross-entropy. At most ``max_batches`` batches are used. Statistics are gathered in
    :meth:`prepare` (``graphprune.prune`` calls it), in eval mode, without touching the
    parameters' ``.grad`` or ``requires_grad``.

    The activations measured for a group are those of :func:`activation_sites` (its norm
    layers' outputs when it has any); several sites are combined with
    :func:`~graphprune.criteria.base.combine`. A group with no such activation falls back to
    :class:`~graphprune.criteria.L1`; its id is listed in ``fallback_groups``.

    On a model trained to (almost) zero loss on ``data_loader`` the cross-entropy gradient
    vanishes and the estimate degenerates to noise from the few samples still misfit; pass a
    loss whose gradient stays informative there, e.g. ``loss_fn=lambda out, y:
    F.cross_entropy(out, y, label_smoothing=0.1)`` (see ``benchmarks/criteria.py``).

    Parameters
    ----------
    data_loader : iterable
        ``(inputs, targets)`` batches; it is read in every :meth:`prepare`.
    loss_fn : callable, optional
        ``loss_fn(output, targets)`` returning a scalar tensor; default cross-entropy.
    max_batches : int, optional
        The most batches to read (at least 1); default all.
    device : str or torch.device, optional
        Where batches go; it must be the model's device (default: the model's).
    progress : bool, default True
        Show a progress bar over the batches.

    Raises
    ------
    TypeError
        ``data_loader`` is not iterable, ``loss_fn`` not callable, or ``max_batches`` not an int.
    ValueError
        ``max_batches`` is below 1.
    """

    name = "taylor"
    requires_data = True

    def __init__(
        self,
        data_loader: Iterable,
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        max_batches: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        *,
        progress: bool = True,
    ):
        if data_loader is None or not hasattr(data_loader, "__iter__"):
            raise TypeError(f"data_loader must be an iterable of (inputs, targets) batches, got {type(data_loader).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(output, targets), got {type(loss_fn).__name__}")
        self.max_batches = check_max_batches(max_batches)
        self.data_loader = data_loader
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.device = None if device is None else torch.device(device)
        self.progress = progress
        self.owner = type(self).__name__  # names the criterion in error messages (KTaylor sets its own)
        self.fallback_groups: list = []
        self.samples = 0
        self._scores: Optional[dict] = None
        self._l1 = L1()

    def __repr__(self) -> str:
        return f"Taylor(max_batches={self.max_batches}, device={self.device})"

    # ----- statistics
    def prepare(self, model, report) -> None:
        device = model_device(model)
        if self.device is not None and not same_device(self.device, device):
            raise ValueError(
                f"{self.owner} was given device={self.device} but the model is on {device}; move the model first"
            )
        device = self.device or device
        sites = activation_sites(report)
        sums, counts = self._collect(model, sites, device)
        self.fallback_groups = []
        self._scores = {}
        for group in report.groups:
            if group.id not in sites:
                continue
            per_site, covered = [], []
            for name, index, dim, index_map in sites[group.id]:
                total = sums.get((name, index), {}).get(dim)  # None: never reached, or no gradient
                mean = np.zeros(index_map.size) if total is None else total / max(counts[(name, index)], 1)
                per_site.append(np.bincount(index_map, weights=mean, minlength=group.size))
                mask = np.zeros(group.size, dtype=bool)
                mask[index_map] = True
                covered.append(mask)
            self._scores[group.id] = combine(per_site, group.size, covered)

    def _collect(self, model, sites: dict, device: torch.device):
        wanted: dict = defaultdict(dict)  # module -> call index -> dims
        for group_sites in sites.values():
            for name, index, dim, _ in group_sites:
                wanted[name].setdefault(index, set()).add(dim)
        sums: dict = {}
        counts: dict = defaultdict(int)
        batches = 0
        bar = tqdm(total=self._total_batches(), desc="Taylor importance", unit="batch", disable=not self.progress,
                   leave=False)
        with _Activations(model, wanted) as captured, eval_mode(model), _requiring_grad(model), bar:
            for batch in self.data_loader:
                if self.max_batches is not None and batches >= self.max_batches:
                    break
                batch = LoaderBatch(batch, batches, f"{self.owner}'s data_loader", device, self._loss_name())
                self._add_batch(model, batch, captured, wanted, sums, counts)
                batches += 1
                bar.update(1)
        if batches == 0:
            raise ValueError(f"{self.owner}'s data_loader yielded no batches")
        self.samples = max(counts.values(), default=0)
        return {k: {d: v.numpy() for d, v in dims.items()} for k, dims in sums.items()}, counts

    def _add_batch(self, model, batch: LoaderBatch, captured: "_Activations", wanted: dict, sums: dict, counts: dict):
        """Add one batch's ``|sum of activation * gradient|`` per channel to ``sums``."""
        captured.clear()
        with torch.enable_grad():
            loss = batch.loss(self.loss_fn, batch.forward(model))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            keys = list(captured.outputs)
            grads = torch.autograd.grad(loss, [captured.outputs[k] for k in keys], allow_unused=True) if keys else []
        for key, grad in zip(keys, grads):
            activation = captured.outputs[key].detach()
            samples = activation.shape[0]
            counts[key] += samples
            for dim in wanted[key[0]][key[1]]:
                if grad is None:
                    contribution = torch.zeros(activation.shape[dim], dtype=torch.float64)
                else:
                    product = (activation * grad).movedim(dim, -1)
                    contribution = product.reshape(samples, -1, product.shape[-1]).sum(1).abs().sum(0).double().cpu()
                store = sums.setdefault(key, {})
                store[dim] = store[dim] + contribution if dim in store else contribution
        captured.clear()

    def _loss_name(self) -> str:
        return f"loss_fn ({getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)})"

    def _total_batches(self) -> Optional[int]:
        try:
            total = len(self.data_loader)
        except TypeError:
            total = None
        if self.max_batches is not None:
            total = self.max_batches if total is None else min(total, self.max_batches)
        return total

    # ----- scores
    def scores(self, group) -> np.ndarray:
        if self._scores is None:
            raise RuntimeError(
                f"{self.owner} needs prepare(model, report) before scores(); graphprune.prune calls it for you"
            )
        if group.id in self._scores and self._scores[group.id].shape == (group.size,):
            return self._scores[group.id].copy()
        if group.id not in self.fallback_groups:
            self.fallback_groups.append(group.id)
        return self._l1.scores(group)


class _Activations:
    """Forward hooks that keep the outputs of the wanted calls of each module (``wanted``:
    module name -> call index -> dims) while the block runs: ``outputs[(name, call)]``."""

    def __init__(self, model, wanted: dict):
        self.model, self.wanted = model, wanted
        self.calls: dict = defaultdict(int)
        self.outputs: dict = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, output):
            index = self.calls[name]
            self.calls[name] += 1
            if index in self.wanted[name] and isinstance(output, torch.Tensor) and output.requires_grad:
                self.outputs[(name, index)] = output
                return output.clone()  # a following in-place op must not overwrite the saved activation
            return None
        return hook

    def clear(self) -> None:
        self.calls.clear()
        self.outputs.clear()

    def __enter__(self) -> "_Activations":
        self._handles = [self.model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.wanted]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()


@contextmanager
def _requiring_grad(model) -> Iterator[None]:
    """Every parameter requires grad in the block (so activations carry gradients); then put back."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
