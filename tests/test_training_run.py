"""End-to-end tests of the training engine on tiny synthetic datasets (24^3 phantoms, 16^3 patches).

Covers: the run folder and every file in it, a bad dataset or config leaving no run folder, kill-and-resume
equality of the final weights, and a 2-process gloo DDP run matching single-process training.
"""

from __future__ import annotations

import copy
import csv
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medse.training import TrainingInterrupted, build_model, load_config, resume, train
from medse.utils.checkpoint import load_checkpoint
from medse.utils.errors import MedseError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from medse.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "d", n_cases=5, size=24, seed=3)


def tiny_config(root: Path, **train_over) -> dict:
    """A 3D U-Net with scSE, 2 epochs x 3 iterations, augmentation on (to exercise its seeding)."""
    t = {
        "epochs": 2, "iterations_per_epoch": 3, "batch_size": 2, "patch_size": [16, 16, 16], "lr": 0.003,
        "val_every": 1, "progress": False, "device": "cpu", "fg_ratio": 0.5,
    }
    t.update(train_over)
    return {
        "data": {"root": str(root), "split": {"val_fraction": 0.4, "seed": 1}, "cache": "memory"},
        "augment": {"affine": {"p": 0.5}, "noise": {"p": 0.5}},
        "model": {"name": "unet", "spatial_dims": 3, "attention": "scse", "kwargs": {"channels": [4, 8, 16]}},
        "train": t,
        "infer": {"roi_size": [16, 16, 16], "overlap": 0.25},
    }


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and "creating" in p.name]


