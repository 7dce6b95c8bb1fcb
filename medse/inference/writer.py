"""Write label maps (and probability maps) that open exactly over the scan they were predicted from.

The mask takes the geometry of the *input file itself*, not of a recomputed affine:

* NIfTI (``.nii``, ``.nii.gz``, NIfTI-1 and NIfTI-2): the input's nibabel header is copied (same
  image class, shape, pixdim, qform and sform matrices *and* codes, units, orientation), only the data
  type, intensity scaling (none), ``cal_min/cal_max`` and the intent (``NIFTI_INTENT_LABEL``) change.
  The affine is *not* passed to nibabel, so nibabel never rewrites qform/sform from a best-guess affine
  (the failure of MONAI issues 1333/2090, nnU-Net 2477, TorchIO 469/336).
* Other formats SimpleITK reads (``.nrrd``, ``.mha``, ``.mhd``, ...): origin, spacing and direction are
  copied from the input's image information (the pixel data of the input is not read).

Labels are stored as uint8, or uint16 when a label value exceeds 255 (never float). Every file is written
to a temporary name in the output folder (:func:`medse.utils.atomic.atomic_path`), read back and checked
against the input (shape, affine within 1e-5, qform/sform codes, voxel values), flushed to disk (fsync)
and only then renamed into place, so a half-written or misaligned mask never exists under its final name.
The sidecar ``<stem>.json`` (with the mask file's sha256) is written after the check and *before* the
mask is renamed into place, so a mask under its final name always has the sidecar that describes it (a
killed run leaves at most a sidecar without a mask). Inputs are only read.

DICOM inputs (a series folder or a ``.dcm`` file) get a NIfTI mask (``.nii.gz``) written through SimpleITK with
the series' origin, spacing and direction, so that it overlays the series in 3D Slicer; never a DICOM file
(writing pixel data into a new DICOM object would invent a Secondary Capture with new UIDs). A write that
fails because the disk or quota is full raises :class:`medse.utils.atomic.DiskFullError` (``no space left on
device, <mask path>``) and leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medse.utils.atomic import DiskFullError, atomic_path, atomic_write_text, is_disk_full
from medse.utils.errors import MedseError

__all__ = [
    "DiskFullError",
    "NIFTI_SUFFIXES",
    "disk_full_error",
    "file_sha256",
    "label_dtype",
    "mask_file_problem",
    "output_suffix",
    "read_sidecar",
    "sidecar_path",
    "write_label_like",
    "write_probabilities_like",
    "write_sidecar",
    "reference_geometry",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_AFFINE_TOL = 1e-5


def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


#: free bytes below which a failed write is taken for a full disk (ITK's writers do not always say so)
_FULL_BELOW = 64 * 1024


def disk_full_error(e: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """A :class:`~medse.utils.atomic.DiskFullError` naming ``path`` when ``e`` (raised while writing ``path``)
    comes from a full disk, else None. Full: ``ENOSPC``/``EDQUOT``, an ITK message saying so, or any write error
    while fewer than 64 KiB are free in the target folder (ITK's NRRD and NIfTI writers report a full disk as a
    short write, or not at all, and the read-back check fails); call it before the partial file is removed."""
    if isinstance(e, DiskFullError):
        return e
    if is_disk_full(e):
        return DiskFullError(path, e.errno)  # type: ignore[union-attr]
    full = "no space left on device" in str(e).lower()
    if not full:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(Path(path).parent).free < _FULL_BELOW
    return DiskFullError(path) if full else None


def is_dicom_reference(reference_path: str | os.PathLike) -> bool:
    """True for a DICOM series folder or a DICOM file: their masks are written as NIfTI."""
    from medse.data.io import is_dicom_file

    p = Path(reference_path)
    return p.is_dir() or is_dicom_file(p)


def output_suffix(reference_path: str | os.PathLike) -> str:
    """The file ending a mask written like ``reference_path`` gets: the reference's own
    (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ...), ``.nii.gz`` for DICOM (a series folder or ``.dcm``)."""
    if is_dicom_reference(reference_path):
        return ".nii.gz"
    name = Path(reference_path).name
    lower = name.lower()
    for suf in (".nii.gz", ".nii", ".img.gz"):
        if lower.endswith(suf):
            return name[-len(suf):]
    return Path(name).suffix


def label_dtype(max_label: int) -> np.dtype:
    """uint8 for labels up to 255, uint16 up to 65535 (a MedseError beyond)."""
    if max_label < 0:
        raise MedseError(f"negative label value {max_label}")
    if max_label <= 255:
        return np.dtype(np.uint8)
    if max_label <= 65535:
        return np.dtype(np.uint16)
    raise MedseError(f"label value {max_label} does not fit in uint16")


def reference_geometry(reference_path: str | os.PathLike) -> dict[str, Any]:
    """Shape and world geometry of an image file, without reading its voxels.

    Returns a dict with ``format`` (``"nifti"``/``"itk"``), ``shape`` (spatial, in the file's
    (x, y, z) order, trailing singleton axes kept), ``affine`` (4x4 RAS for NIfTI; ``None`` for ITK),
    ``qform_code``/``sform_code`` (NIfTI) or ``origin``/``spacing``/``direction`` (ITK).
    """
    path = Path(reference_path)
    if path.is_dir():  # a DICOM series: the geometry ITK's series reader gives (LPS+)
        from medse.data.io import dicom_series_geometry

        return dicom_series_geometry(path)
    if not path.is_file():
        raise MedseError("reference image not found", path)
    if _is_nifti(path):
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as e:
            raise MedseError(f"unreadable NIfTI header ({type(e).__name__}: {e})", path) from e
        hdr = img.header
        return {
            "format": "nifti",
            "shape": tuple(int(s) for s in img.shape),
            "affine": np.asarray(img.affine, dtype=np.float64),
            "qform_code": int(hdr["qform_code"]),
            "sform_code": int(hdr["sform_code"]),
            "qform": np.asarray(hdr.get_qform(), dtype=np.float64),
            "sform": np.asarray(hdr.get_sform(), dtype=np.float64),
            "image": img,
        }
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as e:
        raise MedseError(f"unreadable image header ({str(e).strip().splitlines()[-1] if str(e).strip() else e})",
                         path) from e
    return {
        "format": "itk",
        "shape": tuple(int(s) for s in reader.GetSize()),
        "affine": None,
        "origin": tuple(float(v) for v in reader.GetOrigin()),
        "spacing": tuple(float(v) for v in reader.GetSpacing()),
        "direction": tuple(float(v) for v in reader.GetDirection()),
        "dimension": int(reader.GetDimension()),
    }


def _fit_to_shape(arr: np.ndarray, shape: tuple[int, ...], extra: int, ref: Path) -> np.ndarray:
    """Add the reference's trailing singleton axes (e.g. a (x, y, z, 1) NIfTI) to a (x, y, z) array."""
    spatial = tuple(arr.shape[: arr.ndim - extra])
    want = tuple(shape)
    if spatial == want:
        return arr
    squeezed = tuple(s for i, s in enumerate(want) if not (i >= 3 and s == 1))
    if spatial == squeezed or (len(want) == 2 and spatial == (*want, 1)):
        return arr.reshape(want + tuple(arr.shape[arr.ndim - extra:]))
    raise MedseError(f"array of shape {spatial} does not match the reference's voxel grid {want}", ref)


