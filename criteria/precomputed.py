"""Scores computed elsewhere: from a checkpoint read shard by shard, or by the user's own code."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .base import Criterion


class Precomputed(Criterion):
    """The scores given, one array per group id (``{group.id: scores}``, ``group.size`` each).

    It reads no tensor, so it ranks the channels of a model on the meta device:
    :func:`graphprune.prune_checkpoint` prunes a meta model with the scores it computed from
    the checkpoint's weights. A group without scores raises ValueError when it is ranked.

    Parameters
    ----------
    scores : mapping of int to array_like
        ``{group id: scores}``, ``group.size`` values each (flattened, as float64).

    Raises
    ------
    TypeError
        ``scores`` is not a mapping.
    """

    name = "precomputed"
    reads_values = False

    def __init__(self, scores: Mapping[int, np.ndarray]):
        if not isinstance(scores, Mapping):
            raise TypeError(f"scores must be a mapping from group id to an array, got {type(scores).__name__}")
        self.given = {int(k): np.asarray(v, dtype=np.float64).ravel() for k, v in scores.items()}

    def scores(self, group) -> np.ndarray:
        if group.id not in self.given:
            raise ValueError(f"no scores given for group {group.id} ({group.root})")
        values = self.given[group.id]
        if values.size != group.size:
            raise ValueError(f"group {group.id} ({group.root}) has {group.size} channels, but {values.size} scores were given")
        return values

    def __repr__(self) -> str:
        return f"Precomputed({len(self.given)} groups)"
