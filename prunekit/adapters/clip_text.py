"""CDPruner's relevance side, an auxiliary model the strategy owns: a CLIP text encoder with its projection and the
matching CLIP visual projection, loaded with ``from_pretrained`` from a hub id or a local directory (a ``CLIPModel``
checkpoint such as ``openai/clip-vit-large-patch14-336``, the tower LLaVA-1.5 was built on)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import compat
from ..errors import UnsupportedModelError


class ClipTextEncoder:
    """Text embeddings of token segments and CLIP-space image embeddings of a tower's patch states, in fp32."""

    def __init__(self, path: str, tokenizer, text_model: nn.Module, visual_projection: nn.Module,
                 post_layernorm: nn.Module, device: torch.device):
        self.path, self.tokenizer, self.device = path, tokenizer, device
        self.text_model, self.visual_projection, self.post_layernorm = text_model, visual_projection, post_layernorm
        self.width = int(text_model.config.max_position_embeddings)  # 77 tokens a segment

    @classmethod
    def load(cls, path: str, tower: nn.Module, device: torch.device, strategy: str) -> "ClipTextEncoder":
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        hint = (f"{strategy} needs the CLIP text encoder and visual projection that match this vision tower: pass "
                "text_encoder=<hub id or local dir of a CLIPModel checkpoint>")
        post_layernorm = compat.clip_post_layernorm(tower)
        if post_layernorm is None:
            raise UnsupportedModelError(f"{strategy} needs a CLIP vision tower (post_layernorm + visual projection); "
                                        f"this tower is a {type(tower).__name__}")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(f"{hint}; {path!r} could not be loaded: {e}") from e
        vision = getattr(config, "vision_config", None)
        width = getattr(tower.config, "hidden_size", None)
        if vision is None or getattr(config, "text_config", None) is None:
            raise UnsupportedModelError(f"{hint}; {path!r} is a {config.model_type!r} checkpoint, not a CLIPModel")
        if vision.hidden_size != width:
            raise UnsupportedModelError(
                f"{hint}; {path!r} is a CLIP of vision width {vision.hidden_size}, this tower has width {width}, so "
                "its projection cannot read this tower's patches (a tower trained without a CLIP text encoder, "
                "such as the pocket model's, has none)")
        if vision.patch_size != getattr(tower.config, "patch_size", None):
            raise UnsupportedModelError(f"{hint}; {path!r} has {vision.patch_size} px patches, this tower "
                                        f"{getattr(tower.config, 'patch_size', None)}")
        with _quiet():  # each half of a CLIPModel checkpoint reports the other half's weights as unexpected
            text_model = CLIPTextModelWithProjection.from_pretrained(path, **compat.LOAD_KWARGS)
            vision_model = CLIPVisionModelWithProjection.from_pretrained(path, **compat.LOAD_KWARGS)
        if not _same_norm(compat.clip_post_layernorm(vision_model), post_layernorm):
            raise UnsupportedModelError(
                f"{hint}; {path!r} is another CLIP than this tower's: its final layer norm differs from the tower's "
                "(e.g. the 224 px openai/clip-vit-large-patch14 for LLaVA-1.5's 336 px tower), so its relevance would "
                "not describe these patches")
        projection = vision_model.visual_projection
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(path, tokenizer, text_model.to(device, torch.float32).eval(), projection.to(device, torch.float32),
                   post_layernorm, device)

    def token_ids(self, text: str) -> list[int]:
        """The whole text with the tokenizer's BOS / EOS, no truncation."""
        return self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]

    @torch.no_grad()
    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(M, D) pooled, projected text embeddings of M segments of ``width`` ids (zero-padded, ``mask`` 0 there)."""
        out = self.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.text_embeds.float()

    @torch.no_grad()
    def project_patches(self, patches: Tensor) -> Tensor:
        """(N, D) CLIP-space embeddings of a tower's patch states: its post-layernorm, then the visual projection."""
        norm = self.post_layernorm
        x = torch.nn.functional.layer_norm(patches.float(), norm.normalized_shape, norm.weight.float(),
                                           norm.bias.float(), norm.eps)
        return self.visual_projection(x.to(self.device))


def _same_norm(a: nn.Module | None, b: nn.Module, tolerance: float = 1e-2) -> bool:
    """The same layer norm up to a half-precision cast of the VLM's copy (bf16 keeps 8 bits: 4e-3 at 1.0)."""
    if a is None:
        return False
    return all(torch.allclose(x.detach().float().cpu(), y.detach().float().cpu(), rtol=0, atol=tolerance)
               for x, y in ((a.weight, b.weight), (a.bias, b.bias)))


@contextmanager
def _quiet():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
