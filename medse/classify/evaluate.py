"""Evaluation and comparison of classifier runs on the same test images.

``evaluate_run(run, output)`` writes ``predictions.csv`` (one row per image: id, path, true class, predicted class,
one probability column per class), ``metrics.json`` / ``metrics.csv`` (per class one-vs-rest: AUC with DeLong 95% CI,
sensitivity, specificity, precision, F1; overall accuracy, macro and micro AUC, confusion matrix), ``table.md``,
``roc.png`` and ``confusion.png``.

``compare_runs(baseline, candidate, output)`` evaluates both on the same images and adds, per class and overall,
the paired DeLong test of the AUCs, McNemar's paired test of correctness and the two-proportion Z-test used by the
2025 ResNet50V2-SE study (labelled UNPAIRED), each Holm-corrected across classes; writes ``comparison.json``,
``comparison.csv``, ``comparison.md`` (a table in the study's style), ``roc_<class>.png`` (both models on one plot)
and ``confusion.png`` (both models side by side); ``baseline/`` and ``candidate/`` hold each model's predictions and
metrics.

Per-class correctness tests use the images of that class (did the model call them correctly, i.e. per-class
recall), which is the proportion the study's Z-test compares; overall tests use every image.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from medse.classify.stats import (
    StatisticsError,
    delong_ci,
    delong_macro_test,
    delong_test,
    holm,
    mcnemar_test,
    two_proportion_ztest,
)
from medse.utils.atomic import atomic_path, atomic_write_text
from medse.utils.errors import MedseError

__all__ = [
    "classification_metrics",
    "compare_predictions",
    "compare_runs",
    "evaluate_run",
    "predict_run",
    "read_predictions",
]


# ----------------------------------------------------------------------------------------------- prediction
def predict_run(run_dir: str | Path, data: str | Path | None = None, checkpoint: str = "best",
                split: str = "test", batch_size: int = 32, device: str = "auto", progress: bool = True) -> dict:
    """Predict class probabilities for a run's test split (or every image of ``data``).

    Returns ``{"class_names", "image_ids", "paths", "y_true" (N,), "probs" (N, K), "skipped": [(id, msg)]}``.
    Unreadable images are skipped and reported, not fatal.
    """
    import torch

    from medse.classify.data import ClassificationDataset
    from medse.classify.train import _device, load_run_data, torch_threads
    from medse.runs import Run
    from medse.utils.progress import progress as progress_bar  # a tqdm bar on a terminal, plain lines otherwise

    run = Run.open(run_dir)
    if run.task != "classification":
        raise MedseError("not a classifier run folder (dataset.json says task 'segmentation')", run.path)
    cfg = run.config
    names = run.dataset.class_names
    ck_path = run.checkpoint_path(checkpoint.removesuffix(".pt") if checkpoint in ("best.pt", "last.pt") else checkpoint)
    model = run.load_model(ck_path)
    dev = _device(device)
    model.to(dev).eval()
    items = load_run_data(run, split, data)
    ds = ClassificationDataset(items, in_channels=cfg.model.in_channels, image_size=cfg.data.image_size,
                               spatial_dims=cfg.model.spatial_dims, normalize=cfg.data.normalize, augment=None,
                               cache=True)
    if len(ds) == 0:
        raise MedseError("no readable test images", items.source)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    probs = []
    with torch.no_grad(), torch_threads(cfg.train.num_threads):
        for x, _, _ in progress_bar(loader, desc=f"predict {run.path.name}", leave=False, disable=not progress):
            probs.append(torch.softmax(model(x.to(dev)).float(), 1).cpu().numpy())
    return {
        "class_names": names,
        "image_ids": [s.image_id for s in ds.samples],
        "paths": [str(s.path) for s in ds.samples],
        "y_true": ds.labels,
        "probs": np.concatenate(probs).astype(np.float64),
        "skipped": ds.skipped,
        "run": str(run.path),
        "checkpoint": str(ck_path),
    }


def _write_predictions(pred: dict, path: Path) -> None:
    names = pred["class_names"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image_id", "path", "true", "predicted", *[f"prob_{n}" for n in names]])
    yhat = pred["probs"].argmax(1)
    for i, image_id in enumerate(pred["image_ids"]):
        w.writerow([image_id, pred["paths"][i], names[pred["y_true"][i]], names[yhat[i]],
                    *[f"{v:.6g}" for v in pred["probs"][i]]])
    atomic_write_text(path, buf.getvalue())


def read_predictions(path: str | Path) -> dict:
    """Read a ``predictions.csv`` back into the dict :func:`predict_run` returns."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise MedseError("predictions file not found", path)
    df = pd.read_csv(path)
    prob_cols = [c for c in df.columns if c.startswith("prob_")]
    names = [c[5:] for c in prob_cols]
    if not prob_cols or "true" not in df.columns or "image_id" not in df.columns:
        raise MedseError("not a medse predictions CSV (needs image_id, true, prob_<class> columns)", path)
    unknown = set(df["true"].astype(str)) - set(names)
    if unknown:
        raise MedseError(f"true class '{sorted(unknown)[0]}' has no prob_ column", path)
    idx = {n: i for i, n in enumerate(names)}
    return {"class_names": names, "image_ids": df["image_id"].astype(str).tolist(),
            "paths": df.get("path", df["image_id"]).astype(str).tolist(),
            "y_true": np.array([idx[v] for v in df["true"].astype(str)]), "probs": df[prob_cols].to_numpy(float),
            "skipped": []}


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
    from medse.classify.stats import auc_score

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


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _metrics_csv(m: dict, model: str = "") -> list[dict[str, Any]]:
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


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def metrics_table(m: dict, title: str = "") -> str:
    """Markdown table: one row per class (precision, recall, F1, specificity, AUC [95% CI]) and an overall row."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| Class | n | Precision | Recall (sensitivity) | Specificity | F1 | AUC [95% CI, DeLong] |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in m["per_class"].items():
        ci = "" if not r["auc_ci"] else " [CI n/a]" if r["auc_ci"][0] is None else \
            f" [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"
        lines.append(f"| {name} | {r['n']} | {_fmt(r['precision'])} | {_fmt(r['sensitivity'])} | "
                     f"{_fmt(r['specificity'])} | {_fmt(r['f1'])} | {_fmt(r['auc'])}{ci} |")
    lines.append(f"| **overall** | {m['n']} | | accuracy {_fmt(m['accuracy'])} | | | macro {_fmt(m['macro_auc'])}, "
                 f"micro {_fmt(m['micro_auc'])} |")
    notes = [r["note"] for r in m["per_class"].values() if r["note"]]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    _plt().close(fig)


def plot_roc(preds: dict[str, dict], path: Path, classes: list[str] | None = None) -> Path:
    """One panel per class (or only ``classes``), every model's one-vs-rest ROC curve with its AUC in the legend."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    first = next(iter(preds.values()))
    names = classes or first["class_names"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        c = first["class_names"].index(name)
        for label, pr in preds.items():
            y = pr["y_true"] == c
            if y.all() or not y.any():
                ax.text(0.5, 0.5, f"'{name}' absent\nor only class", ha="center", va="center")
                continue
            fpr, tpr, _ = roc_curve(y, pr["probs"][:, c])
            auc = delong_ci(y, pr["probs"][:, c])
            ci = "CI n/a" if auc.ci_low != auc.ci_low else f"{auc.ci_low:.3f}, {auc.ci_high:.3f}"
            ax.plot(fpr, tpr, label=f"{label}: AUC {auc.auc:.3f} [{ci}]")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=name, xlim=(0, 1), ylim=(0, 1.01))
        if ax.get_legend_handles_labels()[0]:  # a class absent from y_true draws no curve: nothing to list
            ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_confusion(matrices: dict[str, np.ndarray], class_names: list[str], path: Path) -> Path:
    """Confusion matrices (rows true, columns predicted; counts and row percentages), one panel per model."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.2), squeeze=False)
    for ax, (label, cm) in zip(axes[0], matrices.items(), strict=True):
        cm = np.asarray(cm)
        rows = cm.sum(1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set(xlabel="predicted", ylabel="true", title=label)
    fig.tight_layout()
    _save(fig, path)
    return path


# ----------------------------------------------------------------------------------------------- evaluate
def evaluate_predictions(pred: dict, output: str | Path, title: str = "", plots: bool = True) -> dict:
    """Write predictions.csv, metrics.json/csv, table.md (and with ``plots`` roc.png, confusion.png) for one
    model's predictions."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    m = classification_metrics(pred["y_true"], pred["probs"], pred["class_names"])
    m["skipped"] = [{"image_id": i, "error": e} for i, e in pred.get("skipped", [])]
    for key in ("run", "checkpoint"):
        if key in pred:
            m[key] = pred[key]
    _write_predictions(pred, out / "predictions.csv")
    atomic_write_text(out / "metrics.json", json.dumps(m, indent=2) + "\n")
    _write_rows(out / "metrics.csv", _metrics_csv(m))
    atomic_write_text(out / "table.md", metrics_table(m, title))
    if plots:
        plot_roc({title or "model": pred}, out / "roc.png")
        plot_confusion({title or "model": np.array(m["confusion_matrix"])}, pred["class_names"],
                       out / "confusion.png")
    return m


