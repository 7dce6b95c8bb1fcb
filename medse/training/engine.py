"""The one training engine: the epoch loop that segmentation and classification both train with.

A :class:`TrainingTask` says what is trained (its model, batches, loss, validation and what "better" means);
the :class:`Engine` owns everything else, the same way for every task:

* optimiser, per-iteration learning-rate schedule (``LambdaLR``, its state in the checkpoint so a resumed
  run continues it), AMP (autocast + GradScaler, CUDA only), gradient clipping;
* the checkpoint (``model``, ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` = epochs completed,
  ``global_step``, ``rng``, ``history``, ``step_losses``, ``best_metric``, ``best_epoch``, ``stale``,
  ``timing``, plus the task's own keys), ``checkpoints/last.pt`` every epoch and ``best.pt`` when the
  monitored value improves, resume from ``last.pt``. Each epoch writes ``best.pt`` first, then the records,
  then ``last.pt`` (each atomically), so a failed write (a full disk: ``no space left on device, <path>``)
  leaves the previous epoch's complete set: ``best.pt`` never goes missing while ``last.pt`` exists;
* SIGINT/SIGTERM (inside :func:`medse.utils.interrupt.stop_on_signals`) end :meth:`Engine.fit` with
  :class:`~medse.utils.interrupt.Interrupted` saying the epoch, step and run folder and the resume command;
* per-epoch records (``metrics.csv``, ``curves.png``, TensorBoard), ``timing.json`` (mean step time, the first
  :data:`TIMING_WARMUP_STEPS` steps of a process excluded), progress bars and the one-line epoch summary;
* DistributedDataParallel (the task shards its batches over ``engine.dist``; the engine wraps the model,
  all-reduces the loss and the task's counters, and only rank 0 writes);
* early stopping (``patience`` epochs without improvement; 0 = off) and the ``stop_after`` hook
  (:class:`TrainingInterrupted` after N global iterations, used to test kill-and-resume).

Determinism: the weights are initialised after ``seed_everything(task.init_seed)`` and the torch RNG is
re-seeded from ``(seed, epoch)`` at the start of every epoch; batches and augmentation are the task's, drawn
from ``(seed, epoch, index)``, so a run killed at any point and resumed ends with the same weights on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from medse.runs import Run
from medse.training.distributed import DistInfo, all_reduce_sum, barrier
from medse.utils.atomic import raise_if_disk_full
from medse.utils.errors import MedseError
from medse.utils.interrupt import Interrupted

if TYPE_CHECKING:
    import torch

__all__ = [
    "STOP_ENV",
    "TIMING_WARMUP_STEPS",
    "Engine",
    "EngineSettings",
    "TrainingInterrupted",
    "TrainingTask",
    "check_num_classes",
    "check_output",
    "check_resume_overrides",
    "remove_if_no_checkpoint",
    "start_run",
    "stop_on_signals_during",
    "start_command",
    "torch_global_state",
]

#: environment variable: stop (raise :class:`TrainingInterrupted`) after this many global iterations.
STOP_ENV = "MEDSE_STOP_AFTER_ITERATIONS"
#: steps at the start of each process excluded from ``timing.json`` (allocator and kernel warm-up).
TIMING_WARMUP_STEPS = 3


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_iterations`` hook (used to test kill-and-resume)."""


@dataclass
class EngineSettings:
    """How the engine optimises, whatever the task.

    Args:
        epochs: epochs to train.
        iterations_per_epoch: optimiser steps per epoch (global, over all ranks).
        seed: seed of the per-epoch RNG re-seeding.
        init_seed: seed set just before the model is built (weight initialisation, equal on every rank).
        device: a resolved ``torch.device``.
        optimizer: ``adam``, ``adamw`` or ``sgd``; ``lr``, ``weight_decay``, ``momentum``, ``nesterov`` its settings.
        lr_lambda: multiplier of ``lr`` at iteration t (0-based), from :mod:`medse.training.optim`.
        amp: mixed precision (used only on CUDA).
        grad_clip: max gradient norm, None for none.
        val_every: validate every N epochs (and after the last).
        patience: stop after this many validated epochs without improvement; 0 never stops early.
        progress: progress bars and the per-epoch summary line.
        tensorboard: TensorBoard events under ``RUN_DIR/tensorboard``.
    """

    epochs: int
    iterations_per_epoch: int
    seed: int
    init_seed: int
    device: torch.device
    optimizer: str
    lr: float
    lr_lambda: Callable[[int], float]
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    amp: bool = False
    grad_clip: float | None = None
    val_every: int = 1
    patience: int = 0
    progress: bool = True
    tensorboard: bool = False


