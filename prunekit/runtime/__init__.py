from .attach import PruningError, PruningHandle, attach

__all__ = ["attach", "PruningHandle", "PruningError"]
