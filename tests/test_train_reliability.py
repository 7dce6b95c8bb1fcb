"""``medse train`` when things go wrong (issue 22 items 2-4, issue 24's global state), through the CLI.

* A full disk: ``error: no space left on device, <path>`` (one line), and the run is either complete and
  resumable (``best.pt`` and ``last.pt`` of the last good epoch, no temporary files) or gone. Shown on a real
  1-4 MiB tmpfs where this process may mount one (root), and everywhere with the checkpoint file's writes
  failing with ``ENOSPC`` below ``torch.save``.
* SIGTERM / SIGINT sent to a real ``medse train`` process: exit 130, where it stopped and the command that
  resumes; stopped before its first checkpoint, nothing is left and the same command works again.
* ``medse train --resume RUN train.epochs=N`` extends a finished run (schedule re-derived); other keys refused.
* ``medse.training.train()`` leaves torch's thread count and random states as it found them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from medse.cli import main
from medse.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medse.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("rel") / "ph", n_cases=4, size=20, seed=0)


def write_config(folder: Path, root: Path, **train) -> Path:
    """A tiny 3D U-Net config (16^3 patches, 1 thread); ``train`` overrides its train section."""
    t = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [16, 16, 16], "lr": 0.003,
         "val_every": 1, "progress": False, "device": "cpu", "num_threads": 1, "tensorboard": False}
    t.update(train)
    cfg = {
        "data": {"root": str(root), "split": {"kind": "holdout", "val_fraction": 0.25, "test_fraction": 0.0,
                                              "seed": 0}, "cache": "memory"},
        "augment": {k: {"p": 0.0} for k in ("affine", "bias_field", "noise", "gamma")},
        "model": {"name": "unet", "spatial_dims": 3, "attention": "scse", "kwargs": {"channels": [4, 8, 16]}},
        "train": t,
        "infer": {"roi_size": [16, 16, 16], "overlap": 0.0},
    }
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob(".tmp-*")) + sorted(p.name for p in run.parent.glob(".*creating*"))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(mib)``: a tmpfs of that size mounted under ``tmp_path`` (skips where mounting is refused)."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill ``disk`` up to ``leave_bytes`` free with one file (removed to free the space again)."""
    filler = disk / "filler.bin"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_full_disk_mid_run_keeps_the_last_complete_epoch_and_resumes(phantoms, tmp_path, small_disk, capsys):
    disk = small_disk(8)
    run = disk / "run"
    cfg = write_config(tmp_path, phantoms)
    assert main(["train", "--config", str(cfg), "--output", str(run)]) == 0
    best, last = load_checkpoint(run / "checkpoints" / "best.pt"), load_checkpoint(run / "checkpoints" / "last.pt")
    size = (run / "checkpoints" / "last.pt").stat().st_size
    capsys.readouterr()

    filler = fill(disk, size // 3)  # room for config.yaml and the records, not for a checkpoint
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on device, {run}/"), err
    assert "Traceback" not in err and "enforce fail" not in err
    # the previous epoch's complete set, nothing half-written
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == last["epoch"] == 1
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == best["epoch"]
    assert leftovers(run) == []

    filler.unlink()  # space again: the same run continues
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert (run / "checkpoints" / "best.pt").is_file()


def test_full_disk_before_the_first_checkpoint_leaves_nothing(phantoms, tmp_path, small_disk, capsys):
    disk = small_disk(4)
    cfg = write_config(tmp_path, phantoms)
    fill(disk, 48 * 1024)  # the run folder's files fit, the first checkpoint does not
    run = disk / "run"
    assert main(["train", "--config", str(cfg), "--output", str(run)]) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device, "), err
    assert str(disk) in lines[0] and ".tmp-" not in lines[0] and "creating" not in lines[0]
    assert not run.exists() and sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


class _FullAfter:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written (a disk filling up)."""

    def __init__(self, f, budget: int) -> None:
        self._f, self._left = f, budget

    def write(self, data) -> int:
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("which", ["best", "last"])
def test_checkpoint_write_failing_with_enospc_names_it_and_keeps_the_previous_one(phantoms, tmp_path, monkeypatch,
                                                                                   capsys, which):
    """The same without a tmpfs: the checkpoint file's writes fail with ENOSPC (below torch.save, which would
    turn them into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``)."""
    import builtins

    import medse.utils.checkpoint as ck

    run = tmp_path / "run"
    cfg = write_config(tmp_path, phantoms)
    assert main(["train", "--config", str(cfg), "--output", str(run)]) == 0
    before = {n: load_checkpoint(run / "checkpoints" / f"{n}.pt") for n in ("best", "last")}
    capsys.readouterr()

    def full_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FullAfter(f, 1000) if Path(path).name.startswith(f".tmp-{which}-") else f

    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # a file name given to torch.save: its writes fail the same way
        if isinstance(f, (str, os.PathLike)):
            with full_open(f, "wb") as fh:
                return real_save(obj, fh, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ck, "open", full_open, raising=False)
    monkeypatch.setattr(torch, "save", save)
    if which == "last":  # best.pt is written only when the epoch improves: make it write, and succeed
        monkeypatch.setattr("medse.training.trainer.SegmentationTask.monitor", lambda self, row: 1.0 + row["epoch"])
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: no space left on device, {run / 'checkpoints' / f'{which}.pt'}"], err
    after = {n: load_checkpoint(run / "checkpoints" / f"{n}.pt") for n in ("best", "last")}
    assert after["last"]["epoch"] == before["last"]["epoch"] == 1  # resumable from the last good epoch
    if which == "best":
        assert after["best"]["epoch"] == before["best"]["epoch"]
    assert leftovers(run) == []


# ----------------------------------------------------------------------------- signals
def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEDSE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "medse", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"medse train ended (exit {proc.returncode}) before {path} appeared: "
                                 f"{proc.communicate()[1]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def test_sigterm_before_the_first_checkpoint_removes_the_run_and_the_same_command_works_again(phantoms, tmp_path):
    # never reaches a checkpoint; tensorboard/ is made once training starts
    cfg = write_config(tmp_path, phantoms, epochs=3, iterations_per_epoch=100000, tensorboard=True)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--output", str(run)]
    proc = _start(args, tmp_path)
    _wait_for(run / "tensorboard", proc)
    time.sleep(0.5)
    code, err = _stop(proc, signal.SIGTERM)
    assert code == 130, err
    lines = err.strip().splitlines()
    assert lines[-2].startswith("interrupted (SIGTERM): stopped at epoch 1/3, global step "), err
    assert lines[-2].endswith(f"before the first checkpoint: removed {run}"), err
    assert lines[-1] == f"resume with: medse train --config {cfg} --output {run}", err
    assert "Traceback" not in err
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    # the same --output works again (here for one short epoch)
    assert main([*args, "train.iterations_per_epoch=1"]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()


def test_sigint_after_a_checkpoint_says_where_and_the_run_resumes(phantoms, tmp_path, capsys):
    cfg = write_config(tmp_path, phantoms, epochs=1000)
    run = tmp_path / "run"
    proc = _start(["train", "--config", str(cfg), "--output", str(run)], tmp_path)
    _wait_for(run / "checkpoints" / "last.pt", proc)
    code, err = _stop(proc, signal.SIGINT)
    assert code == 130, err
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]
    lines = err.strip().splitlines()
    assert lines[-2].startswith("interrupted (SIGINT): stopped at epoch "), err
    assert f"(last checkpoint: epoch {saved}), run folder {run}" in lines[-2], err
    assert lines[-1] == f"resume with: medse train --resume {run}", err
    assert {"config.yaml", "splits.json", "checkpoints", "metrics.csv"} <= {p.name for p in run.iterdir()}
    assert leftovers(run) == [] and (run / "checkpoints" / "best.pt").is_file()
    # the printed command resumes; train.epochs ends the run sooner than the 1000 epochs it was started with
    assert main(["train", "--resume", str(run), f"train.epochs={saved + 1}"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == saved + 1
    assert f"resumed at epoch {saved} of {saved + 1}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume train.epochs=N
@pytest.fixture(scope="module")
def finished_run(phantoms, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    assert main(["train", "--config", str(write_config(folder, phantoms, iterations_per_epoch=3)), "--output",
                 str(folder / "run")]) == 0
    return folder / "run"


def test_resume_with_train_epochs_extends_a_finished_run_with_the_schedule_re_derived(finished_run, tmp_path,
                                                                                     monkeypatch, capsys):
    import shutil

    from medse.config import load_config
    from medse.training import engine
    from medse.training.optim import schedule_of

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    rates: list[float] = []
    step = engine.Engine._step

    def spy(self, batch):
        rates.append(self.optimizer.param_groups[0]["lr"])
        return step(self, batch)

    monkeypatch.setattr(engine.Engine, "_step", spy)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=3"]) == 0
    assert "resumed at epoch 1 of 3 (continuing with epoch 2" in capsys.readouterr().err
    cfg = load_config(run / "config.yaml")
    assert cfg.train.epochs == 3  # the run records its new length
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["epoch"] == 3 and ck["global_step"] == 9 and [r["epoch"] for r in ck["history"]] == [1, 2, 3]
    # epochs 2 and 3 follow the 3-epoch schedule from step 3 on (the 1-epoch schedule had ended at lr 0)
    lam = schedule_of(cfg.train)
    assert rates == pytest.approx([cfg.train.lr * lam(t) for t in range(3, 9)], rel=1e-6)
    assert rates[0] > 0


@pytest.mark.parametrize(("override", "needle"), [
    ("train.lr=0.1", "config key 'train.lr' cannot change on resume"),
    ("model.attention=cse", "config key 'model.attention' cannot change on resume"),
    ("train.epochs", "expected KEY=VALUE"),
])
def test_resume_refuses_any_other_key_in_one_line(finished_run, capsys, override, needle):
    before = (finished_run / "config.yaml").read_text()
    assert main(["train", "--resume", str(finished_run), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "train.epochs=N" in err, err
    assert (finished_run / "config.yaml").read_text() == before


# ----------------------------------------------------------------------------- global state (issue 24)
@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_train_from_python_restores_torch_threads_and_random_state(phantoms, tmp_path, monkeypatch, fails):
    import random

    import numpy as np

    from medse.classify.train import torch_threads
    from medse.training import engine, train

    if fails:
        def boom(self, batch):
            raise RuntimeError("simulated failure in a step")

        monkeypatch.setattr(engine.Engine, "_step", boom)
    cfg = yaml.safe_load(write_config(tmp_path, phantoms).read_text())  # asks for train.num_threads: 1
    with torch_threads(2):
        torch.manual_seed(123)
        random.seed(5)
        np.random.seed(7)
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
        with pytest.raises(RuntimeError, match="simulated") if fails else contextlib.nullcontext():
            train(cfg, tmp_path / "run")
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), states[0])
        assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])
