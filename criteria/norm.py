"""Network slimming: the magnitude of normalisation scales (Liu et al., ICCV 2017)."""
from __future__ import annotations

from .magnitude import L1


class BNScale(L1):
    """``|gamma|`` of the group's normalisation layers (members with role ``"scale"``).

    Several norms in one group (e.g. the BNs along a residual stream) are combined with
    :func:`~graphprune.criteria.base.combine`. A group without a norm layer falls back to :class:`L1`
    (no error); the ids of such groups are recorded in ``fallback_groups``.
    """

    def __init__(self):
        super().__init__()
        self.name = "bn_scale"
        self.fallback_groups: list = []

    def prepare(self, model, report) -> None:
        self.fallback_groups = []
        super().prepare(model, report)

    def read(self, group) -> list:
        scales = [m for m in group.members if m.role == "scale"]
        if scales:
            return scales
        if group.id not in self.fallback_groups:
            self.fallback_groups.append(group.id)
        return super().read(group)

    def __repr__(self) -> str:
        return "BNScale()"
