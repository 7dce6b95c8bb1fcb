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


# ----------------------------------------------------------------------------- figures that agree (issue 21, item 7)
def _legend(ax) -> dict[str, str]:
    """Legend label -> facecolour (hex) of an axes."""
    from matplotlib.colors import to_hex

    leg = ax.get_legend()
    return {t.get_text(): to_hex(h.get_facecolor(), keep_alpha=False)
            for t, h in zip(leg.get_texts(), leg.legend_handles, strict=True)}


def test_one_colour_per_block_in_table_order_across_figures(monkeypatch):
    import test_compare_table as tct

    from medse.compare.figures import block_colors, boxplot_figure, gain_figure

    for table, value in ((tct.SHIFT, 0.03), (tct.PARAMS, 1020), (tct.STEP, 0.12)):
        monkeypatch.setitem(table, "sse", value)

    # records in the order the cells finished (alphabetical cell ids: scse before sse); the table's order is the
    # grid's, as in the demo (none, cse, sse, scse)
    rec = make_records(blocks=("none", "scse", "sse", "cse"))
    order = ["none", "cse", "sse", "scse"]
    table = build_table(rec, n_boot=50, block_order=order)
    assert table.header["blocks"] == order
    palette = block_colors(order)
    assert palette["none"] == "#7f7f7f" and len(set(palette.values())) == 4
    box = boxplot_figure(rec, block_order=table.header["blocks"])
    gain = gain_figure(table)
    box_legend, gain_legend = _legend(box.axes[0]), _legend(gain.axes[0])
    assert list(box_legend) == order and list(gain_legend) == order[1:]  # legends in table order
    assert box_legend == {b: palette[b] for b in order}  # was: sse and scse swapped between the two figures
    assert gain_legend == {b: palette[b] for b in order[1:]}
    # the drawn boxes and bars carry the same colours, in table order
    from matplotlib.colors import to_hex

    boxes = [to_hex(p.get_facecolor(), keep_alpha=False) for p in box.axes[0].patches]
    assert boxes == [palette[b] for b in order]
    bars = [to_hex(p.get_facecolor(), keep_alpha=False) for p in gain.axes[0].patches]
    assert bars == [palette[b] for b in order[1:]]
    # a block without a finite gain does not shift the others' colours
    rows = table.rows.copy()
    rows.loc[rows["block"] == "cse", "gain"] = float("nan")
    table.rows = rows
    assert _legend(gain_figure(table).axes[0]) == {b: palette[b] for b in ("sse", "scse")}


def test_overlay_uses_the_voxel_aspect_and_titles(tmp_path):
    """A 3 x 3.84 mm case: every panel is drawn with aspect 3.84 / 3, not square pixels."""
    from medse.compare.figures import overlay_panels

    shape = (20, 16, 6)
    img = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ref = np.zeros(shape, np.uint8)
    ref[5:12, 4:10, 3] = 1
    affine = np.diag([3.0, 3.84, 5.0, 1.0])
    paths = {}
    for name, arr in (("img", img), ("ref", ref)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), paths[name])
    fig = overlay_panels(paths["img"], paths["ref"], {"none": paths["ref"], "scse": ref})
    axes = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in axes] == ["scan", "reference", "none", "scse"]
    assert all(a.get_aspect() == pytest.approx(3.84 / 3.0) for a in axes)  # was: 1 for every panel
    fig = overlay_panels(paths["img"], paths["ref"], {}, axis=0)
    assert all(a.get_aspect() == pytest.approx(5.0 / 3.84) for a in fig.axes if a.images)
    assert overlay_panels(img, ref, {}).axes[0].get_aspect() == 1.0  # arrays without spacing: square
