"""Statistics of medse.evaluation.classification and medse.compare.classifier checked against independent computations and pROC's published example."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from medse.compare.classifier import compare_predictions, delong_test, holm, mcnemar_test, two_proportion_ztest
from medse.evaluation.classification import (
    StatisticsError,
    auc_score,
    classification_metrics,
    delong_ci,
    delong_covariance,
    midrank,
)

ASAH = Path(__file__).parent / "data" / "aSAH.csv"


@pytest.fixture(scope="module")
def asah():
    with open(ASAH, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 113
    y = np.array([r["outcome"] == "Poor" for r in rows])
    return y, np.array([float(r["s100b"]) for r in rows]), np.array([float(r["ndka"]) for r in rows])


def test_asah_matches_proc_documented_values(asah):
    # pROC (Robin et al. 2011) documented example on its aSAH data set:
    #   roc(aSAH$outcome, aSAH$s100b): AUC 0.7314, ci.auc (DeLong) 0.6301-0.8326
    #   roc(aSAH$outcome, aSAH$ndka):  AUC 0.612 (0.6119580 unrounded)
    #   roc.test(r.s100b, r.ndka, method="delong"): Z = 1.3908, p-value = 0.1643, 95% CI of the difference
    #   -0.04887 to 0.28769
    y, s100b, ndka = asah
    assert (y.sum(), (~y).sum()) == (41, 72)
    r = delong_ci(y, s100b)
    assert round(r.auc, 4) == 0.7314
    assert (round(r.ci_low, 4), round(r.ci_high, 4)) == (0.6301, 0.8326)
    assert round(delong_ci(y, ndka).auc, 3) == 0.612
    assert delong_ci(y, ndka).auc == pytest.approx(0.6119580, abs=1e-7)
    t = delong_test(y, ndka, s100b)  # diff = s100b - ndka, as pROC's roc1 - roc2 with roc1 = s100b
    assert round(t.z, 4) == 1.3908 and round(t.p, 4) == 0.1643
    assert round(t.ci_low, 4) == -0.0489 and round(t.ci_high, 4) == 0.2877
    assert t.auc_a == pytest.approx(0.6119580, abs=1e-7) and t.auc_b == pytest.approx(0.7313686, abs=1e-7)
    swapped = delong_test(y, s100b, ndka)
    assert swapped.z == pytest.approx(-t.z) and swapped.p == pytest.approx(t.p)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 80)
        s = rng.integers(0, 6, 80).astype(float) + y * rng.uniform(0, 2)  # heavy ties
        assert auc_score(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert delong_ci(y, s).auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_midrank():
    np.testing.assert_allclose(midrank([3.0, 1.0, 3.0, 2.0, 3.0]), [4, 1, 4, 2, 4])
    np.testing.assert_allclose(midrank([5.0]), [1])


def _structural_components(y, scores):
    """DeLong et al. (1988) directly, O(m * n): psi = 1 / 0.5 / 0 for X > Y / X == Y / X < Y."""
    k = scores.shape[0]
    pos, neg = scores[:, y], scores[:, ~y]
    v10, v01, aucs = [], [], []
    for r in range(k):
        psi = (pos[r][:, None] > neg[r][None, :]) + 0.5 * (pos[r][:, None] == neg[r][None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = pos.shape[1], neg.shape[1]
    s10 = np.cov(np.array(v10), ddof=1)
    s01 = np.cov(np.array(v01), ddof=1)
    return np.array(aucs), s10 / m + s01 / n


def test_delong_covariance_equals_structural_components_definition():
    rng = np.random.default_rng(1)
    y = rng.random(150) < 0.35
    a = rng.normal(size=150) + 1.0 * y
    b = np.round(a + rng.normal(scale=0.8, size=150), 1)  # correlated, with ties
    c = rng.integers(0, 4, 150).astype(float)  # mostly ties
    scores = np.stack([a, b, c])
    aucs, cov = delong_covariance(y, scores)
    ref_aucs, ref_cov = _structural_components(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    t = delong_test(y, a, b)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert t.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert t.z == pytest.approx((ref_aucs[1] - ref_aucs[0]) / math.sqrt(var), rel=1e-10)
    assert t.p == pytest.approx(2 * stats.norm.sf(abs(t.z)), rel=1e-10)


def test_delong_variance_agrees_with_large_bootstrap():
    rng = np.random.default_rng(2)
    n_pos, n_neg = 80, 120
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    a = rng.normal(size=200) + 1.2 * y
    b = 0.6 * a + 0.8 * rng.normal(size=200) + 0.3 * y
    _, cov = delong_covariance(y, np.stack([a, b]))
    # stratified bootstrap (positives and negatives resampled separately, as pROC's default)
    reps = 4000
    pi = rng.integers(0, n_pos, (reps, n_pos))
    ni = rng.integers(0, n_neg, (reps, n_neg)) + n_pos
    idx = np.concatenate([pi, ni], axis=1)

    def boot_auc(s):
        ranks = stats.rankdata(s[idx], axis=1)
        return (ranks[:, :n_pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    ba, bb = boot_auc(a), boot_auc(b)
    boot_cov = np.cov(np.stack([ba, bb]))
    np.testing.assert_allclose(np.diag(cov), np.diag(boot_cov), rtol=0.12)
    assert cov[0, 1] == pytest.approx(boot_cov[0, 1], rel=0.2)
    diff_var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert diff_var == pytest.approx(np.var(bb - ba, ddof=1), rel=0.15)


def test_delong_edge_cases_give_messages_not_nan():
    y = np.array([1, 1, 0, 0, 0])
    with pytest.raises(StatisticsError, match="no positive cases"):
        delong_ci(np.zeros(5, int), np.arange(5.0))
    with pytest.raises(StatisticsError, match="no negative cases"):
        delong_test(np.ones(5, int), np.arange(5.0), np.arange(5.0))
    with pytest.raises(StatisticsError, match="NaN"):
        delong_ci(y, [0.1, np.nan, 0.3, 0.2, 0.1])
    with pytest.raises(StatisticsError, match="has 4 values"):
        delong_ci(y, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(StatisticsError, match="binary"):
        delong_ci([0, 1, 2], [0.1, 0.2, 0.3])
    perfect = delong_ci(y, [0.9, 0.8, 0.1, 0.2, 0.3])
    assert (perfect.auc, perfect.ci_low, perfect.ci_high, perfect.se) == (1.0, 1.0, 1.0, 0.0)
    assert "zero DeLong variance" in perfect.note
    both = delong_test(y, [0.9, 0.8, 0.1, 0.2, 0.3], [5, 6, 1, 2, 1])
    assert (both.diff, both.z, both.p) == (0.0, 0.0, 1.0) and "zero variance" in both.note
    ties = delong_ci(y, np.ones(5))  # all scores tied: AUC 1/2
    assert ties.auc == 0.5 and not math.isnan(ties.ci_low) and not math.isnan(ties.se)
    one_imperfect = delong_test(y, [0.9, 0.8, 0.1, 0.2, 0.3], [0.9, 0.2, 0.1, 0.5, 0.3])
    assert all(math.isfinite(v) for v in (one_imperfect.z, one_imperfect.p, one_imperfect.se))


@pytest.mark.parametrize("b,c", [(0, 5), (3, 9), (7, 7), (12, 2), (1, 0)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    ca = np.r_[np.ones(b, bool), np.zeros(c, bool), np.ones(20, bool), np.zeros(6, bool)]
    cb = np.r_[np.zeros(b, bool), np.ones(c, bool), np.ones(20, bool), np.zeros(6, bool)]
    r = mcnemar_test(ca, cb)
    assert (r.b, r.c, r.n) == (b, c, b + c + 26)
    assert r.method == "exact binomial"
    assert r.p == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, abs=1e-12)


def test_mcnemar_chi_square_above_threshold_and_no_discordance():
    ca = np.r_[np.ones(30, bool), np.zeros(12, bool)]
    cb = np.r_[np.zeros(30, bool), np.ones(12, bool)]
    r = mcnemar_test(ca, cb)
    assert r.method == "chi-square (continuity corrected)"
    assert r.statistic == pytest.approx((abs(30 - 12) - 1) ** 2 / 42)
    assert r.p == pytest.approx(stats.chi2.sf((18 - 1) ** 2 / 42, 1))
    assert mcnemar_test(ca, cb, exact=True).p == pytest.approx(stats.binomtest(30, 42).pvalue)
    same = mcnemar_test([True, False, True], [True, False, True])
    assert (same.p, same.statistic) == (1.0, 0.0) and "no discordant" in same.note
    with pytest.raises(StatisticsError):
        mcnemar_test([True, False], [True])


def test_two_proportion_ztest_is_unpaired_and_correct():
    r = two_proportion_ztest(45, 100, 60, 100)
    pool = 105 / 200
    z = 0.15 / math.sqrt(pool * (1 - pool) * (2 / 100))
    assert r.z == pytest.approx(z) and r.z == pytest.approx(2.1239, abs=1e-4)
    assert r.p == pytest.approx(2 * stats.norm.sf(z))
    assert r.paired is False
    flat = two_proportion_ztest(10, 10, 10, 10)
    assert (flat.z, flat.p) == (0.0, 1.0) and flat.note
    with pytest.raises(StatisticsError):
        two_proportion_ztest(1, 0, 1, 2)


def test_holm():
    adj = holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_metrics_with_absent_class_are_json_clean():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1],
                  [0.1, 0.8, 0.1]])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["per_class"]["c"]["auc"] is None and "no positive cases" in m["per_class"]["c"]["note"]
    assert m["per_class"]["c"]["sensitivity"] is None and m["per_class"]["c"]["precision"] is None
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 0], [0, 0, 0]]
    assert m["macro_auc"] == pytest.approx(np.mean([m["per_class"]["a"]["auc"], m["per_class"]["b"]["auc"]]))
    text = json.dumps(m)
    assert "NaN" not in text
    pred = {"class_names": ["a", "b", "c"], "image_ids": [str(i) for i in range(6)], "y_true": y, "probs": p}
    comp = compare_predictions(pred, {**pred, "probs": p[:, [1, 0, 2]]})
    c_row = comp["per_class"][2]
    assert c_row["delong"] is None and "absent" in c_row["correctness_note"]
    assert "NaN" not in json.dumps(comp)
    with pytest.raises(Exception, match="different images"):
        compare_predictions(pred, {**pred, "image_ids": [str(i + 1) for i in range(6)]})


def test_macro_delong_reduces_to_delong_and_matches_paired_bootstrap():
    from medse.compare.classifier import delong_macro_test

    rng = np.random.default_rng(4)
    # two classes: probabilities p and 1 - p -> macro AUC == AUC of class 1, variance == DeLong's exactly
    y2 = (rng.random(120) < 0.4).astype(int)
    pa = 1 / (1 + np.exp(-(rng.normal(size=120) + 1.2 * y2)))
    pb = 1 / (1 + np.exp(-(0.7 * np.log(pa / (1 - pa)) + rng.normal(scale=0.7, size=120) + 0.4 * y2)))
    macro = delong_macro_test(y2, np.c_[1 - pa, pa], np.c_[1 - pb, pb])
    single = delong_test(y2 == 1, pa, pb)
    assert macro.diff == pytest.approx(single.diff, abs=1e-12)
    assert macro.se == pytest.approx(single.se, rel=1e-10) and macro.p == pytest.approx(single.p, rel=1e-10)
    # four classes: variance of the macro-AUC difference vs a paired bootstrap over images
    n, k = 240, 4
    y = rng.integers(0, k, n)
    logits_a = rng.normal(size=(n, k)) + 1.0 * np.eye(k)[y]
    logits_b = 0.6 * logits_a + 0.8 * rng.normal(size=(n, k)) + 0.5 * np.eye(k)[y]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    qa, qb = softmax(logits_a), softmax(logits_b)
    res = delong_macro_test(y, qa, qb)
    assert res.classes == [0, 1, 2, 3]
    ref = np.mean([roc_auc_score(y == c, qb[:, c]) - roc_auc_score(y == c, qa[:, c]) for c in range(k)])
    assert res.diff == pytest.approx(ref, abs=1e-12)
    idx = rng.integers(0, n, (2000, n))  # paired bootstrap: the same resampled images for both models

    def boot_auc(q, c):
        pos = y[idx] == c
        m = pos.sum(1)
        ranks = stats.rankdata(q[idx, c], axis=1)
        return ((ranks * pos).sum(1) - m * (m + 1) / 2) / (m * (n - m))

    diffs = np.mean([boot_auc(qb, c) - boot_auc(qa, c) for c in range(k)], axis=0)
    assert res.se**2 == pytest.approx(np.var(diffs, ddof=1), rel=0.15)
    absent = delong_macro_test(np.array([0, 1, 0, 1, 0]), np.eye(3)[[0, 1, 0, 0, 1]] * 0.5 + 0.1,
                               np.eye(3)[[0, 1, 0, 1, 0]] * 0.5 + 0.1)
    assert absent.classes == [0, 1] and "[2]" in absent.note and math.isfinite(absent.p)


# ----------------------------------------------------------------------------- degenerate inputs (issue 11, item 14)
def test_delong_single_positive_or_negative_is_nan_with_note():
    rng = np.random.default_rng(5)
    scores_a, scores_b = rng.random(30), rng.random(30)
    one_pos = np.zeros(30, int)
    one_pos[3] = 1
    for y in (one_pos, 1 - one_pos):
        t = delong_test(y, scores_a, scores_b)
        assert math.isnan(t.p) and math.isnan(t.z) and math.isnan(t.se) and math.isnan(t.ci_low)
        assert "single" in t.note and "pROC gives NA" in t.note
        assert t.auc_a == pytest.approx(roc_auc_score(y, scores_a)) and t.diff == pytest.approx(t.auc_b - t.auc_a)
        c = delong_ci(y, scores_a)
        assert math.isnan(c.se) and math.isnan(c.ci_low) and math.isnan(c.ci_high) and "single" in c.note
        assert c.auc == pytest.approx(roc_auc_score(y, scores_a))
        assert c.to_dict()["se"] is None and t.to_dict()["p"] is None  # strict JSON
        _, cov = delong_covariance(y, np.stack([scores_a, scores_b]))
        assert np.isnan(cov).all()
    two_pos = one_pos.copy()
    two_pos[7] = 1  # two positives: defined again
    assert math.isfinite(delong_test(two_pos, scores_a, scores_b).p)


def test_delong_other_degenerate_inputs_have_notes():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.3, 0.6, 0.5, 0.2, 0.4, 0.1])
    with pytest.raises(StatisticsError, match="no negative cases"):  # all one class
        delong_test(np.ones(7, int), s, s)
    const = delong_ci(y, np.full(7, 0.3))  # constant scores: AUC 1/2, zero variance
    assert const.auc == 0.5 and const.se == 0.0 and "zero DeLong variance" in const.note
    same = delong_test(y, s, s)  # identical models
    assert (same.diff, same.z, same.p) == (0.0, 0.0, 1.0) and "no evidence of a difference" in same.note
    both_const = delong_test(y, np.full(7, 0.3), np.full(7, 0.8))  # two constant models: equal AUCs, zero variance
    assert both_const.p == 1.0 and "zero variance" in both_const.note
    perfect_vs_inverted = delong_test(y, s * 0 + np.r_[1, 1, 1, 0, 0, 0, 0], np.r_[0, 0, 0, 1, 1, 1, 1])
    assert perfect_vs_inverted.p == 0.0 and "degenerate" in perfect_vs_inverted.note
    assert perfect_vs_inverted.to_dict()["z"] is None  # -inf is not JSON


def test_macro_delong_single_positive_class_and_holm_skip_nan():
    from medse.compare.classifier import compare_predictions, delong_macro_test

    rng = np.random.default_rng(6)
    y = np.r_[np.zeros(10, int), np.ones(10, int), 2]  # class 2 has a single image
    pa, pb = rng.dirichlet(np.ones(3), 21), rng.dirichlet(np.ones(3), 21)
    r = delong_macro_test(y, pa, pb)
    assert math.isnan(r.p) and "[2]" in r.note and "pROC gives NA" in r.note and r.classes == [0, 1, 2]
    assert holm([0.01, float("nan"), 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]
    pred = {"class_names": ["a", "b", "c"], "image_ids": [str(i) for i in range(21)], "y_true": y, "probs": pa}
    comp = compare_predictions(pred, {**pred, "probs": pb})
    c_row = comp["per_class"][2]
    assert c_row["delong"]["p"] is None and c_row["delong"]["p_holm"] is None and "single" in c_row["delong"]["note"]
    assert comp["per_class"][0]["delong"]["p_holm"] is not None
    text = json.dumps(comp, allow_nan=False)  # strict JSON: no NaN, no Infinity
    assert "pROC gives NA" in text
    from medse.compare.classifier import comparison_table
    from medse.evaluation.classification import classification_metrics

    md = comparison_table(comp)
    assert "| c | 1 |" in md and "[n/a]" in md and "pROC gives NA" in md
    m = classification_metrics(y, pa, ["a", "b", "c"])
    assert m["per_class"]["c"]["auc_ci"] == [None, None] and "single positive" in m["per_class"]["c"]["note"]
    json.dumps(m, allow_nan=False)
    from medse.evaluation.classification import metrics_table

    assert "[CI n/a]" in metrics_table(m)
