"""Videos for video benchmarks (Video-MME): find a row's file, sample frames uniformly, decode them with PyAV.

Frames are sampled as lmms-eval samples them (``read_video``'s PyAV backend, ``models/model_utils/load_video.py``):
``np.linspace(0, total_frames - 1, n, dtype=int)`` over the stream's frames in decode order, ``n`` at most the
stream's frame count, each frame converted to RGB. PyAV (``av``) is an optional dependency: ``pip install -e
".[video]"``; it is imported only when a video is read. A file that cannot be opened or decoded is a per-sample
failure (``read_video`` returns why), never the end of a run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_FRAMES = 8  # lmms-eval's default ``num_frm``
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")  # the order lmms-eval's videomme_doc_to_visual tries them in


@dataclass
class Video:
    """A video's sampled frames: RGB images in time order, the source frame numbers they come from, the source's
    frame rate and frame count (what a processor's ``video_metadata`` wants)."""
    frames: list[Image.Image]
    fps: float | None  # of the source; None where the stream records none
    frame_indices: list[int]
    total_frames: int

    def metadata(self) -> dict:
        """The processor's ``video_metadata`` entry (transformers' ``VideoMetadata`` keys)."""
        return {"fps": self.fps, "frames_indices": list(self.frame_indices), "total_num_frames": self.total_frames}


def require_av():
    """The ``av`` module, or an ImportError that says how to install it."""
    try:
        import av
    except ImportError as e:
        raise ImportError('video benchmarks decode with PyAV, which is not installed: pip install -e ".[video]" '
                          '(or pip install av)') from e
    return av


def find_video(folder: str | os.PathLike, video_id: str) -> Path | None:
    """``<folder>/data/<video_id>.mp4`` (else ``.MP4``, else ``.mkv``), as lmms-eval looks; None if none exists."""
    for suffix in VIDEO_SUFFIXES:
        path = Path(folder) / "data" / f"{video_id}{suffix}"
        if path.is_file():
            return path
    return None


def uniform_indices(total_frames: int, n: int) -> list[int]:
    """``n`` frame numbers spread evenly over ``total_frames`` (all of them when there are fewer), first and last
    included: lmms-eval's ``np.linspace(0, total - 1, min(total, n), dtype=int)``."""
    if total_frames < 1:
        raise ValueError(f"a video with {total_frames} frames has none to sample")
    return np.linspace(0, total_frames - 1, min(total_frames, n), dtype=int).tolist()


def read_video(path: str | os.PathLike, n_frames: int = DEFAULT_FRAMES) -> tuple[Video | None, str | None]:
    """``(Video, None)`` with ``n_frames`` frames sampled uniformly, or ``(None, why)`` when the file is unusable.

    The frame count is the stream's (``stream.frames``); a container that does not record it (some mkv / webm) is
    counted by demuxing first. A stream that ends before its recorded count is sampled again over the frames it has.
    """
    av = require_av()  # a missing PyAV is the setup's fault, not the sample's: it raises
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None  # unknown: the processors fall back to their default
            total = int(stream.frames or 0)
        if total <= 0:
            with av.open(str(path)) as container:
                total = sum(1 for packet in container.demux(video=0) if packet.size)
        indices = uniform_indices(total, n_frames)
        frames, decoded = _decode_at(av, path, indices)
        if len(frames) < len(indices) and decoded:  # fewer frames than the header said: sample what is there
            total = decoded
            indices = uniform_indices(total, n_frames)
            frames, _ = _decode_at(av, path, indices)
        if len(frames) != len(indices):
            return None, f"cannot decode video {path}: {len(frames)} of {len(indices)} sampled frames decoded"
    except Exception as e:  # any unreadable file is a per-sample failure, not a crash
        return None, f"cannot decode video {path}: {type(e).__name__}: {e}"
    return Video(frames=frames, fps=fps, frame_indices=indices, total_frames=total), None


def _decode_at(av, path, indices: list[int]) -> tuple[list[Image.Image], int]:
    """The RGB frames at ``indices`` (ascending, in decode order) and how many frames were decoded in all."""
    wanted, frames, count = set(indices), [], 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            if count - 1 in wanted:
                frames.append(frame.to_image())  # rgb24, as lmms-eval decodes
            if count - 1 >= indices[-1]:
                return frames, count
    return frames, count
