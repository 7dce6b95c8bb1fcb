"""Classification data: folder-per-class or CSV manifest, patient-grouped stratified splits, images, augmentation.

Inputs
  * a folder with one sub-folder per class (the public Kaggle brain-tumour layout: ``glioma/``, ``meningioma/``,
    ``notumor/``, ``pituitary/``) holding PNG/JPG/BMP/TIFF images or NIfTI/NRRD/MHA slices or volumes; each
    image is its own patient group;
  * a CSV manifest with columns ``path, label`` and optionally ``patient_id``; paths are relative to the
    manifest's folder; ``label`` is a class name (or an integer index when ``class_names`` is given).

Splits are stratified by class and grouped by patient, so one patient never sits on both sides of a split:
scikit-learn's ``StratifiedGroupKFold`` when every class has enough patient groups for it; otherwise (small sets)
a per-class shuffle of the patient groups (seeded, deterministic) that holds out ``round(fraction x groups)`` of
each class, at least one and never all, so every class with two or more groups is on both sides. A class that
cannot be in every split (a single patient group left) is warned about when the split is made, naming the class
and the split (NOTE: the per-class allocation is medse's, not sklearn's).

Images are read as float32 ``(C, *spatial)``: raster images as grey (1 channel) or RGB (3 channels; grey
replicated), NIfTI 2D slices transposed to (Y, X) so that the width is X (left-right, as in exported PNGs), NIfTI
volumes whole in voxel order (X, Y, Z) (``spatial_dims=3``) or their middle slice along the last axis
(``spatial_dims=2``, NOTE: not in paper); resized to ``image_size`` and normalised per image.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medse.data.config import AugmentConfig
from medse.utils.errors import MedseError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassificationData",
    "ClassificationDataset",
    "Sample",
    "default_augment",
    "class_weights",
    "load_classification_data",
    "load_image",
    "make_splits",
    "read_manifest",
    "scan_folder",
]

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + VOLUME_EXTENSIONS


def _ext(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass
class Sample:
    """One image: ``image_id`` is its path relative to the data root (unique), ``label`` the class index."""

    image_id: str
    path: Path
    label: int
    patient_id: str


@dataclass
class ClassificationData:
    samples: list[Sample]
    class_names: list[str]
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.patient_id for s in self.samples])

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {name: int(c.get(i, 0)) for i, name in enumerate(self.class_names)}

    def subset(self, image_ids: list[str]) -> ClassificationData:
        by_id = {s.image_id: s for s in self.samples}
        missing = [i for i in image_ids if i not in by_id]
        if missing:
            raise MedseError(
                f"{len(missing)} image(s) of the split are not in the data (first: {missing[0]}); "
                "the data folder changed since training",
                self.source,
            )
        return ClassificationData([by_id[i] for i in image_ids], list(self.class_names), self.source)


def _resolve_class_names(found: list[str], class_names: list[str] | None, source: str) -> list[str]:
    if not class_names:
        return sorted(found)
    unknown = [c for c in found if c not in class_names]
    if unknown:
        raise MedseError(f"class '{unknown[0]}' is not one of the configured classes {list(class_names)}", source)
    return list(class_names)


def scan_folder(root: str | Path, class_names: list[str] | None = None) -> ClassificationData:
    """Read a folder with one sub-folder per class; classes sorted by name unless ``class_names`` is given."""
    root = Path(root)
    if not root.is_dir():
        raise MedseError("data folder not found", root)
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and _ext(p) in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if files:
            found[sub.name] = files
    if not found:
        raise MedseError(f"no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)}) found", root)
    names = _resolve_class_names(list(found), class_names, str(root))
    samples = []
    for ci, name in enumerate(names):
        for p in found.get(name, []):
            rel = p.relative_to(root).as_posix()
            samples.append(Sample(rel, p, ci, rel))
    warnings = [f"{root}: class '{n}' has no images" for n in names if n not in found]
    return ClassificationData(samples, names, str(root), warnings)


def read_manifest(path: str | Path, class_names: list[str] | None = None) -> ClassificationData:
    """Read a CSV manifest with columns ``path, label[, patient_id]`` (paths relative to the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise MedseError("manifest not found", path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        for need in ("path", "label"):
            if need not in fields:
                raise MedseError(f"manifest has no '{need}' column (columns: {', '.join(fields) or 'none'})", path)
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise MedseError("manifest has no rows", path)
    labels_raw = [r["label"] for r in rows]
    if class_names and all(v.lstrip("-").isdigit() for v in labels_raw):
        bad = [v for v in labels_raw if not 0 <= int(v) < len(class_names)]
        if bad:
            raise MedseError(f"label index {bad[0]} out of range for {len(class_names)} classes", path)
        labels_raw = [class_names[int(v)] for v in labels_raw]
    names = _resolve_class_names(sorted(set(labels_raw)), class_names, str(path))
    index = {n: i for i, n in enumerate(names)}
    samples, seen = [], set()
    for line, (r, lab) in enumerate(zip(rows, labels_raw, strict=True), start=2):
        if not r["path"]:
            raise MedseError(f"line {line}: empty path", path)
        p = Path(r["path"])
        full = p if p.is_absolute() else (path.parent / p)
        image_id = r["path"]
        if image_id in seen:
            raise MedseError(f"line {line}: duplicate path '{image_id}'", path)
        seen.add(image_id)
        pid = r.get("patient_id") or image_id
        samples.append(Sample(image_id, full, index[lab], pid))
    counts = Counter(s.label for s in samples)
    warnings = [f"{path}: class '{n}' has no images" for i, n in enumerate(names) if counts.get(i, 0) == 0]
    return ClassificationData(samples, names, str(path), warnings)


def load_classification_data(source: str | Path, class_names: list[str] | None = None) -> ClassificationData:
    """A folder (one sub-folder per class) or a ``.csv`` manifest."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return read_manifest(source, class_names)
    if source.is_file():
        raise MedseError("data source must be a folder with one sub-folder per class or a .csv manifest", source)
    return scan_folder(source, class_names)


# ----------------------------------------------------------------------------------------------- splits
def _split_once(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with about ``fraction`` held out, stratified by label and grouped."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n = len(labels)
    idx = np.arange(n)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise MedseError(f"cannot split {n} image(s) from a single patient group into two sets")
    n_splits = max(2, min(int(round(1.0 / fraction)), n_groups))
    group_labels: dict[Any, set] = {}
    for g, y in zip(groups, labels, strict=True):
        group_labels.setdefault(g, set()).add(int(y))
    per_class_groups = Counter(y for ys in group_labels.values() for y in ys)
    if min(per_class_groups.values()) >= n_splits:
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % (2**32))
        keep, held = next(sgkf.split(idx, labels, groups))
        if len(np.unique(labels[held])) == len(per_class_groups):
            return np.sort(keep), np.sort(held)
    # too few patients in some class for k folds: shuffle each class's patient groups and hold out a share of them
    rng = np.random.default_rng(seed % (2**32))
    group_label = {g: Counter(labels[groups == g].tolist()).most_common(1)[0][0] for g in group_labels}
    held_groups: list[Any] = []
    for y in sorted(set(group_label.values())):
        gs = sorted((g for g, gy in group_label.items() if gy == y), key=str)
        order = rng.permutation(len(gs))
        k = min(max(1, int(round(fraction * len(gs)))), len(gs) - 1) if len(gs) > 1 else 0
        held_groups += [gs[i] for i in order[:k]]
    if not held_groups:  # every class a single group: hold out whole groups, unstratified
        gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed % (2**32))
        keep, held = next(gss.split(idx, labels, groups))
        return np.sort(keep), np.sort(held)
    mask = np.isin(groups, np.array(held_groups, dtype=groups.dtype))
    return idx[~mask], idx[mask]


def make_splits(
    data: ClassificationData, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[str]]:
    """Split image ids into train / val / test, stratified by class and grouped by patient.

    Args:
        data: the images. val_fraction: Defaults to 0.15. test_fraction: 0 gives an empty test set (e.g. when
            a separate test folder is used). Defaults to 0.15. seed: Defaults to 0.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` lists of image ids; no patient appears in two lists.
    """
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise MedseError(f"config key 'data.{name}': must be in [0, 1), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise MedseError("config keys 'data.val_fraction' + 'data.test_fraction' must be < 1")
    ids = np.array([s.image_id for s in data.samples])
    labels, groups = data.labels, data.groups
    rest = np.arange(len(ids))
    test = np.array([], dtype=np.int64)
    if test_fraction > 0:
        keep, held = _split_once(labels, groups, test_fraction, seed)
        rest, test = keep, held
    val = np.array([], dtype=np.int64)
    if val_fraction > 0:
        frac = val_fraction / (1.0 - test_fraction)
        keep, held = _split_once(labels[rest], groups[rest], frac, seed + 1)
        rest, val = rest[keep], rest[held]
    out = {"train": ids[rest].tolist(), "val": ids[val].tolist(), "test": ids[test].tolist()}
    sets = {k: set(groups[np.isin(ids, v)]) for k, v in out.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    _warn_missing_classes(data, {"train": rest, "val": val, "test": test})
    return out


def _warn_missing_classes(data: ClassificationData, splits: dict[str, np.ndarray]) -> None:
    """Warn, when the split is made, for each class that is not in every non-empty split (too few patient groups):
    otherwise it shows only as an empty row of the evaluation table."""
    import warnings

    labels, groups = data.labels, data.groups
    used = {k: v for k, v in splits.items() if len(v)}
    for c, name in enumerate(data.class_names):
        n_groups = len(np.unique(groups[labels == c]))
        lacking = [k for k, v in used.items() if not np.any(labels[v] == c)]
        if n_groups and lacking:
            warnings.warn(f"class '{name}' has no image in the {' and '.join(lacking)} split(s): its "
                          f"{n_groups} patient group(s) cannot cover the {len(used)} splits; add data or lower "
                          f"data.val_fraction / data.test_fraction", UserWarning, stacklevel=3)


def class_weights(labels: np.ndarray, num_classes: int, mode: str = "balanced") -> np.ndarray:
    """Cross-entropy class weights. ``"balanced"``: ``n / (K * n_k)`` (scikit-learn's rule; absent classes get 0);
    ``"none"``: ones. Defaults to "balanced"."""
    if mode == "none":
        return np.ones(num_classes, dtype=np.float32)
    if mode != "balanced":
        raise MedseError(f"config key 'train.class_weighting': '{mode}' is not one of ['balanced', 'none']")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


# ----------------------------------------------------------------------------------------------- images
def _read_raw(path: Path, in_channels: int, spatial_dims: int) -> np.ndarray:
    ext = _ext(path)
    if ext in RASTER_EXTENSIONS:
        if spatial_dims != 2:
            raise MedseError("raster images are 2D; set model.spatial_dims to 2", path)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            if in_channels == 3:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)[None]
    else:
        from medse.data.io import read_image  # the one NIfTI/ITK reader: voxel order (x, y, z[, c])

        arr = np.squeeze(read_image(path).array.astype(np.float32, copy=False))
        if arr.ndim == 3 and spatial_dims == 2:
            arr = arr[:, :, arr.shape[2] // 2]  # middle slice along the last axis (NOTE: not in paper)
        if arr.ndim == 2:
            if spatial_dims == 3:
                raise MedseError("2D image given to a 3D model (model.spatial_dims is 3)", path)
            arr = arr.T[None]  # slices as (rows = Y, columns = X), so the image width is left-right as in PNGs
        elif arr.ndim == 3:
            arr = arr[None]
        elif arr.ndim == 4 and spatial_dims == 3:  # (X, Y, Z, C)
            arr = np.moveaxis(arr, -1, 0)
        else:
            raise MedseError(f"unsupported image shape {arr.shape} for spatial_dims={spatial_dims}", path)
    if arr.shape[0] != in_channels:
        if arr.shape[0] == 1:
            arr = np.repeat(arr, in_channels, axis=0)
        elif in_channels == 1:
            arr = arr.mean(axis=0, keepdims=True)
        else:
            raise MedseError(f"image has {arr.shape[0]} channels, model expects {in_channels}", path)
    return arr


def load_image(
    path: str | Path, in_channels: int = 3, image_size: int = 224, spatial_dims: int = 2, normalize: str = "zscore"
) -> np.ndarray:
    """Read one image as float32 ``(in_channels, *[image_size] * spatial_dims)``.

    Args:
        normalize: "zscore" (per image and channel; NOTE: not in paper), "minmax" (to [0, 1]) or "none"
            (raster images then keep 0-255). Defaults to "zscore".
    Raises:
        MedseError naming the file when it cannot be read.
    """
    import torch
    import torch.nn.functional as F

    path = Path(path)
    try:
        arr = _read_raw(path, in_channels, spatial_dims)
    except MedseError:
        raise
    except Exception as e:
        raise MedseError(f"cannot read image ({type(e).__name__}: {e})", path) from e
    if not np.all(np.isfinite(arr)):
        raise MedseError("image contains NaN or infinite values", path)
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    size = (image_size,) * spatial_dims
    if tuple(t.shape[2:]) != size:
        mode = "bilinear" if spatial_dims == 2 else "trilinear"
        t = F.interpolate(t, size=size, mode=mode, align_corners=False, antialias=(spatial_dims == 2))
    out = t[0].numpy().astype(np.float32)
    axes = tuple(range(1, out.ndim))
    if normalize == "zscore":
        out = (out - out.mean(axis=axes, keepdims=True)) / (out.std(axis=axes, keepdims=True) + 1e-6)
    elif normalize == "minmax":
        lo, hi = out.min(axis=axes, keepdims=True), out.max(axis=axes, keepdims=True)
        out = (out - lo) / np.maximum(hi - lo, 1e-6)
    elif normalize != "none":
        raise MedseError(f"config key 'data.normalize': '{normalize}' is not one of ['zscore', 'minmax', 'none']")
    return out


# ----------------------------------------------------------------------------------------------- augmentation
def default_augment(spatial_dims: int = 2) -> AugmentConfig:
    """The classifier's default augmentation (medse's choice; NOTE: not in paper, the study's is not specified),
    in the one augmentation schema (``medse.data.config.AugmentConfig``, torchio transforms): left-right flip with
    probability 0.5 (the image width of a 2D image (C, H, W), the first voxel axis X of a NIfTI volume), in-plane
    rotation up to 10 degrees with scaling 0.9-1.1, intensity scale 0.9-1.1 and shift +-0.1 (z-score units),
    Gaussian noise with sd up to 0.05."""
    from medse.data.config import AffineAug, FlipAug, IntensityAug, NoiseAug

    return AugmentConfig(
        flip=FlipAug(p=1.0, axes=(1,) if spatial_dims == 2 else (0,), flip_probability=0.5),
        affine=AffineAug(p=1.0, scales=(0.9, 1.1), degrees=10.0, in_plane=True),
        intensity=IntensityAug(p=1.0, scale=(0.9, 1.1), shift=0.1),
        noise=NoiseAug(p=1.0, std=(0.0, 0.05)),
    )


class ClassificationDataset:
    """A torch-style dataset of ``(image (C, *spatial) float32 tensor, label int, index)``.

    Images are read once and cached in memory (``cache=True``); unreadable images are skipped and listed in
    ``self.skipped`` (``(image_id, message)``) so one bad file does not stop a run. With ``augment`` set (the
    torchio pipeline of :mod:`medse.data.augment`, as for segmentation patches), sample ``i`` of epoch ``e`` is
    augmented with the seed ``derive_seed(seed, e, i)`` (reproducible, independent of worker count); call
    :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        data: ClassificationData,
        in_channels: int = 3,
        image_size: int = 224,
        spatial_dims: int = 2,
        normalize: str = "zscore",
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.in_channels, self.image_size, self.spatial_dims = in_channels, image_size, spatial_dims
        from medse.data.augment import build_augmentation

        self.normalize, self.aug, self.seed, self.cache = normalize, augment, seed, cache
        self.transform = build_augmentation(augment, spatial_dims) if augment is not None else None
        self.epoch = 0
        self.samples: list[Sample] = []
        self.skipped: list[tuple[str, str]] = []
        self._cache: list[np.ndarray] = []
        self.class_names = data.class_names
        for s in data.samples:
            try:
                img = self._load(s.path)  # read once even without caching, to skip unreadable files up front
            except MedseError as e:
                self.skipped.append((s.image_id, str(e)))
                continue
            self.samples.append(s)
            if cache:
                self._cache.append(img.astype(np.float16))

    def _load(self, path: Path) -> np.ndarray:
        return load_image(path, self.in_channels, self.image_size, self.spatial_dims, self.normalize)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        import torch

        from medse.data.augment import apply_augmentation
        from medse.utils.seed import derive_seed

        arr = self._cache[i].astype(np.float32) if self.cache else self._load(self.samples[i].path)
        x = torch.from_numpy(arr)
        if self.transform is not None:
            x, _ = apply_augmentation(self.transform, x, None, seed=derive_seed(self.seed, self.epoch, i))
        return x, int(self.samples[i].label), i
