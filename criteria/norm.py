"""Network slimming: the magnitude of normalisation scales (Liu et al., ICCV 2017)."""
from __future__ import annotations

import numpy as np

from .base import Criterion, combine, coverage, per_channel, position_norms
from .magnitude import L1


class BNScale(Criterion):
    """``|gamma|`` of the group's normalisation layers (members with role ``"scale"``).

    Several norms in one group (e.g. the BNs along a residual stream) are combined with
    :func:`~graphprune.criteria.base.combine`. A group without a norm layer falls back to :class:`L1`
    (no error); the ids of such groups are recorded in ``fallback_groups``.
    """

    name = "bn_scale"

    def __init__(self):
        self._l1 = L1()
        self.fallback_groups: list = []

    def prepare(self, model, report) -> None:
        self.fallback_groups = []

    def scores(self, group) -> np.ndarray:
        scales = [m for m in group.members if m.role == "scale"]
        if not scales:
            if group.id not in self.fallback_groups:
                self.fallback_groups.append(group.id)
            return self._l1.scores(group)
        per_member = [per_channel(m, position_norms(m, 1), group.size) for m in scales]
        return combine(per_member, group.size, [coverage(m, group.size) for m in scales])
