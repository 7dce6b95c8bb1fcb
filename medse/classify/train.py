"""Training of image classifiers (ResNet50V2 with or without attention) from a validated YAML config.

``train(config, output)`` writes the run folder described in docs/ARCHITECTURE.md (``config.yaml``,
``run_info.json``, ``dataset.json``, ``splits.json``, ``checkpoints/last.pt`` and ``best.pt``, ``metrics.csv``,
``curves.png``, optional ``tensorboard/``); ``resume(run_dir)`` continues from ``checkpoints/last.pt`` with the
optimiser, learning-rate schedule, RNG states and history restored (the schedule does not restart).

Data order and augmentation derive from ``(seed, epoch, index)``, so a resumed run sees the same batches as
an uninterrupted one. Class imbalance: cross-entropy with ``n / (K * n_k)`` class weights (``balanced``).
Defaults follow Keras's ``Adam`` (lr 1e-3) as used with ``keras.applications.ResNet50V2``; the study's exact
recipe is not published in REFERENCE.md, so these are medse's choices.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medse.classify.data import (
    AugmentConfig,
    ClassificationData,
    ClassificationDataset,
    class_weights,
    load_classification_data,
    make_splits,
)
from medse.utils.atomic import atomic_path, atomic_write_text
from medse.utils.config import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from medse.utils.errors import MedseError

__all__ = [
    "ClassifierConfig",
    "DataSection",
    "ModelSection",
    "TrainSection",
    "build_model",
    "load_config",
    "load_run_data",
    "resume",
    "train",
]


@dataclass
class ModelSection:
    """``name``: a registered classification model. Defaults to "resnet50v2" with no attention, 3 channels."""

    name: str = "resnet50v2"
    spatial_dims: int = 2
    in_channels: int = 3
    attention: str = "none"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """``root``: class-per-folder directory or CSV manifest (required). ``test_root``: separate test set (e.g.
    Kaggle's ``Testing/``); when set, ``test_fraction`` is ignored. Defaults: 224 px, z-score, 15% / 15%."""

    root: str = ""
    test_root: str | None = None
    class_names: list[str] | None = None
    image_size: int = 224
    normalize: Literal["zscore", "minmax", "none"] = "zscore"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    cache: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainSection:
    epochs: int = 30
    batch_size: int = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    warmup_epochs: int = 0
    class_weighting: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    monitor: Literal["val_loss", "val_accuracy", "val_auc"] = "val_loss"
    early_stopping_patience: int = 0
    max_batches_per_epoch: int = 0
    grad_clip: float = 0.0
    num_threads: int = 0
    tensorboard: bool = False
    progress: bool = True


@dataclass
class ClassifierConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    name: str = ""


def load_config(config: dict | str | Path, overrides: tuple[str, ...] | list[str] = ()) -> ClassifierConfig:
    """Load (``_base_`` inheritance), override (``key.sub=value``) and validate a classifier config."""
    src = None
    if isinstance(config, (str, Path)):
        src = Path(config)
        data = load_yaml(src)
    else:
        data = copy.deepcopy(config)
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(ClassifierConfig, data)
    where = f" ({src})" if src else ""
    if not cfg.data.root:
        raise MedseError(f"missing config key 'data.root'{where}: a class-per-folder directory or a CSV manifest")
    if src is not None:  # data paths are relative to the config file
        for key in ("root", "test_root"):
            v = getattr(cfg.data, key)
            if v and not Path(v).is_absolute() and not Path(v).exists() and (src.parent / v).exists():
                setattr(cfg.data, key, str((src.parent / v).resolve()))
    t = cfg.train
    checks = [
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (t.lr > 0, "train.lr", "must be > 0"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)"),
        (cfg.data.image_size >= 32, "data.image_size", "must be >= 32 (five stride-2 stages)"),
        (cfg.model.spatial_dims in (2, 3), "model.spatial_dims", "must be 2 or 3"),
        (cfg.model.in_channels >= 1, "model.in_channels", "must be >= 1"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise MedseError(f"config key '{key}' {msg}{where}")
    return cfg


def build_model(cfg: ClassifierConfig, num_classes: int) -> Any:
    """The model of ``cfg.model`` through ``medse.networks.create_model``."""
    from medse.networks.registry import create_model

    m = cfg.model
    try:
        return create_model(
            m.name, m.spatial_dims, m.in_channels, num_classes, attention=m.attention,
            attention_kwargs=dict(m.attention_kwargs), **dict(m.arch),
        )
    except (TypeError, ValueError) as e:
        raise MedseError(f"config section 'model': {e}") from e


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block and restore the previous count after (0: leave as is).

    On a shared, oversubscribed CPU one thread can be 10x faster than torch's default for small models.
    """
    import torch

    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise MedseError(f"config key 'train.device': {e}") from e


def _prepare_data(cfg: ClassifierConfig) -> tuple[ClassificationData, ClassificationData | None, dict]:
    data = load_classification_data(cfg.data.root, cfg.data.class_names)
    test_data = None
    if cfg.data.test_root:
        test_data = load_classification_data(cfg.data.test_root, data.class_names)
        splits = make_splits(data, cfg.data.val_fraction, 0.0, cfg.train.seed)
        splits["test"] = [s.image_id for s in test_data.samples]
    else:
        splits = make_splits(data, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed)
    return data, test_data, splits


def load_run_data(run_dir: str | Path, split: str = "test", data: str | Path | None = None) -> ClassificationData:
    """The images of ``split`` in a run (from ``splits.json``), or every image of ``data`` when given."""
    run_dir = Path(run_dir)
    cfg = load_config(load_yaml(run_dir / "config.yaml"))
    ds = json.loads((run_dir / "dataset.json").read_text())
    names = ds["class_names"]
    if data is not None:
        return load_classification_data(data, names)
    splits = json.loads((run_dir / "splits.json").read_text())
    if split not in ("train", "val", "test"):
        raise MedseError(f"unknown split '{split}', expected train, val or test")
    ids = splits[split]
    if not ids:
        raise MedseError(f"split '{split}' of the run is empty; pass a data folder or manifest",
                         run_dir / "splits.json")
    source = cfg.data.test_root if (split == "test" and cfg.data.test_root) else cfg.data.root
    return load_classification_data(source, names).subset(ids)


def _make_optimizer(cfg: TrainSection, params: Any) -> Any:
    import torch

    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _lr_factor(cfg: TrainSection, epoch: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based); a pure function of the epoch, so resume cannot reset it."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.scheduler == "cosine":
        span = max(1, cfg.epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    if cfg.scheduler == "step":
        return cfg.gamma ** ((epoch - cfg.warmup_epochs) // max(1, cfg.step_size))
    return 1.0


def _run_epoch(model: Any, loader: Any, device: Any, criterion: Any, optimizer: Any | None, cfg: TrainSection,
               desc: str) -> dict[str, Any]:
    import torch

    from medse.utils.progress import progress as progress_bar  # a tqdm bar on a terminal, plain lines otherwise

    train = optimizer is not None
    model.train(train)
    total_loss, correct, n = 0.0, 0, 0
    probs, labels = [], []
    it = progress_bar(loader, desc=desc, leave=False, disable=not cfg.progress, dynamic_ncols=True)
    with torch.set_grad_enabled(train):
        for b, (x, y, _) in enumerate(it):
            if train and cfg.max_batches_per_epoch and b >= cfg.max_batches_per_epoch:
                break
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = criterion(logits, y)
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            if not train:
                probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
                labels.append(y.cpu().numpy())
            it.set_postfix(loss=f"{total_loss / max(n, 1):.4f}", acc=f"{correct / max(n, 1):.3f}")
    out: dict[str, Any] = {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1)}
    if not train and n:
        out["auc"] = _macro_auc(np.concatenate(labels), np.concatenate(probs))
    return out


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from medse.classify.stats import StatisticsError, auc_score

    aucs = []
    for k in range(p.shape[1]):
        try:
            aucs.append(auc_score(y == k, p[:, k]))
        except StatisticsError:
            continue
    return float(np.mean(aucs)) if aucs else None


_METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "seconds"]


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_METRIC_FIELDS)
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _METRIC_FIELDS})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy (and validation macro AUC) per epoch, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        axes[0].plot(ep, [h.get("val_loss") for h in history], "o-", label="val")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    axes[1].plot(ep, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    if any(h.get("val_accuracy") is not None for h in history):
        axes[1].plot(ep, [h.get("val_accuracy") for h in history], "o-", label="val accuracy")
    if any(h.get("val_auc") is not None for h in history):
        axes[1].plot(ep, [np.nan if h.get("val_auc") is None else h["val_auc"] for h in history], "s--",
                     label="val macro AUC")
    axes[1].set(xlabel="epoch", ylim=(0, 1.02), title="accuracy / AUC")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


def _monitor_value(cfg: TrainSection, row: dict[str, Any]) -> float | None:
    key = cfg.monitor
    v = row.get(key)
    if v is None:
        return None
    return -float(v) if key == "val_loss" else float(v)  # larger is better


def train(config: dict | str | Path, output: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """Train a classifier; returns the run folder ``output`` (created; must be empty or absent)."""
    cfg = load_config(config, overrides)
    run_dir = Path(output)
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise MedseError("run folder already holds a run; use 'medse classify train --resume' or another --output",
                         run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data, test_data, splits = _prepare_data(cfg)
    num_classes = len(data.class_names)
    if num_classes < 2:
        raise MedseError(f"need at least 2 classes, found {num_classes} ({data.class_names})", cfg.data.root)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    atomic_write_text(run_dir / "dataset.json", json.dumps({
        "labels": {n: i for i, n in enumerate(data.class_names)},
        "class_names": data.class_names,
        "num_classes": num_classes,
        "channel_names": ["image"] * cfg.model.in_channels,
        "source": str(data.source),
        "test_source": None if test_data is None else str(test_data.source),
        "counts": data.counts(),
        "task": "classification",
    }, indent=2) + "\n")
    atomic_write_text(run_dir / "splits.json", json.dumps(
        {"seed": cfg.train.seed, "kind": "holdout", "fold": 0, **splits}, indent=1) + "\n")
    with torch_threads(cfg.train.num_threads):
        return _fit(cfg, run_dir, data, splits, state=None)


def resume(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """Continue a run from ``checkpoints/last.pt``; overrides such as ``train.epochs=40`` extend it."""
    from medse.utils.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MedseError("not a classifier run folder (no config.yaml)", run_dir)
    raw = load_yaml(run_dir / "config.yaml")
    cfg = load_config(raw, overrides)
    if overrides:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    data = load_classification_data(cfg.data.root, json.loads((run_dir / "dataset.json").read_text())["class_names"])
    splits = json.loads((run_dir / "splits.json").read_text())
    with torch_threads(cfg.train.num_threads):
        return _fit(cfg, run_dir, data, splits, state=state)


def _fit(cfg: ClassifierConfig, run_dir: Path, data: ClassificationData, splits: dict, state: dict | None) -> Path:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from medse.utils.checkpoint import load_checkpoint, save_checkpoint
    from medse.utils.runinfo import write_run_info
    from medse.utils.seed import derive_seed, get_rng_states, seed_everything, set_rng_states

    t = cfg.train
    seed_everything(t.seed)
    device = _device(t.device)
    num_classes = len(data.class_names)
    kw = dict(in_channels=cfg.model.in_channels, image_size=cfg.data.image_size,
              spatial_dims=cfg.model.spatial_dims, normalize=cfg.data.normalize, cache=cfg.data.cache)
    train_ds = ClassificationDataset(data.subset(splits["train"]), augment=cfg.data.augment, seed=t.seed, **kw)
    val_ds = ClassificationDataset(data.subset(splits["val"]), augment=None, **kw) if splits["val"] else None
    skipped = train_ds.skipped + (val_ds.skipped if val_ds else [])
    for image_id, msg in skipped:
        print(f"warning: skipped unreadable image {image_id}: {msg}")
    if len(train_ds) == 0:
        raise MedseError("no readable training images", cfg.data.root)
    resumed_at = int(state["epoch"]) + 1 if state is not None else None
    write_run_info(run_dir, {"task": "classification", "n_train": len(train_ds), "n_val": len(val_ds) if val_ds else 0,
                             "skipped": [s[0] for s in skipped], "resumed_at_epoch": resumed_at},
                   name="run_info.json" if state is None else f"run_info_resume_epoch{resumed_at}.json")

    model = build_model(cfg, num_classes).to(device)
    weights = torch.from_numpy(class_weights(train_ds.labels, num_classes, t.class_weighting)).to(device)
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)
    optimizer = _make_optimizer(t, model.parameters())
    history: list[dict[str, Any]] = []
    best, start, stale = -math.inf, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state.get("history", []))
        best = float(state.get("best", -math.inf))
        stale = int(state.get("stale", 0))
        start = int(state["epoch"]) + 1
        set_rng_states(state["rng"])
        if start >= t.epochs:
            print(f"run already finished {start} of {t.epochs} epochs; pass train.epochs=N to continue")
    writer = None
    if t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    val_loader = None
    if val_ds is not None:
        val_loader = DataLoader(val_ds, batch_size=t.batch_size, shuffle=False, num_workers=t.num_workers)
    ckpt = run_dir / "checkpoints"
    for epoch in range(start, t.epochs):
        t0 = time.time()
        lr = t.lr * _lr_factor(t, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        train_ds.set_epoch(epoch)
        sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(derive_seed(t.seed, epoch)))
        loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                            drop_last=len(train_ds) > t.batch_size)
        tr = _run_epoch(model, loader, device, criterion, optimizer, t, f"epoch {epoch + 1}/{t.epochs} train")
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"]}
        if val_loader is not None:
            va = _run_epoch(model, val_loader, device, criterion, None, t, f"epoch {epoch + 1}/{t.epochs} val")
            row.update(val_loss=va["loss"], val_accuracy=va["accuracy"], val_auc=va.get("auc"))
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        mon = _monitor_value(t, row)
        if mon is None and val_loader is None:
            mon = -row["train_loss"]
        improved = mon is not None and mon > best
        if improved:
            best, stale = mon, 0
        else:
            stale += 1
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                   "best": best, "stale": stale, "history": history, "rng": get_rng_states(),
                   "num_classes": num_classes, "class_names": list(data.class_names)}
        save_checkpoint(ckpt / "last.pt", payload)
        if improved:
            save_checkpoint(ckpt / "best.pt", {"model": payload["model"], "epoch": epoch,
                                               "num_classes": num_classes, "class_names": list(data.class_names),
                                               "monitor": t.monitor, "value": row.get(t.monitor)})
        _write_metrics(run_dir, history)
        plot_curves(history, run_dir / "curves.png", title=cfg.name or run_dir.name)
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and v is not None:
                    writer.add_scalar(k, v, epoch + 1)
        msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None)
        print(msg, flush=True)
        if t.early_stopping_patience and stale >= t.early_stopping_patience:
            print(f"early stopping: no improvement of {t.monitor} for {stale} epochs")
            break
    if writer is not None:
        writer.close()
    if not (ckpt / "best.pt").exists() and (ckpt / "last.pt").exists():
        last = load_checkpoint(ckpt / "last.pt")
        save_checkpoint(ckpt / "best.pt", {"model": last["model"], "epoch": last["epoch"],
                                           "num_classes": num_classes, "class_names": list(data.class_names)})
    return run_dir


def config_dict(cfg: ClassifierConfig) -> dict[str, Any]:
    return to_dict(cfg)
