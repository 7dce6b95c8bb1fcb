"""Evaluation: hand-computed metrics, MONAI agreement, the empty-mask rule, files written, grid mismatches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist

from medse.evaluation import METRICS, binary_metrics, evaluate
from medse.testing import make_affine
from medse.utils import atomic
from medse.utils.errors import MedseError


def _cube(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Independent transcription: surface = mask minus its erosion; Euclidean distances in mm by brute force."""
    sa = np.argwhere(a & ~ndi.binary_erosion(a)) * np.asarray(spacing)
    sb = np.argwhere(b & ~ndi.binary_erosion(b)) * np.asarray(spacing)
    d = cdist(sa, sb)
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.5, 1.5)])
def test_offset_cubes_known_dice_and_surface_distances(spacing) -> None:
    a = _cube((20, 16, 16), (4, 4, 4), (12, 12, 12))
    b = _cube((20, 16, 16), (6, 4, 4), (14, 12, 12))  # shifted 2 voxels along x
    m = binary_metrics(a, b, spacing)
    assert m["dice"] == pytest.approx(2 * 6 * 8 * 8 / (2 * 512))  # 0.75
    # every surface voxel lies within 2 voxels along x of the other surface, and the x=4 face is at exactly 2
    assert m["hd95"] == pytest.approx(2 * spacing[0], abs=1e-5)
    dab, dba = _surface_distances(a, b, spacing)
    assert m["assd"] == pytest.approx((dab.sum() + dba.sum()) / (dab.size + dba.size), rel=1e-5)
    assert m["volume_ref_mm3"] == pytest.approx(512 * np.prod(spacing))
    assert m["volume_diff_mm3"] == 0.0 and m["volume_diff_pct"] == 0.0


def test_parallel_plates_hand_computed() -> None:
    a = np.zeros((9, 5, 5), bool)
    b = np.zeros((9, 5, 5), bool)
    a[3] = True
    b[5, :, :3] = True  # 15 voxels vs 25
    m = binary_metrics(a, b, (0.5, 1.0, 1.0))
    assert m["dice"] == 0.0
    # b -> a: every b voxel is exactly 2 voxels (1 mm) from a; a -> b: distances sqrt(1 + dz^2), dz = 0, 1, 2
    dz = np.array([0, 0, 0, 1, 2])  # columns z = 0..4 against b's z = 0..2
    d_ab = np.tile(np.sqrt(1.0 + dz.astype(float) ** 2), 5)
    expect = (d_ab.sum() + 15 * 1.0) / (25 + 15)
    assert m["assd"] == pytest.approx(expect, rel=1e-5)
    assert m["volume_diff_mm3"] == pytest.approx((25 - 15) * 0.5)  # prediction a minus reference b
    assert m["volume_diff_pct"] == pytest.approx(100.0 * 10 / 15)


def test_empty_rule() -> None:
    z = np.zeros((6, 6, 6), bool)
    one = z.copy()
    one[2:4, 2:4, 2:4] = True
    both = binary_metrics(z, z, (1, 1, 1))
    assert (both["dice"], both["hd95"], both["assd"], both["volume_diff_pct"]) == (1.0, 0.0, 0.0, 0.0)
    for p, r in ((one, z), (z, one)):
        m = binary_metrics(p, r, (1, 1, 1))
        # one empty: the documented worst value, the grid diagonal sqrt(3 * 5^2) mm
        assert m["dice"] == 0.0 and m["hd95"] == m["assd"] == pytest.approx(math.sqrt(75))
    assert binary_metrics(one, z, (2.0, 1.0, 0.5))["hd95"] == pytest.approx(math.sqrt(100 + 25 + 6.25))
    assert math.isnan(binary_metrics(one, z, (1, 1, 1))["volume_diff_pct"])
    assert binary_metrics(z, one, (1, 1, 1))["volume_diff_pct"] == -100.0


def _save(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))
    return path


