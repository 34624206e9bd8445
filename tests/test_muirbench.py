"""MUIRBench, a multi-image benchmark, in its hub layout (MUIRBENCH/MUIRBENCH: a list of images per question, lettered
options): read, prompted with each image at its ``<image>`` mark, scored as lmms-eval scores it, and run end to end on
the tiny twins, one of them LLaVA-OneVision in its multi-image mode."""
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import IMAGE_TYPE, png
from prunekit.eval.benchmarks import get_benchmark
from prunekit.eval.data import load_benchmark
from prunekit.eval.datamodule import BenchmarkDataModule
from prunekit.eval.metrics import muirbench_score
from prunekit.eval.module import PruningEvalModule
from prunekit.eval.prompting import chat_text
from prunekit.loading import resolve_model_path


def cells(*images):
    return [{"bytes": b, "path": None} for b in images]


@pytest.fixture(scope="module")
def muir_root(tmp_path_factory):
    """Four questions in MUIRBench's columns under <root>/MUIRBENCH/MUIRBENCH/data/; the third has an undecodable
    second image."""
    root = tmp_path_factory.mktemp("muir")
    table = pa.table({
        "idx": ["0", "1", "2", "3"],
        "task": ["Counting", "Image-Text Matching", "Counting", "Ordering"],
        "image_relation": ["Similar", "Narrative", "Similar", "Temporal"],
        "image_type": ["Photo"] * 4,
        "question": ["How many boxes are in <image> and <image> together?", "Which image shows red? <image> <image> <image>",
                     "Count the boxes: <image> <image>", "Order the frames <image> <image>."],
        "options": [["1", "2", "3"], ["the first", "the second", "the third", "none"], ["0", "4"], ["AB", "BA"]],
        "answer": ["B", "A", "A", "B"],
        "image_list": pa.array([cells(png((112, 112)), png((224, 112), colour=(0, 0, 200))),
                                cells(png((112, 112), colour=(200, 0, 0)), png((112, 112)), png((112, 224))),
                                cells(png((112, 112)), b"not a png"),
                                cells(png((112, 112)), png((112, 112), colour=(0, 200, 0)))],
                               type=pa.list_(IMAGE_TYPE)),
        "counterpart_idx": ["-1"] * 4,
    })
    path = root / "MUIRBENCH" / "MUIRBENCH" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, row_group_size=2)
    return root


def test_rows_hold_every_image_and_flag_a_corrupt_one(muir_root):
    data = load_benchmark("muirbench", muir_root)
    assert len(data) == 4
    first, second, broken = data[0], data[1], data[2]
    assert [im.size for im in first.images] == [(112, 112), (224, 112)] and first.image is first.images[0]
    assert len(second.images) == 3 and second.category == "Image-Text Matching" and second.answer == "A"
    assert second.extra["options"] == ["the first", "the second", "the third", "none"]
    assert second.extra["image_relation"] == "Narrative"
    assert broken.image is None and broken.images is None and broken.error.startswith("image 1: cannot decode")


def test_prompt_and_score_follow_lmms_eval():
    """muir_doc_to_text: question, lettered options, the post-prompt; the MultiChoiceRegexFilter keeps the letter of
    an answer opening with "X." and the response otherwise; equality ignores case and surrounding space."""
    bench = get_benchmark("muirbench")
    assert bench.prompt("Which? <image> <image>", {"options": ["red", "blue"]}) == (
        "Which? <image> <image>\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly.")
    assert [muirbench_score(p, "B") for p in ("B", " b ", "B. the second", "The answer is B", "C.", "BA")] == \
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    records = [{"score": 1.0, "category": "Counting"}, {"score": 0.0, "category": "Counting"},
               {"score": 1.0, "category": "Ordering"}]
    assert bench.aggregate(records) == {"accuracy": 2 / 3, "accuracy_Counting": 0.5, "accuracy_Ordering": 1.0}


def test_images_go_where_the_prompt_marks_them():
    from prunekit.tiny import build_tiny_qwen2_vl

    _, processor = build_tiny_qwen2_vl()
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert chat_text(processor, 2, "Look at <image> and <image>. Same?") == (
        f"<|im_start|>user\nLook at {block} and {block}. Same?<|im_end|>\n<|im_start|>assistant\n")
    # no marks: the images first, the prompt as written; marks that do not match the images: dropped (a processor
    # would read them as placeholders)
    assert chat_text(processor, 1, "no mark") == f"<|im_start|>user\n{block}no mark<|im_end|>\n<|im_start|>assistant\n"
    assert chat_text(processor, 1, "<image> and <image>?") == f"<|im_start|>user\n{block}and ?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("checkpoint,strategy", [("tiny-qwen3-vl", {"name": "fastv", "budget": 8, "layer": 2}),
                                            ("tiny-onevision", {"name": "random", "budget": 20, "stage": "vision_layer",
                                                                "layer": 1})])
def test_end_to_end_scores_the_readable_questions_and_counts_the_broken_one(muir_root, checkpoint, strategy):
    data = BenchmarkDataModule("muirbench", root=str(muir_root), batch_size=2)
    module = PruningEvalModule(resolve_model_path(checkpoint), strategy, "muirbench", fidelity=True, max_new_tokens=3)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).test(module, datamodule=data, verbose=False)
    res = module.results
    assert res["counts"] == {"samples": 4, "scored": 3, "skipped": 1}
    assert set(res["metrics"]) == {"accuracy", "accuracy_Counting", "accuracy_Image-Text Matching", "accuracy_Ordering"}
    assert 0 < res["tokens"]["n_final"] < res["tokens"]["n_vanilla"]
    if checkpoint == "tiny-onevision":  # multi-image mode: one crop (64 tokens) + one newline per image
        assert [r["n_vanilla"] for r in module.records if not r.get("skipped")] == [130, 195, 130]
