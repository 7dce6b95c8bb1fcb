"""``medse.compare.cell.Cell``: the one owner of a compare/search cell folder's file names; ``evaluate_cases``
scores a cell's (case, prediction, reference) triples as ``evaluate`` scores the same files gathered in folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medse.compare.cell import Cell, decision_path
from medse.data.io import write_image
from medse.evaluation import evaluate, evaluate_cases
from medse.utils.errors import MedseError


def test_cell_owns_its_files(tiny_cell, tmp_path: Path) -> None:
    cell = tiny_cell()
    assert cell == Cell.open(tmp_path / "grid" / "cells" / "unet-none-holdout-seed0") == str(cell)
    assert cell.cell_id == "unet-none-holdout-seed0" and cell / "x" == cell.path / "x"
    assert cell.has_run and cell.run.dataset.num_classes == 2 and cell.run.has_checkpoint("best")
    assert not cell.finished and not cell.failed and cell.times is None and cell.identity is None
    assert cell.predictions() == {} and cell.reused_from is None
    cell.write_error("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n\n")
    assert cell.failed and cell.error_line == "RuntimeError: boom"
    cell.write_records(pd.DataFrame({"case_id": []}))
    assert cell.finished and not cell.failed
    cell.clear_error()
    cell.clear_error()  # nothing to clear: no error
    assert cell.error_line is None
    cell.write_times({"train_s": 1.5})
    cell.write_identity({"config": {"a": 1}, "data": None})
    assert cell.times == {"train_s": 1.5} and cell.identity == {"config": {"a": 1}, "data": None}
    assert [c.cell_id for c in Cell.all_in(cell.path.parents[1])] == [cell.cell_id]
    assert decision_path(cell.path.parents[1]).name == "decision.json"
    with pytest.raises(MedseError, match="cell folder not found"):
        Cell.open(cell.path.parent / "absent")


def test_reused_run_is_a_marked_copy(tiny_cell, tmp_path: Path) -> None:
    src = tiny_cell()
    dst = Cell.in_grid(tmp_path / "final", src.cell_id)
    dst.reuse_run(src)
    assert dst.reused_from == src.run_dir and dst.has_run
    assert dst.run.checkpoint_path("best").read_bytes() == src.run.checkpoint_path("best").read_bytes()
    assert not list(dst.path.glob(".run.tmp-*"))


def _mask(path: Path, seed: int, affine: np.ndarray) -> Path:
    arr = np.random.default_rng(seed).integers(0, 3, size=(12, 10, 8)).astype(np.uint8)
    write_image(arr, affine, path)
    return path


def test_evaluate_cases_equals_evaluate_of_folders(tiny_cell, tmp_path: Path) -> None:
    """A cell's triples (its predictions, the dataset's labels where they are) score exactly what the folder
    front end scores, missing predictions included."""
    cell = tiny_cell()
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    refs = {cid: _mask(tmp_path / "labels" / f"{cid}.nii.gz", i, affine) for i, cid in enumerate(["a", "b", "c"])}
    for i, cid in enumerate(["a", "b"]):
        _mask(cell.predictions_dir / f"{cid}.nii.gz", 10 + i, affine)
    cases = cell.evaluation_cases(refs)
    assert cases[2] == ("c", None, refs["c"])
    labels = {"x": 1, "y": 2}
    by_cases = evaluate_cases(cases, cell.evaluation_dir, labels=labels, allow_missing=True)
    by_folders = evaluate(cell.predictions_dir, tmp_path / "labels", tmp_path / "ev", labels=labels,
                          allow_missing=True)
    pd.testing.assert_frame_equal(by_cases, by_folders)
    assert (cell.evaluation_dir / "metrics.csv").read_text() == (tmp_path / "ev" / "metrics.csv").read_text()
    shutil.rmtree(cell.predictions_dir)
    with pytest.raises(MedseError, match="no prediction for any of the 3 case"):
        evaluate_cases(cell.evaluation_cases(refs), None, labels=labels)
