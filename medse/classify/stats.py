"""Statistics for comparing classifiers on the same test images.

* AUC and its variance by DeLong, DeLong and Clarke-Pearson, "Comparing the areas under two or more correlated
  receiver operating characteristic curves: a nonparametric approach", Biometrics 44 (1988), computed with the
  fast midrank algorithm of Sun and Xu, "Fast implementation of DeLong's algorithm for comparing the areas under
  correlated receiver operating characteristic curves", IEEE Signal Processing Letters 21 (2014), O(N log N).
  Sample (co)variances use ``ddof=1`` as in DeLong's paper and pROC. Ties count 1/2.
* :func:`delong_ci` (one AUC, normal CI clipped to [0, 1], as pROC's ``ci.auc(method="delong")``) and
  :func:`delong_test` (paired test of two AUCs on the same cases, as pROC's ``roc.test(method="delong")``).
* :func:`mcnemar_test`: PAIRED test of correctness of two models on the same images. Exact two-sided binomial
  test on the discordant pairs when there are fewer than 25 of them, otherwise the chi-square statistic with
  Edwards' continuity correction, ``(|b - c| - 1)^2 / (b + c)``, 1 degree of freedom.
* :func:`two_proportion_ztest`: the pooled two-proportion Z-test used by the 2025 ResNet50V2-SE brain-tumour
  study. It is UNPAIRED: it treats the two models' predictions as independent samples although both models
  saw the same images, so it is reported for comparison only; McNemar and DeLong are the paired tests.
* :func:`holm`: Holm's step-down adjustment (Holm, Scand. J. Statist. 6, 1979) across classes.

Degenerate inputs, each with a one-line ``note`` (or error) and never a made-up p-value:

* a class absent from the test set (all cases one class): :class:`StatisticsError` naming what is missing;
* a single positive or a single negative case: DeLong's variance (sample variance of one placement value,
  ``ddof=1``) is undefined, so ``variance``/``se``/CI/``z``/``p`` are NaN and ``note`` says why (pROC gives NA);
  the AUC itself is still reported;
* zero variance (perfect separation, constant scores, identical models): a result with ``note`` set
  (``p = 1`` when the AUCs are equal, ``p = 0`` and ``z = +-inf`` otherwise).

``to_dict()`` writes NaN and infinite values as ``None`` so that results serialise to strict JSON.

Validated in ``tests/test_classify_stats.py`` against pROC's documented aSAH example (Robin et al., BMC
Bioinformatics 12:77, 2011): AUC(s100b) = 0.7314 (DeLong 95% CI 0.6301-0.8326), AUC(ndka) = 0.6121, paired DeLong
test s100b vs ndka Z = 1.3908, p = 0.1643.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

from medse.utils.errors import MedseError

__all__ = [
    "AUCResult",
    "DeLongResult",
    "MacroDeLongResult",
    "McNemarResult",
    "StatisticsError",
    "ZTestResult",
    "auc_score",
    "delong_ci",
    "delong_covariance",
    "delong_macro_test",
    "delong_test",
    "holm",
    "mcnemar_test",
    "midrank",
    "two_proportion_ztest",
]

#: Discordant pairs below which McNemar's test uses the exact binomial distribution.
MCNEMAR_EXACT_BELOW = 25


class StatisticsError(MedseError):
    """A statistic is undefined for the given data (e.g. a class with no positive cases)."""


class _Result:
    """Shared behaviour of the result records: ``to_dict`` for JSON/CSV output."""

    def to_dict(self) -> dict:
        """Fields as a dict; NaN and infinite floats become ``None`` (strict JSON)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class _PairedAUCs(_Result):
    """Fields shared by the paired AUC comparisons (``diff = auc_b - auc_a``)."""

    auc_a: float
    auc_b: float
    diff: float
    ci_low: float
    ci_high: float
    se: float
    z: float
    p: float
    var_a: float
    var_b: float
    cov: float


@dataclass
class AUCResult(_Result):
    auc: float
    variance: float
    se: float
    ci_low: float
    ci_high: float
    n_pos: int
    n_neg: int
    note: str = ""


