from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medse.cli import main
from medse.data.datasets import load_dataset
from medse.data.io import read_image
from medse.data.preprocess import PreprocessConfig, preprocess_case
from medse.data.synth import LABELS, generate_case, generate_dataset
from medse.data.validate import validate_dataset
from medse.utils.errors import MedseError

REPO = Path(__file__).resolve().parents[1]


def test_case_is_seeded_and_well_formed():
    img, lab, aff, info = generate_case(24, seed=5)
    img2, lab2, aff2, _ = generate_case(24, seed=5)
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_array_equal(aff, aff2)
    assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == lab.shape
    assert set(np.unique(lab)) == set(LABELS.values())
    assert np.isfinite(img).all() and img.min() >= 0  # Rician magnitude is non-negative
    assert not np.array_equal(generate_case(24, seed=6)[1], lab)


def test_dataset_files_headers_and_variety(synth_dataset):
    meta = json.loads((synth_dataset / "dataset.json").read_text())
    assert meta["labels"] == LABELS and meta["numTraining"] == 6 and meta["channel_names"] == {"0": "T1"}
    axcodes, spacings, obliques = set(), set(), 0
    for i in range(6):
        limg = nib.load(str(synth_dataset / "labels" / f"case_{i:03d}.nii.gz"))
        iimg = nib.load(str(synth_dataset / "images" / f"case_{i:03d}.nii.gz"))
        assert limg.get_data_dtype() == np.uint8 and iimg.get_data_dtype() == np.float32
        np.testing.assert_allclose(limg.affine, iimg.affine)
        axcodes.add("".join(nib.aff2axcodes(iimg.affine)))
        spacings.add(tuple(np.round(iimg.header.get_zooms(), 2)))
        r = iimg.affine[:3, :3] / np.linalg.norm(iimg.affine[:3, :3], axis=0)
        obliques += not np.allclose(np.abs(r), np.round(np.abs(r)), atol=1e-6)
        assert int(limg.header["sform_code"]) == 1
    assert len(axcodes) >= 3 and len(spacings) >= 2 and obliques >= 1
    rep = validate_dataset(load_dataset(synth_dataset))
    assert rep.ok and rep.warnings == [] and rep.label_values == list(range(7))


def test_tissue_contrast_and_equal_intensity_pairs(synth_dataset):
    img, lab, _ = preprocess_case(synth_dataset / "images" / "case_003.nii.gz",
                                  synth_dataset / "labels" / "case_003.nii.gz", PreprocessConfig())
    mean = {k: float(img[0][lab == v].mean()) for k, v in LABELS.items()}
    assert mean["csf"] < mean["grey_matter"] < mean["white_matter"]
    assert mean["ventricles"] < mean["grey_matter"]
    spread = mean["white_matter"] - mean["csf"]
    assert abs(mean["deep_left"] - mean["deep_right"]) < 0.1 * spread  # only position tells them apart
    vol = {k: int((lab == v).sum()) for k, v in LABELS.items()}
    assert min(vol.values()) > 20  # every structure big enough to learn at 24^3
    assert 0.5 < vol["deep_left"] / vol["deep_right"] < 2.0


def test_nnunet_layout_and_overwrite(tmp_path):
    out = generate_dataset(tmp_path / "nn", n_cases=2, size=12, seed=0, layout="nnunet")
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_000_0000.nii.gz", "case_001_0000.nii.gz"]
    assert load_dataset(out).layout == "nnunet"
    with pytest.raises(MedseError, match="already contains 4 files.*--overwrite"):
        generate_dataset(out, n_cases=2, size=12, layout="nnunet")
    generate_dataset(out, n_cases=1, size=12, seed=1, layout="nnunet", overwrite=True)
    assert [p.name for p in (out / "imagesTr").iterdir()] == ["case_000_0000.nii.gz"]
    (out / "imagesTr" / "mine.nii.gz").write_bytes(b"x")
    with pytest.raises(MedseError, match="non-synthetic file"):
        generate_dataset(out, n_cases=1, size=12, layout="nnunet", overwrite=True)


def test_cli_synth_manifest_validate(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--cases", "3", "--size", "16", "--seed", "2"]) == 0
    assert "wrote 3 cases" in capsys.readouterr().out
    assert main(["manifest", str(tmp_path / "d"), "--out", str(tmp_path / "m" / "x.json")]) == 0
    meta = json.loads((tmp_path / "m" / "x.json").read_text())
    assert meta["num_cases"] == 3 and meta["labels"] == LABELS
    assert meta["cases"][2]["images"] == ["../d/images/case_002.nii.gz"]
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "m" / "x.json")]) == 0
    assert capsys.readouterr().out.strip().endswith("0 error(s), 0 warning(s)")
    # a broken file: manifest refuses to write, validate exits 1
    (tmp_path / "d" / "labels" / "case_001.nii.gz").write_bytes(b"broken")
    assert main(["manifest", str(tmp_path / "d"), "--out", str(tmp_path / "m" / "y.json")]) == 1
    assert not (tmp_path / "m" / "y.json").exists()
    assert main(["validate", str(tmp_path / "d")]) == 1
    assert main(["validate", str(tmp_path / "nothing")]) == 2  # user error: one line, exit 2
    assert "error: " in capsys.readouterr().err


def test_demo_manifest_matches_default_synth():
    """``data_manifests/demo.json`` describes ``medse synth --out demo_data`` (run from the repo root)."""
    meta = json.loads((REPO / "data_manifests" / "demo.json").read_text())
    assert meta["format"] == "medse-manifest" and meta["version"] == 1
    assert meta["labels"] == LABELS and meta["num_cases"] == 20
    assert [c["case_id"] for c in meta["cases"]] == [f"case_{i:03d}" for i in range(20)]
    assert meta["cases"][0] == {"case_id": "case_000", "images": ["../demo_data/images/case_000.nii.gz"],
                                "label": "../demo_data/labels/case_000.nii.gz"}


@pytest.mark.slow
def test_twenty_cases_of_64_in_seconds(tmp_path):
    t0 = time.perf_counter()
    generate_dataset(tmp_path / "d", n_cases=20, size=64, seed=0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30.0, elapsed
    img = read_image(tmp_path / "d" / "images" / "case_000.nii.gz")
    assert max(img.shape) == 64
