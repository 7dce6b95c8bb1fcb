from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medse.data.io import read_image, write_image
from medse.data.preprocess import PreprocessConfig, invert_to_original, preprocess_case
from medse.data.synth import LABELS
from medse.testing import make_affine
from medse.utils.config import from_dict
from medse.utils.errors import MedseError


def _half_spacing(path) -> tuple[float, float, float]:
    """Target spacing = half the original spacing along each RAS axis (an exact 2x up-sampling)."""
    img = read_image(path)
    sp = np.linalg.norm(img.affine[:3, :3], axis=0)
    axis_of = np.abs(img.affine[:3, :3]).argmax(axis=0)  # world axis of each voxel axis
    ras = np.empty(3)
    ras[axis_of] = sp
    return tuple(float(s) / 2 for s in ras)


@pytest.mark.parametrize("crop", [False, True])
def test_label_roundtrip_exact(random_volume, affine_kind, crop):
    path, arr, _ = random_volume("lab.nii.gz", kind=affine_kind, label=True, n_labels=5)
    for target in (None, _half_spacing(path)):
        cfg = PreprocessConfig(crop_foreground=crop, target_spacing=target)
        _, lab, props = preprocess_case([path], path, cfg)
        assert lab.dtype == np.uint8
        assert props["resampled"] == (target is not None)
        if target is not None:
            assert lab.shape == tuple(2 * s for s in props["cropped_shape"])
            np.testing.assert_allclose(props["spacing_after"], target, rtol=1e-5)
        if crop:
            assert props["cropped_shape"] != props["reoriented_shape"]
        props = json.loads(json.dumps(props))  # JSON-serialisable and still usable
        back = invert_to_original(lab, props, is_label=True)
        assert back.dtype == np.uint8 and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)


def test_orientation_and_affine_after(random_volume, affine_kind):
    path, arr, aff = random_volume("img.nii.gz", kind=affine_kind)
    img, _, props = preprocess_case(path, None, PreprocessConfig(normalization="none"))
    from nibabel.orientations import aff2axcodes

    after = np.asarray(props["affine_after"])
    assert "".join(aff2axcodes(after)) == "RAS"
    assert props["original_shape"] == list(arr.shape)
    np.testing.assert_allclose(np.asarray(props["original_affine"]), aff, atol=1e-5)
    # the same world point is reached from the same voxel value before and after
    idx = np.array([3, 4, 5])
    world = aff @ np.r_[idx, 1.0]
    new_idx = np.round(np.linalg.solve(after, world)[:3]).astype(int)
    assert img[0][tuple(new_idx)] == pytest.approx(float(arr[tuple(idx)]))
    # 'none' keeps the stored voxel order
    img2, _, p2 = preprocess_case(path, None, PreprocessConfig(orientation="none", normalization="none"))
    np.testing.assert_array_equal(img2[0], arr)
    assert p2["ornt_transform"] == [[0, 1], [1, 1], [2, 1]]


def test_probabilities_inverse(random_volume):
    path, arr, _ = random_volume("lab.nii.gz", kind="oblique", label=True, n_labels=3)
    cfg = PreprocessConfig(crop_foreground=True, target_spacing=_half_spacing(path))
    _, lab, props = preprocess_case([path], path, cfg)
    onehot = np.stack([(lab == k).astype(np.float32) for k in range(3)])
    probs = invert_to_original(torch.from_numpy(onehot), props, is_label=False)
    assert probs.shape == (3, *arr.shape) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs.argmax(0), arr)
    # outside the crop channel 0 (background) wins
    outside = arr == 0
    assert np.all(probs[0][outside] >= probs[1:][:, outside].max(0))
    with pytest.raises(ValueError, match="does not match the preprocessed shape"):
        invert_to_original(onehot[:, :-1], props, is_label=False)


def test_label_value_remapping_roundtrip(tmp_path):
    aff = make_affine("lps")
    rng = np.random.default_rng(0)
    arr = rng.choice(np.array([0, 2, 4], np.uint8), size=(8, 9, 10))
    write_image(arr, aff, tmp_path / "l.nii.gz")
    _, lab, props = preprocess_case(tmp_path / "l.nii.gz", tmp_path / "l.nii.gz", PreprocessConfig(),
                                    label_values=[0, 2, 4])
    assert set(np.unique(lab)) == {0, 1, 2}
    np.testing.assert_array_equal(invert_to_original(lab, props, True), arr)
    with pytest.raises(MedseError, match=r"l\.nii\.gz: label values \[4\] are not in the declared set"):
        preprocess_case(tmp_path / "l.nii.gz", tmp_path / "l.nii.gz", PreprocessConfig(), label_values=[0, 2])