@dataclass
class DeLongResult(_PairedAUCs):
    """Paired DeLong test of two correlated AUCs; ``diff = auc_b - auc_a``."""

    n_pos: int
    n_neg: int
    note: str = ""
    paired: bool = True


@dataclass
class MacroDeLongResult(_PairedAUCs):
    """Paired test of two macro (mean one-vs-rest) AUCs; ``diff = auc_b - auc_a``; ``classes``: those averaged."""

    n: int
    classes: list[int]
    note: str = ""
    paired: bool = True


@dataclass
class McNemarResult(_Result):
    """McNemar's paired test. ``b``: A right and B wrong; ``c``: A wrong and B right."""

    b: int
    c: int
    n: int
    statistic: float
    p: float
    method: str
    note: str = ""
    paired: bool = True


@dataclass
class ZTestResult(_Result):
    """Pooled two-proportion Z-test (UNPAIRED); ``z > 0`` when proportion B exceeds proportion A."""

    p_a: float
    p_b: float
    n_a: int
    n_b: int
    z: float
    p: float
    note: str = ""
    paired: bool = False


def midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based, ties get the mean of their ranks) of a 1D array, as in Sun and Xu (2014)."""
    x = np.asarray(x, dtype=np.float64)
    xs = np.sort(x)
    left = np.searchsorted(xs, x, side="left")
    right = np.searchsorted(xs, x, side="right")
    return (left + right + 1) / 2.0


def _prepare(y_true: Sequence, scores: Sequence | np.ndarray, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if y.ndim != 1:
        raise StatisticsError(f"y_true must be 1D, got shape {y.shape}")
    if s.shape[1] != len(y):
        raise StatisticsError(f"{what} has {s.shape[1]} values but y_true has {len(y)}")
    if not np.all(np.isfinite(s)):
        raise StatisticsError(f"{what} contains NaN or infinite values")
    if y.dtype == bool:
        yb = y
    else:
        vals = set(np.unique(y).tolist())
        if not vals <= {0, 1}:
            raise StatisticsError(f"y_true must be binary (0/1 or bool), got values {sorted(vals)[:5]}")
        yb = y.astype(bool)
    m, n = int(yb.sum()), int((~yb).sum())
    if m == 0 or n == 0:
        missing = "positive" if m == 0 else "negative"
        raise StatisticsError(f"AUC undefined: the test set has no {missing} cases ({m} positive, {n} negative)")
    return yb, s


def delong_covariance(y_true: Sequence, scores: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for ``k`` score vectors on the same cases (Sun and Xu 2014).

    Args:
        y_true: binary labels (1 = positive), length N.
        scores: array ``(k, N)`` or ``(N,)``; larger means more likely positive.

    Returns:
        ``(aucs (k,), covariance (k, k))`` with ``S = S10 / m + S01 / n`` (ddof=1); the covariance is NaN when
        there is a single positive or a single negative case (a sample variance of one value is undefined).
    """
    yb, s = _prepare(y_true, scores)
    pos, neg = s[:, yb], s[:, ~yb]
    m, n = pos.shape[1], neg.shape[1]
    k = s.shape[0]
    tx = np.stack([midrank(pos[r]) for r in range(k)])
    ty = np.stack([midrank(neg[r]) for r in range(k)])
    tz = np.stack([midrank(np.concatenate([pos[r], neg[r]])) for r in range(k)])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    if m < 2 or n < 2:
        return aucs, np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return aucs, s10 / m + s01 / n


def _single_case_note(n_pos: int, n_neg: int) -> str:
    """The note of a DeLong result whose variance is undefined ('' when it is defined)."""
    if n_pos >= 2 and n_neg >= 2:
        return ""
    which = "positive" if n_pos < 2 else "negative"
    return (f"DeLong variance undefined with a single {which} case ({n_pos} positive, {n_neg} negative): "
            "SE, CI and p are NaN (pROC gives NA)")


