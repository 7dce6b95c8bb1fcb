"""Metrics of a classifier's predictions: per-class (one-vs-rest) AUC with its DeLong confidence interval,
sensitivity, specificity, precision, F1; accuracy, balanced accuracy, macro and micro AUC, the confusion matrix.

* AUC and its variance by DeLong, DeLong and Clarke-Pearson, "Comparing the areas under two or more correlated
  receiver operating characteristic curves: a nonparametric approach", Biometrics 44 (1988), computed with the
  fast midrank algorithm of Sun and Xu, "Fast implementation of DeLong's algorithm for comparing the areas under
  correlated receiver operating characteristic curves", IEEE Signal Processing Letters 21 (2014), O(N log N).
  Sample (co)variances use ``ddof=1`` as in DeLong's paper and pROC. Ties count 1/2.
* :func:`delong_ci` (one AUC, normal CI clipped to [0, 1], as pROC's ``ci.auc(method="delong")``);
  :func:`delong_covariance` (the AUCs of several score sets on the same cases and their covariance), which the
  paired tests of :mod:`medse.compare.classifier` build on.

Degenerate inputs, each with a one-line ``note`` (or error) and never a made-up value: a class absent from the
test set (all cases one class) raises :class:`StatisticsError` naming what is missing; a single positive or a
single negative case leaves DeLong's variance (sample variance of one placement value, ``ddof=1``) undefined, so
``variance``/``se``/CI are NaN and ``note`` says why (pROC gives NA); the AUC itself is still reported.
``to_dict()`` writes NaN and infinite values as ``None`` so that results serialise to strict JSON.

Validated in ``tests/test_classify_stats.py`` against pROC's documented aSAH example (Robin et al., BMC
Bioinformatics 12:77, 2011): AUC(s100b) = 0.7314 (DeLong 95% CI 0.6301-0.8326), AUC(ndka) = 0.6121.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

from medse.utils.errors import MedseError

__all__ = [
    "AUCResult",
    "StatResult",
    "StatisticsError",
    "auc_score",
    "classification_metrics",
    "delong_ci",
    "delong_covariance",
    "metrics_rows",
    "metrics_table",
    "midrank",
]


class StatisticsError(MedseError):
    """A statistic is undefined for the given data (e.g. a class with no positive cases)."""


class StatResult:
    """Shared behaviour of the result records: ``to_dict`` for JSON/CSV output."""

    def to_dict(self) -> dict:
        """Fields as a dict; NaN and infinite floats become ``None`` (strict JSON)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class AUCResult(StatResult):
    auc: float
    variance: float
    se: float
    ci_low: float
    ci_high: float
    n_pos: int
    n_neg: int
    note: str = ""


def midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based, ties get the mean of their ranks) of a 1D array, as in Sun and Xu (2014)."""
    x = np.asarray(x, dtype=np.float64)
    xs = np.sort(x)
    left = np.searchsorted(xs, x, side="left")
    right = np.searchsorted(xs, x, side="right")
    return (left + right + 1) / 2.0


def prepare_scores(y_true: Sequence, scores: Sequence | np.ndarray, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
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
    yb, s = prepare_scores(y_true, scores)
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


def single_case_note(n_pos: int, n_neg: int) -> str:
    """The note of a DeLong result whose variance is undefined ('' when it is defined)."""
    if n_pos >= 2 and n_neg >= 2:
        return ""
    which = "positive" if n_pos < 2 else "negative"
    return (f"DeLong variance undefined with a single {which} case ({n_pos} positive, {n_neg} negative): "
            "SE, CI and p are NaN (pROC gives NA)")


def auc_score(y_true: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2); equals ``sklearn.metrics.roc_auc_score``."""
    yb, s = prepare_scores(y_true, scores)
    m, n = int(yb.sum()), int((~yb).sum())
    r = midrank(s[0])
    return float((r[yb].sum() - m * (m + 1) / 2.0) / (m * n))


def zero_if_tiny(v: float) -> float:
    """``v``, or exactly 0 when it is rounding noise (|v| < 1e-15): a variance that is zero stays zero."""
    return 0.0 if abs(v) < 1e-15 else float(v)


def delong_ci(y_true: Sequence, scores: Sequence, alpha: float = 0.05) -> AUCResult:
    """AUC with its DeLong (1 - alpha) confidence interval, ``auc +- z * se`` clipped to [0, 1] as pROC does.

    Args:
        y_true: binary labels. scores: one score per case. alpha: Defaults to 0.05 (95% CI).
    """
    aucs, cov = delong_covariance(y_true, scores)
    yb = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(yb.sum()), int((~yb).sum())
    note = single_case_note(n_pos, n_neg)
    if note:
        nan = math.nan
        return AUCResult(float(aucs[0]), nan, nan, nan, nan, n_pos, n_neg, note)
    auc, var = float(aucs[0]), max(zero_if_tiny(float(cov[0, 0])), 0.0)
    se = math.sqrt(var)
    q = float(_st.norm.ppf(1 - alpha / 2))
    if var == 0.0:
        note = "zero DeLong variance (perfect or constant separation): the CI collapses to the AUC"
    lo, hi = max(0.0, auc - q * se), min(1.0, auc + q * se)
    return AUCResult(auc, var, se, lo, hi, int(yb.sum()), int((~yb).sum()), note)



