"""HD95 conventions (max of directed percentiles vs pooled), one Dice rule for validation and evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist

from medse.evaluation import DICE_BOTH_EMPTY, binary_metrics, dice_scores


def _directed(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Independent transcription: surface = mask minus its binary erosion (scipy's default cross structure, as
    MONAI's edges); Euclidean distances in mm between surface voxel centres by brute force."""
    sa = np.argwhere(a & ~ndi.binary_erosion(a)) * np.asarray(spacing)
    sb = np.argwhere(b & ~ndi.binary_erosion(b)) * np.asarray(spacing)
    d = cdist(sa, sb)
    return d.min(axis=1), d.min(axis=0)


def hd95_max(a, b, spacing) -> float:
    """MONAI's definition: the larger of the two directed 95th percentiles."""
    dab, dba = _directed(a, b, spacing)
    return max(float(np.percentile(dab, 95)), float(np.percentile(dba, 95)))


def hd95_pooled(a, b, spacing) -> float:
    """medpy's definition (medpy.metric.binary.hd95): one 95th percentile of both directed sets pooled."""
    dab, dba = _directed(a, b, spacing)
    return float(np.percentile(np.hstack([dab, dba]), 95))


def _asymmetric_cases():
    """Shapes whose one-sided errors make the two definitions differ."""
    shape = (24, 20, 18)
    ref = np.zeros(shape, bool)
    ref[6:14, 5:13, 4:12] = True
    leak = ref.copy()
    leak[14:21, 7:11, 6:10] = True  # a finger leaking out of one face: errors of pred -> ref only
    shrunk = np.zeros(shape, bool)
    shrunk[7:12, 6:10, 5:9] = True  # inside the reference, off-centre
    ball = np.zeros(shape, bool)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ball[(zz - 11) ** 2 + (yy - 9) ** 2 + (xx - 8) ** 2 <= 20] = True
    far = ball.copy()
    far[1:5, 13:19, 12:17] = True  # a distant blob
    return [("leak", leak, ref, (1.0, 1.0, 1.0)), ("leak-aniso", leak, ref, (0.7, 1.3, 2.0)),
            ("shrunk", shrunk, ref, (1.0, 0.5, 1.5)), ("blob", far, ball, (1.2, 1.0, 0.8))]


@pytest.mark.parametrize("name,pred,ref,spacing", _asymmetric_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_hd95_modes_match_both_definitions(name, pred, ref, spacing) -> None:
    from monai.metrics import compute_hausdorff_distance

    exp_max, exp_pooled = hd95_max(pred, ref, spacing), hd95_pooled(pred, ref, spacing)
    assert exp_pooled < exp_max - 0.05  # the shapes are chosen so that the conventions really differ
    got_max = binary_metrics(pred, ref, spacing)["hd95"]
    got_pooled = binary_metrics(pred, ref, spacing, hd95_mode="pooled")["hd95"]
    assert got_max == pytest.approx(exp_max, abs=1e-5)
    assert got_pooled == pytest.approx(exp_pooled, abs=1e-5)
    monai = float(compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(),
                                             torch.from_numpy(ref)[None, None].float(), include_background=True,
                                             percentile=95, spacing=list(spacing))[0, 0])
    assert got_max == pytest.approx(monai, abs=1e-4)  # the default is MONAI's convention
    dab, dba = _directed(pred, ref, spacing)
    assd = binary_metrics(pred, ref, spacing, hd95_mode="pooled")["assd"]
    assert assd == pytest.approx(np.hstack([dab, dba]).mean(), rel=1e-6)  # ASSD does not depend on the mode


def test_hd95_mode_validated_and_recorded(tmp_path) -> None:
    import json

    import nibabel as nib

    from medse.evaluation import evaluate
    from medse.utils.errors import MedseError

    with pytest.raises(ValueError, match="hd95_mode"):
        binary_metrics(np.ones((3, 3, 3), bool), np.ones((3, 3, 3), bool), (1, 1, 1), hd95_mode="mean")
    _, leak, ref, _ = _asymmetric_cases()[0]
    for folder, arr in (("pred", leak), ("ref", ref)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), str(tmp_path / folder / "a.nii.gz"))
    df = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev", hd95_mode="pooled")
    assert df[df.metric == "hd95"].value.iloc[0] == pytest.approx(hd95_pooled(leak, ref, (1, 1, 1)), abs=1e-5)
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["hd95_mode"] == "pooled"
    with pytest.raises(MedseError, match="hd95_mode"):
        evaluate(tmp_path / "pred", tmp_path / "ref", None, hd95_mode="medpy")


def test_validation_and_evaluation_share_one_dice_rule() -> None:
    from medse.training.validation import dice_per_class, summarise_dice

    ref = np.zeros((6, 6, 6), np.int64)
    pred = np.zeros_like(ref)
    ref[:2] = 1
    pred[:1] = 1
    ref[5, 5, 5] = 2  # class 2 missed; class 3 absent from both
    val = dice_per_class(torch.from_numpy(pred), torch.from_numpy(ref), 4)
    ev = [binary_metrics(pred == c, ref == c, (1, 1, 1))["dice"] for c in (1, 2, 3)]
    assert val == pytest.approx(ev)
    assert val[2] == DICE_BOTH_EMPTY == 1.0 and val[1] == 0.0 and val[0] == pytest.approx(2 * 36 / 108)
    assert dice_scores(pred, ref, [1, 2, 3]) == pytest.approx(ev)
    s = summarise_dice([val], ["a", "b", "c"])
    assert s["dice_c"] == 1.0 and s["dice_mean"] == pytest.approx(np.mean(ev))
    assert not any(math.isnan(v) for v in s.values())
