"""MMTok, CDPruner and VisPruner (docs/strategies/{mmtok,cdpruner,vispruner}.md): the test vectors worked out in
their specs, our fixes next to the official behaviour (parity flags), budgets, and the instruction each sample
gives the pre-LLM strategies (docs/architecture.md, "Instructions")."""
import math

import pytest
import torch

import prunekit
from prunekit import Keep, Site, Signals, TokenPruner
from prunekit.errors import PruningError, UnsupportedModelError
from prunekit.processors import InstructionReader
from prunekit.strategies.cdpruner import greedy_map, kernel, min_max, question, text_segments
from prunekit.strategies.mmtok import coverage_matrix, greedy_coverage, keywords
from prunekit.strategies.vispruner import vispruner_select
from prunekit.tiny import build_tiny_clip_text, synthetic_image, tiny_clip_text_dir, tiny_model_dir
from prunekit.loading import load_model
from helpers import prompt

POST = "\nAnswer the question using a single word or phrase."


def unit_vectors(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


# --- VisPruner (spec §3.6) ----------------------------------------------------------------------------------
VP1_ATTENTION = (torch.tensor([.30, .02, .20, .01, .09, .04, .07, .02, .06, .04])
                 + torch.tensor([.10, .16, .04, .03, .05, .01, .09, .05, .02, .06])) / 2
VP1_FEATURES = unit_vectors([0, 10, 20, 90, 95, 180, 190, 270, 45, 135])


def test_vispruner_vp1_important_then_one_round_of_duplicate_removal():
    # important {0, 2}; R = [1,6,4,9,8,7,5,3]; A = [1,4,8,5] scores [.17,.996,.71,.98] -> 4, 5, 8 dropped
    assert vispruner_select(VP1_ATTENTION, VP1_FEATURES, 7, 0.3).tolist() == [0, 1, 2, 3, 6, 7, 9]


def test_vispruner_vp2_rho_one_is_fastervlm_top_k():
    assert vispruner_select(VP1_ATTENTION, VP1_FEATURES, 3, 1.0).tolist() == [0, 1, 2]


def test_vispruner_vp3_odd_remainder_fixed_and_official():
    attention = torch.tensor([.40, .30, .01, .10, .05, .02, .08, .03, .06])
    features = unit_vectors([0, 90, 30, 200, 100, 210, 180, 300, 40])
    assert vispruner_select(attention, features, 6, 0.34).tolist() == [0, 1, 4, 5, 6, 7]
    assert vispruner_select(attention, features, 6, 0.34, parity=True).tolist() == [0, 1, 4, 5, 6]  # 5, not 6


def test_vispruner_split_is_the_floor_of_the_float_product():
    # 50 * 0.58 = 28.999999999999996: 28 important tokens. Patch 28, the 29th by attention, is an exact duplicate of
    # patch 29, so it is kept only if the split rounds (29 important); with the floor it is the first duplicate dropped
    attention = torch.arange(100, 0, -1).float()  # patch i has the (i+1)-th highest attention
    features = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    features[28] = features[29]
    kept = vispruner_select(attention, features, 50, 0.58).tolist()
    assert len(kept) == 50 and set(range(28)) <= set(kept) and 28 not in kept
    assert 28 in vispruner_select(attention, features, 50, 0.59).tolist()  # int(29.5) = 29 important


def test_vispruner_vp4_official_crash_grid_and_fixed_port_always_returns_t():
    g = torch.Generator().manual_seed(0)
    crashes = []
    for t in (4, 8, 16, 32, 48, 64, 96, 100, 128, 144, 192, 256, 320):
        for rho in (0.0, 0.25, 0.5, 0.75):
            attention, features = torch.rand(576, generator=g), torch.randn(576, 32, generator=g)
            kept = vispruner_select(attention, features, t, rho)
            assert len(kept) == t and kept.unique().numel() == t
            try:
                vispruner_select(attention, features, t, rho, parity=True)
            except RuntimeError:
                crashes.append((t, rho))
    assert crashes == [(4, .25), (4, .5), (4, .75), (8, .25), (8, .5), (8, .75), (16, .75), (100, .25), (100, .75)]


# --- MMTok (spec §1.9) ---------------------------------------------------------------------------------------
MT1_V = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
MT1_T = torch.tensor([[0.6, 0.8]])


def test_mmtok_mt1_coverage_rows_and_greedy_picks():
    c = coverage_matrix(MT1_T, MT1_V, MT1_V, tau_t=0.02, tau_v=0.2, alpha=0.5)
    torch.testing.assert_close(c[0], torch.tensor([0.0, 0.99966, 0.00034, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(c[1:].sum(0) / 0.5, torch.tensor([0.24452, 0.26268, 0.24302, 0.24978]), atol=1e-5, rtol=0)
    assert greedy_coverage(c, 2).tolist() == [1, 3]
    assert greedy_coverage(c, 3).tolist() == [1, 3, 2]  # selection order; kept [1, 2, 3]


def test_mmtok_mt2_ties_go_to_the_lowest_index():
    c = coverage_matrix(MT1_T, MT1_V, MT1_V, 0.02, 0.2, alpha=0.0)
    assert greedy_coverage(c, 2).sort().values.tolist() == [0, 1]


def test_mmtok_mt3_exhausted_candidates_fixed_and_official():
    c = coverage_matrix(MT1_T, MT1_V, MT1_V, 0.02, 0.2, 0.5)
    excluded = torch.tensor([0, 1, 2])
    assert greedy_coverage(c, 2, excluded).tolist() == [3]
    assert greedy_coverage(c, 2, excluded, parity=True).sort().values.tolist() == [0, 3]  # an excluded token


def test_mmtok_mt4_text_reads_the_projected_space_and_vision_the_patches():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.28, 0.96], [0.96, 0.28]])
    w = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [0.28, 0.96]])
    t = torch.tensor([[0.0, 1.0]])
    assert greedy_coverage(coverage_matrix(t, v, w, 0.02, 0.2, 0.5), 2).sort().values.tolist() == [1, 2]
    assert greedy_coverage(coverage_matrix(t, v, v, 0.02, 0.2, 0.5), 2).sort().values.tolist() == [0, 1]
    assert greedy_coverage(coverage_matrix(t, w, v, 0.02, 0.2, 0.5), 2).sort().values.tolist() == [0, 2]