def test_evaluate_writes_long_csv_summary_and_matches_monai_dice(tmp_path: Path) -> None:
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    aff = make_affine("anisotropic")
    preds, refs = {}, {}
    for i in range(3):
        ref = np.zeros((16, 14, 12), np.uint8)
        ref[3:10, 3:9, 2:8] = 1
        ref[10:14, 4:10, 3:9] = 2
        pred = ref.copy()
        flip = rng.random(ref.shape) < 0.15
        pred[flip] = rng.integers(0, 3, size=int(flip.sum()))
        if i == 2:
            pred[pred == 2] = 0  # label 2 missed entirely in case 2
        refs[f"c{i}"], preds[f"c{i}"] = ref, pred
        _save(tmp_path / "ref" / f"c{i}.nii.gz", ref, aff)
        _save(tmp_path / "pred" / f"c{i}.nii.gz", pred, aff)
    (tmp_path / "pred" / "c0.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "mass": 2}}))
    (tmp_path / "pred" / "failures.csv").write_text("case_id,inputs,error\n")
    df = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev")
    assert list(df.columns) == ["case_id", "label", "label_value", "metric", "value"]
    assert len(df) == 3 * 2 * len(METRICS)
    assert set(df.label) == {"kidney", "mass"}
    on_disk = pd.read_csv(tmp_path / "ev" / "metrics.csv")
    assert len(on_disk) == len(df)
    # Dice equals monai.metrics.DiceMetric on the same arrays
    metric = DiceMetric(include_background=False, reduction="none")
    for cid in ("c0", "c1"):
        p = one_hot(torch.from_numpy(preds[cid].astype(np.int64))[None, None], 3)
        r = one_hot(torch.from_numpy(refs[cid].astype(np.int64))[None, None], 3)
        expect = metric(p, r)[0].numpy()
        got = df[(df.case_id == cid) & (df.metric == "dice")].sort_values("label_value").value.to_numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-6)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    mass = summary["labels"]["mass"]
    assert mass["n_empty"] == 1 and mass["n_both_empty"] == 0 and mass["hd95"]["n_nan"] == 0
    diag = float(np.linalg.norm((np.array([16, 14, 12]) - 1) * np.linalg.norm(aff[:3, :3], axis=0)))
    missed = df[(df.case_id == "c2") & (df.label == "mass")].set_index("metric").value
    assert missed["hd95"] == pytest.approx(diag) and missed["assd"] == pytest.approx(diag)  # counted, not dropped
    hd_mass = df[(df.label == "mass") & (df.metric == "hd95")].value.to_numpy()
    assert mass["hd95"]["mean"] == pytest.approx(hd_mass.mean()) and mass["hd95"]["n"] == 3
    dice_mass = df[(df.label == "mass") & (df.metric == "dice")].value.to_numpy()
    assert mass["dice"]["mean"] == pytest.approx(dice_mass.mean())
    assert mass["dice"]["std"] == pytest.approx(dice_mass.std(ddof=1))
    assert mass["dice"]["median"] == pytest.approx(np.median(dice_mass))
    fg = df[df.metric == "dice"].groupby("case_id").value.mean()
    assert summary["foreground"]["dice"]["mean"] == pytest.approx(fg.mean())
    assert summary["num_cases"] == 3 and summary["missing_predictions"] == [] and summary["hd95_mode"] == "max"
    assert "both empty" in summary["empty_rule"]


def test_mismatched_grids_name_both_files(tmp_path: Path) -> None:
    a = np.zeros((8, 8, 8), np.uint8)
    a[2:5, 2:5, 2:5] = 1
    _save(tmp_path / "ref" / "x.nii.gz", a, np.eye(4))
    _save(tmp_path / "pred" / "x.nii.gz", a, np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(MedseError) as ei:
        evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev")
    msg = str(ei.value)
    assert str(tmp_path / "pred" / "x.nii.gz") in msg and str(tmp_path / "ref" / "x.nii.gz") in msg
    _save(tmp_path / "pred" / "x.nii.gz", np.zeros((8, 8, 9), np.uint8), np.eye(4))
    with pytest.raises(MedseError, match="different voxel grids"):
        evaluate(tmp_path / "pred", tmp_path / "ref", None)
    with pytest.raises(MedseError, match="no prediction matches"):
        _save(tmp_path / "pred2" / "y.nii.gz", a, np.eye(4))
        evaluate(tmp_path / "pred2", tmp_path / "ref", None)


def test_cli_evaluate(tmp_path: Path, capsys) -> None:
    from medse.cli import main

    a = np.zeros((8, 8, 8), np.uint8)
    a[2:6, 2:6, 2:6] = 1
    b = np.zeros_like(a)
    b[3:7, 2:6, 2:6] = 1
    _save(tmp_path / "ref" / "x.nii.gz", a, np.eye(4))
    _save(tmp_path / "pred" / "x.nii.gz", b, np.eye(4))
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--output",
               str(tmp_path / "ev"), "--labels", "1", "--no-progress"])
    assert rc == 0
    assert "1 cases (0 without prediction, scored Dice 0), mean foreground Dice 0.7500" in capsys.readouterr().out
    assert (tmp_path / "ev" / "metrics.csv").is_file() and (tmp_path / "ev" / "summary.json").is_file()


