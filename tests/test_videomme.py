"""Video-MME, a video benchmark, in its hub layout (lmms-lab/Video-MME: the questions in videomme/test-*.parquet, the
videos as data/<videoID>.mp4 beside it): read, frames sampled and decoded with PyAV, prompted and scored as lmms-eval
does, and handed to the processor with their metadata. Every expected value is written out by hand."""
import pickle
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BatchFeature

from prunekit.eval.benchmarks import get_benchmark
from prunekit.eval.data import load_benchmark
from prunekit.eval.datamodule import BenchmarkDataModule
from prunekit.eval.metrics import videomme_extract, videomme_score
from prunekit.eval.prompting import chat_inputs
from prunekit.eval.records import summarise

SIDE = 32


def colour(k):
    """Frame k's solid colour: red rises and blue falls by 20 a frame, so a frame's colour names its number."""
    return (10 + 20 * k, 100, 230 - 20 * k)


def write_video(path, n_frames=12, fps=4, container=None):
    """``n_frames`` solid-colour SIDE x SIDE frames (frame k: ``colour(k)``), mpeg4 in yuv420p. Without PyAV (the
    ``video`` extra) the tests that need a video are skipped; the prompt, score and processor tests still run."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for k in range(n_frames):
            pixels = np.empty((SIDE, SIDE, 3), np.uint8)
            pixels[...] = colour(k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


OPTIONS = [["A. A red ball.", "B. A blue cube.", "C. A green cone.", "D. Nothing."],
           ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
           ["A. Yes.", "B. No.", "C. Maybe.", "D. Unknown."],
           ["A. Left.", "B. Right.", "C. Up.", "D. Down."],
           ["A. Day.", "B. Night.", "C. Dawn.", "D. Dusk."]]


def videomme_table(video_ids):
    n = len(video_ids)
    return pa.table({
        "video_id": [f"{i + 1:03d}" for i in range(n)],
        "duration": ["short", "short", "medium", "long", "short"][:n],
        "domain": ["Knowledge", "Knowledge", "Sports Competition", "Knowledge", "Life Record"][:n],
        "sub_category": ["Astronomy", "Astronomy", "Football", "Geography", "Travel"][:n],
        "url": [f"https://www.youtube.com/watch?v={v}" for v in video_ids],
        "videoID": video_ids,
        "question_id": [f"{i + 1:03d}-1" for i in range(n)],
        "task_type": ["Object Recognition", "Counting Problem", "Object Recognition", "Spatial Perception",
                      "Temporal Perception"][:n],
        "question": ["What is shown first?", "How many colours change?", "Is it moving?", "Where does it go?",
                     "When is it?"][:n],
        "options": pa.array(OPTIONS[:n], type=pa.list_(pa.string())),
        "answer": ["A", "D", "B", "C", "A"][:n],
    })


@pytest.fixture(scope="module")
def vmme_root(tmp_path_factory):
    """<root>/lmms-lab/Video-MME/: videomme/test-00000-of-00001.parquet (5 questions) and data/ with the videos: vidA
    (mp4, 12 frames at 4 fps, asked twice), vidB (.mkv, 12 frames at 6 fps: no frame count in the header), vidC
    (random bytes), vidD (no file)."""
    root = tmp_path_factory.mktemp("vmme")
    folder = root / "lmms-lab" / "Video-MME"
    (folder / "videomme").mkdir(parents=True)
    (folder / "data").mkdir()
    pq.write_table(videomme_table(["vidA", "vidA", "vidB", "vidC", "vidD"]),
                   folder / "videomme" / "test-00000-of-00001.parquet")
    write_video(folder / "data" / "vidA.mp4")
    write_video(folder / "data" / "vidB.mkv", fps=6, container="matroska")
    (folder / "data" / "vidC.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    return root


def assert_frames_are(video, numbers):
    """Each decoded frame is SIDE x SIDE RGB and its colour is frame ``numbers[i]``'s, within the codec's error
    (neighbouring frames differ by 20 in red and blue)."""
    assert len(video.frames) == len(numbers)
    for frame, k in zip(video.frames, numbers):
        assert frame.mode == "RGB" and frame.size == (SIDE, SIDE)
        mean = np.asarray(frame, dtype=float).reshape(-1, 3).mean(0)
        assert np.abs(mean - colour(k)).max() < 6, (k, mean)


def test_rows_and_fields_read_in_the_hub_layout(vmme_root):
    data = load_benchmark("videomme", vmme_root)
    assert len(data) == 5 and data.frames == 8
    s = data[0]
    assert (s.uid, s.question_id, s.question, s.answer, s.category) == (
        "0", "001-1", "What is shown first?", "A", "Object Recognition")
    assert s.extra == {"options": ["A. A red ball.", "B. A blue cube.", "C. A green cone.", "D. Nothing."],
                       "videoID": "vidA", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
                       "video_id": "001", "url": "https://www.youtube.com/watch?v=vidA"}
    assert s.image is None and s.images is None and s.error is None and s.visuals() == [] and s.usable
    assert data[2].category == "Object Recognition" and data[2].extra["duration"] == "medium"


def test_frames_are_sampled_uniformly_and_decoded_in_order(vmme_root):
    data = load_benchmark("videomme", vmme_root, frames=4)
    video = data[0].video
    # np.linspace(0, 11, 4) = 0, 3.67, 7.33, 11, truncated
    assert video.frame_indices == [0, 3, 7, 11]
    assert (video.fps, video.total_frames) == (4.0, 12)
    assert_frames_are(video, [0, 3, 7, 11])
    assert video.metadata() == {"fps": 4.0, "frames_indices": [0, 3, 7, 11], "total_num_frames": 12}
    # the default 8: np.linspace(0, 11, 8) = 0, 1.57, 3.14, 4.71, 6.29, 7.86, 9.43, 11
    assert load_benchmark("videomme", vmme_root)[1].video.frame_indices == [0, 1, 3, 4, 6, 7, 9, 11]
    # more frames asked than the video has: every frame, once
    every = load_benchmark("videomme", vmme_root, frames=20)[0].video
    assert every.frame_indices == list(range(12))
    assert_frames_are(every, list(range(12)))


def test_an_mkv_without_a_frame_count_is_found_and_counted(vmme_root):
    video = load_benchmark("videomme", vmme_root, frames=3)[2].video
    assert (video.fps, video.total_frames, video.frame_indices) == (6.0, 12, [0, 5, 11])  # linspace: 0, 5.5, 11
    assert_frames_are(video, [0, 5, 11])


def test_corrupt_and_missing_videos_are_flagged(vmme_root):
    data = load_benchmark("videomme", vmme_root)
    corrupt, missing = data[3], data[4]
    assert corrupt.video is None and not corrupt.usable and corrupt.error.startswith("cannot decode video")
    assert "vidC.mp4" in corrupt.error
    assert missing.video is None and not missing.usable and missing.error.startswith("missing video")
    assert "vidD.mp4" in missing.error
    restored = pickle.loads(pickle.dumps(data))  # DataLoader workers get a copy
    assert restored[0].video.frame_indices == [0, 1, 3, 4, 6, 7, 9, 11] and restored[3].error == corrupt.error


def test_the_evaluator_skips_and_counts_them(vmme_root, monkeypatch):
    """test_step records a sample without a usable video as skipped, with the columns Video-MME aggregates by, and
    never calls the model for it; summarise counts it."""
    from prunekit.eval.module import PruningEvalModule
    from prunekit.loading import resolve_model_path

    data = load_benchmark("videomme", vmme_root, frames=4)
    module = PruningEvalModule(resolve_model_path("tiny"), {"name": "fastv", "budget": 8, "layer": 2},
                               "videomme")
    module.records = []
    module.test_step([data[3], data[4]], 0)
    assert [(r["uid"], r["skipped"], r["duration"], r["domain"]) for r in module.records] == [
        ("3", True, "long", "Knowledge"), ("4", True, "short", "Life Record")]
    assert module.records[0]["error"].startswith("cannot decode video")
    assert module.records[1]["error"].startswith("missing video")
    summary = summarise(module.records, get_benchmark("videomme"))
    assert summary["counts"] == {"samples": 2, "scored": 0, "skipped": 2} and summary["metrics"] == {}
    assert [(s["uid"], s["question_id"]) for s in summary["skipped"]] == [("3", "004-1"), ("4", "005-1")]

    stub = StubProcessor()  # the module hands the video, not images, to the processor
    monkeypatch.setattr(module, "processor", stub)
    module._inputs([data[0]], ["Q?"])
    assert stub.calls[0]["videos"][0] == data[0].video.frames and "images" not in stub.calls[0]


def test_the_datamodule_passes_frames(vmme_root):
    data = BenchmarkDataModule("videomme", root=str(vmme_root), frames=4)
    data.setup("test")
    assert data.dataset[0].video.frame_indices == [0, 3, 7, 11]


def test_layouts_and_bad_settings(tmp_path, vmme_root):
    flat = tmp_path / "flat"  # the parquet in data/, beside the videos
    (flat / "data").mkdir(parents=True)
    pq.write_table(videomme_table(["vidA"]), flat / "data" / "test-00000-of-00001.parquet")
    write_video(flat / "data" / "vidA.mp4", n_frames=5)
    assert load_benchmark("videomme", flat, frames=2)[0].video.frame_indices == [0, 4]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="videomme/test-.*hf download lmms-lab/Video-MME"):
        load_benchmark("videomme", tmp_path / "empty")
    with pytest.raises(ValueError, match="data.frames must be a positive"):
        load_benchmark("videomme", vmme_root, frames=0)
    with pytest.raises(ValueError, match="data.frames applies to the video benchmarks"):
        load_benchmark("pope", vmme_root, frames=8)


def test_a_missing_pyav_says_how_to_install_it(vmme_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[video\]"'):
        load_benchmark("videomme", vmme_root)


def test_prompt_follows_lmms_eval():
    """videomme_doc_to_text with videomme.yaml's default post_prompt, which starts with its own newline."""
    bench = get_benchmark("videomme")
    assert bench.max_new_tokens == 16 and bench.stop == ("\n\n",)
    assert bench.prompt("What is shown first?", {"options": ["A. A red ball.", "B. A blue cube."]}) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "What is shown first?\n"
        "A. A red ball.\n"
        "B. A blue cube.\n"
        "\n"
        "Answer with the option's letter from the given choices directly.")


