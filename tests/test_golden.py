"""Golden benchmark results: tiny hand-made parquet files in each lmms-eval layout, fixed predictions, and the
metric values worked out by hand, through the same loader, prompt, score and aggregate the runner uses."""
import pyarrow as pa
import pytest

from helpers import png, write
from prunekit.eval.benchmarks import get_benchmark
from prunekit.eval.data import load_benchmark

POST = "\nAnswer the question using a single word or phrase."


def score(name, root, predictions):
    """Records as the evaluation module builds them, with the given prediction per row."""
    bench, data = get_benchmark(name), load_benchmark(name, root)
    records = []
    for i in range(len(data)):
        s = data[i]
        pred = predictions[i]
        records.append({"question_id": s.question_id, "category": s.category, "answer": s.answer,
                        "prediction": pred, "score": bench.score(pred, s.answer), "prompt": bench.prompt(s.question),
                        "image_size": s.image.size})
    return records, bench.aggregate(records)


def test_pope(tmp_path):
    write(tmp_path / "lmms-lab/POPE/data/test-00000-of-00001.parquet", {
        "id": [str(i) for i in range(6)], "question_id": [f"q{i}" for i in range(6)],
        "question": [" Is there a dog in the image? "] * 6, "answer": ["yes", "yes", "yes", "no", "no", "yes"],
        "image_source": ["x"] * 6, "image": [png((8, 8))] * 6, "category": ["random"] * 6})
    records, m = score("pope", tmp_path, ["Yes", "no", "yes.", "yes", " No", "YES"])
    # scores 1,0,0,0,1,1 -> accuracy 3/6; TP rows 0,5; FP row 3; FN row 1 ("yes." is neither yes nor no)
    assert m == pytest.approx({"accuracy": 0.5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 4 / 6})
    assert records[0]["prompt"] == "Is there a dog in the image?" + POST


def test_mme(tmp_path):
    q = "Is there a cat in the image? Please answer yes or no."
    write(tmp_path / "MME/data/test-00000-of-00001.parquet", {
        "question_id": ["a.jpg", "a.jpg", "b.jpg", "b.jpg", "c.png", "c.png"],
        "category": ["existence"] * 4 + ["code_reasoning"] * 2, "question": [q] * 6,
        "answer": ["Yes", "No", "Yes", "No", "No", "Yes"], "image": [png((8, 8))] * 6})
    records, m = score("mme", tmp_path, ["Yes", "No, there is not.", "yes", "yes", "n", "Nope"])
    # existence: a.jpg both right (acc 100 + acc+ 100), b.jpg one right (50 + 0) -> (200 + 50) / 2 = 125
    # code_reasoning: "n" -> no (right), "Nope" -> "no" in its first 4 characters (wrong) -> 50 + 0 = 50
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 50.0, 175.0)
    assert m["categories"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4,
                                            "images": 2}
    assert m["incomplete_images"] == [] and records[0]["prompt"] == "Is there a cat in the image?" + POST


def test_gqa(tmp_path):
    root = tmp_path / "lmms-lab-encoder/GQA"
    write(root / "testdev_balanced_instructions/testdev-00000-of-00001.parquet", {
        "id": ["201", "202", "203"], "imageId": ["n1", "n1", "n2"], "isBalanced": [True] * 3,
        "question": ["Is it sunny?", "Which side is the cup on?", "What is he wearing? "],
        "answer": ["yes", "left", "T-shirt"]})
    write(root / "testdev_balanced_images/testdev-00000-of-00001.parquet", {
        "id": ["n2", "n1"], "image": [png((20, 10)), png((10, 20))]})
    records, m = score("gqa", tmp_path, ["Yes", "left ", "tshirt"])
    # "Yes" -> yes (1); "left " keeps its space (0); "T-shirt" loses its hyphen -> "tshirt" (1)
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0] and m == {"accuracy": pytest.approx(2 / 3)}
    assert [r["image_size"] for r in records] == [(10, 20), (10, 20), (20, 10)]  # joined on imageId
    assert records[2]["prompt"] == "What is he wearing? " + POST  # lmms-eval does not strip GQA questions


def test_textvqa(tmp_path):
    write(tmp_path / "textvqa/data/validation-00000-of-00001.parquet", {
        "image_id": ["i1", "i2"], "question_id": pa.array([7, 8], pa.int32()),
        "question": ["what brand is this?", "HOW MANY cups?"],
        "answers": [["nokia", "Nokia.", "nokia"] + ["samsung"] * 7, ["two", "2"] + ["three"] * 8],
        "image": [png((8, 8))] * 2, "ocr_tokens": [["NOKIA"], []]})
    records, m = score("textvqa", tmp_path, ["Nokia", "2"])
    # q1: 3 answers normalise to "nokia": leaving one of them out leaves 2 matches (2/3), the 7 others 3 (1)
    #     -> (3 * 2/3 + 7) / 10 = 0.9; q2: "two" -> "2", 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert [r["score"] for r in records] == pytest.approx([0.9, 0.6]) and m["accuracy"] == pytest.approx(0.75)
    assert records[1]["prompt"] == "How many cups?" + POST and records[0]["question_id"] == "7"
