from pathlib import Path

import pytest
from omegaconf import OmegaConf

import prunekit
from prunekit import Keep, Site, TokenPruner, build_strategy, list_strategies, register_strategy
from prunekit.registry import _REGISTRY


def test_builtin_strategies_are_listed_sorted():
    names = list_strategies()
    assert names == sorted(names)
    assert {"keep_all", "random", "pooling"} <= set(names)
    assert list_strategies("rand*") == ["random"]


def test_build_by_name_kwargs_dict_and_dictconfig():
    a = build_strategy("random", budget=32)
    b = build_strategy({"name": "random", "budget": 32})
    c = build_strategy(OmegaConf.create({"name": "random", "budget": 32, "stage": "llm_layer", "layer": 3}))
    assert a.budget.tokens == b.budget.tokens == 32
    assert a.sites() == [Site("vision_output")]
    assert c.sites() == [Site("llm_layer", 3)] and c.position_policy == "original"
    assert c.params()["budget"] == 32 and c.params()["convention"] == "n_final"


def test_unknown_strategy_lists_registered_names_and_closest_match():
    with pytest.raises(KeyError) as err:
        build_strategy("randon")
    msg = str(err.value)
    assert "'random'" in msg and "Did you mean" in msg
    for name in list_strategies():
        assert name in msg


def test_config_without_name_and_bad_knob_are_clear():
    with pytest.raises(KeyError, match="'name'"):
        build_strategy({"budget": 3})
    with pytest.raises(TypeError, match="cannot build strategy 'random'"):
        build_strategy("random", budgett=3)


def test_duplicate_name_is_an_error_and_non_pruners_are_refused():
    @register_strategy("_test_dup")
    class One(TokenPruner):
        def sites(self):
            return [Site("vision_output")]

        def prune(self, ctx):
            return Keep([])

    try:
        with pytest.raises(ValueError, match="already registered"):
            @register_strategy("_test_dup")
            class Two(One):
                pass
        with pytest.raises(TypeError, match="TokenPruner subclass"):
            register_strategy("_test_bad")(object)
    finally:
        _REGISTRY.pop("_test_dup")


@pytest.mark.parametrize("budget", [0, -5])
def test_non_positive_budget_is_refused(budget):
    with pytest.raises(ValueError, match="budget must be > 0"):
        build_strategy("random", budget=budget)


def test_fractional_budget_is_refused():
    with pytest.raises(TypeError, match="whole number"):
        build_strategy("pooling", budget=12.5)


def test_unknown_stage_or_policy_is_refused():
    with pytest.raises(ValueError, match="random: unknown stage='decoder'; the stages are vision_layer, "
                                         "vision_output, projector_output, llm_layer"):
        build_strategy("random", stage="decoder")
    with pytest.raises(ValueError, match="needs layer="):
        build_strategy("pooling", stage="vision_layer")
    with pytest.raises(ValueError, match="unknown positions='weird'; choose one of \\('compact', 'original'\\)"):
        build_strategy("random", budget=8, positions="weird")


def test_every_registered_builtin_has_a_config_that_builds():
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs" / "strategy"
    names = {p.stem for p in configs.glob("*.yaml")}
    assert {"keep_all", "random", "pooling"} <= names
    for path in configs.glob("*.yaml"):
        strategy = build_strategy(OmegaConf.load(path))
        assert strategy.name == path.stem


def test_every_strategy_config_states_its_constructor_defaults():
    """configs/strategy/<name>.yaml and the constructor define the same knobs with the same defaults (one
    definition: the YAML may only differ where a paper default is the point, and then the test says so)."""
    import inspect

    import yaml

    from prunekit.registry import get_strategy_class

    root = Path(__file__).resolve().parents[1] / "configs" / "strategy"
    for name in prunekit.list_strategies():
        config = yaml.safe_load((root / f"{name}.yaml").read_text())
        params = {k: p for k, p in inspect.signature(get_strategy_class(name).__init__).parameters.items()
                  if k != "self" and not (k == "ratio" and name in ("fastv", "divprune"))}  # deprecated aliases
        assert set(config) - {"name"} == set(params), name
        for knob, p in params.items():
            default = list(p.default) if isinstance(p.default, tuple) else p.default
            if (name, knob) == ("cdpruner", "text_encoder"):  # the model config names the CLIP matching its tower
                assert config[knob] == f"${{oc.select:model.clip_text_encoder,{default}}}"
                continue
            assert config[knob] == default, f"{name}.{knob}: yaml {config[knob]!r} != constructor {default!r}"
