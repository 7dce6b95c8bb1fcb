"""The training loop: ``train(config, output)`` and ``resume(run_dir)``.

One code path for a single process and for DistributedDataParallel under ``torchrun``. Loss: Dice +
cross-entropy (``monai.losses.DiceCELoss``; Milletari et al. 2016, arXiv 1606.04797, plus CE as in
nnU-Net, Isensee et al. 2021). Reproducibility: every epoch's data order and augmentation derive from
``(seed, epoch, index)`` (the data area's ``PatchDataset``) and the torch RNG is re-seeded from
``(seed, epoch)`` at the start of each epoch, so on CPU a run killed at any point and resumed from its
last checkpoint ends with the same weights as an uninterrupted run.

Run folder layout: ``docs/ARCHITECTURE.md``. Checkpoint keys: ``model`` (state dict), ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``global_step``, ``rng``, ``history`` (per-epoch
metric rows), ``step_losses``, ``best_metric``, ``best_epoch``, ``timing``, ``num_classes``,
``class_values``, ``in_channels``, ``config``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from medse.config import Config, config_to_dict, load_config
from medse.runs import Run, build_model
from medse.training import _data
from medse.training.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from medse.utils.errors import MedseError

#: environment variable: stop (raise :class:`TrainingInterrupted`) after this many global iterations.
STOP_ENV = "MEDSE_STOP_AFTER_ITERATIONS"
#: steps at the start of each process excluded from ``timing.json`` (allocator and kernel warm-up).
TIMING_WARMUP_STEPS = 3


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_iterations`` hook (used to test kill-and-resume)."""


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
    folder), so a retry with a fixed config can use the same output; an interrupted run (Ctrl-C, kill) keeps
    it for ``resume``.

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
    output = Path(output).expanduser().resolve()
    _check_output(output)  # an occupied or unwritable output fails before any work
    check_device(cfg.train.device)
    dist = init_distributed(_device_type(cfg.train.device))
    try:
        barrier(dist)  # every rank has looked before rank 0 creates the folder
        prep = _data.prepare_data(cfg)
        check_model(cfg, len(prep.channel_names), prep.num_classes, dist.world_size)
        existed = output.exists()
        err = None
        if dist.is_main:
            try:
                _create_run_dir(output, cfg, prep)
            except Exception as e:  # share the failure with the other ranks instead of hanging them
                err = e
        err_msg = broadcast_object(None if err is None else f"{type(err).__name__}: {err}", dist)
        if err is not None:
            raise err
        if err_msg is not None:
            raise MedseError(f"rank 0 could not create the run folder: {err_msg}", output)
        barrier(dist)
        try:
            return _Trainer(Run(output), cfg, prep, dist, stop_after_iterations).fit(checkpoint=None)
        except TrainingInterrupted:
            raise  # a simulated kill: the folder stays, `medse train --resume` continues it
        except Exception:
            if dist.is_main:
                _remove_if_no_checkpoint(output, existed)
            raise
    finally:
        cleanup(dist)


def _check_output(output: Path) -> None:
    """The run folder must not hold a run (or a file) and its place must be writable; checked before any work."""
    from medse.utils.atomic import ensure_writable_dir

    if output.exists() and not output.is_dir():
        raise MedseError("output folder is a file, not a folder", output)
    if output.is_dir() and any(output.iterdir()):
        hint = " (use `medse train --resume` to continue it)" if (output / Run.CONFIG).is_file() else ""
        raise MedseError(f"output folder already exists and is not empty{hint}", output)
    ensure_writable_dir(output, "output folder", create=False)


def _remove_if_no_checkpoint(output: Path, existed: bool) -> None:
    """A run that failed before its first checkpoint leaves nothing: the folder it made is removed (an empty
    folder the user made beforehand is emptied, not removed), so a retry with a fixed config can use it."""
    if Run(output).has_checkpoint("last") or not output.is_dir():
        return
    if existed:
        for child in output.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    else:
        shutil.rmtree(output, ignore_errors=True)
    print(f"medse: the run failed before its first checkpoint; removed what it wrote in {output}", file=sys.stderr)


def check_device(device: str) -> None:
    """``train.device`` names a device this machine has (checked before anything is written)."""
    import torch

    if _device_type(device) != "cuda" or device == "auto":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        raise MedseError(f"config key 'train.device': {device!r} requested but CUDA is not available "
                         f"(torch {torch.__version__}, {build}); use train.device=cpu or auto")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise MedseError(f"config key 'train.device': {device!r} but only {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")


