"""Small inputs for tests, medse's and users' (a plugin's block or network, a pipeline step): volumes with
non-trivial headers, tiny datasets (clean, or with one validation problem) and tiny run folders.

``AFFINE_KINDS``: "ras", "lps", "flipped", "permuted", "oblique", "anisotropic".
``make_affine(kind, spacing=None, seed=0) -> 4x4``: a RAS affine of that kind.
``write_random_volume(path, shape=(20, 22, 24), kind="oblique", seed=0, label=False, n_labels=4,
foreground_box=True, dtype=None) -> (path, array, affine)``: random intensities (or integer labels
0..n_labels-1), zero outside a central box when ``foreground_box`` is True.
``write_case(folder, case_id, ...)``: an image + label pair with the same header, in
``folder/images/`` and ``folder/labels/`` (layout "folder").
``make_dataset(root, n_cases=3, shape=(16, 18, 20), n_labels=4, declare_labels=True) -> root``: a clean
layout-"folder" dataset (cases c00, c01, ... with varied affine kinds; ``dataset.json`` declaring labels
``background, l1, l2, ...`` when ``declare_labels``).
``make_broken_dataset(root, problem, ...) -> (root, file_fragment, message_fragment)``: the same with
one validation problem injected into case c01 (or the dataset); the validation error names a file
containing ``file_fragment`` and contains ``message_fragment``. ``VALIDATION_PROBLEMS`` lists them:
unreadable, truncated, shape, affine, 4d, values, float_labels, missing_label, orphan_label,
duplicate_ids (the last needs a manifest: ``root`` then is the manifest path).
``VALIDATION_WARNINGS`` lists the injectable problems that are warnings (the case is still usable): nan
(one NaN and one +Inf voxel in c01's image, replaced by preprocessing).
``make_run(path, config=None, labels=None, channel_names=("image",), checkpoints=("best",), seed=0) -> Run``: a
run folder made through :meth:`medse.runs.Run.create` as training makes it (resolved config, dataset.json, an
empty split, run_info.json) with randomly initialised (seeded) checkpoints; by default a tiny 3D U-Net.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medse.data.io import write_image

if TYPE_CHECKING:  # pragma: no cover
    from medse.runs import Run

__all__ = ["AFFINE_KINDS", "VALIDATION_PROBLEMS", "VALIDATION_WARNINGS", "make_affine", "write_random_volume",
           "write_case", "rotation_matrix", "make_dataset", "make_broken_dataset", "make_run", "TINY_UNET"]

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


def make_dataset(
    root: str | os.PathLike,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (16, 18, 20),
    n_labels: int = 4,
    declare_labels: bool = True,
) -> Path:
    """A clean layout-"folder" dataset of random image/label pairs (see the module docstring)."""
    import json

    root = Path(root)
    for i in range(n_cases):
        write_case(root, f"c{i:02d}", shape, AFFINE_KINDS[i % len(AFFINE_KINDS)], seed=i, n_labels=n_labels)
    if declare_labels:
        labels = {"background": 0, **{f"l{v}": v for v in range(1, n_labels)}}
        (root / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "image"}}))
    return root


def _rewrite(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    from medse.data.io import read_image

    write_image(array, read_image(path).affine if affine is None else affine, path)


def _inject(root: Path, problem: str) -> tuple[str, str]:
    from medse.data.io import read_image

    img_p, lab_p = root / "images" / "c01.nii.gz", root / "labels" / "c01.nii.gz"
    if problem == "unreadable":
        img_p.write_bytes(b"\x00garbage" * 50)
        return "images/c01.nii.gz", "corrupt gzip"
    if problem == "truncated":
        raw = lab_p.read_bytes()
        lab_p.write_bytes(raw[: len(raw) // 2])
        return "labels/c01.nii.gz", "truncated"
    if problem == "shape":
        _rewrite(lab_p, np.zeros((7, 7, 7), np.uint8), read_image(img_p).affine)
        return "labels/c01.nii.gz", "label shape (7, 7, 7) differs from image shape"
    if problem == "affine":
        lab = read_image(lab_p)
        aff = lab.affine.copy()
        aff[0, 3] += 5.0
        _rewrite(lab_p, lab.array, aff)
        return "labels/c01.nii.gz", "label affine differs from the image affine"
    if problem == "4d":
        img = read_image(img_p)
        _rewrite(img_p, np.stack([img.array, img.array], axis=-1))
        return "images/c01.nii.gz", "4D image"
    if problem == "nan":
        arr = read_image(img_p).array.copy()
        arr[3, 3, 3] = np.nan
        arr[4, 4, 4] = np.inf
        _rewrite(img_p, arr)
        return "images/c01.nii.gz", "2 NaN/Inf voxels"
    if problem == "values":
        arr = read_image(lab_p).array.copy()
        arr[5, 5, 5] = 9
        _rewrite(lab_p, arr)
        return "labels/c01.nii.gz", "label values [9] are not in the declared label set"
    if problem == "float_labels":
        arr = read_image(lab_p).array.astype(np.float32)
        arr[5, 5, 5] = 1.5
        _rewrite(lab_p, arr)
        return "labels/c01.nii.gz", "non-integer values"
    if problem == "missing_label":
        lab_p.unlink()
        return "images/c01.nii.gz", "missing label for case 'c01'"
    if problem == "orphan_label":
        lab = read_image(lab_p)
        write_image(lab.array, lab.affine, root / "labels" / "zz.nii.gz")
        return "labels/zz.nii.gz", "no matching image"
    raise ValueError(f"unknown problem '{problem}' (one of {', '.join(VALIDATION_PROBLEMS + VALIDATION_WARNINGS)})")


VALIDATION_PROBLEMS = ("unreadable", "truncated", "shape", "affine", "4d", "values", "float_labels",
                       "missing_label", "orphan_label", "duplicate_ids")
VALIDATION_WARNINGS = ("nan",)


def make_broken_dataset(
    root: str | os.PathLike,
    problem: str,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (16, 18, 20),
) -> tuple[Path, str, str]:
    """A dataset with one validation problem; returns (dataset path, file fragment, message fragment)."""
    from medse.data.datasets import load_dataset, manifest_dict

    root = make_dataset(root, n_cases, shape)
    if problem == "duplicate_ids":
        import json

        meta = manifest_dict(load_dataset(root), root)
        meta["cases"].append(dict(meta["cases"][0]))
        (root / "manifest.json").write_text(json.dumps(meta))
        return root / "manifest.json", "manifest.json", "duplicate case ID 'c00' (2 cases)"
    file_fragment, message = _inject(root, problem)
    return root, file_fragment, message


#: the config :func:`make_run` resolves by default: a two-level 3D U-Net on 16^3 patches (a few thousand weights)
TINY_UNET: dict[str, Any] = {
    "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8], "strides": [2]}},
    "train": {"patch_size": [16, 16, 16], "amp": False},
}


def make_run(
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    labels: Mapping[str, int] | None = None,
    channel_names: Sequence[str] = ("image",),
    checkpoints: Sequence[str] = ("best",),
    seed: int = 0,
) -> Run:
    """A run folder as training makes it, without training: :meth:`medse.runs.Run.create` writes the resolved
    config, ``dataset.json``, an empty split and ``run_info.json``; each of ``checkpoints`` holds the weights of
    the network built with ``torch.manual_seed(seed)`` (the same weights in each).

    Args:
        path: the run folder (absent or empty).
        config: a segmentation config mapping (``medse.config`` schema, defaults filled in). Defaults to
            :data:`TINY_UNET`.
        labels: ``{name: value}`` of the classes, background included. Defaults to ``{"background": 0, "fg": 1}``.
        channel_names: the input channels. Defaults to one, ``image``.
        checkpoints: which checkpoints to write (``best``, ``last``). Defaults to ``best`` only.
        seed: the seed of the weights. Defaults to 0.
    """
    import torch

    from medse.config import config_to_dict, load_config
    from medse.runs import DatasetInfo, Run, Split, build_model

    cfg = load_config(dict(config if config is not None else TINY_UNET))
    labels = {str(k): int(v) for k, v in (labels or {"background": 0, "fg": 1}).items()}
    dataset = DatasetInfo(labels=labels, class_values=sorted(set(labels.values()) | {0}),
                          channel_names=list(channel_names))
    run = Run.create(path, config=config_to_dict(cfg), dataset=dataset, split=Split(train=[], val=[], test=[]))
    torch.manual_seed(seed)
    state = build_model(cfg, dataset.num_channels, dataset.num_classes).state_dict()
    for which in checkpoints:
        run.save_checkpoint(which, {"model": state, "epoch": 1})
    return run
