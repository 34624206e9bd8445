"""``attach(model, strategy)`` and ``PruningHandle``: per-instance hooks that make a strategy prune inside
``forward`` / ``generate``. The handle installs and removes the hooks; each stage's work lives in its own mixin.

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
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .. import compat
from ..adapters import ModelAdapter, adapter_for
from ..errors import KnobError, PruningError
from ..processors import InstructionReader
from ..pruner import Keep, Site, Stage, TokenPruner
from ..registry import build_strategy
from ..trace import PruneTrace
from .decisions import DecisionsMixin
from .guards import GuardsMixin
from .instructions import InstructionsMixin
from .language import LanguageMixin
from .layout import LayoutMixin
from .probing import ProbingMixin
from .state import Prefill, VisionPass
from .validation import ValidationMixin
from .vision import VisionMixin

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, PruningHandle]" = weakref.WeakKeyDictionary()


def attach(model: nn.Module, strategy: TokenPruner | str | Mapping[str, Any], *, processor: Any = None,
           **params: Any) -> "PruningHandle":
    """Attach ``strategy`` to ``model`` (this instance only). Usable as a plain call or a context manager.

    ``processor`` (or a bare tokenizer): the model's processor, needed by strategies that select visual tokens by
    the instruction before the language model (``Signals(instruction=True)``: MMTok, CDPruner); the instruction is
    read off each prompt through its chat template, or given with ``handle.instructions([...])``."""
    if not isinstance(strategy, TokenPruner):
        strategy = build_strategy(strategy, **params)
    elif params:
        raise KnobError("pass knobs either to build_strategy or with a strategy name, not with an instance")
    return PruningHandle(model, strategy, processor=processor)
class PruningHandle(ValidationMixin, ProbingMixin, DecisionsMixin, VisionMixin, LayoutMixin, LanguageMixin, GuardsMixin,
                    InstructionsMixin):
    """The attachment of one strategy to one model instance: ``trace``, ``replay()``, ``detach()``."""

    def __init__(self, model: nn.Module, strategy: TokenPruner, processor: Any = None):
        if model in _ATTACHED:
            raise PruningError(
                f"this model already has {_ATTACHED[model].strategy!r} attached; detach() it first "
                "(one strategy per model instance)"
            )
        self.model = model
        self.strategy = strategy
        self.adapter: ModelAdapter = adapter_for(model)
        try:
            strategy.bind(self.adapter)  # model-dependent knobs (depths, layers) are checked here
            self.sites = list(strategy.sites())
            self._site_of = {(site.stage, site.layer): site for site in self.sites}  # hooks look sites up per layer
        except (ValueError, TypeError) as e:
            if isinstance(e, PruningError):
                raise
            raise KnobError(f"{strategy.name}: {e}") from e
        needs_reader = processor is not None and any(self._needs_instruction(site) for site in self.sites)
        self._reader = InstructionReader(processor) if needs_reader else None  # renders the template: only if asked
        self._given_instructions: list[str] | None = None  # handle.instructions([...]) for the calls inside
        self._prompt: tuple[Tensor | None, Tensor | None] = (None, None)  # prompt ids and mask of the current call
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
    @staticmethod
    def of(model: nn.Module) -> "PruningHandle | None":
        """The handle attached to ``model``, or None."""
        return _ATTACHED.get(model)

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
    def decisions(self) -> dict:
        """The last prefill's decision at each site (``Keep``, or None where the site changed nothing): what
        ``replay()`` re-applies."""
        return dict(self._recorded)

    @property
    def probe(self):
        """The ``AttentionProbe`` recording this strategy's signals (None when it declares none)."""
        return self._probe

    @property
    def decode_steps(self) -> int:
        """Decode steps the language model ran since the last prefill."""
        return 0 if self._prefill is None else self._prefill.step

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

    def _install(self) -> None:
        a, hook = self.adapter, self._handles.append
        hook(a.vision_tower.register_forward_pre_hook(self._on_vision_tower, with_kwargs=True))
        hook(a.projector.register_forward_pre_hook(self._on_projector_input))
        hook(a.projector.register_forward_hook(self._on_projector_output))
        hook(a.multimodal_model.register_forward_pre_hook(self._on_multimodal, with_kwargs=True))
        hook(a.language_model.register_forward_pre_hook(self._on_llm_entry, with_kwargs=True))
        hook(a.language_model.register_forward_hook(self._after_llm, with_kwargs=True))
        for i, (_, projector) in enumerate(a.injection_projectors):  # DeepStack: rows follow the cuts on both sides
            hook(projector.register_forward_hook(self._on_injection_projector))
            hook(a.decoder_layers[i].register_forward_hook(functools.partial(self._inject_visual, i)))
        vision_layers = sorted(s.layer for s in self.sites if s.stage is Stage.VISION_LAYER)
        if vision_layers:
            for i, layer in enumerate(a.vision_layers):
                if i > vision_layers[0]:
                    hook(layer.register_forward_pre_hook(functools.partial(self._on_vision_layer, i), with_kwargs=True))
                    if a.vision_mask_module(i) is not layer:  # the layer passes no mask on: give it to its attention
                        hook(a.vision_mask_module(i).register_forward_pre_hook(self._on_vision_mask, with_kwargs=True))
            if a.full_grid_features or a.pools_video:  # survivors back into each unit's full grid before the model groups
                # first of the layer's hooks: transformers' output recorders (hidden_states) then record the full grid
                hook(a.vision_layers[a.vision_feature_layer].register_forward_hook(self._restore_vision_grid,
                                                                                   prepend=True))
        llm_layers = sorted(s.layer for s in self.sites if s.stage is Stage.LLM_LAYER)
        if llm_layers:
            for i, layer in enumerate(a.decoder_layers):
                if i >= llm_layers[0]:
                    hook(layer.register_forward_pre_hook(functools.partial(self._on_decoder_layer, i), with_kwargs=True))
        hook(self.model.register_forward_pre_hook(self._on_top_forward, with_kwargs=True))
        for module in (self.model, a.multimodal_model):  # a call's prompt ids never serve a later call
            hook(module.register_forward_hook(self._forget_prompt))
        self.model.generate = self._guarded_generate(self.model.generate)
        self._install_probe()
