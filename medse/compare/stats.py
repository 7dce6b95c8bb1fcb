"""Paired statistics for Dice-gain tables: Wilcoxon signed-rank, Holm correction, bootstrap CI, relative gain.

The scSE papers (Roy et al., MICCAI 2018, arXiv 1803.02579; IEEE TMI 2019, arXiv 1808.08127) report mean Dice
per architecture x block; they report no significance test. medse adds, per block versus ``none`` on the same
cases:

* a two-sided paired Wilcoxon signed-rank test over cases (Wilcoxon 1945, via :func:`scipy.stats.wilcoxon`),
* Holm's step-down correction (Holm 1979, Scand. J. Statist. 6:65-70) across the blocks of one architecture,
* a percentile bootstrap 95% confidence interval of the mean paired difference (Efron & Tibshirani 1993),
* the relative gain ``100 * (mean_block - mean_none) / mean_none``.

NOTE: not in paper — the tests and intervals are medse's own additions to the papers' tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PairedComparison",
    "WilcoxonResult",
    "bootstrap_ci",
    "holm",
    "paired_comparison",
    "relative_gain",
    "wilcoxon_paired",
]


@dataclass(frozen=True)
class WilcoxonResult:
    """Result of :func:`wilcoxon_paired`.

    ``statistic`` is scipy's statistic (the smaller rank sum for the two-sided test), ``pvalue`` is NaN when
    the test is undefined (fewer than 2 pairs, or every difference is zero), ``n`` the number of pairs and
    ``n_nonzero`` the number of non-zero differences that carry ranks.
    """

    statistic: float
    pvalue: float
    n: int
    n_nonzero: int


def _pair(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def wilcoxon_paired(
    baseline: Sequence[float] | np.ndarray,
    other: Sequence[float] | np.ndarray,
    *,
    zero_method: str = "wilcox",
    method: str = "auto",
) -> WilcoxonResult:
    """Two-sided paired Wilcoxon signed-rank test of ``other - baseline`` over cases.

    Pairs with a non-finite value on either side are dropped. Wraps :func:`scipy.stats.wilcoxon`
    (Wilcoxon, Biometrics Bulletin 1945).

    Args:
        baseline: per-case values of the reference (e.g. Dice of ``none``).
        other: per-case values of the compared model, in the same case order.
        zero_method: scipy's treatment of zero differences. Defaults to ``"wilcox"`` (drop them).
        method: scipy's p-value method. Defaults to ``"auto"`` (exact for small samples without ties).

    Returns:
        :class:`WilcoxonResult`; ``pvalue`` is NaN when the test is undefined (fewer than two pairs or
        all differences zero).
    """
    from scipy import stats

    x, y = _pair(baseline, other)
    d = y - x
    n = int(d.size)
    nz = int(np.count_nonzero(d))
    if n < 2 or nz == 0:
        return WilcoxonResult(float("nan"), float("nan"), n, nz)
    res = stats.wilcoxon(y, x, zero_method=zero_method, alternative="two-sided", method=method)
    return WilcoxonResult(float(res.statistic), float(res.pvalue), n, nz)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (Holm 1979).

    With the m finite p-values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) * p(j))``
    (1-based j), returned in the input order. NaN entries stay NaN and do not count in m.

    Args:
        pvalues: raw p-values, e.g. one per block of an architecture.

    Returns:
        array of adjusted p-values, same length and order as ``pvalues``.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[finite].tolist()}")
    order = finite[np.argsort(p[finite], kind="mergesort")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out


def bootstrap_ci(
    differences: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of paired differences.

    Resamples the cases with replacement ``n_boot`` times (numpy ``default_rng(seed)``) and takes the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means (Efron &
    Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13). Non-finite values are dropped.

    Args:
        differences: per-case paired differences (e.g. Dice of block minus Dice of ``none``).
        confidence: coverage of the interval. Defaults to 0.95.
        n_boot: number of bootstrap resamples. Defaults to 10000.
        seed: seed of the resampling, so that tables are reproducible. Defaults to 0.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for an empty sample, ``(d, d)`` for a single case.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = np.asarray(differences, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    if d.size == 1:
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // d.size)  # bound memory: at most ~2M indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def relative_gain(baseline_mean: float, other_mean: float) -> float:
    """Relative gain in percent, ``100 * (other - baseline) / baseline``; NaN when the baseline is 0 or NaN."""
    if not math.isfinite(baseline_mean) or baseline_mean == 0 or not math.isfinite(other_mean):
        return float("nan")
    return 100.0 * (other_mean - baseline_mean) / baseline_mean


@dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of one model against a baseline over the same cases (see :func:`paired_comparison`)."""

    n: int
    baseline_mean: float
    other_mean: float
    mean_difference: float
    relative_gain_pct: float
    ci_low: float
    ci_high: float
    statistic: float
    pvalue: float


def paired_comparison(
    baseline: Sequence[float] | np.ndarray,
    other: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> PairedComparison:
    """Mean difference, relative gain, bootstrap CI and Wilcoxon p of ``other`` against ``baseline``.

    Args:
        baseline: per-case values of the baseline, aligned with ``other``.
        other: per-case values of the compared model.
        confidence: bootstrap interval coverage. Defaults to 0.95.
        n_boot: bootstrap resamples. Defaults to 10000.
        seed: bootstrap seed. Defaults to 0.
    """
    x, y = _pair(baseline, other)
    w = wilcoxon_paired(x, y)
    lo, hi = bootstrap_ci(y - x, confidence=confidence, n_boot=n_boot, seed=seed)
    bm = float(x.mean()) if x.size else float("nan")
    om = float(y.mean()) if y.size else float("nan")
    return PairedComparison(
        n=int(x.size),
        baseline_mean=bm,
        other_mean=om,
        mean_difference=om - bm,
        relative_gain_pct=relative_gain(bm, om),
        ci_low=lo,
        ci_high=hi,
        statistic=w.statistic,
        pvalue=w.pvalue,
    )
