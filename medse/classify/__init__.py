"""Brain-tumour style image classification: data, synthetic slices, training, evaluation, statistics.

Public API (heavy modules are imported on use): :mod:`medse.classify.data`, :mod:`medse.classify.synth`,
:mod:`medse.classify.train` (``train``, ``resume``), :mod:`medse.classify.evaluate` (``evaluate_run``,
``compare_runs``) and :mod:`medse.classify.stats` (``delong_test``, ``delong_ci``, ``mcnemar_test``,
``two_proportion_ztest``, ``holm``). See docs/classifier.md.
"""

from __future__ import annotations

from medse.classify.stats import (
    delong_ci,
    delong_covariance,
    delong_test,
    holm,
    mcnemar_test,
    two_proportion_ztest,
)

__all__ = ["delong_ci", "delong_covariance", "delong_test", "holm", "mcnemar_test", "two_proportion_ztest"]
