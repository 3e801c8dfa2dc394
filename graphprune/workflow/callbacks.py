"""Pruning inside another training loop: ``HFPruningCallback`` (Hugging Face's ``Trainer``) and
``LightningPruningCallback`` run a :class:`~graphprune.workflow.sparse.GroupRegularizer` and a
pruning schedule, and slice the optimizer's state after each pruning (:func:`prune_optimizer_state`).
They are built on the optional library when first used (``import graphprune`` imports neither)
and delegate to :class:`PruningHooks`, which a plain training loop can call directly.
"""
from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from graphprune.analysis.analyzer import AnalysisOptions
from graphprune.api import analyze, prune
from graphprune.criteria import get_criterion
from graphprune.reporting.measure import count_parameters
from graphprune.tracer.devices import model_device, to_device
from graphprune.validation import check_fraction, check_model, warn_caller

from .optimizer_state import prune_optimizer_state
from .schedule import ratio_between
from .sparse import GroupRegularizer, check_settings

__all__ = ["check_schedule", "PruningHooks", "HFPruningCallback", "LightningPruningCallback",
           "lightning_callback_class"]

_RESERVED = ("ratio", "example_inputs", "criterion", "inplace", "return_result", "report", "steps", "target_flops",
             "target_params", "target_latency")
_SETTINGS = ("coefficient", "mode", "delta", "max_coefficient", "target_ratio")


# ----- checking the options
def check_schedule(schedule: Any) -> dict:
    """``{epoch: cumulative ratio}`` checked and sorted by epoch ({} for None): epochs are
    integers >= 1 (the number of epochs completed when the model is pruned), ratios lie in
    (0, 1) and increase strictly with the epoch, as :func:`graphprune.prune_schedule`'s."""
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping) or not schedule:
        raise TypeError(f"schedule must be a non-empty mapping {{epoch: cumulative ratio}} such as {{2: 0.3, 4: 0.5}}, "
                        f"got {schedule!r}")
    checked = {}
    for epoch, ratio in schedule.items():
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise TypeError(f"schedule's epochs must be integers (epochs completed before pruning), got {epoch!r}")
        if epoch < 1:
            raise ValueError(f"schedule's epochs must be at least 1 (pruned at the end of that epoch), got {epoch}")
        checked[int(epoch)] = check_fraction(ratio, f"schedule[{epoch}]", low_open=True)
    checked = dict(sorted(checked.items()))
    ratios = list(checked.values())
    if any(later <= earlier for earlier, later in zip(ratios, ratios[1:])):
        raise ValueError(f"schedule's ratios must increase strictly with the epoch (they are cumulative fractions of "
                         f"each group's original channels), got {checked}")
    return checked


def _check_regularizer(regularizer: Any, scheduled: bool) -> Optional[dict]:
    """The regulariser's settings, checked (growing ones need a target ratio, from the schedule or given)."""
    if regularizer is None:
        return None
    if isinstance(regularizer, GroupRegularizer) or not isinstance(regularizer, Mapping):
        raise TypeError(f"regularizer must be a mapping of GroupRegularizer settings such as {{'coefficient': 1e-3}}, "
                        f"got {type(regularizer).__name__}: a regulariser is built on each pruned model")
    unknown = [str(key) for key in regularizer if key not in _SETTINGS]
    if unknown:
        raise ValueError(f"regularizer may set only {', '.join(_SETTINGS)}, not {', '.join(unknown)} (the analysis "
                         "options come from prune_kwargs)")
    settings = dict(regularizer)
    if scheduled and "target_ratio" in settings:
        raise ValueError("regularizer's target_ratio comes from the schedule (the next pruning's ratio); leave it out, "
                         "or pass no schedule")
    growing = "delta" in settings or "max_coefficient" in settings
    checked = check_settings(settings.get("mode", "group_norm"), settings.get("coefficient", 1e-4),
                             settings.get("delta"), settings.get("max_coefficient"),
                             growing=growing and (scheduled or settings.get("target_ratio") is not None))
    if growing:
        settings["delta"] = checked.delta
    return settings


