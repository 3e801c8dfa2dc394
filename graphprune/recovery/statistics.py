"""Streaming statistics of one layer's calibration pairs, and the refit they give.

A layer is fitted as a linear map from the rows of its pruned input ``x`` (one row per sample
and position: a token, a conv patch) to the rows of the original model's output ``y``
(restricted to the output channels kept). Only sums are held, in float64 (each batch's
products are taken in float32 at least, then added): the Gram matrix
``Σ [x 1]ᵀ [x 1]``, the cross term ``Σ yᵀ [x 1]``, ``Σ ‖y‖²`` per channel and the row count,
so the memory is ``(k + 1)²`` for ``k`` inputs, whatever the number of samples.
"""
from __future__ import annotations

from typing import Optional

import torch


class LayerStatistics:
    """Sums of the pairs ``(x, y)`` seen so far for one layer (``k`` inputs, ``m`` outputs)."""

    def __init__(self, inputs: int, outputs: int, device: torch.device, gram: bool = True):
        self.rows = 0
        self.gram = torch.zeros(inputs + 1, inputs + 1, dtype=torch.float64, device=device) if gram else None
        self.cross = torch.zeros(outputs, inputs + 1, dtype=torch.float64, device=device) if gram else None
        self.target_sum = torch.zeros(outputs, dtype=torch.float64, device=device)
        self.output_sum = torch.zeros(outputs, dtype=torch.float64, device=device)
        self.target_squares = torch.zeros((), dtype=torch.float64, device=device)
        self.error_squares = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor, output: torch.Tensor) -> None:
        """One batch: ``x`` (rows, k) pruned inputs, ``y`` (rows, m) original outputs, ``output``
        (rows, m) the pruned layer's own outputs on ``x``."""
        y, output = y.double(), output.double()
        self.rows += y.shape[0]
        self.target_sum += y.sum(0)
        self.output_sum += output.sum(0)
        self.target_squares += y.square().sum()
        self.error_squares += (y - output).square().sum()
        if self.gram is not None:  # one batch's products in float32 at least (half the time of float64)
            dtype = torch.promote_types(x.dtype, torch.float32)
            x = torch.cat([x.to(dtype), torch.ones(x.shape[0], 1, dtype=dtype, device=x.device)], 1)
            self.gram += (x.T @ x).double()
            self.cross += (y.to(dtype).T @ x).double()

    @property
    def mean_shift(self) -> torch.Tensor:
        """The mean of ``y - output`` per output channel: what bias compensation adds."""
        return (self.target_sum - self.output_sum) / max(self.rows, 1)

    @property
    def relative_error(self) -> float:
        """``Σ‖y - output‖² / Σ‖y‖²`` of the layer as it was when the pairs were recorded."""
        return float(self.error_squares / self.target_squares.clamp_min(1e-30))

    def solve(self, ridge: float, intercept: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
        """``(weight (m, k), bias (m,) or None, relative error)`` minimising
        ``Σ‖y - weight x - bias‖² + ridge · mean(diag Σxxᵀ) · ‖weight‖²``, in float64.

        The ridge term (a fraction of the mean input energy, never applied to the bias) keeps
        the solution stable where inputs are nearly collinear; it grows tenfold until the
        system is positive definite. The error is the fit's relative error on the pairs."""
        k = self.gram.shape[0] - 1
        size = k + 1 if intercept else k
        gram, cross = self.gram[:size, :size], self.cross[:, :size]
        scale = float(torch.diagonal(self.gram)[:k].mean().clamp_min(1e-12))
        damping = torch.zeros(size, dtype=torch.float64, device=gram.device)
        damping[:k] = scale
        factor, info = torch.linalg.cholesky_ex(gram + ridge * torch.diag(damping))
        step = ridge
        while int(info) != 0:
            step = max(step * 10, 1e-8)
            factor, info = torch.linalg.cholesky_ex(gram + step * torch.diag(damping))
        solution = torch.cholesky_solve(cross.T, factor).T  # (m, size)
        error = self.target_squares - 2 * (solution * cross).sum() + (solution @ gram * solution).sum()
        relative = float(error.clamp_min(0) / self.target_squares.clamp_min(1e-30))
        return solution[:, :k], (solution[:, k] if intercept else None), relative
