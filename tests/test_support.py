"""prunekit.support_matrix(): every strategy runs on a family or attach() refuses it, and the docs say which."""
from pathlib import Path

import prunekit
from prunekit.support import support_matrix, support_table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "support.md"


def test_matrix_covers_every_strategy_and_family_and_the_docs_copy_is_current():
    matrix = support_matrix()
    assert set(prunekit.list_strategies()) <= set(matrix)
    families = {"llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl", "internvl", "qwen3-vl", "llava-onevision", "qwen3.5"}
    assert all(set(cells) == families for cells in matrix.values())
    assert support_table(matrix) in DOCS.read_text(), "docs/support.md is stale: python -m prunekit.support"


def test_refusals_name_the_strategy_the_family_and_why():
    matrix = support_matrix()
    assert matrix["visionzip"]["qwen2-vl"] and "[CLS]" in matrix["visionzip"]["qwen2-vl"]
    assert matrix["pooling"]["qwen2.5-vl"] and "projector_output" in matrix["pooling"]["qwen2.5-vl"]
    assert matrix["flowcut"] == dict.fromkeys(matrix["flowcut"])  # FlowCut runs everywhere (two stages off LLaVA-1.5)
    assert matrix["visionzip"]["internvl"] and "cls=false" in matrix["visionzip"]["internvl"]
    assert matrix["visionzip (cls=false)"]["internvl"] is None and matrix["cdpruner"]["internvl"]
    for row, cells in matrix.items():
        for family, reason in cells.items():
            if reason is not None:
                assert family in reason and "cannot run" in reason, (row, family, reason)
