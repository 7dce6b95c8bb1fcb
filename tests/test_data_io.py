from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from medse.data.io import image_affine_from_itk, is_image_file, read_image, split_suffix, write_image
from medse.utils.errors import MedseError


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_roundtrip_every_format_and_affine(random_volume, affine_kind, suffix):
    path, arr, aff = random_volume(f"v{suffix}", kind=affine_kind, label=True, n_labels=5)
    img = read_image(path)
    assert img.array.shape == (20, 22, 24)
    assert img.array.dtype == np.uint8
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(img.spacing, np.linalg.norm(aff[:3, :3], axis=0), rtol=1e-5)
    assert img.num_channels == 1 and img.spatial_shape == (20, 22, 24)


def test_float_data_is_float32_and_nifti_header_kept(random_volume):
    path, arr, aff = random_volume("f.nii.gz", kind="lps", dtype="float64")
    img = read_image(path)
    assert img.array.dtype == np.float32
    np.testing.assert_allclose(img.array, arr.astype(np.float32))
    assert img.header["format"] == "nifti" and img.header["sform_code"] == 1 and img.header["qform_code"] == 1


def test_itk_lps_converted_to_ras(tmp_path):
    import SimpleITK as sitk

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)  # ITK order (z, y, x)
    im = sitk.GetImageFromArray(data)
    im.SetSpacing((0.5, 0.7, 2.0))
    im.SetOrigin((10.0, -20.0, 30.0))
    im.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS identity
    sitk.WriteImage(im, str(tmp_path / "x.nrrd"))
    img = read_image(tmp_path / "x.nrrd")
    assert img.array.shape == (4, 5, 6)
    assert img.array[1, 2, 3] == data[3, 2, 1]
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-0.5, -0.7, 2.0]))
    np.testing.assert_allclose(img.affine[:3, 3], [-10.0, 20.0, 30.0])
    np.testing.assert_allclose(image_affine_from_itk(np.eye(3), (1, 1, 1), (0, 0, 0)), np.diag([-1, -1, 1, 1.0]))


def test_nifti_and_nrrd_copies_read_identically(random_volume):
    path, arr, aff = random_volume("a.nii.gz", kind="oblique")
    write_image(arr, aff, path.with_name("a.nrrd"))
    a, b = read_image(path), read_image(path.with_name("a.nrrd"))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_nifti2_and_vector_images(tmp_path):
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti2Image(arr, aff), str(tmp_path / "n2.nii"))
    img = read_image(tmp_path / "n2.nii")
    assert img.header["nifti_version"] == 2
    np.testing.assert_array_equal(img.array, arr)
    vec = np.random.default_rng(1).normal(size=(5, 6, 7, 1, 3)).astype(np.float32)  # NIfTI vector (x,y,z,t=1,c)
    nib.save(nib.Nifti1Image(vec, aff), str(tmp_path / "v.nii.gz"))
    img = read_image(tmp_path / "v.nii.gz")
    assert img.array.shape == (5, 6, 7, 3) and img.num_channels == 3
    assert len(img.channels()) == 3
    np.testing.assert_array_equal(img.channels()[2], vec[:, :, :, 0, 2])


