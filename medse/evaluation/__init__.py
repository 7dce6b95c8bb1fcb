"""Per-case segmentation metrics (Dice, HD95, ASSD in mm, volume difference) as a long table + summary.

Public API: :func:`evaluate`, :func:`evaluate_cases` (``medse.evaluation.runner``), :func:`binary_metrics`, :func:`case_metrics`,
:func:`dice_from_counts`, :func:`dice_scores`, :func:`worst_distance`, :data:`METRICS`, :data:`EMPTY_RULE`,
:data:`HD95_MODES` (``medse.evaluation.metrics``), :func:`summarise`, :func:`check_writable_folder`.
"""

from __future__ import annotations

from medse.evaluation.metrics import (
    DICE_BOTH_EMPTY,
    EMPTY_RULE,
    HD95_MODES,
    METRICS,
    binary_metrics,
    case_metrics,
    dice_from_counts,
    dice_scores,
    worst_distance,
)
from medse.evaluation.runner import check_writable_folder, evaluate, evaluate_cases, summarise

__all__ = ["DICE_BOTH_EMPTY", "EMPTY_RULE", "HD95_MODES", "METRICS", "binary_metrics", "case_metrics",
           "check_writable_folder", "dice_from_counts", "dice_scores", "evaluate", "evaluate_cases", "summarise",
           "worst_distance"]