def test_labels_found_in_any_case_when_none_declared(tmp_path: Path) -> None:
    a = np.zeros((8, 8, 8), np.uint8)
    a[1:3, 1:3, 1:3] = 1
    b = a.copy()
    b[5:7, 5:7, 5:7] = 3  # label 3 only in the second case
    for cid, arr in (("a", a), ("b", b)):
        _save(tmp_path / "ref" / f"{cid}.nii.gz", arr, np.eye(4))
        _save(tmp_path / "pred" / f"{cid}.nii.gz", arr, np.eye(4))
    df = evaluate(tmp_path / "pred", tmp_path / "ref", None)
    assert sorted(set(df.label_value)) == [1, 3]
    both_empty = df[(df.case_id == "a") & (df.label_value == 3)].set_index("metric").value
    assert both_empty["dice"] == 1.0 and both_empty["hd95"] == 0.0


# ----------------------------------------------------------------------------- missing / extra predictions (item 8)
def _three_refs_one_pred(tmp_path: Path) -> np.ndarray:
    a = np.zeros((8, 8, 8), np.uint8)
    a[2:6, 2:6, 2:6] = 1
    for cid in ("a", "b", "c"):
        _save(tmp_path / "ref" / f"{cid}.nii.gz", a, np.eye(4))
    _save(tmp_path / "pred" / "a.nii.gz", a, np.eye(4))  # perfect prediction of a; b and c have none
    _save(tmp_path / "pred" / "zz_extra.nii.gz", a, np.eye(4))  # a prediction without a reference
    return a


def test_missing_predictions_are_failures_scored_worst(tmp_path: Path) -> None:
    _three_refs_one_pred(tmp_path)
    with pytest.warns(UserWarning, match="zz_extra"):
        with pytest.raises(MedseError, match=r"2 reference case\(s\) have no prediction \(b, c\)"):
            evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev")
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())  # written before raising
    assert summary["missing_predictions"] == ["b", "c"] and summary["num_missing"] == 2
    assert summary["num_cases"] == 3 and summary["num_evaluated"] == 1
    assert summary["extra_predictions"] == ["zz_extra"]
    fg = summary["foreground"]["dice"]
    assert fg["mean"] == pytest.approx(1 / 3) and fg["n"] == 3  # not "1 case, Dice 1.0"
    lab = summary["labels"]["1"]
    assert lab["n_missing"] == 2 and lab["n_empty"] == 0
    assert lab["hd95"]["mean"] == pytest.approx(2 * math.sqrt(3 * 49) / 3)  # 0, diagonal, diagonal
    df = pd.read_csv(tmp_path / "ev" / "metrics.csv")
    b = df[df.case_id == "b"].set_index("metric").value
    assert b["dice"] == 0.0 and b["hd95"] == pytest.approx(math.sqrt(3 * 49)) and b["volume_ref_mm3"] == 64
    assert "zz_extra" not in set(df.case_id)
    with pytest.warns(UserWarning):
        ok = evaluate(tmp_path / "pred", tmp_path / "ref", None, allow_missing=True)
    assert sorted(ok.case_id.unique()) == ["a", "b", "c"]


def test_cli_evaluate_missing_exit_1_unless_allowed(tmp_path: Path, capsys) -> None:
    from medse.cli import main

    _three_refs_one_pred(tmp_path)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--output",
            str(tmp_path / "ev"), "--no-progress"]
    assert main(args) == 1
    out = capsys.readouterr()
    assert "3 cases (2 without prediction, scored Dice 0), mean foreground Dice 0.3333" in out.out
    assert "missing prediction: b" in out.err and "missing prediction: c" in out.err
    assert "warning:" in out.err and "zz_extra" in out.err and "Traceback" not in out.err
    assert main([*args, "--allow-missing"]) == 0


