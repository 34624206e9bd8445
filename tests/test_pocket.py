"""The pocket benchmark: scenes true to their questions, a split that is the same everywhere, a tokenizer and
processor that agree with the training text, and a training script that runs (docs/pocket.md)."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from prunekit.pocket import data as D
from prunekit.pocket import scenes as S

ROOT = Path(__file__).resolve().parents[1]


def scene_of(*objects):
    """A scene with hand-placed objects (the pixels do not matter to the questions)."""
    return S.Scene(np.zeros((S.SIZE, S.SIZE, 3), np.uint8), list(objects), np.full((S.SIZE, S.SIZE), -1, np.int8),
                   "textured")


RED_CIRCLE = S.Obj("red", "circle", "small", 60, 100)
BLUE_SQUARE = S.Obj("blue", "square", "large", 250, 110)  # right of the circle: dx = 190, dy = 10
RED_CROSS = S.Obj("red", "cross", "large", 70, 280)       # below the circle: dy = 180, dx = 10


def test_a_scene_is_the_same_from_its_seed_and_index_and_differs_across_them():
    a, b = S.draw_scene(np.random.default_rng([1, 7])), S.draw_scene(np.random.default_rng([1, 7]))
    assert np.array_equal(a.pixels, b.pixels) and a.objects == b.objects
    assert not np.array_equal(a.pixels, S.draw_scene(np.random.default_rng([2, 7])).pixels)


def test_scenes_are_336px_with_1_to_6_small_distinct_objects_at_their_colour():
    for i in range(30):
        scene = S.draw_scene(np.random.default_rng([5, i]))
        assert scene.pixels.shape == (336, 336, 3) and scene.pixels.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 6
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        for k, o in enumerate(scene.objects):
            drawn = scene.owner == k
            assert 0.005 <= drawn.mean() <= 0.03  # an object covers about 1-3 % of the picture
            colour = scene.pixels[drawn].astype(int).mean(0)
            assert np.abs(colour - S.COLOURS[o.colour]).max() <= 12  # jitter is at most 12 per channel


def test_patch_labels_follow_the_drawn_pixels():
    scene = S.draw_scene(np.random.default_rng([3, 0]), n_objects=1)
    colour, shape = scene.patch_labels()
    o = scene.objects[0]
    rows, cols = np.nonzero((scene.owner == 0).reshape(24, 14, 24, 14).mean((1, 3)) >= 0.25)
    assert set(np.flatnonzero(colour)) == set((rows * 24 + cols).tolist())
    assert set(colour[colour > 0]) == {list(S.COLOURS).index(o.colour) + 1}
    assert set(shape[shape > 0]) == {S.SHAPES.index(o.shape) + 1}
    assert scene.presence().sum() == 1 and scene.presence()[S.KINDS.index((o.colour, o.shape))] == 1


def test_patch_targets_name_the_kind_size_and_centre_patch_of_each_object():
    """A hand-placed large blue square: its 56 px box at x 126-181, y 42-97 covers patches 9-12 x 3-6 (the square
    fills 85 % of the box, so only those four of each side are covered at least a quarter)."""
    side = S.SIZES["large"]
    owner = np.full((S.SIZE, S.SIZE), -1, np.int8)
    owner[42:42 + side, 126:126 + side][S._MASKS[("square", side)]] = 0
    square = S.Obj("blue", "square", "large", 126 + side // 2, 42 + side // 2)  # centre (154, 70): patch (5, 11)
    scene = S.Scene(np.zeros((S.SIZE, S.SIZE, 3), np.uint8), [square], owner, "textured")
    t = scene.patch_targets()
    covered = {r * 24 + c for r in range(3, 7) for c in range(9, 13)}
    assert set(np.flatnonzero(t["kind"])) == covered == set(np.flatnonzero(t["size"]))
    assert set(t["kind"][list(covered)]) == {2 * 4 + 2}  # blue is colour 3, square shape 2: kind (3-1)*4+2 = 10
    assert S.KINDS[10 - 1] == ("blue", "square")
    assert set(t["colour"][list(covered)]) == {3} and set(t["size"][list(covered)]) == {2}  # large = 2
    assert np.flatnonzero(t["centre"]).tolist() == [5 * 24 + 11]


def test_relations_need_a_clear_dominant_axis():
    assert S.relation(RED_CIRCLE, BLUE_SQUARE) == "left" and S.relation(BLUE_SQUARE, RED_CIRCLE) == "right"
    assert S.relation(RED_CIRCLE, RED_CROSS) == "above" and S.relation(RED_CROSS, RED_CIRCLE) == "below"
    assert S.relation(RED_CROSS, BLUE_SQUARE) is None  # dx = -180, dy = 170: neither axis dominates
    assert S.relation(S.Obj("red", "circle", "small", 100, 100), S.Obj("blue", "circle", "small", 130, 100)) is None


def test_questions_are_true_to_the_scene():
    scene = scene_of(RED_CIRCLE, BLUE_SQUARE, RED_CROSS)
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(400):
        for kind in S.QUESTION_TYPES:
            qa = S.ask(rng, scene, kind, S.NEGATIVES[int(rng.integers(3))])
            seen.setdefault(kind, set()).add(qa)
    truth = {
        "Is there a red circle in the image?": "yes", "Is there a blue square in the image?": "yes",
        "Is there a red cross in the image?": "yes", "Is there a blue circle in the image?": "no",
        "What colour is the circle?": "red", "What colour is the square?": "blue", "What colour is the cross?": "red",
        "What shape is the blue object?": "square", "What size is the red circle?": "small",
        "What size is the blue square?": "large", "How many red objects are there?": "2",
        "How many objects are there?": "3", "How many circles are there?": "1", "How many triangles are there?": "0",
        "How many green objects are there?": "0",
        "Where is the red circle relative to the blue square?": "left",
        "Where is the blue square relative to the red circle?": "right",
        "Where is the red cross relative to the red circle?": "below",
        "Where is the red circle relative to the red cross?": "above",
    }
    asked = dict(qa for qas in seen.values() for qa in qas)
    for question, answer in asked.items():
        if question in truth:
            assert answer == truth[question], question
    assert "What shape is the red object?" not in asked  # two red objects: the question would be ambiguous
    assert not any("red cross relative to the blue square" in q for q in asked)  # no dominant axis
    spatial = {q for q, _ in seen["spatial"]}
    assert spatial == {q for q in truth if q.startswith("Where")}  # every unambiguous pair, and no other
    for question, answer in seen["existence"]:
        colour, shape = question.split()[3:5]
        assert answer == ("yes" if (colour, shape) in {("red", "circle"), ("blue", "square"), ("red", "cross")} else "no")


def test_adversarial_negatives_share_a_colour_or_a_shape_and_popular_ones_are_frequent():
    scene = scene_of(RED_CIRCLE)
    rng = np.random.default_rng(1)
    for _ in range(200):
        question, answer = S.ask(rng, scene, "existence", "adversarial")
        colour, shape = question.split()[3:5]
        assert answer == "yes" or (colour == "red") != (shape == "circle")
        question, answer = S.ask(rng, scene, "existence", "popular")
        assert answer == "yes" or tuple(question.split()[3:5]) in S.POPULAR


def test_the_vocabulary_covers_every_question_and_answer():
    words = set(S.vocabulary())
    for _, scene, asked in D.eval_questions(n_images=40):
        for _, _, question, answer in asked:
            assert set((question + S.POST_PROMPT).replace("?", " ?").replace(".", " .").split()) <= words
            assert answer in words


def test_the_eval_split_is_the_released_one_and_reads_as_a_benchmark(tmp_path):
    from prunekit.eval.data import load_benchmark

    sha = D.write_eval_split(tmp_path, expected_sha256=D.EVAL_PIXELS_SHA256)  # raises if the pictures drifted
    assert sha == D.EVAL_PIXELS_SHA256
    data = load_benchmark("pocket", tmp_path)
    assert len(data) == 1200
    samples = [data[i] for i in range(len(data))]
    assert {s.category for s in samples} == set(S.QUESTION_TYPES)
    assert {s.category for s in samples[:40]} == set(S.QUESTION_TYPES)  # any prefix holds every type
    assert {s.extra["negatives"] for s in samples if s.category == "existence"} == set(S.NEGATIVES)
    # the PNG cells decode to exactly the drawn pixels, so the checksum holds for what the model sees
    digest, last = hashlib.sha256(), None
    for s in samples:
        if s.extra["image_id"] != last:
            digest.update(np.asarray(s.image).tobytes())
            last = s.extra["image_id"]
    assert digest.hexdigest() == D.EVAL_PIXELS_SHA256


def test_a_drifted_split_refuses_to_build(tmp_path):
    with pytest.raises(RuntimeError, match="differ from the released ones"):
        D.write_eval_split(tmp_path, n_images=2, expected_sha256="0" * 64)


def test_each_packed_question_is_the_single_turn_text_the_processor_and_chat_template_make():
    from PIL import Image

    from prunekit.pocket.model import build_processor, build_tokenizer
    from prunekit.pocket.training import TURN_TYPES, QuestionDataset, pixel_values, questions

    processor = build_processor(build_tokenizer())
    dataset = QuestionDataset(processor.tokenizer, seed=3, length=4, questions=3, describe=1.0)
    pixels, ids, labels, positions, segments, types, hidden = dataset[0]
    rng = np.random.default_rng([3, 0])
    scene = S.draw_scene(rng)
    asked = questions(rng, scene, 3, describe=1.0)
    assert [k for k, _, _ in asked][-1] == "caption" and len(asked) == 4 and segments.max() == 4
    assert types.tolist() == [TURN_TYPES.index(k) for k, _, _ in asked]
    for j, (kind, question, answer) in enumerate(asked, 1):
        suffix = "" if kind == "caption" else S.POST_PROMPT
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": question + suffix}]}], add_generation_prompt=True)
        expected = processor(images=[Image.fromarray(scene.pixels)], text=[text], return_tensors="pt")
        prompt = expected["input_ids"][0].tolist()
        reply = processor.tokenizer(answer, add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id]
        seen = (segments == 0) | (segments == j)  # what block j may attend to: the prefix and itself
        assert ids[seen].tolist() == prompt + reply
        assert positions[seen].tolist() == list(range(len(prompt + reply)))  # its single-turn positions
        assert labels[seen].tolist() == [-100] * len(prompt) + reply
        if kind != "caption":  # the decoder joins a description's commas to the words before them
            assert processor.tokenizer.decode(reply, skip_special_tokens=True) == answer
        assert pixels.equal(expected["pixel_values"][0]) and pixels.equal(pixel_values(scene.pixels))


def test_the_block_mask_shows_each_question_the_prefix_and_itself_only():
    import torch

    from prunekit.pocket.training import block_mask

    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])  # prefix, two blocks, a pad
    allowed = (block_mask(segments)[0, 0] == 0).int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # block 2 never sees block 1
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # a pad sees itself only (no empty row)
    ]
    hidden = torch.tensor([[False, True, False, False, False, False, False]])  # the curriculum hides prefix token 1
    allowed = (block_mask(segments, hidden)[0, 0] == 0).int()
    assert allowed[:2, :2].tolist() == [[1, 0], [1, 1]]  # the prefix itself still sees it
    assert allowed[2:6, 1].tolist() == [0, 0, 0, 0] and allowed[2:6, 0].tolist() == [1, 1, 1, 1]  # no question does


def test_the_curriculum_shows_questions_every_object_token_and_a_growing_share_of_the_background():
    from prunekit.pocket.model import build_tokenizer
    from prunekit.pocket.training import QuestionDataset

    data = QuestionDataset(build_tokenizer(), seed=3, length=10, questions=2, background_start=0.05, anneal=0.6)
    assert [round(data.background_shown(i), 3) for i in (0, 3, 6, 9)] == [0.05, 0.525, 1.0, 1.0]  # 0.05 + 0.95 i / 6
    for i, shown in ((0, 0.05), (3, 0.525), (9, 1.0)):
        _, ids, _, _, segments, _, hidden = data[i]
        rng = np.random.default_rng([3, i])
        owner = S.draw_scene(rng).patch_owner()
        image = np.flatnonzero(ids.numpy() == data.image_id)
        assert len(image) == 576 and not hidden[segments != 0].any()  # only image tokens are ever hidden
        assert not hidden[image[owner >= 0]].any()  # every object token stays in view
        background = (owner < 0).sum()
        assert hidden[image].sum() == round(background * (1 - shown))


def test_the_object_curriculum_grows_from_few_objects_to_six():
    """objects_start=3, objects_anneal=0.5 over 20 samples: at most 3 objects for samples 0-4, then one more every 2.5
    samples (3 + int(4 i / 10)) up to 6 from sample 8; the default draws the scenes of every other split."""
    from prunekit.pocket.model import build_tokenizer
    from prunekit.pocket.training import QuestionDataset

    data = QuestionDataset(build_tokenizer(), seed=3, length=20, questions=1, objects_start=3, objects_anneal=0.5)
    assert [data.max_objects(i) for i in (0, 2, 3, 5, 6, 8, 19)] == [3, 3, 4, 5, 5, 6, 6]
    assert all(len(S.draw_scene(np.random.default_rng([5, i]), max_objects=2).objects) <= 2 for i in range(30))
    default = QuestionDataset(build_tokenizer(), seed=3, length=20, questions=1)
    assert all(default.max_objects(i) == 6 for i in range(20))
    a, b = S.draw_scene(np.random.default_rng([3, 7])), S.draw_scene(np.random.default_rng([3, 7]), max_objects=6)
    assert np.array_equal(a.pixels, b.pixels)


def test_the_language_model_can_be_narrowed():
    from prunekit.pocket.model import build_pocket

    model, _ = build_pocket(text={"num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 384})
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (3, 128, 384)
    assert model.model.multi_modal_projector.linear_2.out_features == 128  # the projector maps to the LM's width


def test_descriptions_list_every_object_top_to_bottom_in_the_vocabulary():
    scene = scene_of(RED_CROSS, BLUE_SQUARE, RED_CIRCLE)
    assert S.caption(scene) == "small red circle , large blue square , large red cross"
    words = set(S.vocabulary())
    for i in range(20):
        assert set(S.caption(S.draw_scene(np.random.default_rng([9, i]))).split()) <= words


def test_training_runs_a_few_steps_and_saves_a_loadable_checkpoint(tmp_path):
    """The CI smoke test of experiments/train_pocket.py's recipe: a few optimizer steps of both stages (no training)."""
    import torch
    from omegaconf import OmegaConf

    from prunekit.loading import load_model
    from prunekit.pocket.training import train

    from prunekit.eval.loggers import build_loggers

    cfg = OmegaConf.load(ROOT / "configs" / "train_pocket.yaml")
    cfg.pop("hydra"), cfg.pop("defaults")
    cfg.merge_with({"output_dir": str(tmp_path), "save_to": str(tmp_path / "checkpoint"), "log_every": 1,
                    "num_workers": 0, "stage1": {"steps": 3, "batch_size": 2, "crop_batch_size": 2, "whole_steps": 1},
                    "stage2": {"steps": 3, "batch_size": 2, "held_out": 4, "check_every": 2}})
    cfg.logger = OmegaConf.load(ROOT / "configs" / "logger" / "csv.yaml")  # the logger group, as Hydra composes it
    assert train(cfg, build_loggers(cfg, tmp_path, name="smoke")) == str(tmp_path / "checkpoint")
    assert (tmp_path / "stage1" / "model.safetensors").exists()  # stage 2 can restart from it (init_from)
    curves = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "tower/loss" in curves and "vqa/loss" in curves and "held_out/acc" in curves
    model, processor = load_model(str(tmp_path / "checkpoint"))
    assert model.dtype == torch.float32 and model.config.vision_feature_layer == -2  # loads in the dtype asked for
    saved = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= saved


