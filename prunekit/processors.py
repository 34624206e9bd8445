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


class InstructionReader:
    """Each sample's instruction read off its prompt ids, through the processor's tokenizer and chat template
    (docs/architecture.md, "Instructions"): the text after the sample's last image placeholder, without what the
    template writes between an image and the user's text (LLaVA-1.5: a newline; Qwen: ``<|vision_end|>``) and
    without the assistant's generation prompt (`` ASSISTANT:``). Both marks come from rendering the template once
    on a probe message, so any family's template is read the same way."""

    _PROBE = "\u2063prunekit-probe\u2063"

    def __init__(self, processor):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not callable(getattr(self.tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"expected a processor or tokenizer with a tokenizer, got {type(processor).__name__}")
        self.between, self.suffix = "", ""
        image_token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        if getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            rendered = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self._PROBE}]}],
                add_generation_prompt=True, tokenize=False)
            at = rendered.index(self._PROBE)
            image_end = rendered.rfind(image_token, 0, at) + len(image_token) if image_token else at
            self.between, self.suffix = rendered[image_end:at], rendered[at + len(self._PROBE):]

    def text(self, ids: list[int], image_token_id: int) -> str:
        """The instruction of one sample from its live prompt ids (no padding)."""
        last = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
        text = self.tokenizer.decode(ids[last + 1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        between, suffix = self.between.strip(), self.suffix.strip()
        text = text.strip()
        if between and text.startswith(between):
            text = text[len(between):]
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)]
        return text.strip()

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text``, no special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def words(self, words) -> list[int]:
        """Pre-split words tokenized as one sequence, special tokens on (MMTok's keyword ids); no words: the BOS
        alone, where the tokenizer adds one."""
        words = list(words)
        if not words:
            return [] if self.bos is None else [self.bos]
        return self.tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=True)["input_ids"]

    @property
    def bos(self) -> int | None:
        """The BOS id the tokenizer puts first, or None if it adds none (Qwen)."""
        bos = self.tokenizer.bos_token_id
        first = self.tokenizer(["x"], is_split_into_words=True, add_special_tokens=True)["input_ids"][:1]
        return bos if bos is not None and first == [bos] else None
