"""The transformers seam: a broken seam is refused with a SeamError, never turned into a result; a failed
attach leaves the model as it was; the probe applies causality by sdpa's own rule; the tested range."""
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import prunekit
from prunekit import compat
from prunekit.adapters.llava import LlavaAdapter
from prunekit.errors import SeamError
from prunekit.runtime.probe import AttentionProbe
from prunekit.signals import AttentionRows
from helpers import batch, greedy, no_cache_adapter, use_adapter

attach_module = importlib.import_module("prunekit.runtime.handle")
pytestmark = pytest.mark.contract
ROOT = Path(__file__).resolve().parents[1]


# --- a broken seam ---------------------------------------------------------------------------------------
_NoCache = no_cache_adapter()


class _DropsCreatedCache(LlavaAdapter):
    """Passes the cache it created under a name the model does not take: the model fills its own."""

    def write_lm_call(self, call, kwargs):
        cache, call.cache = call.cache, None
        super().write_lm_call(call, kwargs)
        call.cache = cache


class _NoSpan(LlavaAdapter):
    """Stops finding the image placeholders."""

    def image_token_mask(self, input_ids, inputs_embeds):
        return torch.zeros(input_ids.shape, dtype=torch.bool)


class _OtherTower(LlavaAdapter):
    """Hooks a vision tower the model never calls: the features reach the LM by a path it does not know."""

    _unused = nn.Identity()

    @property
    def vision_tower(self):
        return self._unused

    @property
    def vision_layers(self):
        return self.model.model.vision_tower.encoder.layers


@pytest.fixture
def broken(monkeypatch):
    return lambda cls: use_adapter(monkeypatch, cls)


@pytest.mark.parametrize("cls,strategy,match", [
    (_NoCache, "fastv", "a decode step looked like a prefill"),
    (_NoCache, "random", "a decode step looked like a prefill"),
    (_DropsCreatedCache, "fastv", "KV cache prunekit passed to the language model was left empty"),
    (_NoSpan, "random", "no visual span was found"),
    (_OtherTower, "fastv", "without going through the vision tower"),
])
def test_a_broken_seam_gives_an_error_never_a_result(model, processor, broken, cls, strategy, match):
    broken(cls)
    x = batch(processor, [0, 1])
    with prunekit.attach(model, strategy, budget=16):
        with pytest.raises(SeamError, match=match) as err:
            greedy(model, x, steps=3)
    message = str(err.value)
    assert f"transformers {compat.transformers_version()}" in message and compat.TESTED_RANGE in message


def test_the_unbroken_seam_prunes_in_prefill_and_decodes_from_its_cache(model, processor):
    x = batch(processor, [0, 1])
    with prunekit.attach(model, "fastv", budget=16) as handle:
        greedy(model, x, steps=3)
        assert handle.trace.n_in == [64, 64] and handle.trace.n_final == [16, 16]
        assert handle.decode_steps == 2  # two decode steps after the one prefill (3 new tokens)


def test_the_cache_kwarg_follows_the_5_24_rename(model):
    renamed = Version(compat.transformers_version()) >= Version("5.24")  # the release that renamed it
    expected = "cache" if renamed else "past_key_values"
    assert compat.cache_kwarg(model.model.language_model) == expected
    assert compat.cache_kwarg(model.model.language_model.layers[0]) == expected


# --- a failed attach leaves no trace ----------------------------------------------------------------------
def _state(model):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    impls = (model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation)
    return hooks, impls, "generate" in model.__dict__


def _fail_layer_hook(model, monkeypatch):
    layer = model.model.language_model.layers[3]
    monkeypatch.setattr(layer, "register_forward_pre_hook", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))


def _fail_probe_after_switching_backends(model, monkeypatch):
    install = AttentionProbe.install

    def failing(self):
        install(self)
        raise RuntimeError("boom")
    monkeypatch.setattr(AttentionProbe, "install", failing)


def _fail_generate_wrapper(model, monkeypatch):
    monkeypatch.setattr(attach_module.PruningHandle, "_guarded_generate",
                        lambda self, g: (_ for _ in ()).throw(RuntimeError("boom")))


def _fail_feature_layer_hook(model, monkeypatch):
    layer = LlavaAdapter(model).vision_layers[LlavaAdapter(model).vision_feature_layer]
    monkeypatch.setattr(layer, "register_forward_hook", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))


