"""What the Hydra entry points do before Hydra composes: plugins, strategy config nodes, resolvers, checks.

Hydra resolves ``strategy=<name>`` against the ``strategy`` config group before any user code runs
(it composes the config first). So the entry point first imports ``plugins=[...]`` from the command line, then
gives every registered strategy without a YAML file a config node generated from its constructor's
defaults (Hydra's ConfigStore), and checks strategy names and knobs so a typo gets the list of what exists.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..registry import get_strategy_class, list_strategies, load_plugins

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data (the checkout's configs/ folder)
# keys that do not change a run's results (they are left out of its fingerprint)
NON_SEMANTIC = ("hydra", "logger", "output_root", "sweep_name")


def strategy_node(name: str) -> dict:
    """The strategy's config: its YAML in configs/strategy/, else its constructor defaults."""
    path = CONFIG_DIR / "strategy" / f"{name}.yaml"
    if path.exists():
        return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]
    node = {"name": name}
    for p in list(inspect.signature(get_strategy_class(name).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is p.empty else p.default
        node[p.name] = list(default) if isinstance(default, tuple) else default
    return node


def parse_overrides(argv: list[str]) -> list:
    """Hydra's own parse of the command line's overrides (flags such as ``-m`` left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])


def _values(override) -> list[str] | None:
    """The values an override names: one, or each of a sweep (``a,b``, ``choice(a,b)``); None for ranges,
    intervals and globs (left to Hydra)."""
    if not override.is_sweep_override():
        value = override.value()
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if override.is_choice_sweep():
        return list(override.sweep_string_iterator())
    return None


def _plugins(overrides) -> list[str]:
    return [m for o in overrides if o.key_or_group == "plugins" for m in (_values(o) or [])]


def prepare(argv: list[str] | None = None) -> None:
    """Call before ``@hydra.main`` runs: import plugins, register config nodes, check names."""
    from hydra.core.config_store import ConfigStore

    argv = sys.argv[1:] if argv is None else argv
    overrides = parse_overrides(argv)
    load_plugins(_plugins(overrides))
    registered = list_strategies()
    store = ConfigStore.instance()
    for name in registered:
        if not (CONFIG_DIR / "strategy" / f"{name}.yaml").exists():
            store.store(group="strategy", name=name, node=strategy_node(name))
    _check_strategies(overrides, registered)


def _check_strategies(overrides, registered: list[str]) -> None:
    chosen = None
    for o in overrides:
        if o.key_or_group == "strategy":
            chosen = _values(o)
            for name in chosen or []:
                if name not in registered:
                    close = difflib.get_close_matches(name, registered, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    _fail(f"unknown strategy {name!r}.{hint} Registered strategies: {', '.join(registered)}. "
                          "A strategy defined outside prunekit runs with plugins=[my_pkg.my_module].")
    for o in overrides:
        key = o.key_or_group.split(".")
        if key[0] != "strategy" or len(key) != 2:
            continue
        for name in chosen or []:
            knobs = [k for k in strategy_node(name) if k != "name"]
            if key[1] not in knobs:
                _fail(f"strategy {name!r} has no knob {key[1]!r}; its knobs: {', '.join(knobs)}. "
                      f"Registered strategies: {', '.join(registered)}.")


def _fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fingerprint(cfg) -> str:
    """A short hash of everything that can change a run's results."""
    content = {k: v for k, v in cfg.items() if k not in NON_SEMANTIC}
    resolved = OmegaConf.to_container(OmegaConf.create(content), resolve=True)
    return hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(*, _root_) -> str:
    """A sweep job's directory name: its readable overrides plus the config fingerprint.

    Deterministic, so re-running an interrupted sweep finds the finished jobs (and skips them), while a
    changed config (an edited YAML) gets a fresh directory instead of overwriting old results.
    """
    unnamed = {"data.root", "model.path", "plugins", "logger", "output_root", "sweep_name", "experiment"}
    overrides = [o.input_line for o in parse_overrides(list(_root_.hydra.overrides.task))
                 if o.key_or_group not in unnamed and not o.key_or_group.startswith(("hydra", "logger."))]
    readable = ",".join(overrides).replace("/", "_")[:120] or "default"
    return f"{readable}-{fingerprint(_root_)}"


def summary_line(results: dict) -> str:
    """One line per run for the terminal: the metrics that matter, fidelity when measured, efficiency."""
    m, t, e = results.get("metrics", {}), results.get("tokens", {}), results.get("efficiency", {})
    parts = [f"{results['strategy']['name']}" + (" (random weights: accuracy is meaningless, see fidelity)"
                                                  if results.get("model", {}).get("random_weights") else "")]
    parts += [f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)]
    if "fidelity" in results:
        f = results["fidelity"]
        parts.append(f"answer_agreement={f['answer_agreement']:.3f} first_token_kl={f['first_token_kl']:.4g}")
    if t:
        parts.append(f"tokens n_in={t['n_in']:.1f} n_final={t['n_final']:.1f} n_avg={t['n_avg']:.1f} "
                     f"n_avg_out={t['n_avg_out']:.1f}")
    if e:
        parts.append(f"prefill {e['prefill_ms_median']:.1f} ms (p90 {e['prefill_ms_p90']:.1f}) "
                     f"TFLOPs {e['tflops']:.4g} ({e['flops_ratio']:.1%} of vanilla)")
    if results["counts"]["skipped"]:
        parts.append(f"skipped {results['counts']['skipped']} corrupt samples")
    return " | ".join(parts)


# Registered on import, not in ``prepare``: a job that a launcher runs in another process (submitit on Slurm)
# unpickles the task function, which imports this module, and resolves its sweep subdir there.
if not OmegaConf.has_resolver("prunekit_run_name"):
    OmegaConf.register_new_resolver("prunekit_run_name", run_name)
