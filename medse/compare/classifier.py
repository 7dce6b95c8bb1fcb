"""Paired comparison of two classifiers on the same test images: tests, tables and the ``medse classify compare``
output.

* :func:`delong_test`: paired test of two AUCs on the same cases (DeLong 1988 with Sun and Xu's 2014 fast
  algorithm, as pROC's ``roc.test(method="delong")``); :func:`delong_macro_test`: the same for the macro AUC.
* :func:`mcnemar_test`: PAIRED test of correctness of two models on the same images. Exact two-sided binomial
  test on the discordant pairs when there are fewer than 25 of them, otherwise the chi-square statistic with
  Edwards' continuity correction, ``(|b - c| - 1)^2 / (b + c)``, 1 degree of freedom.
* :func:`two_proportion_ztest`: the pooled two-proportion Z-test used by the 2025 ResNet50V2-SE brain-tumour
  study. It is UNPAIRED: it treats the two models' predictions as independent samples although both models
  saw the same images, so it is reported for comparison only; McNemar and DeLong are the paired tests.
* :func:`holm`: Holm's step-down adjustment (Holm, Scand. J. Statist. 6, 1979) across classes.

Degenerate inputs give a one-line ``note`` (or :class:`~medse.evaluation.classification.StatisticsError`) and
never a made-up p-value: a single positive or negative case makes ``se``/CI/``z``/``p`` NaN; zero variance
(perfect separation, constant scores, identical models) gives ``p = 1`` when the AUCs are equal, ``p = 0`` and
``z = +-inf`` otherwise. Validated in ``tests/test_classify_stats.py`` against pROC's aSAH example: paired DeLong
test s100b vs ndka Z = 1.3908, p = 0.1643.

``compare_runs(baseline, candidate, output)`` evaluates both runs on the same images and adds, per class and
overall, the paired DeLong test of the AUCs, McNemar's paired test of correctness and the two-proportion Z-test
(labelled UNPAIRED), each Holm-corrected across classes; writes ``comparison.json``, ``comparison.csv``,
``comparison.md`` (a table in the study's style), ``roc_<class>.png`` (both models on one plot) and
``confusion.png`` (both models side by side); ``baseline/`` and ``candidate/`` hold each model's predictions and
metrics. Per-class correctness tests use the images of that class (per-class recall), which is the proportion the
study's Z-test compares; overall tests use every image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as _st

from medse.classify.evaluate import (
    evaluate_predictions,
    plot_confusion,
    plot_roc,
    predict_run,
    read_predictions,
    write_rows,
)
from medse.evaluation.classification import (
    StatisticsError,
    StatResult,
    classification_metrics,
    delong_covariance,
    fmt_value,
    midrank,
    single_case_note,
    zero_if_tiny,
)
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

__all__ = [
    "DeLongResult",
    "MacroDeLongResult",
    "McNemarResult",
    "ZTestResult",
    "compare_predictions",
    "compare_runs",
    "comparison_table",
    "delong_macro_test",
    "delong_test",
    "holm",
    "mcnemar_test",
    "two_proportion_ztest",
]

#: Discordant pairs below which McNemar's test uses the exact binomial distribution.
MCNEMAR_EXACT_BELOW = 25



@dataclass
class _PairedAUCs(StatResult):
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
class McNemarResult(StatResult):
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
class ZTestResult(StatResult):
    """Pooled two-proportion Z-test (UNPAIRED); ``z > 0`` when proportion B exceeds proportion A."""

    p_a: float
    p_b: float
    n_a: int
    n_b: int
    z: float
    p: float
    note: str = ""
    paired: bool = False


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
    var_a, var_b = zero_if_tiny(float(np.sum(infl_a**2))), zero_if_tiny(float(np.sum(infl_b**2)))
    cov = zero_if_tiny(float(np.sum(infl_a * infl_b)))
    var = max(zero_if_tiny(float(np.sum((infl_b - infl_a) ** 2))), 0.0)
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
    single = single_case_note(n_pos, n_neg)
    if single:
        nan = math.nan
        return DeLongResult(float(aucs[0]), float(aucs[1]), float(aucs[1] - aucs[0]), nan, nan, nan, nan, nan,
                            nan, nan, nan, n_pos, n_neg, single)
    var_a, var_b, c = zero_if_tiny(cov[0, 0]), zero_if_tiny(cov[1, 1]), zero_if_tiny(cov[0, 1])
    var = zero_if_tiny(var_a + var_b - 2 * c)
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


# ----------------------------------------------------------------------------------------------- comparison
def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"



def _align(a: dict, b: dict) -> None:
    if a["class_names"] != b["class_names"]:
        raise MedseError(f"baseline and candidate have different classes: {a['class_names']} vs {b['class_names']}")
    if a["image_ids"] != b["image_ids"]:
        sa, sb = set(a["image_ids"]), set(b["image_ids"])
        raise MedseError(
            f"baseline and candidate were tested on different images ({len(sa)} vs {len(sb)}, {len(sa & sb)} shared); "
            "train both with the same data and seed, or pass --data to evaluate both on one set"
        )
    pa = [str(Path(x).resolve()) for x in a.get("paths", a["image_ids"])]
    pb = [str(Path(x).resolve()) for x in b.get("paths", b["image_ids"])]
    if pa != pb:
        i = next(k for k, (x, y) in enumerate(zip(pa, pb, strict=True)) if x != y)
        raise MedseError(f"baseline and candidate read image '{a['image_ids'][i]}' from different files ({pa[i]} vs "
                         f"{pb[i]}); pass --data to evaluate both on one set")
    if not np.array_equal(a["y_true"], b["y_true"]):
        raise MedseError("baseline and candidate disagree on the true labels of the same images")


def compare_predictions(base: dict, cand: dict, alpha: float = 0.05) -> dict[str, Any]:
    """Paired (DeLong, McNemar) and unpaired (two-proportion Z) comparisons, per class and overall, Holm-corrected.

    ``diff`` and ``z`` are candidate minus baseline. Returns a JSON-serialisable dict.
    """
    _align(base, cand)
    names = base["class_names"]
    y = base["y_true"]
    ca = base["probs"].argmax(1) == y
    cb = cand["probs"].argmax(1) == y
    rows: list[dict[str, Any]] = []
    for c, name in enumerate(names):
        row: dict[str, Any] = {"class": name, "n": int((y == c).sum())}
        try:
            d = delong_test(y == c, base["probs"][:, c], cand["probs"][:, c], alpha)
            row["delong"] = d.to_dict()
        except StatisticsError as e:
            row["delong"] = None
            row["delong_note"] = f"class '{name}': {e}"
        mask = y == c
        if mask.any():
            row["mcnemar"] = mcnemar_test(ca[mask], cb[mask]).to_dict()
            row["ztest_unpaired"] = two_proportion_ztest(int(ca[mask].sum()), int(mask.sum()),
                                                         int(cb[mask].sum()), int(mask.sum())).to_dict()
        else:
            row["mcnemar"] = row["ztest_unpaired"] = None
            row["correctness_note"] = f"class '{name}' is absent from the test set"
        rows.append(row)
    for key in ("delong", "mcnemar", "ztest_unpaired"):
        adj = holm([r[key]["p"] if r[key] else None for r in rows])
        for r, a in zip(rows, adj, strict=True):
            if r[key] is not None:
                r[key]["p_holm"] = a
    overall: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy_baseline": float(ca.mean()),
        "accuracy_candidate": float(cb.mean()),
        "mcnemar": mcnemar_test(ca, cb).to_dict(),
        "ztest_unpaired": two_proportion_ztest(int(ca.sum()), len(y), int(cb.sum()), len(y)).to_dict(),
    }
    try:
        overall["delong_macro"] = delong_macro_test(y, base["probs"], cand["probs"], alpha).to_dict()
    except StatisticsError as e:
        overall["delong_macro"] = None
        overall["delong_macro_note"] = str(e)
    return {
        "class_names": names,
        "n": int(len(y)),
        "alpha": alpha,
        "per_class": rows,
        "overall": overall,
        "baseline": classification_metrics(y, base["probs"], names, alpha),
        "candidate": classification_metrics(y, cand["probs"], names, alpha),
        "methods": {
            "delong": "paired DeLong test of AUCs (one-vs-rest), fast algorithm of Sun and Xu 2014; "
                      "diff = candidate - baseline",
            "mcnemar": "paired McNemar test of correctness on the same images: exact binomial if discordant < 25, "
                       "else chi-square with continuity correction; per class on the images of that class",
            "ztest_unpaired": "UNPAIRED pooled two-proportion Z-test (as in the 2025 study) of per-class recall / "
                              "overall accuracy; ignores that both models saw the same images",
            "holm": "Holm step-down correction across classes, per test",
            "delong_macro": "overall: paired test of the macro AUC difference with the DeLong placement-value variance "
                            "of the mean over classes (medse's extension; equals DeLong for one class)",
        },
    }


def comparison_table(comp: dict, base_label: str = "baseline", cand_label: str = "candidate") -> str:
    """Markdown table in the style of the study: per class metrics of both models and the three tests."""
    b, c = comp["baseline"], comp["candidate"]
    lines = [
        f"| Class | n | {base_label} recall | {cand_label} recall | {base_label} F1 | {cand_label} F1 | "
        f"{base_label} AUC [95% CI] | {cand_label} AUC [95% CI] | ΔAUC [95% CI] | DeLong p (Holm) | "
        "McNemar p (Holm) | Z-test, unpaired: Z, p (Holm) |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|",
    ]

    def auc_s(r: dict) -> str:
        if r["auc"] is None:
            return "n/a"
        return f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]" if r["auc_ci"][0] is not None else \
            f"{r['auc']:.3f} [n/a]"

    for row in comp["per_class"]:
        name = row["class"]
        rb, rc = b["per_class"][name], c["per_class"][name]
        d, mc, z = row["delong"], row["mcnemar"], row["ztest_unpaired"]
        dl = "n/a" if not d else f"{d['diff']:+.3f} [n/a]" if d["ci_low"] is None else \
            f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        dp = f"{_fmt_p(d['p'])} ({_fmt_p(d['p_holm'])})" if d else "n/a"
        mp = f"{_fmt_p(mc['p'])} ({_fmt_p(mc['p_holm'])})" if mc else "n/a"
        zs = f"{z['z']:.3f}, {_fmt_p(z['p'])} ({_fmt_p(z['p_holm'])})" if z else "n/a"
        lines.append(f"| {name} | {row['n']} | {fmt_value(rb['sensitivity'])} | {fmt_value(rc['sensitivity'])} | "
                     f"{fmt_value(rb['f1'])} | {fmt_value(rc['f1'])} | {auc_s(rb)} | {auc_s(rc)} | {dl} | {dp} | {mp} | {zs} |")
    o = comp["overall"]
    dm = o.get("delong_macro")
    dml = "n/a" if not dm else f"{dm['diff']:+.3f} [n/a]" if dm["ci_low"] is None else \
        f"{dm['diff']:+.3f} [{dm['ci_low']:+.3f}, {dm['ci_high']:+.3f}]"
    lines.append(
        f"| **overall** | {o['n']} | acc {o['accuracy_baseline']:.3f} | acc {o['accuracy_candidate']:.3f} | | | "
        f"macro {fmt_value(b['macro_auc'])} | macro {fmt_value(c['macro_auc'])} | {dml} | {_fmt_p(dm['p']) if dm else 'n/a'} | "
        f"{_fmt_p(o['mcnemar']['p'])} | {o['ztest_unpaired']['z']:.3f}, {_fmt_p(o['ztest_unpaired']['p'])} |"
    )
    notes = ["", "Paired tests: DeLong (AUC, one-vs-rest; overall: macro AUC, medse's placement-value extension) and "
             "McNemar (correctness on the same images; "
             f"{o['mcnemar']['method']} overall). The two-proportion Z-test is UNPAIRED (as used by the 2025 study) "
             "and is shown for comparison only. Per-class correctness = recall on that class's images. "
             "p-values in brackets: Holm-adjusted across classes."]
    for row in comp["per_class"]:
        for key in ("delong_note", "correctness_note"):
            if row.get(key):
                notes.append(f"- {row[key]}")
        if row.get("delong") and row["delong"].get("note"):
            notes.append(f"- {row['class']}: {row['delong']['note']}")
    return "\n".join(lines + notes) + "\n"


def compare_runs(baseline: str | Path, candidate: str | Path, output: str | Path, data: str | Path | None = None,
                 checkpoint: str = "best", split: str = "test", progress: bool = True) -> dict:
    """Evaluate two runs on the same images and write the comparison (see module docstring)."""
    baseline, candidate, out = Path(baseline), Path(candidate), Path(output)
    out.mkdir(parents=True, exist_ok=True)
    preds = {}
    for label, run in (("baseline", baseline), ("candidate", candidate)):
        if (run / "predictions.csv").is_file() and not (run / "config.yaml").exists():
            preds[label] = read_predictions(run / "predictions.csv")  # an evaluation folder
        else:
            preds[label] = predict_run(run, data, checkpoint, split, progress=progress)
        evaluate_predictions(preds[label], out / label, f"{label}: {run.name}", plots=False)
    comp = compare_predictions(preds["baseline"], preds["candidate"])
    comp["baseline_run"], comp["candidate_run"] = str(baseline), str(candidate)
    atomic_write_text(out / "comparison.json", json.dumps(comp, indent=2) + "\n")
    rows = []
    for r in comp["per_class"]:
        for key in ("delong", "mcnemar", "ztest_unpaired"):
            if r[key]:
                rows.append({"class": r["class"], "test": key, "paired": r[key]["paired"],
                             "statistic": r[key].get("z", r[key].get("statistic")), "p": r[key]["p"],
                             "p_holm": r[key]["p_holm"], "diff": r[key].get("diff"), "note": r[key].get("note", "")})
    for key in ("delong_macro", "mcnemar", "ztest_unpaired"):
        o = comp["overall"].get(key)
        if not o:
            continue
        rows.append({"class": "overall", "test": key, "paired": o["paired"],
                     "statistic": o.get("z", o.get("statistic")), "p": o["p"], "p_holm": None, "diff": o.get("diff"),
                     "note": o.get("note", "")})
    write_rows(out / "comparison.csv", rows)
    bl, cl = f"baseline ({baseline.name})", f"candidate ({candidate.name})"
    atomic_write_text(out / "comparison.md", comparison_table(comp, "base", "cand").replace(
        "| Class |", f"<!-- base = {bl}; cand = {cl} -->\n| Class |", 1))
    labels = {bl: preds["baseline"], cl: preds["candidate"]}
    for name in comp["class_names"]:
        plot_roc(labels, out / f"roc_{name}.png", classes=[name])
    plot_confusion({bl: np.array(comp["baseline"]["confusion_matrix"]),
                    cl: np.array(comp["candidate"]["confusion_matrix"])}, comp["class_names"], out / "confusion.png")
    return comp