@pytest.mark.parametrize("strategy,knobs,fail", [
    ("fastv", {"budget": 16}, _fail_layer_hook),
    ("fastv", {"budget": 16}, _fail_probe_after_switching_backends),
    ("flowcut", {"budget": 16}, _fail_probe_after_switching_backends),
    ("random", {"budget": 16}, _fail_generate_wrapper),
    ("visionzip", {"budget": 16}, _fail_feature_layer_hook),
], ids=["decoder-hook", "probe-llm", "probe-vision", "generate-wrapper", "feature-layer-hook"])
def test_a_failed_attach_leaves_the_model_as_never_attached(model, processor, monkeypatch, strategy, knobs, fail):
    x = batch(processor, [0, 1])
    before = _state(model)
    logits = model(**x).logits
    tokens, _ = greedy(model, x, steps=3)
    with monkeypatch.context() as m:
        fail(model, m)
        with pytest.raises(RuntimeError, match="boom"):
            prunekit.attach(model, strategy, **knobs)
    assert _state(model) == before
    assert torch.equal(model(**x).logits, logits)
    assert torch.equal(greedy(model, x, steps=3)[0], tokens)
    prunekit.attach(model, strategy, **knobs).detach()  # not left registered as attached


# --- the probe's causality follows sdpa ------------------------------------------------------------------
def _probe_first_row(module, query, key, mask, **kwargs):
    probe = AttentionProbe(queries=lambda m: (None, None))
    row = AttentionRows("first", "mean")
    probe.watch(module, row)
    probe.install()
    try:
        out, _ = ALL_ATTENTION_FUNCTIONS[compat.attn_implementation(module.config)](
            module, query, key, key, mask, scaling=1.0, **kwargs)
    finally:
        probe.remove()
    return probe.rows[(module, row)][0], out


