"""Checks at attach: a strategy's sites, signals, budget and knobs against the model; refusals say why."""
from __future__ import annotations

from ..errors import BudgetError, KnobError, PruningError, UnsupportedModelError
from ..pruner import Stage

_RUNTIME_STAGES = tuple(Stage)


class ValidationMixin:
    def _validate(self) -> None:
        name = self.strategy.name
        reason = self.strategy.supports(self.adapter)
        if reason:
            raise UnsupportedModelError(f"strategy {name!r} cannot run on {self.adapter.describe()}: {reason}")
        if not self.sites:
            raise PruningError(f"strategy {name!r} declares no sites")
        for site in self.sites:
            if site.stage not in _RUNTIME_STAGES:
                raise PruningError(
                    f"strategy {name!r} acts at {site}, a stage this runtime does not serve yet "
                    f"(served: {', '.join(map(str, _RUNTIME_STAGES))})"
                )
            if site.stage is Stage.LLM_LAYER and (why := self.adapter.llm_site_refusal()):
                raise UnsupportedModelError(
                    f"strategy {name!r} cannot run on {self.adapter.describe()}: it prunes at {site}; {why}")
            if site.stage is Stage.LLM_LAYER and site.layer >= self.adapter.num_llm_layers:
                raise KnobError(
                    f"strategy {name!r} prunes before LLM layer {site.layer}, but the language model has "
                    f"{self.adapter.num_llm_layers} layers (0..{self.adapter.num_llm_layers - 1})"
                )
            feature = self.adapter.vision_feature_layer
            if (site.stage is Stage.VISION_LAYER and self.adapter.full_grid_features
                    and feature != len(self.adapter.vision_layers) - 1):
                raise UnsupportedModelError(
                    f"strategy {name!r} cannot run on {self.adapter.describe()}: it prunes at {site}, and this model "
                    f"reads its features from vision layer {feature}, not the last; the runtime puts the kept patch "
                    "groups back into the full grid only after the last layer")
            if site.stage is Stage.VISION_LAYER and site.layer >= feature:
                raise KnobError(
                    f"strategy {name!r} prunes after vision layer {site.layer}, but the projector reads the "
                    f"output of vision layer {feature}: vision_layer sites must be in 0..{feature - 1} "
                    "(to prune the features themselves use the vision_output stage)"
                )
            signals = self.strategy.signals(site)
            if signals is not None and signals.prefix and site.stage is not Stage.VISION_OUTPUT:
                raise PruningError(
                    f"strategy {name!r} asks for prefix tokens at {site}; they exist at vision_output only"
                )
            if signals is not None and signals.prompt and site.stage is not Stage.LLM_LAYER:
                raise PruningError(
                    f"strategy {name!r} asks for prompt embeddings at {site}; they exist at llm_layer sites only"
                )
            if signals is not None and signals.instruction:
                if site.stage is Stage.LLM_LAYER:
                    raise PruningError(f"strategy {name!r} asks for the instruction at {site}; inside the language "
                                       "model the text tokens are in the sequence (token_types, text_tokens())")
                if self._reader is None:
                    raise PruningError(
                        f"strategy {name!r} selects visual tokens by the instruction before the language model and "
                        f"needs the model's processor: attach(model, {name!r}, processor=processor)")
            if signals and signals.pre and site.stage is not Stage.LLM_LAYER:
                raise PruningError(
                    f"strategy {name!r} asks for pre signals (from the next block's input) at {site}; they "
                    "exist at llm_layer sites only"
                )
            if site.stage is Stage.LLM_LAYER and site.layer == 0 and signals and not signals.pre:
                raise PruningError(
                    f"strategy {name!r} asks for attention signals at llm_layer[0]; they come from the layer "
                    "before the cut, and there is none. Prune at llm_layer >= 1, or score block 0 on its "
                    "input with Signals(pre=True)."
                )
        if len(set(self.sites)) != len(self.sites):
            raise PruningError(f"strategy {name!r} lists a site twice: {self.sites}")
        budget, per_image = self.strategy.budget, self.adapter.tokens_per_image()
        vision_side = any(s.stage is not Stage.LLM_LAYER for s in self.sites)
        if budget is not None and vision_side and per_image is not None and budget.tokens > per_image:
            raise BudgetError(
                f"budget {budget.tokens} exceeds the {per_image} visual tokens per image of this model; "
                f"use a budget <= {per_image} ({per_image} keeps every token)"
            )
        if self.strategy.image_newlines not in ("keep", "drop"):
            raise KnobError(f"strategy {name!r} has image_newlines={self.strategy.image_newlines!r}; use 'keep' or 'drop'")
        if self.strategy.position_policy not in ("compact", "original"):
            raise KnobError(f"strategy {name!r} has unknown position_policy {self.strategy.position_policy!r}")
