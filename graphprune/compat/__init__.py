"""The layer-by-layer engine of the older, manual API (:mod:`.engine`), built on graphprune's groups."""
from .engine import PruningEngine

__all__ = ["PruningEngine"]