@pytest.mark.parametrize("call_causal,module_causal,expect_causal", [
    (None, True, True), (None, False, False), (True, False, True), (False, True, False),
])
def test_the_probe_applies_causality_as_sdpa_does_when_there_is_no_mask(model, call_causal, module_causal,
                                                                        expect_causal):
    module = model.model.language_model.layers[0].self_attn
    assert compat.attn_implementation(module.config) == "sdpa"
    torch.manual_seed(0)
    heads, kv_heads = module.config.num_attention_heads, module.config.num_key_value_heads
    q, k = torch.randn(1, heads, 5, module.head_dim), torch.randn(1, kv_heads, 5, module.head_dim)
    old = module.is_causal
    module.is_causal = module_causal
    try:
        kwargs = {} if call_causal is None else {"is_causal": call_causal}
        row, out = _probe_first_row(module, q, k, None, **kwargs)
    finally:
        module.is_causal = old
    k_rep = k.repeat_interleave(heads // kv_heads, 1)
    if expect_causal:  # the first query sees only the first key, and sdpa's output is its value
        assert torch.equal(row, torch.tensor([1.0, 0, 0, 0, 0]))
        torch.testing.assert_close(out[0, 0], k_rep[0, :, 0])
    else:
        torch.testing.assert_close(row, _first_row(q, k_rep))


def _first_row(q, k_rep):
    """Head-mean softmax of the first query over all keys, scaling 1, by hand."""
    return torch.softmax(q[0, :, :1] @ k_rep[0].transpose(-1, -2), -1)[:, 0].mean(0)


def test_an_explicit_mask_wins_over_causality(model):
    module = model.model.language_model.layers[0].self_attn
    heads, kv_heads = module.config.num_attention_heads, module.config.num_key_value_heads
    q, k = torch.randn(1, heads, 3, module.head_dim), torch.randn(1, kv_heads, 3, module.head_dim)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)  # everything visible
    row, _ = _probe_first_row(module, q, k, mask, is_causal=True)
    torch.testing.assert_close(row, _first_row(q, k.repeat_interleave(heads // kv_heads, 1)))


# --- the tested range ----------------------------------------------------------------------------------------
def test_pyproject_declares_the_tested_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if re.match(r"transformers\b", d)]
    assert spec == f"transformers{compat.TESTED_RANGE}"


def test_an_untested_version_warns_once_and_is_not_refused(monkeypatch):
    assert compat.in_tested_range("5.17.0") and compat.in_tested_range("5.25.0")
    assert not compat.in_tested_range("5.26.0") and not compat.in_tested_range("5.16.1")
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    compat.warn_if_untested.cache_clear()
    with pytest.warns(UserWarning, match="5.99.0, outside its tested range transformers>=5.17,<5.26"):
        assert compat.warn_if_untested()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.warn_if_untested()  # once per process: the cached answer, no second warning
    compat.warn_if_untested.cache_clear()


# --- one seam: only the adapters and prunekit/compat.py spell transformers names ---------------------------
KWARGS = {"past_key_values", "cache", "cache_position", "attention_mask", "position_ids", "position_embeddings",
          "inputs_embeds", "input_ids", "pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw",
          "grid_thw", "cu_seqlens", "cu_window_seqlens", "max_seqlen", "use_cache", "labels", "num_beams",
          "assistant_model", "prompt_lookup_num_tokens", "prefill_chunk_size", "cache_implementation",
          "generation_config", "mm_encoder_outputs", "hidden_states", "scaling", "is_causal", "output_attentions",
          "use_kernels", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "head_dim"}
ATTRIBUTES = {"_attn_implementation", "_attn_implementation_internal", "past_key_values", "get_seq_length",
              "q_proj", "k_proj", "v_proj", "eager_attention_forward", "apply_rotary_pos_emb", "is_causal",
              "scaling", "head_dim", "logits"}
BEYOND_THE_SEAM = sorted([*(ROOT / "prunekit" / "runtime").glob("*.py"), ROOT / "prunekit" / "signals.py",
                          *(ROOT / "strategies").glob("*.py")])


def _transformers_names(path: Path) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in KWARGS:
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in ATTRIBUTES and not (
                isinstance(node.value, ast.Name) and node.value.id in ("call", "request", "attention", "self")):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if path.parent.name == "strategies" and any(m.split(".")[0] == "transformers" for m in modules):
                found.append(f"{path.name}:{node.lineno} imports transformers")
    return found


@pytest.mark.parametrize("path", BEYOND_THE_SEAM, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_transformers_name_is_spelled_beyond_the_seam(path):
    assert _transformers_names(path) == []


def test_the_scan_finds_a_spelled_name(tmp_path):
    spy = tmp_path / "spy.py"
    spy.write_text("def f(kwargs, model):\n    return kwargs.get('past_key_values'), model.config._attn_implementation\n")
    assert sorted(_transformers_names(spy)) == ["spy.py:2 'past_key_values'", "spy.py:2 ._attn_implementation"]


# transformers' internals (not its public model-input API: input_ids, pixel_values, ... from the processor)
INTERNAL = {"past_key_values", "cache_position", "position_embeddings", "cu_seqlens", "cu_window_seqlens", "max_seqlen",
            "_attn_implementation", "_attn_implementation_internal", "output_attentions", "mm_encoder_outputs",
            "use_kernels", "q_proj", "k_proj", "v_proj", "eager_attention_forward", "apply_rotary_pos_emb",
            "get_seq_length", "rotary_emb", "rotary_pos_emb", "patch_embed", "pre_layrnorm", "embed_tokens", "lm_head",
            "visual_pos_masks", "deepstack_visual_embeds", "deepstack_visual_indexes", "deepstack_merger_list",
            "mrope_interleaved", "vision_aspect_ratio", "downsample_ratio", "pixel_shuffle", "linear_attn"}
# tiny.py and bench/shapes.py build models from configs; processors.py subclasses
SEAM = {"compat.py", "tiny.py", "processors.py", "shapes.py"}
EVERYWHERE_ELSE = sorted(p for p in (ROOT / "prunekit").rglob("*.py")
                         if p.name not in SEAM and "adapters" not in p.parts and "strategies" not in p.parts)


def _internal_names(path: Path) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in INTERNAL:
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.keyword) and node.arg in INTERNAL:
            found.append(f"{path.name}:{node.lineno} {node.arg}=")
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL and not (
                isinstance(node.value, ast.Name) and node.value.id == "adapter"):  # the adapter's own API
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


@pytest.mark.parametrize("path", EVERYWHERE_ELSE, ids=lambda p: str(p.relative_to(ROOT)))
def test_transformers_internals_are_spelled_only_in_the_seam(path):
    assert _internal_names(path) == []
