"""How a sample becomes model inputs and an answer, shared by prunekit's evaluator and its lmms-eval model.

One definition, so the two harnesses cannot drift apart: the user turn holds the sample's video (if any), its images,
then the prompt (or, where the prompt marks each image's place with ``<image>``, as MUIRBench's questions do, the images
at their marks), rendered by the processor's own chat template with the generation prompt appended; answers are
cut at the task's stop strings (lmms-eval's ``until``) and stripped. A video reaches the processor as its sampled frames
(RGB images) with transformers' ``video_metadata`` (source fps, the sampled frame numbers, the source frame count).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .video import Video

IMAGE_MARK = "<image>"


def chat_text(processor, n_images: int, prompt: str, n_videos: int = 0) -> str:
    """The rendered prompt: one user turn holding ``n_videos`` videos, ``n_images`` images then ``prompt`` (the images
    at the prompt's ``<image>`` marks when it has one per image), and the generation prompt."""
    pieces = prompt.split(IMAGE_MARK)
    if n_images and len(pieces) == n_images + 1:
        content = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            content += [{"type": "image"}, {"type": "text", "text": piece}]
        content = [c for c in content if c["type"] == "image" or c["text"]]
    else:  # marks that do not match the images are dropped: a processor would read them as placeholders
        text = " ".join(p.strip() for p in pieces if p.strip()) if len(pieces) > 1 else prompt
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    content = [{"type": "video"} for _ in range(n_videos)] + content
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def chat_inputs(processor, images: Sequence[Sequence], prompts: Sequence[str], device, dtype,
                videos: Sequence[Video | None] | None = None):
    """Processor outputs for a left-padded batch: row ``b`` holds ``videos[b]`` (when given), ``images[b]`` (any
    number) and ``prompts[b]``. A batch with videos has one in every row; the processor then gets
    ``videos=[frames per row]`` and ``video_metadata=[{"fps", "frames_indices", "total_num_frames"} per row]``."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
    if videos is not None and not any(v is not None for v in videos):
        videos = None
    if videos is not None and (len(videos) != len(prompts) or any(v is None for v in videos)):
        raise ValueError(f"a batch with videos needs one video per row: got {sum(v is not None for v in videos)} "
                         f"for {len(prompts)} prompts")
    texts = [chat_text(processor, len(row), prompt, n_videos=int(videos is not None))
             for row, prompt in zip(images, prompts)]
    # nested per sample where every row has images: LLaVA-OneVision then knows a sample's images (batch_num_images)
    per_row = [list(row) for row in images] if images and all(images) else [image for row in images for image in row]
    if videos is None:
        inputs = processor(images=per_row or None, text=texts, return_tensors="pt", padding=True)
    else:
        kwargs = {"images": per_row} if per_row else {}
        inputs = processor(text=texts, videos=[list(v.frames) for v in videos],
                           video_metadata=[v.metadata() for v in videos], do_sample_frames=False,  # frames come sampled
                           return_tensors="pt", padding=True, **kwargs)
    inputs = inputs.to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return inputs


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The answer: ``text`` up to the first stop string (lmms-eval's ``until``), stripped."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