def test_instruction_tuning_trains_the_projector_the_llm_and_only_the_top_tower_layers_below_the_read_one():
    from prunekit.pocket.model import build_pocket
    from prunekit.pocket.training import InstructionTuning

    model, _ = build_pocket()
    module = InstructionTuning(model, lr=1e-3, warmup=1, steps=2, unfreeze=2, tower_lr_scale=0.5)
    import re

    def part(name):
        if "vision_tower" in name:
            layer = re.search(r"layers\.(\d+)\.", name)
            return f"tower layer {layer.group(1)}" if layer else "tower, outside its layers"
        return name.removeprefix("model.").split(".")[0]

    trainable = {part(n) for n, p in model.named_parameters() if p.requires_grad}
    # 6 tower layers, LLaVA reads hidden_states[-2] = the output of layer 4: layers 3 and 4 train, 5 is never read
    assert trainable == {"tower layer 3", "tower layer 4", "multi_modal_projector", "language_model", "lm_head"}
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-4] and len(groups[1]["params"]) == len(module.tower_params)


def test_an_untrained_pocket_checkpoint_runs_end_to_end_on_the_pocket_split(tmp_path):
    """model=pocket data=pocket through the ablation runner, on a saved untrained pocket model: accuracy per type."""
    import os
    import subprocess
    import sys

    from prunekit.pocket.model import build_pocket

    model, processor = build_pocket()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PRUNEKIT_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate.py"), "strategy=flowcut", "model=pocket",
                          f"model.path={tmp_path / 'model'}", "data=pocket", "data.limit=8", "logger=none",
                          f"hydra.run.dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["benchmark"] == "pocket" and metrics["counts"]["scored"] == 8
    assert set(metrics["metrics"]) == {"accuracy"} | {f"accuracy_{k}" for k in S.QUESTION_TYPES}
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 1.0 and "fidelity" in metrics
    assert metrics["tokens"]["n_vanilla"] == 576 and metrics["tokens"]["n_in"] == 64  # 64 of LLaVA-1.5's 576