def test_errors_name_the_file(tmp_path, random_volume):
    with pytest.raises(MedseError, match="missing.nii.gz.*not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(MedseError, match="empty.nii.gz.*empty file"):
        read_image(tmp_path / "empty.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(MedseError, match="junk.nii"):
        read_image(tmp_path / "junk.nii")
    (tmp_path / "junk.mha").write_bytes(b"garbage" * 10)
    with pytest.raises(MedseError, match="junk.mha.*unreadable"):
        read_image(tmp_path / "junk.mha")
    path, _, _ = random_volume("t.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedseError, match=r"t\.nii\.gz.*truncated"):
        read_image(path)
    # a gzip whose payload is a truncated NIfTI (valid gzip stream, data too short)
    full = gzip.decompress(raw)
    path.write_bytes(gzip.compress(full[: len(full) // 2]))
    with pytest.raises(MedseError, match=r"t\.nii\.gz"):
        read_image(path)


def test_4d_where_3d_expected(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "f.nii.gz"))
    assert read_image(tmp_path / "f.nii.gz").array.shape == (4, 4, 4, 2)
    with pytest.raises(MedseError, match=r"f\.nii\.gz: 4D image .* where a 3D volume is expected"):
        read_image(tmp_path / "f.nii.gz", expect_3d=True)


def test_messages_are_one_line(tmp_path):
    (tmp_path / "junk.mha").write_bytes(b"garbage\nmore\n" * 10)
    with pytest.raises(MedseError) as e:
        read_image(tmp_path / "junk.mha")
    assert "\n" not in str(e.value)


def test_suffix_helpers():
    assert split_suffix("a/b/case_0001.nii.gz") == ("case_0001", ".nii.gz")
    assert split_suffix("x.mha") == ("x", ".mha")
    assert is_image_file("a.nii.gz") and is_image_file("b.nrrd") and not is_image_file(".tmp-a.nii.gz")
    assert not is_image_file("notes.txt") and not is_image_file("pair.img")


@pytest.mark.parametrize("version", [1, 2])
def test_gzipped_nifti_is_decompressed_once_and_reads_as_nibabel_does(tmp_path, monkeypatch, version):
    """A .nii.gz is decompressed once (the truncation check's bytes are what is parsed) and reads exactly as
    nibabel's own loader reads it: scaled data, affine, header codes, NIfTI-1 and NIfTI-2."""
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    aff = np.array([[0.0, -1.2, 0.1, 10.0], [1.1, 0.0, 0.0, -5.0], [0.0, 0.2, 2.5, 3.0], [0, 0, 0, 1]])
    arr = np.random.default_rng(2).integers(-300, 900, size=(6, 7, 5)).astype(np.int16)
    img = cls(arr, aff)
    img.header.set_slope_inter(0.5, -10.0)
    path = tmp_path / f"s{version}.nii.gz"
    nib.save(img, str(path))
    streams = []
    real = zlib.decompressobj  # every decompression stream: medse's, gzip.open's, nibabel's GzipFile's

    def counting(*a, **k):
        streams.append(1)
        return real(*a, **k)

    monkeypatch.setattr(zlib, "decompressobj", counting)
    got = read_image(path)
    assert len(streams) == 1  # decompressed once
    ref = nib.load(str(path))
    np.testing.assert_array_equal(got.array, np.asanyarray(ref.dataobj).astype(got.array.dtype))
    np.testing.assert_allclose(got.affine, ref.affine)
    assert got.header["nifti_version"] == version and got.header["sform_code"] == int(ref.header["sform_code"])


# ------------------------------------------------------------------------ gzip without the gzip module's loop
def _nii_bytes(arr: np.ndarray) -> bytes:
    return nib.Nifti1Image(arr, np.eye(4)).to_bytes()


def test_concatenated_gzip_members_and_nul_padding_read_like_gzip(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    raw = _nii_bytes(arr)
    path = tmp_path / "m.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + b"\0\0\0" + gzip.compress(raw[1000:]))  # two members
    assert gzip.open(path).read() == raw
    np.testing.assert_array_equal(read_image(path).array, arr)


@pytest.mark.parametrize("problem", ["trailing garbage", "bad crc", "truncated member", "second member truncated"])
def test_corrupt_gzip_is_a_one_line_error_naming_the_file(tmp_path, problem):
    raw = _nii_bytes(np.ones((3, 3, 3), np.float32))
    good = gzip.compress(raw)
    data = {"trailing garbage": good + b"garbage!",
            "bad crc": good[:-8] + bytes(4) + good[-4:],
            "truncated member": good[:-5],
            "second member truncated": good + gzip.compress(b"more")[:-3]}[problem]
    path = tmp_path / "c.nii.gz"
    path.write_bytes(data)
    with pytest.raises((EOFError, OSError)):  # gzip.BadGzipFile is an OSError: what gzip says of the same bytes
        gzip.open(path).read()
    with pytest.raises(MedseError, match=r"c\.nii\.gz: truncated or corrupt gzip file") as e:
        read_image(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n", [0, 1, 1000, (1 << 16) - 1, 1 << 16, 3 * (1 << 16) + 7])
@pytest.mark.parametrize("threads", [1, 3])
def test_gzip_bytes_is_one_standard_member(n, threads):
    from medse.data.io import gzip_bytes

    data = np.random.default_rng(n).integers(0, 4, n, dtype=np.uint8).tobytes()
    out = gzip_bytes(data, threads=threads, chunk=1 << 16)
    assert gzip.decompress(out) == data
    d = zlib.decompressobj(31)  # a single member: nothing after its end
    assert d.decompress(out) == data and d.eof and d.unused_data == b""
    assert out[:2] == b"\x1f\x8b" and int.from_bytes(out[-4:], "little") == n


def test_nifti_gz_written_by_medse_reads_in_nibabel_and_simpleitk(tmp_path):
    import SimpleITK as sitk

    from medse.data.io import save_nifti
    from medse.testing import make_affine

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (40, 33, 21), dtype=np.uint8)
    img = nib.Nifti1Image(lab, make_affine("oblique", seed=1))
    save_nifti(img, tmp_path / "a.nii.gz")
    nib.save(img, str(tmp_path / "b.nii.gz"))
    assert gzip.open(tmp_path / "a.nii.gz").read() == gzip.open(tmp_path / "b.nii.gz").read()  # nibabel's bytes
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj), lab)
    back = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), lab)
