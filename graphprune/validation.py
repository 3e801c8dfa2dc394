"""Argument checks shared by the public functions: precise TypeError / ValueError messages."""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from torch import nn

__all__ = ["check_model", "check_materialised", "check_int", "check_real", "check_fraction", "warn_caller"]


def check_model(model: Any, name: str = "model", *, allow_torchscript: bool = False) -> None:
    """Raise TypeError unless ``model`` is an ``nn.Module``; a TorchScript module
    (``torch.jit.script`` / ``torch.jit.trace``) too, unless ``allow_torchscript`` (for
    functions that only run the model, never trace or change it)."""
    import torch  # here, not at the top: the command line's parser imports this module, and must start fast
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not allow_torchscript and isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{name} is a TorchScript module ({type(model).__name__}), which graphprune cannot trace or change; "
            "analyse, prune and graphprune.save the nn.Module before scripting it: "
            "torch.jit.script(graphprune.prune(model, ...))"
        )


def check_materialised(model: nn.Module) -> None:
    """Raise ValueError if ``model`` has tensors on the meta device, which hold no values."""
    if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device, which hold no values; "
            "materialise it first (model.to_empty(device=...) and load its weights)"
        )


def check_bool(value: Any, name: str) -> bool:
    """``value``, which must be True or False (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


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


def check_fraction(value: Any, name: str, *, low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a float in the interval from 0 to 1, each end open or closed as given
    (``[0, 1)`` by default); precise errors otherwise, NaN included."""
    interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in {interval}, got {type(value).__name__}")
    value = float(value)
    above = value > 0.0 if low_open else value >= 0.0
    below = value < 1.0 if high_open else value <= 1.0
    if math.isnan(value) or not (above and below):
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def warn_caller(message: str, category: type = UserWarning) -> None:
    """Issue a warning attributed to the first frame outside graphprune: the user's call,
    however deep inside graphprune the warning arises."""
    import graphprune

    inside = tuple(os.path.dirname(m.__file__) + os.sep for m in (graphprune, graphprune.tracer, graphprune.criteria))
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of this function
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
