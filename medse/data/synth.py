"""Synthetic brain-like phantoms: medse's demo dataset, written as real NIfTI files.

Each case is a T1-like head: scalp, skull, cerebrospinal fluid (CSF) around a folded cortex (grey
matter, GM) over white matter (WM), two lateral ventricles, and a left/right pair of deep grey
structures ("thalamus-like") of *equal intensity*, so that only their position tells them apart.
Per case, seeded:

* smooth random deformation (random displacement field on a 5^3 control grid, cubic upsampling),
  random head size, small random rotation, random ventricle size, random cortical folding;
* tissue intensities with random gain, partial-volume blur (Gaussian, sigma 0.6 voxel along each
  axis, so more millimetres along a thick-slice axis), a smooth multiplicative bias field (up to
  about +-25 %) and Rician noise (``sqrt((I + n1)^2 + n2^2)``, Gudbjartsson & Patz, MRM 1995);
* anisotropic spacing on about half the cases (one axis 1.25-1.6x thicker, with fewer voxels along
  it) and varied storage orientations (random axis permutation/flips: RAS, LPS, PIR, ...) with an
  oblique tilt (up to 12 degrees) in the header on about half the cases.

Labels (uint8): 0 background (air, scalp, skull), 1 csf, 2 grey_matter, 3 white_matter,
4 ventricles, 5 deep_left, 6 deep_right ("left" = towards world -x in RAS).

Layout written by :func:`generate_dataset` (layout "folder", the default)::

    OUT/images/case_000.nii.gz      float32 image
    OUT/labels/case_000.nii.gz      uint8 label map, same header
    OUT/dataset.json                labels {name: value}, channel_names, numTraining, file_ending,
                                    generator settings, per-case orientation and spacing
    OUT/manifest.json               medse manifest (paths relative to OUT)

or with ``layout="nnunet"``: ``OUT/imagesTr/case_000_0000.nii.gz``, ``OUT/labelsTr/case_000.nii.gz``,
``OUT/dataset.json``. The repository's ``data_manifests/demo.json`` describes the default demo dataset
``medse synth --out demo_data`` (20 cases, 64^3, seed 0) relative to ``data_manifests/``.

NOTE: not in any paper: this phantom is medse's own (BrainWeb-like tissue classes, not a BrainWeb copy).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

__all__ = ["LABELS", "generate_case", "generate_dataset"]

LABELS: dict[str, int] = {
    "background": 0,
    "csf": 1,
    "grey_matter": 2,
    "white_matter": 3,
    "ventricles": 4,
    "deep_left": 5,
    "deep_right": 6,
}

# mean intensities (T1-like, arbitrary units)
_INTENSITY = {"scalp": 650.0, "skull": 120.0, "csf": 220.0, "gm": 520.0, "wm": 800.0, "deep": 610.0}
_FOV_MM = 192.0


@functools.lru_cache(maxsize=64)
def _interp_matrix(grid: int, n: int) -> np.ndarray:
    """(n, grid) matrix: cubic-spline upsampling of ``grid`` control values to ``n`` samples."""
    from scipy import ndimage as ndi

    eye = np.eye(grid)
    return np.stack([ndi.zoom(eye[k], n / grid, order=3, mode="reflect", grid_mode=True)[:n] for k in range(grid)],
                    axis=1).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, grid: int, shape: tuple[int, ...], n: int = 1) -> np.ndarray:
    """``n`` smooth random fields (about [-1, 1]) on ``shape``, from a ``grid``^3 control lattice
    upsampled separably by cubic splines."""
    wa, wb, wc = (_interp_matrix(grid, int(s)) for s in shape)
    ctrl = rng.uniform(-1.0, 1.0, size=(n, grid, grid, grid)).astype(np.float32)
    return np.einsum("ai,bj,ck,nijk->nabc", wa, wb, wc, ctrl, optimize=True).astype(np.float32)


def _ellipsoid(q: np.ndarray, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    c = np.asarray(centre, dtype=np.float32).reshape(3, 1, 1, 1)
    r = np.asarray(radii, dtype=np.float32).reshape(3, 1, 1, 1)
    return np.sqrt(np.sum(((q - c) / r) ** 2, axis=0))


def generate_case(size: int = 64, seed: int = 0, *, anisotropy: bool = True,
                  oblique: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One phantom: ``(image float32, label uint8, affine 4x4 RAS, info)``, in its storage orientation.

    Args:
        size: voxels along the finest axes (a thick axis gets fewer). Defaults to 64.
        seed: random seed; the same seed gives the same case. Defaults to 0.
        anisotropy: allow a thick-slice axis (about half the cases). Defaults to True.
        oblique: allow reoriented storage and oblique headers. Defaults to True.
    """
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff
    from scipy import ndimage as ndi
    from scipy.spatial.transform import Rotation

    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    rng = np.random.default_rng(seed)
    shape = [size, size, size]
    if anisotropy and rng.random() < 0.5:
        ax = int(rng.integers(3))
        shape[ax] = max(8, int(round(size / rng.uniform(1.25, 1.6))))
    spacing = np.array([_FOV_MM / n for n in shape])
    shp = tuple(shape)

    # canonical RAS coordinates in [-1, 1], warped by a smooth deformation and a small rotation
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n) * 2.0 - 1.0 for n in shape]
    p = np.stack(np.meshgrid(*axes, indexing="ij"))
    disp = _smooth_noise(rng, 5, shp, 3) * np.float32(rng.uniform(0.03, 0.06))
    rot = Rotation.from_euler("xyz", rng.uniform(-8, 8, size=3), degrees=True).as_matrix().astype(np.float32)
    q = np.einsum("ij,j...->i...", rot, p + disp) / np.float32(rng.uniform(0.93, 1.05))

    head = _ellipsoid(q, (0.0, 0.0, 0.0), (0.80, 0.92, 0.84))
    gyri = _smooth_noise(rng, 9, shp, 1)[0]
    wm_edge = 0.56 + 0.07 * gyri
    vent_scale = rng.uniform(0.8, 1.3)
    vent = np.minimum(
        _ellipsoid(q, (-0.12, 0.06, 0.13), (0.085 * vent_scale, 0.30, 0.12 * vent_scale)),
        _ellipsoid(q, (0.12, 0.06, 0.13), (0.085 * vent_scale, 0.30, 0.12 * vent_scale)),
    )
    deep_l = _ellipsoid(q, (-0.28, -0.08, -0.08), (0.15, 0.19, 0.15))
    deep_r = _ellipsoid(q, (0.28, -0.08, -0.08), (0.15, 0.19, 0.15))

    label = np.zeros(shp, dtype=np.uint8)
    brain = head < 0.87
    label[brain] = LABELS["csf"]
    label[head < 0.78] = LABELS["grey_matter"]
    label[head < wm_edge] = LABELS["white_matter"]
    label[(vent < 1.0) & brain] = LABELS["ventricles"]
    label[deep_l < 1.0] = LABELS["deep_left"]
    label[deep_r < 1.0] = LABELS["deep_right"]

    gain = rng.uniform(0.8, 1.2)
    jit = {k: v * rng.uniform(0.95, 1.05) for k, v in _INTENSITY.items()}
    img = np.zeros(shp, dtype=np.float32)
    img[head < 1.0] = jit["scalp"]
    img[(head >= 0.87) & (head < 0.94)] = jit["skull"]
    lut = np.array([0.0, jit["csf"], jit["gm"], jit["wm"], jit["csf"], jit["deep"], jit["deep"]], dtype=np.float32)
    img[brain] = lut[label[brain]]
    img *= np.float32(gain)
    # partial-volume blur: 0.6 voxel along every axis, so thick slices blur more (in mm) than thin ones
    img = ndi.gaussian_filter(img, sigma=0.6)
    img *= np.exp(np.float32(0.25) * _smooth_noise(rng, 3, shp, 1)[0])  # bias field
    noise_sd = np.float32(0.03 * _INTENSITY["wm"] * gain)
    n1 = rng.normal(0.0, 1.0, size=shp).astype(np.float32) * noise_sd
    n2 = rng.normal(0.0, 1.0, size=shp).astype(np.float32) * noise_sd
    img = np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)  # Rician magnitude

    # header: canonical RAS affine, then a random storage orientation and an oblique tilt
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0 + rng.uniform(-10, 10, size=3)
    if oblique:
        perm = rng.permutation(3)
        flips = rng.choice([-1.0, 1.0], size=3)
        ornt = np.stack([perm.astype(np.float64), flips], axis=1)
        img = np.ascontiguousarray(apply_orientation(img, ornt))
        label = np.ascontiguousarray(apply_orientation(label, ornt))
        affine = affine @ inv_ornt_aff(ornt, shp)
        if rng.random() < 0.5:
            axis = rng.normal(size=3)
            tilt = axis / max(float(np.linalg.norm(axis)), 1e-8) * np.deg2rad(rng.uniform(3, 12))
            r4 = np.eye(4)
            r4[:3, :3] = Rotation.from_rotvec(tilt).as_matrix()
            affine = r4 @ affine
    info = {
        "axcodes": "".join(aff2axcodes(affine)),
        "shape": [int(s) for s in img.shape],
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
    }
    return img.astype(np.float32), label.astype(np.uint8), affine, info