class TrainingTask(Protocol):
    """What a task gives the engine. ``batch`` is whatever :meth:`batches` yields."""

    #: the key of the monitored value in an epoch row, for messages (e.g. ``val_dice_mean``)
    monitor_key: str

    def build_model(self) -> torch.nn.Module:
        """The network, built on the CPU (the engine moves it to the device)."""

    def prepare(self, engine: Engine) -> None:
        """Datasets and warnings, once the engine is set up and before the first epoch of this process."""

    def batches(self, epoch: int, engine: Engine) -> Iterable[Any]:
        """This process's batches of ``epoch`` (at most ``iterations_per_epoch`` are used)."""

    def loss(self, model: torch.nn.Module, batch: Any, engine: Engine) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward ``batch`` (runs under autocast) and return the loss and counters to sum over the epoch."""

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Epoch-row entries from the summed (over steps and ranks) counters of :meth:`loss`."""

    def validate(self, model: torch.nn.Module, engine: Engine) -> dict[str, Any]:
        """Validation row entries (``val_*``); the model is in eval mode and gradients are off."""

    def monitor(self, row: dict[str, Any]) -> float | None:
        """The monitored value of an epoch row, larger is better; None when the row has none."""

    def state(self) -> dict[str, Any]:
        """Task keys saved in every checkpoint (classes, channels, config)."""

    def check_state(self, checkpoint: dict[str, Any]) -> None:
        """Raise :class:`MedseError` when a checkpoint does not belong to this task's data."""

    def plot_curves(self, history: list[dict[str, Any]], path: Path) -> None:
        """Write ``curves.png`` from the history."""

    def timing_extra(self) -> dict[str, Any]:
        """Task facts recorded in ``timing.json`` beside the step time."""

    def summary(self, row: dict[str, Any], engine: Engine) -> str:
        """The one-line epoch summary."""


