"""Per-case, per-label segmentation metrics in millimetres, computed by MONAI.

* Dice (Dice 1945; Sørensen 1948): ``monai.metrics.compute_dice``.
* 95th-percentile symmetric Hausdorff distance: ``monai.metrics.compute_hausdorff_distance(percentile=95,
  spacing=...)`` (MONAI pools the directed distances of both surfaces, then takes the percentile).
* Average symmetric surface distance: ``monai.metrics.compute_average_surface_distance(symmetric=True,
  spacing=...)``.
* Volumes (voxel count x voxel volume) and their difference, in mm^3 and in % of the reference.

Surfaces are MONAI's: the voxels of a mask that are not in its binary erosion. Distances use the voxel
spacing (column norms of the affine, so oblique grids are measured correctly).

Empty masks (documented in ``docs/inference.md``), for each case and label:

* reference and prediction both empty: Dice 1, HD95 0, ASSD 0, volume difference 0 mm^3 and 0 %;
* exactly one empty: Dice 0, HD95 and ASSD NaN (a surface distance to nothing is undefined), recorded as
  NaN and counted as ``n_empty`` in ``summary.json`` (never silently averaged); volume difference %
  is NaN when the reference is empty.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["METRICS", "EMPTY_RULE", "binary_metrics", "case_metrics"]

METRICS = ("dice", "hd95", "assd", "volume_ref_mm3", "volume_pred_mm3", "volume_diff_mm3", "volume_diff_pct")
EMPTY_RULE = ("both empty: dice 1, hd95 0, assd 0, volume difference 0; one empty: dice 0, hd95/assd NaN "
              "(counted as n_empty), volume_diff_pct NaN when the reference is empty")


def _crop_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel (surfaces unchanged)."""
    union = pred | ref
    idx = np.nonzero(union)
    box = tuple(slice(max(0, int(i.min()) - 1), min(s, int(i.max()) + 2)) for i, s in zip(idx, union.shape,
                                                                                          strict=True))
    return pred[box], ref[box]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All :data:`METRICS` of one binary prediction against one binary reference.

    Args:
        pred: boolean mask.
        ref: boolean mask of the same shape.
        spacing: voxel size per axis in mm.
    """
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    voxel = float(np.prod(spacing))
    n_p, n_r = int(pred.sum()), int(ref.sum())
    out = {
        "volume_ref_mm3": n_r * voxel,
        "volume_pred_mm3": n_p * voxel,
        "volume_diff_mm3": (n_p - n_r) * voxel,
        "volume_diff_pct": 100.0 * (n_p - n_r) / n_r if n_r else (0.0 if n_p == 0 else math.nan),
    }
    if n_p == 0 and n_r == 0:
        out.update(dice=1.0, hd95=0.0, assd=0.0)
        return out
    if n_p == 0 or n_r == 0:
        out.update(dice=0.0, hd95=math.nan, assd=math.nan)
        return out
    p, r = _crop_union(pred, ref)
    tp = torch.from_numpy(np.ascontiguousarray(p))[None, None].float()
    tr = torch.from_numpy(np.ascontiguousarray(r))[None, None].float()
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = float(compute_dice(tp, tr, include_background=True)[0, 0])
        hd95 = float(compute_hausdorff_distance(tp, tr, include_background=True, percentile=95, spacing=sp)[0, 0])
        assd = float(compute_average_surface_distance(tp, tr, include_background=True, symmetric=True,
                                                      spacing=sp)[0, 0])
    out.update(dice=dice, hd95=hd95, assd=assd)
    return out


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 labels: dict[str, int]) -> list[tuple[str, int, str, float]]:
    """Long-format rows ``(label name, label value, metric, value)`` for every label of one case."""
    rows: list[tuple[str, int, str, float]] = []
    for name, value in labels.items():
        m = binary_metrics(pred == value, ref == value, spacing)
        for metric in METRICS:
            rows.append((name, int(value), metric, float(m[metric])))
    return rows
