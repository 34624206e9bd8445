"""``attach(model, strategy)``: per-instance hooks that make a strategy prune inside ``forward``/``generate``.

Hooks (all on this model instance, all removed by ``detach()``):

- vision tower, forward pre-hook: remembers the pixel values (content seeds for randomised strategies);
- vision encoder layers after the first ``vision_layer`` site, forward pre-hooks: prune the patch tokens
  entering the layer (CLS kept) and, when images keep different counts, pass a key-padding mask;
- projector, forward pre-hook (``vision_output`` sites): the strategy picks or merges vision features,
  and the projector runs once on the kept ``[images, T, D]`` batch;
- projector, forward hook (``projector_output`` sites, then always when pruned): kept embeddings are
  scattered back into the N placeholder slots, so transformers' placeholder-count check passes;
- multimodal model, forward pre-hook: finds the image-token span of each sample from ``input_ids``;
- language model, forward pre-hook: in prefill, physically removes the dropped slots from
  ``inputs_embeds`` / ``attention_mask`` / ``position_ids``; in decode steps, rewrites the mask and the
  positions per sample (transformers keeps passing original-length masks and original positions);
- decoder layers from the first ``llm_layer`` site on, forward pre-hooks: prune hidden states and slice
  the loop-level kwargs (RoPE tables, mask, positions) that the language model computed once;
- top model, forward pre-hook and an instance-level ``generate`` guard: refuse what is not supported;
- when the strategy declares signals: an ``AttentionProbe`` on the scored attention modules (``pre``
  signals are computed in the decoder-layer pre-hook from the block's own input, nothing wrapped).

See docs/architecture.md for the data flow.
"""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from .. import compat
from ..errors import BudgetError, PruningError, SeamError
from ..adapters import ImageLayout, ModelAdapter, adapter_for
from ..pruner import (Keep, PromptEmbeddings, PruneContext, Site, Stage, TokenPruner, TokenType, combine_seeds,
                      content_seed)
from ..signals import AttentionProbe, BlockInput, Signals, SiteSignals
from ..registry import build_strategy
from ..trace import PruneTrace, SampleTrack, StageEvent
from .packed import PackedState, pad_images
from .sequence import Segment, pack, take

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, PruningHandle]" = weakref.WeakKeyDictionary()
_RUNTIME_STAGES = tuple(Stage)


@dataclass
class VisionPass:
    """State of one pass through the vision tower + projector, consumed by the next prefill."""

    pixel_values: Tensor | None
    images: list[SampleTrack] | None = None  # per image: which of its N tokens survive, and members
    events: list[tuple[str, list[int], list[Tensor]]] = field(default_factory=list)  # per image: n in, kept after
    seeds: dict[int, int] = field(default_factory=dict)
    live: Tensor | None = None  # (images, prefix + n) bool inside the encoder once counts are ragged
    key_mask: Tensor | None = None  # matching additive key-padding mask for the encoder layers
    layer_counts: Tensor | None = None  # (images, encoder layers): patches entering each layer
    prefix: Tensor | None = None  # (images, P, D) the feature layer's output at the prefix tokens, on request
    packed: PackedState | None = None  # packed encoders (Qwen2-VL): the live rows and the blocks' kwargs
    projector_counts: Tensor | None = None  # (units,) tokens the projector maps (FLOPs)

    def lengths(self) -> Tensor:
        """(images,) tokens each image still has."""
        return torch.tensor([len(d.kept) for d in self.images])

    def seed(self, image: int) -> int:
        if image not in self.seeds:
            if self.pixel_values is None:
                raise PruningError("a randomised strategy needs the pixel values of each image for its seed")
            pixels = self.pixel_values[image] if self.packed is None else self.packed.pixels(self.pixel_values, image)
            self.seeds[image] = content_seed(pixels)
        return self.seeds[image]


@dataclass
class Prefill:
    """What the last prefill decided, kept to rewrite its decode steps."""

    cache: Any  # weakref to the KV cache filled by this prefill, or None
    length_orig: int
    entry: Segment
    segments: list[Segment]  # llm_layer segments, in layer order
    active: bool  # False when nothing was pruned (no images): decode passes through
    vision: VisionPass | None = None
    sample_images: list[list[int]] = field(default_factory=list)  # per sample: its units in the vision pass
    step: int = 0
    step_positions: Tensor | None = None  # original positions of the current decode step's tokens
    step_tail: Tensor | None = None  # mask columns of generated tokens, current step included
    embeds: Tensor | None = None  # the language model's (pruned) input embeddings, kept for prompt signals


