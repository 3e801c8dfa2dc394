"""Channel importance criteria. ``get_criterion("l1")`` returns a ready criterion.

Names in :data:`CRITERIA`: ``l1``, ``l2`` (weight magnitude), ``fpgm`` (distance to the
geometric median), ``bn_scale`` (``|gamma|`` of norm layers), ``group_norm`` (the L2 norm of
each channel over its whole group, after sparse training), ``random`` (seeded),
``taylor`` (first-order Taylor, needs data), ``k_l1``, ``k_taylor`` (needs data),
``k_distance`` (K-means family), ``wanda`` and ``flap`` (weights times calibration
input statistics, need data), ``obs`` (the error a least-squares refit cannot recover,
needs data). A criterion that needs data is built from its name on ``prune``'s
``calibration`` batches; otherwise pass an instance, e.g. ``criterion=Taylor(data_loader)``.
Scores computed elsewhere rank through :class:`Precomputed`. A :class:`WeightCriterion`
(``l1``, ``l2``, ``bn_scale``, and ``wanda`` and ``flap`` after their data pass) reads one
tensor at a time, so it scores a checkpoint shard
by shard (:func:`graphprune.prune_checkpoint`).
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

from .activation import Fluctuation, Wanda
from .base import Criterion, WeightCriterion
from .geometric import FPGM
from .group_norm import GroupL2Norm
from .kmeans import KL1, KDistance, KMeansCriterion, KTaylor
from .magnitude import L1, L2
from .norm import BNScale
from .precomputed import Precomputed
from .randomized import Random
from .reconstruction import OBS
from .taylor import Taylor

CRITERIA: dict = {
    "l1": L1,
    "l2": L2,
    "fpgm": FPGM,
    "bn_scale": BNScale,
    "group_norm": GroupL2Norm,
    "random": Random,
    "taylor": Taylor,
    "k_l1": KL1,
    "k_taylor": KTaylor,
    "k_distance": KDistance,
    "wanda": Wanda,
    "flap": Fluctuation,
    "obs": OBS,
}


def get_criterion(criterion: Union[str, Criterion], calibration: Optional[Iterable] = None) -> Criterion:
    """Build a criterion from its name, or pass an instance through.

    Parameters
    ----------
    criterion : str or Criterion
        A name of :data:`CRITERIA` (case-insensitive) or an instance, returned as it is.
    calibration : iterable of batches, optional
        The data a named criterion that needs it (``"taylor"``, ``"wanda"`` ...) is built on.

    Returns
    -------
    Criterion
        ``criterion`` itself, or a new instance of the named class.

    Raises
    ------
    TypeError
        ``criterion`` is neither a name nor a Criterion.
    ValueError
        The name is unknown, or names a criterion that needs data without ``calibration``.
    """
    if isinstance(criterion, Criterion):
        return criterion
    if not isinstance(criterion, str):
        raise TypeError(f"criterion must be a name or a Criterion instance, got {type(criterion).__name__}")
    key = criterion.lower()
    if key not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    cls = CRITERIA[key]
    if cls.requires_data and calibration is not None:
        return cls(calibration)
    if cls.requires_data:
        raise ValueError(
            f"criterion {criterion!r} needs training data and cannot be built from its name; "
            f"pass a {cls.__name__} instance instead, e.g. criterion=criteria.{cls.__name__}(data_loader)"
        )
    return cls()


__all__ = [
    "Criterion", "WeightCriterion", "Precomputed", "L1", "L2", "FPGM", "BNScale", "GroupL2Norm", "Random", "Taylor", "KMeansCriterion", "KL1", "KTaylor",
    "KDistance", "Wanda", "Fluctuation", "OBS", "CRITERIA", "get_criterion",
]