_CASE_FILE = re.compile(r"^case_\d+(_\d{4})?\.nii\.gz$")


def generate_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 20,
    size: int = 64,
    seed: int = 0,
    *,
    layout: str = "folder",
    anisotropy: bool = True,
    oblique: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``n_cases`` phantoms as NIfTI files under ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder (created).
        n_cases: number of cases. Defaults to 20.
        size: voxels along the finest axes. Defaults to 64.
        seed: base seed; case ``i`` uses ``derive_seed(seed, i)``. Defaults to 0.
        layout: ``"folder"`` (images/ + labels/) or ``"nnunet"`` (imagesTr/ + labelsTr/). Defaults to "folder".
        anisotropy: thick-slice axis on about half the cases. Defaults to True.
        oblique: varied storage orientations and oblique headers. Defaults to True.
        overwrite: replace an existing synthetic dataset in ``out_dir``. Defaults to False.

    Returns:
        ``out_dir`` as a Path.
    """
    import medse
    from medse.data.io import write_image
    from medse.utils.seed import derive_seed

    if layout not in ("folder", "nnunet"):
        raise ValueError(f"layout '{layout}' must be 'folder' or 'nnunet'")
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    out = Path(out_dir)
    img_dir, lab_dir = (out / "images", out / "labels") if layout == "folder" else (out / "imagesTr", out / "labelsTr")
    existing = [p for d in (img_dir, lab_dir) if d.is_dir() for p in d.iterdir()]
    if existing and not overwrite:
        raise MedseError(f"already contains {len(existing)} files in {img_dir.name}/ or {lab_dir.name}/ "
                         "(use --overwrite to replace a synthetic dataset)", out)
    for p in existing:
        if _CASE_FILE.match(p.name):
            p.unlink()
        else:
            raise MedseError(f"refusing to overwrite a folder holding a non-synthetic file ({p.name})", p.parent)
    cases_info = []
    for i in range(n_cases):
        cid = f"case_{i:03d}"
        img, lab, aff, info = generate_case(size, derive_seed(seed, i), anisotropy=anisotropy, oblique=oblique)
        img_name = f"{cid}.nii.gz" if layout == "folder" else f"{cid}_0000.nii.gz"
        write_image(img, aff, img_dir / img_name)
        write_image(lab, aff, lab_dir / f"{cid}.nii.gz", dtype=np.uint8)
        cases_info.append({"case_id": cid, **info})
    meta = {
        "name": "medse-synthetic-brain",
        "description": "Synthetic T1-like brain phantoms written by medse.data.synth (not real patient data).",
        "labels": dict(LABELS),
        "channel_names": {"0": "T1"},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "layout": layout,
        "generator": {"n_cases": n_cases, "size": size, "seed": seed, "anisotropy": anisotropy,
                      "oblique": oblique, "medse_version": medse.__version__},
        "cases": cases_info,
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    if layout == "folder":
        from medse.data.datasets import load_dataset, write_manifest

        write_manifest(load_dataset(out, "folder"), out / "manifest.json")
    return out
