"""Guards: what pruning cannot serve is refused, and a call the hooks did not see as they assume raises a
SeamError instead of giving a result (docs/support.md, "Never silently wrong")."""
from __future__ import annotations

import functools

from torch import Tensor

from .. import compat
from ..errors import BudgetError, UnsupportedInputError
from ..trace import PruneTrace
from .state import VisionPass


class GuardsMixin:
    def _capture_inputs(self, kwargs: dict, input_ids: Tensor | None = None, args: tuple = (),
                        outer: bool = True) -> compat.CallFacts:
        """Remember what the adapter needs to lay images out (LLaVA-NeXT's image_sizes) and the prompt ids (the
        instructions), from whichever call carries the pixels first (generate, the top model, the multimodal
        model); returns what the call carries. An inner call (the multimodal model, which may get inputs_embeds
        from the top model) adds prompt ids only where the outer call gave none."""
        facts = compat.CallFacts.read(kwargs, args)
        if facts.video:
            if self.adapter.video_token_id is None:
                raise UnsupportedInputError(f"prunekit prunes images on {self.adapter.describe()}, not videos "
                                            "(pixel_values_videos); docs/support.md lists the families that take video")
            if facts.pixels:
                raise UnsupportedInputError("this call holds images and a video; prunekit prunes one modality per call "
                                            "(each runs its own vision pass): pass the images and the video separately")
        if facts.pixels or facts.video:
            self._inputs = self.adapter.capture_vision_inputs(kwargs)
            ids = facts.input_ids if facts.input_ids is not None else input_ids
            if outer or ids is not None:
                self._prompt = (ids, facts.attention_mask)
            self._pixels_pending = True
        return facts

    def _forget_prompt(self, *_) -> None:
        """After a top-level call, generate or the multimodal model: its prompt ids must not serve a later call (a
        direct get_image_features would otherwise read another batch's instructions)."""
        self._prompt = (None, None)

    def _check_budget(self, trace: PruneTrace) -> None:
        """A budget no sample with images can meet is an error, not a silent keep-all (the per-image check at
        attach covers vision-side budgets on fixed-size images; this one every stage and family)."""
        budget = self.strategy.budget
        if budget is None or not self.strategy.budget_is_target:
            return
        for b, n in enumerate(trace.n_vanilla):
            if 0 < n < budget.tokens:
                raise BudgetError(
                    f"{self.strategy.name!r}: budget {budget.tokens} exceeds the {n} visual tokens of sample {b}; "
                    f"use a budget <= {n} (it is a count of visual tokens under the {budget.convention} convention)")

    # --- guards -----------------------------------------------------------------------------------
    def _on_top_forward(self, module, args, kwargs):
        if self._capture_inputs(kwargs, args=args).labels:
            raise UnsupportedInputError(
                "labels are not supported with pruning attached: the pruned sequence no longer lines up with "
                "the labels (training through pruning is not implemented). Detach the strategy for a loss."
            )

    def _guarded_generate(self, generate):
        @functools.wraps(generate)
        def guarded(*args, **kwargs):
            request = compat.GenerateRequest.read(self.model, args, kwargs)
            if request.num_beams > 1:
                raise UnsupportedInputError("beam search is not supported with pruning attached (beams reorder the "
                                            "per-sample pruned caches); use greedy or sampling (num_beams=1)")
            if request.assisted:
                raise UnsupportedInputError("assisted / speculative decoding is not supported with pruning attached")
            if request.prefill_chunk_size:
                raise UnsupportedInputError("chunked prefill is not supported with pruning attached")
            if request.cache_implementation not in (None, "dynamic"):
                raise UnsupportedInputError(
                    f"cache_implementation={request.cache_implementation!r} is not supported: pruning gives "
                    "layers KV caches of different lengths, which needs the dynamic cache"
                )
            self._capture_inputs(kwargs, request.input_ids)
            self._generate_prefills = 0
            try:
                out = generate(*args, **kwargs)
                self._check_generate(request)
            finally:
                self._generate_prefills = None
                self._forget_prompt()
            return out

        return guarded

    # --- runtime guards: never a result built on hooks that did not see what they assume ------------
    def _check_generate(self, request: compat.GenerateRequest) -> None:
        if request.input_ids is None:
            return
        with_images = self.adapter.visual_token_mask(request.input_ids).any(1)
        if not bool(with_images.any()):
            return
        if self._generate_prefills == 0 or self.trace is None:
            raise compat.seam_error("generate() ran with image tokens in the prompt, but no prefill of the language model "
                                    "was seen by prunekit's hooks")
        self._check_counts(with_images.cpu(), self.trace)

    def _check_counts(self, with_images: Tensor, trace: PruneTrace) -> None:
        """n_in > 0 for every sample that has image tokens."""
        n_in = trace.llm_layer_counts[:, 0] if trace.llm_layer_counts is not None else None
        if n_in is None or len(n_in) != len(with_images):
            raise compat.seam_error(f"the trace counts {0 if n_in is None else len(n_in)} samples for a batch of "
                                    f"{len(with_images)}")
        empty = (with_images & (n_in == 0)).nonzero().squeeze(1).tolist()
        if empty:
            raise compat.seam_error(f"samples {empty} have image tokens but prunekit saw n_in = 0 visual tokens entering "
                                    "the language model")

    def _check_prefill_seen(self, span: Tensor, vision: "VisionPass | None") -> None:
        if self._generate_prefills is not None:
            self._generate_prefills += 1
            if self._generate_prefills > 1:
                raise compat.seam_error(
                    "a second prefill started inside one generate() call: a decode step looked like a prefill "
                    "(the language model's KV cache was not seen under the name prunekit reads)")
        pending, self._pixels_pending = self._pixels_pending, False
        if pending and bool(span.any()) and (vision is None or vision.pixel_values is None):
            raise compat.seam_error("pixel values were passed, but the image features reached the language model without "
                                    "going through the vision tower prunekit hooks (a path the adapter does not know)")

    def _after_llm(self, module, args, kwargs, output):
        passed, self._passed_cache = self._passed_cache, None
        if passed is not None and compat.cache_length(passed) == 0:
            raise compat.seam_error("the KV cache prunekit passed to the language model was left empty: the model did not "
                                    "take it under the name prunekit passes it")