# ----------------------------------------------------------------------------------------------- metrics
def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num / den)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                           alpha: float = 0.05) -> dict[str, Any]:
    """Per-class (one-vs-rest) and overall metrics. Undefined values are ``None`` with a ``note``, never NaN.

    Per class: ``n``, ``auc``, ``auc_ci`` (DeLong), ``sensitivity``, ``specificity``, ``precision``, ``f1``.
    Overall: ``accuracy``, ``balanced_accuracy``, ``macro_auc`` (mean of the defined per-class AUCs),
    ``micro_auc`` (AUC of all one-vs-rest decisions pooled), ``confusion_matrix`` (rows true, columns predicted).
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), k):
        raise MedseError(f"probabilities of shape {p.shape} do not match {len(y)} labels and {k} classes")
    yhat = p.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, yhat), 1)
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        tp, fn = int(cm[c, c]), int(cm[c].sum() - cm[c, c])
        fp = int(cm[:, c].sum() - cm[c, c])
        tn = int(cm.sum() - tp - fn - fp)
        sens, spec, prec = _ratio(tp, tp + fn), _ratio(tn, tn + fp), _ratio(tp, tp + fp)
        f1 = None if (sens is None or prec is None or sens + prec == 0) else 2 * sens * prec / (sens + prec)
        row: dict[str, Any] = {"n": tp + fn, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": sens,
                               "specificity": spec, "precision": prec, "f1": f1, "auc": None, "auc_ci": None,
                               "auc_se": None, "note": ""}
        try:
            r = delong_ci(y == c, p[:, c], alpha)
            rd = r.to_dict()  # NaN (undefined variance) -> None
            row.update(auc=rd["auc"], auc_ci=[rd["ci_low"], rd["ci_high"]], auc_se=rd["se"], note=r.note)
        except StatisticsError as e:
            row["note"] = f"class '{name}': {e}"
        if prec is None:
            msg = f"class '{name}': precision and F1 undefined (class never predicted)"
            row["note"] = f"{row['note']}; {msg}" if row["note"] else msg
        per_class[name] = row
    aucs = [r["auc"] for r in per_class.values() if r["auc"] is not None]
    onehot = np.eye(k)[y]
    try:
        micro = auc_score(onehot.ravel(), p.ravel())
    except StatisticsError:
        micro = None
    recalls = [r["sensitivity"] for r in per_class.values() if r["sensitivity"] is not None]
    return {
        "n": int(len(y)),
        "class_names": list(class_names),
        "accuracy": float((yhat == y).mean()) if len(y) else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "micro_auc": micro,
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }


def fmt_value(v: Any, digits: int = 3) -> str:
    """A table cell: ``n/a`` for an undefined value, floats to ``digits`` decimals."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)



def metrics_rows(m: dict, model: str = "") -> list[dict[str, Any]]:
    """The long rows of ``metrics.csv`` (model, class, metric, value) of :func:`classification_metrics`' result."""
    rows = []
    for name, r in m["per_class"].items():
        for key in ("n", "auc", "sensitivity", "specificity", "precision", "f1"):
            rows.append({"model": model, "class": name, "metric": key, "value": r[key]})
        if r["auc_ci"]:
            rows.append({"model": model, "class": name, "metric": "auc_ci_low", "value": r["auc_ci"][0]})
            rows.append({"model": model, "class": name, "metric": "auc_ci_high", "value": r["auc_ci"][1]})
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "micro_auc"):
        rows.append({"model": model, "class": "overall", "metric": key, "value": m[key]})
    return rows



def metrics_table(m: dict, title: str = "") -> str:
    """Markdown table: one row per class (precision, recall, F1, specificity, AUC [95% CI]) and an overall row."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| Class | n | Precision | Recall (sensitivity) | Specificity | F1 | AUC [95% CI, DeLong] |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in m["per_class"].items():
        ci = "" if not r["auc_ci"] else " [CI n/a]" if r["auc_ci"][0] is None else \
            f" [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"
        lines.append(f"| {name} | {r['n']} | {fmt_value(r['precision'])} | {fmt_value(r['sensitivity'])} | "
                     f"{fmt_value(r['specificity'])} | {fmt_value(r['f1'])} | {fmt_value(r['auc'])}{ci} |")
    lines.append(f"| **overall** | {m['n']} | | accuracy {fmt_value(m['accuracy'])} | | | macro {fmt_value(m['macro_auc'])}, "
                 f"micro {fmt_value(m['micro_auc'])} |")
    notes = [r["note"] for r in m["per_class"].values() if r["note"]]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