def _nifti_header_like(ref_img: Any, dtype: np.dtype, intent: str) -> Any:
    hdr = ref_img.header.copy()
    hdr.set_data_dtype(dtype)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    try:
        hdr.set_intent(intent)
    except Exception:  # unknown intent name in an old nibabel: keep the input's
        pass
    return hdr


def _check_nifti(tmp: Path, geom: dict[str, Any], data: np.ndarray, ref: Path, check_values: bool) -> None:
    import nibabel as nib

    back = nib.load(str(tmp))
    hdr = back.header
    problems = []
    if tuple(back.shape) != tuple(data.shape):
        problems.append(f"shape {tuple(back.shape)} != {tuple(data.shape)}")
    if not np.allclose(back.affine, geom["affine"], atol=_AFFINE_TOL, rtol=0):
        problems.append("affine differs")
    if int(hdr["qform_code"]) != geom["qform_code"] or int(hdr["sform_code"]) != geom["sform_code"]:
        problems.append(
            f"qform/sform codes {int(hdr['qform_code'])}/{int(hdr['sform_code'])} "
            f"!= {geom['qform_code']}/{geom['sform_code']}"
        )
    if geom["qform_code"] and not np.allclose(hdr.get_qform(), geom["qform"], atol=_AFFINE_TOL, rtol=0):
        problems.append("qform differs")
    if geom["sform_code"] and not np.allclose(hdr.get_sform(), geom["sform"], atol=_AFFINE_TOL, rtol=0):
        problems.append("sform differs")
    if hdr.get_data_dtype() != data.dtype:
        problems.append(f"stored dtype {hdr.get_data_dtype()} != {data.dtype}")
    if not problems and check_values and not np.array_equal(np.asarray(back.dataobj), data):
        problems.append("voxel values differ after reading back")
    if problems:
        raise MedseError(f"round-trip header check failed for the mask written like {ref}: {'; '.join(problems)}",
                         tmp)