def _influence(yb: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray]:
    """AUC and per-case DeLong placement terms, scaled so that ``sum(infl_a * infl_b)`` is DeLong's covariance.

    Positive case i: ``(V10_i - AUC) / sqrt(m (m - 1))``; negative case j: ``(V01_j - AUC) / sqrt(n (n - 1))``.
    """
    pos, neg = s[yb], s[~yb]
    m, n = len(pos), len(neg)
    tz = midrank(np.concatenate([pos, neg]))
    auc = tz[:m].sum() / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:m] - midrank(pos)) / n
    v01 = 1.0 - (tz[m:] - midrank(neg)) / m
    infl = np.zeros(len(s))
    if m > 1:
        infl[yb] = (v10 - auc) / math.sqrt(m * (m - 1))
    if n > 1:
        infl[~yb] = (v01 - auc) / math.sqrt(n * (n - 1))
    return float(auc), infl


def delong_macro_test(y_true: Sequence, probs_a: np.ndarray, probs_b: np.ndarray,
                      alpha: float = 0.05) -> MacroDeLongResult:
    """Paired test of the macro (one-vs-rest, mean over classes) AUC of two multi-class models on the same images.

    The variance of the mean of the per-class AUC differences is ``sum_i (mean_c d_ci)^2`` over images, where
    ``d_ci`` is the difference of the two models' DeLong placement terms of image i for class c; with one class it
    is exactly DeLong's variance of the AUC difference. NOTE: not in DeLong 1988 / Sun and Xu 2014: medse's
    extension of the placement-value (structural-components) variance to the macro average; checked against a paired
    bootstrap in the tests. Classes absent from ``y_true`` (no positives) are left out and named in ``note``.

    Args:
        y_true: integer class labels (N,). probs_a, probs_b: scores (N, K) of models A and B. alpha: Defaults to 0.05.
    """
    y = np.asarray(y_true)
    pa, pb = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if pa.shape != pb.shape or pa.ndim != 2 or pa.shape[0] != len(y):
        raise StatisticsError(f"probabilities must both be (N, K) with N = {len(y)}, got {pa.shape} and {pb.shape}")
    if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(pb))):
        raise StatisticsError("probabilities contain NaN or infinite values")
    used, skipped, single = [], [], []
    infl_a, infl_b = np.zeros(len(y)), np.zeros(len(y))
    aucs_a, aucs_b = [], []
    for c in range(pa.shape[1]):
        yb = y == c
        if yb.all() or not yb.any():
            skipped.append(c)
            continue
        if yb.sum() < 2 or (~yb).sum() < 2:
            single.append(c)
        a, ia = _influence(yb, pa[:, c])
        b, ib = _influence(yb, pb[:, c])
        aucs_a.append(a)
        aucs_b.append(b)
        infl_a += ia
        infl_b += ib
        used.append(c)
    if not used:
        raise StatisticsError("macro AUC undefined: no class has both positive and negative cases")
    infl_a /= len(used)
    infl_b /= len(used)
    var_a, var_b = _clean(float(np.sum(infl_a**2))), _clean(float(np.sum(infl_b**2)))
    cov = _clean(float(np.sum(infl_a * infl_b)))
    var = max(_clean(float(np.sum((infl_b - infl_a) ** 2))), 0.0)
    auc_a, auc_b = float(np.mean(aucs_a)), float(np.mean(aucs_b))
    diff = auc_b - auc_a
    q = float(_st.norm.ppf(1 - alpha / 2))
    notes = [f"classes left out (absent from the test set): {skipped}"] if skipped else []
    if single:
        notes.append(f"variance undefined: classes {single} have a single positive or a single negative case; "
                     "SE, CI and p are NaN (pROC gives NA)")
        nan = math.nan
        return MacroDeLongResult(auc_a, auc_b, diff, nan, nan, nan, nan, nan, nan, nan, nan, len(y), used,
                                 "; ".join(notes))
    if var <= 1e-14:
        se = 0.0
        if abs(diff) < 1e-12:
            diff, z, p = 0.0, 0.0, 1.0
            notes.append("zero variance of the macro AUC difference: no evidence of a difference")
        else:
            z, p = math.copysign(math.inf, diff), 0.0
            notes.append("zero variance with unequal macro AUCs: the test is degenerate")
    else:
        se = math.sqrt(var)
        z = diff / se
        p = float(2 * _st.norm.sf(abs(z)))
    return MacroDeLongResult(auc_a, auc_b, diff, diff - q * se, diff + q * se, se, float(z), p, var_a, var_b, cov,
                             len(y), used, "; ".join(notes))


