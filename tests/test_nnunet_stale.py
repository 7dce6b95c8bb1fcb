"""``medse nnunet compare`` refuses folds trained with other plans than the ones its table names.

medse does not train nnU-Net folds (the user runs ``nnUNetv2_train``), so there is no reuse of finished folds to
guard; what can go stale is the comparison: nnU-Net rewrites the results folder's ``plans.json`` at every fold's
start, while each fold records the plans it was trained with in its own ``debug.json`` (``plans_manager``, the
repr of the plans dict). A fold trained before the plans were re-derived must not be scored under the new block.
Fake result folders as in ``test_compare_nnunet`` (no nnunetv2 needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_compare_nnunet as tcn
from test_compare_nnunet import nnunet_folders  # noqa: F401 - the fake result folders, a fixture

from medse.cli import main

PLANS = "nnUNetPlans,nnUNetPlans_medse_scse"


def _record_plans(fold: Path, plans: dict) -> None:
    """Write the fold's ``debug.json`` the way nnU-Net does: ``str()`` of every trainer attribute."""
    debug = json.loads((fold / "debug.json").read_text())
    debug["plans_manager"] = str(plans)  # PlansManager.__repr__ is the plans dict's repr
    (fold / "debug.json").write_text(json.dumps(debug))


@pytest.fixture
def folders(nnunet_folders: tuple[Path, Path]) -> tuple[Path, Path]:  # noqa: F811
    """The fake results, each fold recording (in debug.json) the plans of its results folder: all fresh."""
    pre, res = nnunet_folders
    for model in (res / tcn.DATASET).iterdir():
        current = json.loads((model / "plans.json").read_text())
        for fold in model.glob("fold_*"):
            _record_plans(fold, current)
    return pre, res


def _compare(pre: Path, res: Path, out: Path, folds: str) -> int:
    return main(["nnunet", "compare", tcn.DATASET, "--plans", PLANS, "--folds", folds, "-o", str(out),
                 "--results", str(res), "--preprocessed", str(pre), "--n-boot", "50", "--no-figures"])


def test_fold_trained_with_older_plans_is_refused(folders, tmp_path, capsys):
    pre, res = folders
    scse = res / tcn.DATASET / "nnUNetTrainer__nnUNetPlans_medse_scse__3d_fullres"
    # fold 1 was trained before the plans were re-derived with scSE instead of cSE
    old = json.loads((scse / "plans.json").read_text())
    old["medse"]["attention"] = "cse"
    _record_plans(scse / "fold_1", old)
    rc = _compare(pre, res, tmp_path / "cmp", "0-1")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "fold 1 was trained with other plans" in err and 'medse.attention: "cse" -> "scse"' in err
    assert "nnUNetv2_train 517 3d_fullres 1 -tr nnUNetTrainer -p nnUNetPlans_medse_scse" in err
    assert str(scse / "fold_1" / "debug.json") in err
    assert not (tmp_path / "cmp" / "records.csv").exists()  # refused before anything was scored or written
    # the fresh fold alone is compared
    assert _compare(pre, res, tmp_path / "cmp0", "0") == 0
    # once retrained (the fold's record equals the plans again) the pair is compared
    _record_plans(scse / "fold_1", json.loads((scse / "plans.json").read_text()))
    assert _compare(pre, res, tmp_path / "cmp1", "0-1") == 0


def test_results_trained_on_another_dataset_fingerprint_are_refused(folders, tmp_path, capsys):
    pre, res = folders
    base = res / tcn.DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (pre / tcn.DATASET / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [[1, 1, 1]] * 6}))
    (base / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [[1, 1, 1]] * 5}))
    rc = _compare(pre, res, tmp_path / "cmp", "0-1")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "plans nnUNetPlans was trained on another dataset fingerprint" in err and "spacings:" in err
