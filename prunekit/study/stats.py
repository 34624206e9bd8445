"""Uncertainty: bootstrap confidence intervals of a run's metrics, and paired tests between two runs.

Resampling is of samples (MME: of images, since ``acc_plus`` scores an image's two questions together), with a
seeded numpy generator, so a table is reproducible.

* CI: the percentile bootstrap interval (``level``, default 95%) of the metric over ``resamples`` resamples.
* Paired test of runs A and B on the samples both scored (matched by ``uid``): the difference A - B, its
  paired-bootstrap CI (both runs resampled with the same draw), and a two-sided permutation p-value: each
  sample's (image's) A and B results are swapped at random, and p = (1 + #{|d_swapped| >= |d|}) / (1 + R).
  Identical runs give d = 0 and p = 1; the smallest p is 1 / (1 + R).

Speed: a resample is a count per sample (or image), so a metric that is a function of per-sample sums is
computed for a whole block of resamples with one matrix product (``_Kernel``): means (accuracy, answer
agreement, KL, the pocket's accuracy per question type), POPE's precision / recall / F1 from its confusion counts, MME's category means. Tests check
these against the benchmark's own ``aggregate`` on resampled records. Any other metric (and MME with an
unpaired question) is recomputed with ``aggregate`` on every resample, which is exact and slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..eval.benchmarks import get_benchmark
from ..eval.metrics import MME_COGNITION, MME_PERCEPTION, mme_parse

LEVEL = 0.95
# benchmark metrics that are fractions: shown in points (x100), as the papers print them; MME scores as they are
SCALE = {"pope": 100.0, "gqa": 100.0, "textvqa": 100.0, "mme": 1.0, "pocket": 100.0}
# (benchmark, metric) pairs that are the plain mean of the per-sample ``score``
MEAN_OF_SCORE = {("pope", "accuracy"), ("gqa", "accuracy"), ("textvqa", "accuracy"), ("pocket", "accuracy")}
FIDELITY = {"answer_agreement": ("agrees_with_vanilla", 100.0), "first_token_kl": ("first_token_kl", 1.0)}
_CHUNK = 200  # resamples per block (bounds memory on 9k-sample benchmarks)


@dataclass(frozen=True)
class Metric:
    """One number of a run, computable from its scored per-sample records."""

    name: str  # a key of the benchmark's aggregate (f1, total, accuracy, ...) or a FIDELITY key
    benchmark: str

    @property
    def scale(self) -> float:
        return FIDELITY[self.name][1] if self.name in FIDELITY else SCALE.get(self.benchmark, 1.0)

    def value(self, records: list[dict]) -> float:
        if self.name in FIDELITY:
            field, scale = FIDELITY[self.name]
            return float(np.mean([float(r[field]) for r in records])) * scale
        return float(get_benchmark(self.benchmark).aggregate(records)[self.name]) * self.scale

    def available(self, records: list[dict]) -> bool:
        return bool(records) and (self.name not in FIDELITY or all(FIDELITY[self.name][0] in r for r in records))


# --- resampling units and fast kernels ----------------------------------------------------------------------
def _clusters(records: list[dict], benchmark: str) -> list[list[int]]:
    """Indices of records resampled together: an MME image's two questions, else each sample alone."""
    if benchmark != "mme":
        return [[i] for i in range(len(records))]
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault((r.get("category"), r.get("question_id")), []).append(i)
    return list(groups.values())


@dataclass
class _Kernel:
    """A metric as a function of per-cluster additive statistics: value = finish(weights @ stats)."""

    stats: np.ndarray  # (clusters, m)
    finish: object  # (R, m) sums -> (R,) values

    def values(self, weights: np.ndarray) -> np.ndarray:
        return self.finish(weights @ self.stats)


def _ratio(num, den):
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def _kernel(metric: Metric, records: list[dict], clusters: list[list[int]]) -> _Kernel | None:
    scale = metric.scale
    if metric.name in FIDELITY or (metric.benchmark, metric.name) in MEAN_OF_SCORE:
        field = FIDELITY[metric.name][0] if metric.name in FIDELITY else "score"
        v = np.array([float(records[i][field]) for i in range(len(records))]) * scale
        return _Kernel(np.stack([v, np.ones_like(v)], 1), lambda s: s[:, 0] / s[:, 1])
    if metric.benchmark == "pocket" and metric.name.startswith("accuracy_"):  # the mean score of one question type
        kind = metric.name.removeprefix("accuracy_")
        mine = np.array([r.get("category") == kind for r in records], float)
        v = np.array([float(r["score"]) for r in records]) * mine * scale
        return _Kernel(np.stack([v, mine], 1), lambda s: _ratio(s[:, 0], s[:, 1]))
    if metric.benchmark == "pope" and metric.name in ("precision", "recall", "f1", "yes_ratio"):
        pred = np.array([r["prediction"].lower().strip() for r in records])
        yes = np.array([r["answer"].lower().strip() == "yes" for r in records])
        stats = np.stack([yes & (pred == "yes"), ~yes & (pred == "yes"), yes & (pred == "no"), yes,
                          np.ones(len(records), bool)], 1).astype(float)

        def finish(s):
            tp, fp, fn, n_yes, n = s.T
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            f1 = _ratio(2 * (precision * recall), precision + recall)
            return {"precision": precision, "recall": recall, "f1": f1, "yes_ratio": n_yes / n}[metric.name] * scale

        return _Kernel(stats, finish)
    if metric.benchmark == "mme" and metric.name in ("total", "perception", "cognition") and all(
            len(c) == 2 for c in clusters):
        # per image: acc (share of its pair right) + acc_plus (both right), x100; a category scores the mean of
        # its images, and the aggregates sum the categories a resample holds (mme_metrics, complete pairs)
        categories = list(dict.fromkeys(records[c[0]]["category"] for c in clusters))
        wanted = {"total": MME_PERCEPTION + MME_COGNITION, "perception": MME_PERCEPTION,
                  "cognition": MME_COGNITION}[metric.name]
        stats = np.zeros((len(clusters), 2 * len(categories)))
        for k, c in enumerate(clusters):
            right = [mme_parse(records[i]["prediction"]) == records[i]["answer"].lower().strip().replace(".", "")
                     for i in c]
            j = categories.index(records[c[0]]["category"])
            stats[k, 2 * j] = sum(right) / 2 * 100.0 + (all(right) * 100.0)
            stats[k, 2 * j + 1] = 1.0
        use = np.array([cat in wanted for cat in categories], float)
        return _Kernel(stats, lambda s: (_ratio(s[:, 0::2], s[:, 1::2]) * use).sum(1))
    return None


