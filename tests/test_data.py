"""Local-parquet benchmark readers, on tiny hand-made files in the lmms-eval layouts."""
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import png, write
from prunekit.eval.data import (BENCHMARKS, BenchmarkData, Sample, collate_samples, load_benchmark,
                                synthetic_pope_dir, write_synthetic_pope)

def pope_columns(n, start=0, category="random"):
    ids = [str(start + i) for i in range(n)]
    return {"id": ids, "question_id": [f"q{i}" for i in ids], "question": [f"Is there a cat {i}?" for i in ids],
            "answer": ["yes" if int(i) % 2 == 0 else "no" for i in ids],
            "image_source": [f"COCO_{i}" for i in ids],
            "image": [png((20 + int(i), 10), mode="L") for i in ids], "category": [category] * n}


def make_pope(dataset_dir):
    write(dataset_dir / "data/test-00000-of-00002.parquet", pope_columns(2))
    write(dataset_dir / "data/test-00001-of-00002.parquet", pope_columns(3, start=2))
    return dataset_dir


@pytest.mark.parametrize("sub", ["", "lmms-lab/POPE", "lmms-lab-encoder/POPE", "lmms-lab-encoder/pope", "POPE"])
def test_pope_layouts_and_rows(tmp_path, sub):
    make_pope(tmp_path / sub if sub else tmp_path)
    ds = load_benchmark("pope", tmp_path)
    assert isinstance(ds, BenchmarkData) and ds.name == "pope" and len(ds) == 5
    samples = [ds[i] for i in range(5)]
    assert [s.uid for s in samples] == ["0", "1", "2", "3", "4"]  # global index across sorted files
    assert [s.question_id for s in samples] == ["q0", "q1", "q2", "q3", "q4"]
    s = samples[3]
    assert (s.question, s.answer, s.category, s.error) == ("Is there a cat 3?", "no", "random", None)
    assert s.extra == {"id": "3", "image_source": "COCO_3"}
    for i, s in enumerate(samples):  # grey PNGs decoded and converted, each from its own row
        assert s.image.mode == "RGB" and s.image.size == (20 + i, 10)
    assert ds[-1].uid == "4"


def test_pope_full_split_limit_and_bad_split(tmp_path):
    make_pope(tmp_path)
    write(tmp_path / "Full/adversarial/adversarial-00000-of-00001.parquet", pope_columns(4, 100, "adversarial"))
    adv = load_benchmark("pope", tmp_path, split="adversarial")
    assert len(adv) == 4 and adv[0].question_id == "q100" and adv[0].category == "adversarial"
    limited = load_benchmark("pope", tmp_path, limit=3)  # crosses the file boundary
    assert [limited[i].question_id for i in range(len(limited))] == ["q0", "q1", "q2"]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"data.limit must be a positive number of rows.*got {bad}"):
            load_benchmark("pope", tmp_path, limit=bad)
    with pytest.raises(ValueError, match="adversarial"):
        load_benchmark("pope", tmp_path, split="nonsense")
    with pytest.raises(FileNotFoundError, match="Full/popular"):
        load_benchmark("pope", tmp_path, split="popular")


def test_mme_rows(tmp_path):
    write(tmp_path / "lmms-lab/MME/data/test-00000-of-00001.parquet", {
        "question_id": ["code/01.png", "code/01.png", "ocr/7.jpg"],
        "image": [png((8, 8)), png((8, 8)), png((9, 5), mode="RGBA")],
        "question": ["Is it A? Please answer yes or no.", "Is it B? Please answer yes or no.", "Is it C?"],
        "answer": ["Yes", "No", "Yes"], "category": ["code_reasoning", "code_reasoning", "OCR"]})
    ds = load_benchmark("mme", tmp_path)
    assert [s.question_id for s in ds] == ["code/01.png", "code/01.png", "ocr/7.jpg"]
    assert len({s.uid for s in ds}) == 3  # uid is unique where MME's question_id is shared
    s = ds[2]
    assert (s.answer, s.category, s.image.mode, s.image.size) == ("Yes", "OCR", "RGB", (9, 5))


def test_gqa_join_by_image_id(tmp_path):
    root = tmp_path / "lmms-lab" / "GQA"
    write(root / "testdev_balanced_instructions/testdev-00000-of-00001.parquet", {
        "id": ["201", "202", "203", "204"], "imageId": ["n3", "n1", "n3", "n_missing"],
        "question": ["Q a", "Q b", "Q c", "Q d"], "answer": ["left", "no", "red", "yes"],
        "fullAnswer": ["It is left.", "No.", "Red.", "Yes."], "isBalanced": [True] * 4})
    write(root / "testdev_balanced_images/testdev-00000-of-00001.parquet",
          {"id": ["n1", "n2", "n3"], "image": [png((11, 4)), png((12, 4)), png((13, 4))]})
    ds = load_benchmark("gqa", tmp_path)
    assert [s.question_id for s in ds] == ["201", "202", "203", "204"]
    s0, s1, s2, s3 = (ds[i] for i in range(4))
    assert s0.image.size == s2.image.size == (13, 4) and s1.image.size == (11, 4)  # n3 shared by two questions
    assert (s0.answer, s0.extra) == ("left", {"image_id": "n3", "full_answer": "It is left."})
    assert s3.image is None and "n_missing" in s3.error


