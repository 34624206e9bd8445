"""A strategy written outside the repo registers with the decorator and runs with no edit to prunekit."""
import sys
import textwrap

import torch

import prunekit
from prunekit import registry
from helpers import batch

PLUGIN = '''
import torch
from prunekit import Keep, Site, TokenPruner, register_strategy


@register_strategy("{name}")
class FirstK(TokenPruner):
    """Keeps the first `budget` visual tokens of each image, in raster order."""

    def sites(self):
        return [Site("vision_output")]

    def prune(self, ctx):
        return Keep([torch.arange(ctx.target(u)) for u in range(ctx.num_units)])
'''


def _write(tmp_path, module, name):
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(PLUGIN.format(name=name)))


def test_plugin_module_registers_and_runs(tmp_path, monkeypatch, model, processor):
    _write(tmp_path, "my_prunekit_plugin", "first_k")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        prunekit.load_plugins(["my_prunekit_plugin"])
        assert "first_k" in prunekit.list_strategies()
        with prunekit.attach(model, "first_k", budget=10) as h:
            logits = model(**batch(processor, [0])).logits
        assert torch.equal(h.trace.kept_positions(0), torch.arange(10))
        assert h.trace.n_in == [10] and logits.shape[1] == batch(processor, [0])["input_ids"].shape[1] - 54
    finally:
        registry._REGISTRY.pop("first_k", None)
        sys.modules.pop("my_prunekit_plugin", None)


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    _write(tmp_path, "my_ep_plugin", "ep_first_k")
    dist = tmp_path / "my_ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[prunekit.strategies]\nep_first_k = my_ep_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "ep_first_k" in prunekit.list_strategies()
    finally:
        registry._REGISTRY.pop("ep_first_k", None)
        sys.modules.pop("my_ep_plugin", None)