def test_mmtok_mt5_two_text_tokens():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert greedy_coverage(coverage_matrix(t, MT1_V, MT1_V, 0.02, 0.2, 0.5), 2).tolist() == [0, 2]


def test_mmtok_mt6_keywords():
    assert keywords("What is the color of the man's shirt?" + POST) == "color of man s shirt"
    assert keywords("Which option is correct?\nA. cat\nB. dog\nAnswer with the option's letter from the given "
                    "choices directly.") == "option correct cat B dog"
    assert keywords("What is it?") == "What is it?"  # every word a stop word: the text unchanged


# --- CDPruner (spec §2.8) ------------------------------------------------------------------------------------
CD1_X = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])


def test_cdpruner_cd1_sign_flipped_relevance():
    r = min_max(-torch.tensor([0.1, 0.3, 0.2]))
    torch.testing.assert_close(r, torch.tensor([1.000005, 0.000005, 0.500005]), atol=1e-6, rtol=0)
    assert greedy_map(kernel(CD1_X, r), 2, r).tolist() == [0, 2]
    plain = min_max(torch.tensor([0.1, 0.3, 0.2]))  # without the flip
    assert greedy_map(kernel(CD1_X, plain), 2, plain).sort().values.tolist() == [1, 2]


def test_cdpruner_cd2_diversity_and_the_rank_fix():
    x = torch.tensor([[1.0, 0, 0], [0.99, 0.141, 0], [0, 1.0, 0], [0, 0, 1.0]])
    r = torch.tensor([1.0, 0.9, 0.5, 0.4])
    assert greedy_map(kernel(x, r), 3, r).tolist() == [0, 2, 3]  # the near-duplicate of 0 comes last
    assert greedy_map(kernel(x, r), 4, r).tolist() == [0, 2, 3, 1]


def test_cdpruner_past_the_numerical_rank_fills_by_relevance_not_nan():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # three copies: rank 2
    r = torch.tensor([0.5, 0.9, 0.7, 0.2])
    kept = greedy_map(kernel(x, r), 4, r)
    assert kept.tolist() == [1, 3, 2, 0]  # 1 (most relevant), 3 (orthogonal), then by relevance: 2, 0
    official = greedy_map(kernel(x, r), 4, r, parity=True)
    assert len(official.unique()) < 4  # NaN past the rank: argmax repeats a token


