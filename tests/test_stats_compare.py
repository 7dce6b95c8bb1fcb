"""Statistics of the comparison tables against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medse.compare.stats import bootstrap_ci, holm, paired_comparison, relative_gain, wilcoxon_paired


def test_wilcoxon_hand_case_normal_approximation():
    # differences -1, 2, 3, ..., 12: W- = 1, W+ = 77; normal approximation without continuity correction:
    # mean n(n+1)/4 = 39, variance n(n+1)(2n+1)/24 = 162.5 -> z = -38 / sqrt(162.5), p = erfc(|z| / sqrt 2)
    d = np.array([-1.0, *range(2, 13)])
    res = wilcoxon_paired(np.zeros(12), d, method="approx")
    assert res.n == 12 and res.n_nonzero == 12
    assert res.statistic == 1.0
    z = (1 - 39) / math.sqrt(162.5)
    assert res.pvalue == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert res.pvalue == pytest.approx(0.002873, abs=2e-6)


def test_wilcoxon_exact_known_pvalue():
    # all 6 differences positive and distinct: W- = 0, exact two-sided p = 2 / 2**6 = 0.03125
    base = np.zeros(6)
    other = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    res = wilcoxon_paired(base, other)
    assert res.statistic == 0.0
    assert res.pvalue == pytest.approx(2 / 64)
    # symmetric: swapping sides gives the same two-sided p
    assert wilcoxon_paired(other, base).pvalue == pytest.approx(2 / 64)


def test_wilcoxon_one_negative_rank_exact():
    # differences 1..7 with the smallest negative: W- = 1, exact two-sided p = 2 * P(W <= 1) = 2 * 2/128
    d = np.array([-1, 2, 3, 4, 5, 6, 7], dtype=float)
    res = wilcoxon_paired(np.zeros(7), d)
    assert res.statistic == 1.0
    assert res.pvalue == pytest.approx(4 / 128)


def test_wilcoxon_undefined_cases_are_nan():
    assert math.isnan(wilcoxon_paired([1, 2, 3], [1, 2, 3]).pvalue)
    assert math.isnan(wilcoxon_paired([1.0], [2.0]).pvalue)
    res = wilcoxon_paired([1, 2, np.nan, 4], [2, 3, 5, np.nan])
    assert res.n == 2
    with pytest.raises(ValueError, match="same length"):
        wilcoxon_paired([1, 2], [1, 2, 3])


def test_holm_known_list():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> monotone max .06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_keeps_nan_and_single():
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    out = holm([np.nan, 0.02, 0.04])
    assert math.isnan(out[0])
    np.testing.assert_allclose(out[1:], [0.04, 0.04])
    np.testing.assert_allclose(holm([0.3]), [0.3])
    assert holm([]).size == 0
    with pytest.raises(ValueError):
        holm([1.5])


def test_holm_matches_bonferroni_bounds():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 0.2, size=7)
    adj = holm(p)
    assert np.all(adj >= p - 1e-15)
    assert np.all(adj <= np.minimum(1, p * 7) + 1e-15)
    assert adj[np.argmin(p)] == pytest.approx(min(1, 7 * p.min()))


def test_bootstrap_ci_deterministic_and_contains_mean():
    d = np.random.default_rng(0).normal(0.02, 0.05, size=25)
    a = bootstrap_ci(d, seed=7, n_boot=2000)
    b = bootstrap_ci(d, seed=7, n_boot=2000)
    assert a == b
    assert a[0] < d.mean() < a[1]
    assert bootstrap_ci(d, seed=8, n_boot=2000) != a
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # constant differences -> degenerate interval at that value
    lo, hi = bootstrap_ci(np.full(10, 0.05), n_boot=500)
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    with pytest.raises(ValueError):
        bootstrap_ci(d, confidence=1.5)


def test_bootstrap_ci_width_matches_normal_theory():
    # large n from a known distribution: the percentile interval of the mean ~ mean ± 1.96 sigma/sqrt(n)
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 1.0, size=400)
    lo, hi = bootstrap_ci(d, n_boot=4000, seed=0)
    expected = 2 * 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    assert (hi - lo) == pytest.approx(expected, rel=0.08)


def test_bootstrap_ci_coverage_on_known_distribution():
    # 200 samples of size 30 from N(0.5, 1): the 95% interval should cover 0.5 in roughly 95% of them
    # (the percentile bootstrap under-covers slightly at n=30; binomial sd of the rate is ~1.5 points)
    rng = np.random.default_rng(123)
    hits = 0
    reps = 200
    for i in range(reps):
        sample = rng.normal(0.5, 1.0, size=30)
        lo, hi = bootstrap_ci(sample, n_boot=1000, seed=i)
        hits += lo <= 0.5 <= hi
    coverage = hits / reps
    assert 0.89 <= coverage <= 0.99, coverage


def test_relative_gain_and_paired_comparison():
    assert relative_gain(0.8, 0.84) == pytest.approx(5.0)
    assert math.isnan(relative_gain(0.0, 0.5))
    base = np.array([0.70, 0.72, 0.68, 0.75, 0.71, 0.69])
    other = base + np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    pc = paired_comparison(base, other, n_boot=1000)
    assert pc.n == 6
    assert pc.mean_difference == pytest.approx(0.035)
    assert pc.relative_gain_pct == pytest.approx(100 * 0.035 / base.mean())
    assert pc.pvalue == pytest.approx(2 / 64)
    assert 0.01 <= pc.ci_low < 0.035 < pc.ci_high <= 0.06
