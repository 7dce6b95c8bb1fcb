"""Synthetic 4-class brain-MRI-like slices: glioma / meningioma / pituitary / no tumour.

Written in the public Kaggle brain-tumour layout (one sub-folder per class: ``glioma``, ``meningioma``,
``notumor``, ``pituitary``; 8-bit grey PNG) plus ``manifest.csv`` (``path, label, patient_id``; 1-3 slices per
synthetic patient). NOTE: not in paper: this is medse's own phantom for tests and demos, not real anatomy.

Each slice has a head ellipse (scalp, skull, cortex ribbon, white matter, two lateral ventricles, a falx),
smooth tissue texture, and the class-dependent lesion:

* glioma: intra-axial (inside a hemisphere, away from the skull), irregular lobulated outline, heterogeneous:
  bright irregular rim, dark necrotic core, soft peritumoural oedema;
* meningioma: extra-axial, attached to the inner skull table (convexity or falx), round and well
  circumscribed, homogeneous, with a thin dural tail along the skull;
* pituitary: midline, near the skull base (bottom of the slice), small oval in a dark sella;
* no tumour: none.

Distractors in every class (small bright vessel dots, a faint normal midline gland, random ventricle size),
per-image contrast, lesion contrast down to a few percent, multiplicative bias field, gamma and Rician noise keep
the task learnable but not trivial.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from medse.utils.atomic import atomic_path, atomic_write_bytes

__all__ = ["CLASS_NAMES", "STUDY_PROPORTIONS", "generate_classification_dataset", "synth_slice"]

CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")
#: Class proportions of the 2025 study's 3,096 images (glioma 901, meningioma 913, no tumour 438, pituitary 844).
STUDY_PROPORTIONS = {"glioma": 901 / 3096, "meningioma": 913 / 3096, "notumor": 438 / 3096, "pituitary": 844 / 3096}


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal((size, size)), sigma)
    return f / (np.abs(f).max() + 1e-8)


def _patient(rng: np.random.Generator) -> dict:
    """Anatomy and acquisition parameters shared by one patient's slices."""
    return {
        "ax": rng.uniform(0.70, 0.82),
        "ay": rng.uniform(0.80, 0.92),
        "rot": rng.uniform(-0.15, 0.15),
        "cx": rng.uniform(-0.04, 0.04),
        "cy": rng.uniform(-0.04, 0.04),
        "vent": rng.uniform(0.6, 1.4),
        "wm": rng.uniform(0.50, 0.62),
        "gm": rng.uniform(0.36, 0.46),
        "skull": rng.uniform(0.55, 0.85),
        "seed": int(rng.integers(2**31)),
        "lesion_angle": rng.uniform(0, 2 * math.pi),
        "lesion_r": rng.uniform(0.0, 1.0),
        "lesion_size": rng.uniform(0.0, 1.0),
    }


