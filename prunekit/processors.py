"""Processor pieces the embedded models share: LLaVA-1.5's chat template, and image-only Qwen2-VL / Qwen2.5-VL /
Qwen3-VL / InternVL / LLaVA-OneVision processors (the real processors minus the video processor).

``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` insist on a video processor, and the Qwen video processor
needs torchvision, which the CPU machines do not have (and must not get). For images these subclasses
behave exactly like the originals (same placeholder expansion, ``mm_token_type_ids``, ``image_grid_thw``).
They live in an importable module so a saved processor reloads with ``<Class>.from_pretrained(dir)``;
``AutoProcessor`` cannot find them by name (``prunekit.loading.load_processor`` picks the class).
"""
from __future__ import annotations

import re

from transformers import (InternVLProcessor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor,
                          Qwen3VLProcessor)
from transformers.processing_utils import ProcessorMixin

from .errors import PruningError

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


class Qwen3VLImageOnlyProcessor(_ImageOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)


class LlavaOnevisionImageOnlyProcessor(_ImageOnly, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the (torchvision-only) video processor: the same anyres token count
    (unpadding, ``anyres_max`` downscale, newlines) and ``batch_num_images``."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.num_image_tokens, self.vision_feature_select_strategy = num_image_tokens, vision_feature_select_strategy
        self.image_token, self.video_token, self.vision_aspect_ratio = image_token, video_token, vision_aspect_ratio
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)


class InternVLImageOnlyProcessor(_ImageOnly, InternVLProcessor):
    """``InternVLProcessor`` without the (torchvision-only) video processor: the same tile expansion
    (``<img>`` + ``<IMG_CONTEXT>`` x image_seq_length x tiles + ``</img>``) and pixel values."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
        self.start_image_token_id, self.end_image_token_id = tokenizer.start_image_token_id, tokenizer.end_image_token_id
        self.image_token, self.image_token_id = tokenizer.context_image_token, tokenizer.context_image_token_id
        self.video_token = tokenizer.video_token
        self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")


IMAGE_ONLY_PROCESSORS = {"qwen2_vl": Qwen2VLImageOnlyProcessor, "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
                         "qwen3_vl": Qwen3VLImageOnlyProcessor, "qwen3_5": Qwen3VLImageOnlyProcessor,
                         "internvl": InternVLImageOnlyProcessor,
                         "llava_onevision": LlavaOnevisionImageOnlyProcessor}


class InstructionReader:
    """Each sample's instruction read off its prompt ids, through the processor's tokenizer and chat template
    (docs/architecture.md, "Instructions"): the user's text of the last turn, without its images and without the
    template. Rendering the template once on probe messages tells where a user turn starts (LLaVA-1.5: ``USER:``;
    Qwen: ``<|im_start|>user``), where the assistant's turn starts (`` ASSISTANT:``; ``<|im_start|>assistant``) and
    what an image item writes (``<image>\n``; ``<|vision_start|><|image_pad|><|vision_end|>``), so any family's
    template is read the same way. Marks are matched whatever the decoder does to the spaces between tokens. A prompt
    whose marks cannot be found is refused, never guessed: give the texts with ``handle.instructions([...])``."""

    _A, _B, _C = "\u2063probe-a\u2063", "\u2063probe-b\u2063", "\u2063probe-c\u2063"

    def __init__(self, processor):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not callable(getattr(self.tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"expected a processor or tokenizer with a tokenizer, got {type(processor).__name__}")
        self.image_token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        bos = self.tokenizer.bos_token_id
        first = self.tokenizer(["x"], is_split_into_words=True, add_special_tokens=True)["input_ids"][:1]
        self.bos = bos if bos is not None and first == [bos] else None  # the BOS id it puts first; None: none (Qwen)
        self.marks = None  # (user turn, assistant turn, image pattern) once a template is found
        if self.image_token and (getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            self.marks = self._read_template(processor)

    def _read_template(self, processor):
        def render(messages):
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        a, b, c = self._A, self._B, self._C
        one = render([{"role": "user", "content": [{"type": "text", "text": a}, {"type": "image"},
                                                    {"type": "text", "text": b}]}])
        two = render([{"role": "user", "content": [{"type": "text", "text": a}]},
                      {"role": "assistant", "content": [{"type": "text", "text": b}]},
                      {"role": "user", "content": [{"type": "text", "text": c}]}])
        image = one[one.index(a) + len(a): one.index(b)]
        if self.image_token not in image:
            return None
        head, between = one[: one.index(a)], two[two.index(b) + len(b): two.index(c)]
        common = 0  # the user-turn mark: what precedes every user turn (the end of the first prompt's head)
        while common < min(len(head), len(between)) and head[-1 - common] == between[-1 - common]:
            common += 1
        user, assistant = head[len(head) - common:], one[one.index(b) + len(b):]
        before, _, after = image.partition(self.image_token)
        run = r"\s*(?:" + _loose(self.image_token) + r"\s*)+"
        start, end = (getattr(processor, f"{e}_image_token", None) for e in ("start", "end"))
        if start and end:  # InternVL's processor wraps each expanded run in <img> ... </img>
            run = r"\s*(?:" + _loose(start) + r")?" + run + r"(?:" + _loose(end) + r")?\s*"
        return _loose(user), _loose(assistant), re.compile(_loose(before) + run + _loose(after))

    def text(self, ids: list[int], image_token_id: int) -> str:
        """The instruction of one sample from its live prompt ids (no padding)."""
        if self.marks is None:
            raise PruningError("the processor has no chat template with an image item to read the instruction off the "
                               "prompt; give it with `with handle.instructions([...]):`")
        user, assistant, image = self.marks
        prompt = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        turns = list(re.finditer(assistant, prompt))
        starts = [m for m in re.finditer(user, prompt) if not turns or m.start() < turns[-1].start()]
        if not turns or not starts:
            raise PruningError("the prompt does not follow the processor's chat template (no user turn followed by the "
                               "assistant's), so its instruction cannot be read off it; give the texts with "
                               "`with handle.instructions([...]):`")
        end = min((t.start() for t in turns if t.start() > starts[-1].end()), default=None)
        return image.sub(" ", prompt[starts[-1].end(): end]).strip()

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


def _loose(mark: str) -> str:
    """A regex for ``mark`` that ignores whitespace inside and around it (decoders differ in the spaces they put
    between tokens: a word-level tokenizer decodes ``USER:`` as ``USER :``)."""
    chars = [re.escape(ch) for ch in mark if not ch.isspace()]
    return r"\s*".join(chars) if chars else ""
