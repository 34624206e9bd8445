"""Deprecated module path: ``attach`` and ``PruningHandle`` live in ``prunekit.runtime.handle`` (use
``prunekit.attach``). Kept so ``from prunekit.runtime.attach import ...`` still works."""
import warnings

from ..errors import PruningError  # noqa: F401
from .handle import PruningHandle, attach  # noqa: F401

warnings.warn("prunekit.runtime.attach is deprecated: import attach / PruningHandle from prunekit",
              DeprecationWarning, stacklevel=2)