def test_normalisations(random_volume):
    path, arr, _ = random_volume("img.nii.gz", kind="ras")  # zero outside a central box
    img, _, props = preprocess_case(path, None, PreprocessConfig())
    fg = img[0][arr != 0]
    assert abs(float(fg.mean())) < 1e-4 and float(fg.std()) == pytest.approx(1.0, abs=1e-4)
    assert props["normalization"]["kind"] == "zscore"
    assert props["normalization"]["mean"][0] == pytest.approx(float(arr[arr != 0].mean()), rel=1e-5)
    ct, _, _ = preprocess_case(path, None, PreprocessConfig(normalization="ct", ct_window=(50.0, 150.0)))
    assert ct.min() == 0.0 and ct.max() == 1.0
    np.testing.assert_allclose(ct[0], (np.clip(arr, 50, 150) - 50) / 100, atol=1e-6)
    raw, _, _ = preprocess_case(path, None, PreprocessConfig(normalization="none"))
    np.testing.assert_array_equal(raw[0], arr)


def test_crop_to_foreground(random_volume):
    path, arr, _ = random_volume("img.nii.gz", shape=(20, 22, 24), kind="ras")
    img, _, props = preprocess_case(path, None, PreprocessConfig(crop_foreground=True, normalization="none"))
    nz = np.argwhere(arr != 0)
    assert props["crop_bbox"] == [[int(lo), int(hi) + 1] for lo, hi in zip(nz.min(0), nz.max(0), strict=True)]
    assert img.shape[1:] == tuple(int(h - lo) for lo, h in props["crop_bbox"])
    assert np.all(img[0] != 0)
    _, _, p2 = preprocess_case(path, None, PreprocessConfig(crop_foreground=True, crop_margin=2))
    assert p2["crop_bbox"][0] == [props["crop_bbox"][0][0] - 2, props["crop_bbox"][0][1] + 2]


