"""DICOM in (issue 22, item 6): series folders read with SimpleITK's series reader, masks written as NIfTI
with the series' geometry, one-line errors for mixed or incomplete series, and no file of an input folder
skipped silently. Test series are written slice by slice with SimpleITK (no downloads)."""

from __future__ import annotations

import locale
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_inference_reliability import failures, make_run, nifti, predict

from medse.cli import main
from medse.data import io
from medse.utils.errors import MedseError

_ANGLE = 0.3
OBLIQUE = (math.cos(_ANGLE), -math.sin(_ANGLE), 0.0, math.sin(_ANGLE), math.cos(_ANGLE), 0.0, 0.0, 0.0, 1.0)


def write_series(folder: Path, shape_zyx: tuple[int, int, int] = (6, 20, 18), *, spacing=(0.7, 0.8, 2.0),
                 origin=(-10.0, 20.0, 30.0), direction=OBLIQUE, uid: str = "1.2.826.0.1.3680043.8.498.1",
                 description: str = "T1 phantom", skip: tuple[int, ...] = (), seed: int = 0) -> sitk.Image:
    """Write a CT-like series one file per slice with the tags a scanner writes (ImagePositionPatient,
    ImageOrientationPatient, SeriesInstanceUID, PixelSpacing, SliceThickness); returns the volume it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(-200, 200, size=shape_zyx).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    d = img.GetDirection()
    tags = {"0020|000e": uid, "0020|000d": "1.2.826.0.1.3680043.8.498.2", "0008|103e": description,
            "0010|0010": "Phantom^Test", "0010|0020": "PH001", "0008|0060": "CT",
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2])}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves LC_CTYPE at "C" (ASCII text I/O after)
    try:
        _write_slices(writer, img, folder, tags, uid, skip)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return img


def _write_slices(writer: sitk.ImageFileWriter, img: sitk.Image, folder: Path, tags: dict[str, str], uid: str,
                  skip: tuple[int, ...]) -> None:
    for k in range(img.GetDepth()):
        if k in skip:
            continue
        sl = img[:, :, k]
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)


def assert_same_geometry(mask_path: Path, series: sitk.Image) -> None:
    mask = sitk.ReadImage(str(mask_path))
    assert mask.GetSize() == series.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-5)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_series_folder_is_one_case_and_its_mask_is_a_nifti_with_the_series_geometry(tmp_path: Path, run: Path,
                                                                                     capsys) -> None:
    series = tmp_path / "CT_head"
    vol = write_series(series)
    # the reader: LPS series -> the RAS affine medse uses for NIfTI, voxels in (x, y, z) order
    img = io.read_image(series)
    assert img.shape == (18, 20, 6) and img.header["format"] == "dicom"
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(OBLIQUE).reshape(3, 3) @ np.diag([0.7, 0.8, 2.0])
    lps[:3, 3] = (-10.0, 20.0, 30.0)
    np.testing.assert_allclose(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-4)
    np.testing.assert_array_equal(img.array, np.transpose(sitk.GetArrayFromImage(vol), (2, 1, 0)))

    out = tmp_path / "masks"
    assert main(predict(run, series, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["CT_head.json", "CT_head.nii.gz"]  # named after the folder
    assert_same_geometry(out / "CT_head.nii.gz", vol)
    import nibabel as nib

    np.testing.assert_allclose(nib.load(str(out / "CT_head.nii.gz")).affine, img.affine, atol=1e-4)
    # rerun: the finished series is skipped
    assert main(predict(run, series, out)) == 0
    assert "0 written, 1 skipped" in capsys.readouterr().out


def test_folder_of_series_folders_and_what_is_not_an_image_is_listed(tmp_path: Path, run: Path, capsys) -> None:
    root = tmp_path / "study"
    vol_a = write_series(root / "series_a", seed=1)
    vol_b = write_series(root / "series_b", (5, 16, 16), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                         uid="1.2.826.0.1.3680043.8.498.7", seed=2)
    for f in (root / "series_b").iterdir():  # scanners often write slices without a suffix: found by "DICM"
        f.rename(f.with_suffix(""))
    (root / "notes.txt").write_text("scanned on Monday")
    (root / "series_b" / "readme.txt").write_text("not a slice")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # an index file: not listed
    out = tmp_path / "masks"
    assert main(predict(run, root, out)) == 1
    err = capsys.readouterr().err
    assert_same_geometry(out / "series_a.nii.gz", vol_a)
    assert_same_geometry(out / "series_b.nii.gz", vol_b)
    assert set(failures(out)) == {"notes.txt", "series_b/readme.txt"}
    assert "failed: notes.txt: " in err and "not a supported image file (.txt)" in err
    assert not list(out.glob("*.dcm"))


def test_stray_dicom_and_pictures_among_volumes_are_failures_not_silently_skipped(tmp_path: Path, run: Path,
                                                                                  capsys) -> None:
    inp = tmp_path / "scans"
    nifti(inp / "vol.nii.gz")
    write_series(tmp_path / "src", (3, 16, 16))
    (inp / "stray.dcm").write_bytes((tmp_path / "src" / "IM0001.dcm").read_bytes())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.uint8)), str(inp / "photo.png"))
    (inp / "list.txt").write_text("x")
    out = tmp_path / "masks"
    assert main(predict(run, inp, out)) == 1
    err = capsys.readouterr().err
    assert (out / "vol.nii.gz").is_file()
    got = failures(out)
    assert set(got) == {"stray.dcm", "photo", "list.txt"}
    assert got["stray.dcm"].endswith("stray DICOM file among other images: put each DICOM series in a folder of "
                                     "its own")
    assert "2D image (.png) but the run's network is 3D" in got["photo"]
    assert all(f"failed: {cid}: " in err for cid in got)


def test_incomplete_and_mixed_series_are_refused_in_one_line(tmp_path: Path, run: Path, capsys) -> None:
    gap = tmp_path / "gap"
    write_series(gap, (6, 16, 16), skip=(3,))
    with pytest.raises(MedseError, match=r"incomplete series: a gap of 4 mm between slices .* \(missing slices\?\)"):
        io.dicom_series_files(gap)
    two = tmp_path / "two"
    write_series(two / "x", (3, 16, 16))
    write_series(two / "y", (3, 16, 16), uid="1.2.826.0.1.3680043.8.498.9")
    for f in (two / "y").iterdir():
        f.rename(two / "x" / f"B{f.name}")
    with pytest.raises(MedseError, match=r"mixed DICOM series: the folder holds 2 series .* put each series in its "
                                         r"own folder"):
        io.dicom_series_files(two / "x")
    sizes = tmp_path / "sizes"
    write_series(sizes, (3, 16, 16))
    write_series(tmp_path / "other", (1, 12, 12), origin=(-10.0, 20.0, 40.0))
    (tmp_path / "other" / "IM0000.dcm").rename(sizes / "IM0009.dcm")
    with pytest.raises(MedseError, match=r"mixed series: slices of different sizes"):
        io.dicom_series_files(sizes)
    # through predict: one failure line naming the folder, the batch goes on
    out = tmp_path / "masks"
    assert main(predict(run, gap, out)) == 1
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("failed:")]
    assert len(line) == 1 and line[0].startswith(f"failed: gap: {gap}: DICOM series ") and "gap of 4 mm" in line[0]


def test_single_dcm_file_gets_a_nifti_mask_and_one_slice_of_a_series_is_refused(tmp_path: Path, run: Path,
                                                                                capsys) -> None:
    one = tmp_path / "one"
    write_series(one, (1, 16, 16))
    out = tmp_path / "masks"
    assert main(predict(run, one / "IM0000.dcm", out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["IM0000.json", "IM0000.nii.gz"]  # never a .dcm
    assert_same_geometry(out / "IM0000.nii.gz", sitk.ReadImage(str(one / "IM0000.dcm")))  # ITK's one-slice grid
    many = tmp_path / "many"
    write_series(many, (4, 16, 16))
    assert main(predict(run, many / "IM0002.dcm", tmp_path / "masks2")) == 1
    err = capsys.readouterr().err
    assert (f"failed: IM0002: {many / 'IM0002.dcm'}: one slice of a DICOM series of 4 files: give its folder "
            f"{many} (medse reads the whole series)") in err
