"""Unit tests of the training engine pieces that need no dataset: config schema, schedules, Dice, records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medse.config import Config, config_to_dict, load_config
from medse.training.distributed import DistInfo, shard_indices
from medse.training.optim import build_optimizer, build_scheduler, lr_multiplier
from medse.training.recording import plot_curves, write_metrics_csv, write_timing
from medse.training.validation import dice_per_class, reduce_dice_sums, summarise_dice
from medse.utils.errors import MedseError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- config schema
def test_defaults_and_roundtrip():
    cfg = load_config({})
    assert cfg.train.epochs == 50 and cfg.train.optimizer == "adam" and cfg.infer.blend == "gaussian"
    assert cfg.roi_size == [64, 64, 64]
    again = load_config(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config({}, ["train.epochs=3", "train.lr=0.01", "train.patch_size=[16,16,16]", "train.grad_clip=null"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(0.01)
    assert cfg.train.patch_size == [16, 16, 16] and cfg.train.grad_clip is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.epoch=3"], "train.epoch'"),  # unknown key, named with a suggestion
        (["train.epochs=three"], "train.epochs"),  # wrong type
        (["train.optimizer=adamw"], "train.optimizer"),  # not in the Literal
        (["train.schedule=linear"], "train.schedule"),
        (["model.spatial_dims=4"], "model.spatial_dims"),
        (["train.patch_size=[32,32]"], "train.patch_size"),  # 2 values for a 3D model
        (["infer.overlap=1.5"], "infer.overlap"),
        (["train.device=tpu"], "train.device"),
        (["modle.name=unet"], "modle"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.num_threads=0"], "train.num_threads"),
        (["train.slice_axis=3"], "train.slice_axis"),
    ],
)
def test_schema_errors_name_the_key(overrides, needle):
    with pytest.raises(MedseError) as ei:
        load_config({}, overrides)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epocs: 2\n")
    with pytest.raises(MedseError) as ei:
        load_config(p)
    assert "train.epocs" in str(ei.value) and "epochs" in str(ei.value) and str(p) in str(ei.value)


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.25


SEGMENTATION_CONFIGS = [f"{net}_{d}d" for net in ("unet", "fc_densenet", "sdnet", "quicknat") for d in (2, 3)]


@pytest.mark.parametrize("name", [*SEGMENTATION_CONFIGS, "demo", "demo_2d"])
def test_shipped_configs_validate_and_build(name):
    from medse.training import build_model

    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert len(cfg.train.patch_size) == cfg.model.spatial_dims
    assert cfg.data.root is None  # the dataset is given on the command line
    net = cfg.model.name.replace("_", "")
    assert name.replace("_", "").startswith(net) or name.startswith("demo")
    model = build_model(cfg, 1, 7)
    div = getattr(model, "size_divisor", 1)
    assert all(p % div == 0 for p in cfg.train.patch_size), (cfg.train.patch_size, div)
    assert all(r % div == 0 for r in cfg.roi_size), (cfg.roi_size, div)


def test_demo_configs():
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.model.name == "unet" and demo.model.attention == "scse" and demo.model.spatial_dims == 3
    demo2 = load_config(CONFIGS / "demo_2d.yaml")
    assert demo2.model.spatial_dims == 2 and demo2.model.attention == "scse"


# ----------------------------------------------------------------------------- schedules
def test_lr_multipliers():
    poly = lr_multiplier("poly", 10, power=0.9)
    assert poly(0) == 1.0 and poly(5) == pytest.approx(0.5**0.9) and poly(10) == 0.0
    cos = lr_multiplier("cosine", 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier("constant", 10)(7) == 1.0
    warm = lr_multiplier("constant", 10, warmup=4)
    assert [warm(t) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier("step", 10)


def test_scheduler_state_resumes_schedule():
    cfg = load_config({}, ["train.epochs=2", "train.iterations_per_epoch=5", "train.lr=0.1", "train.optimizer=sgd"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg.train)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.99
    sched = build_scheduler(opt, cfg.train)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer([p], cfg.train)
    sched2 = build_scheduler(opt2, cfg.train)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr()[0] == pytest.approx(0.1 * (1 - 3 / 10) ** 0.9)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 4 / 10) ** 0.9)


# ----------------------------------------------------------------------------- DDP sharding
def test_shard_indices_cover_the_global_batch():
    w = 2
    got = [shard_indices(3, 4, DistInfo(rank=r, world_size=w, enabled=True)) for r in range(w)]
    assert got == [[12, 13], [14, 15]]
    assert shard_indices(3, 4, DistInfo()) == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="divisible"):
        shard_indices(0, 3, DistInfo(rank=0, world_size=2, enabled=True))


# ----------------------------------------------------------------------------- Dice
def test_dice_per_class_values():
    ref = np.zeros((4, 4, 4), np.int64)
    pred = np.zeros_like(ref)
    ref[:2] = 1  # 32 voxels
    pred[:1] = 1  # 16 voxels, all inside
    ref[3, 3, 3] = 2
    # class 3 absent from both -> 1, the evaluation's rule (medse.evaluation.metrics.DICE_BOTH_EMPTY)
    d = dice_per_class(pred, ref, 4)
    assert d[0] == pytest.approx(2 * 16 / 48)
    assert d[1] == 0.0
    assert d[2] == 1.0


def test_dice_summary_skips_nan():
    s = summarise_dice([[1.0, math.nan], [0.5, 0.25]], ["a", "b"])
    assert s["dice_a"] == pytest.approx(0.75) and s["dice_b"] == pytest.approx(0.25)
    assert s["dice_mean"] == pytest.approx(0.5)
    r = reduce_dice_sums([0.0, 2.0], [0, 4], ["a", "b"])
    assert math.isnan(r["dice_a"]) and r["dice_mean"] == pytest.approx(0.5)


class _Const(torch.nn.Module):
    """Logits that put class 1 where the first channel is positive (tests slice/volume plumbing)."""

    def forward(self, x):
        fg = (x[:, :1] > 0).float()
        return torch.cat([1 - fg, fg], 1) * 10


@pytest.mark.parametrize("dims", [2, 3])
def test_validation_predictor_slices_and_windows_like_predict(dims):
    """Validation predicts with medse predict's Predictor: a 2D network slices along slice_axis, a 3D one slides."""
    from medse.inference import Predictor

    img = torch.randn(1, 12, 10, 9)
    roi = [8, 8, 8] if dims == 3 else [8, 8]
    pred = Predictor(_Const(), spatial_dims=dims, in_channels=1, roi_size=roi, overlap=0.25, slice_axis=1,
                     device="cpu", amp=False)
    labels, _ = pred.predict_preprocessed(img.numpy())
    assert labels.shape == (12, 10, 9)
    assert np.array_equal(labels, (img[0] > 0).numpy().astype(labels.dtype))


# ----------------------------------------------------------------------------- records
def test_metrics_csv_curves_timing(tmp_path):
    hist = [
        {"epoch": 1, "train_loss": 1.5, "lr": 1e-3},
        {"epoch": 2, "train_loss": 1.0, "lr": 5e-4, "val_dice_mean": 0.5, "val_dice_a": 0.25},
    ]
    write_metrics_csv(hist, tmp_path / "metrics.csv")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["val_dice_mean"] == ""
    assert float(rows[1]["val_dice_a"]) == 0.25
    plot_curves(hist, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_timing(tmp_path / "timing.json", 3.0, 6, extra={"device": "cpu"})
    rec = json.loads((tmp_path / "timing.json").read_text())
    assert rec["train_step_time_mean_s"] == 0.5 and rec["train_steps_measured"] == 6 and rec["device"] == "cpu"
    assert not list(tmp_path.glob(".tmp-*"))