def test_cdpruner_cd3_min_max_over_every_crop_of_the_image():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    scores = -torch.tensor([0.10, 0.12, 0.11, 0.30, 0.50, 0.40])  # crop 0 then crop 1, one image
    r = min_max(scores)
    torch.testing.assert_close(r[:3], torch.tensor([1.0, 0.95, 0.975]), atol=1e-5, rtol=0)
    assert greedy_map(kernel(x, r[:3]), 2, r[:3]).sort().values.tolist() == [0, 1]
    assert greedy_map(kernel(x, r[3:]), 2, r[3:]).sort().values.tolist() == [0, 2]
    per_crop = min_max(scores[:3])
    assert greedy_map(kernel(x, per_crop), 2, per_crop).sort().values.tolist() == [0, 2]


def test_cdpruner_constant_relevance_is_one_not_nan():
    assert min_max(torch.full((4,), 0.3)).tolist() == [1.0] * 4
    assert not torch.isfinite(min_max(torch.full((4,), 0.3), parity=True)).any()  # 1e-6 / 0


@pytest.mark.parametrize("length,segments,padding", [(20, 1, 57), (77, 1, 0), (78, 2, 76), (100, 2, 54), (160, 3, 71)])
def test_cdpruner_cd4_text_segments(length, segments, padding):
    ids, mask = text_segments(list(range(1, length + 1)))
    assert ids.shape == (segments, 77) and int((mask == 0).sum()) == padding == int((ids == 0).sum())
    assert ids[mask.bool()].tolist() == list(range(1, length + 1))


def test_cdpruner_question_drops_the_post_prompt():
    assert question("Is there a cat?" + POST) == "Is there a cat?"


# --- the instruction before the LLM --------------------------------------------------------------------------
class Recorder(TokenPruner):
    """Records what each unit's instruction is at one pre-LLM site (keeps everything)."""

    name = "instruction_recorder"

    def __init__(self, site=Site("projector_output")):
        super().__init__(None)
        self.site, self.seen = site, []

    def sites(self):
        return [self.site]

    def signals(self, site):
        return Signals(instruction=True)

    def prune(self, ctx):
        self.seen = [(ctx.instruction(u).text, ctx.instruction(u).image) for u in range(ctx.num_units)]
        return Keep([torch.arange(int(n)) for n in ctx.lengths])


QUESTIONS3 = ["Is there a red circle in the image?", "What colour is the square?", "How many objects are there?"]


@pytest.fixture(scope="module", params=["tiny", "tiny-next", "tiny-qwen2-vl"])
def family(request):
    model, processor = load_model(str(tiny_model_dir(request.param)))
    return request.param, model, processor


