"""Per-case, per-label segmentation metrics in millimetres: the one Dice and surface-distance implementation of medse.

* Dice (Dice 1945; Sørensen 1948): ``2 |P ∩ G| / (|P| + |G|)`` from voxel counts, :func:`dice_from_counts`.
  Training validation (``medse.training.validation``) and evaluation both call it, so both follow one rule:
  a structure absent from both prediction and reference scores **1** (:data:`DICE_BOTH_EMPTY`); absent from
  exactly one scores 0. Equal to ``monai.metrics.compute_dice`` / ``DiceMetric`` wherever both are defined
  (tested).
* HD95, the 95th-percentile symmetric Hausdorff distance. Both directed surface-distance sets are computed once
  (``monai.metrics.utils.get_edge_surface_distance``: the distance of every surface voxel of one mask to the
  nearest surface voxel of the other). Two conventions exist, chosen by ``hd95_mode``:

  - ``"max"`` (default, MONAI's ``compute_hausdorff_distance(percentile=95)``): the LARGER of the two
    directed 95th percentiles, ``max(P95(d(P->G)), P95(d(G->P)))``;
  - ``"pooled"`` (medpy's ``hd95``): one 95th percentile of the two directed sets pooled together,
    ``P95(d(P->G) ∪ d(G->P))``. Never larger than ``"max"``; up to 2x smaller when the errors are one-sided
    (e.g. a prediction that leaks on one side only).

  Percentiles are linear-interpolated (``numpy.quantile``'s default, as MONAI's ``torch.quantile`` and medpy).
* ASSD, average symmetric surface distance: the mean of the pooled directed distances (MONAI's
  ``compute_average_surface_distance(symmetric=True)``, medpy 0.5.2's ``assd``).
* Volumes (voxel count x voxel volume) and their difference, in mm^3 and in % of the reference.

Surfaces are MONAI's: the voxels of a mask that are not in its binary erosion. Distances use the voxel
spacing (column norms of the affine, so oblique grids are measured correctly).

Empty masks (:data:`EMPTY_RULE`, documented in ``docs/inference.md``), for each case and label:

* reference and prediction both empty: Dice 1, HD95 0, ASSD 0, volume difference 0 mm^3 and 0 %;
* exactly one empty (a structure missed entirely, or predicted where there is none): Dice 0, and HD95 and
  ASSD the **worst value** :func:`worst_distance`: the diagonal of the image grid in mm (the distance
  between the centres of two opposite corner voxels, ``sqrt(sum(((n_i - 1) s_i)^2))``), larger than any
  distance two voxels of the image can have. It is counted in means (never averaged away) and the cases
  are counted as ``n_empty`` in ``summary.json``; volume difference % is NaN when the reference is empty.

What the comparison tables, the search and the figures need to know about a metric (which way is better, its
unit, the scale of gains, the worst value) is its :class:`Metric` record, registered here
(:func:`get_metric`, :func:`list_metrics`; the tabulated ones: ``dice``, ``hd95``, ``assd``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medse.utils.registry import Registry

__all__ = ["DICE_BOTH_EMPTY", "EMPTY_RULE", "HD95_MODES", "METRICS", "Metric", "binary_metrics", "case_metrics",
           "dice_from_counts", "dice_scores", "get_metric", "list_metrics", "missing_case_rows", "register_metric",
           "worst_distance"]

METRICS = ("dice", "hd95", "assd", "volume_ref_mm3", "volume_pred_mm3", "volume_diff_mm3", "volume_diff_pct")
HD95_MODES = ("max", "pooled")
#: Dice of a structure absent from both prediction and reference (training validation and evaluation alike).
DICE_BOTH_EMPTY = 1.0
EMPTY_RULE = ("both empty: dice 1, hd95 0, assd 0, volume difference 0; one empty: dice 0, hd95/assd = the worst "
              "value, the image grid diagonal in mm (sqrt(sum(((n_i - 1) * spacing_i)^2))), counted in the means "
              "and as n_empty; volume_diff_pct NaN when the reference is empty; a reference without a prediction "
              "counts as a failure: dice 0 and hd95/assd the worst value for every label")


def dice_from_counts(intersection: float, n_pred: float, n_ref: float) -> float:
    """Dice ``2 |P ∩ G| / (|P| + |G|)`` from voxel counts; :data:`DICE_BOTH_EMPTY` (1) when both are empty."""
    den = float(n_pred) + float(n_ref)
    return DICE_BOTH_EMPTY if den == 0 else 2.0 * float(intersection) / den


def dice_scores(pred: Any, ref: Any, values: Iterable[int]) -> list[float]:
    """Dice of each label value between two label maps of the same shape (numpy arrays or torch tensors, any
    device), with the rule of :func:`dice_from_counts` (1 when a label is absent from both)."""
    import torch

    p = torch.as_tensor(pred)
    g = torch.as_tensor(ref).to(p.device)
    if p.shape != g.shape:
        raise ValueError(f"prediction and reference shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    out = []
    for v in values:
        pv, gv = p == v, g == v
        out.append(dice_from_counts(int((pv & gv).sum()), int(pv.sum()), int(gv.sum())))
    return out


def worst_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The worst HD95/ASSD of an image grid: its diagonal in mm, ``sqrt(sum(((n_i - 1) * s_i)^2))``."""
    return float(math.sqrt(sum(((int(n) - 1) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _crop_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel (surfaces unchanged)."""
    union = pred | ref
    idx = np.nonzero(union)
    box = tuple(slice(max(0, int(i.min()) - 1), min(s, int(i.max()) + 2)) for i, s in zip(idx, union.shape,
                                                                                          strict=True))
    return pred[box], ref[box]


def _directed_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) of every surface voxel of ``pred`` to ``ref``'s surface and of ``ref``'s to ``pred``'s."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    p, r = _crop_union(pred, ref)
    tp = torch.from_numpy(np.ascontiguousarray(p))
    tr = torch.from_numpy(np.ascontiguousarray(r))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, dist, _ = get_edge_surface_distance(tp, tr, spacing=[float(s) for s in spacing], symmetric=True)
    return dist[0].double().cpu().numpy(), dist[1].double().cpu().numpy()


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   hd95_mode: Literal["max", "pooled"] = "max") -> dict[str, float]:
    """All :data:`METRICS` of one binary prediction against one binary reference.

    Args:
        pred: boolean mask.
        ref: boolean mask of the same shape.
        spacing: voxel size per axis in mm.
        hd95_mode: ``"max"`` (MONAI: the larger directed 95th percentile) or ``"pooled"`` (medpy: the 95th
            percentile of both directed distance sets pooled). Defaults to ``"max"``.
    """
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got '{hd95_mode}'")
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
        "dice": dice_from_counts(int(np.count_nonzero(pred & ref)), n_p, n_r),
    }
    if n_p == 0 and n_r == 0:
        out.update(hd95=0.0, assd=0.0)
        return out
    if n_p == 0 or n_r == 0:
        worst = worst_distance(pred.shape, spacing)
        out.update(hd95=worst, assd=worst)
        return out
    d_pr, d_rp = _directed_distances(pred, ref, spacing)
    pooled = np.concatenate([d_pr, d_rp])
    if hd95_mode == "max":
        hd95 = max(float(np.quantile(d_pr, 0.95)), float(np.quantile(d_rp, 0.95)))
    else:
        hd95 = float(np.quantile(pooled, 0.95))
    out.update(hd95=hd95, assd=float(pooled.mean()))
    return out


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: dict[str, int],
                 hd95_mode: Literal["max", "pooled"] = "max") -> list[tuple[str, int, str, float]]:
    """Long-format rows ``(label name, label value, metric, value)`` for every label of one case."""
    rows: list[tuple[str, int, str, float]] = []
    for name, value in labels.items():
        m = binary_metrics(pred == value, ref == value, spacing, hd95_mode=hd95_mode)
        for metric in METRICS:
            rows.append((name, int(value), metric, float(m[metric])))
    return rows


@dataclass(frozen=True)
class Metric:
    """What medse knows about one per-case metric: the facts tables, search and figures read.

    Attributes:
        name: registry name, the ``metric`` column of the evaluation's records (``"hd95"``).
        short: its name in text (``"HD95"``).
        higher_is_better: True for an overlap (Dice), False for a distance.
        worst: ``worst(shape, spacing) -> float``, the value of a structure missed entirely (or predicted where
            there is none) on that image grid: Dice 0, a distance :func:`worst_distance`.
        unit: unit of the values, "" for a fraction. Defaults to "".
        scale: factor from values to the gains and CIs of the tables (Dice x 100 = Dice points). Defaults to 1.
        gain_unit: unit of the gains and CIs (``"points"`` for Dice). Defaults to "".
    """

    name: str
    short: str
    higher_is_better: bool
    worst: Callable[[Sequence[int], Sequence[float]], float]
    unit: str = ""
    scale: float = 1.0
    gain_unit: str = ""

    @property
    def label(self) -> str:
        """Column title of the tables: ``"Dice"``, ``"HD95 (mm)"``."""
        return f"{self.short} ({self.unit})" if self.unit else self.short

    @property
    def direction(self) -> str:
        """``"higher is better"`` or ``"lower is better"``."""
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def gain_label(self) -> str:
        """What a positive gain is, for axis labels: ``"Dice gain"``, ``"HD95 reduction"``."""
        return f"{self.short} gain" if self.higher_is_better else f"{self.short} reduction"

    def best_first(self, value: float) -> float:
        """Sort key that puts the best value first (ascending order)."""
        return -float(value) if self.higher_is_better else float(value)


def _dice_worst(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Dice of a structure missed entirely: 0."""
    return 0.0


_METRICS: Registry[Metric] = Registry("metric", decorator="register_metric")


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the registry (its name checked like a block's; re-registering the same name with another
    record raises ``ValueError``); returns it."""
    _METRICS.check_name(metric.name)
    return _METRICS.add(metric.name, metric)


def get_metric(name: str) -> Metric:
    """The :class:`Metric` of ``name``; ``ValueError`` with a suggestion if it is not registered."""
    return _METRICS.get_or_raise(name)


def list_metrics() -> dict[str, Metric]:
    """Registered metrics by name, in registration order (``dice``, ``hd95``, ``assd``)."""
    return dict(_METRICS)


register_metric(Metric("dice", "Dice", higher_is_better=True, worst=_dice_worst, scale=100.0, gain_unit="points"))
register_metric(Metric("hd95", "HD95", higher_is_better=False, worst=worst_distance, unit="mm", gain_unit="mm"))
register_metric(Metric("assd", "ASSD", higher_is_better=False, worst=worst_distance, unit="mm", gain_unit="mm"))


def missing_case_rows(ref: np.ndarray, spacing: Sequence[float],
                      labels: dict[str, int]) -> list[tuple[str, int, str, float]]:
    """Rows of a reference without a prediction (a failure): Dice 0 and HD95/ASSD the worst value for every
    label, whatever the reference holds; the reference volume as measured, prediction volumes NaN."""
    voxel = float(np.prod(spacing))
    worst = {name: metric.worst(ref.shape, spacing) for name, metric in _METRICS.items()}
    rows: list[tuple[str, int, str, float]] = []
    for name, value in labels.items():
        m = {**worst, "volume_ref_mm3": int(np.count_nonzero(ref == value)) * voxel,
             "volume_pred_mm3": math.nan, "volume_diff_mm3": math.nan, "volume_diff_pct": math.nan}
        for metric in METRICS:
            rows.append((name, int(value), metric, float(m[metric])))
    return rows
