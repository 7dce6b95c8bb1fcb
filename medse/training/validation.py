"""Validation during training: Dice per class of whole preprocessed volumes.

The volumes are predicted by :class:`medse.inference.Predictor`, the predictor ``medse predict`` uses (its
sliding windows, blending and 2D slicing; ``SegmentationTask.validate``), as nnU-Net validates with its predictor.
Dice per class c: 2|P_c ∩ G_c| / (|P_c| + |G_c|) on the argmax prediction (Dice 1945; Sørensen 1948),
computed by the evaluation's implementation (:func:`medse.evaluation.metrics.dice_scores`), so validation and
``medse evaluate`` follow one rule: a class absent from both prediction and reference scores 1
(:data:`medse.evaluation.metrics.DICE_BOTH_EMPTY`), absent from exactly one scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def dice_per_class(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 between two class-index maps of the same shape, by the evaluation's rule
    (:func:`medse.evaluation.metrics.dice_scores`: 1 when a class is in neither map)."""
    from medse.evaluation.metrics import dice_scores

    if tuple(pred.shape) != tuple(ref.shape):
        raise ValueError(f"prediction and reference sizes differ: {tuple(pred.shape)} vs {tuple(ref.shape)}")
    return dice_scores(pred, ref, range(1, num_classes))


def summarise_dice(per_case: list[list[float]], class_names: Sequence[str]) -> dict[str, float]:
    """Mean Dice per foreground class over cases (NaNs, e.g. from older callers, skipped) and their mean, as ``{"dice_<name>": v,
    "dice_mean": v}``."""
    arr = np.asarray(per_case, dtype=np.float64).reshape(len(per_case), len(class_names))
    return reduce_dice_sums(np.nansum(arr, 0), np.sum(~np.isnan(arr), 0), class_names)


def reduce_dice_sums(sums: Sequence[float], counts: Sequence[float], class_names: Sequence[str]) -> dict[str, float]:
    """Per-class means from sums and counts of non-NaN per-case Dice (what DDP all-reduces)."""
    out: dict[str, float] = {}
    vals = []
    for name, s, n in zip(class_names, sums, counts, strict=True):
        v = float(s) / float(n) if n > 0 else math.nan
        out[f"dice_{name}"] = v
        if not math.isnan(v):
            vals.append(v)
    out["dice_mean"] = float(np.mean(vals)) if vals else math.nan
    return out
