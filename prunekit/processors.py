"""Processor pieces the embedded models share: LLaVA-1.5's chat template, and image-only Qwen2-VL / Qwen2.5-VL
processors (the real processors minus the video processor).

``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` insist on a video processor, and the Qwen video processor
needs torchvision, which the CPU machines do not have (and must not get). For images these subclasses
behave exactly like the originals (same placeholder expansion, ``mm_token_type_ids``, ``image_grid_thw``).
They live in an importable module so a saved processor reloads with ``<Class>.from_pretrained(dir)``;
``AutoProcessor`` cannot find them by name (``prunekit.loading.load_processor`` picks the class).
"""
from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

# LLaVA-1.5 (vicuna_v1, as llava-hf's chat template writes it): "USER: <image>\n{prompt} ASSISTANT: {answer}</s>"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class _ImageOnly:
    """Mixin: the image processor and tokenizer only (no ``video_processor`` attribute)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the (torchvision-only) video processor."""


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the (torchvision-only) video processor."""


IMAGE_ONLY_PROCESSORS = {"qwen2_vl": Qwen2VLImageOnlyProcessor, "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor}
