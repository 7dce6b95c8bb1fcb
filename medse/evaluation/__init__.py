"""Per-case segmentation metrics (Dice, HD95, ASSD in mm, volume difference) as a long table + summary.

Public API: :func:`evaluate` (``medse.evaluation.runner``), :func:`binary_metrics`, :func:`case_metrics`,
:data:`METRICS`, :data:`EMPTY_RULE` (``medse.evaluation.metrics``), :func:`summarise`.
"""

from __future__ import annotations

from medse.evaluation.metrics import EMPTY_RULE, METRICS, binary_metrics, case_metrics
from medse.evaluation.runner import evaluate, summarise

__all__ = ["EMPTY_RULE", "METRICS", "binary_metrics", "case_metrics", "evaluate", "summarise"]
