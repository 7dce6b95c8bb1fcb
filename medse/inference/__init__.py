"""Batch inference that writes masks aligned with every input scan.

Public API: :class:`Predictor` (``from_run``, ``predict_case``), :func:`predict_folder`,
:class:`PredictReport`, :func:`collect_cases`, :func:`write_label_like` (``medse.inference.writer``),
:func:`keep_largest_component` (``medse.inference.postprocess``) and the streaming sliding window in
``medse.inference.sliding``. See ``docs/inference.md``.
"""

from __future__ import annotations

from medse.inference.postprocess import keep_largest_component
from medse.inference.predictor import InputCase, Predictor, PredictReport, collect_cases, predict_folder
from medse.inference.writer import write_label_like, write_probabilities_like

__all__ = [
    "InputCase",
    "PredictReport",
    "Predictor",
    "collect_cases",
    "keep_largest_component",
    "predict_folder",
    "write_label_like",
    "write_probabilities_like",
]
