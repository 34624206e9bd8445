"""prunekit as lmms-eval's model ``prunekit``, through lmms-eval's real registry, CLI and evaluator.

Needs lmms-eval (``.[lmms-runtime]`` plus lmms-eval without its deps, docs/lmms_eval.md); CI runs this file in
its own virtualenv (``-m lmms``). Without lmms-eval every test here is skipped.
"""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (docs/lmms_eval.md)")

from lmms_eval.api.instance import Instance  # noqa: E402

from helpers import prompt  # noqa: E402
from prunekit.eval.data import SYNTHETIC_FILE, write_synthetic_pope  # noqa: E402
from prunekit.eval.datamodule import BenchmarkDataModule  # noqa: E402
from prunekit.errors import PruningError  # noqa: E402
from prunekit.eval.lmms.model import PrunekitLMM  # noqa: E402
from prunekit.eval.lmms.tasks import write_pope_task  # noqa: E402
from prunekit.eval.module import PruningEvalModule  # noqa: E402
from prunekit.eval.benchmarks import POST_PROMPT  # noqa: E402

pytestmark = pytest.mark.lmms
TASK = "t"


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    return write_synthetic_pope(tmp_path_factory.mktemp("pope"), n_images=4)  # 8 questions


@pytest.fixture(scope="module")
def images(pope_root):
    data = BenchmarkDataModule("pope", root=str(pope_root), batch_size=1)
    data.setup("test")
    return [data.dataset[i].image for i in range(4)]


def lmm(tiny_dir, images, strategy, **args) -> PrunekitLMM:
    model = PrunekitLMM(pretrained=str(tiny_dir), strategy=strategy, **args)
    model.task_dict = {TASK: {"test": [{"image": im} for im in images]}}
    return model


def visual(doc):
    return [doc["image"]]


