"""Segmentation training: ``train(config, output)`` and ``resume(run_dir)``.

:class:`SegmentationTask` is what :class:`medse.training.engine.Engine` (the loop, shared with the
classifier) trains for segmentation. One code path for a single process and for DistributedDataParallel under ``torchrun``. Loss: Dice +
cross-entropy (``monai.losses.DiceCELoss``; Milletari et al. 2016, arXiv 1606.04797, plus CE as in
nnU-Net, Isensee et al. 2021). Reproducibility: every epoch's data order and augmentation derive from
``(seed, epoch, index)`` (``medse.data``'s ``PatchDataset``) and the torch RNG is re-seeded from
``(seed, epoch)`` at the start of each epoch, so on CPU a run killed at any point and resumed from its
last checkpoint ends with the same weights as an uninterrupted run.

Run folder layout: ``docs/ARCHITECTURE.md``. Checkpoint keys: the engine's (``model``, ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` = epochs completed, ``global_step``, ``rng``, ``history``, ``step_losses``,
``best_metric``, ``best_epoch``, ``stale``, ``timing``) and the task's ``num_classes``, ``class_values``,
``class_names``, ``in_channels``, ``config``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medse.config import Config, config_to_dict, load_config
from medse.runs import DatasetInfo, Run, build_model
from medse.tasks import TaskSpec, register_task
from medse.training import _data
from medse.training.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from medse.training.engine import (
    STOP_ENV,
    TIMING_WARMUP_STEPS,
    Engine,
    EngineSettings,
    TrainingInterrupted,
    check_num_classes,
    check_output,
    check_resume_overrides,
    start_command,
    start_run,
    stop_on_signals_during,
    torch_global_state,
)
from medse.utils.device import check_device, device_type, resolve_device
from medse.utils.errors import MedseError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

__all__ = ["STOP_ENV", "TIMING_WARMUP_STEPS", "SegmentationTask", "TrainingInterrupted", "resume", "train"]


def train(
    config: str | Path | dict[str, Any] | Config,
    output: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    stop_after_iterations: int | None = None,
) -> Run:
    """Train a segmentation network and return its :class:`~medse.runs.Run`.

    Everything that can be checked is checked before the run folder exists: the config, the output folder
    (not a file, not holding a run, writable), ``train.device``, the dataset, and the network (built on the
    meta device and run forward once on a batch of training patches: unknown model or block, too few
    channels, sizes). The folder is then created under a temporary name and renamed into place once
    config.yaml, run_info.json, dataset.json and splits.json are written. A run that fails with an error
    before its first checkpoint removes the folder again (or empties it, when it existed before as an empty
    folder), so a retry with a fixed config can use the same output. SIGINT (Ctrl-C) and SIGTERM (a job
    scheduler's time limit) end it with :class:`~medse.utils.interrupt.Interrupted` (epoch, step, run folder and
    the resume command); stopped before its first checkpoint, it removes what it wrote as a failure does. A
    killed run (SIGKILL, the ``stop_after_iterations`` hook) keeps its folder for ``resume``. Torch's thread
    count and the random states are restored on return (:func:`~medse.training.engine.torch_global_state`).

    Args:
        config: YAML path, mapping or :class:`Config`.
        output: the run folder to create; it must not already hold a run.
        overrides: dotted ``key=value`` overrides, e.g. ``["data.root=/d", "train.epochs=2"]``.
        stop_after_iterations: raise :class:`TrainingInterrupted` once this many global iterations are done
            (also read from the ``MEDSE_STOP_AFTER_ITERATIONS`` environment variable). Defaults to None.

    Returns:
        The run (its folder is ``run.path``; a :class:`~medse.runs.Run` joins like a path: ``run / "x"``).
    """
    cfg = load_config(config, overrides)
    rerun = start_command("medse train", config, output, overrides)
    output = Path(output).expanduser().resolve()
    check_output(output, "medse train --resume")  # an occupied or unwritable output fails before any work
    check_device(cfg.train.device, "train.device")
    # a signal while reading the data or creating the folder: Run.create cleans up, nothing is left
    with stop_on_signals_during(f"setup, before training started (nothing left in {output})", rerun), \
            torch_global_state(cfg.train.num_threads):
        dist = init_distributed(device_type(cfg.train.device))
        try:
            barrier(dist)  # every rank has looked before rank 0 creates the folder
            prep = _data.prepare_data(cfg)
            check_model(cfg, len(prep.channel_names), prep.num_classes, dist.world_size)
            return start_run(
                output, dist, create=lambda: _create_run_dir(output, cfg, prep),
                fit=lambda run: _engine(run, cfg, prep, dist, stop_after_iterations).fit(checkpoint=None),
                rerun=rerun,
            )
        finally:
            cleanup(dist)


def check_model(cfg: Config, in_channels: int, out_channels: int, world_size: int = 1) -> None:
    """Build the network on the meta device (no memory, no compute; on the CPU where a network cannot be built
    there) and run one training-mode forward pass of a batch of training patches on the meta device, so that
    an unknown model or block, too few channels for a block or a patch the network cannot take fails now,
    with the config key, instead of after the run folder exists. Where the check itself cannot run, it is
    skipped, never the run.

    Raises:
        MedseError: naming ``model`` or ``train.patch_size`` and the network's own message.
    """
    import torch

    m, t = cfg.model, cfg.train
    try:
        model = _build_for_check(cfg, in_channels, out_channels)
    except (ValueError, TypeError, MedseError) as e:
        raise MedseError(f"config key 'model' (name {m.name!r}, attention {m.attention!r}): {e}") from None
    if model is None:
        return  # the network cannot be built for a check: the real run builds it and tells
    batch = max(1, t.batch_size // max(1, world_size))
    x = torch.empty((batch, in_channels, *t.patch_size), device="meta")
    try:
        with torch.no_grad():
            model.train()(x)
    except NotImplementedError:
        return  # an operation without a meta kernel: this check cannot run, the real run will tell
    except (ValueError, RuntimeError) as e:
        if "meta" in str(e).lower():
            return  # a meta-device limitation, not a problem of the config
        raise MedseError(
            f"config key 'train.patch_size' {list(t.patch_size)} (batch {batch} per process): model "
            f"{m.name!r} with attention {m.attention!r} cannot train on it: {e}"
        ) from None


def _build_for_check(cfg: Config, in_channels: int, out_channels: int) -> nn.Module | None:
    """The network on the meta device, for :func:`check_model`.

    Some networks cannot be built there (MONAI's ``SwinTransformer.__init__`` calls ``.item()``): those are
    built on the CPU, as the run itself builds them (so the check needs no more memory than the run), and
    moved to the meta device for the forward pass. A network that does not build on the CPU either for a
    reason other than its configuration gives ``None``: the check is skipped, never the run. Configuration
    errors (``ValueError``, ``TypeError``, :class:`MedseError`) propagate.
    """
    import torch

    try:
        with torch.device("meta"):
            return build_model(cfg, in_channels, out_channels)
    except (NotImplementedError, RuntimeError):  # a meta-device limitation (e.g. .item() on a meta tensor)
        pass
    try:
        return build_model(cfg, in_channels, out_channels).to("meta")
    except (NotImplementedError, RuntimeError):
        return None


def resume(run_dir: str | Path | Run, overrides: list[str] | tuple[str, ...] = (), *,
           stop_after_iterations: int | None = None) -> Run:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` (schedule, RNG and history included).

    A run killed before its first checkpoint restarts from epoch 0 in the same folder; a finished run
    returns at once. The config, classes and split are those stored in the run folder; ``overrides`` may only
    be ``train.epochs=N`` (:func:`~medse.training.engine.check_resume_overrides`), which extends a finished or
    stopped run: the learning-rate schedule is re-derived for the new length (from the next step on) and the
    run's ``config.yaml`` records it. Signals and global state as for :func:`train`.
    """
    run = Run.open(Path(run_dir).expanduser().resolve())
    overrides = check_resume_overrides(overrides)
    cfg = run.config
    if overrides:
        cfg = load_config(config_to_dict(cfg), overrides)
    check_device(cfg.train.device, "train.device")
    with stop_on_signals_during(f"setup of the resumed run {run.path}", f"medse train --resume {run.path}"), \
            torch_global_state(cfg.train.num_threads):
        dist = init_distributed(device_type(cfg.train.device))
        try:
            prep = _data.prepare_data(cfg)
            stored = run.dataset.class_values
            if stored != prep.class_values:
                raise MedseError(f"the dataset's labels {prep.class_values} differ from the run's {stored}",
                                 run / Run.DATASET)
            ckpt = run.checkpoint("last") if run.has_checkpoint("last") else None
            if ckpt is not None and int(ckpt["epoch"]) > cfg.train.epochs:
                raise MedseError(f"config key 'train.epochs': {cfg.train.epochs} is fewer than the "
                                 f"{int(ckpt['epoch'])} epochs the run has trained", run.path)
            if overrides and dist.is_main and cfg.train.epochs != run.config.train.epochs:
                run.write_config(config_to_dict(cfg))
            barrier(dist)
            if ckpt is None and dist.is_main:
                print(f"no checkpoint in {run.checkpoint_dir} yet: starting at epoch 0 of {cfg.train.epochs}",
                      file=sys.stderr)
            return _engine(run, cfg, prep, dist, stop_after_iterations).fit(checkpoint=ckpt)
        finally:
            cleanup(dist)


def _create_run_dir(output: Path, cfg: Config, prep: _data.PreparedData) -> Run:
    """config.yaml, run_info.json, dataset.json and splits.json, written under a temporary name, then renamed."""
    return Run.create(
        output,
        config=config_to_dict(cfg),
        dataset=prep.dataset_info(),
        split=lambda folder: _data.make_splits(folder, prep, cfg),
        run_info={"task": "segmentation-training"},
    )


def supervised_loss(loss_fn: nn.Module, output: torch.Tensor, label: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``loss_fn`` of the logits, or the weighted sum over deep-supervision heads.

    ``output`` is ``(B, C, *spatial)`` logits, or a deep-supervision stack ``(B, heads, C, *spatial)`` (MONAI
    DynUNet in training mode; head 0 the full-resolution output): ``loss_fn`` must then be a
    ``monai.losses.DeepSupervisionLoss``, which weights the heads 1, 1/2, 1/4, ... (its ``"exp"`` mode, as
    MONAI's DynUNet tutorial and nnU-Net) and sums.
    """
    import torch

    if output.ndim == spatial_dims + 3:
        return loss_fn(list(torch.unbind(output.float(), dim=1)), label)
    return loss_fn(output.float(), label)


def _warn_if_patch_exceeds_data(store: _data.CaseStore, case_ids: list[str], cfg: Config) -> None:
    """Warn once when the training patch is larger than every training case along some axis (after
    preprocessing): the sampler pads such cases (image with its per-channel minimum, label 0), which trains,
    but on a patch that is partly padding. The cases are read through the store's cache, which training
    fills anyway."""
    import warnings

    t = cfg.train
    if cfg.model.spatial_dims == 3:
        axes = [0, 1, 2]
    else:
        axes = [a for a in (0, 1, 2) if a != t.slice_axis]
    largest = [0] * len(axes)
    for cid in case_ids:
        image = store.get(cid)[0]
        spatial = image.shape[-3:]
        largest = [max(m, int(spatial[a])) for m, a in zip(largest, axes, strict=True)]
    too_big = [i for i, (p, m) in enumerate(zip(t.patch_size, largest, strict=True)) if p > m]
    if too_big:
        fit = [min(p, m) for p, m in zip(t.patch_size, largest, strict=True)]
        warnings.warn(
            f"config key 'train.patch_size' {list(t.patch_size)} is larger than every training case along "
            f"axis {', '.join(str(axes[i]) for i in too_big)} (largest preprocessed case: {largest}); the patches are "
            f"padded (image with its minimum, label 0). train.patch_size={fit} avoids the padding.",
            UserWarning,
            stacklevel=2,
        )


class SegmentationTask:
    """What the engine trains for segmentation: the network of ``cfg.model``, patches (or slices) of the
    training cases, Dice + CE (with deep supervision when the network returns a stack), and sliding-window
    validation Dice (``val_dice_mean`` monitored, larger is better)."""

    monitor_key = "val_dice_mean"

    def __init__(self, cfg: Config, prep: _data.PreparedData, split: dict[str, list[str]]) -> None:
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        t = cfg.train
        self.cfg = cfg
        self.prep = prep
        self.in_channels = len(prep.channel_names)
        self.splits = _data._split_lists(split)
        self.val_ids = self.splits["val"][: t.val_max_cases] if t.val_max_cases else self.splits["val"]
        self.loss_fn = DeepSupervisionLoss(  # one output: DiceCELoss itself; a DynUNet stack: weighted sum
            DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=t.lambda_dice, lambda_ce=t.lambda_ce),
            weight_mode="exp",
        )

    def settings(self, device: torch.device) -> EngineSettings:
        from medse.training.optim import schedule_of
        from medse.utils.seed import derive_seed

        t = self.cfg.train
        return EngineSettings(
            epochs=t.epochs, iterations_per_epoch=t.iterations_per_epoch, seed=t.seed,
            init_seed=derive_seed(t.seed, 0x5EED), device=device, optimizer=t.optimizer, lr=t.lr,
            lr_lambda=schedule_of(t), weight_decay=t.weight_decay, momentum=t.momentum, nesterov=t.nesterov,
            amp=t.amp, grad_clip=t.grad_clip, val_every=t.val_every, patience=0, progress=t.progress,
            tensorboard=t.tensorboard,
        )

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.in_channels, self.prep.num_classes)

    def prepare(self, engine: Engine) -> None:
        t = self.cfg.train
        store = _data.make_store(self.prep, self.cfg)
        if t.num_workers > 0:  # workers are re-forked every epoch: fill the cache first so they inherit it
            store.preload(self.splits["train"])
        if engine.dist.is_main and engine.start_epoch == 0:
            _warn_if_patch_exceeds_data(store, self.splits["train"], self.cfg)
        self.train_ds = _data.make_train_dataset(store, self.splits["train"], self.cfg)
        self.val_ds = _data.make_val_dataset(store, self.val_ids)

    def batches(self, epoch: int, engine: Engine) -> DataLoader:
        import torch
        from torch.utils.data import DataLoader

        from medse.training.distributed import shard_indices

        t = self.cfg.train
        self.train_ds.set_epoch(epoch)
        batches = [shard_indices(i, t.batch_size, engine.dist) for i in range(t.iterations_per_epoch)]
        gen = torch.Generator()
        gen.manual_seed(epoch)
        return DataLoader(
            self.train_ds,
            batch_sampler=batches,
            num_workers=t.num_workers,
            pin_memory=engine.device.type == "cuda",
            generator=gen,
        )

    def loss(self, model: nn.Module, batch: Any, engine: Engine) -> tuple[torch.Tensor, dict[str, float]]:
        image, label = _data.unpack(batch)
        image = image.to(engine.device, non_blocking=True).float()
        label = label.to(engine.device, non_blocking=True).long()
        if label.ndim == image.ndim - 1:
            label = label[:, None]
        logits = model(image)
        return supervised_loss(self.loss_fn, logits, label, self.cfg.model.spatial_dims), {}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {}

    def validate(self, model: nn.Module, engine: Engine) -> dict[str, Any]:
        import numpy as np
        import torch

        from medse.inference import Predictor
        from medse.training.validation import dice_per_class, reduce_dice_sums

        k = self.prep.num_classes
        names = self.prep.class_names[1:]
        sums = [0.0] * (k - 1)
        counts = [0.0] * (k - 1)
        inf = self.cfg.infer
        dist = engine.dist
        # the predictor `medse predict` uses (its windows, blending and 2D slicing), on the preprocessed volume
        predictor = Predictor(model, spatial_dims=self.cfg.model.spatial_dims, in_channels=self.in_channels,
                              roi_size=self.cfg.roi_size, sw_batch_size=inf.sw_batch_size, overlap=inf.overlap,
                              blend=inf.blend, slice_axis=self.cfg.train.slice_axis, amp=engine.use_amp,
                              device=engine.device)
        for i in range(dist.rank, len(self.val_ds), dist.world_size):
            image, label = _data.unpack(self.val_ds[i])
            label = torch.as_tensor(label).long()
            if label.ndim == len(image.shape):
                label = label[0]
            labels, _ = predictor.predict_preprocessed(np.asarray(image, dtype=np.float32))
            d = dice_per_class(torch.from_numpy(labels), label, k)
            for c, v in enumerate(d):
                if not math.isnan(v):
                    sums[c] += v
                    counts[c] += 1
        red = all_reduce_sum(sums + counts, dist, engine.device)
        dice = reduce_dice_sums(red[: k - 1], red[k - 1 :], names)
        return {f"val_{k}": v for k, v in dice.items()}

    def monitor(self, row: dict[str, Any]) -> float | None:
        v = row.get("val_dice_mean")
        return None if v is None or math.isnan(v) else float(v)

    def state(self) -> dict[str, Any]:
        return {
            "num_classes": self.prep.num_classes,
            "class_values": self.prep.class_values,
            "class_names": self.prep.class_names,
            "in_channels": self.in_channels,
            "config": config_to_dict(self.cfg),
        }

    def check_state(self, checkpoint: dict[str, Any]) -> None:
        check_num_classes(checkpoint, self.prep.num_classes, "checkpoints/last.pt")

    def plot_curves(self, history: list[dict[str, Any]], path: Path) -> None:
        from medse.training.recording import plot_curves

        plot_curves(history, path)

    def timing_extra(self) -> dict[str, Any]:
        t = self.cfg.train
        return {
            "batch_size": t.batch_size,
            "patch_size": list(t.patch_size),
            "model": self.cfg.model.name,
            "attention": _attention_label(self.cfg.model.attention),
            "spatial_dims": self.cfg.model.spatial_dims,
        }

    def summary(self, row: dict[str, Any], engine: Engine) -> str:
        msg = f"epoch {row['epoch']}/{engine.settings.epochs}  loss {row['train_loss']:.4f}  {row['epoch_time_s']:.1f} s"
        val = row.get("val_dice_mean")
        if val is not None:
            msg += f"  val Dice {val:.4f} (best {engine.best_metric:.4f} @ {engine.best_epoch})"
        return msg


def _engine(run: Run, cfg: Config, prep: _data.PreparedData, dist: DistInfo, stop_after: int | None) -> Engine:
    # train.num_threads: set (and restored) by torch_global_state around train() / resume()
    task = SegmentationTask(cfg, prep, run.split.to_dict())
    device = resolve_device(cfg.train.device, dist.local_rank if dist.enabled else None, setting="train.device",
                            set_current=True)
    return Engine(run, task, task.settings(device), dist, stop_after)


def _attention_label(attention: str | dict[str, str]) -> str:
    """``model.attention`` as one readable string (a mapping as ``encoder=cse,decoder=scse``)."""
    from medse.networks import format_assignment

    return format_assignment(attention)


def _run_config(run: Run) -> Config:
    """A segmentation run's config: its ``config.yaml`` through :func:`medse.config.load_config`."""
    return load_config(run.config_path)


def _run_model(cfg: Config, dataset: DatasetInfo) -> nn.Module:
    """A segmentation run's network: :func:`medse.runs.build_model` for its channels and classes."""
    return build_model(cfg, dataset.num_channels, dataset.num_classes)


register_task(TaskSpec("segmentation", load_config=_run_config, build_model=_run_model,
                       training_task=SegmentationTask, predict="medse.inference:Predictor.from_run"))
