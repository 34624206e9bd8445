"""Shared knob handling for strategies that can act at more than one stage."""
from __future__ import annotations

from prunekit import Site, Stage


def single_site(stage: str, layer: int | None, allowed: tuple[Stage, ...], strategy: str) -> Site:
    stage = Stage(stage)
    if stage not in allowed:
        raise ValueError(f"{strategy} acts at {', '.join(map(str, allowed))}; got stage={stage}")
    return Site(stage, layer if stage in (Stage.LLM_LAYER, Stage.VISION_LAYER) else None)


def default_policy(site: Site, positions: str | None) -> str:
    """Pre-LLM pruning rebuilds a short prompt (compact); in-LLM pruning keeps original positions (FastV-style)."""
    if positions is not None:
        return positions
    return "original" if site.stage is Stage.LLM_LAYER else "compact"


def convention(site: Site) -> str:
    return "n_final" if site.stage is Stage.LLM_LAYER else "n_in"
