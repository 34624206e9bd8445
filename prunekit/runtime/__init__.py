"""The runtime: hooks on one model instance that make a strategy prune (``attach``), one job per module."""
from ..errors import PruningError
from .handle import PruningHandle, attach

__all__ = ["attach", "PruningHandle", "PruningError"]
