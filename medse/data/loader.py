"""Cached preprocessed cases and the datasets that training and validation iterate.

``CaseStore(spec, preprocess_cfg, cache="memory", cache_dir=None)``
    preprocesses each case once (:func:`medse.data.preprocess.preprocess_case`) and keeps the result
    in memory (``"memory"``), in ``.npz`` files under ``cache_dir`` keyed by a hash of the
    preprocessing settings and the input files' paths, sizes and modification times (``"disk"``), or
    nowhere (``"none"``). NaN/Inf image voxels are replaced by their channel's finite minimum (the
    ``nonfinite`` setting of :class:`~medse.data.preprocess.PreprocessConfig`) with one
    :class:`~medse.data.preprocess.NonFiniteWarning` per case naming the count. ``get(case_id) -> (image
    (C,X,Y,Z) float32, label (X,Y,Z) uint8 | None, props)``; ``n_preprocessed`` counts the cases read from their original files. With DataLoader
    workers call ``preload()`` first, so that forked workers share the cached arrays (otherwise each
    worker preprocesses its cases once on its own).

``PatchDataset(store, case_ids, patch_size, fg_ratio=0.33, augment=None, samples_per_epoch=None, seed=0,
slice_axis=None)``
    sample ``i`` of epoch ``e`` is a pure function of ``derive_seed(seed, e, i)``: the case is
    ``case_ids[perm_e[i % n]]`` (``perm_e`` a seeded per-epoch permutation), with probability
    ``fg_ratio`` the patch is centred on a foreground voxel of a foreground class drawn uniformly from
    those present (nnU-Net's oversampling, Isensee et al., Nature Methods 2021), otherwise its
    position is uniform; volumes smaller than the patch are padded (image with its per-channel minimum,
    label with 0). With ``slice_axis`` and a 2D ``patch_size`` the samples are 2D slices across that
    axis. Augmentation (an :class:`~medse.data.config.AugmentConfig` or a torchio transform) runs under
    a forked, locally seeded torch RNG. Returns ``{"image": float32 (C, *patch), "label": int64
    (1, *patch), "case_id": str}``. Call ``set_epoch(e)`` before each epoch.

``VolumeDataset(store, case_ids)``
    whole preprocessed volumes for validation: ``{"image": (C,X,Y,Z), "label": (1,X,Y,Z) int64 (when the
    case has one), "case_id", "props"}``; use ``batch_size=1, collate_fn=collate_first``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medse.data.config import AugmentConfig
from medse.data.datasets import Case, DatasetSpec
from medse.data.preprocess import NonFiniteWarning, PreprocessConfig, nonfinite_message, preprocess_case
from medse.utils.atomic import atomic_path
from medse.utils.config import to_dict
from medse.utils.errors import MedseError
from medse.utils.seed import derive_seed

try:  # torch is a hard dependency of medse, but keep this module importable for light tools
    from torch.utils.data import Dataset as _TorchDataset
except Exception:  # pragma: no cover
    _TorchDataset = object  # type: ignore[assignment,misc]

__all__ = ["CaseStore", "PatchDataset", "VolumeDataset", "collate_first", "default_cache_dir", "CACHE_KINDS"]

CACHE_KINDS = ("memory", "disk", "none")
_MAX_FG_PER_CLASS = 20000

CaseData = tuple[np.ndarray, "np.ndarray | None", dict[str, Any]]


class CaseStore:
    """Preprocessed cases, computed once and cached (see the module docstring).

    Args:
        spec: the dataset.
        preprocess_cfg: preprocessing settings. Defaults to ``PreprocessConfig()``.
        cache: ``"memory"``, ``"disk"`` or ``"none"``. Defaults to "memory".
        cache_dir: folder for ``"disk"``. Defaults to None (:func:`default_cache_dir`).
        label_values: the label values, passed to :func:`preprocess_case`: non-contiguous values
            (e.g. 0, 1, 2, 4) become class indices 0..K-1 (``props["label_values"]`` maps back).
            Defaults to None (the dataset's declared labels, if any; else labels are kept as stored).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        preprocess_cfg: PreprocessConfig | None = None,
        cache: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        *,
        label_values: Sequence[int] | None = None,
    ) -> None:
        if cache not in CACHE_KINDS:
            from medse.utils.errors import unknown_option_error

            raise unknown_option_error("cache", cache, CACHE_KINDS)
        if cache == "disk" and cache_dir is None:
            cache_dir = default_cache_dir()
        self.spec = spec
        self.cfg = preprocess_cfg or PreprocessConfig()
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if label_values is None and spec.labels:
            label_values = sorted(spec.labels.values())
        self.label_values = sorted(int(v) for v in label_values) if label_values is not None else None
        self._cases: dict[str, Case] = {c.case_id: c for c in spec.cases}
        self._mem: dict[str, CaseData] = {}
        self._expected_channels = len(spec.channel_names) or None
        self.n_preprocessed = 0
        self._warned: set[str] = set()

    @property
    def case_ids(self) -> list[str]:
        return list(self._cases)

    def _case(self, case_id: str) -> Case:
        try:
            return self._cases[case_id]
        except KeyError:
            raise MedseError(f"case '{case_id}' is not in the dataset", self.spec.source) from None

    def cache_key(self, case_id: str) -> str:
        """Hash of the preprocessing settings and the case's files (path, size, mtime)."""
        case = self._case(case_id)
        files = []
        for p in [*case.images, *([case.label] if case.label is not None else [])]:
            st = Path(p).stat()
            files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
        blob = json.dumps({"cfg": to_dict(self.cfg), "files": files, "labels": self.label_values,
                           "channels": self._expected_channels}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def _disk_path(self, case_id: str) -> Path:
        assert self.cache_dir is not None
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in case_id)
        return self.cache_dir / f"{safe}-{self.cache_key(case_id)}.npz"

    def _compute(self, case_id: str) -> CaseData:
        case = self._case(case_id)
        self.n_preprocessed += 1
        out = preprocess_case(case.images, case.label, self.cfg, expected_channels=self._expected_channels,
                              label_values=self.label_values)
        msg = nonfinite_message(out[2])
        if msg and case_id not in self._warned:
            self._warned.add(case_id)
            warnings.warn(f"case '{case_id}': {msg}", NonFiniteWarning, stacklevel=2)
        return out

    def get(self, case_id: str) -> CaseData:
        """``(image float32 (C,X,Y,Z), label uint8 (X,Y,Z) | None, props)`` of one case.

        With ``cache="memory"`` the arrays are the cached ones, marked read-only: copy before modifying.
        """
        if self.cache == "memory":
            if case_id not in self._mem:
                image, label, props = self._compute(case_id)
                image.setflags(write=False)
                if label is not None:
                    label.setflags(write=False)
                self._mem[case_id] = (image, label, props)
            return self._mem[case_id]
        if self.cache == "disk":
            path = self._disk_path(case_id)
            if path.is_file():
                try:
                    with np.load(path, allow_pickle=False) as z:
                        label = z["label"] if "label" in z.files else None
                        return z["image"], label, json.loads(str(z["props"]))
                except Exception:  # a corrupt cache entry is recomputed, never trusted
                    pass
            image, label, props = self._compute(case_id)
            arrays = {"image": image, "props": np.array(json.dumps(props))}
            if label is not None:
                arrays["label"] = label
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, **arrays)
            return image, label, props
        return self._compute(case_id)

    def preload(self, case_ids: Sequence[str] | None = None) -> None:
        """Preprocess (and cache) ``case_ids`` now. Defaults to None (all cases)."""
        for cid in case_ids if case_ids is not None else self.case_ids:
            self.get(cid)