def test_output_folder_checked_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import medse.evaluation.runner as runner

    _three_refs_one_pred(tmp_path)
    called = []
    monkeypatch.setattr(runner, "_read_label", lambda *a, **k: called.append(1))  # no image may be read
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MedseError, match="exists and is not a folder") as ei:
        evaluate(tmp_path / "pred", tmp_path / "ref", blocker)
    assert str(blocker) in str(ei.value)
    with pytest.raises(MedseError, match="cannot (create|write into) the output folder") as ei:
        evaluate(tmp_path / "pred", tmp_path / "ref", blocker / "sub")
    assert str(blocker / "sub") in str(ei.value) and "\n" not in str(ei.value)

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic, "_create_temp", deny)  # a read-only folder (works as root too)
    with pytest.raises(MedseError, match="cannot write into the output folder \\(Permission denied\\)"):
        evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "ro")
    assert called == []
    with pytest.raises(MedseError, match="prediction folder not found"):  # wrong inputs create no output folder
        evaluate(tmp_path / "nope", tmp_path / "ref", tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- labels that make numbers lie (issue 21)
def _save_int(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.int16), np.eye(4)), str(path))
    return path


def _two_cases(tmp_path: Path, extra_ref_values: dict[int, int] | None = None) -> None:
    """Two cases with label 1 (prediction shifted by one voxel); ``extra_ref_values``: value -> voxels painted
    into the first reference only (labels present in references that may not be scored)."""
    for i, cid in enumerate(("a", "b")):
        ref = np.zeros((10, 10, 10), np.int16)
        ref[2:6, 2:6, 2:6] = 1
        pred = np.zeros_like(ref)
        pred[3:7, 2:6, 2:6] = 1
        if i == 0:
            for k, (v, n) in enumerate((extra_ref_values or {}).items()):
                ref[8, k, :n] = v
        _save_int(tmp_path / "ref" / f"{cid}.nii.gz", ref)
        _save_int(tmp_path / "pred" / f"{cid}.nii.gz", pred)


def _cli_eval(tmp_path: Path, *extra: str) -> int:
    from medse.cli import main

    return main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--output",
                 str(tmp_path / "ev"), "--no-progress", *extra])


def test_cli_label_in_no_mask_is_an_error_not_dice_1(tmp_path: Path, capsys) -> None:
    _two_cases(tmp_path)
    assert _cli_eval(tmp_path, "--labels", "1,9") == 2  # was: exit 0, Dice 1 for label 9, mean 0.375 -> 0.69
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "9" in lines[0] and "no reference and no prediction" in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "ev" / "metrics.csv").exists() and not (tmp_path / "ev" / "summary.json").exists()
    assert _cli_eval(tmp_path, "--labels", "1") == 0
    assert "mean foreground Dice 0.7500" in capsys.readouterr().out


def test_cli_unscored_reference_labels_listed_and_fail_unless_allowed(tmp_path: Path, capsys) -> None:
    _two_cases(tmp_path, {9: 5, -1: 3})
    assert _cli_eval(tmp_path, "--labels", "1") == 1  # was: exit 0, labels 9 and -1 ignored silently
    err = capsys.readouterr().err
    assert "not scored" in err and "9 (5 voxels in 1 case)" in err and "-1 (3 voxels in 1 case)" in err, err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["unscored_labels"] == {"-1": {"voxels": 3, "cases": 1}, "9": {"voxels": 5, "cases": 1}}
    assert _cli_eval(tmp_path, "--labels", "1", "--allow-unscored-labels") == 0
    assert "warning: references hold label value(s) that are not scored" in capsys.readouterr().err
    with pytest.raises(MedseError, match=r"not scored: -1 \(3 voxels in 1 case\), 9 \(5 voxels"):
        evaluate(tmp_path / "pred", tmp_path / "ref", None, labels=[1])


def test_cli_summary_counts_cases_absent_from_both_masks(tmp_path: Path, capsys) -> None:
    _two_cases(tmp_path, {2: 4})  # label 2 only in case a's reference: absent from both masks in case b
    assert _cli_eval(tmp_path, "--labels", "1,2") == 0
    out = capsys.readouterr().out
    assert "label 2 (2): mean Dice 0.5000 over 2 cases; absent from both masks in 1 (Dice 1 by convention)" in out
    assert "label 1 (1): mean Dice 0.7500 over 2 cases; absent from both masks in 0" in out


def test_declared_label_in_no_mask_is_dropped_with_a_warning(tmp_path: Path) -> None:
    _two_cases(tmp_path)
    (tmp_path / "ref" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "gone": 7}}))
    with pytest.warns(UserWarning, match="7 \\('gone'\\) occur in no reference"):
        df = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev")
    assert set(df.label) == {"organ"}
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["foreground"]["dice"]["mean"] == 0.75
