"""Classifier figures: no matplotlib warning leaks into ``classify evaluate`` / ``compare`` output (issue 22, item 7)."""

from __future__ import annotations

import warnings

import numpy as np

from medse.classify.evaluate import evaluate_predictions, plot_roc


def _pred(y_true: list[int]) -> dict:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(y_true))
    return {"y_true": np.array(y_true), "probs": probs, "class_names": ["glioma", "meningioma", "notumor"],
            "image_ids": [f"i{k}" for k in range(len(y_true))], "paths": [f"i{k}.png" for k in range(len(y_true))]}


def test_roc_with_a_class_absent_from_the_split_warns_nothing(tmp_path):
    """A test split without glioma: its ROC panel has no curve; before, ``ax.legend()`` there printed matplotlib's
    "No artists with labels found to put in legend" into the command's output."""
    pred = _pred([1, 2, 1, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        plot_roc({"baseline": pred, "scse": pred}, tmp_path / "roc.png")
        evaluate_predictions(pred, tmp_path / "ev", title="m", plots=True)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "ev" / "roc.png").is_file()