class Engine:
    """Train ``task`` into ``run``; :meth:`fit` returns the run. See the module docstring."""

    def __init__(self, run: Run, task: TrainingTask, settings: EngineSettings, dist: DistInfo,
                 stop_after: int | None = None, resume_command: str = "medse train --resume") -> None:
        self.run = run
        self.task = task
        self.settings = settings
        self.dist = dist
        self.resume_command = resume_command
        env = os.environ.get(STOP_ENV)
        self.stop_after = stop_after if stop_after is not None else (int(env) if env else None)

    @property
    def device(self) -> torch.device:
        return self.settings.device

    # ------------------------------------------------------------------ setup
    def _setup(self, checkpoint: dict[str, Any] | None) -> None:
        import torch

        from medse.training.optim import make_optimizer
        from medse.utils.seed import seed_everything

        s = self.settings
        self.use_amp = bool(s.amp and self.device.type == "cuda")
        seed_everything(s.init_seed)
        self.model = self.task.build_model().to(self.device)
        self.optimizer = make_optimizer(self.model.parameters(), s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
                                        momentum=s.momentum, nesterov=s.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, s.lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.stale = 0
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

        self.task.check_state(ck)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        # the next step's rate from this config's schedule (a resume may extend the run: train.epochs=N)
        t = self.scheduler.last_epoch
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            g["lr"] = base * self.settings.lr_lambda(t)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.start_epoch = int(ck["epoch"])
        self.global_step = int(ck["global_step"])
        self.history = list(ck.get("history", []))
        self.step_losses = [float(v) for v in ck.get("step_losses", [])]
        self.best_metric = float(ck.get("best_metric", -math.inf))
        self.best_epoch = int(ck.get("best_epoch", -1))
        self.stale = int(ck.get("stale", 0))
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
            "stale": self.stale,
            "timing": self.timing,
            **self.task.state(),
        }

    def _stopped_early(self) -> bool:
        p = self.settings.patience
        return p > 0 and self.stale >= p

    # ------------------------------------------------------------------ loop
    def fit(self, checkpoint: dict[str, Any] | None) -> Run:
        from medse.training.recording import TensorBoardLogger

        s = self.settings
        self._setup(checkpoint)
        self.epochs_run: list[int] = []  # epochs this call trained (1-based), for the log and the tests
        done = self.start_epoch >= s.epochs or self._stopped_early()
        if checkpoint is not None and self.dist.is_main:
            if self._stopped_early():
                what = f"stopped early: no improvement of {self.task.monitor_key} for {self.stale} epochs"
            elif done:
                what = "already finished"
            else:
                what = f"continuing with epoch {self.start_epoch + 1}"
            print(f"resumed at epoch {self.start_epoch} of {s.epochs} ({what}; global step {self.global_step})",
                  file=sys.stderr)
        if done:
            return self.run
        self.task.prepare(self)
        self.tb = TensorBoardLogger(
            self.run / Run.TENSORBOARD, enabled=s.tensorboard and self.dist.is_main, purge_step=self.start_epoch + 1
        )
        self.saved_epoch = self.start_epoch if checkpoint is not None else None
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, s.epochs):
                self._epoch(epoch)
                self.epochs_run.append(epoch + 1)
                if self._stopped_early():
                    if self.dist.is_main:
                        print(f"early stopping: no improvement of {self.task.monitor_key} for {self.stale} epochs",
                              file=sys.stderr)
                    break
        except Interrupted:
            raise
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under stop_on_signals
            raise self.interrupted(epoch) from None
        finally:
            self.tb.close()
        return self.run

    def interrupted(self, epoch: int) -> Interrupted:
        """Where a signal stopped training in ``epoch`` (0-based), and the command that resumes the run."""
        saved = getattr(self, "saved_epoch", None)
        last = "no checkpoint yet" if saved is None else f"last checkpoint: epoch {saved}"
        position = f"epoch {epoch + 1}/{self.settings.epochs}, global step {self.global_step}"
        err = Interrupted(f"{position} ({last}), run folder {self.run.path}",
                          resume=f"{self.resume_command} {self.run.path}")
        err.position = position  # for start_run's message when it removes a run without checkpoint
        return err

    def _epoch(self, epoch: int) -> None:
        import torch

        from medse.utils.progress import progress, progress_write
        from medse.utils.seed import derive_seed

        s = self.settings
        torch.manual_seed(derive_seed(s.seed, epoch, 0xD0))  # dropout etc. from (seed, epoch)
        self.ddp_model.train()
        t_epoch = time.perf_counter()
        losses: list[float] = []
        sums: dict[str, float] = {}
        bar = progress(
            self.task.batches(epoch, self), total=s.iterations_per_epoch, desc=f"epoch {epoch + 1}/{s.epochs}",
            unit="it", disable=not (s.progress and self.dist.is_main), leave=False, dynamic_ncols=True,
        )
        for i, batch in enumerate(bar):
            if i >= s.iterations_per_epoch:
                break
            t0 = time.perf_counter()
            loss, counts = self._step(batch)
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
            for k, v in counts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            self.global_step += 1
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.stop_after is not None and self.global_step >= self.stop_after:
                raise TrainingInterrupted(f"stopped after {self.global_step} iterations (stop_after_iterations)")
        bar.close()
        if sums:
            keys = sorted(sums)
            sums = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.dist, self.device), strict=True))
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(sum(losses) / max(len(losses), 1)),
            "lr": float(self.scheduler.get_last_lr()[0]),  # after the epoch's last step
            "epoch_time_s": time.perf_counter() - t_epoch,
            **self.task.train_metrics(sums),
        }
        validated = (epoch + 1) % s.val_every == 0 or epoch + 1 == s.epochs
        if validated:
            tv = time.perf_counter()
            model = self.model
            model.eval()
            with torch.no_grad():
                row.update(self.task.validate(model, self))
            model.train()
            row["val_time_s"] = time.perf_counter() - tv
        value = self.task.monitor(row)
        if value is not None and not math.isnan(value) and value > self.best_metric:
            self.best_metric = value
            self.best_epoch = epoch + 1
            self.stale = 0
        elif validated:
            self.stale += 1
        self.history.append(row)
        if self.dist.is_main:
            self._write(epoch + 1, row)
            if s.progress:
                progress_write(self.task.summary(row, self), file=sys.stderr)
        barrier(self.dist)

    def _step(self, batch: Any) -> tuple[float, dict[str, float]]:
        import torch

        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            loss, counts = self.task.loss(self.ddp_model, batch, self)
        self.scaler.scale(loss).backward()
        if s.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach()), counts

    def _write(self, epoch: int, row: dict[str, Any]) -> None:
        """``best.pt`` (when improved), the records, then ``last.pt``: ``last.pt`` is written only once the rest of
        the epoch is on disk, so a write that fails (a full disk) leaves the previous epoch's complete, resumable
        set (and a run without ``last.pt`` is one to remove, :func:`remove_if_no_checkpoint`)."""
        state = self._state(epoch)
        if self.best_epoch == epoch:
            self.run.save_checkpoint("best", state)
        with raise_if_disk_full(self.run.path):  # the records' writers name no file of their own
            self._write_records(epoch, row)
        self.run.save_checkpoint("last", state)
        self.saved_epoch = epoch

    def _write_records(self, epoch: int, row: dict[str, Any]) -> None:
        from medse.training.recording import write_metrics_csv, write_timing

        write_metrics_csv(self.history, self.run / Run.METRICS)
        self.task.plot_curves(self.history, self.run / Run.CURVES)
        self.tb.log(row, epoch)
        write_timing(
            self.run / Run.TIMING, self.timing["sum"], int(self.timing["count"]),
            extra={
                "device": str(self.device),
                "world_size": self.dist.world_size,
                **self.task.timing_extra(),
                "epochs_done": epoch,
                "best_epoch": self.best_epoch,
                f"best_{self.task.monitor_key}": None if self.best_epoch < 0 else self.task_best_value(),
            },
        )

    def task_best_value(self) -> float | None:
        """The best monitored value as the row holds it (the monitor may negate a lower-is-better value)."""
        for row in self.history:
            if row["epoch"] == self.best_epoch:
                v = row.get(self.task.monitor_key)
                return None if v is None else float(v)
        return None


