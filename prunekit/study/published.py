"""Published LLaVA-1.5-7B numbers, for side-by-side reading with a sweep (``compare.py --published <source>``).

Transcribed from the papers' tables (docs/compare.md, published numbers), only the rows that are read there without
ambiguity, only the four benchmarks prunekit runs: GQA and TextVQA accuracy, MME total (perception +
cognition) and POPE F1 (docs/compare.md: "POPE (F1)"), in the papers' units (points; MME score).
``method`` is the prunekit strategy (``keep_all`` = the unpruned model, 576 tokens); ``budget`` is the
paper's "retain N tokens", whose convention differs between papers (docs/strategies.md). The same method
has different numbers in different papers, so one comparison reads one source.

CDPruner's and VisPruner's tables come from the LLaVA eval scripts, whose MME is perception only: their MME cells are
left empty (they have no 192-token row). Left out on purpose: ToMe and other methods prunekit does not implement,
VisionZip's fine-tuned rows, DART's
64-token GQA (garbled in the transcription), FasterVLM (its tables are not in the specs), random / pooling
(arXiv 2502.11501: the budget is not stated).
"""
from __future__ import annotations

import csv
import io

SOURCES = {
    "flowcut_tab1": "docs/strategies/flowcut.md: FlowCut paper Tab. 1, LLaVA-1.5-7B",
    "flowcut_tab8": "docs/strategies/flowcut.md: FlowCut paper Tab. 8 (App. A.3), LLaVA-1.5-7B, 32 tokens",
    "mmtok_tab1": "docs/compare.md: MMTok Table 1 (consensus rows from VisionZip; DivPrune re-run by MMTok)",
    "dart_tab1": "docs/compare.md: DART paper Table 1 (FastV / SparseVLM rows = the consensus set)",
    "cdpruner_tab1": "docs/strategies/cdpruner.md: CDPruner's LLaVA-1.5-7B table (LLaVA eval scripts; its MME is "
                     "perception only, left out)",
    "vispruner_tab1": "docs/strategies/vispruner.md: VisPruner's LLaVA-1.5-7B table (LLaVA eval scripts; its MME is "
                      "perception only, left out)",
}
PAPER_METRIC = {"gqa": "accuracy", "mme": "total", "pope": "f1", "textvqa": "accuracy"}

