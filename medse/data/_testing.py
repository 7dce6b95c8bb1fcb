"""Helpers that write small random volumes with non-trivial headers, for tests (medse's and users').

``AFFINE_KINDS``: "ras", "lps", "flipped", "permuted", "oblique", "anisotropic".
``make_affine(kind, spacing=None, seed=0) -> 4x4``: a RAS affine of that kind.
``write_random_volume(path, shape=(20, 22, 24), kind="oblique", seed=0, label=False, n_labels=4,
foreground_box=True, dtype=None) -> (path, array, affine)``: random intensities (or integer labels
0..n_labels-1), zero outside a central box when ``foreground_box`` is True.
``write_case(folder, case_id, ...)``: an image + label pair with the same header, in
``folder/images/`` and ``folder/labels/`` (layout "folder").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medse.data.io import write_image

__all__ = ["AFFINE_KINDS", "make_affine", "write_random_volume", "write_case", "rotation_matrix"]

AFFINE_KINDS = ("ras", "lps", "flipped", "permuted", "oblique", "anisotropic")


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` by ``degrees`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def make_affine(kind: str, spacing: tuple[float, float, float] | None = None, seed: int = 0) -> np.ndarray:
    """A RAS voxel-to-world affine of the given kind (see ``AFFINE_KINDS``)."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    if kind == "anisotropic" and spacing is None:
        sp = np.array([0.8, 1.1, 3.0])
    m = np.diag(sp)
    if kind == "ras":
        pass
    elif kind == "lps":
        m = np.diag([-1.0, -1.0, 1.0]) @ m
    elif kind == "flipped":
        m = np.diag([-1.0, 1.0, -1.0]) @ m
    elif kind == "permuted":  # voxel axes x->S, y->R, z->A with a flip: a sagittal/coronal-like storage
        p = np.array([[0, -1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
        m = p @ m
    elif kind == "oblique":
        m = rotation_matrix(rng.normal(size=3), 17.0) @ np.diag([-1.0, 1.0, 1.0]) @ m
    elif kind == "anisotropic":
        m = np.diag([-1.0, 1.0, 1.0]) @ m
    else:
        raise ValueError(f"unknown affine kind '{kind}' (one of {', '.join(AFFINE_KINDS)})")
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = rng.uniform(-40, 40, size=3)
    return aff


def write_random_volume(
    path: str | os.PathLike,
    shape: tuple[int, ...] = (20, 22, 24),
    kind: str = "oblique",
    seed: int = 0,
    *,
    label: bool = False,
    n_labels: int = 4,
    foreground_box: bool = True,
    dtype: str | None = None,
    affine: np.ndarray | None = None,
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write a random volume; returns (path, array as written, affine)."""
    rng = np.random.default_rng(seed)
    aff = make_affine(kind, seed=seed) if affine is None else np.asarray(affine, dtype=np.float64)
    if label:
        arr = rng.integers(0, n_labels, size=shape).astype(dtype or np.uint8)
    else:
        arr = (rng.normal(100.0, 20.0, size=shape)).astype(dtype or np.float32)
    if foreground_box:
        mask = np.zeros(shape[:3], dtype=bool)
        sl = tuple(slice(max(1, s // 5), s - max(1, s // 4)) for s in shape[:3])
        mask[sl] = True
        if arr.ndim == 4:
            arr[~mask, :] = 0
        else:
            arr[~mask] = 0
    write_image(arr, aff, path)
    return Path(path), arr, aff


def write_case(
    folder: str | os.PathLike,
    case_id: str,
    shape: tuple[int, int, int] = (20, 22, 24),
    kind: str = "oblique",
    seed: int = 0,
    n_labels: int = 4,
    suffix: str = ".nii.gz",
) -> tuple[Path, Path]:
    """Write ``images/<case_id><suffix>`` and ``labels/<case_id><suffix>`` with the same header."""
    folder = Path(folder)
    aff = make_affine(kind, seed=seed)
    img, arr, _ = write_random_volume(folder / "images" / f"{case_id}{suffix}", shape, kind, seed, affine=aff)
    rng = np.random.default_rng(seed + 1)
    lab = rng.integers(1, n_labels, size=shape).astype(np.uint8)
    lab[arr == 0] = 0
    write_image(lab, aff, folder / "labels" / f"{case_id}{suffix}")
    return img, folder / "labels" / f"{case_id}{suffix}"
