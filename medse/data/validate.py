"""Dataset validation, run before any training starts (and alone by ``medse validate``).

``validate_dataset(spec, check_labels=True, labels=None) -> ValidationReport`` reads every file once and
reports each problem as one line naming the file:

errors
    unreadable / truncated / empty file; 4D image where 3D is expected (or a channel count that
    differs from the dataset's); NaN/Inf voxels with ``nonfinite="error"`` (or an image without any finite
    voxel); channel images whose shape or affine differ;
    image/label shape or affine mismatch; non-integer, negative or out-of-set label values;
    duplicate case IDs; missing labels (``check_labels``); problems found while listing the layout
    (label file without image, missing channels).
warnings
    NaN/Inf image voxels (``nonfinite="replace"``, the default: preprocessing replaces them by the
    channel's finite minimum); empty label maps (background only); label maps stored as floating point; NIfTI images without
    qform/sform (orientation unknown).

``ValidationReport.label_values`` are the label values found; when the dataset declares no labels,
:func:`resolve_labels` names them ``label_<v>`` (background 0). ``raise_if_errors()`` raises one
:class:`~medse.utils.errors.MedseError` with the count and the first lines.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from medse.data.datasets import DatasetSpec
from medse.data.io import Image, read_image, wrong_channels_message
from medse.utils.errors import MedseError

__all__ = ["ValidationReport", "validate_dataset", "resolve_labels"]


@dataclass
class ValidationReport:
    """Result of :func:`validate_dataset`: one-line ``errors`` and ``warnings`` naming files."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)
    num_cases: int = 0
    num_channels: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        """``error: ...`` and ``warning: ...`` lines, errors first."""
        return [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]

    def raise_if_errors(self, max_lines: int = 5) -> None:
        """Raise :class:`MedseError` naming the number of errors and the first ``max_lines``. Defaults to 5."""
        if not self.errors:
            return
        n = len(self.errors)
        shown = "; ".join(self.errors[:max_lines])
        more = f"; ... and {n - max_lines} more" if n > max_lines else ""
        raise MedseError(f"dataset validation failed with {n} error{'s' if n != 1 else ''}: {shown}{more}")


def _affine_close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-3))


def _read(path, errors: list[str]) -> Image | None:
    try:
        return read_image(path)
    except MedseError as e:
        errors.append(str(e))
    except Exception as e:  # anything a reader may throw on a corrupt file
        errors.append(f"{path}: unreadable ({type(e).__name__}: {e})")
    return None


