"""prunekit's errors: one base, ``PruningError``, and the kinds a caller may want to tell apart.

Kinds that are also a bad argument subclass ``ValueError`` (and ``TypeError`` for a knob's type) too, so
``except ValueError`` / ``except TypeError`` code keeps working.
"""
from __future__ import annotations


class PruningError(RuntimeError):
    """A use of an attached model that prunekit cannot serve correctly (yet)."""


class BudgetError(PruningError, ValueError):
    """A budget that this strategy cannot meet on this model (too large, not positive, unreachable)."""


class KnobError(PruningError, ValueError, TypeError):
    """A strategy knob of the wrong type or out of its range."""


class SignalError(PruningError):
    """A signal a strategy reads that its site did not declare or cannot provide."""


class SeamError(PruningError):
    """The runtime did not see what its hooks assume: transformers' internals differ from the tested ones.

    Raised instead of returning a result that would look right and be wrong (e.g. nothing pruned).
    """

    def __init__(self, what: str, installed: str, tested: str):
        super().__init__(
            f"{what}. This is transformers {installed} (prunekit is tested on transformers{tested}): the installed "
            "transformers no longer calls the model the way prunekit's hooks expect, so no result is returned. "
            f"Install a tested transformers (pip install 'transformers{tested}'), run `python -m prunekit.doctor`, "
            "and report the version.")
