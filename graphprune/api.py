"""The public entry points: :func:`analyze` and :func:`prune`.

What :func:`prune` does, in more detail than its docstring holds:

* **How much goes, and how.** ``ratio`` (a float, or ``{module name or glob: ratio}``),
  ``global_ranking`` with ``max_ratio``, ``round_to``, ``steps`` with a ``schedule``, or a
  budget instead of a ratio (``target_flops``, ``target_params``, ``target_latency``, met
  within ``tolerance``); ``uniform`` prunes a group repeated layer after layer alike in every
  layer; :mod:`graphprune.pruning.options` describes each one. With ``verify=True`` (default)
  the pruned model is traced again and every tensor must have the shape the analysis
  predicts; groups that fail this audit are blocked (with the reason) and dropped from the plan.
* **Configs.** A model built from a config (``model.config``, as Hugging Face's) gets the
  config that describes the pruned model, and its attributes that only ``__init__`` reads
  follow; where no config can (layers pruned unequally), a :class:`ConfigWarning` says why
  (:mod:`graphprune.pruning.model_config`); with ``fit_config=True`` the groups it cannot
  describe are blocked instead.
* **The meta device.** A model on the meta device is pruned by its shapes, with a criterion
  that reads no values (``"random"``, :class:`~graphprune.criteria.Precomputed`).
* **Keeping what the model knew, without training.** ``calibration`` (a list or DataLoader of
  input batches, a few hundred samples) with ``recover="lstsq"`` refits every layer whose
  input lost channels so that it gives the original model's output again; ``"bias"`` only
  folds the mean difference into the bias; a :class:`Recovery` sets the details
  (:mod:`graphprune.recovery`). A criterion named by a string that needs data (``"wanda"``,
  ``"flap"``) reads ``calibration`` too.
* **A report.** ``report`` (from :func:`analyze` on this ``model``, unchanged since) skips the
  analysis: the groups pruned are those of the report, with its options and inputs.
* **A transaction.** Once the arguments are checked, any failure restores the model bit for
  bit: a failure of the surgery is raised as :class:`PruningError`, any other error (the
  capture, the analysis, the scoring) and a ``KeyboardInterrupt`` as they are. The one step
  that cannot be undone is the final copy of the kept weights: a Ctrl-C arriving during it
  is held until it ends, and the model is then the finished pruned model; an error inside
  it raises a :class:`PruningError` whose ``restored`` is False (load the model again).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from torch import nn

from . import tracer
from .analysis.analyzer import LayerRef
from .criteria import Criterion, get_criterion
from .pruning.options import check_options, check_ratio, check_target
from .pruning.run import PruneResult, run_pruning
from .recovery import Recovery, check_recovery
from .analysis.report import Report
from .session import PruningSession, session_of
from .tracer.fallback import check_capture
from .tracer.state import ModelTransaction, eval_mode, gc_paused
from .validation import check_bool, check_model, warn_caller


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    ignored_layers: Iterable[LayerRef] = (),
    prune_heads: bool = False,
    capture: str = "auto",
) -> Report:
    """Trace ``model`` and report every coupled channel group.

    The model is captured on ``example_inputs``, channel identity is propagated through the
    graph and the channels that must go together are cut into groups, each prunable or
    blocked with its reasons. The model is not modified (its training flags are restored).

    Parameters
    ----------
    model : nn.Module
        The model to analyse (not a TorchScript module).
    example_inputs : tensor, tuple or dict, optional
        A tensor, a tuple of positional inputs or a dict of keyword inputs, on the model's
        device. When omitted a plausible input is built
        (:func:`graphprune.analysis.inputs.infer_example_inputs`).
    leaf_modules : iterable of names, classes, modules or predicates, default ()
        Modules not traced into; their channels are blocked unless a rule knows them.
    ignored_layers : iterable of module names or modules, default ()
        Groups that touch these modules (or their submodules) are blocked.
    prune_heads : bool, default False
        Attention heads are whole channels (``num_heads`` shrinks); by default every head
        keeps the same width and ``head_dim`` shrinks.
    capture : {"auto", "fx", "export"}, default "auto"
        ``"fx"`` (torch.fx), ``"export"`` (``torch.export``, for models torch.fx cannot
        trace) or ``"auto"`` (torch.fx where it captures the whole model, else
        torch.export, else what torch.fx could capture).

    Returns
    -------
    Report
        Every group; its ``session`` (a :class:`PruningSession`) prunes the model.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module`` (or is a TorchScript one), or an option has the
        wrong type.
    ValueError
        An option names no submodule or front-end, the inputs are on another device than
        the model, or the model rejects them (:class:`InputError`, a ``ValueError``).
    TraceError
        The model could not be captured.
    AnalysisError
        The analysis itself failed (a graphprune bug); the model is unchanged.
    """
    check_model(model)
    with eval_mode(model), gc_paused():
        return PruningSession(model, example_inputs, leaf_modules=leaf_modules, ignored_layers=ignored_layers,
                              prune_heads=prune_heads, capture=capture).report


def prune(
    model: nn.Module, ratio: Union[float, Mapping[str, float], None] = None, example_inputs: Any = None, *,
    criterion: Union[str, Criterion] = "l1", ignored_layers: Iterable[LayerRef] = (), inplace: bool = True,
    leaf_modules: Iterable[tracer.LeafSpec] = (), verify: bool = True, prune_heads: bool = False,
    global_ranking: bool = False, max_ratio: Optional[float] = None, round_to: Optional[int] = None, steps: int = 1,
    schedule: Union[str, Callable[[int, int], float]] = "linear", target_flops: Optional[float] = None,
    target_params: Optional[float] = None, target_latency: Optional[float] = None, tolerance: float = 0.02,
    return_result: bool = False, report: Optional[Report] = None, capture: str = "auto", uniform: bool = False,
    calibration: Optional[Iterable] = None, recover: Union[str, Recovery, None] = None, fit_config: bool = False,
) -> Union[nn.Module, PruneResult]:
    """Remove the lowest-scoring channels from every prunable group of ``model``.

    Channels are ranked by ``criterion``; ``floor(ratio * n)`` go from each group of ``n``
    channels, or a budget decides how many. The module docstring details each option.

    Parameters
    ----------
    model : nn.Module
    ratio : float in [0, 1), {module name or glob: float} or None, default None
        The share of each group's channels to remove; None when a ``target_*`` budget is given.
    criterion : str or Criterion, default "l1"
        A name (:data:`graphprune.criteria.CRITERIA`) or an instance.
    global_ranking, max_ratio, round_to, steps, schedule, uniform, fit_config, verify
        Planning options (:mod:`graphprune.pruning.options`); ``verify`` audits the shapes.
    target_flops, target_params, target_latency, tolerance : float, optional
        A budget instead of ``ratio``: the fraction of the original to keep, within ``tolerance``.
    example_inputs, leaf_modules, ignored_layers, prune_heads, capture
        As in :func:`analyze`.
    inplace : bool, default True
        With False a deep copy is pruned and ``model`` is left alone.
    return_result : bool, default False
        Return a :class:`PruneResult` (budget reached, FLOPs and parameters, steps).
    report : Report, optional
        :func:`analyze`'s report on this unchanged ``model``: the analysis is skipped.
    calibration : iterable of input batches, optional
    recover : {"lstsq", "bias"}, Recovery or None, default None
        Refit the layers that lost inputs on ``calibration`` (:mod:`graphprune.recovery`).

    Returns
    -------
    nn.Module or PruneResult
        The pruned model (``model`` itself unless ``inplace=False``), or its PruneResult.

    Raises
    ------
    TypeError, ValueError
        An invalid argument (checked before the model is touched), or as :func:`analyze`.
    PruningError
        The surgery failed; the model was restored (see the module docstring).
    """
    check_model(model)
    ratio = check_ratio(model, ratio)
    target = check_target(ratio, {"flops": target_flops, "params": target_params, "latency": target_latency})
    options = check_options(ratio, global_ranking=global_ranking, max_ratio=max_ratio, round_to=round_to, steps=steps,
                            schedule=schedule, tolerance=tolerance, verify=verify, uniform=uniform, fit_config=fit_config)
    check_bool(return_result, "return_result"), check_bool(inplace, "inplace")
    criterion = get_criterion(criterion, calibration)
    recovery = check_recovery(recover, calibration)
    _check_shapes_suffice(model, criterion, recovery, target, capture)
    session = None if report is None else session_of(report, model, example_inputs, inplace, leaf_modules,
                                                     ignored_layers, prune_heads, capture=capture)
    original = model
    model = copy.deepcopy(model) if session is None and not inplace else model
    after_step = _refit_after_steps(recovery, original, model, calibration)
    # Until the surgery's final copy, any exception restores the model. Where work follows
    # that copy (more steps, a budget, measurements, a recovery), the originals are held to the end.
    keep_tensors = options.steps > 1 or target is not None or return_result or recovery is not None
    transaction = ModelTransaction(model, keep_tensors=keep_tensors)
    with transaction, eval_mode(model), gc_paused(pause=not criterion.requires_data):  # a data pass may run long
        session = session or PruningSession(model, example_inputs, leaf_modules=leaf_modules,
                                            ignored_layers=ignored_layers, prune_heads=prune_heads, capture=capture)
        if not session.report.prunable_groups:
            warn_caller(session.report.unchanged_message())
            result = PruneResult(model, target and target[0], target and target[1], None, target is None, {}, {}, [])
        else:
            result = run_pruning(session, criterion, ratio=ratio, target=target, options=options, measure=return_result,
                                 on_commit=None if keep_tensors else transaction.commit, after_step=after_step)
    return result if return_result else model


def _refit_after_steps(recovery: Optional[Recovery], original: nn.Module, model: nn.Module,
                       calibration: Any) -> Optional[Callable[[nn.Module, dict], None]]:
    """What runs after each pruning step for ``recovery``: a refit against the model as it
    was (``original`` where ``model`` is a copy, else a copy of it, taken now)."""
    if recovery is None:
        return None
    reference = original if model is not original else copy.deepcopy(model)
    return lambda pruned, kept: recovery.run(reference, pruned, kept, calibration)


def _check_shapes_suffice(model: nn.Module, criterion: Criterion, recovery: Optional[Recovery],
                          target: Optional[tuple], capture: str) -> None:
    """Raise ValueError if ``capture`` is unknown, or if ``model`` is on the meta device and
    pruning it would need values."""
    check_capture(capture)
    if not any(t.is_meta for t in model.parameters()):
        return
    needs = [f"criterion {criterion.name!r} ranks channels by their values"] if criterion.reads_values else []
    needs += ["recover refits weights on data"] if recovery is not None else []
    needs += ["target_latency times the model"] if target is not None and target[0] == "latency" else []
    if needs:
        raise ValueError(
            f"{type(model).__name__} is on the meta device, which holds shapes but no values, and {'; '.join(needs)}. "
            "Scores are computed from the weights: graphprune.prune_checkpoint(src, dst, ratio) reads a checkpoint "
            "shard by shard; or pass criterion=graphprune.criteria.Precomputed(scores), or criterion='random' to "
            "choose channels by shapes alone"
        )