def default_cache_dir() -> Path:
    """``$MEDSE_CACHE_DIR`` or ``~/.cache/medse/preprocessed``."""
    env = os.environ.get("MEDSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "medse" / "preprocessed"


def collate_first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` for :class:`VolumeDataset` with ``batch_size=1``: adds a batch axis to tensors."""
    if len(batch) != 1:
        raise ValueError("collate_first expects batch_size=1")
    out = dict(batch[0])
    for k in ("image", "label"):
        if k in out:
            out[k] = out[k][None]
    return out


def _pad_to(arr: np.ndarray, target: Sequence[int], value: Any) -> tuple[np.ndarray, list[int]]:
    """Pad the last 3 axes of ``arr`` symmetrically up to ``target``; returns (array, pad_before)."""
    spatial = arr.shape[-3:]
    before = [max(0, (t - s) // 2) for s, t in zip(spatial, target, strict=False)]
    after = [max(0, t - s - b) for s, t, b in zip(spatial, target, before, strict=False)]
    if not any(before) and not any(after):
        return arr, [0, 0, 0]
    pad = [(0, 0)] * (arr.ndim - 3) + list(zip(before, after, strict=False))
    if arr.ndim == 4 and not np.isscalar(value):
        return np.stack([np.pad(c, pad[1:], constant_values=v) for c, v in zip(arr, value, strict=False)]), before
    return np.pad(arr, pad, constant_values=value), before


class PatchDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """Seeded random patches (3D) or slices (2D) of cached cases (see the module docstring).

    Args:
        store: the :class:`CaseStore`.
        case_ids: training cases (each must have a label).
        patch_size: 3 sizes (3D patches) or 2 sizes (2D slices across ``slice_axis``).
        fg_ratio: share of foreground-centred samples. Defaults to 0.33.
        augment: an ``AugmentConfig``, a torchio transform, or None; a transform from
            :func:`~medse.data.augment.build_augmentation` made for the other dimensionality is rebuilt
            for this one. Defaults to None.
        samples_per_epoch: samples per epoch. Defaults to None (one per case).
        seed: base seed. Defaults to 0.
        slice_axis: axis of the preprocessed volume slices are taken across (2D). Defaults to None.
    """

    def __init__(
        self,
        store: CaseStore,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        fg_ratio: float = 0.33,
        augment: Any = None,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        slice_axis: int | None = None,
    ) -> None:
        from medse.data.augment import build_augmentation

        self.store = store
        self.case_ids = list(case_ids)
        if not self.case_ids:
            raise ValueError("PatchDataset needs at least one case")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) == 2:
            if slice_axis not in (0, 1, 2):
                raise ValueError("a 2D patch_size needs slice_axis 0, 1 or 2")
        elif len(self.patch_size) == 3:
            if slice_axis is not None:
                raise ValueError("slice_axis is only used with a 2D patch_size")
        else:
            raise ValueError(f"patch_size must have 2 or 3 entries, got {list(patch_size)}")
        if not 0.0 <= fg_ratio <= 1.0:
            raise ValueError(f"fg_ratio {fg_ratio} must lie in [0, 1]")
        self.spatial_dims = len(self.patch_size)
        self.slice_axis = slice_axis
        self.fg_ratio = float(fg_ratio)
        if isinstance(augment, AugmentConfig):
            augment = build_augmentation(augment, self.spatial_dims)
        elif getattr(augment, "_medse_spatial_dims", self.spatial_dims) != self.spatial_dims:
            # built by build_augmentation for the other dimensionality (e.g. 3D rotations for 2D slices)
            augment = build_augmentation(augment._medse_config, self.spatial_dims)
        self.transform = augment
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch else len(self.case_ids)
        self.seed = int(seed)
        self.epoch = 0
        self._fg: dict[str, dict[int, np.ndarray]] = {}
        self._perm: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _epoch_perm(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, 0x7FFFFFFF))
            self._perm = (self.epoch, rng.permutation(len(self.case_ids)))
        return self._perm[1]

    def _fg_index(self, case_id: str, label: np.ndarray) -> dict[int, np.ndarray]:
        if case_id not in self._fg:
            flat = label.ravel()
            idx: dict[int, np.ndarray] = {}
            sub = np.random.default_rng(0)
            for v in np.unique(flat):
                if v == 0:
                    continue
                where = np.flatnonzero(flat == v)
                if where.size > _MAX_FG_PER_CLASS:
                    where = np.sort(sub.choice(where, _MAX_FG_PER_CLASS, replace=False))
                idx[int(v)] = where
            self._fg[case_id] = idx
        return self._fg[case_id]

    def _patch3(self) -> tuple[int, int, int]:
        if self.spatial_dims == 3:
            return self.patch_size  # type: ignore[return-value]
        p = list(self.patch_size)
        p.insert(int(self.slice_axis), 1)  # type: ignore[arg-type]
        return tuple(p)  # type: ignore[return-value]

    def sample_location(self, case_id: str, label: np.ndarray, shape: Sequence[int], rng: np.random.Generator
                        ) -> tuple[list[int], bool]:
        """Start corner of the patch in the (already padded) volume and whether it is foreground-centred."""
        patch = self._patch3()
        want_fg = rng.random() < self.fg_ratio
        fg = self._fg_index(case_id, label) if want_fg else {}
        if want_fg and fg:
            cls = sorted(fg)[int(rng.integers(len(fg)))]
            flat = int(fg[cls][int(rng.integers(fg[cls].size))])
            centre = np.unravel_index(flat, label.shape)
            starts = [int(c) - p // 2 for c, p in zip(centre, patch, strict=False)]
            return [min(max(0, s), max(0, n - p)) for s, n, p in zip(starts, shape, patch, strict=False)], True
        return [int(rng.integers(0, max(0, n - p) + 1)) for n, p in zip(shape, patch, strict=False)], False

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        if not 0 <= index < len(self):
            raise IndexError(index)
        seed = derive_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng(seed)
        case_id = self.case_ids[int(self._epoch_perm()[index % len(self.case_ids)])]
        image, label, props = self.store.get(case_id)
        if label is None:
            raise MedseError(f"training case '{case_id}' has no label", self.store.spec.source)
        patch = self._patch3()
        pad_vals = [float(c.min()) if c.size else 0.0 for c in image]
        img, _ = _pad_to(image, patch, pad_vals)
        lab, _ = _pad_to(label, patch, 0)
        start, _ = self.sample_location(case_id, lab, lab.shape, rng)
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=False))
        img_p = np.array(img[(slice(None), *sl)], dtype=np.float32)  # copies: the cache stays untouched
        lab_p = np.array(lab[sl])
        if self.spatial_dims == 2:
            ax = int(self.slice_axis)  # type: ignore[arg-type]
            img_p = np.ascontiguousarray(np.take(img_p, 0, axis=ax + 1))
            lab_p = np.ascontiguousarray(np.take(lab_p, 0, axis=ax))
        spacing = props.get("spacing_after")
        if spacing is not None and self.spatial_dims == 2:
            spacing = [s for a, s in enumerate(spacing) if a != self.slice_axis]
        if self.transform is not None:
            from medse.data.augment import apply_augmentation

            img_t, lab_t = apply_augmentation(self.transform, img_p, lab_p, derive_seed(self.seed, self.epoch, index,
                                                                                        1), spacing)
        else:
            img_t = torch.from_numpy(img_p)
            lab_t = torch.from_numpy(lab_p.astype(np.int64))[None]
        return {"image": img_t.float(), "label": lab_t.long(), "case_id": case_id}


class VolumeDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """Whole preprocessed volumes (validation): ``{"image", "label"?, "case_id", "props"}``."""

    def __init__(self, store: CaseStore, case_ids: Sequence[str]) -> None:
        self.store = store
        self.case_ids = list(case_ids)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        case_id = self.case_ids[index]
        image, label, props = self.store.get(case_id)
        out: dict[str, Any] = {"image": torch.from_numpy(np.array(image, dtype=np.float32)), "case_id": case_id,
                               "props": props}
        if label is not None:
            out["label"] = torch.from_numpy(label.astype(np.int64))[None]
        return out
