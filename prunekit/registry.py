"""Strategy registry, timm style: ``@register_strategy("name")``, ``build_strategy``, ``list_strategies``.

Built-in strategies live in ``prunekit.strategies`` (the repository's top-level ``strategies/`` folder). Third-party ones are found through
the ``prunekit.strategies`` entry-point group or by importing their module (``load_plugins``).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import types
import typing
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Iterable

from .errors import KnobError, UnknownStrategyError
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
    importlib.import_module("prunekit.strategies")
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
        raise UnknownStrategyError(
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
            raise UnknownStrategyError(f"strategy config needs a 'name' key; got keys {sorted(cfg)}")
        name = cfg.pop("name")
        params = {**cfg, **params}
    cls = get_strategy_class(name)
    check_knobs(cls, params)
    try:
        return cls(**params)
    except TypeError as e:
        raise KnobError(f"cannot build strategy {name!r} with {params}: {e}") from e


_SCALARS = {bool: "a boolean (true / false)", int: "an integer (a whole number)", float: "a number", str: "a string"}


def check_knobs(cls: type[TokenPruner], params: Mapping[str, Any]) -> None:
    """Refuse a knob whose value does not have the type its constructor annotation declares (bool, int, float,
    str, or one of them | None): ``batch_coupled="false"`` would otherwise be stored as a truthy string."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be evaluated: nothing to check against
        return
    for knob, value in params.items():
        allowed = _scalar_types(hints.get(knob))
        if allowed is None or any(_is(value, t) for t in allowed):
            continue
        wanted = " or ".join(_SCALARS.get(t, "none") for t in allowed)
        raise KnobError(f"strategy {getattr(cls, 'name', cls.__name__)!r}: knob {knob}={value!r} "
                        f"({type(value).__name__}) must be {wanted}")


def _scalar_types(hint) -> tuple | None:
    """The scalar types a hint admits (type(None) included), or None when it is not a plain scalar hint."""
    if hint in _SCALARS:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if all(a in _SCALARS or a is type(None) for a in args):
            return args
    return None


def _is(value: Any, kind: type) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of a mapping (an omegaconf DictConfig included: read by duck typing, so the core needs no
    omegaconf), nested mappings and lists made plain too."""
    return {str(k): _plain(v) for k, v in cfg.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _to_dict(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value
