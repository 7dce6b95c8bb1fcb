"""Masks written by medse open exactly over their input scan: shape, affine, qform/sform codes, voxels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medse.data.preprocess import PreprocessConfig
from medse.inference import Predictor, keep_largest_component, write_label_like
from medse.inference.writer import reference_geometry, sidecar_path
from medse.testing import make_affine
from medse.utils.errors import MedseError

K = 4


class LabelNet(torch.nn.Module):
    """Logits -(x - k)^2: the argmax is round(x) for x in [0, K-1], a known function of the input."""

    def __init__(self, k: int = K):
        super().__init__()
        self.k = k
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ks = torch.arange(self.k, dtype=x.dtype, device=x.device).view(1, -1, *([1] * (x.ndim - 2)))
        return -((x[:, :1] - ks) ** 2) + 0 * self.dummy


def _label_map(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:-2, 3:-3, 1:-1] = rng.integers(0, K, size=(shape[0] - 4, shape[1] - 6, shape[2] - 2))
    return lab


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, nifti2: bool = False, qform_code: int = 1,
                 sform_code: int = 1, dtype: str | None = None) -> Path:
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    arr = data.astype(dtype) if dtype else data
    big = dtype is not None and dtype.startswith(">")
    hdr = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(endianness=">") if big else None
    img = cls(arr, affine, header=hdr)
    if big:
        img.set_data_dtype(np.dtype(dtype))
    img.set_qform(affine if qform_code else None, code=qform_code)
    img.set_sform(affine if sform_code else None, code=sform_code)
    nib.save(img, str(path))
    return path


def _predictor(spatial_dims: int = 3, **kw) -> Predictor:
    roi = [16, 16, 16] if spatial_dims == 3 else None
    return Predictor(LabelNet(), spatial_dims=spatial_dims, in_channels=1, class_values=list(range(K)),
                     label_names={"background": 0, "a": 1, "b": 2, "c": 3},
                     preprocess=PreprocessConfig(normalization="none"), roi_size=roi, overlap=0.5, device="cpu",
                     **kw)


CASES = ["ras", "lps", "flipped", "permuted", "oblique", "anisotropic", "nifti2", "big_endian", "qform0",
         "sform0", "uncompressed", "int16", "nrrd", "singleton4d"]


def _make_input(tmp_path: Path, kind: str, shape=(13, 18, 11)) -> tuple[Path, np.ndarray]:
    lab = _label_map(shape, seed=len(kind))
    aff_kind = kind if kind in ("ras", "lps", "flipped", "permuted", "oblique", "anisotropic") else "oblique"
    aff = make_affine(aff_kind, seed=3)
    data = lab.astype(np.float32)
    if kind == "nrrd":
        from medse.data.io import write_image

        p = write_image(data, aff, tmp_path / "in" / "case.nrrd")
        return p, lab
    (tmp_path / "in").mkdir(exist_ok=True)
    name = "case.nii" if kind == "uncompressed" else "case.nii.gz"
    p = tmp_path / "in" / name
    if kind == "nifti2":
        _write_nifti(p, data, aff, nifti2=True)
    elif kind == "big_endian":
        _write_nifti(p, data, aff, dtype=">f4")
        assert nib.load(str(p)).header.endianness == ">"
    elif kind == "qform0":
        _write_nifti(p, data, aff, qform_code=0, sform_code=2)
    elif kind == "sform0":
        _write_nifti(p, data, aff, qform_code=1, sform_code=0)
    elif kind == "singleton4d":  # (x, y, z, 1): the mask keeps the trailing axis
        _write_nifti(p, data[..., None], aff)
        lab = lab[..., None]
    elif kind == "int16":
        _write_nifti(p, data, aff, dtype="int16")
    else:
        _write_nifti(p, data, aff)
    return p, lab


@pytest.mark.parametrize("kind", CASES)
def test_mask_aligned_with_input_and_known_labels_round_trip(tmp_path: Path, kind: str) -> None:
    src, lab = _make_input(tmp_path, kind)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    pred = _predictor()
    labels = pred.predict_case([src])
    assert labels.shape == lab.shape[:3] and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, lab.reshape(labels.shape))
    out = tmp_path / "out" / src.name
    write_label_like(labels, src, out, label_names=pred.label_names)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # input untouched
    gin, gout = reference_geometry(src), reference_geometry(out)
    assert gout["shape"] == gin["shape"]
    if gin["format"] == "nifti":
        np.testing.assert_allclose(gout["affine"], gin["affine"], atol=1e-5)
        assert (gout["qform_code"], gout["sform_code"]) == (gin["qform_code"], gin["sform_code"])
        back = nib.load(str(out))
        assert type(back) is type(nib.load(str(src)))
        assert back.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(nib.load(str(src)).affine)
        np.testing.assert_array_equal(np.asarray(back.dataobj), lab)
    else:
        np.testing.assert_allclose(gout["origin"], gin["origin"], atol=1e-5)
        np.testing.assert_allclose(gout["spacing"], gin["spacing"], atol=1e-5)
        np.testing.assert_allclose(gout["direction"], gin["direction"], atol=1e-5)
        from medse.data.io import read_image

        np.testing.assert_array_equal(read_image(out).array, lab)
    side = sidecar_path(out)
    assert side.is_file() and '"a": 1' in side.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, side.name])  # no temp files left


def test_cropped_and_resampled_preprocessing_maps_back(tmp_path: Path) -> None:
    src, lab = _make_input(tmp_path, "oblique", shape=(16, 20, 12))
    pred = _predictor()
    pred.preprocess = PreprocessConfig(normalization="none", crop_foreground=True, crop_margin=1)
    np.testing.assert_array_equal(pred.predict_case(src), lab)
    # resampling to half the spacing (an integer up-sampling) is undone exactly for the label map
    sp = np.linalg.norm(make_affine("oblique", seed=3)[:3, :3], axis=0)
    pred.preprocess = PreprocessConfig(normalization="none", target_spacing=tuple(float(s) / 2 for s in sp),
                                       image_order=0)
    np.testing.assert_array_equal(pred.predict_case(src), lab)
    # linear image resampling blurs random per-voxel labels, but the grid is still the input's
    pred.preprocess = PreprocessConfig(normalization="none", target_spacing=tuple(float(s) * 1.5 for s in sp))
    assert pred.predict_case(src).shape == lab.shape


def test_slicewise_2d_network_round_trips(tmp_path: Path) -> None:
    src, lab = _make_input(tmp_path, "lps")
    for axis in (0, 2):
        pred = _predictor(spatial_dims=2, slice_axis=axis)
        np.testing.assert_array_equal(pred.predict_case(src), lab)
    pred = Predictor(LabelNet(), spatial_dims=2, in_channels=1, preprocess=PreprocessConfig(normalization="none"),
                     roi_size=[8, 8], device="cpu", class_values=list(range(K)))
    np.testing.assert_array_equal(pred.predict_case(src), lab)


def test_tta_and_probabilities(tmp_path: Path) -> None:
    from medse.inference.writer import write_probabilities_like

    src, lab = _make_input(tmp_path, "flipped")
    pred = _predictor(tta_flips=True)
    labels, probs = pred.predict_case(src, return_probabilities=True)
    np.testing.assert_array_equal(labels, lab)
    assert probs.shape == (*lab.shape, K) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(np.argmax(probs, -1), lab)
    out = write_probabilities_like(probs, src, tmp_path / "p" / "case.nii.gz")
    back = nib.load(str(out))
    assert back.shape == (*lab.shape, K)
    np.testing.assert_allclose(back.affine, nib.load(str(src)).affine, atol=1e-5)


def test_wrong_channel_count_raises_and_nan_voxels_are_replaced(tmp_path: Path) -> None:
    from medse.data.preprocess import NonFiniteWarning

    src, lab = _make_input(tmp_path, "ras")
    pred = _predictor()
    with pytest.raises(MedseError, match="channels"):
        pred.predict_case([src, src])
    bad = lab.astype(np.float32)
    bad[3, 4, 5], bad[0, 0, 0], bad[1, 2, 3] = np.nan, np.inf, -np.inf
    p = _write_nifti(tmp_path / "nan.nii.gz", bad, np.eye(4))
    with pytest.warns(NonFiniteWarning, match=r"^3 NaN/Inf voxels replaced by the channel's finite minimum .*nan"):
        out = pred.predict_case(p)
    want = lab.copy()
    want[3, 4, 5] = want[0, 0, 0] = want[1, 2, 3] = lab.min()  # the encoded label of the finite minimum
    np.testing.assert_array_equal(out, want)
    assert pred.last_props["nonfinite_voxels"] == 3
    with pytest.raises(MedseError, match=r"nan\.nii\.gz: 3 NaN/Inf voxels"):
        _predictor(strict_nonfinite=True).predict_case(p)


def test_writer_dtypes_and_failed_check_leaves_nothing(tmp_path: Path) -> None:
    ref = _write_nifti(tmp_path / "ref.nii.gz", np.zeros((6, 7, 8), np.float32), make_affine("oblique"))
    m = np.zeros((6, 7, 8), dtype=np.int64)
    m[1, 2, 3] = 300
    out = write_label_like(m, ref, tmp_path / "o" / "big.nii.gz", sidecar=False)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint16 and int(np.asarray(img.dataobj).max()) == 300
    assert img.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    with pytest.raises(MedseError, match="does not match"):
        write_label_like(np.zeros((6, 7, 9), np.uint8), ref, tmp_path / "o" / "bad.nii.gz")
    with pytest.raises(MedseError, match="negative"):
        write_label_like(-m, ref, tmp_path / "o" / "neg.nii.gz")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["big.nii.gz"]


def test_keep_largest_component_per_label() -> None:
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[1:4, 1:4, 1:4] = 1  # 27 voxels
    lab[7, 7, 7] = 1  # stray voxel
    lab[6:9, 1:3, 1:3] = 2  # 12 voxels
    lab[1, 8, 8] = 2
    out = keep_largest_component(lab)
    assert int((out == 1).sum()) == 27 and int((out == 2).sum()) == 12
    assert out[7, 7, 7] == 0 and out[1, 8, 8] == 0
    assert int((lab == 1).sum()) == 28  # input untouched
    pred = _predictor(largest_component=True)
    assert pred.largest_component
