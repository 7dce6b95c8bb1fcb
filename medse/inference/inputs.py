"""The cases ``medse predict`` reads: an input folder, manifest, file or list of files made into cases.

:func:`collect_cases` is the one input discovery of the inference: nnU-Net channel files are grouped into
cases by :func:`medse.data.datasets.channel_groups` (the rule training's dataset layouts use), dataset roots
and manifests are read by :func:`medse.data.datasets.load_dataset`, DICOM series folders are cases, and every
file that is not an image becomes a case with an ``error`` so that :func:`medse.inference.predict_folder`
lists it among the failures instead of skipping it silently.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medse.data.io import split_suffix
from medse.utils.errors import MedseError

__all__ = ["SUPPORTED_INPUTS", "InputCase", "collect_cases"]

_MANIFEST_SUFFIXES = (".json", ".csv")

@dataclass
class InputCase:
    """One case to predict: an id and its channel files (one per channel, nnU-Net ``_XXXX`` order)."""

    case_id: str
    images: list[Path]
    error: str | None = None


def _is_image(path: Path) -> bool:
    from medse.data.io import is_image_file, is_raster_file

    return path.is_file() and (is_image_file(path) or is_raster_file(path))


#: what an input folder may hold, for the one-line message about a file that is not one of them
SUPPORTED_INPUTS = ("NIfTI (.nii, .nii.gz), NRRD, MHA/MHD, DICOM series folders and, for 2D runs, PNG/JPEG/BMP/TIFF")


def _unsupported_case(f: Path, case_id: str | None = None) -> InputCase:
    suffix = split_suffix(f)[1] or "no suffix"
    return InputCase(case_id or f.name, [f], f"not a supported image file ({suffix}): medse reads {SUPPORTED_INPUTS}")


def _companions(files: Sequence[Path], image_stems: set[str]) -> set[Path]:
    """Files that belong to an image without being one: the data halves of header/data pairs (``.img`` of
    ``.hdr``, ``.raw``/``.zraw`` of ``.mhd``/``.nhdr``), JSON sidecars of an image (BIDS ``case.json``),
    ``dataset.json`` and ``DICOMDIR`` (an index)."""
    headers = {split_suffix(f)[0] for f in files if f.name.lower().endswith((".hdr", ".mhd", ".nhdr"))}
    out = set()
    for f in files:
        stem, suffix = split_suffix(f)
        low = f.name.lower()
        if low in ("dataset.json", "dicomdir") or (suffix.lower() == ".json" and stem in image_stems):
            out.add(f)
        elif stem.split(".")[0] in headers and low.endswith((".img", ".img.gz", ".raw", ".raw.gz", ".zraw")):
            out.add(f)
    return out


def _dicom_file_case(f: Path) -> InputCase:
    """A single DICOM file given as the input: a one-file series (one slice or a multi-frame object), unless it
    is one slice of a larger series in its folder (then the folder must be given)."""
    import SimpleITK as sitk

    cid = split_suffix(f)[0]
    with contextlib.suppress(RuntimeError):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(f.parent)):
            names = [Path(n).resolve() for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(f.parent), uid)]
            if f.resolve() in names and len(names) > 1:
                return InputCase(cid, [f], f"one slice of a DICOM series of {len(names)} files: give its folder "
                                           f"{f.parent} (medse reads the whole series)")
    return InputCase(cid, [f])


def _folder_cases(p: Path) -> list[InputCase]:
    """The cases of an input folder (see :func:`collect_cases`); every file that is not an image is a case with
    an error, so that it is listed among the failures, never skipped silently."""
    from medse.data.datasets import channel_groups
    from medse.data.io import is_dicom_file

    entries = sorted(x for x in p.iterdir() if not x.name.startswith("."))
    files = [f for f in entries if f.is_file()]
    images = [f for f in files if _is_image(f)]
    dicoms = [f for f in files if is_dicom_file(f)]
    series_dirs = [d for d in entries if d.is_dir() and any(is_dicom_file(f) for f in d.iterdir() if f.is_file())]
    if not images and not dicoms and not series_dirs:
        if (p / "dataset.json").is_file() or any((p / d).is_dir() for d in ("images", "imagesTr", "imagesTs")):
            from medse.data.datasets import load_dataset

            spec = load_dataset(p)
            return sorted((InputCase(c.case_id, [Path(x) for x in c.images]) for c in spec.cases),
                          key=lambda c: c.case_id)
        found = f" (found: {', '.join(f.name for f in files[:5])}{', ...' if len(files) > 5 else ''})" if files else ""
        raise MedseError(f"no image files or DICOM series in the input folder{found}; medse reads {SUPPORTED_INPUTS}",
                         p)
    cases: list[InputCase] = []
    if dicoms and not images:  # the folder is itself one series: one case, named after the folder
        cases.append(InputCase(p.name, [p]))
    else:
        cases += [InputCase(f.name, [f], "stray DICOM file among other images: put each DICOM series in a folder "
                                         "of its own") for f in dicoms]
    for d in series_dirs:  # a folder of series folders: one case per folder, named after it
        cases.append(InputCase(d.name, [d]))
        inner = [f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")]
        skip = _companions(inner, set())
        cases += [_unsupported_case(f, f"{d.name}/{f.name}") for f in sorted(inner)
                  if not is_dicom_file(f) and f not in skip]
    for cid, items in channel_groups(images).items():
        files_ = [f for _, f in items]
        chans = [ch for ch, _ in items]
        error = None
        if len(items) > 1 and (-1 in chans or len(set(chans)) != len(chans)):
            error = f"several files for case '{cid}': {', '.join(f.name for f in files_)}"
        cases.append(InputCase(cid, files_, error))
    skip = _companions(files, {split_suffix(f)[0] for f in images})
    cases += [_unsupported_case(f) for f in files if f not in skip and f not in images and f not in dicoms]
    return sorted(cases, key=lambda c: c.case_id)


def collect_cases(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputCase]:
    """The cases named by ``inputs``, sorted by case id.

    ``inputs`` may be a folder of images (``case.nii.gz`` single-channel, or nnU-Net channel files
    ``case_0000.nii.gz``, ``case_0001.nii.gz`` grouped into one case; 2D ``.png``/``.jpg``/``.bmp``/``.tif``
    for 2D runs), a folder holding one DICOM series (one case named after the folder), a folder of DICOM series
    folders (one case per folder, named after it), a dataset root or manifest
    (``medse.data.datasets.load_dataset``: JSON/CSV manifest, nnU-Net, MSD or folder layout), a single image
    file (a ``.dcm`` file: a one-file series, refused when it is one slice of a larger series), a list of image
    files (one single-channel case each), or a list of :class:`InputCase` (case id and its channel files, e.g.
    the test cases of a run's split).

    Files of an input folder that are not images (``.txt``, a stray ``.dcm`` among NIfTI files, ...) become
    cases with an ``error``, so that :func:`predict_folder` lists them among the failures; hidden files, JSON
    sidecars named like an image, ``dataset.json``, ``DICOMDIR`` and the data halves of header/data pairs are
    not listed.

    Raises:
        MedseError: the path does not exist, or no image was found.
    """
    if isinstance(inputs, (list, tuple)) and all(isinstance(c, InputCase) for c in inputs):
        return sorted(inputs, key=lambda c: c.case_id)  # type: ignore[arg-type]
    if isinstance(inputs, (list, tuple)):
        cases = [InputCase(split_suffix(Path(p))[0], [Path(p)]) for p in inputs]
        return sorted(cases, key=lambda c: c.case_id)
    p = Path(inputs)  # type: ignore[arg-type]
    if not p.exists():
        raise MedseError("input folder or manifest not found", p)
    if p.is_file() and p.name.lower().endswith(_MANIFEST_SUFFIXES):
        from medse.data.datasets import load_dataset

        spec = load_dataset(p)
        return sorted((InputCase(c.case_id, [Path(x) for x in c.images]) for c in spec.cases),
                      key=lambda c: c.case_id)
    if p.is_file():
        from medse.data.io import is_dicom_file

        if is_dicom_file(p):
            return [_dicom_file_case(p)]
        return [InputCase(split_suffix(p)[0], [p])]  # named explicitly: whatever SimpleITK reads is tried
    return _folder_cases(p)
