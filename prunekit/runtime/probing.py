"""The attention probe of a handle: which modules are watched for which site, the live queries of each call, and
the signals a site's context reads (docs/architecture.md, Signals)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import compat
from ..errors import PruningError
from ..pruner import Site, Stage, TokenType
from ..signals import Signals
from .probe import AttentionProbe, BlockInput
from .site_signals import SiteSignals


class ProbingMixin:
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

    def _signals(self, site: Site, batch_rows: list[int], columns: Tensor | None, valid: Tensor | None,
                 run: slice | None = None) -> SiteSignals | None:
        source = self._scored.get(site)
        if source is None:
            return None
        prefix = self.adapter.vision_prefix_tokens if site.stage is not Stage.LLM_LAYER else 0
        return SiteSignals(self._probe, source, str(site), batch_rows, columns, valid, prefix, run)

    def _capture_block_input(self, site: Site, hidden: Tensor, call: compat.LayerCall) -> None:
        """``pre`` signals of ``site``: its block on the current sequence, with the RoPE tables and mask that
        the block would get without this cut (the current segment's, or the language model's own)."""
        source = self._scored.get(site)
        if not isinstance(source, BlockInput) or self.replaying:
            return
        segment = self._prefill.segments[-1] if self._prefill.segments else None
        current = segment.layer_call if segment is not None else call
        self._probe.capture_input(source, hidden, current.rope, current.attention_mask)
