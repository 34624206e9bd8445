"""The Lightning evaluation module on the tiny model: records, fidelity, accounting, skipped samples."""
import lightning as L
import pytest
import torch

from helpers import png, write
from prunekit.eval.data import write_synthetic_pope
from prunekit.eval.datamodule import BenchmarkDataModule
from prunekit.loading import resolve_model_path
from prunekit.eval.module import PruningEvalModule


def evaluate(tiny_dir, root, strategy, benchmark="pope", batch_size=1, fidelity=True):
    data = BenchmarkDataModule(benchmark, root=str(root), batch_size=batch_size)
    module = PruningEvalModule(str(tiny_dir), strategy, benchmark, fidelity=fidelity, max_new_tokens=3)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).test(module, datamodule=data, verbose=False)
    return module


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    return write_synthetic_pope(tmp_path_factory.mktemp("pope"), n_images=3)  # 6 questions


def test_keep_all_is_faithful_to_the_unpruned_model(tiny_dir, pope_root):
    module = evaluate(tiny_dir, pope_root, {"name": "keep_all"})
    res = module.results
    assert res["counts"] == {"samples": 6, "scored": 6, "skipped": 0}
    assert res["fidelity"]["answer_agreement"] == 1.0
    assert res["fidelity"]["first_token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["tokens"] == {"n_vanilla": 64.0, "n_in": 64.0, "n_final": 64.0, "n_avg": 64.0, "n_avg_out": 64.0}
    assert res["efficiency"]["flops_ratio"] == 1.0 and res["efficiency"]["flops_ratio_fastv"] == 1.0


def test_records_carry_scores_tokens_and_timing(tiny_dir, pope_root):
    module = evaluate(tiny_dir, pope_root, {"name": "random", "budget": 16}, batch_size=4)  # batches of 4 and 2
    records, res = module.records, module.results
    assert [r["uid"] for r in records] == [str(i) for i in range(6)]
    for r in records:  # lmms-eval's POPE rule, written out: the stripped, lower-cased answer is exactly the label
        assert r["score"] == (1.0 if r["prediction"].strip().lower() == r["answer"] else 0.0)
        assert (r["n_vanilla"], r["n_in"], r["n_final"], r["n_avg"]) == (64, 16, 16, 16.0)
        assert r["prefill_ms"] > r["vision_ms"] > 0 and r["tflops"] < r["tflops_vanilla"]
        assert r["prompt"] == r["question"].strip() + "\nAnswer the question using a single word or phrase."
    preds = [r["prediction"].strip().lower() for r in records]
    gts = [r["answer"] for r in records]
    tp = sum(p == g == "yes" for p, g in zip(preds, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))  # lmms-eval: only "no" is a false negative
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    assert res["metrics"] == pytest.approx({
        "accuracy": sum(p == g for p, g in zip(preds, gts)) / len(gts), "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0, "yes_ratio": 0.5})
    assert res["metrics"]["yes_ratio"] == 0.5  # ground-truth ratio: one yes and one no question per picture
    eff = res["efficiency"]
    assert eff["timed_batches"] == 1 and not eff["latency_includes_warmup"]  # the first batch is the warm-up
    assert eff["prefill_ms_median"] == records[4]["prefill_ms"]
    assert eff["tflops"] == pytest.approx(sum(r["tflops"] for r in records) / 6)
    assert 0 < eff["flops_ratio"] < 1 and eff["peak_memory_mb"] > 0


def test_mask_only_pruning_saves_no_flops(tiny_dir, pope_root):
    """FastV's mask variant hides tokens from attention but still computes them: FLOPs stay at vanilla."""
    mask = evaluate(tiny_dir, pope_root, {"name": "fastv", "budget": 16, "variant": "mask"}, fidelity=False).results
    inplace = evaluate(tiny_dir, pope_root, {"name": "fastv", "budget": 16}, fidelity=False).results
    assert mask["tokens"]["n_final"] == inplace["tokens"]["n_final"] == 16
    assert mask["efficiency"]["flops_ratio"] == 1.0 > inplace["efficiency"]["flops_ratio"]


def test_corrupt_image_is_skipped_counted_and_reported(tiny_dir, tmp_path):
    write(tmp_path / "data/test-00000-of-00001.parquet", {
        "question_id": ["a", "b", "c"], "question": ["Is there a cat?"] * 3, "answer": ["yes", "no", "yes"],
        "image": [png((112, 112)), b"not a png", png((112, 112), colour=(200, 0, 0))]})
    res = evaluate(tiny_dir, tmp_path, {"name": "random", "budget": 16}).results
    assert res["counts"] == {"samples": 3, "scored": 2, "skipped": 1}
    assert [s["question_id"] for s in res["skipped"]] == ["b"] and "decode" in res["skipped"][0]["error"]
    assert res["metrics"]["yes_ratio"] == 1.0  # computed over the two scored rows only


def test_mme_image_with_a_skipped_half_is_reported_not_scored_as_a_pair(tiny_dir, tmp_path):
    write(tmp_path / "data/test-00000-of-00001.parquet", {
        "question_id": ["x.png", "x.png", "y.png", "y.png"], "category": ["existence"] * 4,
        "question": ["Is there a dog? Please answer yes or no."] * 4, "answer": ["Yes", "No", "Yes", "No"],
        "image": [png((112, 112))] * 3 + [b"\x00corrupt"]})
    module = evaluate(tiny_dir, tmp_path, {"name": "keep_all"}, benchmark="mme", fidelity=False)
    res = module.results
    assert res["counts"]["skipped"] == 1 and res["metrics"]["incomplete_images"] == ["y.png"]
    existence = res["metrics"]["categories"]["existence"]
    assert existence["questions"] == 3  # y.png's scored half counts in acc; only x.png can count in acc_plus
    x_pair = [r["score"] for r in module.records if r["question_id"] == "x.png"]
    assert existence["acc_plus"] == 100.0 * (sum(x_pair) == 2)
    assert module.records[0]["prompt"] == "Is there a dog?\nAnswer the question using a single word or phrase."
    logged = module.trainer.callback_metrics  # what the loggers (W&B, CSV) receive: nested metrics flattened
    assert float(logged["metrics/categories/existence/score"]) == pytest.approx(existence["score"])
    assert float(logged["counts/skipped"]) == 1.0


def test_missing_root_and_model_paths_fail_at_once(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="data.root is not set"):
        BenchmarkDataModule("gqa")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the local hub cache"):
        resolve_model_path("llava-hf/llava-1.5-7b-hf")


def test_embedded_models_have_64_and_576_visual_tokens(tmp_path, monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    for name, tokens in (("tiny", 64), ("tiny-576", 576)):
        vision = AutoConfig.from_pretrained(resolve_model_path(name)).vision_config
        assert (vision.image_size // vision.patch_size) ** 2 == tokens


def test_generated_lengths_stop_at_the_first_end_of_sequence_token():
    from types import SimpleNamespace

    from prunekit import compat

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7]))
    rows = torch.tensor([[5, 2, 0, 0], [5, 6, 8, 9], [7, 7, 0, 0], [4, 9, 3, 7]])
    assert compat.generated_lengths(model, rows) == [2, 4, 1, 4]


def test_teacher_forcing_refuses_an_end_of_sequence_token(tiny_dir):
    from prunekit import compat
    from prunekit.errors import UnsupportedInputError
    from prunekit.loading import load_model
    from prunekit.tiny import synthetic_image

    model, processor = load_model(str(tiny_dir))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": "hi"}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[synthetic_image(0)], text=[text], return_tensors="pt")
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    with pytest.raises(UnsupportedInputError, match="end-of-sequence"):
        compat.continuation_logits(model, inputs, torch.tensor([[5, eos]]))
    logits = compat.continuation_logits(model, inputs, torch.tensor([[5, 6, 8]]))
    with torch.no_grad():
        full = processor(images=[synthetic_image(0)], text=[text], return_tensors="pt")
        ids = torch.cat([full["input_ids"], torch.tensor([[5, 6]])], 1)
        plain = model(input_ids=ids, pixel_values=full["pixel_values"],
                      attention_mask=torch.ones_like(ids)).logits[0, -3:]
    assert torch.allclose(logits[0], plain, atol=1e-4)  # step t's logits come after forced tokens < t
