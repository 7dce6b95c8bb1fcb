"""Figures from synthetic per-case records and small volumes."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medse.compare.figures import dice_boxplot, gain_barchart, load_volume, overlay_figure, pick_example_case
from medse.compare.records import cell_rows
from medse.compare.table import build_table
from medse.utils.errors import MedseError

sys.path.insert(0, str(Path(__file__).parent))
from test_compare_table import make_records  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_boxplot_and_gain_chart(tmp_path):
    rec = make_records(archs=("unet", "sdnet"))
    box = dice_boxplot(rec, tmp_path / "box.png")
    assert box.read_bytes()[:8] == PNG_MAGIC and box.stat().st_size < 200_000
    w, h = _png_size(box)
    assert w > 300 and h > 200
    t = build_table(rec, n_boot=300)
    bar = gain_barchart(t, tmp_path / "gain.png")
    assert bar.read_bytes()[:8] == PNG_MAGIC and bar.stat().st_size < 200_000
    struct = dice_boxplot(rec, tmp_path / "liver.png", structure="liver")
    assert struct.is_file()
    hd = build_table(rec, metric="hd95", n_boot=50)  # distance tables plot too (gain = reduction in mm)
    assert hd.header["gain_unit"] == "mm" and gain_barchart(hd, tmp_path / "gain_hd95.png").is_file()
    assert dice_boxplot(rec, tmp_path / "hd95.png", metric="hd95").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_figures_errors(tmp_path):
    rec = make_records(blocks=("scse",), seeds=(0,))
    with pytest.raises(MedseError, match="no gains"):
        gain_barchart(build_table(rec, n_boot=10), tmp_path / "g.png")
    with pytest.raises(MedseError, match="no per-case"):
        dice_boxplot(rec[rec["metric"] != "dice"], tmp_path / "b.png")
    assert not (tmp_path / "g.png").exists()


def test_pick_example_case_is_median_gain():
    ev = lambda vals: pd.DataFrame([  # noqa: E731
        {"case_id": f"c{i}", "label": "fg", "label_value": 1, "metric": "dice", "value": v}
        for i, v in enumerate(vals)])
    base = cell_rows(ev([0.5, 0.5, 0.5, 0.5, 0.5]), arch="u", block="none", fold=0, seed=0)
    blk = cell_rows(ev([0.9, 0.51, 0.55, 0.60, 0.2]), arch="u", block="scse", fold=0, seed=0)
    # gains .4 .01 .05 .10 -.3 -> median .05 -> c2
    assert pick_example_case(pd.concat([base, blk]), "u", "none", "scse") == "c2"
    with pytest.raises(MedseError):
        pick_example_case(base, "u", "none", "scse")


def test_overlay_from_files(tmp_path):
    rng = np.random.default_rng(0)
    shape = (20, 18, 16)
    img = rng.normal(size=shape).astype(np.float32)
    ref = np.zeros(shape, np.uint8)
    ref[5:12, 4:10, 9] = 1
    ref[5:8, 4:6, 3:6] = 2
    pred = ref.copy()
    pred[5:7] = 0
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    paths = {}
    for name, arr in (("img", img), ("ref", ref), ("pred", pred)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), paths[name])
    np.testing.assert_array_equal(load_volume(paths["ref"]), ref)
    out = overlay_figure(paths["img"], paths["ref"], {"none": paths["pred"], "scse": ref}, tmp_path / "ov.png",
                         title="case", label_names={"background": 0, "liver": 1, "spleen": 2})
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size < 200_000
    w, h = _png_size(out)
    assert w > 2.5 * h  # four panels side by side (plus the legend row)
    with pytest.raises(MedseError, match="shape"):
        overlay_figure(img, ref, {"bad": np.zeros((2, 2, 2))}, tmp_path / "x.png")
    with pytest.raises(MedseError, match="slice index"):
        overlay_figure(img, ref, {}, tmp_path / "x.png", slice_index=99)
    with pytest.raises(MedseError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")