def _check_itk(tmp: Path, geom: dict[str, Any], data_zyx: np.ndarray, ref: Path, check_values: bool) -> None:
    import SimpleITK as sitk

    back = sitk.ReadImage(str(tmp))
    problems = []
    if tuple(back.GetSize()) != geom["shape"]:
        problems.append(f"size {back.GetSize()} != {geom['shape']}")
    for name, got, want in (("origin", back.GetOrigin(), geom["origin"]), ("spacing", back.GetSpacing(),
                            geom["spacing"]), ("direction", back.GetDirection(), geom["direction"])):
        if not np.allclose(got, want, atol=_AFFINE_TOL, rtol=0):
            problems.append(f"{name} differs")
    if not problems and check_values and not np.array_equal(sitk.GetArrayViewFromImage(back), data_zyx):
        problems.append("voxel values differ after reading back")
    if problems:
        raise MedseError(f"round-trip header check failed for the mask written like {ref}: {'; '.join(problems)}",
                         tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _full_disk_named(out_path: Path) -> Iterator[None]:
    """Inside :func:`atomic_path` (so that the partial file still takes its space when the free space is
    measured): a write error caused by a full disk becomes :class:`DiskFullError` naming ``out_path``."""
    try:
        yield
    except Exception as e:
        full = disk_full_error(e, out_path)
        if full is None:
            raise
        # nibabel leaves the half-written file open in the frames of the traceback: clear them, so that the
        # file is closed and its space is free again once atomic_path has removed it (the next case may fit)
        traceback.clear_frames(e.__traceback__)
        if full is e:
            raise
        raise full from e


def _write(data: np.ndarray, reference_path: Path, out_path: Path, intent: str, extra: int,
           check_values: bool, before_rename: Callable[[Path], None] | None = None) -> Path:
    geom = reference_geometry(reference_path)
    data = _fit_to_shape(data, geom["shape"], extra, reference_path)
    if geom["format"] == "nifti":
        from medse.data.io import save_nifti

        ref_img = geom["image"]
        hdr = _nifti_header_like(ref_img, data.dtype, intent)
        if not data.flags.f_contiguous:  # NIfTI stores Fortran order: transpose once, in cache blocks, so that
            from medse.data.preprocess import fortran_copy  # writing and the read-back compare run straight

            data = fortran_copy(data)
        # affine=None: the copied header's qform/sform (matrices and codes) are written as they are.
        img = type(ref_img)(data, None, header=hdr)
        if not _is_nifti(out_path):
            raise MedseError("a mask written like a NIfTI input must have a .nii or .nii.gz name", out_path)
        with atomic_path(out_path, fsync=True) as tmp, _full_disk_named(out_path):
            save_nifti(img, tmp)
            _check_nifti(tmp, geom, data, reference_path, check_values)
            if before_rename is not None:
                before_rename(tmp)
        return out_path
    import SimpleITK as sitk

    spatial = data.ndim - extra
    order = tuple(range(spatial))[::-1] + tuple(range(spatial, data.ndim))
    data_zyx = np.ascontiguousarray(np.transpose(data, order))
    img = sitk.GetImageFromArray(data_zyx, isVector=extra > 0)
    img.SetOrigin(geom["origin"])
    img.SetSpacing(geom["spacing"])
    img.SetDirection(geom["direction"])
    with atomic_path(out_path, fsync=True) as tmp, _full_disk_named(out_path):
        sitk.WriteImage(img, str(tmp), useCompression=True)
        _check_itk(tmp, geom, data_zyx, reference_path, check_values)
        if before_rename is not None:
            before_rename(tmp)
    return out_path


def write_label_like(
    mask: np.ndarray,
    reference_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    label_names: Mapping[str, int] | None = None,
    sidecar: bool = True,
    extra: Mapping[str, Any] | None = None,
    check_values: bool = True,
) -> Path:
    """Write an integer label map with exactly the geometry of ``reference_path``.

    Args:
        mask: integer label map in the reference file's voxel order (x, y, z) and shape (a reference
            stored as (x, y, z, 1) gets the singleton axis back).
        reference_path: the input scan the mask belongs to (NIfTI-1/2 or any SimpleITK format).
        out_path: where to write; NIfTI references need a ``.nii``/``.nii.gz`` name.
        label_names: ``{name: value}`` written to the sidecar JSON. Defaults to None (values only).
        sidecar: also write ``<out stem>.json`` with label names, ``extra`` and ``mask_sha256`` (the
            written file's sha256), before the mask is renamed into place. Defaults to True.
        extra: more sidecar entries (source files, run, checkpoint). Defaults to None.
        check_values: also compare the voxel values read back. Defaults to True.

    Returns:
        ``out_path``.

    Raises:
        MedseError: the mask does not fit the reference grid, holds negative/non-integer values, or
            the written file does not read back with the reference geometry (nothing is left behind).
    """
    mask = np.asarray(mask)
    ref = Path(reference_path)
    out = Path(out_path)
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.round(mask)):
            raise MedseError("label map holds non-integer values", out)
    elif mask.dtype.kind not in "uib":
        raise MedseError(f"label map has unsupported dtype {mask.dtype}", out)
    lo = int(mask.min()) if mask.size else 0
    hi = int(mask.max()) if mask.size else 0
    if lo < 0:
        raise MedseError(f"label map holds a negative value {lo}", out)
    data = mask.astype(label_dtype(hi), copy=False)
    if not sidecar:
        _write(data, ref, out, "label", 0, check_values)
        return out
    written: list[Path] = []

    def sidecar_first(tmp: Path) -> None:
        written.append(write_sidecar(out, label_names=label_names,
                                     extra={**(extra or {}), "mask_sha256": file_sha256(tmp)}))

    try:
        _write(data, ref, out, "label", 0, check_values, before_rename=sidecar_first)
    except BaseException:
        for p in written:  # the rename failed after the sidecar was written: no sidecar without its mask
            p.unlink(missing_ok=True)
        raise
    return out