def test_extract_and_score_follow_lmms_eval():
    """lmms-eval 0.7.3's extract_mcq_answer, worked by hand: the most confident format wins (a leading standalone letter
    10, a trailing one 9, after an answer phrase 7, (C) 6, C. 5, ..., "C " 2), within it the last place."""
    cases = {
        "The best answer is B": "B",               # phrase and end
        "B.": "B",                                 # stripped to "B": start
        "b": "",                                   # lower case is no letter
        "(C) A green cone.": "C",                  # parentheses (6) over "A " (space, 2)
        "The answer is D. Nothing.": "D",          # the phrase's letter
        "Best answer: C": "C",                     # "B" of "Best" is no standalone letter; C ends it
        "A is wrong; the answer is C": "A",        # a leading standalone letter outranks the phrase
        "Answer: B": "B",
        "I think the ball is red and it rolls to the left side": "",   # no capital A-D anywhere
        "": "",
    }
    assert {p: videomme_extract(p) for p in cases} == cases
    assert [videomme_score(p, "B") for p in ("The best answer is B", "B.", "b", "Best answer: C", "C",
                                             "it is the one on the left of the red ball in the end")] == \
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert videomme_score("a", "A") == 0.0 and videomme_score("A", "a") == 1.0  # the answer's case is ignored