def test_model_path_pocket_without_the_shipped_checkpoint_says_how_to_get_it(monkeypatch, tmp_path):
    from prunekit.loading import resolve_model_path
    from prunekit.pocket import model as M

    monkeypatch.setattr(M, "CHECKPOINT_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train_pocket.py"):
        resolve_model_path("pocket")


def test_a_generated_set_exists_only_for_pope_and_pocket():
    from prunekit.eval.datamodule import BenchmarkDataModule

    with pytest.raises(ValueError, match="no generated gqa set"):
        BenchmarkDataModule("gqa", synthetic=True)


def test_a_description_is_one_more_question_block():
    from prunekit.pocket.training import questions

    kinds = []
    for i in range(40):
        rng = np.random.default_rng([4, i])
        kinds.append([k for k, _, _ in questions(rng, S.draw_scene(rng), 6, describe=0.5)])
        assert "caption" not in kinds[-1][:-1] and len(kinds[-1]) >= 2
    assert any(k[-1] == "caption" for k in kinds) and any(k[-1] != "caption" for k in kinds)
    assert {t for k in kinds for t in k} == {*S.QUESTION_TYPES, "caption"}


def test_a_packed_padded_batch_gives_every_question_the_logits_it_has_alone():
    """Training packs a picture's questions behind one prefix; under the block mask and the single-turn positions,
    each question's logits are those of its own single-turn conversation, padded rows included."""
    import torch

    from prunekit.pocket.model import build_pocket
    from prunekit.pocket.training import QuestionDataset, collate_questions

    model, processor = build_pocket()
    data = QuestionDataset(processor.tokenizer, seed=3, length=2, questions=3, describe=0.5)
    samples = [data[0], data[1]]
    pixels, ids, mask, positions, _, _ = collate_questions(samples, processor.tokenizer.pad_token_id)
    assert len(samples[0][1]) != len(samples[1][1])  # one row is padded
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixels).logits
        for b, (picture, row, _, _, segments, _, _) in enumerate(samples):
            for j in range(1, int(segments.max()) + 1):
                alone = (segments == 0) | (segments == j)
                single = model(input_ids=row[alone][None], pixel_values=picture[None]).logits[0]
                torch.testing.assert_close(packed[b, :len(row)][segments == j], single[segments[alone] == j],
                                           atol=1e-4, rtol=1e-4)