def loglikelihood_request(context, continuation, doc_id):
    return Instance("loglikelihood", (context, continuation, visual, doc_id, TASK, "test"), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def generate_request(context, doc_id, **gen):
    return Instance("generate_until", (context, {"max_new_tokens": 3, "until": ["\n\n"], **gen}, visual, doc_id,
                                       TASK, "test"), idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


# --- the registry --------------------------------------------------------------------------------------------
def test_prunekit_resolves_through_lmms_evals_registry():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    assert get_model("prunekit") is PrunekitLMM
    assert MODEL_REGISTRY_V2.resolve("prunekit").model_type == "simple"


# --- the CLI on a local task equals prunekit's evaluator --------------------------------------------------
@pytest.mark.slow
def test_lmms_eval_cli_on_a_local_pope_task_equals_prunekits_evaluator(tiny_dir, pope_root, tmp_path):
    tasks = tmp_path / "tasks"
    write_pope_task(tasks, [pope_root / SYNTHETIC_FILE], task="local_pope", max_new_tokens=6)
    write_pope_task(tasks, [pope_root / SYNTHETIC_FILE], task="local_pope_mc", choice=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                        "PRUNEKIT_LMMS_STATS": str(tmp_path / "stats.jsonl")}
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "prunekit",
         "--model_args", f"pretrained={tiny_dir},strategy=mmtok,budget=16", "--tasks", "local_pope,local_pope_mc",
         "--include_path", str(tasks), "--batch_size", "2", "--output_path", str(tmp_path / "out"),
         "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
    results = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    samples = glob.glob(str(tmp_path / "out" / "*" / "*_samples_local_pope.jsonl"))
    assert results and samples, run.stdout[-3000:] + run.stderr[-3000:]  # lmms-eval exits 0 even when it failed
    theirs = {s["doc_id"]: s for s in map(json.loads, Path(samples[0]).read_text().splitlines())}
    summary = json.loads(Path(results[0]).read_text())

    ours = PruningEvalModule(str(tiny_dir), {"name": "mmtok", "budget": 16}, "pope", max_new_tokens=6)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).test(
        ours, datamodule=BenchmarkDataModule("pope", root=str(pope_root), batch_size=2), verbose=False)

    assert sorted(theirs) == list(range(8)) and len(ours.records) == 8
    for doc_id, record in enumerate(ours.records):
        sample = theirs[doc_id]
        assert sample["input"] == record["prompt"]
        assert sample["filtered_resps"] == record["prediction"]  # the same answer, token for token
        counts = sample["token_counts"][0]["prunekit"]
        assert (counts["n_in"], counts["n_final"], counts["n_avg"]) == (16, 16, 16.0)
        assert counts["kept"] == record["kept"]  # the same patches kept
    metrics = summary["results"]["local_pope"]
    for theirs_name, ours_name in [("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"),
                                   ("f1_score", "f1"), ("yes_ratio", "yes_ratio")]:
        assert metrics[f"pope_{theirs_name},none"] == pytest.approx(ours.results["metrics"][ours_name])
    assert summary["throughput"]["avg_prunekit_n_in"] == 16.0
    assert summary["throughput"]["avg_prunekit_n_vanilla"] == 64.0
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    generated = [line for line in lines if line["task"] == "local_pope"]
    assert sorted(line["doc_id"] for line in generated) == list(range(8))
    assert all(line["n_in"] == 16 and line["prefill_ms"] > 0 for line in lines)

    # the multiple-choice twin: lmms-eval scores " yes" / " no" through the plugin's loglikelihood and takes the
    # argmin of the losses; its accuracy is what the losses say, worked out here from the plugin called directly
    choice = {s["doc_id"]: s for s in map(json.loads, Path(glob.glob(
        str(tmp_path / "out" / "*" / "*_samples_local_pope_mc.jsonl"))[0]).read_text().splitlines())}
    direct = PrunekitLMM(pretrained=str(tiny_dir), strategy="mmtok", budget=16, batch_size=2)
    data = BenchmarkDataModule("pope", root=str(pope_root), batch_size=1)
    data.setup("test")
    samples = [data.dataset[i] for i in range(8)]
    direct.task_dict = {TASK: {"test": [{"image": s.image} for s in samples]}}
    requests = [loglikelihood_request(s.question.strip() + POST_PROMPT, f" {answer}", i)
                for i, s in enumerate(samples) for answer in ("yes", "no")]
    losses = [r.text[0] for r in direct.loglikelihood(requests)]
    correct = []
    for i, s in enumerate(samples):
        logged = [float(loss) for loss, _ in choice[i]["filtered_resps"]]
        assert logged == pytest.approx(losses[2 * i:2 * i + 2], abs=1e-5)
        correct.append(("yes", "no")[losses[2 * i + 1] < losses[2 * i]] == s.answer)
    assert summary["results"]["local_pope_mc"]["acc,none"] == pytest.approx(sum(correct) / 8)


# --- loglikelihood ---------------------------------------------------------------------------------------
def reference_loss(model, processor, image, context: str, continuation: str) -> float:
    """The mean negative log-likelihood of the continuation's tokens, from one plain forward of the unpruned model
    over the whole text."""
    text = prompt(processor, context)
    head = processor(images=[image], text=[text], return_tensors="pt")
    whole = processor(images=[image], text=[text + continuation], return_tensors="pt")
    n = whole["input_ids"].shape[1] - head["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**whole).logits[0].float().log_softmax(-1)
    targets = whole["input_ids"][0, -n:]
    return -logits[-n - 1:-1].gather(1, targets[:, None]).mean().item()


def test_keep_all_loglikelihood_is_the_unpruned_models_loss(tiny_dir, images):
    model = lmm(tiny_dir, images, "keep_all", batch_size=2)
    requests = [loglikelihood_request("Is there a red circle?", " yes", 0),
                loglikelihood_request("How many shapes?", " two shapes", 1),
                loglikelihood_request("Is there a red circle?", " no", 2)]
    got = model.loglikelihood(requests)
    for result, r in zip(got, requests):
        ctx, cont, doc_id = r.args[0], r.args[1], r.args[3]
        loss, _ = result.text
        assert loss == pytest.approx(reference_loss(model.model, model.processor, images[doc_id], ctx, cont), abs=1e-4)
        assert loss > 0


def test_the_continuation_never_chooses_the_kept_tokens(tiny_dir, images, tmp_path):
    """FastV ranks by the last prompt token's attention: were the continuation part of the prefill, its last token
    would change the kept set. MMTok ranks by the instruction's words: were the continuation passed as part of the
    instruction, they would."""
    for strategy in ("fastv", "mmtok"):
        stats = tmp_path / f"{strategy}.jsonl"
        model = lmm(tiny_dir, images, strategy, budget=8, batch_size=1, stats_path=str(stats))
        context = "Is there a blue square in the image?"
        answers = model.generate_until([generate_request(context, 0)])
        continuations = [" yes", " no", " a blue square, a red circle and many other shapes"]
        scores = model.loglikelihood([loglikelihood_request(context, c, 0) for c in continuations])
        kept = [json.loads(line)["kept"] for line in stats.read_text().splitlines()]
        assert len(kept) == 4 and len(set(kept)) == 1, strategy  # generate_until's and each continuation's
        assert answers[0].token_counts.prunekit["kept"] == kept[0]
        assert len({s.text[0] for s in scores}) == 3


def test_is_greedy_says_whether_greedy_decoding_gives_the_continuation(tiny_dir, images):
    from prunekit import attach

    model = lmm(tiny_dir, images, "fastv", budget=8)
    tokenizer = model.processor.tokenizer

    def greedy_text(context, doc_id):
        """The greedy first answer token under the strategy, as a string that tokenizes back to that token."""
        text = prompt(model.processor, context)
        inputs = model.processor(images=[images[doc_id]], text=[text], return_tensors="pt")
        with attach(model.model, model.strategy, processor=model.processor):
            first = model.model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
        string = tokenizer.decode([first])
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        round_trips = tokenizer(text + string, add_special_tokens=False)["input_ids"][len(head):] == [first]
        return string if round_trips else None  # the tiny byte-level vocabulary: 132 of its 333 tokens do

    found = [(c, d, s) for c in ("Is there a blue square?", "What colour?", "Count them.") for d in range(4)
             if (s := greedy_text(c, d)) is not None]
    assert found
    context, doc_id, string = found[0]
    other = "zz" if string != "zz" else "yy"
    got = model.loglikelihood([loglikelihood_request(context, string, doc_id),
                               loglikelihood_request(context, other, doc_id)])
    assert got[0].text[1] is True and got[1].text[1] is False


# --- the rest of the interface ---------------------------------------------------------------------------
def test_generate_until_cuts_at_the_tasks_until_and_batches_like_single_rows(tiny_dir, images):
    model = lmm(tiny_dir, images, "fastv", budget=8, batch_size=3)
    requests = [generate_request(f"Is there a {c} shape?", i, until=[], max_new_tokens=12)
                for i, c in enumerate(("red", "blue", "green", "big"))]
    batched = [a.text for a in model.generate_until(requests)]
    model.batch_size = 1
    single = [a.text for a in model.generate_until(requests)]
    assert batched == single
    index, raw = max(enumerate(single), key=lambda a: len(a[1]))
    assert len(raw) >= 4
    stop = raw[3]  # a stop string taken from the answer itself: the answer must end before it
    cut = model.generate_until([generate_request(requests[index].args[0], index, until=[stop], max_new_tokens=12)])
    assert cut[0].text == raw.split(stop, 1)[0].strip() and len(cut[0].text) < len(raw)


def test_a_corrupt_image_is_skipped_and_counted_and_the_rest_answered(tiny_dir, images, tmp_path):
    model = lmm(tiny_dir, images, "fastv", budget=8, batch_size=3, stats_path=str(tmp_path / "s.jsonl"))
    model.task_dict[TASK]["test"].append({"image": None})  # doc 4: doc_to_visual gives None, which has no pixels
    alone = model.generate_until([generate_request("Is there a red shape?", 0)])[0]
    answers = model.generate_until([generate_request("Is there a red shape?", 0), generate_request("Any?", 4)])
    assert answers[1].text == "" and answers[1].token_counts.prunekit["skipped"] is True
    assert "convert" in answers[1].token_counts.prunekit["error"]
    assert answers[0].text == alone.text and answers[0].token_counts.prunekit["n_final"] == 8
    assert answers[0].token_counts.prunekit["kept"] == alone.token_counts.prunekit["kept"]
    scores = model.loglikelihood([loglikelihood_request("Any?", " yes", 4), loglikelihood_request("Any?", " yes", 1)])
    assert scores[0].text == (float("inf"), False) and scores[1].text[0] < float("inf")
    model.task_dict[TASK]["test"].append({"image": None})
    with pytest.raises(PruningError, match="no visual of this batch of 2 requests could be read"):
        model.generate_until([generate_request("Any?", 4), generate_request("Any?", 5)])
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(line["doc_id"], line.get("skipped", False)) for line in lines] == [(0, False), (4, True), (0, False),
                                                                             (4, True), (1, False)]


def test_bad_model_args_and_multi_round_are_refused_clearly(tiny_dir, images, monkeypatch):
    with pytest.raises(ValueError, match="has no knob 'relai'.*its knobs: .*relay"):
        PrunekitLMM(pretrained=str(tiny_dir), strategy="flowcut", relai="mean_query")
    with pytest.raises(Exception, match="unknown strategy 'flowcat'. Did you mean 'flowcut'"):
        PrunekitLMM(pretrained=str(tiny_dir), strategy="flowcat")
    model = lmm(tiny_dir, images, "keep_all")
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])
    with pytest.raises(Exception, match="beam search is not supported"):
        model.generate_until([generate_request("Q?", 0, num_beams=2)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotImplementedError, match="one process"):
        PrunekitLMM(pretrained=str(tiny_dir))


def test_a_model_config_name_brings_its_settings():
    from prunekit.eval.lmms.model import model_settings, strategy_settings

    settings = model_settings("tiny_576")
    assert settings["path"] == "tiny-576" and settings["random_weights"] is True
    strategy = strategy_settings("cdpruner", {}, settings, None)
    assert strategy["budget"] == settings["default_budget"]
    assert Path(strategy["text_encoder"]).is_dir()  # the model config's tiny CLIP text encoder, built and cached
    assert model_settings("llava-hf/llava-1.5-7b-hf")["path"] == "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize("family", ["tiny-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_every_family_answers_and_scores_through_the_plugin(family, images):
    """The family comes from the checkpoint's config; keep_all's log-probabilities are the plain forward's
    (LLaVA-NeXT's anyres crops, Qwen's M-RoPE positions continued across the teacher-forced steps)."""
    model = lmm(family, images, "keep_all", batch_size=2)
    requests = [loglikelihood_request("Is there a red circle?", " yes", 0),
                loglikelihood_request("What is it?", " a square", 1)]
    for result, r in zip(model.loglikelihood(requests), requests):
        expected = reference_loss(model.model, model.processor, images[r.args[3]], r.args[0], r.args[1])
        assert result.text[0] == pytest.approx(expected, abs=1e-4)
    pruned = lmm(family, images, "fastv", budget=8, batch_size=2)
    answers = pruned.generate_until([generate_request("Is there a red circle?", 0), generate_request("Why?", 1)])
    for answer in answers:
        counts = answer.token_counts.prunekit
        assert counts["n_final"] < counts["n_vanilla"] and answer.token_counts.input_tokens > counts["n_vanilla"]


def test_the_means_reach_an_active_wandb_runs_summary(tiny_dir, images, monkeypatch):
    class Run:
        summary: dict = {}

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].run = Run()
    model = lmm(tiny_dir, images, "fastv", budget=8)
    model.generate_until([generate_request("Is there a red circle?", 0), generate_request("Why?", 1)])
    summary = sys.modules["wandb"].run.summary
    assert summary["prunekit/n_vanilla"] == 64 and summary["prunekit/n_final"] == 8
    assert summary["prunekit/prefill_ms"] > 0 and summary["prunekit/samples"] == 2
    model.generate_until([generate_request("Is there a red circle?", 0)])
    assert sys.modules["wandb"].run.summary["prunekit/samples"] == 3  # the run's means so far, not the last call's


