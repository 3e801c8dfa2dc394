"""Size and speed of a model: parameter count, FLOPs and latency, and the latency of a pruned
model relative to its original (:func:`latency_ratio`, for budgets), and models timed side by
side with the spread of their times (:func:`compare_latency`, for people).

Budgets' latency is timed by :func:`latency_ratio`: the original and the pruned model run
alternately on the example inputs, on the model's device, so that load on the machine
affects both alike. Single-threaded CPU inference is timed by the thread's CPU time (immune
to other processes), anything else by wall clock (:func:`latency_clock`).

``example_inputs`` follows the same convention as :func:`graphprune.analyze`: a tensor,
a tuple of positional inputs, or a dict of keyword inputs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.tracer import call_model
from graphprune.tracer.devices import model_device, tensors_in, to_device
from graphprune.tracer.state import eval_mode
from graphprune.validation import check_int, check_model

__all__ = ["count_flops", "count_parameters", "measure_latency", "latency_ratio", "latency_clock", "compare_latency", "Timing"]


def count_parameters(model: nn.Module) -> int:
    """Count the scalar parameters of ``model``; one shared by several modules counts once.

    Parameters
    ----------
    model : nn.Module
        Any module, TorchScript included.

    Returns
    -------
    int
        The number of parameter elements.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    """
    check_model(model, allow_torchscript=True)
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Count the FLOPs of one forward pass on ``example_inputs``.

    The count follows :class:`~torch.utils.flop_counter.FlopCounterMode`: a multiply-add
    is 2 FLOPs, and only the operators it knows (matmuls, convolutions, attention) are
    counted; element-wise ops, normalisation and pooling are free. The model runs in eval
    mode under ``torch.no_grad()``; every submodule's training flag is restored.

    Parameters
    ----------
    model : nn.Module
        Any module, TorchScript included.
    example_inputs : tensor, tuple or dict
        A tensor, a tuple of positional inputs or a dict of keyword inputs.

    Returns
    -------
    int
        The FLOPs counted.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    """
    check_model(model, allow_torchscript=True)
    with eval_mode(model), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            call_model(model, example_inputs)
    return int(counter.get_total_flops())


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: Optional[Union[str, torch.device]] = None,
    num_threads: Optional[int] = None,
) -> float:
    """Time one forward pass of ``model`` with ``torch.utils.benchmark.Timer``.

    ``warmup`` untimed calls come first, then ``repeats`` timed calls of one forward pass
    each. The timer synchronises CUDA itself, so the result is the real latency on any
    device. Inputs are moved to the device of the run. The model runs in eval mode under
    ``torch.no_grad()``; every submodule's training flag is restored.

    Parameters
    ----------
    model : nn.Module
        Any module, TorchScript included.
    example_inputs : tensor, tuple or dict
        A tensor, a tuple of positional inputs or a dict of keyword inputs.
    repeats : int, default 20
        Timed calls (at least 1).
    warmup : int, default 3
        Untimed calls before them (at least 0).
    device : str or torch.device, optional
        Where to run; the model is moved there and back afterwards. By default, where the
        model's parameters are.
    num_threads : int, optional
        CPU threads during timing (default: ``torch.get_num_threads()``).

    Returns
    -------
    float
        The median wall time of one forward pass, in seconds.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, or ``repeats`` or ``warmup`` not an integer.
    ValueError
        ``repeats`` is below 1 or ``warmup`` below 0.
    """
    check_model(model, allow_torchscript=True)
    repeats, warmup = check_int(repeats, "repeats", 1), check_int(warmup, "warmup", 0)
    # imported here, not at the top: importing it logs a CUDA_HOME notice on CPU-only machines
    from torch.utils import benchmark

    original_device = model_device(model)
    run_device = torch.device(device) if device is not None else original_device
    if run_device != original_device:
        model.to(run_device)
    try:
        inputs = to_device(example_inputs, run_device)
        timer = benchmark.Timer(
            stmt="call_model(model, inputs)",
            globals={"call_model": call_model, "model": model, "inputs": inputs},
            num_threads=num_threads if num_threads is not None else torch.get_num_threads(),
            label=type(model).__name__,
        )
        with eval_mode(model), torch.no_grad():
            if warmup:
                timer.timeit(warmup)
            runs = [timer.timeit(1) for _ in range(repeats)]
        return float(benchmark.Measurement.merge(runs)[0].median)
    finally:
        if run_device != original_device:
            model.to(original_device)