def inputs(processor, questions, sizes=((112, 112), (224, 112), (112, 224))):
    texts = [prompt(processor, q + POST) for q in questions]
    images = [synthetic_image(7 + i, sizes[i % len(sizes)]) for i in range(len(questions))]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_reader_isolates_the_users_text_from_each_family_template(family):
    _, _, processor = family
    x = inputs(processor, QUESTIONS3)
    reader = InstructionReader(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for b, q in enumerate(QUESTIONS3):
        ids = x["input_ids"][b][x["attention_mask"][b].bool()].tolist()
        assert reader.text(ids, image_id) == q + POST


TURNS = {  # chat content -> the instruction the reader must find (images removed, only the last user turn)
    "image first": ([[{"type": "image"}, {"type": "text", "text": "Is it red?" + POST}]], "Is it red?" + POST),
    "text first": ([[{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "is it red?"}]],
                   "Look: is it red?"),
    "two images": ([[{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is red?"}]], "Which is red?"),
    "multi-turn": ([[{"type": "image"}, {"type": "text", "text": "First?"}], [{"type": "text", "text": "yes"}],
                    [{"type": "text", "text": "Second?"}]], "Second?"),
}


@pytest.mark.parametrize("case", list(TURNS))
def test_reader_finds_the_last_user_turns_text_whatever_the_layout(family, case):
    _, _, processor = family
    turns, expected = TURNS[case]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(turns)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [synthetic_image(i) for i, c in enumerate(c for t in turns for c in t) if c["type"] == "image"]
    reader = InstructionReader(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for suffix in ("", " yes"):  # an appended answer (likelihood scoring, no-cache decoding) never leaks in
        ids = processor(images=images, text=[text + suffix], return_tensors="pt")["input_ids"][0].tolist()
        assert reader.text(ids, image_id) == expected


def test_reader_reads_the_pocket_models_word_level_decoding():
    from prunekit.pocket.model import build_pocket

    _, processor = build_pocket()
    ids = processor(images=[synthetic_image(0, 336)], text=[prompt(processor, "Is there a red circle?")],
                    return_tensors="pt")["input_ids"][0].tolist()
    text = InstructionReader(processor).text(ids, processor.tokenizer.convert_tokens_to_ids("<image>"))
    assert text.split() == ["Is", "there", "a", "red", "circle?"]  # the word-level decoder's spaces do not matter


def test_reader_refuses_a_prompt_it_cannot_read(family):
    _, _, processor = family
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    raw = processor.tokenizer(f"{processor.image_token} what is this?", add_special_tokens=False)["input_ids"]
    with pytest.raises(PruningError, match="handle.instructions"):
        InstructionReader(processor).text(raw, image_id)  # no chat template in the prompt
    with pytest.raises(PruningError, match="handle.instructions"):
        InstructionReader(processor.tokenizer).text(raw, image_id)  # a bare tokenizer: no template to read


def test_several_images_per_sample_share_their_samples_instruction():
    model, processor = load_model(str(tiny_model_dir("tiny")))
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n + [
        {"type": "text", "text": q}]}], add_generation_prompt=True) for n, q in ((2, "two?"), (1, "one?"))]
    x = processor(images=[synthetic_image(i) for i in range(3)], text=texts, return_tensors="pt", padding=True)
    recorder = Recorder()
    with torch.no_grad(), prunekit.attach(model, recorder, processor=processor):
        model(**x)
    assert recorder.seen == [("two?", 0), ("two?", 1), ("one?", 2)]


def test_a_later_call_never_reads_an_earlier_calls_prompt(family):
    _, model, processor = family
    x = inputs(processor, QUESTIONS3[:1])
    with torch.no_grad(), prunekit.attach(model, Recorder(), processor=processor) as handle:
        model(**x)
        assert handle._prompt == (None, None)
        vision = {k: v for k, v in x.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
        with pytest.raises(PruningError, match="no input_ids"):
            model.model.get_image_features(**vision)


def test_each_unit_gets_its_own_samples_instruction_in_a_padded_batch(family):
    name, model, processor = family
    x = inputs(processor, QUESTIONS3)
    assert (x["attention_mask"] == 0).any()
    recorder = Recorder()
    with torch.no_grad(), prunekit.attach(model, recorder, processor=processor):
        model.generate(**x, max_new_tokens=1, do_sample=False)
    texts = [t for t, _ in recorder.seen]
    images = [i for _, i in recorder.seen]
    if name == "tiny-next":  # several crops per image, all with their sample's text and image number
        assert len(texts) > 3 and sorted(set(images)) == [0, 1, 2]
        assert all(texts[u] == QUESTIONS3[images[u]] + POST for u in range(len(texts)))
    else:
        assert texts == [q + POST for q in QUESTIONS3] and images == [0, 1, 2]


@pytest.mark.parametrize("site", [Site("vision_layer", 1), Site("vision_output")], ids=str)
def test_every_pre_llm_site_gets_the_instruction(family, site):
    _, model, processor = family
    recorder = Recorder(site)
    with torch.no_grad(), prunekit.attach(model, recorder, processor=processor):
        model(**inputs(processor, QUESTIONS3))
    assert {(t, i) for t, i in recorder.seen} == {(q + POST, i) for i, q in enumerate(QUESTIONS3)}


def test_explicit_instructions_replace_the_prompts_text(family):
    _, model, processor = family
    x = inputs(processor, QUESTIONS3[:2])
    recorder = Recorder()
    with torch.no_grad(), prunekit.attach(model, recorder, processor=processor) as handle:
        with handle.instructions(["first", "second"]):
            model(**x)
        assert {t for t, i in recorder.seen if i == 0} == {"first"} and {t for t, i in recorder.seen if i == 1} == {"second"}
        with handle.instructions(["only one"]), pytest.raises(PruningError, match="one per row"):
            model(**x)


def test_a_strategy_that_needs_the_instruction_is_refused_without_a_source(family):
    _, model, processor = family
    with pytest.raises(PruningError, match="processor=processor"):
        prunekit.attach(model, Recorder())
    x = inputs(processor, QUESTIONS3[:1])
    embeds = model.get_input_embeddings()(x["input_ids"])
    rest = {k: v for k, v in x.items() if k != "input_ids"}
    with torch.no_grad(), prunekit.attach(model, Recorder(), processor=processor):
        with pytest.raises(PruningError, match="no input_ids"):
            model(inputs_embeds=embeds, **rest)


def test_mmtok_text_rows_are_the_keyword_embeddings(family):
    name, model, processor = family
    x = inputs(processor, ["What is the color of the man's shirt?"])
    tok = processor.tokenizer
    captured = {}
    strategy = prunekit.build_strategy("mmtok", budget=4)
    original = strategy.text_embeddings

    def spy(ctx, unit):
        captured[unit] = original(ctx, unit)
        return captured[unit]

    strategy.text_embeddings = spy
    with torch.no_grad(), prunekit.attach(model, strategy, processor=processor):
        model(**x)
    if name == "tiny-qwen2-vl":  # Qwen: "Question: " + the instruction, unfiltered, no BOS
        ids = tok("Question: What is the color of the man's shirt?" + POST, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(["color", "of", "man", "s", "shirt"], is_split_into_words=True)["input_ids"]
        ids = ids[1:] if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else ids
    expected = model.get_input_embeddings().weight[torch.tensor(ids)]
    assert captured and all(torch.equal(rows, expected) for rows in captured.values())


# --- budgets, refusals ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny576():
    return load_model(str(tiny_model_dir("tiny-576")))


@pytest.mark.parametrize("name", ["vispruner", "mmtok", "cdpruner"])
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_budget_is_exact_per_image_at_576_tokens(tiny576, name, budget):
    model, processor = tiny576
    x = inputs(processor, QUESTIONS3[:2], sizes=((336, 336),))
    knobs = {"text_encoder": str(tiny_clip_text_dir())} if name == "cdpruner" else {}
    with torch.no_grad(), prunekit.attach(model, name, budget=budget, processor=processor, **knobs) as h:
        out = model(**x)
    assert h.trace.n_vanilla == [576, 576] and h.trace.n_in == [budget, budget] == h.trace.n_final
    assert out.logits.shape[1] == x["input_ids"].shape[1] - (576 - budget)
    assert all(h.trace.kept_positions(b).unique().numel() == budget for b in range(2))


def test_cdpruner_refuses_a_tower_without_a_matching_clip(tmp_path, tiny576):
    model, processor = tiny576
    with pytest.raises(UnsupportedModelError, match="none is configured"):
        prunekit.attach(model, "cdpruner", text_encoder=None, processor=processor)
    clip, tok = build_tiny_clip_text(vision_width=32)  # the tiny towers are 64 wide
    clip.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="vision width 32, this tower has width 64"):
        prunekit.attach(model, "cdpruner", text_encoder=str(tmp_path), processor=processor)
    with pytest.raises(UnsupportedModelError, match="could not be loaded"):
        prunekit.attach(model, "cdpruner", text_encoder=str(tmp_path / "missing"), processor=processor)


@pytest.mark.parametrize("name", ["vispruner", "mmtok", "cdpruner"])
def test_llava_next_budget_is_split_over_the_crops(name):
    model, processor = load_model(str(tiny_model_dir("tiny-next")))
    x = inputs(processor, QUESTIONS3)
    knobs = {"text_encoder": str(tiny_clip_text_dir())} if name == "cdpruner" else {}
    with torch.no_grad(), prunekit.attach(model, name, budget=40, processor=processor, **knobs) as h:
        model(**x)
    units = h.adapter.budget_units()  # the most crops an image can have: 40 // units tokens per crop
    assert units > 1 and h.trace.vision_units != [1, 1, 1]
    decided = next(e for e in h.trace.events if e.site == str(h.sites[-1]))  # the site that selects
    assert decided.n_out == [(40 // units) * crops for crops in h.trace.vision_units]  # exact per crop
    # no row newlines are kept; the model's own unpadding may still drop a kept token of the letterbox
    assert all(n <= k for n, k in zip(h.trace.n_in, decided.n_out))


def test_cdpruner_normalises_relevance_over_each_images_crops(monkeypatch):
    import prunekit.strategies.cdpruner as cd

    seen = []
    original = cd.min_max
    monkeypatch.setattr(cd, "min_max", lambda scores, parity=False: seen.append(len(scores)) or original(scores, parity))
    model, processor = load_model(str(tiny_model_dir("tiny-next")))
    x = inputs(processor, QUESTIONS3[:2], sizes=((224, 224), (112, 112)))  # 5 crops and 3 crops
    with torch.no_grad(), prunekit.attach(model, "cdpruner", budget=40, processor=processor,
                                          text_encoder=str(tiny_clip_text_dir())) as h:
        model(**x)
    crop_tokens = (112 // 14) ** 2  # every crop of the tiny LLaVA-NeXT is 8 x 8 patches
    assert h.trace.vision_units[0] != h.trace.vision_units[1]
    assert seen == [crop_tokens * crops for crops in h.trace.vision_units]  # one min-max per image, all its crops
