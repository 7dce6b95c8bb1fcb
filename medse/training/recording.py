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


def plot_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss and validation Dice (mean and per class) against epoch, with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    ax1.plot(ep, [r.get("train_loss", math.nan) for r in history], marker="o", ms=3, label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("Dice + CE loss")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    dice_keys = [k for k in (history[0] if history else {}) if k.startswith("val_dice_")]
    for r in history[1:]:
        dice_keys += [k for k in r if k.startswith("val_dice_") and k not in dice_keys]
    for k in dice_keys:
        pts = [(r["epoch"], r[k]) for r in history if k in r and r[k] is not None and not math.isnan(r[k])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            style = {"lw": 2.5, "color": "k"} if k == "val_dice_mean" else {"lw": 1, "alpha": 0.7}
            ax2.plot(xs, ys, marker="o", ms=3, label=k[len("val_dice_") :], **style)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    ax2.set_title("validation Dice")
    ax2.grid(alpha=0.3)
    if dice_keys:
        ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


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