def test_aggregate_overall_per_task_duration_and_domain():
    records = [
        {"score": 1.0, "category": "Counting Problem", "duration": "short", "domain": "Knowledge"},
        {"score": 0.0, "category": "Counting Problem", "duration": "short", "domain": "Knowledge"},
        {"score": 1.0, "category": "OCR Problems", "duration": "long", "domain": "Knowledge"},
        {"score": 1.0, "category": "OCR Problems", "duration": "medium", "domain": "Life Record"},
        {"score": 0.0, "category": "OCR Problems", "duration": "long", "domain": "Life Record"},
    ]
    assert get_benchmark("videomme").aggregate(records) == {
        "accuracy": 0.6,
        "accuracy_Counting Problem": 0.5, "accuracy_OCR Problems": 2 / 3,
        "accuracy_duration_long": 0.5, "accuracy_duration_medium": 1.0, "accuracy_duration_short": 0.5,
        "accuracy_domain_Knowledge": 2 / 3, "accuracy_domain_Life Record": 0.5,
    }


class StubProcessor:
    """Records each call; renders a turn as USER: <video|image|text...> ASSISTANT:."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, conversation, add_generation_prompt):
        [turn] = conversation
        body = "".join(f"<{c['type']}>" if c["type"] != "text" else c["text"] for c in turn["content"])
        return f"USER: {body}" + (" ASSISTANT:" if add_generation_prompt else "")

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        n = len(kwargs["text"])
        out = {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long)}
        if "videos" in kwargs:
            out["pixel_values_videos"] = torch.zeros(n, 6)
        if kwargs.get("images"):
            out["pixel_values"] = torch.zeros(n, 6)
        return BatchFeature(out)


def test_chat_inputs_hands_the_processor_frames_and_metadata(vmme_root):
    data = load_benchmark("videomme", vmme_root, frames=4)
    first, mkv = data[0], data[2]
    stub = StubProcessor()
    inputs = chat_inputs(stub, [[], []], ["Q1?", "Q2?"], "cpu", torch.bfloat16, videos=[first.video, mkv.video])
    [call] = stub.calls
    assert set(call) == {"text", "videos", "video_metadata", "do_sample_frames", "return_tensors", "padding"}
    assert call["do_sample_frames"] is False  # the stock video processors would sample the sampled frames again
    assert call["text"] == ["USER: <video>Q1? ASSISTANT:", "USER: <video>Q2? ASSISTANT:"]
    assert call["videos"] == [first.video.frames, mkv.video.frames] and len(call["videos"][1]) == 4
    assert all(a is b for a, b in zip(call["videos"][0], first.video.frames))
    assert call["video_metadata"] == [{"fps": 4.0, "frames_indices": [0, 3, 7, 11], "total_num_frames": 12},
                                      {"fps": 6.0, "frames_indices": [0, 3, 7, 11], "total_num_frames": 12}]
    assert (call["return_tensors"], call["padding"]) == ("pt", True)
    assert inputs["pixel_values_videos"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long

    # image rows as before: the images, no video keyword; a batch mixing video and no video is refused
    image = first.video.frames[0]
    chat_inputs(stub, [[image]], ["Look."], "cpu", torch.float32)
    assert set(stub.calls[1]) == {"images", "text", "return_tensors", "padding"}
    assert stub.calls[1]["text"] == ["USER: <image>Look. ASSISTANT:"]
    chat_inputs(stub, [[image]], ["Look."], "cpu", torch.float32, videos=[None])
    assert "videos" not in stub.calls[2]
    with pytest.raises(ValueError, match="one video per row"):
        chat_inputs(stub, [[], []], ["a", "b"], "cpu", torch.float32, videos=[first.video, None])