def check_output(output: Path, resume_command: str) -> None:
    """The run folder must not hold a run (or a file) and its place must be writable; checked before any work."""
    from medse.utils.atomic import ensure_writable_dir

    if output.exists() and not output.is_dir():
        raise MedseError("output folder is a file, not a folder", output)
    if output.is_dir() and any(output.iterdir()):
        hint = f" (use `{resume_command}` to continue it)" if (output / Run.CONFIG).is_file() else ""
        raise MedseError(f"output folder already exists and is not empty{hint}", output)
    ensure_writable_dir(output, "output folder", create=False)


def remove_if_no_checkpoint(output: Path, existed: bool, *, quiet: bool = False) -> bool:
    """A run that failed before its first checkpoint leaves nothing: the folder it made is removed (an empty
    folder the user made beforehand is emptied, not removed), so a retry with a fixed config can use it.
    Returns whether anything was removed (``quiet``: without saying so on stderr)."""
    if Run(output).has_checkpoint("last") or not output.is_dir():
        return False
    if existed:
        for child in output.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    else:
        shutil.rmtree(output, ignore_errors=True)
    if not quiet:
        print(f"medse: the run failed before its first checkpoint; removed what it wrote in {output}",
              file=sys.stderr)
    return True


def start_command(command: str, config: object, output: object, overrides: Iterable[str]) -> str | None:
    """The shell command that starts a run again (``medse train --config C --output O KEY=VALUE...``), for an
    :class:`Interrupted` that removed the run; ``None`` when the config is not a file (the Python API)."""
    import shlex

    if not isinstance(config, (str, os.PathLike)):
        return None
    return shlex.join([*shlex.split(command), "--config", os.fspath(config), "--output", os.fspath(output),
                       *map(str, overrides)])


