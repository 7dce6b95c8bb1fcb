"""Brain-tumour style image classification: data, synthetic slices, training, prediction and evaluation files.

Public API (heavy modules are imported on use): :mod:`medse.classify.data`, :mod:`medse.classify.synth`,
:mod:`medse.classify.train` (``train``, ``resume``; registers the ``classification`` task, :mod:`medse.tasks`) and
:mod:`medse.classify.evaluate` (``predict_run``, ``evaluate_run``). The metrics (AUC with DeLong CIs, per-class
metrics) are :mod:`medse.evaluation.classification`'s; the paired comparison of two runs (DeLong, McNemar, Z-test,
Holm; ``compare_runs``) is :mod:`medse.compare.classifier`'s. See docs/classifier.md.
"""