_TABLE = """source,method,budget,gqa,mme,pope,textvqa
flowcut_tab1,keep_all,,61.9,1862,85.9,58.2
flowcut_tab1,fastv,192,52.7,1612,64.8,52.5
flowcut_tab1,sparsevlm,192,57.6,1721,83.6,56.1
flowcut_tab1,pdrop,192,57.3,1766,82.3,56.5
flowcut_tab1,visionzip,192,59.3,1778,85.2,57.3
flowcut_tab1,flowcut,192,60.1,1836,86.1,57.5
flowcut_tab1,fastv,128,49.6,1490,59.6,50.6
flowcut_tab1,sparsevlm,128,56.0,1696,80.5,54.9
flowcut_tab1,pdrop,128,57.1,1664,82.3,56.6
flowcut_tab1,visionzip,128,57.6,1759,83.2,56.8
flowcut_tab1,flowcut,128,58.5,1792,85.2,57.3
flowcut_tab1,fastv,64,46.1,1256,48.0,47.8
flowcut_tab1,sparsevlm,64,52.7,1505,75.1,51.8
flowcut_tab1,pdrop,64,47.5,1561,55.9,50.6
flowcut_tab1,visionzip,64,55.1,1687,77.0,55.5
flowcut_tab1,flowcut,64,55.6,1744,80.2,55.6
flowcut_tab8,keep_all,,61.9,,85.9,58.2
flowcut_tab8,fastv,32,46.2,,35.7,51.5
flowcut_tab8,visionzip,32,51.5,,68.3,51.7
flowcut_tab8,flowcut,32,52.1,,69.6,53.0
mmtok_tab1,keep_all,,61.9,1862,85.9,58.2
mmtok_tab1,fastv,192,52.7,1612,64.8,52.5
mmtok_tab1,sparsevlm,192,57.6,1721,83.6,56.1
mmtok_tab1,visionzip,192,59.3,1782.6,85.3,57.3
mmtok_tab1,divprune,192,59.97,1762.23,87.00,56.97
mmtok_tab1,fastv,128,49.6,1490,59.6,50.6
mmtok_tab1,sparsevlm,128,56.0,1696,80.5,54.9
mmtok_tab1,visionzip,128,57.6,1761.7,83.2,56.8
mmtok_tab1,divprune,128,59.25,1718.22,86.72,56.06
mmtok_tab1,fastv,64,46.1,1256,48.0,47.8
mmtok_tab1,sparsevlm,64,52.7,1505,75.1,51.8
mmtok_tab1,visionzip,64,55.1,1690,77.0,55.5
mmtok_tab1,divprune,64,57.78,1674.40,85.56,54.69
mmtok_tab1,mmtok,192,60.07,1773.86,86.42,57.68
mmtok_tab1,mmtok,128,59.29,1779.14,86.25,57.03
mmtok_tab1,mmtok,64,58.29,1715.33,85.77,56.01
cdpruner_tab1,keep_all,,61.9,,85.9,58.2
cdpruner_tab1,cdpruner,128,59.9,,87.7,56.2
cdpruner_tab1,cdpruner,64,58.6,,87.5,55.3
cdpruner_tab1,cdpruner,32,57.0,,87.9,53.2
cdpruner_tab1,divprune,64,57.5,,85.5,54.5
cdpruner_tab1,visionzip,64,55.1,,77.0,55.5
vispruner_tab1,keep_all,,62.0,,85.9,58.2
vispruner_tab1,vispruner,128,58.2,,84.6,57.0
vispruner_tab1,vispruner,64,55.4,,80.4,55.8
vispruner_tab1,vispruner,32,52.2,,72.7,53.9
vispruner_tab1,visionzip,64,55.1,,77.0,55.5
dart_tab1,keep_all,,61.9,1862,85.9,58.2
dart_tab1,fastv,192,52.7,1612,64.8,52.5
dart_tab1,sparsevlm,192,57.6,1721,83.6,56.1
dart_tab1,pdrop,192,57.1,1766,82.3,56.1
dart_tab1,dart,192,60.0,1856,82.8,57.4
dart_tab1,fastv,128,49.6,1490,59.6,50.6
dart_tab1,sparsevlm,128,56.0,1696,80.5,54.9
dart_tab1,pdrop,128,56.0,1644,82.3,55.1
dart_tab1,dart,128,58.7,1840,80.1,56.4
dart_tab1,fastv,64,46.1,1256,48.0,47.8
dart_tab1,sparsevlm,64,52.7,1505,75.1,51.8
dart_tab1,pdrop,64,41.9,1092,55.9,45.9
dart_tab1,dart,64,,1765,73.9,54.4
"""


def published_table() -> list[dict]:
    """One dict per (source, method, budget): benchmark -> value (None where the paper has no number)."""
    rows = []
    for row in csv.DictReader(io.StringIO(_TABLE)):
        rows.append({"source": row["source"], "method": row["method"],
                     "budget": int(row["budget"]) if row["budget"] else None,
                     **{b: float(row[b]) if row[b] else None for b in PAPER_METRIC}})
    return rows


def published(source: str, method: str, budget, benchmark: str) -> float | None:
    """The paper's number for ``method`` at ``budget`` (None: the unpruned row) on ``benchmark``, if it has one."""
    if source not in SOURCES:
        raise ValueError(f"unknown published source {source!r}; choose one of {sorted(SOURCES)}")
    for row in published_table():
        if (row["source"], row["method"], row["budget"]) == (source, method, budget):
            return row.get(benchmark)
    return None
