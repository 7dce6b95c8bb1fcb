"""Batch inference that writes masks aligned with every input scan.

Public API: :class:`Predictor` (``from_run``, ``predict_case``), :func:`predict_folder`,
:class:`PredictReport`, :func:`collect_cases`, :class:`InferenceSettings` (``settings.resolve_settings``),
:func:`write_label_like` (``medse.inference.writer``), :func:`keep_largest_component`
(``medse.inference.postprocess``) and the streaming sliding window in ``medse.inference.sliding``. See
``docs/inference.md``.

Modules: ``inputs`` (which cases an input folder, manifest or file list holds), ``settings`` (inference settings
and their checks, the weights file), ``predictor`` (:class:`Predictor`), ``batch`` (:func:`predict_folder` and
its read / network / write pipeline), ``resume`` (which existing masks are skipped, redone or refused),
``sliding``, ``writer``, ``postprocess``.
"""

from __future__ import annotations

from medse.inference.batch import PredictReport, predict_folder
from medse.inference.inputs import InputCase, collect_cases
from medse.inference.postprocess import keep_largest_component
from medse.inference.predictor import Predictor
from medse.inference.settings import InferenceSettings
from medse.inference.writer import write_label_like, write_probabilities_like

__all__ = [
    "InferenceSettings",
    "InputCase",
    "PredictReport",
    "Predictor",
    "collect_cases",
    "keep_largest_component",
    "predict_folder",
    "write_label_like",
    "write_probabilities_like",
]