def auc_score(y_true: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2); equals ``sklearn.metrics.roc_auc_score``."""
    yb, s = _prepare(y_true, scores)
    m, n = int(yb.sum()), int((~yb).sum())
    r = midrank(s[0])
    return float((r[yb].sum() - m * (m + 1) / 2.0) / (m * n))


def _clean(v: float) -> float:
    return 0.0 if abs(v) < 1e-15 else float(v)


def delong_ci(y_true: Sequence, scores: Sequence, alpha: float = 0.05) -> AUCResult:
    """AUC with its DeLong (1 - alpha) confidence interval, ``auc +- z * se`` clipped to [0, 1] as pROC does.

    Args:
        y_true: binary labels. scores: one score per case. alpha: Defaults to 0.05 (95% CI).
    """
    aucs, cov = delong_covariance(y_true, scores)
    yb = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(yb.sum()), int((~yb).sum())
    note = _single_case_note(n_pos, n_neg)
    if note:
        nan = math.nan
        return AUCResult(float(aucs[0]), nan, nan, nan, nan, n_pos, n_neg, note)
    auc, var = float(aucs[0]), max(_clean(float(cov[0, 0])), 0.0)
    se = math.sqrt(var)
    q = float(_st.norm.ppf(1 - alpha / 2))
    if var == 0.0:
        note = "zero DeLong variance (perfect or constant separation): the CI collapses to the AUC"
    lo, hi = max(0.0, auc - q * se), min(1.0, auc + q * se)
    return AUCResult(auc, var, se, lo, hi, int(yb.sum()), int((~yb).sum()), note)


def delong_test(y_true: Sequence, scores_a: Sequence, scores_b: Sequence, alpha: float = 0.05) -> DeLongResult:
    """Paired DeLong test of two AUCs measured on the same cases (fast algorithm of Sun and Xu 2014).

    Returns both AUCs, ``diff = auc_b - auc_a`` with its (1 - alpha) normal CI, ``z = diff / se`` and the two-sided
    p-value. When the variance of the difference is 0 (e.g. both models separate the classes perfectly)
    the result has ``z = 0, p = 1`` if the AUCs are equal (``z = +-inf, p = 0`` otherwise) and a ``note``.
    With a single positive or a single negative case the variance is undefined: ``se``, CI, ``z`` and ``p``
    are NaN with a ``note`` (pROC's ``roc.test`` gives NA).
    """
    sa = np.asarray(scores_a, dtype=np.float64)
    sb = np.asarray(scores_b, dtype=np.float64)
    if sa.shape != sb.shape:
        raise StatisticsError(f"scores_a and scores_b differ in shape: {sa.shape} vs {sb.shape}")
    aucs, cov = delong_covariance(y_true, np.stack([sa, sb]))
    yb = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(yb.sum()), int((~yb).sum())
    single = _single_case_note(n_pos, n_neg)
    if single:
        nan = math.nan
        return DeLongResult(float(aucs[0]), float(aucs[1]), float(aucs[1] - aucs[0]), nan, nan, nan, nan, nan,
                            nan, nan, nan, n_pos, n_neg, single)
    var_a, var_b, c = _clean(cov[0, 0]), _clean(cov[1, 1]), _clean(cov[0, 1])
    var = _clean(var_a + var_b - 2 * c)
    var = max(var, 0.0)
    diff = float(aucs[1] - aucs[0])
    q = float(_st.norm.ppf(1 - alpha / 2))
    note = ""
    if var <= 1e-14:
        se = 0.0
        if abs(diff) < 1e-12:
            diff, z, p = 0.0, 0.0, 1.0
            note = ("zero variance of the AUC difference (identical rankings or perfect separation): "
                    "no evidence of a difference")
        else:
            z, p = math.copysign(math.inf, diff), 0.0
            note = "zero variance of the AUC difference with unequal AUCs: the test is degenerate"
    else:
        se = math.sqrt(var)
        z = diff / se
        p = float(2 * _st.norm.sf(abs(z)))
    return DeLongResult(
        float(aucs[0]), float(aucs[1]), diff, diff - q * se, diff + q * se, se, float(z), p,
        var_a, var_b, c, int(yb.sum()), int((~yb).sum()), note,
    )


def mcnemar_test(correct_a: Sequence, correct_b: Sequence, exact: bool | None = None) -> McNemarResult:
    """McNemar's paired test that two models are right equally often on the same images.

    Args:
        correct_a: per-image correctness of model A (bool). correct_b: same for model B.
        exact: True for the exact binomial test, False for chi-square with continuity correction. Defaults to
            None: exact when the discordant count ``b + c`` is below 25, chi-square otherwise.
    """
    a = np.asarray(correct_a).astype(bool)
    bb = np.asarray(correct_b).astype(bool)
    if a.shape != bb.shape or a.ndim != 1:
        raise StatisticsError(f"correct_a and correct_b must be 1D of equal length, got {a.shape} and {bb.shape}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    nd = b + c
    if exact is None:
        exact = nd < MCNEMAR_EXACT_BELOW
    if nd == 0:
        return McNemarResult(b, c, len(a), 0.0, 1.0, "exact binomial" if exact else "chi-square (continuity corrected)",
                             "no discordant pairs: the models are right on exactly the same images")
    if exact:
        # two-sided exact binomial test with p = 1/2 (symmetric, so twice the smaller tail)
        p = min(1.0, 2.0 * float(_st.binom.cdf(min(b, c), nd, 0.5)))
        return McNemarResult(b, c, len(a), float(min(b, c)), p, "exact binomial")
    stat = (abs(b - c) - 1.0) ** 2 / nd
    return McNemarResult(b, c, len(a), float(stat), float(_st.chi2.sf(stat, 1)), "chi-square (continuity corrected)")


def two_proportion_ztest(k_a: int, n_a: int, k_b: int, n_b: int) -> ZTestResult:
    """Pooled two-proportion Z-test, ``z = (p_b - p_a) / sqrt(p (1 - p) (1/n_a + 1/n_b))``. UNPAIRED.

    This is the test the 2025 brain-tumour study used; it assumes independent samples, which two models
    evaluated on the same images are not. Prefer :func:`mcnemar_test` for paired correctness.
    """
    if n_a <= 0 or n_b <= 0:
        raise StatisticsError(f"two-proportion test needs n > 0 in both groups, got {n_a} and {n_b}")
    if not (0 <= k_a <= n_a and 0 <= k_b <= n_b):
        raise StatisticsError(f"counts out of range: {k_a}/{n_a}, {k_b}/{n_b}")
    pa, pb = k_a / n_a, k_b / n_b
    pool = (k_a + k_b) / (n_a + n_b)
    var = pool * (1 - pool) * (1 / n_a + 1 / n_b)
    if var == 0:
        return ZTestResult(pa, pb, n_a, n_b, 0.0, 1.0, "both proportions are 0 or both are 1: no difference")
    z = (pb - pa) / math.sqrt(var)
    return ZTestResult(pa, pb, n_a, n_b, float(z), float(2 * _st.norm.sf(abs(z))))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (:func:`medse.compare.stats.holm`); ``None`` and NaN entries
    (undefined tests) are skipped (they do not count in m) and come back as ``None``."""
    from medse.compare.stats import holm as holm_array

    raw = [float("nan") if p is None else float(p) for p in pvalues]
    try:
        adj = holm_array(raw)
    except ValueError as e:
        raise StatisticsError(str(e)) from None
    return [None if math.isnan(v) else float(v) for v in adj]