def synth_slice(label: str, size: int = 128, rng: np.random.Generator | None = None, patient: dict | None = None,
                slice_offset: float = 0.0) -> np.ndarray:
    """One synthetic slice in [0, 1], float32 ``(size, size)``; ``label`` one of :data:`CLASS_NAMES`.

    Args:
        label: class name. size: pixels a side. Defaults to 128.
        rng: random generator. Defaults to ``np.random.default_rng()``.
        patient: anatomy shared across a patient's slices (see ``_patient``). Defaults to a new random patient.
        slice_offset: in [-1, 1], moves through the lesion (smaller lesion away from 0). Defaults to 0.0.
    """
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown class '{label}', expected one of {CLASS_NAMES}")
    rng = np.random.default_rng() if rng is None else rng
    p = _patient(rng) if patient is None else patient
    prng = np.random.default_rng(p["seed"])
    # separate streams: slice anatomy/distractors, lesion, acquisition; so the lesion is the only difference
    # between two classes drawn with the same generator state
    arng, lrng, qrng = (np.random.default_rng(int(v)) for v in rng.integers(2**31, size=3))
    lin = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")  # y down (row), x right (column)
    c, s = math.cos(p["rot"]), math.sin(p["rot"])
    x = c * (xx - p["cx"]) + s * (yy - p["cy"])
    y = -s * (xx - p["cx"]) + c * (yy - p["cy"])
    rho = np.sqrt((x / p["ax"]) ** 2 + (y / p["ay"]) ** 2)  # 1 on the outer scalp

    img = np.zeros((size, size), dtype=np.float64)
    img[rho < 1.0] = 0.30  # scalp
    skull = (rho >= 0.90) & (rho < 0.96)
    img[skull] = p["skull"] * 0.35  # cortical bone: dark
    img[(rho >= 0.92) & (rho < 0.94)] = p["skull"]  # marrow: bright
    brain = rho < 0.90
    tex = _smooth_field(prng, size, size / 24)
    img[brain] = p["wm"] + 0.04 * tex[brain]
    ribbon = brain & (rho > 0.80 + 0.03 * _smooth_field(prng, size, size / 16))
    img[ribbon] = p["gm"] + 0.03 * tex[ribbon]
    # lateral ventricles and falx
    v = p["vent"]
    for sx in (-1, 1):
        vent = ((x - sx * 0.10 * v) / (0.07 * v)) ** 2 + ((y + 0.05) / (0.25 * v)) ** 2 < 1
        img[vent & brain] = 0.12
    falx = (np.abs(x) < 0.012) & brain & (np.abs(y) > 0.35)
    img[falx] = 0.75
    # distractors present in every class: vessel dots, a faint normal midline gland
    for _ in range(int(arng.integers(2, 7))):
        a, r = arng.uniform(0, 2 * math.pi), arng.uniform(0.1, 0.75)
        vx, vy = r * p["ax"] * math.cos(a), r * p["ay"] * math.sin(a)
        img[((x - vx) ** 2 + (y - vy) ** 2) < arng.uniform(0.006, 0.015) ** 2] = arng.uniform(0.75, 0.95)
    gland = ((x / 0.035) ** 2 + ((y - 0.62 * p["ay"]) / 0.025) ** 2) < 1
    if arng.random() < 0.5:  # a normal, empty sella in half of all slices
        sella = ((x / 0.06) ** 2 + ((y - 0.62 * p["ay"]) / 0.045) ** 2) < 1
        img[sella] = arng.uniform(0.15, 0.35)
    img[gland] = img[gland] + arng.uniform(0.0, 0.08)

    shrink = 1.0 - 0.5 * abs(slice_offset)
    contrast = lrng.uniform(0.06, 0.32)  # lesion contrast varies from subtle to obvious
    if label == "glioma":
        ang = p["lesion_angle"]
        r = 0.30 + 0.30 * p["lesion_r"]
        lx, ly = r * p["ax"] * math.cos(ang), r * p["ay"] * math.sin(ang)
        r0 = (0.09 + 0.12 * p["lesion_size"]) * shrink
        th = np.arctan2(y - ly, x - lx)
        rad = np.ones_like(th)
        for k in range(2, 6):
            rad += lrng.uniform(0.05, 0.2) * np.cos(k * th + lrng.uniform(0, 2 * math.pi))
        d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) / (r0 * rad)
        edema = (d < 1.8) & brain
        img[edema] += 0.5 * contrast * np.clip(1.8 - d[edema], 0, 0.8) / 0.8
        het = _smooth_field(lrng, size, size / 48)
        rim = (d < 1.0) & (d >= 0.55) & brain
        img[rim] = p["wm"] + contrast * (1.0 + 0.8 * het[rim])
        core = (d < 0.55) & brain
        img[core] = p["wm"] - contrast * (0.9 + 0.5 * het[core])
    elif label == "meningioma":
        ang = p["lesion_angle"]
        if p["lesion_r"] < 0.25:  # parafalcine: against the falx
            lx = math.copysign(0.03 + 0.0, math.cos(ang))
            ly = -0.45 * p["ay"] if math.sin(ang) < 0 else 0.45 * p["ay"]
            r0 = (0.06 + 0.09 * p["lesion_size"]) * shrink
            lx = lx + math.copysign(r0 * 0.9, lx)
        else:  # convexity: against the inner skull table
            r0 = (0.07 + 0.10 * p["lesion_size"]) * shrink
            rr = 0.90 - r0 / max(p["ax"], p["ay"]) * 0.9
            lx, ly = rr * p["ax"] * math.cos(ang), rr * p["ay"] * math.sin(ang)
        d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) / r0
        les = (d < 1.0) & (rho < 0.92)
        img[les] = p["wm"] + 1.3 * contrast + 0.01 * lrng.standard_normal(les.sum())
        # dural tail: a thin bright line along the inner skull next to the lesion
        tail = (np.abs(rho - 0.895) < 0.012) & (d < 2.2) & (d >= 1.0)
        img[tail] = p["wm"] + contrast
    elif label == "pituitary":
        lx = lrng.uniform(-0.02, 0.02)
        ly = (0.58 + 0.08 * p["lesion_r"]) * p["ay"]
        r0 = (0.05 + 0.07 * p["lesion_size"]) * shrink
        sella = (((x - lx) / (r0 * 1.7)) ** 2 + ((y - ly) / (r0 * 1.4)) ** 2) < 1
        img[sella] = 0.15
        d = np.sqrt(((x - lx) / (r0 * 1.2)) ** 2 + ((y - ly) / r0) ** 2)
        les = d < 1.0
        img[les] = p["wm"] + contrast + 0.03 * _smooth_field(lrng, size, size / 64)[les]

    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(img, qrng.uniform(0.4, 1.0))  # partial volume
    bias = 1.0 + qrng.uniform(0.05, 0.25) * _smooth_field(qrng, size, size / 5)
    img = img * bias * qrng.uniform(0.8, 1.2)
    img = np.clip(img, 0, None) ** qrng.uniform(0.8, 1.25)
    sigma = qrng.uniform(0.015, 0.06)
    noise_re, noise_im = qrng.standard_normal((2, size, size)) * sigma  # Rician magnitude noise
    img = np.sqrt((img + noise_re) ** 2 + noise_im**2)
    # fixed scaling (bright lesions may saturate, as in 8-bit exports); the lesion does not change other pixels
    return np.clip(img / 1.1, 0, 1).astype(np.float32)


