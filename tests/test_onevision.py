"""LLaVA-OneVision: SigLIP crops without [CLS], the anyres layout read off the model (unpadding, newlines), the
``anyres_max`` downscale that blends crop tokens (vision-side cuts refused there, llm_layer cuts run), and several
images per sample (one crop each). (The runtime invariants on OneVision: tests/test_families_invariants.py.)"""
import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PruningError
from prunekit.tiny import build_tiny_onevision, synthetic_image
from helpers import prompt

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def onevision():
    model, processor = build_tiny_onevision()
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def downscaling():
    """anyres_max_1: a grid of more than about one crop's 64 tokens is bilinearly downscaled."""
    model, processor = build_tiny_onevision(max_crops=1)
    return model, processor


def single(processor, size, seed=1):
    return processor(images=[synthetic_image(seed, size)], text=[prompt(processor, "what is it?")], return_tensors="pt")


def several(processor, samples):
    """One prompt per sample with one image item per image; images nested per sample (the processor's
    ``batch_num_images``)."""
    texts, images = [], []
    for i, sizes in enumerate(samples):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "what is it?"}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.append([synthetic_image(10 * i + j, size) for j, size in enumerate(sizes)])
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_layouts_worked_by_hand(onevision, downscaling):
    """112 px crops of 8x8 tokens. 224x224 (height, width): 2x2 crops + base; 16x16 grid + 16 newlines + 64 = 336.
    With anyres_max_1 the 16x16 grid is over 1.1x one crop (ratio sqrt(256 / 64) = 2) and becomes 8x8: 64 + 72 = 136.
    112x224: 1x2 crops, 8x16 grid, ratio sqrt(2): int(8 // 1.414) x int(16 // 1.414) = 5x11, + 5 newlines + 64 = 124."""
    plain, small = adapter_for(onevision[0]), adapter_for(downscaling[0])
    full = plain._layout((224, 224))
    assert (full.units, full.span_length, full.blended) == (5, 336, False)
    assert full.source[:64].tolist() == list(range(64)) and full.source[64 + 16] == -1
    assert full.source[64:80].tolist() == [64 + r for r in range(8)] + [128 + r for r in range(8)]  # row 0: tiles 1, 2
    assert (small._layout((224, 224)).span_length, small._layout((224, 224)).blended) == (136, True)
    assert (small._layout((112, 224)).span_length, small._layout((112, 224)).blended) == (124, True)
    assert small._layout((112, 112)).blended is False  # one crop's grid: no downscale
    assert [int((single(p, s)["input_ids"] == m.config.image_token_id).sum()) for (m, p), s in
            [(onevision, (224, 224)), (downscaling, (224, 224)), (downscaling, (224, 112))]] == [336, 136, 124]


@pytest.mark.parametrize("spec", ["keep_all", dict(name="keep_all", stage="vision_layer", layer=1),
                                  dict(name="fastv", budget=8, layer=2)], ids=["keep_all", "keep_all@vit", "fastv"])
def test_a_downscaled_image_runs_whatever_keeps_its_crops_whole(downscaling, spec):
    model, processor = downscaling
    x = single(processor, (224, 224))
    with torch.no_grad():
        vanilla = model(**x).logits
        with prunekit.attach(model, spec) as handle:
            logits = model(**x).logits
    assert handle.trace.n_vanilla == [136]
    if spec == "keep_all" or spec["name"] == "keep_all":
        assert torch.equal(logits, vanilla)
    else:
        assert handle.trace.n_final == [8]


@pytest.mark.parametrize("spec", [dict(name="flowcut", budget=8), dict(name="random", budget=8, stage="vision_layer",
                                                                        layer=1),
                                  dict(name="divprune", budget=8)], ids=["flowcut", "random@vit", "divprune"])
def test_a_vision_side_cut_on_a_downscaled_image_is_refused(downscaling, spec):
    """Its span positions blend up to 4 crop tokens: a crop-level cut has no place there. The refusal names the
    remedy, and the model is unchanged afterwards."""
    model, processor = downscaling
    x = single(processor, (224, 224))
    with torch.no_grad():
        vanilla = model(**x).logits
        with prunekit.attach(model, spec):
            with pytest.raises(PruningError, match="downscaled .* llm_layer"):
                model(**x)
        assert torch.equal(model(**x).logits, vanilla)
    with torch.no_grad(), prunekit.attach(model, spec) as handle:  # an image within the limit is pruned as usual
        model(**single(processor, (112, 112)))
    assert handle.trace.n_final[0] < handle.trace.n_vanilla[0]


def test_several_images_per_sample_are_one_crop_each(onevision):
    """batch_num_images > 1: each image is its base crop (64 tokens) plus one newline; vision-side cuts apply per
    image, and each sample of a padded batch gets the logits it has alone."""
    model, processor = onevision
    samples = [[(224, 224), (112, 224)], [(200, 150)]]
    x = several(processor, samples)
    assert x["batch_num_images"].tolist() == [2, 1]
    spec = dict(name="random", budget=20, stage="vision_layer", layer=1)
    with torch.no_grad(), prunekit.attach(model, spec) as handle:
        together = model(**x).logits[:, -1]
        # 2 x (64 + 1); 150x200 px: 2x2 crops, the 16x16 grid unpadded to 12 rows (2 letterbox rows off each side),
        # 12 x 16 + 12 newlines + 64
        assert handle.trace.n_vanilla == [130, 268]
        assert handle.trace.vision_units[0] == 2
        for b, sizes in enumerate(samples):
            alone = model(**several(processor, [sizes]) if b == 0 else single(processor, sizes[0], seed=10)).logits[:, -1]
            torch.testing.assert_close(alone, together[b : b + 1], rtol=1e-5, atol=1e-5)


def test_siglip_has_no_cls_and_no_clip_text_tower(onevision):
    adapter = adapter_for(onevision[0])
    assert adapter.vision_prefix_tokens == 0 and adapter.clip_tower is False
    with pytest.raises(prunekit.errors.UnsupportedModelError, match="no \\[CLS\\]"):
        prunekit.attach(onevision[0], "visionzip")
