"""Percentile bootstrap confidence intervals of ranking metrics, vectorised over resamples.

A resample draws ``n`` rows with replacement from the ``n`` rows of a split; it is held as the
number of times each row was drawn (its weight). The metrics of every resample of a chunk are
computed at once from those weights, with the definitions of `probekit.metrics.compute_metrics`
(scikit-learn's): AUROC with ties counting one half, average precision without interpolation,
the highest recall among the ROC points whose false positive rate is within a budget. A
resample without both classes leaves those metrics undefined (``nan``), as a split does; the
interval is the 2.5th and 97.5th percentile of the resamples where the metric is defined.

The draws depend only on the seed, the number of rows and the number of resamples
(`resample_indices`), so an interval is reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

LEVEL = 0.95
"""The coverage of the intervals: the 2.5th to the 97.5th percentile."""

CHUNK_CELLS = 1 << 21
"""At most this many (resample, row) weights are held at once (16 MiB of int64)."""

BINARY_KEYS = ("auroc", "auprc", "recall_at_1pct_fpr", "recall_at_5pct_fpr")
"""The binary metrics that get an interval (`binary_resamples`)."""

FloatArray = npt.NDArray[np.float64]


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[npt.NDArray[np.int64]]:
    """The rows each resample draws, in chunks of ``(resamples in chunk, n)`` indices in
    ``0..n-1``; together ``resamples`` rows, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        yield rng.integers(0, n, size=(size, n), dtype=np.int64)
        done += size


def _weights(indices: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    """``(resamples, n)``: how often each row is drawn in each resample."""
    size = indices.shape[0]
    flat = (indices + np.arange(size, dtype=np.int64)[:, None] * n).ravel()
    return np.bincount(flat, minlength=size * n).reshape(size, n)


class _Ranking:
    """The rows of one binary problem grouped by distinct score, ascending."""

    def __init__(self, labels: npt.NDArray[np.int64], scores: FloatArray) -> None:
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        self.positive = labels[self.order] == 1

    def class_weights(self, weights: npt.NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
        """``(resamples, distinct scores)`` weights of the positive and of the negative rows."""
        ordered = weights[:, self.order].astype(np.float64)
        pos = np.add.reduceat(np.where(self.positive, ordered, 0.0), self.starts, axis=1)
        neg = np.add.reduceat(np.where(self.positive, 0.0, ordered), self.starts, axis=1)
        return pos, neg


def _auroc(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """Per resample: the probability that a positive outscores a negative, ties one half."""
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    wins = np.sum(pos * (below + 0.5 * neg), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total_pos > 0) & (total_neg > 0), wins / (total_pos * total_neg), np.nan)


def _binary_chunk(ranking: _Ranking, weights: npt.NDArray[np.int64]) -> dict[str, FloatArray]:
    pos, neg = ranking.class_weights(weights)
    defined = (pos.sum(axis=1) > 0) & (neg.sum(axis=1) > 0)
    out = {"auroc": _auroc(pos, neg)}
    # from the highest score down: the ROC and precision-recall points, one per distinct score
    tp, fp = np.cumsum(pos[:, ::-1], axis=1), np.cumsum(neg[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = np.sum(pos[:, ::-1] * precision, axis=1) / tp[:, -1]
        out["auprc"] = np.where(defined, np.clip(ap, 0.0, 1.0), np.nan)
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    for key, budget in (("recall_at_1pct_fpr", 0.01), ("recall_at_5pct_fpr", 0.05)):
        best = np.max(np.where(fpr <= budget, tpr, 0.0), axis=1)  # (0, 0) is always a point
        out[key] = np.where(defined, best, np.nan)
    return out


def binary_resamples(
    labels: npt.ArrayLike, scores: npt.ArrayLike, resamples: int, seed: int
) -> dict[str, FloatArray]:
    """`BINARY_KEYS` -> one value per resample (``nan`` where a resample has one class only).

    ``labels`` are ``0``/``1``, ``scores`` the positive class's probabilities (checked by the
    caller, as `probekit.metrics.binary_inputs` does)."""
    y, s = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    ranking = _Ranking(y, s)
    parts: dict[str, list[FloatArray]] = {key: [] for key in BINARY_KEYS}
    for indices in resample_indices(y.size, resamples, seed):
        for key, values in _binary_chunk(ranking, _weights(indices, y.size)).items():
            parts[key].append(values)
    return {key: _joined(values) for key, values in parts.items()}


def macro_auroc_resamples(
    labels: npt.ArrayLike, probs: npt.ArrayLike, resamples: int, seed: int
) -> FloatArray:
    """Per resample: the macro one-vs-rest AUROC of class probabilities ``(n, K)``, the mean over
    the classes with rows on both sides in that resample (``nan`` when none has), as
    `probekit.multiclass_metrics.multiclass_metrics` averages it."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    rankings = [_Ranking((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])]
    parts: list[FloatArray] = []
    for indices in resample_indices(y.size, resamples, seed):
        weights = _weights(indices, y.size)
        per_class = np.stack([_auroc(*ranking.class_weights(weights)) for ranking in rankings])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no class qualifies
            parts.append(np.nanmean(per_class, axis=0))
    return _joined(parts)


def _joined(parts: list[FloatArray]) -> FloatArray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)


def percentile_interval(values: FloatArray, point: float) -> list[float] | None:
    """The `LEVEL` percentile interval ``[lo, hi]`` of the defined (finite) ``values``; None when
    ``point`` is undefined or fewer than two resamples define the metric."""
    defined = values[np.isfinite(values)]
    if math.isnan(point) or defined.size < 2:
        return None
    tail = (1.0 - LEVEL) / 2 * 100
    lo, hi = np.percentile(defined, [tail, 100 - tail])
    return [float(lo), float(hi)]
