"""The language model: the prefill entry cut (tokens physically removed), llm_layer cuts between decoder layers,
and the per-sample mask / position rewrite of every decode step."""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .. import compat
from ..adapters import VisualInjections
from ..errors import PruningError, UnsupportedInputError
from ..pruner import PromptEmbeddings, PruneContext, Site, Stage, TokenType, combine_seeds
from ..trace import PruneTrace, StageEvent
from .decisions import _in_sequence_order, _sequence_order
from .layout import _sample_grid
from .probe import BlockInput
from .sequence import Segment, pack, take
from .state import Prefill


class LanguageMixin:
    # --- multimodal model and LLM entry -----------------------------------------------------------
    def _on_multimodal(self, module, args, kwargs):
        self._capture_inputs(kwargs, args=args, outer=False)
        self._span = self.adapter.read_multimodal_call(args, kwargs)

    def _on_llm_entry(self, module, args, kwargs):
        self._passed_cache = None
        call = self.adapter.read_lm_call(kwargs)
        if call.inputs_embeds is None:
            raise PruningError("prunekit expects the language model to receive inputs_embeds from the multimodal model")
        stray = compat.unread_cache(module, kwargs)
        if stray is not None:
            raise compat.seam_error(f"the language model received its KV cache as {stray!r}, a name prunekit does not read")
        injections = self.adapter.take_injections(kwargs)  # added by _inject_visual, at the kept tokens
        if compat.cache_length(call.cache) == 0:
            if call.use_cache and call.cache is None:  # create it here (as the LM would) so decode steps can be matched to it
                call.cache = compat.new_cache(module.config)
            self._passed_cache = call.cache
            self._start_prefill(call, injections)
        else:
            if injections is not None:
                raise UnsupportedInputError("visual features arrived with a decode step (images after the prompt); "
                                            "prunekit prunes images of the prompt only")
            self._start_decode(call)
        self.adapter.write_lm_call(call, kwargs)
        return args, kwargs

    def _start_prefill(self, call: compat.LMCall, injections: VisualInjections | None) -> None:
        embeds, cache = call.inputs_embeds, call.cache
        batch, length = embeds.shape[:2]
        span = self._span
        self._span = None
        if span is None or span.shape != (batch, length):
            raise compat.seam_error("the language model was called without the image-token span of the multimodal model's "
                                    "forward (its hook saw no call, or a different batch)")
        device = embeds.device
        span = span.to(device)
        mask = call.attention_mask
        mask = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
        if mask.dim() != 2:
            raise UnsupportedInputError("prunekit needs a 2-D attention_mask (batch, length); got a prepared 4-D mask")
        positions = self.adapter.positions_in(call.position_ids, batch, length, device)
        entry = Segment(0, mask, positions, span & mask, torch.zeros(batch, dtype=torch.long, device=device),
                        types=_token_types(span, mask))

        trace = PruneTrace(
            strategy=self.strategy.name, batch_size=batch, num_llm_layers=self.adapter.num_llm_layers,
            budget=self.strategy.budget, position_policy=self.policy, replayed=self.replaying,
        )
        if self.policy != self.strategy.position_policy:
            trace.notes.append(f"{self.adapter.family} uses 3-D M-RoPE positions: kept tokens keep their original "
                               f"positions (the strategy's policy is {self.strategy.position_policy!r})")
        vision, self._vision = self._vision, None
        self._check_prefill_seen(span, vision)
        trace.samples, sample_images = self._sample_tracks(span, vision, trace)
        self._check_budget(trace)
        keep = ~entry.visual
        for b, track in enumerate(trace.samples):
            slots = entry.visual[b].nonzero().squeeze(1)
            keep[b, slots[track.kept.to(device)]] = True
        index, entry = entry.select(keep, self.policy, start_layer=0)
        call.inputs_embeds = take(embeds, index)
        call.attention_mask = entry.mask.long()
        call.position_ids = self.adapter.positions_out(entry.positions)
        counts = entry.visual_counts().cpu()
        trace.llm_layer_counts = counts.unsqueeze(1).repeat(1, self.adapter.num_llm_layers)
        self._check_counts(span.any(1).cpu(), trace)
        active = bool(span.any())
        if not active:
            trace.notes.append("no image tokens in this prefill: nothing pruned")
        self.trace = trace
        self._prefill = Prefill(
            cache=weakref.ref(cache) if cache is not None else None,
            length_orig=length, entry=entry, segments=[], active=active, vision=vision,
            sample_images=sample_images, embeds=call.inputs_embeds if self._prompt_sites else None,
        )
        if injections is not None:
            self._prefill.injections = injections.features
            self._prefill.injection_offsets = _injection_offsets(injections, span)
            self._point_injections(entry)

    def _start_decode(self, call: compat.LMCall) -> None:
        embeds, cache, prefill = call.inputs_embeds, call.cache, self._prefill
        if prefill is None or prefill.cache is None or prefill.cache() is not cache:
            raise UnsupportedInputError(
                "this KV cache was not filled by a prefill under this attachment; prunekit cannot continue it "
                "(start generation from the prompt with the strategy attached)"
            )
        prefill.step += 1  # counted for every decode step: the probe skips them (also when nothing was pruned)
        if not prefill.active:
            return
        batch, q = embeds.shape[:2]
        if q != 1:
            raise UnsupportedInputError(
                f"continuing a pruned KV cache with {q} new tokens at once (a second turn, or chunked / assisted "
                "decoding) is not supported yet; generate one token per step or re-run the prompt"
            )
        entry = prefill.entry
        generated = compat.cache_length(cache) - entry.length  # tokens already appended after the prefill
        mask = call.attention_mask
        if mask is None:
            tail = torch.ones(batch, generated + q, dtype=torch.bool, device=embeds.device)
        else:
            if mask.shape[1] != prefill.length_orig + generated + q:
                raise PruningError(
                    f"decode attention_mask has {mask.shape[1]} columns; expected the prompt's "
                    f"{prefill.length_orig} plus {generated + q} generated"
                )
            tail = mask[:, prefill.length_orig :].to(torch.bool)
        positions = call.position_ids
        if positions is None:
            positions = torch.arange(q, device=embeds.device) + prefill.length_orig + generated
        positions = self.adapter.positions_in(positions, batch, q, embeds.device)
        prefill.step_positions, prefill.step_tail = positions, tail
        call.attention_mask = torch.cat([entry.mask, tail], dim=1).long()
        call.position_ids = self.adapter.positions_out(positions - entry.shift[:, None, None])

    # --- decoder layers (llm_layer sites) ---------------------------------------------------------
    def _on_decoder_layer(self, index: int, module, args, kwargs):
        prefill = self._prefill
        if prefill is None or not prefill.active:
            return None
        hidden = args[0]
        call = self.adapter.read_layer_call(index, kwargs)
        is_prefill = prefill.step == 0
        site = self._site(Stage.LLM_LAYER, index)
        if is_prefill and site is not None:
            self._capture_block_input(site, hidden, call)
            hidden = self._prune_llm(site, hidden)
        # the segment this layer belongs to (decode steps: all of them exist already)
        segment = next((s for s in reversed(prefill.segments) if s.start_layer <= index), None)
        if segment is None:
            return None
        if segment.step != prefill.step:
            segment.step = prefill.step
            segment.layer_call = self._segment_call(segment, hidden, call, is_prefill)
        segment.layer_call.write(kwargs)
        return (hidden,) + tuple(args[1:]), kwargs

    def _inject_visual(self, index: int, module, args, output):
        """After decoder layer ``index`` of a prefill: add the family's injected visual features (DeepStack) at the
        live visual tokens, each token its own row, in place of the model's addition over the unpruned positions."""
        prefill = self._prefill
        if prefill is None or prefill.step != 0 or prefill.injections is None or index >= len(prefill.injections):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        segment = next((s for s in reversed(prefill.segments) if s.start_layer <= index), prefill.entry)
        live, rows = segment.visual.to(hidden.device), segment.rows.to(hidden.device)
        features = prefill.injections[index].to(hidden.device, hidden.dtype)
        if index == len(prefill.injections) - 1:
            prefill.injections = None  # the last one added: later cuts need no rows, decoding keeps no features
        hidden = hidden.clone()
        hidden[live] = hidden[live] + features[rows[live]]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _point_injections(self, segment: Segment) -> None:
        """``segment.rows``: the injected-feature row of each live visual slot, read off the trace, so rows follow
        their tokens through every cut and reorder. A merged token (several members) gets a row of its own, appended:
        the mean of its members' rows (exact for pooling; a uniform stand-in for weighted merges, docs/support.md)."""
        prefill = self._prefill
        offsets = prefill.injection_offsets
        rows = torch.full(segment.visual.shape, -1, dtype=torch.long, device=segment.visual.device)
        merged = []  # (sample, slot, member rows)
        for b, track in enumerate(self.trace.samples):
            slots = segment.visual[b].nonzero().squeeze(1)
            if len(slots) != len(track.kept):
                raise PruningError(f"sample {b} has {len(slots)} visual slots but its trace {len(track.kept)} tokens")
            rows[b, slots] = int(offsets[b]) + track.kept.to(rows.device)
            merged += [(b, slots[j], int(offsets[b]) + m) for j, m in enumerate(track.members) if len(m) > 1]
        if merged:
            first = prefill.injections[0].shape[0]
            for k, (b, slot, _) in enumerate(merged):
                rows[b, slot] = first + k
            prefill.injections = [torch.cat([f, torch.stack([f[m.to(f.device)].mean(0) for _, _, m in merged])])
                                  for f in prefill.injections]
        segment.rows = rows

    def _prune_llm(self, site: Site, hidden: Tensor) -> Tensor:
        prefill = self._prefill
        current = prefill.segments[-1] if prefill.segments else prefill.entry
        slots, valid = pack(current.visual, align="left")  # (B, n) slots of live visual tokens
        units = [b for b in range(hidden.shape[0]) if bool(current.visual[b].any())]
        trace = self.trace
        keep = ~current.visual
        n_in = current.visual_counts().tolist()
        mask_only = False
        if units:
            unit_slots = slots[units]
            tokens = take(hidden[units], unit_slots)
            lengths = valid[units].sum(1).cpu()
            grids = [_sample_grid(trace.samples[b], self.adapter) for b in units]
            signals = self._signals(site, units, unit_slots, valid[units])
            ctx = PruneContext(
                site=site, tokens=tokens, lengths=lengths, grids=grids, sample_of=units,
                budget=self.strategy.budget, num_layers=self.adapter.num_llm_layers,
                token_types=current.types[units], signals=signals,
                _prompt_source=(lambda: self._prompt_embeddings(units)) if site in self._prompt_sites else None,
                _gravity_source=(lambda: self._rope_gravity(site, hidden, current, units, unit_slots))
                if signals is not None and not isinstance(signals.source, BlockInput) else None,
                _text_source=lambda: self._text_tokens(hidden, current, units),
                _norm=self.adapter.llm_output_norm,
                _seed_source=lambda u: self._sample_seed(units[u]),
                _grid_source=lambda u: trace.samples[units[u]].grid_positions(self.adapter.image_grid),
            )
            decision = self._decide_all(ctx)
            mask_only = decision.mask_only
            if decision.features is not None:
                hidden = hidden.clone()
            for u, b in enumerate(units):
                idx = decision.indices[u].to(hidden.device)
                keep[b, unit_slots[u, idx]] = True
                if decision.features is not None:
                    hidden[b, unit_slots[u, idx]] = decision.features[u].to(hidden.dtype)
                trace.samples[b].select(*_in_sequence_order(decision, u))
        policy = self.policy
        if mask_only:
            segment = current.mask_out(keep, policy, start_layer=site.layer)
            trace.notes.append(f"{site}: dropped tokens masked out, not removed; every later layer still computes "
                               "them (the counts are the tokens attention can read; FLOPs and latency are unpruned)")
        else:
            index, segment = current.select(keep, policy, start_layer=site.layer)
            if units and decision.order is not None:
                index = _reorder_visual(index, segment, units, decision.order)
            hidden = take(hidden, index)
        prefill.segments.append(segment)
        if prefill.injections is not None:
            self._point_injections(segment)
        counts = segment.visual_counts().cpu()
        trace.llm_layer_counts[:, site.layer :] = counts.unsqueeze(1)
        trace.events.append(StageEvent(str(site), n_in, counts.tolist(), [t.kept.clone() for t in trace.samples]))
        return hidden

    def _prompt_embeddings(self, units: list[int]) -> PromptEmbeddings:
        """Each unit's visual and text input embeddings, as they entered the language model."""
        entry, embeds = self._prefill.entry, self._prefill.embeds[units]
        image, image_valid = pack(entry.visual[units], align="left")
        text, text_valid = _text_rows(entry, units)
        return PromptEmbeddings(take(embeds, image) * image_valid[..., None], image_valid,
                                take(embeds, text) * text_valid[..., None], text_valid)

    @staticmethod
    def _text_tokens(hidden: Tensor, current: Segment, units: list[int]) -> tuple[Tensor, Tensor]:
        text, valid = _text_rows(current, units)
        return take(hidden[units], text) * valid[..., None], valid

    def _rope_gravity(self, site: Site, hidden: Tensor, current: Segment, units: list[int], unit_slots: Tensor) -> Tensor:
        """(U, R, N) RoPE-only score between the text queries and the visual keys of the scored layer
        (decoder layer k-1, which ran on ``current``), times that layer's scaling."""
        text, _ = _text_rows(current, units)
        positions = current.positions[units]
        gravity = self.adapter.rope_gravity(hidden, take(positions, text), take(positions, unit_slots))
        attention = compat.AttentionModule(self.adapter.llm_attention(site.layer - 1))
        return gravity * attention.scaling

    def _sample_seed(self, sample: int) -> int:
        prefill = self._prefill
        if prefill.vision is None:
            raise PruningError("a randomised strategy needs the sample's pixel values for its seed")
        return combine_seeds([prefill.vision.seed(u) for u in prefill.sample_images[sample]])

    def _segment_call(self, segment: Segment, hidden: Tensor, call: compat.LayerCall, is_prefill: bool) -> compat.LayerCall:
        """The loop-level inputs of every layer of ``segment`` in this step: positions under the policy, RoPE
        tables (unless decode positions are the language model's own), and transformers' mask for the backend."""
        prefill = self._prefill
        if is_prefill:
            mask2d, positions = segment.mask, segment.positions
        else:
            mask2d = torch.cat([segment.mask, prefill.step_tail], dim=1)
            positions = prefill.step_positions - segment.shift[:, None, None]
        rope = None
        if is_prefill or not torch.equal(segment.shift, prefill.entry.shift):
            rope = self.adapter.rope(hidden, positions)
        mask = compat.causal_mask(self.adapter.text_config, hidden, mask2d, call.cache, segment.start_layer)
        return compat.LayerCall(mask, self.adapter.layer_position_ids(positions), rope, call.cache)


