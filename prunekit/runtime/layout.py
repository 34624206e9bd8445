"""Images into samples: a vision pass's units laid out as each image's placeholder span, per-sample tracks and
the vision events in span positions."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import compat
from ..adapters import ImageLayout, ModelAdapter
from ..errors import PruningError
from ..pruner import Stage
from ..trace import PruneTrace, SampleTrack, StageEvent
from .state import VisionPass


class LayoutMixin:
    def _sample_tracks(self, span: Tensor, vision: VisionPass | None, trace: PruneTrace):
        """Lay the vision pass's units out as images (adapter.image_layouts) and match images to samples (they
        fill the placeholders in batch order). Returns the sample tracks and each sample's vision units."""
        counts = span.sum(1).tolist()
        vision_sites = [s for s in self.sites if s.stage is not Stage.LLM_LAYER]
        if vision is None or vision.images is None:
            if vision_sites and any(counts):
                raise PruningError(
                    f"{self.strategy.name!r} prunes at {vision_sites[0]}, but this forward has image tokens and "
                    "no image went through the vision tower (were precomputed inputs_embeds passed?). "
                    "Pass pixel_values so prunekit can prune the image features."
                )
            return [SampleTrack.full([c] if c else []) for c in counts], [[] for _ in counts]
        images = self._images(vision)
        sample_images, remaining = match_images(counts, [img.track.span_length for img in images])
        tracks = [SampleTrack.from_images([images[i].track for i in mine]) for mine in sample_images]
        sample_units = [[u for i in mine for u in images[i].units] for mine in sample_images]
        if remaining:
            raise compat.seam_error(
                f"the vision tower encoded {len(images)} images but the language model's input has image-token "
                f"spans for {len(images) - len(remaining)}: no visual span was found for the rest")
        trace.vision_units = [len(units) for units in sample_units]
        trace.unit_tokens = [[vision.images[u].span_length for u in units] for units in sample_units]
        trace.vision_tokens = [sum(tokens) for tokens in trace.unit_tokens]
        trace.merge_size = self.adapter.merge_size
        # each unit's encoder patches: merge groups of merge_size patches, or a pooled video frame's whole grid
        patches = [vision.grouped.patches if vision.pooled else d.span_length * trace.merge_size for d in vision.images]
        trace.unit_patches = [[patches[u] for u in units] for units in sample_units]
        if vision.projector_counts is not None:
            trace.projector_tokens = [int(vision.projector_counts[units].sum()) for units in sample_units]
        layers = len(self.adapter.vision_layers)
        per_unit = vision.layer_counts  # tokens (pooled videos: patches already) entering each layer
        if per_unit is None:
            per_unit = torch.tensor([[p] * layers for p in patches], dtype=torch.long).reshape(-1, layers)
        elif not vision.pooled:
            per_unit = per_unit * self.adapter.merge_size  # encoder rows (patches), not merge groups
        trace.vision_layer_counts = torch.stack(
            [per_unit[units].sum(0) if units else torch.zeros(layers, dtype=torch.long) for units in sample_units]
        )
        for e, (site, n_in, kept) in enumerate(vision.events):  # counts per unit token, survivors as span positions
            per_in = [sum(n_in[u] for u in units) for units in sample_units]
            per_out = [sum(len(kept[u]) for u in units) for units in sample_units]
            per_kept = []
            for mine in sample_images:
                start, parts = 0, []
                for i in mine:
                    parts.append(start + images[i].span_of(kept, e))
                    start += images[i].track.span_length
                per_kept.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
            trace.events.append(StageEvent(site, per_in, per_out, per_kept))
        return tracks, sample_units

    def _images(self, vision: VisionPass) -> list["_Image"]:
        """The pass's images: each one's units and its track over its placeholder span."""
        unit_tokens = [d.span_length for d in vision.images]
        layouts = self.adapter.image_layouts(unit_tokens, self._inputs)
        if sum(lay.units for lay in layouts) != len(vision.images):
            raise PruningError(f"the vision pass has {len(vision.images)} units but the images' layout needs "
                               f"{sum(lay.units for lay in layouts)}; inputs and images do not line up")
        cuts = [e for e in vision.events  # any event that dropped or moved a token (only blended layouts ask)
                if any(len(k) != n or not torch.equal(k.cpu(), torch.arange(n)) for n, k in zip(e[1], e[2]))
                ] if any(lay.blended for lay in layouts) else []
        if cuts:
            raise PruningError(
                f"{self.adapter.describe()} downscaled an image's high-resolution grid (its tokens there blend up to 4 "
                f"crop tokens each), so the vision-side cut of {self.strategy.name!r} at {cuts[0][0]} has no "
                "place in its span. Prune such images at llm_layer, or keep the grid within the model's limit "
                "(smaller images, or a vision_aspect_ratio allowing more crops).")
        images, start = [], 0
        newlines = self.strategy.image_newlines == "keep" or not vision.events
        for lay in layouts:
            units = list(range(start, start + lay.units))
            start += lay.units
            images.append(_Image(lay, units, [vision.images[u] for u in units], newlines or lay.video))  # a video's end
        return images


