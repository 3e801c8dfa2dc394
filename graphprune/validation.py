"""Argument checks shared by the public functions: precise TypeError / ValueError messages."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["check_model", "check_int", "check_real"]


def check_model(model: Any, name: str = "model", *, allow_torchscript: bool = False) -> None:
    """Raise TypeError unless ``model`` is an ``nn.Module``; a TorchScript module
    (``torch.jit.script`` / ``torch.jit.trace``) too, unless ``allow_torchscript`` (for
    functions that only run the model, never trace or change it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not allow_torchscript and isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{name} is a TorchScript module ({type(model).__name__}), which graphprune cannot trace or change; "
            "analyse, prune and graphprune.save the nn.Module before scripting it: "
            "torch.jit.script(graphprune.prune(model, ...))"
        )


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int, which must be at least ``minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_real(value: Any, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the given bounds (open or closed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value
