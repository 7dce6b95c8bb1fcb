"""``medse nnunet compare`` on fake nnU-Net result folders (no nnunetv2 needed): exactly the folds' validation cases
are scored, stray files are listed, the header names only the paired folds, step times are paired per fold."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medse.cli import main

DATASET = "Dataset517_MedseTiny"
CASES = [f"case_{i:03d}" for i in range(6)]
SPLITS = [{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:2] + CASES[4:], "val": CASES[2:4]},
          {"train": CASES[:4], "val": CASES[4:]}]


def _mask(i: int) -> np.ndarray:
    arr = np.zeros((16, 16, 16), np.uint8)
    arr[3 + i % 3: 11, 4:12, 4 + i % 2: 12] = 1
    return arr


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _results(res: Path, plans: str, folds: dict[int, list[str]], step_s: dict[int, float], shift: bool,
             attention: str | None) -> Path:
    model = res / DATASET / f"nnUNetTrainer__{plans}__3d_fullres"
    model.mkdir(parents=True)
    meta = {"plans_name": plans}
    if attention:
        meta["medse"] = {"attention": attention, "source_plans": "nnUNetPlans"}
    (model / "plans.json").write_text(json.dumps(meta))
    for f, cases in folds.items():
        fold = model / f"fold_{f}"
        fold.mkdir()
        (fold / "debug.json").write_text(json.dumps({"num_iterations_per_epoch": 10}))
        (fold / "training_log_2026_1_1_00_00_00.txt").write_text(  # the first epoch (slow, compiling) is left out
            "".join(f"Epoch time: {100 if e == 0 else 10 * step_s[f]} s\n" for e in range(4)))
        for cid in cases:
            arr = _mask(CASES.index(cid))
            _save(np.roll(arr, 1, axis=0) if shift else arr, fold / "validation" / f"{cid}.nii.gz")
    return model


@pytest.fixture
def nnunet_folders(tmp_path: Path) -> tuple[Path, Path]:
    pre = tmp_path / "pre" / DATASET
    pre.mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "file_ending": ".nii.gz",
                                                  "channel_names": {"0": "MR"}, "numTraining": 6}))
    (pre / "splits_final.json").write_text(json.dumps(SPLITS))
    for i, cid in enumerate(CASES):
        _save(_mask(i), pre / "gt_segmentations" / f"{cid}.nii.gz")
    res = tmp_path / "res"
    # baseline: folds 0-2, fold 2 ran on a slow node (10x the step time); scSE: folds 0-1 only, +10% per step
    _results(res, "nnUNetPlans", {0: CASES[:2], 1: CASES[2:4], 2: CASES[4:]}, {0: 1.0, 1: 2.0, 2: 10.0},
             shift=True, attention=None)
    scse = _results(res, "nnUNetPlans_medse_scse", {0: CASES[:2], 1: CASES[2:4]}, {0: 1.1, 1: 2.2}, shift=False,
                    attention="scse")
    # a stray file in scSE's fold-0 validation folder: a case of fold 1 (e.g. copied there by hand)
    _save(_mask(2), scse / "fold_0" / "validation" / "case_002.nii.gz")
    return tmp_path / "pre", res


def test_nnunet_compare_scores_validation_cases_only_and_pairs_folds(nnunet_folders, tmp_path, capsys):
    pre, res = nnunet_folders
    out = tmp_path / "cmp"
    args = ["nnunet", "compare", DATASET, "--plans", "nnUNetPlans,nnUNetPlans_medse_scse", "--folds", "0-2",
            "-o", str(out), "--results", str(res), "--preprocessed", str(pre), "--n-boot", "200", "--no-figures"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # fold 2 has no scSE run: incomplete
    assert "error: the table is incomplete" in captured.err and "--allow-incomplete" in captured.err
    records = pd.read_csv(out / "records.csv")
    dice = records[records["metric"] == "dice"]
    # the stray case_002 in fold 0 is never scored there; fold 2's cases have no scSE partner and are left out
    assert sorted(dice.loc[dice["fold"] == 0, "case_id"].unique()) == CASES[:2]
    assert sorted(dice.loc[dice["fold"] == 2, "case_id"].unique()) == CASES[4:]  # scored, but unpaired
    md = (out / "table.md").read_text()
    assert "present for every plans (folds 0, 1;" in md and "folds: 0, 1; seeds: -" in md  # not fold 2
    assert "Extra files in validation folders, not validation cases of their fold (not scored): " \
           "nnUNetPlans_medse_scse: fold 0: case_002." in md
    assert "scse vs none on fold(s) 0, 1: 1.650 s vs 1.500 s, paired overhead median +10.0%, " \
           "range [+10.0%, +10.0%]" in md
    assert "Unmatched runs, left out of the rows that lack them: nnU-Net 3d_fullres: run fold 2 has no records " \
           "for scse" in md
    rows = pd.read_csv(out / "table.csv").set_index("block")
    assert list(rows["runs"]) == ["folds 0, 1", "folds 0, 1"] and (rows["n_cases"] == 4).all()
    assert rows.loc["scse", "gain"] > 0
    assert rows.loc["none", "train_step_s"] == pytest.approx(1.5)  # the paired folds, not the slow fold 2
    missing = json.loads((out / "missing.json").read_text())
    assert missing["extra"] == {"nnUNetPlans_medse_scse": {"0": ["case_002"]}} and missing["folds_paired"] == [0, 1]
    assert main([*args, "--allow-incomplete"]) == 0


def test_nnunet_compare_needs_the_splits(nnunet_folders, tmp_path, capsys):
    pre, res = nnunet_folders
    (pre / DATASET / "splits_final.json").unlink()
    rc = main(["nnunet", "compare", DATASET, "--plans", "nnUNetPlans,nnUNetPlans_medse_scse", "-o",
               str(tmp_path / "c"), "--results", str(res), "--preprocessed", str(pre)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "splits_final.json" in err
