"""medse's preprocessing steps that MONAI has no transform for, for a MONAI bundle written by ``medse export
--format bundle`` (copied into the bundle as ``scripts/medse_transforms.py``; needs numpy, torch and MONAI only,
not medse).

* :func:`datalist`: the cases of an input folder as ``medse predict`` groups them (nnU-Net channel files
  ``case_0000.nii.gz``, ``case_0001.nii.gz`` are one case named ``case``);
* :class:`ReplaceNonFinited`: NaN/+-Inf voxels -> the channel's finite minimum (``nonfinite="replace"``);
* :class:`MedseNormalized`: z-score with mean and population std over the foreground (:func:`foreground`: any
  channel non-zero, above its Otsu threshold, or all voxels), applied to every voxel, statistics accumulated in float64; or the CT window scaled to [0, 1];
* :func:`case_name_formatter`: ``SaveImaged``'s output name, the case id (``case.nii.gz``, as medse names masks);
* :func:`run_inference`: the loop over the cases (``SupervisedEvaluator`` without its pytorch-ignite dependency).

MONAI's ``NormalizeIntensityd(nonzero=True)`` differs: it takes each channel's own non-zero voxels and leaves
the zero voxels at 0, which changes what the network sees.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def _stem(name: str) -> str:
    for s in _SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def datalist(input_dir: str) -> list[dict[str, Any]]:
    """``[{"image": file or [channel files], "case_id": id}]`` for the NIfTI files of ``input_dir``, sorted."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in sorted(os.listdir(input_dir)):
        if name.startswith(".") or not name.lower().endswith(_SUFFIXES):
            continue
        stem = _stem(name)
        m = _CHANNEL.match(stem)
        case, ch = (m["case"], int(m["ch"])) if m else (stem, -1)
        groups.setdefault(case, []).append((ch, os.path.join(input_dir, name)))
    out = []
    for case, items in sorted(groups.items()):
        files = [f for _, f in sorted(items)]
        out.append({"image": files[0] if len(files) == 1 else files, "case_id": case})
    if not out:
        raise FileNotFoundError(f"no NIfTI files (.nii, .nii.gz) in {input_dir}")
    return out


def foreground(img: Any, mode: str = "nonzero") -> Any:
    """medse's foreground of a ``(C, *spatial)`` image as a ``(1, *spatial)`` mask: any channel non-zero, any
    channel above its Otsu threshold, or every voxel (``CropForegroundd``'s ``select_fn``)."""
    arr = np.asarray(img.detach().cpu().numpy() if torch.is_tensor(img) else img)
    if mode == "all":
        mask = np.ones(arr.shape[1:], dtype=bool)
    elif mode == "nonzero":
        mask = np.any(arr != 0, axis=0)
    elif mode == "otsu":
        from skimage.filters import threshold_otsu

        mask = np.zeros(arr.shape[1:], dtype=bool)
        for c in arr:
            if np.ptp(c) > 0:
                mask |= c > threshold_otsu(c)
    else:
        raise ValueError(f"foreground {mode!r} must be nonzero, otsu or all")
    return torch.as_tensor(mask[None]) if torch.is_tensor(img) else mask[None]


def case_name_formatter(metadict: Mapping[str, Any], saver: Any) -> dict[str, Any]:
    """The case id as the output name: ``case`` for ``case.nii.gz`` and for ``case_0000.nii.gz``."""
    name = metadict.get("filename_or_obj", "case") if metadict else "case"
    if isinstance(name, (list, tuple)):
        name = name[0]
    stem = _stem(os.path.basename(str(name)))
    m = _CHANNEL.match(stem)
    return {"subject": m["case"] if m else stem, "idx": None}


class ReplaceNonFinited(MapTransform):
    """NaN/+-Inf voxels of each channel -> that channel's finite minimum (medse's ``nonfinite="replace"``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not torch.is_floating_point(img):
                continue
            finite = torch.isfinite(img)
            if bool(finite.all()):
                continue
            out = img.clone()
            for c in range(img.shape[0]):
                ok = finite[c]
                if not bool(ok.any()):
                    raise ValueError(f"channel {c} of {key}: every voxel is NaN/Inf")
                out[c][~ok] = img[c][ok].min()
            d[key] = out
        return d


class MedseNormalized(MapTransform):
    """medse's intensity normalisation (``data.preprocess.normalization``).

    Args:
        keys: the image key(s).
        normalization: ``"zscore"``, ``"ct"`` or ``"none"``.
        foreground: ``"nonzero"``, ``"otsu"`` or ``"all"`` (:func:`foreground`): the voxels the z-score
            statistics are taken over (every voxel when fewer than 2 are foreground).
        ct_window: ``(low, high)`` for ``"ct"``.
    """

    def __init__(self, keys: Any, normalization: str = "zscore", foreground: str = "nonzero",
                 ct_window: Sequence[float] = (-1000.0, 1000.0), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if normalization not in ("zscore", "ct", "none"):
            raise ValueError(f"normalization {normalization!r} must be zscore, ct or none")
        if foreground not in ("nonzero", "otsu", "all"):
            raise ValueError(f"foreground {foreground!r} must be nonzero, otsu or all")
        self.normalization, self.foreground = normalization, foreground
        self.lo, self.hi = (float(v) for v in ct_window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if self.normalization == "ct":
                d[key] = (img.float().clamp(self.lo, self.hi) - self.lo) / (self.hi - self.lo)
                continue
            if self.normalization == "none":
                continue
            arr = np.asarray(img.detach().cpu().numpy(), dtype=np.float32)
            mask = foreground(arr, self.foreground)[0]
            if mask.sum() < 2:
                mask = np.ones_like(mask)
            out = np.empty_like(arr)
            for c in range(arr.shape[0]):
                vals = arr[c][mask].astype(np.float64)
                m = float(vals.mean())
                s = float(np.sqrt(np.mean((vals - m) ** 2)))
                out[c] = (arr[c] - np.float32(m)) / np.float32(max(s, 1e-8))
            new = torch.as_tensor(out)
            d[key] = _like(img, new) if hasattr(img, "meta") else new
        return d


def _like(img: Any, values: torch.Tensor) -> Any:
    """``values`` with ``img``'s MetaTensor metadata and applied operations (what Invertd needs)."""
    out = img.clone()
    out.copy_(values.to(out.dtype))
    return out


def run_inference(dataloader: Any, network: Any, inferer: Any, postprocessing: Any, device: Any) -> int:
    """Each batch: ``inferer(image, network)`` under ``torch.no_grad``, then ``postprocessing`` per case (which
    inverts the preprocessing and saves the mask); the number of cases."""
    from monai.data import decollate_batch

    network = network.eval()
    n = 0
    for batch in dataloader:
        with torch.no_grad():
            batch["pred"] = inferer(batch["image"].to(device), network)
        for item in decollate_batch(batch):
            postprocessing(item)
            n += 1
    return n
