"""Processor pieces the embedded models share: LLaVA-1.5's chat template, and Qwen2-VL / Qwen2.5-VL / Qwen3-VL /
InternVL / LLaVA-OneVision processors without the video processor.

``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` insist on a video processor, and the video processors need
torchvision, which the CPU machines do not have (and must not get). For images these subclasses behave exactly like
the originals (same placeholder expansion, ``mm_token_type_ids``, ``image_grid_thw``). Videos (the Qwen families and
OneVision; ``videos=[frames, ...]``, ``video_metadata=[{"fps", "frames_indices", "total_num_frames"}, ...]``) go
through the image processor frame by frame and get the stock placeholders (docs/support.md, "Video"); the stock video
processors resize frames by their own limits, so only the tiny twins use this path.
They live in an importable module so a saved processor reloads with ``<Class>.from_pretrained(dir)``;
``AutoProcessor`` cannot find them by name (``prunekit.loading.load_processor`` picks the class).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image
from transformers import (InternVLProcessor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor,
                          Qwen3VLProcessor)
from transformers.feature_extraction_utils import BatchFeature
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


class _OfflineVideos:
    """Mixin: ``videos=`` served without a video processor. Each chat-template video item (``video_item``) becomes
    the family's placeholders for its video, the text is tokenized as the processor does (``mm_token_type_ids``: 2 at
    video tokens) and the pixels are added. A call holds videos or images, as prunekit prunes one modality per call."""

    video_item: str

    def __call__(self, images=None, text=None, videos=None, video_metadata=None, **kwargs):
        if videos is None:
            return super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            raise ValueError("this processor takes images or videos in one call, not both")
        kwargs.pop("do_sample_frames", None)  # frames come sampled (the evaluator samples them)
        metadata = [dict(m) for m in video_metadata] if video_metadata is not None else [{} for _ in videos]
        if len(metadata) != len(videos):
            raise ValueError(f"{len(metadata)} video_metadata entries for {len(videos)} videos")
        extra, placeholders = self._videos(list(videos), metadata)
        texts = [text] if isinstance(text, str) else list(text)
        items = sum(t.count(self.video_item) for t in texts)
        if items != len(videos):
            raise ValueError(f"the prompts hold {items} video items ({self.video_item!r}) for {len(videos)} videos")
        pending = iter(placeholders)
        texts = [re.sub(re.escape(self.video_item), lambda _: next(pending), t) for t in texts]
        tensors = kwargs.pop("return_tensors", None)
        inputs = dict(self.tokenizer(texts, **kwargs))
        if "mm_token_type_ids" in self.model_input_names:
            inputs["mm_token_type_ids"] = [[2 if i == self.video_token_id else 0 for i in row] for row in inputs["input_ids"]]
        return BatchFeature({**inputs, **extra}, tensor_type=tensors)


def _fps(meta: dict) -> tuple[list[int], float]:
    """A video's sampled frame numbers and source fps (transformers' default of 24 where none is given)."""
    return [int(i) for i in meta.get("frames_indices") or []], float(meta.get("fps") or 24)


class _QwenVideos(_OfflineVideos):
    """Qwen videos: every frame through the image processor (its resize, normalisation and patch order; a single
    image's patch repeats it over the temporal axis), then frame pairs made into temporal patches: temporal slot t of
    a patch is frame t of the pair, as the video processor lays them out; an odd count repeats the last frame."""

    video_item = "<|vision_start|><|video_pad|><|vision_end|>"

    def _videos(self, videos, metadata):
        pixels, grids, placeholders, seconds = [], [], [], []
        for frames, meta in zip(videos, metadata):
            patches, grid = self._temporal_patches(list(frames))
            pixels.append(patches)
            grids.append(grid)
            indices, fps = _fps(meta)
            indices = indices or list(range(len(frames)))
            placeholders.append(self._placeholder(grid, indices, fps))
            sampled = len(indices) / meta["total_num_frames"] * fps if meta.get("total_num_frames") else fps
            seconds.append(self.image_processor.temporal_patch_size / sampled)
        extra = {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)}
        if isinstance(self, Qwen2_5_VLProcessor):
            extra["second_per_grid_ts"] = torch.tensor(seconds)
        return extra, placeholders

    def _temporal_patches(self, frames) -> tuple[torch.Tensor, list[int]]:
        tp = self.image_processor.temporal_patch_size
        frames = frames + frames[-1:] * (-len(frames) % tp)
        out = self.image_processor(images=frames, return_tensors="pt")
        grid = out["image_grid_thw"]
        if not bool((grid == grid[0]).all()):
            raise ValueError("a video's frames must share one size")
        n = int(grid[0].prod())
        rows = out["pixel_values"].view(len(frames) // tp, tp, n, 3, tp, -1)  # (T, frame in pair, patch, C, t, p*p)
        video = torch.stack([rows[:, t, :, :, t] for t in range(tp)], dim=3)  # slot t from frame t of the pair
        return video.reshape(len(frames) // tp * n, -1), [len(frames) // tp, int(grid[0, 1]), int(grid[0, 2])]

    def _placeholder(self, grid, indices, fps) -> str:
        """Qwen2-VL / 2.5-VL: one run of video tokens for all frames."""
        return "<|vision_start|>" + "<|video_pad|>" * (math.prod(grid) // self.image_processor.merge_size**2) + \
            "<|vision_end|>"


class Qwen2VLImageOnlyProcessor(_QwenVideos, _ImageOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the (torchvision-only) video processor."""


class Qwen2_5_VLImageOnlyProcessor(_QwenVideos, _ImageOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the (torchvision-only) video processor."""


class Qwen3VLImageOnlyProcessor(_QwenVideos, _ImageOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the (torchvision-only) video processor; a video's frames are each preceded by its
    timestamp (``<1.5 seconds>``: the mean time of the temporal patch's frames) and wrapped in vision start / end."""

    def _placeholder(self, grid, indices, fps) -> str:
        tp = self.image_processor.temporal_patch_size
        indices = indices + indices[-1:] * (-len(indices) % tp)
        per_frame = grid[1] * grid[2] // self.image_processor.merge_size**2
        return "".join(f"<{(indices[k] + indices[k + tp - 1]) / 2 / fps:.1f} seconds>" + "<|vision_start|>"
                       + "<|video_pad|>" * per_frame + "<|vision_end|>" for k in range(0, len(indices), tp))

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)


class LlavaOnevisionImageOnlyProcessor(_OfflineVideos, _ImageOnly, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the (torchvision-only) video processor: the same anyres token count
    (unpadding, ``anyres_max`` downscale, newlines) and ``batch_num_images``. A video's frames are resized to the
    tower's square input (bicubic) and normalised like images; its placeholder run is frames x the 2x2-pooled grid
    plus one newline, as the stock processor writes it."""

    video_item = "<video>"

    def _videos(self, videos, metadata):
        ip = self.image_processor
        side = ip.size["height"] if "height" in ip.size else ip.size["shortest_edge"]
        mean, std = np.asarray(ip.image_mean, dtype=np.float32), np.asarray(ip.image_std, dtype=np.float32)

        def frame(image) -> np.ndarray:
            image = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
            pixels = np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
            return ((pixels - mean) / std).transpose(2, 0, 1)

        lengths = {len(frames) for frames in videos}
        if len(lengths) != 1:
            raise ValueError("the videos of one call must have the same number of frames (pixel_values_videos stacks them)")
        pixels = torch.from_numpy(np.stack([np.stack([frame(f) for f in frames]) for frames in videos]))
        pooled = math.ceil(int(math.sqrt(self.num_image_tokens)) / 2)
        placeholders = [self.video_token * (len(frames) * pooled * pooled + 1) for frames in videos]
        return {"pixel_values_videos": pixels}, placeholders

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
        self._processor = processor
        if not callable(getattr(self.tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"expected a processor or tokenizer with a tokenizer, got {type(processor).__name__}")
        self.image_token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        bos = self.tokenizer.bos_token_id
        first = self.tokenizer(["x"], is_split_into_words=True, add_special_tokens=True)["input_ids"][:1]
        self.bos = bos if bos is not None and first == [bos] else None  # the BOS id it puts first; None: none (Qwen)
        self.marks = None  # (user turn, assistant turn, image pattern, video pattern or None) once a template is found
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
        return _loose(user), _loose(assistant), re.compile(_loose(before) + run + _loose(after)), self._video(render)

    def _video(self, render) -> "re.Pattern | None":
        """What a video item writes, expanded: its token run inside the item's wrapper, per frame where the processor
        repeats the wrapper (Qwen3-VL), each after an optional timestamp (``<1.5 seconds>``); None without video."""
        token = getattr(self._processor, "video_token", None)
        a, b = self._A, self._B
        try:
            one = render([{"role": "user", "content": [{"type": "text", "text": a}, {"type": "video"},
                                                        {"type": "text", "text": b}]}])
        except Exception:  # a template that knows no video item
            return None
        item = one[one.index(a) + len(a): one.index(b)]
        if not token or token not in item:
            return None
        before, _, after = item.partition(token)
        frame = r"(?:<\d+(?:\.\d+)?\s*seconds>)?\s*" + _loose(before) + r"\s*(?:" + _loose(token) + r"\s*)+" + _loose(after)
        return re.compile(r"(?:" + frame + r"\s*)+")

    def text(self, ids: list[int], image_token_id: int) -> str:
        """The instruction of one sample from its live prompt ids (no padding)."""
        if self.marks is None:
            raise PruningError("the processor has no chat template with an image item to read the instruction off the "
                               "prompt; give it with `with handle.instructions([...]):`")
        user, assistant, image, video = self.marks
        prompt = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        turns = list(re.finditer(assistant, prompt))
        starts = [m for m in re.finditer(user, prompt) if not turns or m.start() < turns[-1].start()]
        if not turns or not starts:
            raise PruningError("the prompt does not follow the processor's chat template (no user turn followed by the "
                               "assistant's), so its instruction cannot be read off it; give the texts with "
                               "`with handle.instructions([...]):`")
        end = min((t.start() for t in turns if t.start() > starts[-1].end()), default=None)
        instruction = image.sub(" ", prompt[starts[-1].end(): end])
        return (video.sub(" ", instruction) if video is not None else instruction).strip()

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
