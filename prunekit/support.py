"""Which strategy runs on which model family: ``prunekit.support_matrix()`` and the table in docs/support.md.

Every registered strategy is built at its defaults (its paper setting) and attached to a structural twin of
each family: a tiny random-weight model of the family's own class with the real checkpoint's depths and
token counts (LLaVA-1.5-7B: 24 CLIP layers, 576 tokens, 32 LM layers; LLaVA-NeXT: the same CLIP tower in
anyres; Qwen2-VL / 2.5-VL-7B: 32 ViT blocks, 28 LM layers, 2.5's full-attention blocks 7/15/23/31). attach()
checks everything that depends on the model (sites, signals, budgets, the strategy's own ``supports``), so a
refusal here is the refusal a real checkpoint gets, with the same message.

    python -m prunekit.support            # print the markdown table (docs/support.md holds a copy; a test
                                          # keeps the two equal)
"""
from __future__ import annotations

import functools

from .registry import build_strategy, list_strategies
from .runtime import PruningError, attach

VARIANTS = {  # strategies whose support depends on a knob: extra rows besides their defaults
    "pooling (stage=projector_output)": {"name": "pooling", "stage": "projector_output"},
    "pooling (stage=llm_layer)": {"name": "pooling", "stage": "llm_layer"},
    "visionzip (cls=false)": {"name": "visionzip", "cls": False},
}


@functools.cache
def family_models() -> dict:
    """family -> (model, processor): a structural twin of its 7B checkpoint (random weights, tiny widths)."""
    from .tiny import (build_tiny_internvl, build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_5_vl,
                       build_tiny_onevision, build_tiny_qwen2_vl, build_tiny_qwen3_5, build_tiny_qwen3_vl)

    return {
        "llava-1.5": build_tiny_llava(image_size=336, vision_layers=24, text_layers=32),
        "llava-next": build_tiny_llava_next(image_size=336, vision_layers=24, text_layers=32),
        "qwen2-vl": build_tiny_qwen2_vl(vision_layers=32, text_layers=28),
        "qwen2.5-vl": build_tiny_qwen2_5_vl(vision_layers=32, text_layers=28, fullatt_block_indexes=[7, 15, 23, 31]),
        "internvl": build_tiny_internvl(tile_size=448, max_tiles=12, vision_layers=24, text_layers=28),
        "qwen3-vl": build_tiny_qwen3_vl(vision_layers=27, text_layers=36, deepstack_layers=(8, 16, 24)),
        "llava-onevision": build_tiny_onevision(crop_size=384, vision_layers=26, text_layers=28),
        "qwen3.5": build_tiny_qwen3_5(vision_layers=27, text_layers=32),
    }


def twin_knobs() -> dict[str, dict]:
    """Knobs that name an auxiliary checkpoint get the twins' counterpart: CDPruner's CLIP text encoder is the tiny
    CLIP whose vision width matches the twins' towers (a real checkpoint takes the openai CLIP of its tower)."""
    from .tiny import tiny_clip_text_dir

    return {"cdpruner": {"text_encoder": str(tiny_clip_text_dir())}}


def support_matrix(strategies: dict | None = None) -> dict[str, dict[str, str | None]]:
    """{row: {family: None if it attaches, else the reason attach() gives}}.

    ``strategies`` maps row names to a strategy name or a config dict; default: every registered strategy at
    its defaults plus ``VARIANTS``.
    """
    rows = strategies if strategies is not None else {**{n: n for n in list_strategies()}, **VARIANTS}
    matrix, knobs = {}, twin_knobs()
    for row, spec in rows.items():
        matrix[row] = {}
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        spec = {**knobs.get(spec["name"], {}), **spec}
        for family, (model, processor) in family_models().items():
            try:
                attach(model, build_strategy(spec), processor=processor).detach()
                matrix[row][family] = None
            except (PruningError, ValueError) as err:
                matrix[row][family] = str(err)
    return matrix


def support_table(matrix: dict[str, dict[str, str | None]] | None = None) -> str:
    """The matrix as markdown: a yes/no table, then each refusal's reason."""
    matrix = support_matrix() if matrix is None else matrix
    families = list(next(iter(matrix.values())))
    lines = ["| strategy | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    reasons = []
    for row, cells in matrix.items():
        marks = []
        for family in families:
            if cells[family] is None:
                marks.append("yes")
            else:
                reasons.append(f"- **{row}** on {family}: {cells[family]}")
                marks.append(f"no ({len(reasons)})")
        lines.append(f"| {row} | " + " | ".join(marks) + " |")
    return "\n".join(lines + ["", "Refusals, as attach() words them:", ""]
                     + [f"{i}. {r[2:]}" for i, r in enumerate(reasons, 1)]) + "\n"


if __name__ == "__main__":
    print(support_table(), end="")