def write_video(path, n_frames=12, fps=4, side=64):
    """Frame k a solid colour with red rising by 20 a frame; mpeg4 in yuv420p."""
    import numpy as np

    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for k in range(n_frames):
            pixels = np.full((side, side, 3), (10 + 20 * k, 100, 120), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_a_video_task_answers_and_scores_through_the_plugin(tmp_path):
    """A task whose doc_to_visual gives a video's path: max_frames_num=4 of its 12 frames, sampled at 0, 3, 7, 11
    (np.linspace(0, 11, 4) truncated), reach the model with their metadata; keep_all's loss is the plain forward's on
    those frames; FastV prunes the video's tokens; an unreadable file is skipped and counted."""
    import av

    write_video(tmp_path / "v.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 100)
    docs = [{"video": str(tmp_path / "v.mp4")}, {"video": str(tmp_path / "bad.mp4")}]
    model = PrunekitLMM(pretrained="tiny-qwen3-vl", strategy="keep_all", max_frames_num=4)
    model.task_dict = {TASK: {"test": docs}}

    def video(doc):
        return [doc["video"]]

    request = Instance("loglikelihood", ("What happens?", " yes", video, 0, TASK, "test"), idx=0,
                       metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    (result,) = model.loglikelihood([request])
    with av.open(str(tmp_path / "v.mp4")) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    processor = model.processor
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                      {"type": "text", "text": "What happens?"}]}],
                                         add_generation_prompt=True)
    meta = [{"fps": 4.0, "frames_indices": [0, 3, 7, 11], "total_num_frames": 12}]
    clip = [frames[i] for i in (0, 3, 7, 11)]
    head = processor(text=[text], videos=[clip], video_metadata=meta, return_tensors="pt")
    whole = processor(text=[text + " yes"], videos=[clip], video_metadata=meta, return_tensors="pt")
    n = whole["input_ids"].shape[1] - head["input_ids"].shape[1]
    with torch.no_grad():
        logits = model.model(**whole).logits[0].float().log_softmax(-1)
    expected = -logits[-n - 1:-1].gather(1, whole["input_ids"][0, -n:, None]).mean().item()
    assert result.text[0] == pytest.approx(expected, abs=1e-4)
    # the temporal patches' times: frames 0 and 3 at 4 fps, (0 + 0.75) / 2 = 0.375 s; frames 7 and 11: 2.25 s (a tie,
    # written half to even)
    decoded = processor.tokenizer.decode(whole["input_ids"][0])
    assert "<0.4 seconds>" in decoded and "<2.2 seconds>" in decoded

    pruned = PrunekitLMM(pretrained="tiny-qwen3-vl", strategy="fastv", budget=4, max_frames_num=4, batch_size=2)
    pruned.task_dict = model.task_dict
    answers = pruned.generate_until([
        Instance("generate_until", ("What happens?", {"max_new_tokens": 2, "until": []}, video, d, TASK, "test"),
                 idx=0, metadata={"task": TASK, "doc_id": d, "repeats": 1}) for d in (0, 1)])
    counts = answers[0].token_counts.prunekit
    assert counts["n_vanilla"] == int((head["input_ids"] == processor.video_token_id).sum()) and counts["n_final"] == 4
    assert answers[1].text == "" and answers[1].token_counts.prunekit["skipped"] is True