def _synchronize(inputs: Any) -> None:
    for tensor in tensors_in(inputs):
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
            return


def latency_clock(example_inputs: Any) -> str:
    """``"cpu"`` (the calling thread's CPU time) for single-threaded CPU inference, else ``"wall"``.

    With one intra-op thread the whole forward runs in the calling thread, so its CPU time
    is the latency the model would have on an idle machine and other processes do not
    disturb it; otherwise (several threads, accelerators) wall time is the only measure.
    """
    on_cpu = all(t.device.type == "cpu" for t in tensors_in(example_inputs))
    return "cpu" if on_cpu and torch.get_num_threads() == 1 else "wall"


def _time_once(model: nn.Module, inputs: Any, clock: str) -> float:
    if clock == "cpu":
        start = time.thread_time()
        call_model(model, inputs)
        return time.thread_time() - start
    _synchronize(inputs)
    start = time.perf_counter()
    call_model(model, inputs)
    _synchronize(inputs)
    return time.perf_counter() - start


def latency_ratio(reference: nn.Module, model: nn.Module, example_inputs: Any, *, warmup: int = 3,
                  repeats: int = 20, clock: Optional[str] = None) -> float:
    """``latency(model) / latency(reference)`` on ``example_inputs``.

    The two models run alternately so that load on the machine affects both alike; each
    latency is the fastest run by wall clock, or the median run by CPU clock (see
    :func:`latency_clock`, the default ``clock``).
    """
    clock = clock or latency_clock(example_inputs)
    reduce = np.median if clock == "cpu" else np.min
    ref_times, times = _interleaved_times([reference, model], example_inputs, max(repeats, 1), warmup, clock)
    return float(reduce(times) / reduce(ref_times))


def _interleaved_times(models: list, example_inputs: Any, rounds: int, warmup: int, clock: str,
                       progress: bool = False) -> list:
    """Per model, its ``rounds`` times of one forward pass (no grad), the models taking turns in
    every round after ``warmup`` untimed rounds, so that load on the machine falls on all alike."""
    from tqdm.auto import tqdm

    times = [[] for _ in models]
    with torch.no_grad():
        for _ in range(warmup):
            for model in models:
                call_model(model, example_inputs)
        for _ in tqdm(range(rounds), desc="timing", unit="round", disable=not progress, leave=False):
            for model, mine in zip(models, times):
                mine.append(_time_once(model, example_inputs, clock))
    return times


@dataclass
class Timing:
    """Latencies of models timed in interleaved rounds (:func:`compare_latency`): per model the
    median and the spread (interquartile range over the median) of its ``rounds`` times, in
    seconds. ``trustworthy`` is False when a spread exceeds ``SPREAD_LIMIT``: the machine was
    too busy for the figures to mean much."""

    medians: tuple
    spreads: tuple
    rounds: int

    @property
    def trustworthy(self) -> bool:
        return max(self.spreads) <= SPREAD_LIMIT

    @property
    def speedup(self) -> Optional[float]:
        """First model's latency over the second's (> 1: the second is faster); None for one model."""
        return self.medians[0] / self.medians[1] if len(self.medians) > 1 and self.medians[1] > 0 else None


SPREAD_LIMIT = 0.10


def compare_latency(models: list, example_inputs: Any, *, rounds: int = 30, warmup: int = 3,
                    progress: bool = False) -> Timing:
    """Time one forward pass of each of ``models`` (eval mode, no grad, on their device) once per
    round, the models taking turns, after ``warmup`` untimed rounds: load on the machine then
    falls on all alike. Wall clock, or the thread's CPU time for single-threaded CPU inference
    (:func:`latency_clock`). A progress bar counts the rounds with ``progress``."""
    for model in models:
        check_model(model, allow_torchscript=True)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 4:
        raise ValueError(f"rounds must be an integer of at least 4 (a spread needs quartiles), got {rounds!r}")
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_mode(model))
        times = _interleaved_times(models, example_inputs, rounds, warmup, latency_clock(example_inputs), progress)
    quartiles = [np.percentile(t, [25, 50, 75]) for t in times]
    return Timing(tuple(float(q[1]) for q in quartiles), tuple(float((q[2] - q[0]) / q[1]) if q[1] > 0 else 0.0
                                                              for q in quartiles), rounds)
