"""Instructions before the language model: each vision unit's sample and that sample's instruction text, for
strategies that declare ``Signals(instruction=True)`` (MMTok, CDPruner; docs/architecture.md, "Instructions")."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PruningError
from ..pruner import Instruction, Site
from .layout import match_images
from .state import VisionPass


class InstructionsMixin:
    @contextmanager
    def instructions(self, texts: Sequence[str]):
        """Give each batch row's instruction explicitly for the calls inside, instead of reading it off the prompt
        (the evaluator passes its prompts: exact, whatever the tokenizer's decoding does)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("instructions() takes one string per batch row, e.g. [prompt_0, prompt_1]")
        previous, self._given_instructions = self._given_instructions, list(texts)
        try:
            yield self
        finally:
            self._given_instructions = previous

    def _needs_instruction(self, site: Site) -> bool:
        request = self.strategy.signals(site)
        return request is not None and request.instruction

    def _instruction_source(self, site: Site, vision: VisionPass):
        """A callable unit -> Instruction for a site that declared it (else None), resolved on first use; the units
        of one image share one Instruction."""
        if not self._needs_instruction(site):
            return None
        cache: list[Instruction] = []

        def instruction(unit: int) -> Instruction:
            if not cache:
                texts = self._sample_instructions()
                made: dict[int, Instruction] = {}
                for b, image in self._unit_samples(vision, len(texts)):
                    if image not in made:
                        made[image] = self._instruction(texts[b], image)
                    cache.append(made[image])
            return cache[unit]

        return instruction

    def _instruction(self, text: str, image: int) -> Instruction:
        reader, embed = self._reader, self.adapter.input_embeddings
        device = self.adapter.language_model_device

        def ids_of(ids: list[int]) -> Tensor:
            return torch.tensor(ids, dtype=torch.long, device=device)

        return Instruction(text, ids_of(reader.ids(text)), image, reader.bos, encode=lambda t: ids_of(reader.ids(t)),
                           encode_words=lambda words: ids_of(reader.words(words)),
                           embed=lambda ids: embed(ids.to(device)))

    def _sample_instructions(self) -> list[str]:
        name = self.strategy.name
        ids, mask = self._prompt
        if self._given_instructions is not None:
            if ids is not None and len(self._given_instructions) != len(ids):
                raise PruningError(f"{len(self._given_instructions)} instructions were given for a batch of {len(ids)}"
                                   " rows; pass one per row to handle.instructions([...])")
            return self._given_instructions
        if ids is None:
            raise PruningError(
                f"{name!r} selects visual tokens by the instruction, but this call carries no input_ids to read it "
                "from (were inputs_embeds passed?). Pass input_ids, or give the texts: "
                "`with handle.instructions([...]): model(...)`")
        image_id = self.adapter.image_token_id
        rows = [row[m.bool()] if m is not None else row for row, m in zip(ids.cpu(), mask.cpu() if mask is not None
                                                                         else [None] * len(ids))]
        return [self._reader.text(row.tolist(), image_id) for row in rows]

    def _unit_samples(self, vision: VisionPass, batch: int) -> list[tuple[int, int]]:
        """(sample, image) of each vision unit: images fill the placeholder spans in batch order, as at the LM entry
        (``layout.match_images``)."""
        ids = self._prompt[0]
        images = self._images(vision)
        lengths = [img.track.span_length for img in images]
        if ids is None:  # explicit texts and no ids: one image per row is the only unambiguous reading
            if len(images) != batch:
                raise PruningError(f"{len(images)} images for {batch} instructions and no input_ids to match them: "
                                   "pass input_ids")
            counts = lengths
        else:
            counts = self.adapter.visual_token_mask(ids).sum(1).tolist()
        per_sample, remaining = match_images(counts, lengths)
        if remaining:
            raise PruningError("the images outnumber the prompts' image placeholders; inputs do not line up")
        image_sample = {i: b for b, mine in enumerate(per_sample) for i in mine}
        return [(image_sample[i], i) for i, img in enumerate(images) for _ in img.units]
