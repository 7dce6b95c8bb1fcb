"""Images smaller than the inference window are padded up to the window, as MONAI's ``sliding_window_inference``
does, and the masks cropped back to the image.

A 2D network applied slice by slice used to get each slice at its own size (padded only to the network's size
divisor): SwinUNETR 2D (window 64, instance norm) on 20x20 slices then ran out of spatial elements at its
bottleneck ("Expected more than 1 spatial element"). Through the CLI: one training step, then ``medse predict``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def small_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medse.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("small") / "ph", n_cases=3, size=20, seed=0, anisotropy=False)


def test_2d_window_larger_than_the_slices_predicts_masks_of_the_image_shape(small_phantoms, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from medse.cli import main
    from medse.data.datasets import load_dataset

    patch = 64  # SwinUNETR 2D with instance norm: the smallest window its 32x downsampling can normalise
    cfg = {
        "data": {"root": str(small_phantoms), "split": {"kind": "holdout", "val_fraction": 0.34,
                                                        "test_fraction": 0.0, "seed": 0}, "cache": "memory"},
        "augment": {k: {"p": 0.0} for k in ("affine", "bias_field", "noise", "gamma")},
        "model": {"name": "swinunetr", "spatial_dims": 2, "attention": "none",
                  "kwargs": {"feature_size": 12, "depths": [1, 1, 1, 1]}},
        "train": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "patch_size": [patch, patch],
                  "slice_axis": 2, "device": "cpu", "num_threads": 1, "progress": False, "tensorboard": False,
                  "val_every": 1, "val_max_cases": 1},
        "infer": {"roi_size": [patch, patch], "overlap": 0.0, "sw_batch_size": 4},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--output", str(run)]) == 0, \
        capsys.readouterr().err

    scans = tmp_path / "scans"
    scans.mkdir()
    cases = load_dataset(small_phantoms).cases[:2]
    for case in cases:
        shutil.copy(case.images[0], scans / f"{case.case_id}.nii.gz")
    masks = tmp_path / "masks"
    code = main(["predict", "--run", str(run), "--input", str(scans), "--output", str(masks), "--device", "cpu",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    for case in cases:
        scan = nib.load(str(case.images[0]))
        assert scan.shape[:2] == (20, 20)  # slices smaller than the 64x64 window
        mask = nib.load(str(masks / f"{case.case_id}.nii.gz"))
        assert mask.shape == scan.shape
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= set(range(7))


def test_slices_smaller_than_the_window_equal_monai(tmp_path):
    """The slice path pads as MONAI does: the scores equal ``sliding_window_inference`` on the same slices,
    for a window larger than the slice on both axes and on one axis only."""
    import torch
    from monai.inferers import sliding_window_inference

    from medse.inference.sliding import iter_slice_slabs

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 3, padding=1)
    seen: list[tuple[int, ...]] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[2:]))
        return conv(x) + x.mean()  # depends on the zero padding: a wrong pad changes the scores

    image = torch.rand(1, 10, 13, 4)
    for roi in ((16, 16), (8, 16)):
        seen.clear()
        got = torch.cat([s for _, _, _, s in iter_slice_slabs(image, net, roi_size=roi, overlap=0.0,
                                                                batch_size=4)], dim=3)
        assert got.shape == (3, 10, 13, 4) and all(s == roi for s in seen)
        with torch.no_grad():
            want = sliding_window_inference(image.movedim(3, 0), roi, 4, net, overlap=0.0, mode="gaussian",
                                          sigma_scale=0.125).movedim(0, 3)
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
