"""Prediction and evaluation files of a classifier run: probabilities, ``predictions.csv``, metrics files, plots.

``evaluate_run(run, output)`` writes ``predictions.csv`` (one row per image: id, path, true class, predicted class,
one probability column per class), ``metrics.json`` / ``metrics.csv`` (per class one-vs-rest: AUC with DeLong 95% CI,
sensitivity, specificity, precision, F1; overall accuracy, macro and micro AUC, confusion matrix), ``table.md``,
``roc.png`` and ``confusion.png``. The metrics are :mod:`medse.evaluation.classification`'s; the paired comparison
of two runs (``medse classify compare``) is :mod:`medse.compare.classifier`'s.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from medse.evaluation.classification import classification_metrics, delong_ci, metrics_rows, metrics_table
from medse.utils.atomic import atomic_path, atomic_write_text
from medse.utils.errors import MedseError

__all__ = [
    "evaluate_predictions",
    "evaluate_run",
    "plot_confusion",
    "plot_roc",
    "predict_run",
    "read_predictions",
    "write_rows",
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
    from medse.classify.train import load_run_data, torch_threads
    from medse.runs import Run
    from medse.utils.device import resolve_device
    from medse.utils.progress import progress as progress_bar  # a tqdm bar on a terminal, plain lines otherwise

    run = Run.open(run_dir)
    if run.task != "classification":
        raise MedseError("not a classifier run folder (dataset.json says task 'segmentation')", run.path)
    cfg = run.config
    names = run.dataset.class_names
    ck_path = run.checkpoint_path(checkpoint.removesuffix(".pt") if checkpoint in ("best.pt", "last.pt") else checkpoint)
    model = run.load_model(ck_path)
    dev = resolve_device(device, setting="device", set_current=True)
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


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


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
    write_rows(out / "metrics.csv", metrics_rows(m))
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


