"""Every registered segmentation network trains through ``medse train``, predicts with ``medse predict`` and is
scored by ``medse evaluate`` (issue 22).

The cases are generated from the model registry, not from a hand list: every segmentation network, in every
spatial dimensionality it registers, with ``none`` (the fast set: one optimiser step of each network in CI)
and with one block, ``scse`` (marked ``slow``). A network registered later is covered without touching this
file. The patch is the smallest of 16, 32, 64 voxels per side that medse's own pre-flight check
(``medse.training.trainer.check_model``) accepts, so a network that must see a larger patch (SwinUNETR
downsamples 32x and normalises per instance) gets one. Only the width of the two transformer networks is
reduced (``LIGHTER``; SwinUNETR with batch norm), to keep a CPU step short; a network absent from ``LIGHTER`` trains with its defaults.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from medse.networks.registry import list_models

#: settings that keep the transformer networks' CPU step short (their defaults have 6-90 M parameters); SwinUNETR
#: with batch norm takes a 32-voxel patch (with instance norm its 1-voxel bottleneck needs 64, 8x the work in 3D)
LIGHTER: dict[str, dict[str, object]] = {
    "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "norm_name": "batch"},
    "unetr": {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
}
BLOCKS = ("none", "scse")
CASES = [
    pytest.param(name, dims, block, id=f"{name}-{dims}d-{block}",
                 marks=() if block == "none" else pytest.mark.slow)
    for name, info in sorted(list_models("segmentation").items())
    for dims in info.spatial_dims
    for block in BLOCKS
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory):
    """``phantoms(patch)``: 3 cubic phantoms no smaller than the patch (no padded patches), one set per size."""
    from medse.data.synth import generate_dataset

    made: dict[int, Path] = {}

    def get(patch: int) -> Path:
        size = max(20, patch)
        if size not in made:
            made[size] = generate_dataset(tmp_path_factory.mktemp("e2e") / f"ph{size}", n_cases=3, size=size,
                                          seed=0, anisotropy=False)
        return made[size]

    return get


def _config(root: Path, name: str, dims: int, block: str, patch: int) -> dict:
    return {
        "data": {"root": str(root), "split": {"kind": "holdout", "val_fraction": 0.34, "test_fraction": 0.0,
                                              "seed": 0}, "cache": "memory"},
        "augment": {k: {"p": 0.0} for k in ("affine", "bias_field", "noise", "gamma")},
        "model": {"name": name, "spatial_dims": dims, "attention": block, "kwargs": LIGHTER.get(name, {})},
        "train": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "patch_size": [patch] * dims,
                  "slice_axis": 2, "device": "cpu", "num_threads": 1, "progress": False, "tensorboard": False,
                  "val_every": 1, "val_max_cases": 1},
        "infer": {"roi_size": [patch] * dims, "overlap": 0.0, "sw_batch_size": 4},
    }


@functools.cache
def _smallest_patch(name: str, dims: int, block: str) -> int:
    """The smallest patch side medse's pre-flight check accepts for this network (the check, not a table)."""
    from medse.config import load_config
    from medse.training.trainer import check_model
    from medse.utils.errors import MedseError

    reasons = []
    for side in (16, 32, 64):
        cfg = load_config(_config(Path("/unused"), name, dims, block, side))
        try:
            check_model(cfg, 1, 7)
        except MedseError as e:
            reasons.append(str(e))
            continue
        return side
    raise AssertionError(f"{name} {dims}D: no patch of 16, 32 or 64 passes the pre-flight check: {reasons}")


@pytest.mark.parametrize(("name", "dims", "block"), CASES)
def test_every_network_trains_predicts_and_evaluates_through_the_cli(phantoms, tmp_path, capsys, name, dims,
                                                                    block):
    import nibabel as nib
    import numpy as np

    from medse.cli import main
    from medse.data.datasets import load_dataset

    patch = _smallest_patch(name, dims, block)
    data = phantoms(patch)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(data, name, dims, block, patch)))
    run = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--output", str(run)])
    err = capsys.readouterr().err
    assert code == 0, f"medse train {name} {dims}D {block}: exit {code}: {err}"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert json.loads((run / "timing.json").read_text())["epochs_done"] == 1

    case = load_dataset(data).cases[0]
    scans, refs = tmp_path / "scans", tmp_path / "refs"
    scans.mkdir()
    refs.mkdir()
    shutil.copy(case.images[0], scans / f"{case.case_id}.nii.gz")
    shutil.copy(case.label, refs / f"{case.case_id}.nii.gz")
    masks = tmp_path / "masks"
    code = main(["predict", "--run", str(run), "--input", str(scans), "--output", str(masks), "--device", "cpu",
                 "--no-progress"])
    assert code == 0, f"medse predict {name} {dims}D {block}: exit {code}: {capsys.readouterr().err}"
    mask, scan = nib.load(str(masks / f"{case.case_id}.nii.gz")), nib.load(str(case.images[0]))
    assert mask.shape == scan.shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= set(range(7))

    ev = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(masks), "--ref", str(refs), "--output", str(ev), "--no-progress"])
    assert code == 0, f"medse evaluate {name} {dims}D {block}: exit {code}: {capsys.readouterr().err}"
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["num_cases"] == 1


def test_the_cases_come_from_the_registry():
    """Every registered segmentation network and dimensionality has a fast (``none``) case; swinunetr is one."""
    fast = {(p.values[0], p.values[1]) for p in CASES if p.values[2] == "none" and not p.marks}
    expected = {(n, d) for n, i in list_models("segmentation").items() for d in i.spatial_dims}
    assert fast == expected
    assert {("swinunetr", 2), ("swinunetr", 3)} <= fast


def test_models_table_keeps_going_past_a_network_that_fails(capsys):
    """``medse models --networks unet,swinunetr --size 32``: SwinUNETR cannot run at 32 voxels (its bottleneck is
    1 voxel); its rows are n/a with the reason naming it, the U-Net rows are there, exit 0."""
    from medse.cli import main

    code = main(["models", "--networks", "unet,swinunetr", "--size", "32", "--dims", "2", "--attention", "cse"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {tuple(line.split()[:3]): line for line in out.splitlines() if line.startswith(("unet ", "swinunetr "))}
    assert "n/a" not in rows[("unet", "2D", "none")] and "n/a" not in rows[("unet", "2D", "cse")]
    assert "n/a" in rows[("swinunetr", "2D", "none")] and "n/a" in rows[("swinunetr", "2D", "cse")]
    notes = [line for line in out.splitlines() if line.startswith("- swinunetr 2D")]
    assert len(notes) == 2 and all("spatial element" in n for n in notes), out
