"""Per-epoch records of a run: ``metrics.csv``, ``curves.png``, TensorBoard events and ``timing.json``.

The history (a list of per-epoch dicts of floats) lives in the checkpoint, so a resumed run rewrites
``metrics.csv`` and ``curves.png`` from exactly the epochs it kept; both are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from medse.utils.atomic import atomic_path, atomic_write_text


def write_metrics_csv(history: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per epoch; columns are the union of the keys in first-seen order (missing -> empty)."""
    cols: list[str] = []
    for row in history:
        for k in row:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: _fmt(row.get(k)) for k in cols})
    return atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plot_curves(
    history: list[dict[str, Any]],
    path: str | Path,
    *,
    loss_label: str = "Dice + CE loss",
    metrics: dict[str, str] | None = None,
    highlight: str = "val_dice_mean",
    metric_label: str = "Dice",
    metric_title: str = "validation Dice",
    title: str = "",
) -> Path:
    """Loss (training, and validation when the rows have ``val_loss``) and metrics against epoch, with
    matplotlib's Agg backend.

    Args:
        metrics: the right panel's row keys and their legend labels. Defaults to every ``val_dice_*`` key
            (segmentation: mean and per class), labelled by the class.
        highlight: the key drawn bold. Defaults to ``val_dice_mean``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    ax1.plot(ep, [r.get("train_loss", math.nan) for r in history], marker="o", ms=3, label="train loss")
    if any(r.get("val_loss") is not None for r in history):
        _plot_key(ax1, history, "val_loss", "val loss", {})
        ax1.legend(fontsize=7)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(loss_label)
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    if metrics is None:
        keys = [k for k in (history[0] if history else {}) if k.startswith("val_dice_")]
        for r in history[1:]:
            keys += [k for k in r if k.startswith("val_dice_") and k not in keys]
        metrics = {k: k[len("val_dice_") :] for k in keys}
    drawn = False
    for k, label in metrics.items():
        style = {"lw": 2.5, "color": "k"} if k == highlight else {"lw": 1, "alpha": 0.7}
        drawn = _plot_key(ax2, history, k, label, style) or drawn
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(metric_label)
    ax2.set_ylim(0, 1.02)
    ax2.set_title(metric_title)
    ax2.grid(alpha=0.3)
    if drawn:
        ax2.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _plot_key(ax: Any, history: list[dict[str, Any]], key: str, label: str, style: dict[str, Any]) -> bool:
    pts = [(r["epoch"], r[key]) for r in history
           if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    if not pts:
        return False
    xs, ys = zip(*pts, strict=True)
    ax.plot(xs, ys, marker="o", ms=3, label=label, **style)
    return True


def write_timing(path: str | Path, step_time_sum: float, steps: int, extra: dict[str, Any] | None = None) -> Path:
    """``timing.json``: mean training-step time (forward + backward + optimiser step, seconds) and the
    number of steps measured (the first steps of a run are excluded as warm-up)."""
    rec: dict[str, Any] = {
        "train_step_time_mean_s": (step_time_sum / steps) if steps else None,
        "train_steps_measured": int(steps),
    }
    rec.update(extra or {})
    return atomic_write_text(path, json.dumps(rec, indent=2) + "\n")


class TensorBoardLogger:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter`` (event files are append-only logs,
    the one kind of output not written atomically); ``purge_step`` drops events of epochs a resumed run
    repeats."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is a dependency of medse

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k == "epoch" or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
                continue
            group = "val" if k.startswith("val_") else "train"
            self.writer.add_scalar(f"{group}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