def write_probabilities_like(
    probs: np.ndarray,
    reference_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    check_values: bool = False,
) -> Path:
    """Write class probabilities ``(x, y, z, K)`` (float32) with the geometry of ``reference_path``.

    NIfTI: a 4D image with the input's header (dim[4] = K, intent ``vector``); ITK formats: a vector
    image with K components. NOTE: not in paper (medse's output format, as nnU-Net's ``--save_probabilities``).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4:
        raise MedseError(f"probabilities must be (x, y, z, K), got shape {probs.shape}", out_path)
    return _write(probs, Path(reference_path), Path(out_path), "vector", 1, check_values)


def sidecar_path(mask_path: str | os.PathLike) -> Path:
    """``case.nii.gz`` -> ``case.json`` beside it."""
    p = Path(mask_path)
    return p.with_name(p.name[: -len(output_suffix(p))] + ".json") if output_suffix(p) else p.with_suffix(".json")


def read_sidecar(mask_path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """``(payload, None)`` of the sidecar of ``mask_path``, or ``(None, reason)`` when it is missing or unreadable."""
    path = sidecar_path(mask_path)
    if not path.is_file():
        return None, f"no sidecar {path.name}"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable sidecar {path.name} ({type(e).__name__})"
    if not isinstance(payload, dict):
        return None, f"unreadable sidecar {path.name} (not a JSON object)"
    return payload, None


def mask_file_problem(mask_path: str | os.PathLike, reference_path: str | os.PathLike,
                      extra_axes: int = 0, read_data: bool = True) -> str | None:
    """Why ``mask_path`` is not a usable mask for ``reference_path`` (header or data do not load, or its
    shape is not the reference's voxel grid), or None when it is fine."""
    mask_path = Path(mask_path)
    try:
        want = tuple(reference_geometry(reference_path)["shape"])
    except MedseError as e:
        return str(e)
    try:
        if _is_nifti(mask_path):
            import nibabel as nib

            img = nib.load(str(mask_path))
            shape = tuple(int(s) for s in img.shape)
            if read_data:
                np.asarray(img.dataobj)
        else:
            import SimpleITK as sitk

            if read_data:
                shape = tuple(int(s) for s in sitk.ReadImage(str(mask_path)).GetSize())
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(mask_path))
                reader.ReadImageInformation()
                shape = tuple(int(s) for s in reader.GetSize())
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        return f"unreadable ({type(e).__name__}: {first})"
    spatial = shape[: len(shape) - extra_axes] if extra_axes else shape
    if spatial != want:
        return f"shape {spatial} differs from the input's {want}"
    return None


def write_sidecar(mask_path: str | os.PathLike, *, label_names: Mapping[str, int] | None = None,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<mask stem>.json``: ``{"labels": {name: value}, ...extra}`` (atomically)."""
    payload: dict[str, Any] = {"labels": {str(k): int(v) for k, v in (label_names or {}).items()}}
    if extra:
        payload.update({str(k): v for k, v in extra.items()})
    path = sidecar_path(mask_path)
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    return path
