"""Vision-side cuts: inside the encoder (padded batches and packed sequences), before and after the projector."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import compat
from ..errors import PruningError
from ..pruner import Keep, PruneContext, Site, Stage
from ..trace import SampleTrack
from .decisions import _assemble, _in_sequence_order
from .grouped import GroupedRows
from .packed import PackedState, lay_out_calls, live_rows
from .state import VisionPass


class VisionMixin:
    # --- vision side ------------------------------------------------------------------------------
    # A vision pass has units: the encoder's batch rows (LLaVA: images; LLaVA-NeXT: crops) or the packed
    # images of a flat encoder (Qwen2-VL). ``VisionPass.images`` holds one SampleTrack per unit.
    def _on_vision_tower(self, module, args, kwargs):
        pixels, grid_thw = self.adapter.read_vision_call(args, kwargs)
        vision = self._vision = VisionPass(pixel_values=pixels)
        if self._probe is not None:
            self._probe.drop_chunks()  # a new pass: calls left from an earlier one are stale
        if self.adapter.packed_vision:
            packed = self.adapter.packed_images(grid_thw)
            vision.packed = PackedState(packed, self.adapter.merge_size)
            vision.video_frames = packed.frames
            vision.images = [SampleTrack.full([g], [grid]) for g, grid in zip(packed.groups, packed.grids)]

    def _on_vision_layer(self, index: int, module, args, kwargs):
        """Before encoder layer ``index``: prune after layer index-1 if it is a site; pass the padding mask."""
        vision = self._vision
        if vision is None:
            return None
        if vision.packed is not None:
            return self._on_packed_layer(index, vision, args, kwargs)
        hidden = args[0]
        site = self._site(Stage.VISION_LAYER, index - 1)
        if site is not None:
            hidden = self._prune_vision(site, hidden, vision)
        if vision.key_mask is None and site is None:
            return None
        return self.adapter.with_vision_key_mask(args, kwargs, hidden, vision.key_mask)

    def _on_vision_mask(self, module, args, kwargs):
        """Before the attention of a vision layer that passes no mask on (InternVL): the key-padding mask."""
        vision = self._vision
        if vision is None or vision.key_mask is None:
            return None
        return self.adapter.with_attention_key_mask(args, kwargs, vision.key_mask)

    def _restore_vision_grid(self, module, args, output):
        """After the feature layer of an encoder whose model reshapes full grids (InternVL): the kept patch groups
        back at their places in each unit's grid, zeros elsewhere (dropped again before the projector)."""
        vision = self._vision
        if vision is None or vision.grouped is None or vision.grouped.live is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        prefix = self.adapter.vision_prefix_tokens
        full = torch.cat([hidden[:, :prefix], vision.grouped.restore(hidden[:, prefix:])], 1)
        return (full,) + tuple(output[1:]) if isinstance(output, tuple) else full

    def _pooled_video(self, vision: VisionPass, n_units: int, n_patches: int) -> bool:
        """Where the pass is a video whose frames the model pools after the projector (LLaVA-OneVision): its units are
        frames whose tokens are the pooled positions, each a group of the patches it blends (``GroupedRows``)."""
        pooled = self.adapter.pooled_video(self._inputs, n_patches)
        if pooled is None:
            return False
        last = len(self.adapter.vision_layers) - 1
        if self.adapter.vision_feature_layer != last and any(s.stage is Stage.VISION_LAYER for s in self.sites):
            raise PruningError(
                f"{self.strategy.name!r} cuts a video inside the vision tower of {self.adapter.describe()}, whose "
                f"projector reads layer {self.adapter.vision_feature_layer}, not the last ({last}): the frames' full "
                "grids are restored only after the last layer. Prune the video at vision_output or in the LLM.")
        groups, vision.video_frames = pooled
        self._new_units(vision, n_units, len(groups))
        vision.grouped, vision.pooled = GroupedRows(groups, n_patches), True
        return True

    def _new_units(self, vision: VisionPass, n_units: int, n_tokens: int) -> None:
        vision.images = [SampleTrack.full([n_tokens], [self.adapter.unit_grid(u, n_tokens)]) for u in range(n_units)]
        vision.events = []

    def _prune_vision(self, site: Site, hidden: Tensor, vision: VisionPass) -> Tensor:
        prefix = self.adapter.vision_prefix_tokens
        patches = hidden[:, prefix:]
        if vision.images is None and not self._pooled_video(vision, patches.shape[0], patches.shape[1]):
            size = self.adapter.merge_size if self.adapter.full_grid_features else 1
            self._new_units(vision, patches.shape[0], patches.shape[1] // size)
            if size > 1:  # tokens are the patch groups the model makes after the encoder
                vision.grouped = GroupedRows(self.adapter.feature_groups(patches.shape[1] // size))
        lengths = vision.lengths()
        if vision.layer_counts is None:  # tokens entering each layer (pooled videos: patches)
            first = torch.full_like(lengths, patches.shape[1]) if vision.pooled else lengths
            vision.layer_counts = first[:, None].repeat(1, len(self.adapter.vision_layers))
        grouped, ids = vision.grouped, [d.kept for d in vision.images]
        if grouped is not None:
            columns, valid = grouped.columns(ids)
            ctx = self._image_context(site, grouped.tokens(patches, columns, valid), vision, lengths, prefix,
                                      columns=(prefix + columns, valid))
        else:
            ctx = self._image_context(site, patches, vision, lengths, prefix)
        keep = self._decide(ctx)
        if keep is None:
            return hidden
        if grouped is not None and keep.features is not None and vision.pooled:
            raise PruningError(self._no_merge_on_pooled_video(site))
        if grouped is not None and keep.features is not None:
            raise PruningError(
                f"{self.strategy.name} merged tokens at {site} on {self.adapter.describe()}; inside this encoder the "
                "runtime keeps or drops whole patch groups (the model groups them after it). Merge at vision_output.")
        self._apply_to_images(vision, keep, str(site))
        counts = vision.lengths()
        vision.layer_counts[:, site.layer + 1 :] = counts[:, None]
        if grouped is not None:
            if grouped.live is None and bool((counts == lengths).all()):
                if vision.pooled:
                    vision.layer_counts[:, site.layer + 1 :] = patches.shape[1]
                return hidden  # every group kept: the rows stay in the model's order (keep-all is exact)
            kept, counts = grouped.keep(patches, [d.kept for d in vision.images])  # counts: encoder rows
            if vision.pooled:  # overlapping windows: the rows themselves (merge_size is 1)
                vision.layer_counts[:, site.layer + 1 :] = counts[:, None]
        else:
            kept = _assemble(patches, keep)
        counts = counts.to(hidden.device)
        if bool((counts == counts[0]).all()):
            vision.live = vision.key_mask = None
        else:
            self._refuse_flash_padding(self.adapter.vision_attention(site.layer))
            slots = torch.arange(prefix + kept.shape[1], device=hidden.device)
            vision.live = slots[None] < (prefix + counts)[:, None]
            vision.key_mask = torch.zeros(vision.live.shape, dtype=hidden.dtype, device=hidden.device)
            vision.key_mask = vision.key_mask.masked_fill(~vision.live, torch.finfo(hidden.dtype).min)[:, None, None]
        return torch.cat([hidden[:, :prefix], kept.to(hidden.dtype)], 1)

    def _refuse_flash_padding(self, attention: nn.Module) -> None:
        impl = compat.attn_implementation(attention.config)
        if "flash" in impl:
            raise PruningError(
                f"{self.strategy.name!r} keeps different token counts per image inside the vision encoder, "
                f"which needs a key-padding mask; the {impl!r} backend takes none. Load the vision tower "
                "with attn_implementation='sdpa'."
            )

    def _on_packed_layer(self, index: int, vision: VisionPass, args, kwargs):
        """Packed encoder, before block ``index``: cut whole merge groups after block index-1 if it is a site;
        every later block gets the rebuilt boundaries and rotary tables."""
        packed, hidden = vision.packed, args[0]
        site = self._site(Stage.VISION_LAYER, index - 1)
        if site is not None:
            if vision.layer_counts is None:
                vision.layer_counts = vision.lengths()[:, None].repeat(1, len(self.adapter.vision_layers))
            mask = self._cut_packed(site, vision, hidden, self._decide)
            if mask is not None:
                vision.layer_counts[:, site.layer + 1 :] = vision.lengths()[:, None]
                hidden = hidden[mask.to(hidden.device)]
                packed.rebuild(*self.adapter.read_packed_block_call(kwargs))  # the model's own tables
        if packed.block_kwargs is None:
            return None
        self.adapter.write_packed_block_call(packed.call_for(self.adapter.block_windowed(index)), kwargs)
        return (hidden,) + tuple(args[1:]), kwargs

    def _cut_packed(self, site: Site, vision: VisionPass, hidden: Tensor, decide) -> Tensor | None:
        """The strategy's decision over the live merge groups of ``hidden`` (rows, D) before the PatchMerger,
        applied to the trace and the live rows; returns the (rows,) mask of surviving rows (None: no change)."""
        view = vision.packed.view()
        tokens, lengths = view.tokens(hidden)
        keep = decide(self._image_context(site, tokens, vision, lengths, 0, view))
        if keep is None:
            return None
        if keep.features is not None or keep.order is not None:
            raise PruningError(
                f"{self.strategy.name} merged or reordered tokens at {site} on {self.adapter.describe()}; before the "
                "PatchMerger the runtime keeps or drops whole 2x2 patch groups. Merge at projector_output instead."
            )
        self._apply_to_images(vision, keep, str(site))
        return vision.packed.keep_groups(view, keep.indices)

    def _flush_packed(self, site: Site, vision: VisionPass) -> None:
        """A packed encoder's attention ran once per image (or window): lay out per image the q, k, v its calls
        recorded before the site reads its signals."""
        module = self._scored.get(site)
        if module is not None and not self.replaying:
            bounds = vision.packed.image_chunks()
            self._probe.flush(module, lambda calls: lay_out_calls(calls, bounds), live_rows(bounds))

    def _on_projector_input(self, module, args):
        vision = self._vision
        site = self._site(Stage.VISION_OUTPUT)
        if vision is None:
            vision = self._vision = VisionPass(pixel_values=None)
        if vision.packed is not None:
            return self._packed_projector_input(site, vision, args)
        features = args[0]
        n_images, n_tokens = features.shape[:2]
        if vision.images is None:
            self._pooled_video(vision, n_images, n_tokens)
        if vision.pooled:  # the full grid of every frame (restored after a cut) goes through; pooling follows
            if n_tokens != vision.grouped.patches:
                raise compat.seam_error(f"the projector received {n_tokens} patches per video frame, not the full grid of "
                                        f"{vision.grouped.patches} that the model pools")
            if site is not None:  # a pooled position: the mean of its patches' features (the restored full grid)
                ids = [d.kept for d in vision.images]
                full = GroupedRows(vision.grouped.groups, n_tokens)
                columns, valid = full.columns(ids)
                self._decide_pooled(site, vision, full.tokens(features, columns, valid))
            vision.projector_counts = torch.full((n_images,), n_tokens)
            return None
        if vision.images is None or len(vision.images) != n_images:  # no vision_layer site pruned in this pass
            self._new_units(vision, n_images, n_tokens)
        lengths = vision.lengths()
        regrouped = vision.grouped is not None and vision.grouped.live is not None
        if regrouped:  # the model grouped the restored full grids: take each unit's surviving tokens again
            features = _assemble(features, Keep([d.kept.to(features.device) for d in vision.images]))
            n_tokens = features.shape[1]
        if int(lengths.max()) != n_tokens:
            raise PruningError(
                f"the projector received {n_tokens} tokens per image but the vision encoder kept "
                f"{lengths.tolist()}; the features were not read from a layer after the last vision_layer site"
            )
        if site is None:
            vision.projector_counts = lengths
            return (features,) + tuple(args[1:]) if regrouped else None
        ctx = self._image_context(site, features, vision, lengths, self.adapter.vision_prefix_tokens)
        keep = self._decide_all(ctx)
        self._apply_to_images(vision, keep, str(site))
        vision.projector_counts = vision.lengths()
        return (_assemble(features, keep),) + tuple(args[1:])

    def _decide_pooled(self, site: Site, vision: VisionPass, tokens: Tensor) -> None:
        """A decision over each frame's live pooled positions (a video the model pools after the projector). The model
        pools the full grids whatever is decided; the language model's entry drops the positions cut. Signals are the
        feature layer's, over each position's patches in the rows that layer ran on."""
        lengths = vision.lengths()
        columns, valid = vision.grouped.columns([d.kept for d in vision.images])
        prefix = self.adapter.vision_prefix_tokens
        ctx = self._image_context(site, tokens, vision, lengths, prefix, columns=(prefix + columns, valid))
        keep = self._decide_all(ctx)
        if keep.features is not None or keep.order is not None:
            raise PruningError(self._no_merge_on_pooled_video(site))
        self._apply_to_images(vision, keep, str(site))

    def _no_merge_on_pooled_video(self, site: Site) -> str:
        return (f"{self.strategy.name} merged or reordered tokens at {site} on a video of {self.adapter.describe()}, "
                "whose frames the model pools itself after the projector: at every vision-side site a video's pooled "
                "positions are kept or dropped whole, never merged. Use a selecting strategy there (random, DivPrune, "
                "FlowCut, ...) or prune the video in the language model (FastV, PDrop, SparseVLM).")

    def _packed_projector_input(self, site: Site | None, vision: VisionPass, args):
        vision.projector_counts = vision.lengths()
        if site is None:
            return None
        hidden = args[0]
        mask = self._cut_packed(site, vision, hidden, self._decide_all)
        vision.projector_counts = vision.lengths()
        return (hidden[mask.to(hidden.device)],) + tuple(args[1:])

    def _on_projector_output(self, module, args, output):
        vision = self._vision
        if vision is None or vision.images is None:
            return None
        if vision.packed is not None:
            return self._packed_projector_output(vision, output)
        site = self._site(Stage.PROJECTOR_OUTPUT)
        if vision.pooled:  # the model pools the full grids; the language model's entry drops the cut positions
            if site is not None:  # the pooled positions themselves, by the model's own pooling
                pooled = self.adapter.pool_video(output)
                tokens = _assemble(pooled, Keep([d.kept.to(pooled.device) for d in vision.images]))
                self._decide_pooled(site, vision, tokens)
            return None
        if site is not None:
            ctx = self._image_context(site, output, vision, vision.lengths(), self.adapter.vision_prefix_tokens)
            keep = self._decide_all(ctx)
            self._apply_to_images(vision, keep, str(site))
            output = _assemble(output, keep)
        if not vision.events:
            return None
        # scatter kept embeddings back into the N placeholder slots; the LLM entry drops the others
        full = output.new_zeros(output.shape[0], vision.images[0].span_length, output.shape[2])
        for u, d in enumerate(vision.images):  # rows in sequence order fill the kept slots in slot order
            full[u, d.kept.sort().values.to(full.device)] = output[u, : len(d.kept)]
        return full

    def _packed_projector_output(self, vision: VisionPass, output: Tensor):
        """Merged tokens (one per live group, encoder order) -> per image in raster order for a projector_output
        site, then scattered back into every group's slot of the merger's unpruned output."""
        packed = vision.packed
        view = packed.view()
        per_image = [first // packed.size for first in view.first]  # groups are whole: merger output rows
        lengths = torch.tensor([len(p) for p in per_image])
        tokens = output.new_zeros(len(per_image), int(lengths.max()), output.shape[-1])
        for u, rows in enumerate(per_image):
            tokens[u, : len(rows)] = output[rows.to(output.device)]
        site = self._site(Stage.PROJECTOR_OUTPUT)
        if site is not None:
            keep = self._decide_all(self._image_context(site, tokens, vision, lengths, 0, view))
            self._apply_to_images(vision, keep, str(site))
            tokens = _assemble(tokens, keep)
        if not vision.events:
            return None
        slot = packed.encoder_slot_of_group()
        full = output.new_zeros(len(slot), output.shape[-1])
        for u, d in enumerate(vision.images):
            groups = int(packed.group_offsets[u]) + d.kept.sort().values
            full[slot[groups].to(full.device)] = tokens[u, : len(d.kept)]
        return full

    def _on_injection_projector(self, module, args, output):
        """After a merger of features injected inside the language model (DeepStack), on a packed encoder cut before
        it: each live group's row back at its slot of the unpruned output (the LLM entry drops the others)."""
        vision = self._vision
        if vision is None or vision.packed is None:
            return None
        return vision.packed.scatter_groups(output)

    def _image_context(self, site: Site, tokens: Tensor, vision: VisionPass, lengths: Tensor, prefix: int,
                       view=None, columns: tuple[Tensor, Tensor] | None = None):
        """Context over vision units; signal columns skip the encoder's prefix (CLS) tokens, and on a packed
        encoder list each merge group's rows (``view``); ``columns``: (U, N, g) positions and validity, given."""
        given = columns
        n_images, n_tokens = tokens.shape[:2]
        grids = [d.grid if d.intact_single_image else None for d in vision.images]
        signals = None
        if site in self._scored:
            if vision.packed is not None:
                self._flush_packed(site, vision)
            run = columns = valid = None
            groups = None
            if given is None and site.stage is not Stage.VISION_LAYER and vision.images:  # by intact token count
                groups = self.adapter.feature_groups(vision.images[0].span_length)
            if given is not None:
                columns, valid = given
            elif view is not None:
                columns, valid = view.columns
            elif groups is not None:  # a token is several feature-layer patches (InternVL's pixel shuffle)
                grouped = vision.grouped if vision.grouped is not None else GroupedRows(groups)
                cols, valid = grouped.columns([d.kept for d in vision.images])
                columns = prefix + cols
            elif n_tokens > 0 and all(n == n_tokens for n in lengths.tolist()):
                run = slice(prefix, prefix + n_tokens)  # every unit whole: signals are slices
            else:
                columns = prefix + torch.arange(n_tokens).expand(n_images, n_tokens)
                valid = torch.arange(n_tokens)[None] < lengths[:, None]
            signals = self._signals(site, list(range(n_images)), columns, valid, run)
        return PruneContext(
            site=site, tokens=tokens, lengths=lengths, grids=grids, sample_of=list(range(n_images)),
            budget=self.strategy.budget, num_layers=len(self.adapter.vision_layers), signals=signals,
            budget_units=1 if vision.video_frames is not None else self.adapter.budget_units(),
            video_frames=vision.video_frames,
            _prefix_source=(lambda: vision.prefix) if vision.prefix is not None else None,
            _instruction_source=self._instruction_source(site, vision),
            _seed_source=vision.seed, _grid_source=lambda u: vision.images[u].grid_positions(self.adapter.image_grid),
        )

    @staticmethod
    def _apply_to_images(vision: VisionPass, keep: Keep, site: str) -> None:
        n_in = [len(d.kept) for d in vision.images]
        for u, d in enumerate(vision.images):
            d.select(*_in_sequence_order(keep, u))
        vision.events.append((site, n_in, [d.kept.clone() for d in vision.images]))