def generate_classification_dataset(
    out_dir: str | Path,
    n_images: int = 400,
    size: int = 128,
    seed: int = 0,
    proportions: dict[str, float] | None = None,
    max_slices_per_patient: int = 3,
) -> Path:
    """Write the synthetic dataset: ``OUT/<class>/<patient>_s<k>.png`` and ``OUT/manifest.csv``.

    Args:
        out_dir: output folder (created). n_images: total number of images. Defaults to 400.
        size: pixels a side. Defaults to 128. seed: Defaults to 0.
        proportions: class -> fraction. Defaults to the 2025 study's proportions (:data:`STUDY_PROPORTIONS`).
        max_slices_per_patient: each synthetic patient contributes 1..this many slices. Defaults to 3.

    Returns:
        ``out_dir``.
    """
    from PIL import Image

    if n_images < len(CLASS_NAMES):
        raise ValueError(f"n_images must be at least {len(CLASS_NAMES)}, got {n_images}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    props = dict(STUDY_PROPORTIONS if proportions is None else proportions)
    unknown = set(props) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown classes in proportions: {sorted(unknown)}; expected {CLASS_NAMES}")
    total = sum(props.values())
    # largest-remainder rounding: the counts add up to n_images, every class gets at least one image
    raw = {c: n_images * props.get(c, 0.0) / total for c in CLASS_NAMES}
    counts = {c: max(1, int(math.floor(v))) for c, v in raw.items()}
    for c in sorted(CLASS_NAMES, key=lambda c: raw[c] - math.floor(raw[c]), reverse=True):
        if sum(counts.values()) >= n_images:
            break
        counts[c] += 1
    while sum(counts.values()) > n_images:
        counts[max(counts, key=counts.get)] -= 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ci, cname in enumerate(CLASS_NAMES):
        rng = np.random.default_rng([seed, ci])
        written, pidx = 0, 0
        while written < counts[cname]:
            k = int(min(rng.integers(1, max_slices_per_patient + 1), counts[cname] - written))
            patient = _patient(rng)
            pid = f"{cname[:3]}{pidx:04d}"
            offsets = np.linspace(-0.6, 0.6, k) if k > 1 else [0.0]
            for j, off in enumerate(offsets):
                arr = synth_slice(cname, size, rng, patient, float(off))
                buf = io.BytesIO()
                Image.fromarray((arr * 255 + 0.5).astype(np.uint8), mode="L").save(buf, format="PNG")
                rel = f"{cname}/{pid}_s{j}.png"
                atomic_write_bytes(out / rel, buf.getvalue())
                rows.append((rel, cname, pid))
                written += 1
            pidx += 1
    with atomic_path(out / "manifest.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        w.writerows(rows)
    return out
