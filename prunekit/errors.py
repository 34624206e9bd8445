"""prunekit's errors: one base, ``PruningError``, and the kinds a caller may want to tell apart.

Every kind subclasses the builtin a caller caught before it existed (``KeyError`` for an unknown name,
``TypeError`` for an unsupported model class or a knob's type, ``ValueError`` for a bad budget, knob or input),
so existing ``except`` clauses keep working. ``SeamError`` is the runtime guard (docs/support.md).
"""
from __future__ import annotations


class PruningError(RuntimeError):
    """A use of an attached model that prunekit cannot serve correctly (yet)."""


class UnknownStrategyError(PruningError, KeyError):
    """A strategy name the registry does not hold (the message lists the registered ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(PruningError, TypeError):
    """A model class prunekit has no adapter for, or a family a strategy cannot run on."""


class UnsupportedInputError(PruningError, ValueError):
    """An input or a decoding mode that pruning cannot serve (labels, beams, video, a foreign cache, ...)."""


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