def test_multichannel_and_errors(tmp_path):
    aff = make_affine("oblique")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 7, 8)).astype(np.float32)
    write_image(a, aff, tmp_path / "c0.nii.gz")
    write_image(a * 2, aff, tmp_path / "c1.nii.gz")
    img, _, props = preprocess_case([tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz"], None,
                                    PreprocessConfig(normalization="none"), expected_channels=2)
    assert img.shape[0] == 2 and props["num_channels"] == 2
    np.testing.assert_allclose(img[1], 2 * img[0])
    write_image(np.stack([a, a], -1), aff, tmp_path / "v.nii.gz")
    img4, _, _ = preprocess_case(tmp_path / "v.nii.gz", None, expected_channels=2)
    assert img4.shape[0] == 2
    with pytest.raises(MedseError, match=r"v\.nii\.gz: 4D image .* where a 3D volume is expected"):
        preprocess_case(tmp_path / "v.nii.gz", None, expected_channels=1)
    with pytest.raises(MedseError, match=r"c0\.nii\.gz: 1 channels where 2 are expected"):
        preprocess_case(tmp_path / "c0.nii.gz", None, expected_channels=2)
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    write_image(bad, aff, tmp_path / "nan.nii.gz")
    with pytest.raises(MedseError, match=r"nan\.nii\.gz: 1 NaN/Inf voxels"):
        preprocess_case(tmp_path / "nan.nii.gz", None, PreprocessConfig(nonfinite="error"))
    write_image(a[:5], aff, tmp_path / "small.nii.gz")
    with pytest.raises(MedseError, match=r"small\.nii\.gz: channel shape"):
        preprocess_case([tmp_path / "c0.nii.gz", tmp_path / "small.nii.gz"], None)
    write_image(np.zeros((6, 7, 8), np.uint8), make_affine("ras"), tmp_path / "lab.nii.gz")
    with pytest.raises(MedseError, match=r"lab\.nii\.gz: label affine differs"):
        preprocess_case(tmp_path / "c0.nii.gz", tmp_path / "lab.nii.gz")


def test_config_validation():
    cfg = from_dict(PreprocessConfig, {"orientation": "lps", "target_spacing": [1, 1, 2.5]})
    assert cfg.orientation == "LPS" and cfg.target_spacing == (1.0, 1.0, 2.5)
    for bad, match in [({"orientation": "RAR"}, "orientation"), ({"target_spacing": [1, 0, 1]}, "target_spacing"),
                       ({"ct_window": [5, 1]}, "ct_window"), ({"normalization": "minmax"}, "normalization"),
                       ({"image_order": 7}, "image_order")]:
        with pytest.raises(MedseError, match=match):
            from_dict(PreprocessConfig, bad)


def test_synth_left_right_in_ras(synth_dataset):
    """After RAS reorientation, deep_left lies at lower x than deep_right in every phantom."""
    for i in range(6):
        cid = f"case_{i:03d}"
        img, lab, props = preprocess_case(synth_dataset / "images" / f"{cid}.nii.gz",
                                          synth_dataset / "labels" / f"{cid}.nii.gz", PreprocessConfig())
        xl = np.argwhere(lab == LABELS["deep_left"])[:, 0].mean()
        xr = np.argwhere(lab == LABELS["deep_right"])[:, 0].mean()
        assert xl < xr, (cid, props["original_axcodes"])


def test_nan_and_inf_replaced_by_the_channel_finite_minimum(tmp_path):
    aff = make_affine("oblique")
    rng = np.random.default_rng(3)
    a = rng.normal(loc=100.0, size=(6, 7, 8)).astype(np.float32)
    b = rng.normal(loc=-5.0, size=(6, 7, 8)).astype(np.float32)
    bad_a = a.copy()
    bad_a[0, 0, 0], bad_a[1, 2, 3], bad_a[5, 6, 7] = np.nan, np.inf, -np.inf
    write_image(bad_a, aff, tmp_path / "a.nii.gz")
    write_image(b, aff, tmp_path / "b.nii.gz")
    raw, _, props = preprocess_case([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], None,
                                    PreprocessConfig(normalization="none", orientation="none"))
    finite = np.isfinite(bad_a)
    want = np.where(finite, bad_a, bad_a[finite].min())
    assert np.all(np.isfinite(raw))
    np.testing.assert_array_equal(raw[0], want)  # "none": the raw intensities, so the rule is visible exactly
    np.testing.assert_array_equal(raw[1], b)  # the other channel is untouched (its own minimum is not used)
    assert props["nonfinite_voxels"] == 3
    assert props["nonfinite_replaced"] == [{"channel": 0, "file": str(tmp_path / "a.nii.gz"), "count": 3,
                                            "value": float(bad_a[finite].min())}]
    json.dumps(props)
    # the replacement happens before normalisation: z-score of the replaced image
    z, _, zp = preprocess_case(tmp_path / "a.nii.gz", None, PreprocessConfig(normalization="zscore",
                                                                            foreground="all", orientation="none"))
    np.testing.assert_allclose(z[0], (want - want.mean()) / want.std(), rtol=1e-4, atol=1e-4)
    assert zp["nonfinite_voxels"] == 3
    _, _, clean = preprocess_case(tmp_path / "b.nii.gz", None)
    assert clean["nonfinite_voxels"] == 0 and clean["nonfinite_replaced"] == []
    with pytest.raises(MedseError, match=r"a\.nii\.gz: 3 NaN/Inf voxels"):
        preprocess_case(tmp_path / "a.nii.gz", None, PreprocessConfig(nonfinite="error"))
    write_image(np.full((6, 7, 8), np.nan, np.float32), aff, tmp_path / "allnan.nii.gz")
    with pytest.raises(MedseError, match=r"allnan\.nii\.gz: all 336 voxels are NaN/Inf"):
        preprocess_case(tmp_path / "allnan.nii.gz", None)
    with pytest.raises(MedseError, match="nonfinite"):
        from_dict(PreprocessConfig, {"nonfinite": "drop"})


def test_nibabel_resampled_file_with_153_nans():
    """nibabel's own test file: a resampled scan whose voxels outside the field of view are NaN."""
    import os

    from nibabel.testing import data_path

    path = os.path.join(data_path, "resampled_anat_moved.nii")
    if not os.path.exists(path):
        pytest.skip("this nibabel has no resampled_anat_moved.nii")
    arr = read_image(path).array
    n_nan = int(np.isnan(arr).sum())
    assert n_nan == 153
    img, _, props = preprocess_case(path, None, PreprocessConfig(normalization="none"))
    assert props["nonfinite_voxels"] == 153 and np.all(np.isfinite(img))
    assert float(img.min()) == float(np.nanmin(arr))
    with pytest.raises(MedseError, match="153 NaN/Inf voxels"):
        preprocess_case(path, None, PreprocessConfig(nonfinite="error"))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
@pytest.mark.parametrize("view", ["fortran", "fortran flipped", "c flipped", "permuted", "c"])
def test_copy_transposed_equals_assignment(dtype, view):
    from medse.data.preprocess import copy_transposed

    base = np.arange(9 * 10 * 11).reshape(9, 10, 11).astype(dtype)
    src = {"fortran": np.asfortranarray(base), "fortran flipped": np.asfortranarray(base)[::-1, :, ::-1],
           "c flipped": base[:, ::-1], "permuted": base.transpose(2, 0, 1), "c": base}[view]
    dst = np.empty(src.shape, dtype=dtype)
    copy_transposed(dst, src, block=4)
    np.testing.assert_array_equal(dst, src)


def test_zscore_statistics_match_float64_numpy():
    from medse.data.preprocess import _mean_std

    vals = (np.random.default_rng(0).normal(300.0, 40.0, 3_000_001)).astype(np.float32)
    m, s = _mean_std(vals, chunk=1 << 16)
    v64 = vals.astype(np.float64)
    assert abs(m - v64.mean()) <= 1e-12 * abs(v64.mean()) and abs(s - v64.std()) <= 1e-10 * v64.std()
    assert all(np.isnan(_mean_std(np.zeros(0, np.float32))))