def _span_track(layout: ImageLayout, tracks: list[SampleTrack], span_of: Tensor,
                newlines: bool) -> tuple[Tensor, list[Tensor]]:
    """The occupied span positions of an image in span order, and each one's members as span positions (those
    the layout dropped left out): output j of a unit fills its j-th surviving slot; row newlines stay when
    ``newlines``. Any members (merged tokens)."""
    n = layout.tokens
    occupant = {}
    for c, d in enumerate(tracks):
        for slot, members in zip(d.kept.sort().values.tolist(), d.members):
            occupant[c * n + slot] = c * n + members
    kept, members = [], []
    for p, s in enumerate(layout.source.tolist()):
        if s < 0 and newlines:
            kept.append(p)
            members.append(torch.tensor([p]))
        elif s in occupant:
            m = span_of[occupant[s]]
            kept.append(p)
            members.append(m[m >= 0].sort().values)
    return torch.tensor(kept, dtype=torch.long), members


def _span_track_single(layout: ImageLayout, tracks: list[SampleTrack], span_of: Tensor,
                       newlines: bool) -> tuple[Tensor, list[Tensor]]:
    """``_span_track`` when every token has one member, without a Python loop over the span (LLaVA-NeXT's span
    is about 2,900 positions; the loop cost ~10 ms a prefill)."""
    n, source = layout.tokens, layout.source
    slots, member = [], []
    for c, d in enumerate(tracks):
        slots.append(c * n + d.kept.sort().values)
        member.append(c * n + (torch.cat(d.members) if d.members else torch.zeros(0, dtype=torch.long)))
    slots, member = torch.cat(slots), torch.cat(member)
    output = torch.full((layout.units * n,), -1, dtype=torch.long)  # slot -> the output that fills it
    output[slots] = torch.arange(len(slots))
    filled = torch.where(source >= 0, output[source.clamp(min=0)], -1)
    newline = (source < 0) & newlines
    kept = ((filled >= 0) | newline).nonzero().squeeze(1)
    span = torch.where(newline[kept], kept, span_of[member[filled[kept].clamp(min=0)]])
    present = span >= 0  # a member the layout dropped (unpadding) leaves its token with no member
    values = span[present]
    return kept, list(values.split(present.long().tolist()))


def match_images(counts: list[int], lengths: list[int]) -> tuple[list[list[int]], list[int]]:
    """Images fill the samples' placeholder spans in batch order: each sample's images (their span ``lengths`` add
    up to its ``counts`` image tokens) and the images left over. A sample whose images do not add up is refused."""
    remaining = list(range(len(lengths)))
    per_sample = []
    for b, count in enumerate(counts):
        mine, total = [], 0
        while total < count and remaining:
            i = remaining.pop(0)
            mine.append(i)
            total += lengths[i]
        if total != count:
            raise PruningError(f"sample {b} has {count} image tokens but its images give {total} features; "
                               "prompt placeholders and images do not line up")
        per_sample.append(mine)
    return per_sample, remaining


def _sample_grid(track: SampleTrack, adapter: ModelAdapter) -> tuple[int, int] | None:
    """The patch grid of a sample that is one intact image, else None."""
    if not track.intact_single_image:
        return None
    return track.grid if track.grids is not None else adapter.image_grid(track.span_length)


class _Image:
    """One image of a vision pass: its vision units and its track over its placeholder span.

    With an identity layout (one unit, tokens in span order) the unit's track is the image's track. Otherwise
    (LLaVA-NeXT) each unit's outputs fill its surviving token slots in slot order, the model's layout moves
    slots into the span (or drops them: unpadding), and the image's track lists the occupied span positions in
    span order, each with the span positions of its members (members the layout dropped are left out). Tokens
    no unit produced (row newlines) stay when ``newlines``.
    """

    def __init__(self, layout: ImageLayout, units: list[int], tracks: list[SampleTrack], newlines: bool):
        self.layout, self.units, self.newlines = layout, units, newlines
        if layout.is_identity:
            self.track = tracks[0]
            return
        if layout.blended:  # no vision-side event (refused above): every span position, itself its member
            self.track = SampleTrack.full([layout.span_length], [layout.grid])
            return
        n, source = layout.tokens, layout.source
        self._span_of = torch.full((layout.units * n,), -1, dtype=torch.long)
        placed = (source >= 0).nonzero().squeeze(1)
        self._span_of[source[placed]] = placed
        single = all(len(m) == 1 for d in tracks for m in d.members)  # no merged tokens: one member each
        kept, members = (_span_track_single if single else _span_track)(layout, tracks, self._span_of, newlines)
        length = layout.span_length
        self.track = SampleTrack(length, torch.zeros(length, dtype=torch.long), kept, members, [layout.grid])

    def span_of(self, kept: list[Tensor], event: int) -> Tensor:
        """Span positions alive after a vision event, given each unit's kept token indices."""
        if self.layout.is_identity:
            return kept[self.units[0]]
        if self.layout.blended:  # only events that kept every token reach here
            return torch.arange(self.layout.span_length)
        n = self.layout.tokens
        tokens = torch.cat([c * n + kept[u] for c, u in enumerate(self.units)])
        span = self._span_of[tokens]
        if self.newlines:
            span = torch.cat([span, (self.layout.source < 0).nonzero().squeeze(1)])
        return span[span >= 0].sort().values
