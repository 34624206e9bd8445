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

    def __init__(self, what: str):
        from .compat import TESTED_RANGE, version_note

        super().__init__(
            f"{what}. This is {version_note()}: the installed transformers no longer calls the model the way "
            "prunekit's hooks expect, so no result is returned. Install a tested transformers "
            f"(pip install 'transformers{TESTED_RANGE}'), run `python -m prunekit.doctor`, and report the version.")