def _check_prune_kwargs(prune_kwargs: Any) -> dict:
    if prune_kwargs is None:
        return {}
    if not isinstance(prune_kwargs, Mapping):
        raise TypeError(f"prune_kwargs must be a mapping of prune options, got {type(prune_kwargs).__name__}")
    known = set(inspect.signature(prune).parameters) - {"model"}
    clash = sorted(set(prune_kwargs) & set(_RESERVED))
    if clash:
        raise ValueError(f"prune_kwargs may not set {', '.join(clash)}: the callback sets them (one step per "
                         "scheduled epoch, its ratio from the schedule)")
    unknown = sorted(str(k) for k in prune_kwargs if k not in known)
    if unknown:
        raise ValueError(f"prune_kwargs has options graphprune.prune does not take: {', '.join(unknown)}")
    return dict(prune_kwargs)


# ----- the core, independent of any trainer
class PruningHooks:
    """The work of both callbacks, for any training loop.

    Call :meth:`start` when training starts, :meth:`epoch_start` / :meth:`epoch_end` around
    each epoch and :meth:`before_optimizer_step` between ``loss.backward()`` and
    ``optimizer.step()``. At a scheduled epoch's end the model is pruned with
    ``graphprune.prune(model, 1 - (1 - r_i) / (1 - r_{i-1}), criterion=..., **prune_kwargs)`` on
    a fresh analysis, then :func:`prune_optimizer_state` runs on every optimizer (a state no
    slice fits is reset, with a warning). ``history`` holds one dict per pruning (``epoch``,
    ``ratio``, ``step_ratio``, ``parameters``, ``optimizer_states``).

    Parameters
    ----------
    example_inputs : tensor, tuple or dict, optional
        As in :func:`graphprune.analyze`; moved to the model's device.
    schedule : {epoch: cumulative ratio}, optional
        ``{2: 0.3, 4: 0.5}`` removes 30% of each group's original channels at the end of
        epoch 2 (counted from 1) and goes on to 50% after epoch 4 (:func:`check_schedule`).
    regularizer : mapping, optional
        :class:`~graphprune.workflow.sparse.GroupRegularizer` settings (``coefficient``,
        ``mode``, ``delta``, ``max_coefficient``; ``target_ratio`` only without a schedule,
        else the next pruning's ratio), built when training starts and after each pruning
        but the last, as :func:`graphprune.prune_schedule` does; a growing one is updated
        as each epoch starts.
    criterion : str or Criterion, optional
        Default: the norm the regulariser shrinks (``"group_norm"``, ``"bn_scale"``), else ``"l1"``.
    prune_kwargs : mapping, optional
        More :func:`graphprune.prune` options (analysis options included); not the ratio,
        inputs, criterion, ``inplace``, ``report``, ``steps``, budgets or ``return_result``.
    module : str, optional
        The dotted name of the submodule to prune (and regularise); by default the whole model.

    Raises
    ------
    TypeError, ValueError
        An invalid option, or neither a schedule nor regulariser settings.
    """

    def __init__(self, example_inputs: Any = None, *, schedule: Optional[Mapping[int, float]] = None,
                 regularizer: Optional[Mapping[str, Any]] = None, criterion: Any = None,
                 prune_kwargs: Optional[Mapping[str, Any]] = None, module: Optional[str] = None):
        self.schedule = check_schedule(schedule)
        self.settings = _check_regularizer(regularizer, bool(self.schedule))
        if not self.schedule and self.settings is None:
            raise ValueError("nothing to do: pass a schedule {epoch: cumulative ratio}, regularizer settings or both")
        self.prune_kwargs = _check_prune_kwargs(prune_kwargs)
        self._analysis = {key: value for key, value in self.prune_kwargs.items() if key in AnalysisOptions.NAMES}
        if criterion is None:  # the regulariser's modes are the criteria of the norms they shrink
            criterion = "l1" if self.settings is None else self.settings.get("mode", "group_norm")
        get_criterion(criterion, self.prune_kwargs.get("calibration"))  # unknown names fail now, not epochs later
        self.criterion = criterion
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be the dotted name of a submodule, got {type(module).__name__}")
        self.module = module
        self.example_inputs = example_inputs
        self.regularizer: Optional[GroupRegularizer] = None
        self.history: list = []
        self.model: Optional[nn.Module] = None
        self._previous = 0.0

    @property
    def pending(self) -> dict:
        """The scheduled prunings not done yet: ``{epoch: cumulative ratio}``."""
        done = {record["epoch"] for record in self.history}
        return {epoch: ratio for epoch, ratio in self.schedule.items() if epoch not in done}

    def start(self, model: nn.Module) -> None:
        """Training starts on ``model`` (on its device): build the regulariser.

        Parameters
        ----------
        model : nn.Module
            The model trained (``module`` is taken from it).

        Raises
        ------
        ValueError
            ``module`` names no submodule of ``model``.
        """
        check_model(model)
        if self.module:
            try:
                model = model.get_submodule(self.module)
            except AttributeError:
                raise ValueError(f"module={self.module!r} names no submodule of {type(model).__name__}") from None
        self.model = model
        self._build_regularizer()

    def epoch_start(self) -> None:
        """An epoch starts: a growing regulariser raises its coefficients."""
        if self.regularizer is not None and self.regularizer.growing:
            self.regularizer.update()

    def before_optimizer_step(self) -> None:
        """Gradients are ready and the optimizer is about to step: add the penalty's gradient."""
        if self.regularizer is not None:
            self.regularizer.step()

    def epoch_end(self, epoch: int, optimizers: Sequence[Any] = ()) -> Optional[dict]:
        """An epoch is over: prune if the schedule says so.

        The optimizers' state is then sliced and the regulariser rebuilt.

        Parameters
        ----------
        epoch : int
            The epoch that ended, counted from 1.
        optimizers : sequence of torch.optim.Optimizer, default ()
            Their state is sliced to the kept channels (None entries are skipped).

        Returns
        -------
        dict or None
            The pruning's history record, or None when nothing was scheduled for ``epoch``.

        Raises
        ------
        RuntimeError
            Called before :meth:`start`.
        """
        ratio = self.pending.get(epoch)
        if ratio is None:
            return None
        if self.model is None:
            raise RuntimeError("epoch_end() before start(): call start(model) when training starts")
        step_ratio = ratio_between(ratio, self._previous)
        options = {key: value for key, value in self.prune_kwargs.items() if key not in AnalysisOptions.NAMES}
        report = analyze(self.model, self._inputs(), **self._analysis)  # its session knows the kept positions
        prune(self.model, step_ratio, report=report, criterion=self.criterion, **options)
        kept = report.session.surgery.kept_positions()
        sliced = sum(self._slice(optimizer, kept) for optimizer in optimizers if optimizer is not None)
        record = {"epoch": epoch, "ratio": ratio, "step_ratio": step_ratio, "parameters": count_parameters(self.model),
                  "optimizer_states": sliced}
        self.history.append(record)
        self._previous = ratio
        self._build_regularizer()
        return record

    def end(self, epochs: Optional[int] = None) -> None:
        """Training is over: warn about scheduled prunings it never reached.

        Parameters
        ----------
        epochs : int, optional
            How many epochs training ran, for the warning.
        """
        if self.pending:
            ran = f" (training ran {epochs} epochs)" if epochs is not None else ""
            warn_caller(f"the model was not pruned at epochs {sorted(self.pending)} of the schedule{ran}")

    def _slice(self, optimizer: Any, kept: dict) -> int:
        before = len(optimizer.state)
        sliced = prune_optimizer_state(optimizer, self.model, kept, reset_unknown=True)
        if len(optimizer.state) < before:
            warn_caller(f"{before - len(optimizer.state)} parameters' {type(optimizer).__name__} state had a shape "
                        "no slice fits (a factored state?); it was reset and starts afresh at the next step")
        return sliced

    def _inputs(self) -> Any:
        return to_device(self.example_inputs, model_device(self.model))

    def _build_regularizer(self) -> None:
        pending = list(self.pending.values())
        if self.settings is None or (self.schedule and not pending):
            self.regularizer = None
            return
        settings = dict(self.settings)
        if self.schedule and "delta" in settings:
            settings["target_ratio"] = ratio_between(pending[0], self._previous)
        self.regularizer = GroupRegularizer(self.model, self._inputs(), **settings, **self._analysis)


