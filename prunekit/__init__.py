"""prunekit: visual-token pruning for vision-language models, side by side and fairly measured."""
from .adapters import adapter_for, supported_families
from .budget import Budget
from .pruner import Instruction, Keep, PromptEmbeddings, PruneContext, Site, Stage, TokenPruner, TokenType
from .registry import build_strategy, list_strategies, load_plugins, register_strategy
from .runtime import PruningError, PruningHandle, attach
from .errors import (BudgetError, KnobError, SeamError, SignalError, UnknownStrategyError, UnsupportedInputError,
                     UnsupportedModelError)
from .signals import AttentionRows, Signals
from .trace import PruneTrace

__all__ = [
    "TokenPruner", "Stage", "Site", "Keep", "Instruction", "PromptEmbeddings", "PruneContext", "TokenType", "Budget",
    "Signals", "AttentionRows", "SignalError",
    "register_strategy", "build_strategy", "list_strategies", "load_plugins",
    "attach", "PruningHandle", "PruneTrace",
    "PruningError", "BudgetError", "KnobError", "SeamError", "UnknownStrategyError", "UnsupportedInputError",
    "UnsupportedModelError",
    "adapter_for", "supported_families", "support_matrix",
]
__version__ = "0.2.0"


def __getattr__(name):  # support_matrix builds tiny models: import it on first use only
    if name == "support_matrix":
        from .support import support_matrix

        return support_matrix
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
