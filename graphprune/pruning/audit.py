"""Shape audit: re-trace a pruned model and check every tensor against the shape the
channel labels predict. A mismatch means a rule or a size attribute did not follow the
pruning; the audit names the groups involved so that the caller can block them."""
from __future__ import annotations

import traceback
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn

from graphprune import tracer
from graphprune.analysis.channels import per_array
from graphprune.analysis.propagation import Propagation, iter_arrays
from graphprune.analysis.reasons import BlockKind
from graphprune.tracer import TensorSpec, call_model
from graphprune.tracer.state import attributes_kept

from .surgery import ValuesNeeded, placeholders_alike


class AuditError(RuntimeError):
    """The pruned model's shapes differ from the prediction; ``suspects`` are root ids involved:
    those at the failing node, or with ``precise=False`` all that reach the failing module
    (the groups to blame are among them)."""

    def __init__(self, message: str, suspects: np.ndarray, precise: bool = True, sites: frozenset = frozenset(),
                 module: Optional[str] = None, runs: bool = True):
        super().__init__(message)
        self.suspects = suspects
        self.precise = precise
        self.runs = runs  # whether the pruned model still ran (else no shape was compared)
        self.sites = sites  # ``file:line`` of every frame of the failure (see Assumption.site)
        self.module = module  # the innermost module whose forward failed, when the pruned model no longer runs


def _dims(labels: Any, value: Any) -> list:
    """Flatten a (possibly nested) value into ``(label array or None, size)`` per tensor dim."""
    if isinstance(value, TensorSpec):
        if labels is None or len(labels) != len(value.shape):
            return [(None, size) for size in value.shape]
        return list(zip(labels, value.shape))
    if isinstance(value, dict):
        return [d for k, v in value.items() for d in _dims(labels.get(k) if isinstance(labels, dict) else None, v)]
    if isinstance(value, (tuple, list)):
        nested = isinstance(labels, (tuple, list)) and len(labels) == len(value) and not (labels and isinstance(labels[0], np.ndarray))
        return [d for i, v in enumerate(value) for d in _dims(labels[i] if nested else None, v)]
    return []


def _inputs_of(state: Propagation, roots: np.ndarray, node: str, removed: np.ndarray) -> np.ndarray:
    """Root ids of the removed channels that flow into the graph node ``node``; none if that
    node is unknown (the session then finds the failing groups by bisection)."""
    fx_node = state.graph.nodes[node]["fx"] if node in state.graph.nodes else None
    ids = [a for n in (fx_node.all_input_nodes if fx_node is not None else ()) for a in iter_arrays(state.labels.get(n.name))]
    ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    suspects = np.unique(roots[ids[ids >= 0]])
    return suspects[removed[suspects]]


def audit(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable,
    state: Propagation,
    roots: np.ndarray,
    removed: np.ndarray,
    filled: bool = True,
    capture: str = "auto",
) -> None:
    """Raise :class:`AuditError` unless every node of the re-traced ``model`` has the predicted shape.

    With ``filled=False`` the model's tensors hold placeholders of their new shapes: the audit
    then only judges a model whose shapes can be found without values (on meta or fake tensors)
    and raises :class:`ValuesNeeded` for any other, and for a failure on placeholders that
    alias their positions (off the CPU, see :func:`~.surgery.placeholders_alike`). ``capture`` is the front-end the analysis
    asked for (see :func:`graphprune.tracer.trace`), so the pruned model is captured alike.
    """
    if not filled and not state.graph.graph["recorded_on_meta"]:
        raise ValuesNeeded("the model's shapes depend on its values")
    graph = _retraced(model, example_inputs, leaf_modules, state, roots, removed, filled, capture)
    if not filled and not graph.graph["recorded_on_meta"]:
        raise ValuesNeeded("the pruned model's shapes depend on its values")
    mismatches, suspects = _Predictions(state, roots, removed).compare(graph)
    if mismatches:
        ids = np.concatenate(suspects) if suspects else np.zeros(0, dtype=np.int64)
        blamed = np.unique(roots[ids[ids >= 0]])
        shown = "; ".join(mismatches[:3]) + (f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else "")
        raise AuditError(f"shape audit failed: {shown}", blamed)