def _single_process(world_size: int, hooks: PruningHooks) -> None:
    if hooks.schedule and world_size > 1:
        raise RuntimeError(f"a pruning schedule needs one training process, not {world_size}: DistributedDataParallel "
                           "cannot follow the parameters' new shapes (sparse training alone works); train on one device")


# ----- the trainers' callbacks, built on first use
class _Callback:
    def __init__(self, example_inputs: Any = None, **options: Any):
        self.hooks = PruningHooks(example_inputs, **options)
        self.history = self.hooks.history  # one dict per pruning done (see PruningHooks)
        self._epoch = 0


_Callback.__init__.__signature__ = inspect.signature(PruningHooks.__init__)  # help() shows the options


class _HFMethods(_Callback):
    """A ``transformers.TrainerCallback`` that prunes during ``Trainer.train()``; the options
    are :class:`PruningHooks`'. Epochs are counted from 1, as ``TrainerState.epoch`` after them."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        _single_process(args.world_size, self.hooks)
        self.hooks.start(model)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self._epoch = int((state.epoch or 0) + 1e-6)  # the epoch starting, from 0 (also when resumed)
        self.hooks.epoch_start()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.hooks.before_optimizer_step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any):
        self.hooks.epoch_end(self._epoch + 1, [optimizer])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.hooks.end(self._epoch + 1)


class _LightningMethods(_Callback):
    """A Lightning ``Callback`` that prunes during ``Trainer.fit()``; the options are :class:`PruningHooks`'
    (``module="net"`` prunes the LightningModule's ``net``; by default the whole LightningModule).
    Epochs are counted from 1 (``trainer.current_epoch + 1`` at the epoch's end)."""

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        _single_process(trainer.world_size, self.hooks)
        self.hooks.start(pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self.hooks.epoch_start()

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        self.hooks.before_optimizer_step()

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.hooks.epoch_end(trainer.current_epoch + 1, trainer.optimizers)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.hooks.end(trainer.current_epoch)


@functools.lru_cache(maxsize=None)
def _built(name: str, methods: type, base: type) -> type:
    """The class ``name``: ``methods`` on top of the optional library's ``base`` (once per base)."""
    return type(name, (methods, base), {"__module__": __name__, "__qualname__": name, "__doc__": methods.__doc__})


def lightning_callback_class(package: str = "lightning.pytorch") -> type:
    """``LightningPruningCallback`` built on ``package``'s ``Callback``, the package your ``Trainer``
    comes from: ``"lightning.pytorch"`` (``import lightning``) or ``"pytorch_lightning"`` (its older name)."""
    if package not in ("lightning.pytorch", "pytorch_lightning"):
        raise ValueError(f"package must be 'lightning.pytorch' or 'pytorch_lightning', got {package!r}")
    try:
        base = __import__(package, fromlist=["Callback"]).Callback
    except ImportError as exc:
        raise ImportError(f"LightningPruningCallback needs {package.split('.')[0]} (pip install lightning)") from exc
    return _built("LightningPruningCallback", _LightningMethods, base)


def __getattr__(name: str) -> type:
    if name == "HFPruningCallback":
        try:
            from transformers import TrainerCallback
        except ImportError as exc:
            raise ImportError("HFPruningCallback needs transformers (pip install transformers accelerate)") from exc
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            raise ImportError("HFPruningCallback needs a transformers whose TrainerCallback has on_pre_optimizer_step "
                              "(where the penalty's gradient goes); upgrade transformers")
        return _built(name, _HFMethods, TrainerCallback)
    if name == "LightningPruningCallback":
        return lightning_callback_class("lightning.pytorch")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
