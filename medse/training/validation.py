"""Validation during training: sliding-window prediction of whole preprocessed volumes and Dice per class.

3D networks run :func:`monai.inferers.sliding_window_inference` over the volume; 2D networks run it over
every slice along ``slice_axis`` (a batch of slices at a time) and the slices are stacked back.
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


def predict_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    spatial_dims: int,
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    blend: str = "gaussian",
    slice_axis: int = 2,
    slice_batch: int = 16,
    amp: bool = False,
) -> torch.Tensor:
    """Logits (K, *spatial) of a (C, X, Y, Z) volume already on the model's device.

    Args:
        model: the network (in eval mode, called under ``torch.no_grad``).
        image: preprocessed volume (C, X, Y, Z).
        spatial_dims: 3 for a volumetric network, 2 for a slice network.
        roi_size: window size (3 or 2 values).
        sw_batch_size: windows per forward pass. Defaults to 2.
        overlap: window overlap. Defaults to 0.5.
        blend: ``gaussian`` or ``constant``. Defaults to ``gaussian``.
        slice_axis: spatial axis (0, 1 or 2) the 2D network slices along. Defaults to 2.
        slice_batch: slices per sliding-window call for 2D networks. Defaults to 16.
        amp: autocast on CUDA. Defaults to False.
    """
    import torch
    from monai.inferers import sliding_window_inference

    dev_type = image.device.type
    ctx = torch.autocast(dev_type, enabled=amp and dev_type == "cuda")

    def run(x: torch.Tensor) -> torch.Tensor:
        with ctx:
            out = sliding_window_inference(
                x, list(roi_size), sw_batch_size, model, overlap=overlap, mode=blend
            )
        return out.float()

    if spatial_dims == 3:
        return run(image[None])[0]
    # 2D: slices along slice_axis become the batch
    vol = torch.movedim(image, 1 + slice_axis, 0)  # (S, C, a, b)
    outs = [run(vol[i : i + slice_batch]) for i in range(0, vol.shape[0], slice_batch)]
    logits = torch.cat(outs, 0)  # (S, K, a, b)
    return torch.movedim(logits, 0, 1 + slice_axis)


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