def _weights(rng, n: int, k: int) -> np.ndarray:
    """(k, n) resample counts: how often each of n units is drawn in each of k resamples of size n."""
    draws = rng.integers(0, n, (k, n)) + (np.arange(k) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=k * n).reshape(k, n).astype(float)


def _blocks(resamples: int):
    for start in range(0, resamples, _CHUNK):
        yield min(_CHUNK, resamples - start)


def _draw(records: list[dict], clusters: list[list[int]], picks, benchmark: str) -> list[dict]:
    """The records of the picked clusters; MME question ids made unique per draw, so a repeated image stays a pair."""
    if benchmark != "mme":
        return [records[i] for c in picks for i in clusters[c]]
    return [records[i] | {"question_id": f"{records[i].get('question_id')}#{j}"}
            for j, c in enumerate(picks) for i in clusters[c]]


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# --- confidence intervals and paired tests -------------------------------------------------------------------
def bootstrap_ci(records: list[dict], metrics: list[Metric], resamples: int = 1000, seed: int = 0,
                 level: float = LEVEL) -> dict[str, tuple[float, float, float]]:
    """Per metric: (point estimate, low, high) over scored ``records``. Metrics without a kernel share one
    ``aggregate`` call per resample."""
    out, slow = {}, []
    for metric in metrics:
        clusters = _clusters(records, metric.benchmark)
        kernel = _kernel(metric, records, clusters)
        if kernel is None:
            slow.append(metric)
            continue
        rng = np.random.default_rng(seed)
        stats = np.concatenate([kernel.values(_weights(rng, len(clusters), k)) for k in _blocks(resamples)])
        out[metric.name] = (metric.value(records), *_interval(stats, level))
    if slow:
        benchmark = slow[0].benchmark
        aggregate = get_benchmark(benchmark).aggregate
        clusters = _clusters(records, benchmark)
        rng = np.random.default_rng(seed)
        draws = [aggregate(_draw(records, clusters, rng.integers(0, len(clusters), len(clusters)), benchmark))
                 for _ in range(resamples)]
        for metric in slow:
            stats = np.array([d[metric.name] for d in draws]) * metric.scale
            out[metric.name] = (metric.value(records), *_interval(stats, level))
    return out


def paired_test(a: list[dict], b: list[dict], metric: Metric, resamples: int = 1000, seed: int = 0,
                level: float = LEVEL) -> dict | None:
    """A - B on the samples both runs scored: n, both values, the difference, its CI and the permutation p."""
    b_by_uid = {r["uid"]: r for r in b}
    a = [r for r in a if r["uid"] in b_by_uid]
    if not a:
        return None
    b = [b_by_uid[r["uid"]] for r in a]
    va, vb = metric.value(a), metric.value(b)
    diff = va - vb
    rng = np.random.default_rng(seed)
    clusters = _clusters(a, metric.benchmark)  # b is aligned to a, so the same clusters
    ka, kb = _kernel(metric, a, clusters), _kernel(metric, b, clusters)
    n = len(clusters)
    if ka is not None and kb is not None:
        boot, perm = [], []
        for k in _blocks(resamples):
            w = _weights(rng, n, k)
            boot.append(ka.values(w) - kb.values(w))
            swap = (rng.random((k, n)) < 0.5).astype(float)
            sums_a, sums_b = (1 - swap) @ ka.stats + swap @ kb.stats, swap @ ka.stats + (1 - swap) @ kb.stats
            perm.append(ka.finish(sums_a) - kb.finish(sums_b))
        boot, perm = np.concatenate(boot), np.concatenate(perm)
    else:
        boot, perm = np.empty(resamples), np.empty(resamples)
        for i in range(resamples):
            picks = rng.integers(0, n, n)
            boot[i] = (metric.value(_draw(a, clusters, picks, metric.benchmark))
                       - metric.value(_draw(b, clusters, picks, metric.benchmark)))
            a_perm, b_perm = list(a), list(b)
            for c in np.flatnonzero(rng.random(n) < 0.5):
                for j in clusters[c]:
                    a_perm[j], b_perm[j] = b[j], a[j]
            perm[i] = metric.value(a_perm) - metric.value(b_perm)
    tolerance = 1e-9 * max(1.0, abs(diff))  # float noise must not turn a tie into a "more extreme" draw
    p = (1 + int(np.sum(np.abs(perm) >= abs(diff) - tolerance))) / (1 + resamples)
    lo, hi = _interval(boot, level)
    return {"n": len(a), "value_a": va, "value_b": vb, "diff": diff, "diff_lo": lo, "diff_hi": hi, "p": p}