def attach(model: nn.Module, strategy: TokenPruner | str | Mapping[str, Any], **params: Any) -> "PruningHandle":
    """Attach ``strategy`` to ``model`` (this instance only). Usable as a plain call or a context manager."""
    if not isinstance(strategy, TokenPruner):
        strategy = build_strategy(strategy, **params)
    elif params:
        raise TypeError("pass knobs either to build_strategy or with a strategy name, not with an instance")
    return PruningHandle(model, strategy)


class PruningHandle:
    def __init__(self, model: nn.Module, strategy: TokenPruner):
        if model in _ATTACHED:
            raise PruningError(
                f"this model already has {_ATTACHED[model].strategy!r} attached; detach() it first "
                "(one strategy per model instance)"
            )
        self.model = model
        self.strategy = strategy
        self.adapter: ModelAdapter = adapter_for(model)
        strategy.bind(self.adapter)
        self.sites = list(strategy.sites())
        self._validate()
        self.trace: PruneTrace | None = None
        self.replaying = False
        self._recorded: dict[Site, Keep] = {}
        self._vision: VisionPass | None = None
        self._span: Tensor | None = None  # (B, L) image-token mask of the current multimodal forward
        self._inputs: dict = {}  # the adapter's layout inputs of the current call (LLaVA-NeXT: image_sizes)
        self.policy = "original" if self.adapter.mrope else strategy.position_policy  # M-RoPE: ids stay
        self._prefill: Prefill | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._had_generate = "generate" in model.__dict__
        self._old_generate = model.__dict__.get("generate")
        self._probe = None
        self._pixels_pending = False  # a call carried pixel values that no vision pass has consumed yet
        self._generate_prefills: int | None = None  # prefills seen inside the current generate() call
        self._passed_cache = None  # the KV cache the current prefill hands the language model
        compat.warn_if_untested()
        try:
            self._install()
        except BaseException:
            self.detach()  # a failed attach leaves no hook, wrapper or backend switch behind
            raise
        _ATTACHED[model] = self

    # --- public -----------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook; the model behaves exactly as if never attached."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self._had_generate:
            self.model.__dict__["generate"] = self._old_generate
        else:
            self.model.__dict__.pop("generate", None)
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._prefill = self._vision = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def replay(self):
        """Re-apply the last prefill's decisions instead of asking the strategy (cache ≡ recompute tests)."""
        if not self._recorded:
            raise PruningError("nothing to replay: run a prefill with this handle first")
        self.replaying = True
        try:
            yield self
        finally:
            self.replaying = False

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"PruningHandle({self.strategy!r} on {self.adapter.describe()}, {state})"

    # --- set-up -----------------------------------------------------------------------------------
    def _validate(self) -> None:
        name = self.strategy.name
        reason = self.strategy.supports(self.adapter)
        if reason:
            raise PruningError(f"strategy {name!r} cannot run on {self.adapter.describe()}: {reason}")
        if not self.sites:
            raise PruningError(f"strategy {name!r} declares no sites")
        for site in self.sites:
            if site.stage not in _RUNTIME_STAGES:
                raise PruningError(
                    f"strategy {name!r} acts at {site}, a stage this runtime does not serve yet "
                    f"(served: {', '.join(map(str, _RUNTIME_STAGES))})"
                )
            if site.stage is Stage.LLM_LAYER and site.layer >= self.adapter.num_llm_layers:
                raise PruningError(
                    f"strategy {name!r} prunes before LLM layer {site.layer}, but the language model has "
                    f"{self.adapter.num_llm_layers} layers (0..{self.adapter.num_llm_layers - 1})"
                )
            feature = self.adapter.vision_feature_layer
            if site.stage is Stage.VISION_LAYER and site.layer >= feature:
                raise PruningError(
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
            raise ValueError(f"strategy {name!r} has image_newlines={self.strategy.image_newlines!r}; use 'keep' or 'drop'")
        if self.strategy.position_policy not in ("compact", "original"):
            raise ValueError(f"strategy {name!r} has unknown position_policy {self.strategy.position_policy!r}")

    def _install(self) -> None:
        a, hook = self.adapter, self._handles.append
        hook(a.vision_tower.register_forward_pre_hook(self._on_vision_tower, with_kwargs=True))
        hook(a.projector.register_forward_pre_hook(self._on_projector_input))
        hook(a.projector.register_forward_hook(self._on_projector_output))
        hook(a.multimodal_model.register_forward_pre_hook(self._on_multimodal, with_kwargs=True))
        hook(a.language_model.register_forward_pre_hook(self._on_llm_entry, with_kwargs=True))
        hook(a.language_model.register_forward_hook(self._after_llm, with_kwargs=True))
        vision_layers = sorted(s.layer for s in self.sites if s.stage is Stage.VISION_LAYER)
        if vision_layers:
            for i, layer in enumerate(a.vision_layers):
                if i > vision_layers[0]:
                    hook(layer.register_forward_pre_hook(functools.partial(self._on_vision_layer, i), with_kwargs=True))
        llm_layers = sorted(s.layer for s in self.sites if s.stage is Stage.LLM_LAYER)
        if llm_layers:
            for i, layer in enumerate(a.decoder_layers):
                if i >= llm_layers[0]:
                    hook(layer.register_forward_pre_hook(functools.partial(self._on_decoder_layer, i), with_kwargs=True))
        hook(self.model.register_forward_pre_hook(self._on_top_forward, with_kwargs=True))
        self.model.generate = self._guarded_generate(self.model.generate)
        self._install_probe()

    def _install_probe(self) -> None:
        """Watch the attention module each signal-hungry site scores from (see prunekit.signals)."""
        self._probe, self._scored, self._vision_modules = None, {}, set()
        requests = {site: self.strategy.signals(site) for site in self.sites}
        self._prompt_sites = {site for site, req in requests.items() if req is not None and req.prompt}
        if any(req is not None and req.prefix for req in requests.values()):  # the feature layer's CLS output
            layer = self.adapter.vision_layers[self.adapter.vision_feature_layer]
            self._handles.append(layer.register_forward_hook(self._on_feature_layer))
        requests = {site: req for site, req in requests.items() if req}
        if not requests:
            return
        self._probe = AttentionProbe(queries=self._probe_queries)
        for site, req in requests.items():
            if not isinstance(req, Signals):
                raise TypeError(f"{self.strategy.name}.signals({site}) must return a prunekit.signals.Signals")
            if req.pre:  # block k itself, on its input: computed in the decoder-layer pre-hook
                self._scored[site] = self._probe.watch_input(
                    self.adapter.llm_attention(site.layer), self._llm_input_norm(site.layer), *req.rows,
                    keys=req.keys, values=req.values)
                continue
            if site.stage is Stage.LLM_LAYER:
                module, norm = self.adapter.llm_attention(site.layer - 1), None
            else:
                layer = site.layer if site.stage is Stage.VISION_LAYER else self.adapter.vision_feature_layer
                module, norm = self.adapter.vision_attention(layer), self.adapter.vision_input_norm(layer)
                self._vision_modules.add(module)
                if self.adapter.packed_vision and any(r.query == "mean_hidden" for r in req.rows):
                    raise PruningError(f"{self.strategy.name!r} asks for mean_hidden rows, which need separate "
                                       f"q/v projections; {self.adapter.describe()} has a fused qkv. Use 'mean'.")
            chunked = self.adapter.packed_vision and site.stage is not Stage.LLM_LAYER  # one call per image/window
            self._probe.watch(module, *req.rows, keys=req.keys, values=req.values, input_norm=norm, chunked=chunked)
            self._scored[site] = module
        self._probe.install()

    def _on_feature_layer(self, module, args, output):
        if self._vision is not None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._vision.prefix = hidden[:, : self.adapter.vision_prefix_tokens]

    def _llm_input_norm(self, layer: int) -> nn.Module:
        """The adapter's norm in front of decoder layer ``layer``'s attention; pre signals cannot do without it."""
        norm = self.adapter.llm_input_norm(layer)
        if norm is None:
            raise PruningError(f"pre signals need decoder layer {layer}'s input norm; "
                               f"{type(self.adapter.decoder_layers[layer]).__name__} has no input_layernorm")
        return norm

    def _probe_queries(self, module):
        """(live, text) query masks of the watched module's current call; None skips (decode steps)."""
        if module in self._vision_modules:
            vision = self._vision
            return (None if vision is None else vision.live), None
        prefill = self._prefill
        if prefill is None or prefill.step > 0:
            return None
        segment = prefill.segments[-1] if prefill.segments else prefill.entry
        return segment.mask, segment.types == TokenType.TEXT

    def _signals(self, site: Site, batch_rows: list[int], columns: Tensor, valid: Tensor,
                 contiguous: bool | None = None) -> SiteSignals | None:
        source = self._scored.get(site)
        if source is None:
            return None
        prefix = self.adapter.vision_prefix_tokens if site.stage is not Stage.LLM_LAYER else 0
        return SiteSignals(self._probe, source, str(site), batch_rows, columns, valid, prefix, contiguous)

    def _capture_block_input(self, site: Site, hidden: Tensor, call: compat.LayerCall) -> None:
        """``pre`` signals of ``site``: its block on the current sequence, with the RoPE tables and mask that
        the block would get without this cut (the current segment's, or the language model's own)."""
        source = self._scored.get(site)
        if not isinstance(source, BlockInput) or self.replaying:
            return
        segment = self._prefill.segments[-1] if self._prefill.segments else None
        current = segment.layer_call if segment is not None else call
        self._probe.capture_input(source, hidden, current.position_embeddings, current.attention_mask)

    # --- decisions --------------------------------------------------------------------------------
    def _decide(self, ctx: PruneContext) -> Keep | None:
        """The strategy's decision (or the recorded one under replay); None = this site changes nothing."""
        if self.replaying:
            if ctx.site not in self._recorded:
                raise PruningError(f"replay has no recorded decision for {ctx.site}")
            keep = self._recorded[ctx.site]
        else:
            keep = self.strategy.prune(ctx)
            if keep is not None and not isinstance(keep, Keep):
                raise TypeError(f"{self.strategy.name}.prune must return a Keep or None, got {type(keep).__name__}")
            if keep is not None and keep.mask_only and ctx.stage is not Stage.LLM_LAYER:
                raise PruningError(f"{self.strategy.name} returned a mask_only decision at {ctx.site}; masking "
                                   "instead of removing is served at llm_layer sites only")
            if keep is not None and keep.order is not None and (ctx.stage is Stage.VISION_LAYER or keep.mask_only):
                raise PruningError(f"{self.strategy.name} returned an order at {ctx.site}; reordering is served "
                                   "after the vision encoder (vision_output, projector_output, llm_layer), not with "
                                   "mask_only")
        if keep is not None:
            keep = _normalise(keep, ctx, self.strategy.name)
        self._recorded[ctx.site] = keep
        return keep

    def _decide_all(self, ctx: PruneContext) -> Keep:
        """As ``_decide``, with None read as keeping every token (stages where a gather is cheap)."""
        keep = self._decide(ctx)
        return keep if keep is not None else Keep([torch.arange(int(n), device=ctx.tokens.device) for n in ctx.lengths])

    def _site(self, stage: Stage, layer: int | None = None) -> Site | None:
        site = Site(stage, layer)
        return site if site in self.sites else None

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

    def _new_units(self, vision: VisionPass, n_units: int, n_tokens: int) -> None:
        vision.images = [SampleTrack.full([n_tokens], [self.adapter.unit_grid(u, n_tokens)]) for u in range(n_units)]
        vision.events = []

    def _prune_vision(self, site: Site, hidden: Tensor, vision: VisionPass) -> Tensor:
        prefix = self.adapter.vision_prefix_tokens
        patches = hidden[:, prefix:]
        if vision.images is None:
            self._new_units(vision, patches.shape[0], patches.shape[1])
        lengths = vision.lengths()
        if vision.layer_counts is None:
            vision.layer_counts = lengths[:, None].repeat(1, len(self.adapter.vision_layers))
        keep = self._decide(self._image_context(site, patches, vision, lengths, prefix))
        if keep is None:
            return hidden
        self._apply_to_images(vision, keep, str(site))
        counts = vision.lengths()
        vision.layer_counts[:, site.layer + 1 :] = counts[:, None]
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
                packed.rebuild(*self.adapter.read_packed_block_call(kwargs), mask)
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
        """A packed encoder's attention ran once per image (or window): join the q, k, v its calls recorded and
        lay them out per image before the site reads its signals."""
        module = self._scored.get(site)
        if module is not None and not self.replaying:
            self._probe.flush(module, lambda x: pad_images(x, vision.packed.image_chunks()))

    def _on_projector_input(self, module, args):
        vision = self._vision
        site = self._site(Stage.VISION_OUTPUT)
        if vision is None:
            vision = self._vision = VisionPass(pixel_values=None)
        if vision.packed is not None:
            return self._packed_projector_input(site, vision, args)
        features = args[0]
        n_images, n_tokens = features.shape[:2]
        if vision.images is None or len(vision.images) != n_images:  # no vision_layer site pruned in this pass
            self._new_units(vision, n_images, n_tokens)
        lengths = vision.lengths()
        if int(lengths.max()) != n_tokens:
            raise PruningError(
                f"the projector received {n_tokens} tokens per image but the vision encoder kept "
                f"{lengths.tolist()}; the features were not read from a layer after the last vision_layer site"
            )
        if site is None:
            vision.projector_counts = lengths
            return None
        ctx = self._image_context(site, features, vision, lengths, self.adapter.vision_prefix_tokens)
        keep = self._decide_all(ctx)
        self._apply_to_images(vision, keep, str(site))
        vision.projector_counts = vision.lengths()
        return (_assemble(features, keep),) + tuple(args[1:])

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

    def _image_context(self, site: Site, tokens: Tensor, vision: VisionPass, lengths: Tensor, prefix: int,
                       view=None):
        """Context over vision units; signal columns skip the encoder's prefix (CLS) tokens, and on a packed
        encoder list each merge group's rows (``view``)."""
        n_images, n_tokens = tokens.shape[:2]
        grids = [d.grid if d.intact_single_image else None for d in vision.images]
        signals = None
        if site in self._scored:
            if vision.packed is not None:
                self._flush_packed(site, vision)
            contiguous = None
            if view is not None:
                columns, valid = view.columns()
            else:
                columns = prefix + torch.arange(n_tokens).expand(n_images, n_tokens)
                valid = torch.arange(n_tokens)[None] < lengths[:, None]
                contiguous = n_tokens > 0 and bool((lengths == n_tokens).all())
            signals = self._signals(site, list(range(n_images)), columns, valid, contiguous)
        return PruneContext(
            site=site, tokens=tokens, lengths=lengths, grids=grids, sample_of=list(range(n_images)),
            budget=self.strategy.budget, num_layers=len(self.adapter.vision_layers), signals=signals,
            budget_units=self.adapter.budget_units(),
            _prefix_source=(lambda: vision.prefix) if vision.prefix is not None else None,
            _seed_source=vision.seed, _grid_source=lambda u: vision.images[u].grid_positions(self.adapter.image_grid),
        )

    @staticmethod
    def _apply_to_images(vision: VisionPass, keep: Keep, site: str) -> None:
        n_in = [len(d.kept) for d in vision.images]
        for u, d in enumerate(vision.images):
            d.select(*_in_sequence_order(keep, u))
        vision.events.append((site, n_in, [d.kept.clone() for d in vision.images]))

    # --- multimodal model and LLM entry -----------------------------------------------------------
    def _on_multimodal(self, module, args, kwargs):
        self._capture_inputs(kwargs)
        self._span = self.adapter.read_multimodal_call(args, kwargs)

    def _capture_inputs(self, kwargs: dict) -> None:
        """Remember what the adapter needs to lay images out (LLaVA-NeXT's image_sizes), from whichever call
        carries the pixels first (generate, the top model, the multimodal model)."""
        facts = compat.CallFacts.read(kwargs)
        if facts.video:
            raise PruningError("prunekit prunes image tokens; video inputs (pixel_values_videos) are not supported")
        if facts.pixels:
            self._inputs = self.adapter.capture_vision_inputs(kwargs)
            self._pixels_pending = True
        return facts

    def _on_llm_entry(self, module, args, kwargs):
        self._passed_cache = None
        call = self.adapter.read_lm_call(kwargs)
        if call.inputs_embeds is None:
            raise PruningError("prunekit expects the language model to receive inputs_embeds from the multimodal model")
        stray = compat.unread_cache(module, kwargs)
        if stray is not None:
            raise SeamError(f"the language model received its KV cache as {stray!r}, a name prunekit does not read")
        if compat.cache_length(call.cache) == 0:
            if call.use_cache and call.cache is None:  # create it here (as the LM would) so decode steps can be matched to it
                call.cache = compat.new_cache(module.config)
            self._passed_cache = call.cache
            self._start_prefill(call)
        else:
            self._start_decode(call)
        self.adapter.write_lm_call(call, kwargs)
        return args, kwargs

    def _start_prefill(self, call: compat.LMCall) -> None:
        embeds, cache = call.inputs_embeds, call.cache
        batch, length = embeds.shape[:2]
        span = self._span
        self._span = None
        if span is None or span.shape != (batch, length):
            raise SeamError("the language model was called without the image-token span of the multimodal model's "
                            "forward (its hook saw no call, or a different batch)")
        device = embeds.device
        span = span.to(device)
        mask = call.attention_mask
        mask = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
        if mask.dim() != 2:
            raise PruningError("prunekit needs a 2-D attention_mask (batch, length); got a prepared 4-D mask")
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
        remaining = list(range(len(images)))
        tracks, sample_units, sample_images = [], [], []
        for b, count in enumerate(counts):
            mine, total = [], 0
            while total < count and remaining:
                i = remaining.pop(0)
                mine.append(i)
                total += images[i].track.span_length
            if total != count:
                raise PruningError(
                    f"sample {b} has {count} image tokens but its images give {total} features; "
                    "prompt placeholders and images do not line up"
                )
            tracks.append(SampleTrack.from_images([images[i].track for i in mine]))
            sample_images.append(mine)
            sample_units.append([u for i in mine for u in images[i].units])
        if remaining:
            raise SeamError(f"the vision tower encoded {len(images)} images but the language model's input has "
                            f"image-token spans for {len(images) - len(remaining)}: no visual span was found for the "
                            "rest")
        trace.vision_units = [len(units) for units in sample_units]
        trace.vision_tokens = [sum(vision.images[u].span_length for u in units) for units in sample_units]
        trace.merge_size = self.adapter.merge_size
        if vision.projector_counts is not None:
            trace.projector_tokens = [int(vision.projector_counts[units].sum()) for units in sample_units]
        layers = len(self.adapter.vision_layers)
        per_unit = vision.layer_counts
        if per_unit is None:
            per_unit = torch.tensor([[d.span_length] * layers for d in vision.images], dtype=torch.long).reshape(-1, layers)
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
        images, start = [], 0
        newlines = self.strategy.image_newlines == "keep" or not vision.events
        for lay in layouts:
            units = list(range(start, start + lay.units))
            start += lay.units
            images.append(_Image(lay, units, [vision.images[u] for u in units], newlines))
        return images

    def _start_decode(self, call: compat.LMCall) -> None:
        embeds, cache, prefill = call.inputs_embeds, call.cache, self._prefill
        if prefill is None or prefill.cache is None or prefill.cache() is not cache:
            raise PruningError(
                "this KV cache was not filled by a prefill under this attachment; prunekit cannot continue it "
                "(start generation from the prompt with the strategy attached)"
            )
        prefill.step += 1  # counted for every decode step: the probe skips them (also when nothing was pruned)
        if not prefill.active:
            return
        batch, q = embeds.shape[:2]
        if q != 1:
            raise PruningError(
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

    # --- guards -----------------------------------------------------------------------------------
    def _on_top_forward(self, module, args, kwargs):
        if self._capture_inputs(kwargs).labels:
            raise PruningError(
                "labels are not supported with pruning attached: the pruned sequence no longer lines up with "
                "the labels (training through pruning is not implemented). Detach the strategy for a loss."
            )

    def _guarded_generate(self, generate):
        @functools.wraps(generate)
        def guarded(*args, **kwargs):
            request = compat.GenerateRequest.read(self.model, args, kwargs)
            if request.num_beams > 1:
                raise PruningError("beam search is not supported with pruning attached (beams reorder the "
                                   "per-sample pruned caches); use greedy or sampling (num_beams=1)")
            if request.assisted:
                raise PruningError("assisted / speculative decoding is not supported with pruning attached")
            if request.prefill_chunk_size:
                raise PruningError("chunked prefill is not supported with pruning attached")
            if request.cache_implementation not in (None, "dynamic"):
                raise PruningError(
                    f"cache_implementation={request.cache_implementation!r} is not supported: pruning gives "
                    "layers KV caches of different lengths, which needs the dynamic cache"
                )
            self._capture_inputs(kwargs)
            self._generate_prefills = 0
            try:
                out = generate(*args, **kwargs)
                self._check_generate(request)
            finally:
                self._generate_prefills = None
            return out

        return guarded

    # --- runtime guards: never a result built on hooks that did not see what they assume ------------
    def _check_generate(self, request: compat.GenerateRequest) -> None:
        if request.input_ids is None:
            return
        with_images = self.adapter.image_token_mask(request.input_ids, None).any(1)
        if not bool(with_images.any()):
            return
        if self._generate_prefills == 0 or self.trace is None:
            raise SeamError("generate() ran with image tokens in the prompt, but no prefill of the language model "
                            "was seen by prunekit's hooks")
        self._check_counts(with_images.cpu(), self.trace)

    def _check_counts(self, with_images: Tensor, trace: PruneTrace) -> None:
        """n_in > 0 for every sample that has image tokens."""
        n_in = trace.llm_layer_counts[:, 0] if trace.llm_layer_counts is not None else None
        if n_in is None or len(n_in) != len(with_images):
            raise SeamError(f"the trace counts {0 if n_in is None else len(n_in)} samples for a batch of "
                            f"{len(with_images)}")
        empty = (with_images & (n_in == 0)).nonzero().squeeze(1).tolist()
        if empty:
            raise SeamError(f"samples {empty} have image tokens but prunekit saw n_in = 0 visual tokens entering "
                            "the language model")

    def _check_prefill_seen(self, span: Tensor, vision: "VisionPass | None") -> None:
        if self._generate_prefills is not None:
            self._generate_prefills += 1
            if self._generate_prefills > 1:
                raise SeamError("a second prefill started inside one generate() call: a decode step looked like a "
                                "prefill (the language model's KV cache was not seen under the name prunekit reads)")
        pending, self._pixels_pending = self._pixels_pending, False
        if pending and bool(span.any()) and (vision is None or vision.pixel_values is None):
            raise SeamError("pixel values were passed, but the image features reached the language model without "
                            "going through the vision tower prunekit hooks (a path the adapter does not know)")

    def _after_llm(self, module, args, kwargs, output):
        passed, self._passed_cache = self._passed_cache, None
        if passed is not None and compat.cache_length(passed) == 0:
            raise SeamError("the KV cache prunekit passed to the language model was left empty: the model did not "
                            "take it under the name prunekit passes it")


def _sample_grid(track: SampleTrack, adapter: ModelAdapter) -> tuple[int, int] | None:
    """The patch grid of a sample that is one intact image, else None."""
    if not track.intact_single_image:
        return None
    return track.grid if track.grids is not None else adapter.image_grid(track.span_length)


def _token_types(span: Tensor, mask: Tensor) -> Tensor:
    """TokenType codes: text before a sample's first image token is SYSTEM, after it TEXT."""
    seen_image = span.long().cumsum(1) > 0
    types = torch.where(seen_image, int(TokenType.TEXT), int(TokenType.SYSTEM))
    no_image = ~span.any(1, keepdim=True)
    types = torch.where(no_image, int(TokenType.TEXT), types)
    types = torch.where(span, int(TokenType.IMAGE), types)
    return torch.where(mask, types, int(TokenType.PAD)).to(torch.int8)


def _normalise(keep: Keep, ctx: PruneContext, name: str) -> Keep:
    """Validate a decision and order each unit's outputs by representative (= sequence order)."""
    if len(keep.indices) != ctx.num_units:
        raise PruningError(f"{name} returned decisions for {len(keep.indices)} units at {ctx.site}; expected {ctx.num_units}")
    device = ctx.tokens.device
    indices, features, members = [], [] if keep.features is not None else None, [] if keep.members is not None else None
    orders = [] if keep.order is not None else None
    for u, idx in enumerate(keep.indices):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        order = torch.argsort(idx)
        idx = idx[order]
        n = int(ctx.lengths[u])
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n):
            raise PruningError(f"{name} kept index out of range at {ctx.site}: unit {u} has {n} tokens")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PruningError(f"{name} kept a token twice at {ctx.site} (unit {u}); representatives must be unique")
        indices.append(idx.to(device))
        if features is not None:
            f = keep.features[u]
            if f.shape[0] != idx.numel():
                raise PruningError(f"{name}: unit {u} has {idx.numel()} kept indices but {f.shape[0]} features")
            features.append(f[order.to(f.device)])
        if members is not None:
            m = keep.members[u]
            if len(m) != idx.numel():
                raise PruningError(f"{name}: unit {u} has {idx.numel()} kept indices but {len(m)} member lists")
            members.append([torch.as_tensor(m[j], dtype=torch.long).reshape(-1).cpu() for j in order.tolist()])
        if orders is not None:
            key = torch.as_tensor(keep.order[u]).reshape(-1)
            if key.numel() != idx.numel():
                raise PruningError(f"{name}: unit {u} has {idx.numel()} kept indices but {key.numel()} order keys")
            orders.append(key[order.to(key.device)].cpu())
    return Keep(indices, features, members, keep.mask_only, orders)


def _sequence_order(key: Tensor) -> Tensor:
    """Permutation putting outputs (sorted by representative) in sequence order: by key, ties by representative."""
    return torch.sort(key, stable=True).indices


def _in_sequence_order(keep: Keep, u: int) -> tuple[Tensor, list[Tensor] | None]:
    """Unit u's (indices, members) in sequence order, as the trace lists them."""
    indices, members = keep.indices[u], keep.members[u] if keep.members else None
    if keep.order is None:
        return indices, members
    seq = _sequence_order(keep.order[u])
    return indices[seq.to(indices.device)], None if members is None else [members[j] for j in seq.tolist()]


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


def _assemble(tokens: Tensor, keep: Keep) -> Tensor:
    """(U, K_max, D): each unit's kept (or merged) tokens in sequence order, zero right-padded."""
    if keep.order is not None:
        seq = [_sequence_order(o).to(i.device) for o, i in zip(keep.order, keep.indices)]
        keep = Keep([i[s] for i, s in zip(keep.indices, seq)],
                    None if keep.features is None else [f[s.to(f.device)] for f, s in zip(keep.features, seq)])
    sizes = {len(i) for i in keep.indices}
    if len(sizes) == 1:
        if keep.features is not None:
            return torch.stack([f.to(tokens.dtype) for f in keep.features])
        return take(tokens, torch.stack(keep.indices))
    out = tokens.new_zeros(tokens.shape[0], max(sizes), tokens.shape[2])
    for u, idx in enumerate(keep.indices):
        out[u, : len(idx)] = keep.features[u].to(tokens.dtype) if keep.features is not None else tokens[u, idx]
    return out


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
        n, source = layout.tokens, layout.source
        self._span_of = torch.full((layout.units * n,), -1, dtype=torch.long)
        placed = (source >= 0).nonzero().squeeze(1)
        self._span_of[source[placed]] = placed
        occupant = {}
        for c, d in enumerate(tracks):  # output j of a unit fills its j-th surviving slot
            for slot, members in zip(d.kept.sort().values.tolist(), d.members):
                occupant[c * n + slot] = c * n + members
        kept, members = [], []
        for p, s in enumerate(source.tolist()):
            if s < 0 and newlines:
                kept.append(p)
                members.append(torch.tensor([p]))
            elif s in occupant:
                m = self._span_of[occupant[s]]
                kept.append(p)
                members.append(m[m >= 0].sort().values)
        length = layout.span_length
        self.track = SampleTrack(length, torch.zeros(length, dtype=torch.long), torch.tensor(kept, dtype=torch.long),
                                 members, [layout.grid])

    def span_of(self, kept: list[Tensor], event: int) -> Tensor:
        """Span positions alive after a vision event, given each unit's kept token indices."""
        if self.layout.is_identity:
            return kept[self.units[0]]
        n = self.layout.tokens
        tokens = torch.cat([c * n + kept[u] for c, u in enumerate(self.units)])
        span = self._span_of[tokens]
        if self.newlines:
            span = torch.cat([span, (self.layout.source < 0).nonzero().squeeze(1)])
        return span[span >= 0].sort().values