def test_textvqa_rows(tmp_path):
    answers = [[f"a{j}" for j in range(10)], ["stop"] * 10]
    write(tmp_path / "textvqa/data/validation-00000-of-00001.parquet", {
        "image_id": ["img0", "img1"], "question_id": pa.array([34602, 34603], pa.int32()),
        "question": ["what is written?", "what sign?"], "answers": answers,
        "image": [png((6, 7)), png((7, 6))], "ocr_tokens": [["hello"], []], "set_name": ["val", "val"]})
    ds = load_benchmark("textvqa", tmp_path)
    s = ds[0]
    assert (s.question_id, s.question, s.answer) == ("34602", "what is written?", answers[0])
    assert s.extra == {"image_id": "img0", "ocr_tokens": ["hello"]} and s.category is None
    assert ds[1].image.size == (7, 6)


def test_missing_root_and_files_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_benchmark("pope", tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "data/test-*.parquet" in msg and "lmms-lab-encoder/POPE" in msg
    with pytest.raises(FileNotFoundError, match="data/validation-"):
        load_benchmark("textvqa", tmp_path)  # exists but empty
    write(tmp_path / "GQA/testdev_balanced_instructions/testdev-0.parquet",
          {"id": ["1"], "imageId": ["n1"], "question": ["q"], "answer": ["a"]})
    with pytest.raises(FileNotFoundError, match="testdev_balanced_images"):
        load_benchmark("gqa", tmp_path)
    with pytest.raises(ValueError, match="pope.*textvqa"):
        load_benchmark("vqav2", tmp_path)
    assert BENCHMARKS == ("pope", "mme", "gqa", "textvqa", "pocket", "muirbench", "videomme")
    with pytest.raises(FileNotFoundError, match="hf download MUIRBENCH/MUIRBENCH"):
        load_benchmark("muirbench", tmp_path)
    with pytest.raises(FileNotFoundError, match="leave data.root unset"):
        load_benchmark("pocket", tmp_path)  # the generated split is not downloaded


def test_missing_column_names_file_and_columns(tmp_path):
    cols = pope_columns(2)
    del cols["answer"]
    path = write(tmp_path / "data/test-00000-of-00001.parquet", cols)
    with pytest.raises(ValueError) as e:
        load_benchmark("pope", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "'answer'" in msg and "question_id" in msg  # missing and found columns


def test_a_corrupt_parquet_file_is_named_in_the_error(tmp_path):
    make_pope(tmp_path)
    broken = sorted(tmp_path.rglob("*.parquet"))[-1]
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=f"{broken}: not a readable parquet file"):
        load_benchmark("pope", tmp_path)


def test_corrupt_images_are_flagged_not_raised(tmp_path):
    cols = pope_columns(5)
    cols["image"][1] = b"\x89PNG not really"
    cols["image"][2] = None  # null struct
    cols["image"][3] = {"bytes": None, "path": None}
    write(tmp_path / "data/test-00000-of-00001.parquet", cols)
    ds = load_benchmark("pope", tmp_path)
    ok, bad, null, empty, ok2 = (ds[i] for i in range(5))
    assert ok.image.size == (20, 10) and ok2.image.size == (24, 10) and ok.error is None
    assert bad.image is None and bad.error.startswith("cannot decode image")
    assert null.image is None and empty.image is None and "missing image" in null.error + empty.error


def test_synthetic_pope_round_trip_true_and_deterministic(tmp_path):
    root = write_synthetic_pope(tmp_path / "a", n_images=12)
    write_synthetic_pope(tmp_path / "b", n_images=12)
    file = "data/test-00000-of-00001.parquet"
    assert pq.read_table(root / file).equals(pq.read_table(tmp_path / "b" / file))
    assert pq.read_schema(root / file).names == [
        "id", "question_id", "question", "answer", "image_source", "image", "category"]
    ds = load_benchmark("pope", root)
    samples = list(ds)
    assert len(samples) == 24 and len({s.question_id for s in samples}) == 24
    for cat in ("adversarial", "popular", "random"):  # balanced yes/no in each category
        answers = [s.answer for s in samples if s.category == cat]
        assert answers.count("yes") == answers.count("no") == 4
    for s in samples:  # the answer is true for the picture
        colour, shape = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", s.question).groups()
        assert s.image.size == (112, 112) and s.error is None
        assert ((colour, shape) in objects_in(s.image)) == (s.answer == "yes"), s


def objects_in(img):
    """(colour, shape) drawn in each quadrant: colour by thresholds, shape by how much of its box it fills."""
    a = np.asarray(img).astype(int)
    r, g, b = a[..., 0] > 150, a[..., 1] > 150, a[..., 2] > 150
    masks = {"red": r & ~g & ~b, "green": g & ~r & ~b, "blue": b & ~r & ~g, "yellow": r & g & ~b}
    h = a.shape[0] // 2
    found = set()
    for colour, mask in masks.items():
        for qy in (0, 1):
            for qx in (0, 1):
                ys, xs = np.nonzero(mask[qy * h:(qy + 1) * h, qx * h:(qx + 1) * h])
                if len(ys) > 20:
                    fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
                    found.add((colour, "square" if fill > 0.9 else "circle"))
    return found


def test_synthetic_pope_dir_is_cached(tmp_path):
    path = synthetic_pope_dir(tmp_path)
    assert path.name.startswith("synthetic-pope-") and synthetic_pope_dir(tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folders left
    assert len(load_benchmark("pope", path)) == 32


def test_dataloader_workers_and_pickling(tmp_path):
    make_pope(tmp_path)
    ds = load_benchmark("pope", tmp_path)
    ds[4]  # opens a parquet handle in this process; workers and pickles must not depend on it
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[1].image.size == (21, 10)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples)
    got = [s for batch in loader for s in batch]
    assert all(isinstance(s, Sample) for s in got)
    assert [s.uid for s in got] == [str(i) for i in range(5)]
    assert [s.image.size for s in got] == [ds[i].image.size for i in range(5)]
