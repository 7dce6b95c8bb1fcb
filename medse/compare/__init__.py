"""Comparison of attention blocks: grid pipeline, paired statistics, Dice-gain tables, figures, gate maps, demo.

Public API (imported lazily so that ``import medse.compare`` stays light):

* :mod:`medse.compare.stats`: ``wilcoxon_paired``, ``holm``, ``bootstrap_ci``, ``relative_gain``,
  ``paired_comparison``;
* :mod:`medse.compare.records`: the per-case records format (``cell_rows``, ``load_records``);
* :mod:`medse.compare.table`: ``build_table`` -> ``ComparisonTable`` (CSV, Markdown, LaTeX);
* :mod:`medse.compare.figures`: ``dice_boxplot``, ``gain_barchart``, ``overlay_figure``;
* :mod:`medse.compare.pipeline`: ``run_compare``, ``load_pipeline``, ``CompareConfig``;
* :mod:`medse.compare.search`: ``run_search``, ``load_search`` (per-position attention by successive halving);
* :mod:`medse.compare.explain`: ``explain`` (gate maps of spatial-gate blocks as PNG + NIfTI);
* :mod:`medse.compare.demo`: ``run_demo``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "wilcoxon_paired": "stats", "holm": "stats", "bootstrap_ci": "stats", "relative_gain": "stats",
    "paired_comparison": "stats",
    "cell_rows": "records", "load_records": "records",
    "build_table": "table", "ComparisonTable": "table",
    "dice_boxplot": "figures", "gain_barchart": "figures", "overlay_figure": "figures",
    "run_compare": "pipeline", "load_pipeline": "pipeline", "CompareConfig": "pipeline",
    "explain": "explain",
    "run_search": "search", "load_search": "search",
    "run_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medse.compare.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medse.compare' has no attribute '{name}'")
