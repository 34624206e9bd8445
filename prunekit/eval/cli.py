"""What the Hydra entry points do before Hydra composes: plugins, strategy config nodes, resolvers, checks.

Hydra resolves ``strategy=<name>`` against the ``strategy`` config group before any user code runs
(environment.md §3.9). So the entry point first imports ``plugins=[...]`` from the command line, then
gives every registered strategy without a YAML file a config node generated from its constructor's
defaults (Hydra's ConfigStore), and checks strategy names and knobs so a typo gets the list of what exists.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..registry import get_strategy_class, list_strategies, load_plugins

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
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


def _plugins_from_argv(argv: list[str]) -> list[str]:
    modules = []
    for arg in argv:
        m = re.fullmatch(r"\+{0,2}plugins=\[?([^\]]*)\]?", arg)
        if m:
            modules += [s.strip().strip("'\"") for s in m.group(1).split(",") if s.strip()]
    return modules


def _strategy_names(value: str) -> list[str] | None:
    """Names in ``strategy=a`` / ``a,b`` / ``choice(a,b)``; None for other sweep syntax (left to Hydra)."""
    m = re.fullmatch(r"choice\((.*)\)", value)
    value = m.group(1) if m else value
    names = [v.strip() for v in value.split(",")]
    return names if all(re.fullmatch(r"[\w.\-]+", n) for n in names) else None


def prepare(argv: list[str] | None = None) -> None:
    """Call before ``@hydra.main`` runs: import plugins, register config nodes and resolvers, check names."""
    from hydra.core.config_store import ConfigStore

    argv = sys.argv[1:] if argv is None else argv
    load_plugins(_plugins_from_argv(argv))
    registered = list_strategies()
    store = ConfigStore.instance()
    for name in registered:
        if not (CONFIG_DIR / "strategy" / f"{name}.yaml").exists():
            store.store(group="strategy", name=name, node=strategy_node(name))
    if not OmegaConf.has_resolver("prunekit_run_name"):
        OmegaConf.register_new_resolver("prunekit_run_name", run_name)
    _check_strategies(argv, registered)


def _check_strategies(argv: list[str], registered: list[str]) -> None:
    chosen = None
    for arg in argv:
        m = re.fullmatch(r"strategy=(.+)", arg)
        if m:
            chosen = _strategy_names(m.group(1))
            for name in chosen or []:
                if name not in registered:
                    close = difflib.get_close_matches(name, registered, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    _fail(f"unknown strategy {name!r}.{hint} Registered strategies: {', '.join(registered)}. "
                          "A strategy defined outside prunekit runs with plugins=[my_pkg.my_module].")
    for arg in argv:
        m = re.fullmatch(r"strategy\.(\w+)=.*", arg)
        if not m:
            continue
        for name in chosen or []:
            knobs = [k for k in strategy_node(name) if k != "name"]
            if m.group(1) not in knobs:
                _fail(f"strategy {name!r} has no knob {m.group(1)!r}; its knobs: {', '.join(knobs)}. "
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
    overrides = [o for o in _root_.hydra.overrides.task
                 if not re.match(r"\+{0,2}(data\.root|model\.path|plugins|logger|output_root|sweep_name|experiment|hydra)", o)]
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
