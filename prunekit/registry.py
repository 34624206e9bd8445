"""Strategy registry, timm style: ``@register_strategy("name")``, ``build_strategy``, ``list_strategies``.

Built-in strategies live in the top-level ``strategies`` package. Third-party ones are found through
the ``prunekit.strategies`` entry-point group or by importing their module (``load_plugins``).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Iterable

from .pruner import TokenPruner

ENTRY_POINT_GROUP = "prunekit.strategies"
_REGISTRY: dict[str, type[TokenPruner]] = {}
_discovered = False


def register_strategy(name: str):
    """Class decorator: register a ``TokenPruner`` subclass under ``name``."""

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, TokenPruner)):
            raise TypeError(f"@register_strategy({name!r}) must decorate a TokenPruner subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            other = _REGISTRY[name]
            raise ValueError(
                f"strategy name {name!r} is already registered by {other.__module__}.{other.__qualname__}; "
                "pick another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import modules that register strategies (e.g. ``["my_pkg.my_module"]``)."""
    for mod in modules:
        importlib.import_module(mod)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("strategies")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def list_strategies(pattern: str = "*") -> list[str]:
    """Sorted names of the registered strategies, optionally filtered by a glob pattern."""
    _discover()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_strategy_class(name: str) -> type[TokenPruner]:
    _discover()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown strategy {name!r}.{hint} Registered strategies: {', '.join(list_strategies())}. "
            "Strategies outside prunekit must be imported first (plugins=[...] or the "
            f"{ENTRY_POINT_GROUP!r} entry point)."
        )
    return _REGISTRY[name]


def build_strategy(name_or_cfg: str | Mapping[str, Any], **params: Any) -> TokenPruner:
    """Build a strategy from a name and keyword knobs, or from a dict/DictConfig with a ``name`` key."""
    if isinstance(name_or_cfg, str):
        name = name_or_cfg
    else:
        cfg = _to_dict(name_or_cfg)
        if "name" not in cfg:
            raise KeyError(f"strategy config needs a 'name' key; got keys {sorted(cfg)}")
        name = cfg.pop("name")
        params = {**cfg, **params}
    cls = get_strategy_class(name)
    try:
        return cls(**params)
    except TypeError as e:
        raise TypeError(f"cannot build strategy {name!r} with {params}: {e}") from e


def _to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)
