"""Training of image classifiers (ResNet50V2 with or without attention) from a validated YAML config.

``train(config, output)`` writes the run folder described in docs/ARCHITECTURE.md (``config.yaml``,
``run_info.json``, ``dataset.json``, ``splits.json``, ``checkpoints/last.pt`` and ``best.pt``, ``metrics.csv``,
``curves.png``, optional ``tensorboard/``); ``resume(run_dir)`` continues from ``checkpoints/last.pt`` with the
optimiser, learning-rate schedule, RNG states and history restored (the schedule does not restart).

The loop, optimiser, schedule, checkpoints, resume, records and DDP plumbing are the training engine's
(:mod:`medse.training.engine`); :class:`ClassificationTask` is what it trains here. Data order and augmentation derive from ``(seed, epoch, index)``, so a resumed run sees the same batches as
an uninterrupted one. Class imbalance: cross-entropy with ``n / (K * n_k)`` class weights (``balanced``).
Defaults follow Keras's ``Adam`` (lr 1e-3) as used with ``keras.applications.ResNet50V2``; the study's exact
recipe is not published in REFERENCE.md, so these are medse's choices.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medse.classify.data import (
    ClassificationData,
    ClassificationDataset,
    class_weights,
    default_augment,
    load_classification_data,
    make_splits,
)
from medse.data.config import AugmentConfig
from medse.runs import DatasetInfo, Run, Split
from medse.tasks import TaskSpec, register_task
from medse.training.distributed import DistInfo, barrier, cleanup, init_distributed
from medse.training.engine import (
    Engine,
    EngineSettings,
    check_num_classes,
    check_output,
    start_command,
    start_run,
    stop_on_signals_during,
)
from medse.utils.config import apply_overrides, from_dict, load_yaml, to_dict
from medse.utils.device import check_device, device_type, resolve_device
from medse.utils.errors import MedseError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

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
    Kaggle's ``Testing/``); when set, ``test_fraction`` is ignored. ``augment``: the ``augment:`` schema of
    segmentation configs (torchio transforms; ``medse.data.config.AugmentConfig``), unset for the classifier's
    default (:func:`medse.classify.data.default_augment`); the resolved value is what the run's config.yaml
    records. Defaults: 224 px, z-score, 15% / 15%."""

    root: str = ""
    test_root: str | None = None
    class_names: list[str] | None = None
    image_size: int = 224
    normalize: Literal["zscore", "minmax", "none"] = "zscore"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    cache: bool = True
    augment: AugmentConfig | None = None


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
        from medse._shipped import find

        src = find(config, "configs")  # a local file, else a shipped config (classifier_se)
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
    if cfg.data.augment is None:
        cfg.data.augment = default_augment(cfg.model.spatial_dims)
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