def _assert_tensorboard_matches(log_dir: Path, rows: list[dict[str, str]]) -> None:
    """The event file holds one scalar per metrics.csv column and epoch, at step = epoch, with the same value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {f"{'val' if k.startswith('val_') else 'train'}/{k}" for k in rows[0] if k != "epoch"}
    assert {"train/train_loss", "train/lr", "val/val_dice_mean", "val/val_dice_deep_left"} <= tags
    assert tags == expected
    for tag in tags:
        key = tag.split("/", 1)[1]
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["epoch"]) for r in rows], tag
        assert [e.value for e in events] == pytest.approx([float(r[key]) for r in rows], rel=1e-5, abs=1e-7), tag


# ----------------------------------------------------------------------------- end to end
def test_train_writes_complete_run_folder(synth, tmp_path, monkeypatch):
    from medse.inference import Predictor

    validated = []  # validation predicts with medse predict's Predictor (as nnU-Net validates with its predictor)
    real = Predictor.predict_preprocessed
    monkeypatch.setattr(Predictor, "predict_preprocessed",
                        lambda self, image, **kw: validated.append(image.shape) or real(self, image, **kw))
    out = tmp_path / "run"
    run = train(tiny_config(synth), out)
    assert validated and all(len(s) == 4 for s in validated)
    assert run == out.resolve()
    for name in ("config.yaml", "run_info.json", "dataset.json", "splits.json", "metrics.csv", "curves.png",
                 "timing.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    assert not list(out.rglob(".tmp-*")) and not _no_leftovers(tmp_path)

    ds = json.loads((out / "dataset.json").read_text())
    assert ds["num_classes"] == 7 and ds["labels"]["deep_right"] == 6 and ds["channel_names"] == ["T1"]
    sp = json.loads((out / "splits.json").read_text())
    assert len(sp["train"]) == 3 and len(sp["val"]) == 2 and not set(sp["train"]) & set(sp["val"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["medse_version"] and "git_commit" in info and "torch_version" in info

    cfg = load_config(out / "config.yaml")  # resolved config reloads, defaults filled in
    assert cfg.train.epochs == 2 and cfg.model.attention == "scse" and cfg.infer.blend == "gaussian"
    assert cfg.data.root == str(synth)

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert float(r["train_loss"]) > 0 and 0.0 <= float(r["val_dice_mean"]) <= 1.0
        assert "val_dice_deep_left" in r and "val_dice_background" not in r
    assert float(rows[1]["lr"]) == pytest.approx(0.0, abs=1e-12)  # poly schedule ran to its end
    _assert_tensorboard_matches(out / "tensorboard", rows)

    timing = json.loads((out / "timing.json").read_text())
    assert timing["train_steps_measured"] == 2 * 3 - 3 and timing["train_step_time_mean_s"] > 0

    ck = load_checkpoint(out / "checkpoints" / "last.pt")  # weights_only=True
    assert ck["epoch"] == 2 and ck["global_step"] == 6 and len(ck["step_losses"]) == 6
    assert ck["num_classes"] == 7 and ck["class_values"] == list(range(7))
    model = build_model(cfg, 1, 7)
    model.load_state_dict(ck["model"])
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["epoch"] == ck["best_epoch"] and best["best_metric"] == pytest.approx(ck["best_metric"])
    assert ck["best_metric"] == pytest.approx(max(float(r["val_dice_mean"]) for r in rows), abs=1e-5)

    # a finished run resumes as a no-op; an existing run folder is never overwritten
    before = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert resume(out) == out.resolve()
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == before
    with pytest.raises(MedseError, match="--resume"):
        train(tiny_config(synth), out)


def test_cli_train_2d_network(synth, tmp_path):
    from medse.cli import main

    cfg = tiny_config(synth, epochs=1, iterations_per_epoch=2, patch_size=[16, 16], batch_size=2)
    cfg["model"] = {"name": "unet", "spatial_dims": 2, "attention": "scse", "kwargs": {"channels": [4, 8, 16]}}
    cfg["infer"] = {"roi_size": [16, 16]}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run2d"
    rc = main(["train", "--config", str(cfg_path), "--output", str(out), "train.tensorboard=false"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_dice_mean"]) <= 1.0
    assert not (out / "tensorboard").exists()
    ck = load_checkpoint(out / "checkpoints" / "best.pt")
    assert ck["config"]["model"]["spatial_dims"] == 2
    assert any(v.ndim == 4 for v in ck["model"].values())  # 2D convolution kernels (out, in, kh, kw)


# ----------------------------------------------------------------------------- errors leave nothing behind
def _bad_dataset(tmp: Path, problem: str) -> Path:
    from medse.data.io import write_image
    from medse.testing import write_case

    root = tmp / f"bad_{problem}"
    for i in range(3):
        write_case(root, f"c{i}", shape=(12, 12, 12), kind="ras", seed=i)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "c": 3}}))
    lab = root / "labels" / "c1.nii.gz"
    img = root / "images" / "c1.nii.gz"
    aff = np.eye(4)
    if problem == "truncated":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 2])
    elif problem == "shape_mismatch":
        write_image(np.ones((12, 12, 10), np.uint8), aff, lab)
    elif problem == "affine_mismatch":
        write_image(np.ones((12, 12, 12), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]), lab)
    elif problem == "nan_voxels":
        arr = np.ones((12, 12, 12), np.float32)
        arr[3, 3, 3] = np.nan
        write_image(arr, aff, img)
        write_image(np.ones((12, 12, 12), np.uint8), aff, lab)
    elif problem == "four_d":
        write_image(np.ones((12, 12, 12, 2), np.float32), aff, img)
    elif problem == "label_out_of_set":
        arr = np.ones((12, 12, 12), np.uint8)
        arr[0, 0, 0] = 9
        write_image(np.ones((12, 12, 12), np.float32), aff, img)
        write_image(arr, aff, lab)
    elif problem == "missing_label":
        lab.unlink()
    elif problem == "not_gzip":
        img.write_bytes(gzip.compress(b"not a nifti file at all"))
    return root


@pytest.mark.parametrize(
    ("problem", "needle"),
    [
        ("truncated", "c1"),
        ("not_gzip", "c1"),
        ("shape_mismatch", "c1"),
        ("affine_mismatch", "c1"),
        ("four_d", "c1"),
        ("label_out_of_set", "9"),
        ("missing_label", "c1"),
    ],
)
def test_bad_dataset_one_line_error_and_no_run_folder(tmp_path, capsys, problem, needle):
    from medse.cli import main

    root = _bad_dataset(tmp_path, problem)
    cfg = tiny_config(root)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    runs.mkdir()
    rc = main(["train", "--config", str(cfg_path), "--output", str(runs / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert list(runs.iterdir()) == []  # no run folder, no temporary folder


def test_config_errors_leave_no_run_folder(synth, tmp_path, capsys):
    from medse.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(synth)))
    rc = main(["train", "--config", str(cfg_path), "--output", str(tmp_path / "r"), "train.optimiser=sgd"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "train.optimiser" in err and "optimizer" in err and len(err.splitlines()) == 1
    rc = main(["train", "--config", str(cfg_path), "--output", str(tmp_path / "r"), "data.root=/nonexistent/x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data.root" in err and "/nonexistent/x" in err
    assert not (tmp_path / "r").exists() and not _no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- kill and resume
class _Spy:
    """Records what a (resumed) run does: the epochs and steps it trains and the optimizer state it starts from."""

    def __init__(self, monkeypatch) -> None:
        from medse.training import engine as tr

        self.epochs: list[int] = []
        self.steps = 0
        self.optimizer: dict | None = None
        self.start_epoch: int | None = None
        setup, epoch, step = tr.Engine._setup, tr.Engine._epoch, tr.Engine._step

        def _setup(trainer, checkpoint):
            setup(trainer, checkpoint)
            self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
            self.start_epoch = trainer.start_epoch

        def _epoch(trainer, e):
            self.epochs.append(e + 1)
            return epoch(trainer, e)

        def _step(trainer, *args):
            self.steps += 1
            return step(trainer, *args)

        monkeypatch.setattr(tr.Engine, "_setup", _setup)
        monkeypatch.setattr(tr.Engine, "_epoch", _epoch)
        monkeypatch.setattr(tr.Engine, "_step", _step)


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("kill_after", [pytest.param(2, marks=pytest.mark.slow), 5])
def test_kill_and_resume_gives_identical_weights(synth, tmp_path, kill_after, monkeypatch, capsys):
    cfg = tiny_config(synth, val_every=2)
    ref = train(copy.deepcopy(cfg), tmp_path / "ref")
    with pytest.raises(TrainingInterrupted):
        train(copy.deepcopy(cfg), tmp_path / "killed", stop_after_iterations=kill_after)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    # iteration 2 falls in epoch 1 (no checkpoint yet); iteration 5 in epoch 2 (epoch-1 checkpoint exists)
    assert last.is_file() == (kill_after > 3)
    saved = load_checkpoint(last) if last.is_file() else None
    from medse.cli import main

    spy = _Spy(monkeypatch)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0  # the CLI path of resume(run_dir)
    err = capsys.readouterr().err
    if saved is not None:
        # training is a pure function of (seed, epoch): equal weights alone would not show that the checkpoint
        # was used. The resumed run must train only the remaining epoch and start from the saved optimizer.
        assert saved["epoch"] == 1 and spy.start_epoch == 1
        assert spy.epochs == [2] and spy.steps == 3
        assert saved["optimizer"]["state"] and _same_state(spy.optimizer, saved["optimizer"])
        assert "resumed at epoch 1 of 2" in err, err
    else:
        assert spy.start_epoch == 0 and spy.epochs == [1, 2] and spy.steps == 6
        assert "starting at epoch 0 of 2" in err, err
    resumed = tmp_path / "killed"
    assert _max_diff(_weights(ref), _weights(resumed)) <= 1e-6
    a, b = load_checkpoint(ref / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert a["step_losses"] == pytest.approx(b["step_losses"], abs=1e-7)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert [r["epoch"] for r in b["history"]] == [1, 2]
    rows = list(csv.DictReader(open(tmp_path / "killed" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # a finished run: nothing trained, says so
    spy.epochs.clear()
    assert main(["train", "--resume", str(resumed)]) == 0
    assert spy.epochs == [] and "resumed at epoch 2 of 2 (already finished" in capsys.readouterr().err


# ----------------------------------------------------------------------------- failures before the first checkpoint
@pytest.mark.parametrize("premade", [False, True], ids=["new-folder", "empty-folder-made-by-user"])
def test_run_failing_before_first_checkpoint_leaves_nothing_and_retry_works(synth, tmp_path, monkeypatch, premade):
    from medse.training import engine as tr

    out = tmp_path / "run"
    if premade:
        out.mkdir()
    step = tr.Engine._step

    def oom(trainer, *args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tr.Engine, "_step", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_config(synth, epochs=1), out)
    if premade:
        assert out.is_dir() and list(out.iterdir()) == []  # the user's folder stays, emptied
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if premade else [])
    monkeypatch.setattr(tr.Engine, "_step", step)
    assert (train(tiny_config(synth, epochs=1), out) / "checkpoints" / "last.pt").is_file()  # the retry works


def test_run_failing_after_a_checkpoint_keeps_the_folder(synth, tmp_path, monkeypatch):
    from medse.training import engine as tr

    step = tr.Engine._step

    def fail_in_epoch_2(trainer, *args):
        if trainer.global_step >= 3:
            raise RuntimeError("disk quota exceeded (simulated)")
        return step(trainer, *args)

    monkeypatch.setattr(tr.Engine, "_step", fail_in_epoch_2)
    with pytest.raises(RuntimeError, match="quota"):
        train(tiny_config(synth), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1  # kept for --resume


# ----------------------------------------------------------------------------- sizes
def test_patch_larger_than_every_case_is_padded_with_one_warning(synth, tmp_path):
    import warnings

    cfg = tiny_config(synth, epochs=1, iterations_per_epoch=2, patch_size=[32, 16, 40])  # the cases are 24^3
    with pytest.warns(UserWarning, match=r"train.patch_size' \[32, 16, 40\] is larger than every training case") as rec:
        run = train(cfg, tmp_path / "padded")
    msgs = [str(w.message) for w in rec if "patch_size" in str(w.message)]
    assert len(msgs) == 1 and "axis 0, 2" in msgs[0] and "[24, 16, 24]" in msgs[0], msgs
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))  # it trained, on padded patches
    with warnings.catch_warnings(record=True) as fits:
        warnings.simplefilter("always")
        train(tiny_config(synth, epochs=1, iterations_per_epoch=1), tmp_path / "fits")  # 16^3 fits: no warning
    assert not [w for w in fits if "patch_size" in str(w.message)]


def test_config_rejects_bad_roi_sizes():
    for roi in ([0, 0, 0], [16, -5, 16]):
        with pytest.raises(MedseError, match=r"infer.roi_size must be null or 2 or 3 sizes >= 1"):
            load_config({"infer": {"roi_size": roi}})
    with pytest.raises(MedseError, match=r"infer.overlap must be in \[0, 1\)"):
        load_config({"infer": {"overlap": 1.5}})
    with pytest.raises(MedseError, match="infer.sw_batch_size must be >= 1"):
        load_config({"infer": {"sw_batch_size": 0}})
    assert load_config({"infer": {"roi_size": [8, 8, 8]}}).roi_size == [8, 8, 8]


# ----------------------------------------------------------------------------- DDP
def test_ddp_two_processes_match_single_process(synth, tmp_path, torchrun):
    cfg = tiny_config(synth, batch_size=4, iterations_per_epoch=2, val_every=2)
    single = train(copy.deepcopy(cfg), tmp_path / "single")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = torchrun("train", "--config", str(cfg_path), "--output", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(single / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert len(a["step_losses"]) == len(b["step_losses"]) == 4
    assert b["step_losses"] == pytest.approx(a["step_losses"], abs=1e-4)
    assert _max_diff(a["model"], b["model"]) <= 1e-4
    va, vb = a["history"][-1]["val_dice_mean"], b["history"][-1]["val_dice_mean"]
    assert vb == pytest.approx(va, abs=1e-3)  # validation cases sharded over ranks, Dice sums all-reduced
    # only rank 0 wrote: one events file, one run folder
    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.*"))) == 1
    assert json.loads((tmp_path / "ddp" / "timing.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- GPU and acceptance (not in CI)
@pytest.mark.gpu
def test_amp_on_cuda(synth, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run = train(tiny_config(synth, device="cuda", amp=True), tmp_path / "gpu")
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["scaler"] and ck["scaler"]["scale"] > 0  # GradScaler was active
    assert json.loads((run / "timing.json").read_text())["device"].startswith("cuda")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["demo", "demo_2d"])
def test_demo_configs_reach_dice_07_on_synthetic_data(tmp_path_factory, config):
    """The acceptance run: 20 phantoms of 64^3, the shipped quick config, mean foreground Dice > 0.7."""
    from medse.data.synth import generate_dataset

    data = generate_dataset(tmp_path_factory.mktemp("demo") / "d", n_cases=20, size=64, seed=0)
    run = train(REPO / "configs" / f"{config}.yaml", tmp_path_factory.mktemp("run") / "r",
                overrides=[f"data.root={data}", "train.progress=false"])
    best = json.loads((run / "timing.json").read_text())["best_val_dice_mean"]
    assert best > 0.7, best
