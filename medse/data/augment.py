"""Data augmentation with TorchIO (Pérez-García et al., Computer Methods and Programs in Biomedicine 2021).

``build_augmentation(cfg, spatial_dims=3) -> torchio.Compose | None`` turns an
:class:`~medse.data.config.AugmentConfig` into a torchio pipeline (None when every probability is 0).
The subject holds the image as ``tio.ScalarImage`` and the label as ``tio.LabelMap``, so every spatial
transform moves both identically and labels are resampled by nearest neighbour; intensity
transforms (bias field, noise, intensity scale/shift, gamma, motion, ghosting) touch the image only. Segmentation
patches and classifier images use the same pipeline (the classifier passes no label).

``apply_augmentation(transform, image, label, seed, spacing=None) -> (image, label)`` runs the
pipeline deterministically: torchio draws from torch's global RNG, so the call is wrapped in
``torch.random.fork_rng()`` + ``torch.manual_seed(seed)`` (numpy's and Python's global states are
saved and restored too); the caller's RNG state is unchanged afterwards.

For 2D samples (``spatial_dims=2``; arrays (C, H, W) become (C, H, W, 1) for torchio) rotations are
restricted to the in-plane axis, scaling/translation/elastic displacement to the two in-plane axes.
NOTE: not in the torchio paper: the 2D restriction is medse's.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from medse.data.config import AugmentConfig

__all__ = ["build_augmentation", "apply_augmentation"]


def build_augmentation(cfg: AugmentConfig | None, spatial_dims: int = 3) -> Any:
    """A ``torchio.Compose`` of the enabled transforms, or None when none is enabled.

    Args:
        cfg: augmentation settings. None gives None.
        spatial_dims: 3 for volumes/patches, 2 for slices. Defaults to 3.
    """
    import torchio as tio

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if cfg is None or not cfg.enabled:
        return None
    two_d = spatial_dims == 2
    ts: list[Any] = []
    if cfg.affine.p > 0:
        lo, hi = cfg.affine.scales
        d, t = float(cfg.affine.degrees), float(cfg.affine.translation)
        if two_d:
            kw = dict(scales=(lo, hi, lo, hi, 1, 1), degrees=(0, 0, 0, 0, -d, d), translation=(-t, t, -t, t, 0, 0))
        elif cfg.affine.in_plane:
            kw = dict(scales=(lo, hi), degrees=(0, 0, 0, 0, -d, d), translation=t)
        else:
            kw = dict(scales=(lo, hi), degrees=d, translation=t)
        ts.append(tio.RandomAffine(**kw, default_pad_value="minimum", p=cfg.affine.p))
    if cfg.elastic.p > 0:
        m = float(cfg.elastic.max_displacement)
        ncp = int(cfg.elastic.num_control_points)
        ts.append(tio.RandomElasticDeformation(
            num_control_points=(ncp, ncp, 5) if two_d else ncp,
            max_displacement=(m, m, 0) if two_d else m,
            locked_borders=2, p=cfg.elastic.p))
    if cfg.flip.p > 0:
        axes = tuple(int(a) for a in cfg.flip.axes)
        if any(a not in ((0, 1) if two_d else (0, 1, 2)) for a in axes):
            raise ValueError(f"augment.flip.axes {list(axes)} must be spatial axes of a {spatial_dims}D sample")
        ts.append(tio.RandomFlip(axes=axes, flip_probability=cfg.flip.flip_probability, p=cfg.flip.p))
    if cfg.bias_field.p > 0:
        ts.append(tio.RandomBiasField(coefficients=cfg.bias_field.coefficients, order=cfg.bias_field.order,
                                      p=cfg.bias_field.p))
    if cfg.noise.p > 0:
        ts.append(tio.RandomNoise(std=tuple(cfg.noise.std), p=cfg.noise.p))
    if cfg.intensity.p > 0:
        ts.append(_random_scale_shift(tuple(cfg.intensity.scale), float(cfg.intensity.shift), cfg.intensity.p))
    if cfg.gamma.p > 0:
        ts.append(tio.RandomGamma(log_gamma=tuple(cfg.gamma.log_gamma), p=cfg.gamma.p))
    if cfg.motion.p > 0:
        ts.append(tio.RandomMotion(degrees=cfg.motion.degrees, translation=cfg.motion.translation,
                                   num_transforms=cfg.motion.num_transforms, p=cfg.motion.p))
    if cfg.ghosting.p > 0:
        ts.append(tio.RandomGhosting(num_ghosts=tuple(cfg.ghosting.num_ghosts), intensity=tuple(cfg.ghosting.intensity),
                                     axes=(0, 1) if two_d else (0, 1, 2), p=cfg.ghosting.p))
    compose = tio.Compose(ts)
    # remembered so that a dataset of the other dimensionality can rebuild it (PatchDataset does)
    compose._medse_config = cfg
    compose._medse_spatial_dims = spatial_dims
    return compose


def _random_scale_shift(scale: tuple[float, float], shift: float, p: float) -> Any:
    """A torchio intensity transform ``x * a + b``, ``a ~ U(scale)``, ``b ~ U(-shift, shift)`` (torchio has none)."""
    import torchio as tio
    from torchio.transforms.augmentation import RandomTransform

    class RandomScaleShift(RandomTransform, tio.IntensityTransform):
        def apply_transform(self, subject: Any) -> Any:
            a = self.sample_uniform(*scale)
            b = self.sample_uniform(-shift, shift) if shift > 0 else 0.0
            for image in self.get_images(subject):
                image.set_data(image.data.float() * float(a) + float(b))
            return subject

    return RandomScaleShift(p=p)


def apply_augmentation(
    transform: Any,
    image: Any,
    label: Any | None,
    seed: int,
    spacing: tuple[float, ...] | None = None,
) -> tuple[Any, Any | None]:
    """Apply ``transform`` to an image (C, *spatial) and label (*spatial) or (1, *spatial), seeded.

    Returns torch tensors: image float32 (C, *spatial), label int64 (1, *spatial) or None. Spatial
    size is kept. ``spacing`` (mm per axis) sets the torchio affine so mm parameters mean mm.
    """
    import torch
    import torchio as tio

    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    lab = None
    if label is not None:
        lab = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
        if lab.ndim == img.ndim - 1:
            lab = lab[None]
    two_d = img.ndim == 3
    if two_d:
        img = img[..., None]
        lab = lab[..., None] if lab is not None else None
    if img.ndim != 4:
        raise ValueError(f"image must be (C, H, W) or (C, X, Y, Z), got {tuple(img.shape)}")
    affine = np.eye(4)
    if spacing is not None:
        sp = list(spacing) + [1.0] * (3 - len(spacing))
        affine[:3, :3] = np.diag(sp[:3])
    subject_kw: dict[str, Any] = {"image": tio.ScalarImage(tensor=img, affine=affine)}
    if lab is not None:
        subject_kw["label"] = tio.LabelMap(tensor=lab.to(torch.int64), affine=affine)
    subject = tio.Subject(**subject_kw)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) % (2**63))
            random.seed(int(seed))
            np.random.seed(int(seed) % (2**32))
            out = transform(subject)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    out_img = out["image"].data.float()
    out_lab = out["label"].data.long() if lab is not None else None
    if two_d:
        out_img = out_img[..., 0]
        out_lab = out_lab[..., 0] if out_lab is not None else None
    return out_img.contiguous(), (out_lab.contiguous() if out_lab is not None else None)