def build_model(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
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


def load_run_data(run_dir: str | Path | Run, split: str = "test", data: str | Path | None = None) -> ClassificationData:
    """The images of ``split`` in a run (from its split), or every image of ``data`` when given."""
    run = Run.open(run_dir)
    cfg = run.config
    names = run.dataset.class_names
    if data is not None:
        return load_classification_data(data, names)
    ids = run.split.ids(split)  # type: ignore[arg-type]
    if not ids:
        raise MedseError(f"split '{split}' of the run is empty; pass a data folder or manifest", run / Run.SPLITS)
    source = cfg.data.test_root if (split == "test" and cfg.data.test_root) else cfg.data.root
    return load_classification_data(source, names).subset(ids)


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from medse.evaluation.classification import StatisticsError, auc_score

    aucs = []
    for k in range(p.shape[1]):
        try:
            aucs.append(auc_score(y == k, p[:, k]))
        except StatisticsError:
            continue
    return float(np.mean(aucs)) if aucs else None


class ClassificationTask:
    """What the training engine (:class:`medse.training.engine.Engine`) trains for a classifier: the model of
    ``cfg.model``, shuffled batches of the training images (order from ``(seed, epoch)``, augmentation from
    ``(seed, epoch, index)``), class-weighted cross-entropy, and validation loss, accuracy and macro AUC; the
    monitored value is ``train.monitor`` (the training loss when there is no validation set)."""

    def __init__(self, cfg: ClassifierConfig, data: ClassificationData, splits: dict[str, list[str]]) -> None:
        import torch

        t = cfg.train
        self.cfg = cfg
        self.class_names = list(data.class_names)
        self.num_classes = len(self.class_names)
        kw = dict(in_channels=cfg.model.in_channels, image_size=cfg.data.image_size,
                  spatial_dims=cfg.model.spatial_dims, normalize=cfg.data.normalize, cache=cfg.data.cache)
        self.train_ds = ClassificationDataset(data.subset(splits["train"]), augment=cfg.data.augment, seed=t.seed, **kw)
        self.val_ds = ClassificationDataset(data.subset(splits["val"]), augment=None, **kw) if splits["val"] else None
        self.skipped = self.train_ds.skipped + (self.val_ds.skipped if self.val_ds else [])
        if len(self.train_ds) == 0:
            raise MedseError("no readable training images", cfg.data.root)
        n, b = len(self.train_ds), t.batch_size
        per_epoch = n // b if n > b else 1  # full batches only (the last partial one is dropped), or one batch
        self.iterations_per_epoch = min(per_epoch, t.max_batches_per_epoch) if t.max_batches_per_epoch else per_epoch
        self.monitor_key = t.monitor if self.val_ds is not None else "train_loss"
        weights = torch.from_numpy(class_weights(self.train_ds.labels, self.num_classes, t.class_weighting))
        self.criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)

    def settings(self, device: torch.device) -> EngineSettings:
        from medse.training.optim import epoch_lr_multiplier, per_iteration

        t = self.cfg.train
        epoch_fn = epoch_lr_multiplier(t.scheduler, t.epochs, t.warmup_epochs, t.step_size, t.gamma)
        return EngineSettings(
            epochs=t.epochs, iterations_per_epoch=self.iterations_per_epoch, seed=t.seed, init_seed=t.seed,
            device=device, optimizer=t.optimizer, lr=t.lr, lr_lambda=per_iteration(epoch_fn, self.iterations_per_epoch),
            weight_decay=t.weight_decay, momentum=t.momentum, nesterov=True, amp=False,
            grad_clip=t.grad_clip if t.grad_clip > 0 else None, val_every=1, patience=t.early_stopping_patience,
            progress=t.progress, tensorboard=t.tensorboard,
        )

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.num_classes)

    def prepare(self, engine: Engine) -> None:
        self.criterion = self.criterion.to(engine.device)

    def batches(self, epoch: int, engine: Engine) -> DataLoader:
        import torch
        from torch.utils.data import DataLoader

        from medse.utils.seed import derive_seed

        t = self.cfg.train
        n, b, dist = len(self.train_ds), t.batch_size, engine.dist
        if b % dist.world_size:
            raise MedseError(f"config key 'train.batch_size' {b} is not divisible by the world size {dist.world_size}")
        self.train_ds.set_epoch(epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(t.seed, epoch))).tolist()
        batches = [order[i : i + b] for i in range(0, n, b)]
        if n > b and len(batches[-1]) < b:
            batches.pop()
        per = len(batches[0]) // dist.world_size if dist.enabled else None
        if per is not None:  # this rank's contiguous share of every global batch
            batches = [bt[dist.rank * per : (dist.rank + 1) * per] for bt in batches]
        return DataLoader(self.train_ds, batch_sampler=batches[: self.iterations_per_epoch],
                          num_workers=t.num_workers)

    def loss(self, model: nn.Module, batch: Any, engine: Engine) -> tuple[torch.Tensor, dict[str, float]]:
        x, y, _ = batch
        x, y = x.to(engine.device), y.to(engine.device)
        logits = model(x)
        correct = float((logits.detach().argmax(1) == y).sum())
        return self.criterion(logits, y), {"correct": correct, "count": float(len(y))}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"train_accuracy": sums.get("correct", 0.0) / max(sums.get("count", 0.0), 1.0)}

    def validate(self, model: nn.Module, engine: Engine) -> dict[str, Any]:
        """Loss, accuracy and macro AUC on the whole validation set (every rank computes it alike)."""
        import torch
        from torch.utils.data import DataLoader

        from medse.utils.progress import progress

        if self.val_ds is None:
            return {}
        t = self.cfg.train
        loader = DataLoader(self.val_ds, batch_size=t.batch_size, shuffle=False, num_workers=t.num_workers)
        total, correct, n = 0.0, 0, 0
        probs, labels = [], []
        for x, y, _ in progress(loader, desc="validation", unit="batch", leave=False,
                                disable=not (t.progress and engine.dist.is_main)):
            x, y = x.to(engine.device), y.to(engine.device)
            logits = model(x)
            total += float(self.criterion(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            labels.append(y.cpu().numpy())
        if not n:
            return {}
        return {"val_loss": total / n, "val_accuracy": correct / n,
                "val_auc": _macro_auc(np.concatenate(labels), np.concatenate(probs))}

    def monitor(self, row: dict[str, Any]) -> float | None:
        v = row.get(self.monitor_key)
        if v is None:
            return None
        return -float(v) if self.monitor_key.endswith("_loss") else float(v)  # larger is better

    def state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names, "monitor": self.monitor_key,
                "config": config_dict(self.cfg)}

    def check_state(self, checkpoint: dict[str, Any]) -> None:
        if "scheduler" not in checkpoint or "global_step" not in checkpoint:
            raise MedseError("checkpoint written by an older medse classifier (no schedule state); train the run "
                             "again", "checkpoints/last.pt")
        check_num_classes(checkpoint, self.num_classes, "checkpoints/last.pt")

    def plot_curves(self, history: list[dict[str, Any]], path: Path) -> None:
        from medse.training.recording import plot_curves

        plot_curves(history, path, loss_label="cross-entropy", highlight="val_auc", metric_label="accuracy / AUC",
                    metric_title="accuracy / AUC", title=self.cfg.name,
                    metrics={"train_accuracy": "train accuracy", "val_accuracy": "val accuracy",
                             "val_auc": "val macro AUC"})

    def timing_extra(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"batch_size": self.cfg.train.batch_size, "image_size": self.cfg.data.image_size, "model": m.name,
                "attention": str(m.attention), "spatial_dims": m.spatial_dims}

    def summary(self, row: dict[str, Any], engine: Engine) -> str:
        return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None)