def validate_dataset(
    spec: DatasetSpec,
    check_labels: bool = True,
    labels: dict[str, int] | None = None,
    nonfinite: str = "replace",
) -> ValidationReport:
    """Check every case of ``spec``; see the module docstring for the list of checks.

    Args:
        spec: the dataset.
        check_labels: require a label for every case and check label files. Defaults to True.
        labels: the label set to check against (e.g. pinned in the config); defaults to
            ``spec.labels``; when both are empty, values are only collected.
        nonfinite: ``"replace"`` (NaN/Inf image voxels are a warning, as preprocessing replaces them) or
            ``"error"`` (they are an error, as with ``data.preprocess.nonfinite: error``). Defaults to "replace".
    """
    if nonfinite not in ("replace", "error"):
        raise ValueError(f"nonfinite '{nonfinite}' must be 'replace' or 'error'")
    rep = ValidationReport(num_cases=len(spec.cases))
    declared = dict(labels) if labels else dict(spec.labels)
    allowed = set(declared.values()) | {0} if declared else None
    rep.errors.extend(spec.issues)
    for cid, n in Counter(spec.case_ids).items():
        if n > 1:
            rep.errors.append(f"{spec.source}: duplicate case ID '{cid}' ({n} cases)")
    n_channels_declared = len(spec.channel_names) or None
    found: set[int] = set()
    for case in spec.cases:
        ref: Image | None = None
        n_ch = 0
        for p in case.images:
            img = _read(p, rep.errors)
            if img is None:
                continue
            if img.array.ndim == 4 and (len(case.images) > 1 or (n_channels_declared or 1) == 1):
                rep.errors.append(f"{p}: {wrong_channels_message(img)}")
                continue
            n_ch += img.num_channels
            if img.header.get("format") == "nifti" and not img.header.get("qform_code") \
                    and not img.header.get("sform_code"):
                rep.warnings.append(f"{p}: no qform/sform in the header: orientation unknown (nibabel's default "
                                    "LAS affine assumed)")
            if img.array.dtype.kind == "f":
                bad = int(np.count_nonzero(~np.isfinite(img.array)))
                if bad and nonfinite == "error":
                    rep.errors.append(f"{p}: {bad} NaN/Inf voxels")
                elif bad:
                    if any(not np.isfinite(c).any() for c in img.channels()):
                        rep.errors.append(f"{p}: {bad} NaN/Inf voxels and a channel without any finite voxel")
                    else:
                        rep.warnings.append(f"{p}: {bad} NaN/Inf voxels (replaced by the channel's finite minimum "
                                            "when preprocessed)")
            if ref is None:
                ref = img
            else:
                if img.spatial_shape != ref.spatial_shape:
                    rep.errors.append(f"{p}: shape {img.spatial_shape} differs from the case's first channel "
                                      f"{ref.path.name} {ref.spatial_shape}")
                elif not _affine_close(img.affine, ref.affine):
                    rep.errors.append(f"{p}: affine differs from the case's first channel {ref.path.name}")
        if ref is not None and n_channels_declared is not None and n_ch and n_ch != n_channels_declared:
            rep.errors.append(f"{case.images[0]}: case '{case.case_id}' has {n_ch} channels, the dataset declares "
                              f"{n_channels_declared} ({', '.join(spec.channel_names)})")
        rep.num_channels = max(rep.num_channels, n_ch)
        if not check_labels:
            continue
        if case.label is None:
            rep.errors.append(f"{case.images[0]}: missing label for case '{case.case_id}'")
            continue
        lab = _read(case.label, rep.errors)
        if lab is None:
            continue
        if lab.array.ndim != 3:
            rep.errors.append(f"{case.label}: 4D label map (shape {lab.shape}) where a 3D volume is expected")
            continue
        if ref is not None:
            if lab.spatial_shape != ref.spatial_shape:
                rep.errors.append(f"{case.label}: label shape {lab.spatial_shape} differs from image shape "
                                  f"{ref.spatial_shape} ({ref.path.name})")
                continue
            if not _affine_close(lab.affine, ref.affine):
                diff = float(np.abs(lab.affine - ref.affine).max())
                rep.errors.append(f"{case.label}: label affine differs from the image affine ({ref.path.name}; "
                                  f"max difference {diff:.3g})")
        arr = lab.array
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                rep.errors.append(f"{case.label}: NaN/Inf values in the label map")
                continue
            if not np.array_equal(arr, np.round(arr)):
                rep.errors.append(f"{case.label}: non-integer values in the label map")
                continue
            rep.warnings.append(f"{case.label}: label map stored as {arr.dtype} (integers expected; uint8 preferred)")
        values = {int(v) for v in np.unique(arr)}
        if any(v < 0 or v > 255 for v in values):
            rep.errors.append(f"{case.label}: label values must lie in 0..255, found {min(values)}..{max(values)}")
            continue
        found |= values
        if allowed is not None:
            extra = sorted(values - allowed)
            if extra:
                rep.errors.append(f"{case.label}: label values {extra} are not in the declared label set "
                                  f"{sorted(allowed)}")
        if values <= {0}:
            rep.warnings.append(f"{case.label}: empty label map (background only)")
    rep.label_values = sorted(found)
    return rep


def resolve_labels(
    spec: DatasetSpec,
    report: ValidationReport | None = None,
    pin: dict[str, int] | None = None,
) -> dict[str, int]:
    """The label set to train with: ``pin`` (config) > ``spec.labels`` (dataset.json) > values found.

    Found values get names ``label_<value>``, background 0 is always ``"background"`` unless named.
    """
    if pin:
        out = dict(pin)
    elif spec.labels:
        out = dict(spec.labels)
    elif report is not None and report.label_values:
        out = {("background" if v == 0 else f"label_{v}"): int(v) for v in report.label_values}
    else:
        raise MedseError("the dataset declares no labels and none were found (run validation with labels)",
                         spec.source)
    if 0 not in out.values():
        out = {"background": 0, **out}
    return dict(sorted(out.items(), key=lambda kv: kv[1]))