def _retraced(model, example_inputs, leaf_modules, state: Propagation, roots: np.ndarray, removed: np.ndarray,
              filled: bool, capture: str):
    """The pruned model's graph; a model that no longer runs is an :class:`AuditError` blaming
    the groups that flow into the node where it fails."""
    try:
        return tracer.trace(model, example_inputs, leaf_modules, capture)
    except Exception as exc:
        if not filled and not all(placeholders_alike(t.device) for t in model.parameters()):
            raise ValuesNeeded(f"tracing on placeholders failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(exc, (tracer.InputError, tracer.TraceError)):
            raise
        node = getattr(exc, "node_name", None)
        module = _failing_module(model, exc) if node is None else None
        where = f"node '{node}'" if node is not None else f"module '{module}'" if module is not None else "an unknown place"
        suspects = _inputs_of(state, roots, node, removed) if module is None else _inputs_of_module(state, roots, module, removed)
        raise AuditError(
            _no_longer_runs(where, exc.__cause__ or exc), suspects, precise=module is None, sites=_failure_sites(exc), module=module, runs=False,
        ) from exc


def run_failure(model: nn.Module, example_inputs: Any) -> Optional[str]:
    """Why the pruned ``model`` no longer runs on the example inputs, None if it runs: one
    forward, far cheaper than the audit's capture (a forward on fake tensors, which would need
    no values, costs more than one on a small model's values). Whatever it leaves on the
    model's modules is taken back."""
    with attributes_kept(model), torch.no_grad():
        try:
            call_model(model, example_inputs)
        except Exception as exc:  # noqa: BLE001 - the answer
            module = _failing_module(model, exc)
            return _no_longer_runs(f"module '{module}'" if module is not None else "an unknown place", exc)
    return None


def _no_longer_runs(where: str, error: BaseException) -> str:
    return (f"the pruned model no longer runs on the example inputs, which the model took before pruning "
            f"(at {where}: {error}); a rule or a size did not follow the pruning")


def _failure_sites(exc: BaseException) -> frozenset:
    """``file:line`` of every frame the error behind ``exc`` passed through."""
    cause = exc.__cause__ or exc
    return frozenset(f"{frame.f_code.co_filename}:{line}" for frame, line in traceback.walk_tb(cause.__traceback__))


def _failing_module(model: nn.Module, exc: BaseException) -> Optional[str]:
    """The qualified name of the innermost module of ``model`` whose forward was running where
    the error behind ``exc`` was raised (read off the traceback's frames), or None. A module is
    known by its attribute dict: torch.export calls each through a proxy that shares it."""
    names = {id(vars(m)): name for name, m in model.named_modules()}
    cause, found = exc.__cause__ or exc, None
    for frame, _ in traceback.walk_tb(cause.__traceback__):
        owner = id(getattr(frame.f_locals.get("self"), "__dict__", None))
        if owner in names and frame.f_code.co_name == "forward":
            found = names[owner]
    return found


def _inputs_of_module(state: Propagation, roots: np.ndarray, module: str, removed: np.ndarray) -> np.ndarray:
    """Root ids of the removed channels that flow into any node run by ``module`` or within it."""
    inside = [key for key, attrs in state.graph.nodes(data=True)
              if (attrs["module"] or "") == module or (attrs["module"] or "").startswith(module + ".")]
    found = [_inputs_of(state, roots, key, removed) for key in inside]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


class _Predictions:
    """Every node's shape as the labels predict it once ``removed`` channels are gone."""

    def __init__(self, state: Propagation, roots: np.ndarray, removed: np.ndarray):
        self.state = state
        self.removed_from = per_array(lambda ids: int(removed[roots[ids[ids >= 0]]].sum()))
        # Sizes fed to a traced part by untraced code (e.g. a detector's proposals) may change.
        self.data_dependent = np.array(
            [getattr(s.blocked, "kind", None) is BlockKind.UNTRACED_INPUT for s in state.space.sets] + [False])

    def free(self, ids: Any) -> bool:
        valid = ids[ids >= 0] if ids is not None else ()
        return len(valid) > 0 and bool(self.data_dependent[self.state.space.set_of(valid)].any())

    def compare(self, graph) -> tuple:
        """``(mismatches, suspect id arrays)`` of ``graph`` (the re-traced model) against the prediction."""
        mismatches, suspects = [], []
        for name, attrs in self.state.graph.nodes(data=True):
            if attrs["op"] in ("get_attr", "output"):  # checked through their users / producers; fx renames constants
                continue
            dims = _dims(self.state.labels.get(name), attrs["value"])
            labelled = [ids for ids, _ in dims if ids is not None]
            if name not in graph.nodes:
                mismatches.append(f"{name}: missing after pruning")
                suspects.extend(labelled)
                continue
            actual = [size for _, size in _dims(None, graph.nodes[name]["value"])]
            predicted = [size if ids is None else size - self.removed_from(ids) for ids, size in dims]
            if len(actual) != len(predicted):
                mismatches.append(f"{name}: expected dims {predicted}, got {actual}")
                suspects.extend(labelled)
                continue
            bad = [d for d, (p, a) in enumerate(zip(predicted, actual)) if p != a and not self.free(dims[d][0])]
            if bad:
                mismatches.append(f"{name}: expected sizes {predicted}, got {actual}")
                suspects.extend(dims[d][0] for d in bad if dims[d][0] is not None)
        return mismatches, suspects