def evaluate_run(run_dir: str | Path, output: str | Path | None = None, data: str | Path | None = None,
                 checkpoint: str = "best", split: str = "test", progress: bool = True) -> dict:
    """Predict and evaluate one run; output defaults to ``RUN/eval_<split>`` (or ``RUN/eval_external``)."""
    run_dir = Path(run_dir)
    out = Path(output) if output else run_dir / ("eval_external" if data else f"eval_{split}")
    pred = predict_run(run_dir, data, checkpoint, split, progress=progress)
    m = evaluate_predictions(pred, out, run_dir.name)
    for image_id, msg in pred["skipped"]:
        print(f"warning: skipped {image_id}: {msg}")
    return m


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
        lines.append(f"| {name} | {row['n']} | {_fmt(rb['sensitivity'])} | {_fmt(rc['sensitivity'])} | "
                     f"{_fmt(rb['f1'])} | {_fmt(rc['f1'])} | {auc_s(rb)} | {auc_s(rc)} | {dl} | {dp} | {mp} | {zs} |")
    o = comp["overall"]
    dm = o.get("delong_macro")
    dml = "n/a" if not dm else f"{dm['diff']:+.3f} [n/a]" if dm["ci_low"] is None else \
        f"{dm['diff']:+.3f} [{dm['ci_low']:+.3f}, {dm['ci_high']:+.3f}]"
    lines.append(
        f"| **overall** | {o['n']} | acc {o['accuracy_baseline']:.3f} | acc {o['accuracy_candidate']:.3f} | | | "
        f"macro {_fmt(b['macro_auc'])} | macro {_fmt(c['macro_auc'])} | {dml} | {_fmt_p(dm['p']) if dm else 'n/a'} | "
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
    _write_rows(out / "comparison.csv", rows)
    bl, cl = f"baseline ({baseline.name})", f"candidate ({candidate.name})"
    atomic_write_text(out / "comparison.md", comparison_table(comp, "base", "cand").replace(
        "| Class |", f"<!-- base = {bl}; cand = {cl} -->\n| Class |", 1))
    labels = {bl: preds["baseline"], cl: preds["candidate"]}
    for name in comp["class_names"]:
        plot_roc(labels, out / f"roc_{name}.png", classes=[name])
    plot_confusion({bl: np.array(comp["baseline"]["confusion_matrix"]),
                    cl: np.array(comp["candidate"]["confusion_matrix"])}, comp["class_names"], out / "confusion.png")
    return comp
