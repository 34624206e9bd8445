"""Shared knob handling for strategies that can act at more than one stage."""
from __future__ import annotations

from prunekit.pruner import Site, Stage
from prunekit.pruner import POSITION_POLICIES


def single_site(stage: str, layer: int | None, allowed: tuple[Stage, ...], strategy: str) -> Site:
    """The site for ``stage``; ``layer`` defaults to 2 inside the LLM and must be given inside the encoder."""
    if stage not in {s.value for s in Stage}:
        raise ValueError(f"{strategy}: unknown stage={stage!r}; the stages are {', '.join(s.value for s in Stage)}")
    stage = Stage(stage)
    if stage not in allowed:
        raise ValueError(f"{strategy} acts at {', '.join(map(str, allowed))}; got stage={stage}")
    if stage is Stage.VISION_LAYER and layer is None:
        raise ValueError(f"{strategy} at stage=vision_layer needs layer=<encoder layer whose output it prunes>")
    if stage is Stage.LLM_LAYER and layer is None:
        layer = 2
    return Site(stage, layer if stage in (Stage.LLM_LAYER, Stage.VISION_LAYER) else None)


def default_policy(site: Site, positions: str | None) -> str:
    """Pre-LLM pruning rebuilds a short prompt (compact); in-LLM pruning keeps original positions (FastV-style)."""
    if positions is not None:
        if positions not in POSITION_POLICIES:
            raise ValueError(f"unknown positions={positions!r}; choose one of {POSITION_POLICIES}")
        return positions
    return "original" if site.stage is Stage.LLM_LAYER else "compact"


def convention(site: Site) -> str:
    return "n_final" if site.stage is Stage.LLM_LAYER else "n_in"


def needs_cls(adapter, method: str) -> str | None:
    """The reason a [CLS]-attention method cannot run on a tower without [CLS] (Qwen2-VL), else None."""
    if adapter.vision_prefix_tokens < 1:
        return f"{method} ranks patches by [CLS] attention, and this vision tower has no [CLS] token"
    return None
