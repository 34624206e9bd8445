"""The tiny LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, InternVL, Qwen3-VL, LLaVA-OneVision and Qwen3.5 models load like real checkpoints and run the eval path's inputs."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from prunekit.loading import load_model, load_processor, resolve_model_path
from prunekit.tiny import TINY_MODELS, synthetic_image, tiny_llava_dir, tiny_model_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"

FAMILIES = {  # name -> (model class, processor class, config file)
    "tiny-next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor", "tiny_next"),
    "tiny-qwen2-vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLImageOnlyProcessor", "tiny_qwen2_vl"),
    "tiny-qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLImageOnlyProcessor", "tiny_qwen2_5_vl"),
    "tiny-internvl": ("InternVLForConditionalGeneration", "InternVLImageOnlyProcessor", "tiny_internvl"),
    "tiny-qwen3-vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLImageOnlyProcessor", "tiny_qwen3_vl"),
    "tiny-onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionImageOnlyProcessor", "tiny_onevision"),
    "tiny-qwen3.5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLImageOnlyProcessor", "tiny_qwen3_5"),
}
# visual tokens per image, (width, height) -> count; measured, and equal to what the model's vision side produces
SIZES = [(112, 112), (224, 112), (200, 150), (224, 224)]
TOKENS = {
    "tiny-next": [136, 200, 268, 336],  # 64 base + unpadded AnyRes grid + one newline per row
    "tiny-qwen2-vl": [16, 32, 35, 64],  # one per 28x28 px of the resized image
    "tiny-qwen2.5-vl": [16, 32, 35, 64],
    # 16 a 112 px tile: 1 tile; 2x1 tiles + thumbnail; 2x2 + thumbnail (200x150 ties 1x1 and 2x2 in aspect, and its
    # area is over half the 2x2 grid's, so InternVL's rule takes 2x2); 2x2 + thumbnail
    "tiny-internvl": [16, 48, 80, 80],
    # one per 32x32 px, sides rounded to multiples of 32: 128x128, 128x224, 160x192, 224x224
    "tiny-qwen3-vl": [16, 28, 30, 49],
    "tiny-onevision": [136, 200, 268, 336],  # LLaVA-NeXT's geometry (SigLIP: 64 per crop too); no downscale at 2x2
    "tiny-qwen3.5": [16, 28, 30, 49],  # Qwen3-VL's vision side
}


def image_token_id(model) -> int:
    return getattr(model.config, "image_token_id", None) or model.config.image_token_index


def prompts(processor, questions):
    """As PruningEvalModule._inputs builds them."""
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]


def n_features(model, inputs) -> list[int]:
    keys = ("pixel_values", "image_sizes", "image_grid_thw")
    out = model.model.get_image_features(**{k: v for k, v in inputs.items() if k in keys})
    feats = getattr(out, "pooler_output", out)
    if torch.is_tensor(feats):  # InternVL: (tiles, tokens, D) of the one image these tests pass
        return [feats.shape[0] * feats.shape[1]]
    return [f.shape[0] for f in feats]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("prunekit-cache")
        mp.setenv("PRUNEKIT_CACHE", str(path))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, cache):
    model, processor = load_model(request.param)
    return request.param, model, processor


def test_tiny_dir_round_trips_through_load_model(family, cache):
    name, model, processor = family
    model_cls, processor_cls, _ = FAMILIES[name]
    path = Path(resolve_model_path(name))
    assert path.parent == cache and path == tiny_model_dir(name)
    assert type(model).__name__ == model_cls and not model.training
    assert type(processor).__name__ == processor_cls
    assert processor.image_processor is not None and processor.tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id is not None
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == image_token_id(model)
    assert len(processor.tokenizer) <= model.config.get_text_config().vocab_size


def test_placeholders_match_vision_features(family):
    name, model, processor = family
    [text] = prompts(processor, ["Is there a red square?"])
    counts = []
    for size in SIZES:
        inputs = processor(images=[synthetic_image(0, size)], text=[text], return_tensors="pt")
        placeholders = int((inputs["input_ids"] == image_token_id(model)).sum())
        with torch.no_grad():
            assert n_features(model, inputs) == [placeholders], size
        counts.append(placeholders)
    assert counts == TOKENS[name]


def test_batch_of_two_left_padded_differently_sized_images(family):
    name, model, processor = family
    images = [synthetic_image(1, (112, 112)), synthetic_image(2, (224, 112))]
    texts = prompts(processor, ["Is there a red square in the image?", "What?"])
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding: every row ends on a real token
    per_row = (ids == image_token_id(model)).sum(1).tolist()
    assert per_row == [TOKENS[name][0], TOKENS[name][1]]  # different token counts per image
    if "qwen" in name:
        assert torch.equal(inputs["mm_token_type_ids"].bool(), ids == image_token_id(model))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=1, output_logits=True,
                             return_dict_in_generate=True)
        assert out.sequences.shape[0] == 2 and ids.shape[1] < out.sequences.shape[1] <= ids.shape[1] + 3
        assert len(processor.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)) == 2
        # each row's first-step logits are those of the row alone: padding and the other image do not leak in
        for b in range(2):
            alone = processor(images=[images[b]], text=[texts[b]], return_tensors="pt")
            torch.testing.assert_close(model(**alone).logits[0, -1], out.logits[0][b], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_qwen_processor_reloads_without_a_video_processor(name, cache, tmp_path):
    from transformers import AutoProcessor

    from prunekit.processors import IMAGE_ONLY_PROCESSORS

    path = tiny_model_dir(name)
    config = json.loads((path / "config.json").read_text())
    cls = IMAGE_ONLY_PROCESSORS[config["model_type"]]
    reloaded = cls.from_pretrained(path)
    assert type(reloaded) is cls and reloaded.image_processor.merge_size == 2
    [text] = prompts(reloaded, ["Is there a red square?"])
    x = reloaded(images=[synthetic_image(3, (200, 150))], text=[text], return_tensors="pt")
    assert set(x) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert x["image_grid_thw"].tolist() == [[1, 10, 14]] and x["pixel_values"].shape == (140, 1176)

    # a real checkpoint's layout: preprocessor_config.json naming the real processor class, chat_template.json
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text((path / "config.json").read_text())
    reloaded.tokenizer.save_pretrained(real)
    real_cls = cls.__bases__[-1].__name__  # Qwen2VLProcessor / Qwen2_5_VLProcessor
    image_cfg = reloaded.image_processor.to_dict() | {"image_processor_type": "Qwen2VLImageProcessor",
                                                      "processor_class": real_cls}
    (real / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    (real / "chat_template.json").write_text(json.dumps({"chat_template": reloaded.chat_template}))
    try:
        auto = AutoProcessor.from_pretrained(real)
    except Exception:  # no torchvision: 5.23 AttributeError, 5.17 TypeError (the video processor)
        auto = None
    if importlib.util.find_spec("torchvision") is None:  # CPU machines: AutoProcessor gives no image processor
        assert getattr(auto, "image_processor", None) is None
    # with torchvision (GPU machines) load_processor keeps what AutoProcessor builds, video processor included
    expected = type(auto) if getattr(auto, "image_processor", None) is not None else cls
    assert type(load_processor(str(path))) is cls  # a saved image-only processor always reloads as itself
    from_real = load_processor(str(real))
    assert type(from_real) is expected
    for loaded in (load_processor(str(path)), from_real):
        y = loaded(images=[synthetic_image(3, (200, 150))], text=[text], return_tensors="pt")
        assert torch.equal(y["input_ids"], x["input_ids"]) and torch.equal(y["image_grid_thw"], x["image_grid_thw"])
        if type(loaded) is cls:  # the same PIL image processor; a torchvision one resizes slightly differently
            assert torch.equal(y["pixel_values"], x["pixel_values"])
        assert y["pixel_values"].shape == x["pixel_values"].shape


def test_qwen2_5_vl_has_windowed_and_full_attention_blocks(cache):
    config = json.loads((tiny_model_dir("tiny-qwen2.5-vl") / "config.json").read_text())["vision_config"]
    full = set(config["fullatt_block_indexes"])
    assert full and full < set(range(config["depth"])) and config["window_size"] == 112


def test_tiny_names_and_configs(cache):
    # the LLaVA-1.5 cache directories keep their names, so existing caches stay valid
    assert TINY_MODELS["tiny"][0] == "tiny-llava-v2" and TINY_MODELS["tiny-576"][0] == "tiny-llava-v2-336px"
    assert tiny_llava_dir() == tiny_model_dir("tiny") == cache / "tiny-llava-v2"
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny_model_dir("tiny-nope")
    for name, (_, _, config_name) in FAMILIES.items():
        cfg = yaml.safe_load((CONFIGS / f"{config_name}.yaml").read_text())
        assert cfg["path"] == name and cfg["random_weights"] is True and cfg["name"] == config_name
        assert 0 < cfg["default_budget"] < TOKENS[name][0]  # a real cut at the synthetic 112 px images
    for config_name, hub_id in (("llava_next_7b", "llava-hf/llava-v1.6-vicuna-7b-hf"),
                                ("qwen2_vl_7b", "Qwen/Qwen2-VL-7B-Instruct"),
                                ("qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
                                ("internvl3_8b", "OpenGVLab/InternVL3-8B-hf"),
                                ("qwen3_vl_8b", "Qwen/Qwen3-VL-8B-Instruct"),
                                ("llava_onevision_7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf")):
        cfg = yaml.safe_load((CONFIGS / f"{config_name}.yaml").read_text())
        assert cfg["path"] == hub_id and cfg["dtype"] == "bfloat16" and cfg["default_budget"] is None
        assert cfg["random_weights"] is False and cfg["attn_implementation"] == "sdpa"