def test_the_tower_trains_on_the_hidden_state_llava_reads_and_windows_keep_their_positions():
    """Stage 1 runs the encoder layers by hand on a window of tokens: on the whole picture that is the tower's own
    hidden_states[-2]; on a window, each patch keeps its own position embedding."""
    import torch

    from prunekit.pocket.model import build_pocket
    from prunekit.pocket.training import SceneDataset, TowerPretraining

    model, _ = build_pocket()
    module = TowerPretraining(model, lr=1e-3, warmup=1, steps=2)
    data = SceneDataset(seed=5, length=4, crop=8, crop_items=2)
    (window_pixels, _, window_targets, window), (pixels, _, targets, whole) = data[0], data[2]
    assert whole.tolist() == list(range(577))
    with torch.no_grad():
        ours = module.read_layer(pixels[None], whole[None])
        theirs = model.model.vision_tower(pixel_values=pixels[None], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # a window: [CLS] then 8 x 8 patches in raster order, holding one whole object, with the picture's targets
    patches = window[1:] - 1
    assert window[0] == 0 and len(patches) == 64
    rows, cols = patches // 24, patches % 24
    assert (rows.reshape(8, 8) == rows[0] + torch.arange(8)[:, None]).all()
    assert (cols.reshape(8, 8) == cols[0] + torch.arange(8)[None, :]).all()
    scene = S.draw_scene(np.random.default_rng([5, 0]))
    full = scene.patch_targets()
    for k, v in window_targets.items():
        assert v.tolist() == full[k][patches.numpy()].tolist()
    owners = scene.patch_owner()
    inside = {o for o in owners[patches.numpy()] if o >= 0}
    assert any((owners == o).sum() == (owners[patches.numpy()] == o).sum() for o in inside)  # one object whole
