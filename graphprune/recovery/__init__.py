"""Recovery after pruning, without training: refit what stays on calibration data.

:class:`Recovery` (``prune(..., calibration=batches, recover="lstsq")``) refits every layer
whose input lost channels so that it gives the original model's output again
(:mod:`.recovery`); :mod:`.layers` says which layers and how, :mod:`.statistics` holds the
streaming sums and the least-squares solution.
"""
from .recovery import METHODS, Recovery, check_recovery

__all__ = ["Recovery", "METHODS", "check_recovery"]