def train(config: dict | str | Path, output: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Run:
    """Train a classifier; returns its :class:`~medse.runs.Run` (``output`` is created; absent or empty).

    Under ``torchrun`` every rank reads the data and trains its share of each batch (DistributedDataParallel, the
    engine's; BatchNorm statistics stay per rank); rank 0 creates and writes the run folder. A run that fails
    before its first checkpoint removes what it made.
    """
    cfg = load_config(config, overrides)
    rerun = start_command("medse classify train", config, output, overrides)
    out = Path(output).expanduser().resolve()
    check_output(out, "medse classify train --resume")
    check_device(cfg.train.device, "train.device")
    # a signal while reading the images or creating the folder: Run.create cleans up, nothing is left
    with stop_on_signals_during(f"setup, before training started (nothing left in {out})", rerun):
        return _train(cfg, out, rerun)


def _train(cfg: ClassifierConfig, out: Path, rerun: str | None) -> Run:
    """:func:`train` after the checks, under ``stop_on_signals`` (``rerun``: the command that starts it again)."""
    dist = init_distributed(device_type(cfg.train.device))
    try:
        barrier(dist)  # every rank has looked before rank 0 creates the folder
        data, test_data, splits = _prepare_data(cfg)
        num_classes = len(data.class_names)
        if num_classes < 2:
            raise MedseError(f"need at least 2 classes, found {num_classes} ({data.class_names})", cfg.data.root)
        dataset = DatasetInfo(
            labels={n: i for i, n in enumerate(data.class_names)}, class_values=list(range(num_classes)),
            channel_names=["image"] * cfg.model.in_channels, task="classification", source=str(data.source),
            extra={"test_source": None if test_data is None else str(test_data.source), "counts": data.counts()},
        )
        split = Split(train=splits["train"], val=splits["val"], test=splits["test"], seed=cfg.train.seed, fold=0)
        with torch_threads(cfg.train.num_threads):
            return start_run(
                out, dist,
                create=lambda: Run.create(out, config=config_dict(cfg), dataset=dataset, split=split,
                                          run_info={"task": "classification"}),
                fit=lambda run: _fit(cfg, run, data, split.to_dict(), None, dist),
                rerun=rerun,
            )
    finally:
        cleanup(dist)


def resume(run_dir: str | Path | Run, overrides: tuple[str, ...] | list[str] = ()) -> Run:
    """Continue a run from ``checkpoints/last.pt``; overrides such as ``train.epochs=40`` extend it."""
    run = Run.open(run_dir)
    cfg = load_config(run.raw_config, overrides)
    check_device(cfg.train.device, "train.device")
    with stop_on_signals_during(f"setup of the resumed run {run.path}", f"medse classify train --resume {run.path}"):
        dist = init_distributed(device_type(cfg.train.device))
        try:
            if overrides and dist.is_main:
                run.write_config(config_dict(cfg))
            state = run.checkpoint("last")
            data = load_classification_data(cfg.data.root, run.dataset.class_names)
            with torch_threads(cfg.train.num_threads):
                return _fit(cfg, run, data, run.split.to_dict(), state, dist)
        finally:
            cleanup(dist)


def _fit(cfg: ClassifierConfig, run: Run, data: ClassificationData, splits: dict, state: dict | None,
         dist: DistInfo) -> Run:
    from medse.utils.runinfo import write_run_info

    task = ClassificationTask(cfg, data, splits)
    if dist.is_main:
        for image_id, msg in task.skipped:
            print(f"warning: skipped unreadable image {image_id}: {msg}")
        resumed_at = int(state["epoch"]) if state is not None else None
        write_run_info(run.path, {"task": "classification", "n_train": len(task.train_ds),
                                  "n_val": len(task.val_ds) if task.val_ds else 0,
                                  "skipped": [s[0] for s in task.skipped], "resumed_at_epoch": resumed_at},
                       name="run_info.json" if state is None else f"run_info_resume_epoch{resumed_at}.json")
    device = resolve_device(cfg.train.device, dist.local_rank if dist.enabled else None, setting="train.device",
                            set_current=True)
    Engine(run, task, task.settings(device), dist,
           resume_command="medse classify train --resume").fit(state)
    if dist.is_main and not run.has_checkpoint("best") and run.has_checkpoint("last"):  # nothing monitored
        run.save_checkpoint("best", run.checkpoint("last"))
    barrier(dist)
    return run


def config_dict(cfg: ClassifierConfig) -> dict[str, Any]:
    return to_dict(cfg)


def _run_config(run: Run) -> ClassifierConfig:
    """A classification run's config: its ``config.yaml`` as a mapping through :func:`load_config` (its data
    paths are as recorded, not resolved against the run folder)."""
    return load_config(run.raw_config)


def _run_model(cfg: ClassifierConfig, dataset: DatasetInfo) -> nn.Module:
    """A classification run's network: :func:`build_model` for its classes."""
    return build_model(cfg, dataset.num_classes)


register_task(TaskSpec("classification", load_config=_run_config, build_model=_run_model,
                       training_task=ClassificationTask, predict="medse.classify.evaluate:predict_run"))