def check_model(cfg: Config, in_channels: int, out_channels: int, world_size: int = 1) -> None:
    """Build the network on the meta device (no memory, no compute) and run one training-mode forward pass
    of a batch of training patches, so that an unknown model or block, too few channels for a block or a
    patch the network cannot take fails now, with the config key, instead of after the run folder exists.

    Raises:
        MedseError: naming ``model`` or ``train.patch_size`` and the network's own message.
    """
    import torch

    m, t = cfg.model, cfg.train
    try:
        with torch.device("meta"):
            model = build_model(cfg, in_channels, out_channels)
    except (ValueError, TypeError, MedseError) as e:
        raise MedseError(f"config key 'model' (name {m.name!r}, attention {m.attention!r}): {e}") from None
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


def resume(run_dir: str | Path | Run, *, stop_after_iterations: int | None = None) -> Run:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` (schedule, RNG and history included).

    A run killed before its first checkpoint restarts from epoch 0 in the same folder; a finished run
    returns at once. The config, classes and split are those stored in the run folder.
    """
    run = Run.open(Path(run_dir).expanduser().resolve())
    cfg = run.config
    check_device(cfg.train.device)
    dist = init_distributed(_device_type(cfg.train.device))
    try:
        prep = _data.prepare_data(cfg)
        stored = run.dataset.class_values
        if stored != prep.class_values:
            raise MedseError(f"the dataset's labels {prep.class_values} differ from the run's {stored}",
                             run / Run.DATASET)
        ckpt = run.checkpoint("last") if run.has_checkpoint("last") else None
        if ckpt is None and dist.is_main:
            print(f"no checkpoint in {run.checkpoint_dir} yet: starting at epoch 0 of {cfg.train.epochs}",
                  file=sys.stderr)
        return _Trainer(run, cfg, prep, dist, stop_after_iterations).fit(checkpoint=ckpt)
    finally:
        cleanup(dist)


def _device_type(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _resolve_device(device: str, dist: DistInfo) -> Any:
    import torch

    kind = _device_type(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MedseError(f"config key 'train.device': {device!r} requested but CUDA is not available")
        idx = dist.local_rank if (dist.enabled or device in ("auto", "cuda")) else int(device.split(":")[1])
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def _create_run_dir(output: Path, cfg: Config, prep: _data.PreparedData) -> Run:
    """config.yaml, run_info.json, dataset.json and splits.json, written under a temporary name, then renamed."""
    return Run.create(
        output,
        config=config_to_dict(cfg),
        dataset=prep.dataset_info(),
        split=lambda folder: _data.make_splits(folder, prep, cfg),
        run_info={"task": "segmentation-training"},
    )


def supervised_loss(loss_fn: Any, output: Any, label: Any, spatial_dims: int) -> Any:
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


def _warn_if_patch_exceeds_data(store: Any, case_ids: list[str], cfg: Config) -> None:
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


class _Trainer:
    def __init__(
        self, run: Run, cfg: Config, prep: _data.PreparedData, dist: DistInfo, stop_after: int | None
    ) -> None:
        self.run = run
        self.cfg = cfg
        self.prep = prep
        self.dist = dist
        env = os.environ.get(STOP_ENV)
        self.stop_after = stop_after if stop_after is not None else (int(env) if env else None)

    # ------------------------------------------------------------------ setup
    def _setup(self, checkpoint: dict[str, Any] | None) -> None:
        import torch
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        from medse.training.optim import build_optimizer, build_scheduler
        from medse.utils.seed import derive_seed, seed_everything

        cfg, t = self.cfg, self.cfg.train
        if t.num_threads is not None:  # this process only, and only when the config asks for it
            torch.set_num_threads(t.num_threads)
        self.device = _resolve_device(t.device, self.dist)
        self.use_amp = bool(t.amp and self.device.type == "cuda")
        seed_everything(derive_seed(t.seed, 0x5EED))  # weight initialisation, identical on every rank
        self.in_channels = len(self.prep.channel_names)
        self.model = build_model(cfg, self.in_channels, self.prep.num_classes).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.loss_fn = DeepSupervisionLoss(  # one output: DiceCELoss itself; a DynUNet stack: weighted sum
            DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=t.lambda_dice, lambda_ce=t.lambda_ce),
            weight_mode="exp",
        )
        self.start_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.timing = {"sum": 0.0, "count": 0}
        self._steps_this_process = 0
        if checkpoint is not None:
            self._load_state(checkpoint)
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)

    def _load_state(self, ck: dict[str, Any]) -> None:
        from medse.utils.seed import set_rng_states

        if int(ck.get("num_classes", self.prep.num_classes)) != self.prep.num_classes:
            raise MedseError("checkpoint has a different number of classes than the dataset", self.run)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.start_epoch = int(ck["epoch"])
        self.global_step = int(ck["global_step"])
        self.history = list(ck.get("history", []))
        self.step_losses = [float(v) for v in ck.get("step_losses", [])]
        self.best_metric = float(ck.get("best_metric", -math.inf))
        self.best_epoch = int(ck.get("best_epoch", -1))
        self.timing = dict(ck.get("timing", self.timing))
        if "rng" in ck:
            set_rng_states(ck["rng"])

    def _state(self, epoch: int) -> dict[str, Any]:
        from medse.utils.seed import get_rng_states

        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "rng": get_rng_states(),
            "history": self.history,
            "step_losses": self.step_losses,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "timing": self.timing,
            "num_classes": self.prep.num_classes,
            "class_values": self.prep.class_values,
            "class_names": self.prep.class_names,
            "in_channels": self.in_channels,
            "config": config_to_dict(self.cfg),
        }

    # ------------------------------------------------------------------ loop
    def fit(self, checkpoint: dict[str, Any] | None) -> Run:
        from medse.training.recording import TensorBoardLogger

        t = self.cfg.train
        self._setup(checkpoint)
        self.epochs_run: list[int] = []  # epochs this call trained (1-based), for the log and the tests
        splits = _data._split_lists(self.run.split.to_dict())
        self.val_ids = splits["val"][: t.val_max_cases] if t.val_max_cases else splits["val"]
        if checkpoint is not None and self.dist.is_main:
            what = "already finished" if self.start_epoch >= t.epochs else f"continuing with epoch {self.start_epoch + 1}"
            print(f"resumed at epoch {self.start_epoch} of {t.epochs} ({what}; global step {self.global_step})",
                  file=sys.stderr)
        if self.start_epoch >= t.epochs:
            return self.run
        store = _data.make_store(self.prep, self.cfg)
        if t.num_workers > 0:  # workers are re-forked every epoch: fill the cache first so they inherit it
            store.preload(splits["train"])
        if self.dist.is_main and self.start_epoch == 0:
            _warn_if_patch_exceeds_data(store, splits["train"], self.cfg)
        self.train_ds = _data.make_train_dataset(store, splits["train"], self.cfg)
        self.val_ds = _data.make_val_dataset(store, self.val_ids)
        self.tb = TensorBoardLogger(
            self.run / Run.TENSORBOARD, enabled=t.tensorboard and self.dist.is_main, purge_step=self.start_epoch + 1
        )
        try:
            for epoch in range(self.start_epoch, t.epochs):
                self._epoch(epoch)
                self.epochs_run.append(epoch + 1)
        finally:
            self.tb.close()
        return self.run

    def _loader(self, epoch: int) -> Any:
        import torch
        from torch.utils.data import DataLoader

        from medse.training.distributed import shard_indices

        t = self.cfg.train
        self.train_ds.set_epoch(epoch)
        batches = [shard_indices(i, t.batch_size, self.dist) for i in range(t.iterations_per_epoch)]
        gen = torch.Generator()
        gen.manual_seed(epoch)
        return DataLoader(
            self.train_ds,
            batch_sampler=batches,
            num_workers=t.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=gen,
        )

    def _epoch(self, epoch: int) -> None:
        import torch

        from medse.utils.progress import progress, progress_write
        from medse.utils.seed import derive_seed

        t = self.cfg.train
        torch.manual_seed(derive_seed(t.seed, epoch, 0xD0))  # dropout etc. from (seed, epoch)
        self.ddp_model.train()
        t_epoch = time.perf_counter()
        losses: list[float] = []
        bar = progress(
            self._loader(epoch), total=t.iterations_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", unit="it",
            disable=not (t.progress and self.dist.is_main), leave=False, dynamic_ncols=True,
        )
        for batch in bar:
            image, label = _data.unpack(batch)
            t0 = time.perf_counter()
            loss = self._step(image, label)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self._steps_this_process += 1
            if self._steps_this_process > TIMING_WARMUP_STEPS:
                self.timing["sum"] += dt
                self.timing["count"] += 1
            global_loss = all_reduce_sum([loss], self.dist, self.device)[0] / self.dist.world_size
            losses.append(global_loss)
            self.step_losses.append(global_loss)
            self.global_step += 1
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.stop_after is not None and self.global_step >= self.stop_after:
                raise TrainingInterrupted(f"stopped after {self.global_step} iterations (stop_after_iterations)")
        bar.close()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(sum(losses) / max(len(losses), 1)),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        if (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs:
            tv = time.perf_counter()
            dice = self._validate()
            row.update({f"val_{k}": v for k, v in dice.items()})
            row["val_time_s"] = time.perf_counter() - tv
            if not math.isnan(dice["dice_mean"]) and dice["dice_mean"] > self.best_metric:
                self.best_metric = dice["dice_mean"]
                self.best_epoch = epoch + 1
        self.history.append(row)
        if self.dist.is_main:
            self._write(epoch + 1, row)
            if t.progress:
                val = row.get("val_dice_mean")
                msg = f"epoch {epoch + 1}/{t.epochs}  loss {row['train_loss']:.4f}  {row['epoch_time_s']:.1f} s"
                if val is not None:
                    msg += f"  val Dice {val:.4f} (best {self.best_metric:.4f} @ {self.best_epoch})"
                progress_write(msg, file=sys.stderr)
        barrier(self.dist)

    def _step(self, image: Any, label: Any) -> float:
        import torch

        t = self.cfg.train
        image = image.to(self.device, non_blocking=True).float()
        label = label.to(self.device, non_blocking=True).long()
        if label.ndim == image.ndim - 1:
            label = label[:, None]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            logits = self.ddp_model(image)
            loss = supervised_loss(self.loss_fn, logits, label, self.cfg.model.spatial_dims)
        self.scaler.scale(loss).backward()
        if t.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def _validate(self) -> dict[str, float]:
        import torch

        from medse.training.validation import dice_per_class, predict_logits, reduce_dice_sums

        k = self.prep.num_classes
        names = self.prep.class_names[1:]
        sums = [0.0] * (k - 1)
        counts = [0.0] * (k - 1)
        model = self.model
        model.eval()
        roi = self.cfg.roi_size
        inf = self.cfg.infer
        with torch.no_grad():
            for i in range(self.dist.rank, len(self.val_ds), self.dist.world_size):
                image, label = _data.unpack(self.val_ds[i])
                image = torch.as_tensor(image).float().to(self.device)
                label = torch.as_tensor(label).long().to(self.device)
                if label.ndim == image.ndim:
                    label = label[0]
                logits = predict_logits(
                    model, image, spatial_dims=self.cfg.model.spatial_dims, roi_size=roi,
                    sw_batch_size=inf.sw_batch_size, overlap=inf.overlap, blend=inf.blend,
                    slice_axis=self.cfg.train.slice_axis, amp=self.use_amp,
                )
                d = dice_per_class(logits.argmax(0), label, k)
                for c, v in enumerate(d):
                    if not math.isnan(v):
                        sums[c] += v
                        counts[c] += 1
        red = all_reduce_sum(sums + counts, self.dist, self.device)
        model.train()
        return reduce_dice_sums(red[: k - 1], red[k - 1 :], names)

    def _write(self, epoch: int, row: dict[str, Any]) -> None:
        from medse.training.recording import plot_curves, write_metrics_csv, write_timing

        state = self._state(epoch)
        self.run.save_checkpoint("last", state)
        if self.best_epoch == epoch:
            self.run.save_checkpoint("best", state)
        write_metrics_csv(self.history, self.run / Run.METRICS)
        plot_curves(self.history, self.run / Run.CURVES)
        self.tb.log(row, epoch)
        t = self.cfg.train
        write_timing(
            self.run / Run.TIMING, self.timing["sum"], int(self.timing["count"]),
            extra={
                "device": str(self.device),
                "world_size": self.dist.world_size,
                "batch_size": t.batch_size,
                "patch_size": list(t.patch_size),
                "model": self.cfg.model.name,
                "attention": _attention_label(self.cfg.model.attention),
                "spatial_dims": self.cfg.model.spatial_dims,
                "epochs_done": epoch,
                "best_epoch": self.best_epoch,
                "best_val_dice_mean": None if self.best_epoch < 0 else self.best_metric,
            },
        )


def _attention_label(attention: Any) -> str:
    """``model.attention`` as one readable string (a mapping as ``encoder=cse,decoder=scse``)."""
    from medse.networks import format_assignment

    return format_assignment(attention)