def start_run(output: Path, dist: DistInfo, create: Callable[[], object], fit: Callable[[Run], Run],
              rerun: str | None = None) -> Run:
    """Create the run folder on rank 0 (``create``; its failure is shared with the other ranks instead of hanging
    them), then train it (``fit``). A run that fails with an error before its first checkpoint removes what it
    made (:func:`remove_if_no_checkpoint`), and so does one stopped by SIGINT/SIGTERM before it (the
    :class:`Interrupted` then says so and gives ``rerun``, the command that starts it again); a run
    with a checkpoint keeps its folder for resume, and so does the ``stop_after`` hook's simulated kill."""
    from medse.training.distributed import broadcast_object

    existed = output.exists()
    err = None
    if dist.is_main:
        try:
            create()
        except Exception as e:
            err = e
    err_msg = broadcast_object(None if err is None else f"{type(err).__name__}: {err}", dist)
    if err is not None:
        raise err
    if err_msg is not None:
        raise MedseError(f"rank 0 could not create the run folder: {err_msg}", output)
    barrier(dist)
    try:
        return fit(Run(output))
    except TrainingInterrupted:
        raise  # a simulated kill: the folder stays for resume
    except KeyboardInterrupt as e:
        if not (dist.is_main and remove_if_no_checkpoint(output, existed, quiet=True)):
            raise
        position = getattr(e, "position", "the start of training")
        kept = "emptied" if existed else "removed"
        raise Interrupted(f"{position}, before the first checkpoint: {kept} {output}", resume=rerun) from None
    except Exception:
        if dist.is_main:
            remove_if_no_checkpoint(output, existed)
        raise


@contextlib.contextmanager
def stop_on_signals_during(setup: str, resume: str | None) -> Iterator[None]:
    """:func:`~medse.utils.interrupt.stop_on_signals` around a train or resume call: a signal during the epochs
    is the engine's :class:`Interrupted` (epoch, step, run folder); one before them (reading the data, creating
    the folder) becomes ``Interrupted(setup, resume=resume)``."""
    from medse.utils.interrupt import stop_on_signals

    with stop_on_signals():
        try:
            yield
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise Interrupted(setup, resume=resume) from None


@contextlib.contextmanager
def torch_global_state(num_threads: int | None = None) -> Iterator[None]:
    """Restore, on leaving (returning or raising), the process-wide state training changes: torch's CPU
    thread count (set here to ``num_threads`` when given), the Python, NumPy, torch and CUDA random states
    (seeded for the weights and every epoch) and the current CUDA device. ``train()`` called from a notebook
    leaves the notebook as it found it."""
    import torch

    from medse.utils.seed import get_rng_states, set_rng_states

    threads = torch.get_num_threads()
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    rng = get_rng_states()
    try:
        if num_threads is not None and num_threads != threads:
            torch.set_num_threads(num_threads)
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        set_rng_states(rng)
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)


#: the config keys ``--resume RUN KEY=VALUE`` may change: the number of epochs (extending a finished run)
RESUME_KEYS = ("train.epochs",)


def check_resume_overrides(overrides: Iterable[str], command: str = "medse train --resume RUN") -> list[str]:
    """The ``KEY=VALUE`` overrides a resume accepts (``train.epochs=N``); any other key is refused in one line.

    The rest of a run's config (data, model, schedule shape, patch) is what its checkpoints were trained with,
    so it cannot change halfway; ``train.epochs`` extends (or ends sooner) a run, its schedule re-derived from
    the new length (the engine's resume sets the next step's rate from the new schedule).
    """
    out = []
    for item in overrides:
        key, sep, _ = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise MedseError(f"{command}: expected KEY=VALUE ({', '.join(k + '=N' for k in RESUME_KEYS)}), "
                             f"got {item!r}")
        if key not in RESUME_KEYS:
            raise MedseError(f"{command}: config key '{key}' cannot change on resume (the run keeps the config "
                             f"it was trained with); only {', '.join(k + '=N' for k in RESUME_KEYS)} can")
        out.append(str(item))
    return out


def check_num_classes(ck: dict[str, Any], num_classes: int, where: Run | Path) -> None:
    """Raise when a checkpoint was trained for a different number of classes than the data has."""
    if int(ck.get("num_classes", num_classes)) != num_classes:
        raise MedseError("checkpoint has a different number of classes than the dataset", where)