def _token_types(span: Tensor, mask: Tensor) -> Tensor:
    """TokenType codes: text before a sample's first image token is SYSTEM, after it TEXT."""
    seen_image = span.long().cumsum(1) > 0
    types = torch.where(seen_image, int(TokenType.TEXT), int(TokenType.SYSTEM))
    no_image = ~span.any(1, keepdim=True)
    types = torch.where(no_image, int(TokenType.TEXT), types)
    types = torch.where(span, int(TokenType.IMAGE), types)
    return torch.where(mask, types, int(TokenType.PAD)).to(torch.int8)


def _injection_offsets(injections: VisualInjections, span: Tensor) -> Tensor:
    """(B,) each sample's first row of the injected features: one row per image token, in row-major order."""
    mask = injections.mask.to(span.device)
    if not torch.equal(mask, span):
        raise compat.seam_error("the language model's injected visual features (DeepStack) sit at other positions than "
                                "its image tokens")
    n = int(mask.sum())
    if any(f.shape[0] != n for f in injections.features):
        raise compat.seam_error(f"injected visual features with {[f.shape[0] for f in injections.features]} rows for "
                                f"{n} image tokens")
    counts = mask.sum(1)
    return counts.cumsum(0) - counts


def _text_rows(segment: Segment, units: list[int]) -> tuple[Tensor, Tensor]:
    """(U, R) slots of each unit's text tokens in order and their validity: the rows of ``attention('text')``,
    padded to the same R (the most text tokens of any sample in the batch)."""
    text, valid = pack(segment.types == TokenType.TEXT, align="left")
    return text[units], valid[units]


def _reorder_visual(index: Tensor, segment: Segment, units: list[int], order: list[Tensor]) -> Tensor:
    """The gather index with each unit's surviving visual slots filled in ``order`` instead of slot order.

    Slots (and so positions, masks and types) stay where they are; only which kept token fills which visual
    slot changes, so under ``compact`` positions the tokens are numbered in the requested order.
    """
    index = index.clone()
    for u, b in enumerate(units):
        slots = segment.visual[b].nonzero().squeeze(1)
        index[b, slots] = index[b, slots[_sequence_order(order[u]).to(slots.device)]]
    return index
