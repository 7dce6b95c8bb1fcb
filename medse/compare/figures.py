"""Figures of a comparison: per-case Dice box plots, gain bar chart with CIs, example-slice overlays.

All figures are pure functions of the per-case records (and, for the overlay, of image files), drawn with
matplotlib's Agg backend (no display needed) and written atomically as PNG. Each ``*_figure`` function returns
the matplotlib ``Figure`` (tests inspect it); the function without the suffix draws and saves it.

* Colours: one colour per block in every figure of a comparison (box plot, gain chart, the search's final
  figures, ``medse explain``), all from :func:`block_colors` applied to the table's block order (baseline grey,
  then matplotlib's ``tab10`` in table order); legends list the blocks in table order.
* Slices are drawn with the voxel aspect (:func:`slice_aspect`): a 3 x 3.84 mm grid is not shown square.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medse.compare.records import case_scores, validate_records
from medse.evaluation.metrics import get_metric
from medse.utils.atomic import atomic_path
from medse.utils.errors import MedseError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from medse.compare.table import ComparisonTable

__all__ = ["block_colors", "boxplot_figure", "dice_boxplot", "gain_barchart", "gain_figure", "load_volume",
           "overlay_figure", "overlay_panels", "pick_example_case", "slice_aspect", "voxel_spacing"]

#: the baseline's colour (grey), then matplotlib's tab10 without its grey, for the other blocks in table order
BASELINE_COLOR = "#7f7f7f"
_BLOCK_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                 "#17becf"]


def block_colors(blocks: Sequence[str], baseline: str = "none") -> dict[str, str]:
    """The one palette of medse's figures: block -> colour, for ``blocks`` in table order.

    ``baseline`` is grey; the other blocks take tab10's colours in the order given (cycling after nine), so the
    box plot, the gain chart and the gate maps of a comparison give every block the same colour when they are
    passed the table's order (``ComparisonTable.header["blocks"]``).
    """
    out: dict[str, str] = {}
    k = 0
    for b in blocks:
        if b in out:
            continue
        if b == baseline:
            out[b] = BASELINE_COLOR
        else:
            out[b] = _BLOCK_COLORS[k % len(_BLOCK_COLORS)]
            k += 1
    return out


def slice_aspect(spacing: Sequence[float] | None, axis: int) -> float:
    """``imshow`` aspect (pixel height / width) of a slice along ``axis`` drawn as :func:`_slice` lays it out
    (rows: the later remaining axis, columns: the earlier), from the voxel ``spacing`` in mm (1 when unknown)."""
    if spacing is None:
        return 1.0
    cols, rows = (i for i in range(3) if i != axis)
    return float(spacing[rows]) / float(spacing[cols])


def _figure(figsize: tuple[float, float], layout: str | None = None) -> Any:
    """A matplotlib Figure on an Agg canvas, outside pyplot (no global backend switch, no display needed);
    ``layout="constrained"`` keeps titles, colour bars and legends from overlapping."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return path


def _ordered(values: Sequence[str], first: str | None = None) -> list[str]:
    out: list[str] = []
    for v in values:
        if v not in out:
            out.append(v)
    if first in out:
        out = [first] + [v for v in out if v != first]
    return out


def _table_order(present: Sequence[str], block_order: Sequence[str] | None, baseline: str) -> list[str]:
    """``block_order`` (the table's), then blocks it does not name in order of appearance; baseline first."""
    return _ordered([*(block_order or ()), *present], first=baseline)


def dice_boxplot(
    records: pd.DataFrame,
    path: str | os.PathLike,
    *,
    metric: str = "dice",
    structure: str | None = None,
    baseline: str = "none",
    block_order: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Box plots of the per-case foreground Dice per architecture x block, with the cases as dots.

    Args:
        records: per-case records (:mod:`medse.compare.records`).
        path: PNG to write.
        metric: evaluation metric. Defaults to ``"dice"``.
        structure: one label name, or None for the foreground mean. Defaults to None.
        baseline: block drawn first in each group. Defaults to ``"none"``.
        block_order: the table's block order (``ComparisonTable.header["blocks"]``): boxes, legend and colours
            (:func:`block_colors`) follow it. Defaults to the order of appearance in ``records``, baseline first.
        title: figure title. Defaults to a description of the metric.
        dpi: resolution. Defaults to 100.
    """
    fig = boxplot_figure(records, metric=metric, structure=structure, baseline=baseline, block_order=block_order,
                         title=title)
    return _save(fig, path, dpi)


def boxplot_figure(
    records: pd.DataFrame,
    *,
    metric: str = "dice",
    structure: str | None = None,
    baseline: str = "none",
    block_order: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """The ``Figure`` of :func:`dice_boxplot` (same arguments, no path)."""
    from matplotlib.patches import Rectangle

    rec = validate_records(records)
    sc = case_scores(rec, metric=metric, structure=structure)
    if sc.empty:
        raise MedseError(f"no per-case '{metric}' values to plot")
    archs = _ordered(sc["arch"].tolist())
    order = _table_order(rec["block"].tolist(), block_order, baseline)
    colors = block_colors(order, baseline)
    present = set(rec["block"].tolist())
    blocks = [b for b in order if b in present]
    width = 0.8 / max(1, len(blocks))
    fig = _figure((max(4.0, 1.2 + 0.55 * len(archs) * len(blocks)), 3.6))
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ai, arch in enumerate(archs):
        for bi, block in enumerate(blocks):
            v = sc[(sc["arch"] == arch) & (sc["block"] == block)]["value"].to_numpy(dtype=float)
            if v.size == 0:
                continue
            pos = ai + (bi - (len(blocks) - 1) / 2) * width
            bp = ax.boxplot([v], positions=[pos], widths=width * 0.8, patch_artist=True, showfliers=False)
            for patch in bp["boxes"]:
                patch.set_facecolor(colors[block])
                patch.set_alpha(0.45)
            for med in bp["medians"]:
                med.set_color("black")
            ax.scatter(pos + rng.uniform(-width * 0.25, width * 0.25, v.size), v, s=8, color=colors[block],
                       edgecolors="black", linewidths=0.3, zorder=3)
    ax.set_xticks(range(len(archs)))
    ax.set_xticklabels(archs)
    ax.set_xlim(-0.6, len(archs) - 0.4)
    ax.set_ylabel(f"{metric} per case" + (f" ({structure})" if structure else " (foreground mean)"))
    ax.set_title(title or f"Per-case {metric} by architecture and block")
    handles = [Rectangle((0, 0), 1, 1, facecolor=colors[b], alpha=0.45, edgecolor="black") for b in blocks]
    ax.legend(handles, blocks, fontsize=8, ncol=min(len(blocks), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def gain_barchart(
    table: ComparisonTable | pd.DataFrame,
    path: str | os.PathLike,
    *,
    structure: str = "foreground",
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Bar chart of the mean paired gain over the baseline per architecture x block with bootstrap CIs (Dice
    points, or mm of HD95/ASSD improvement, as the table's ``header["metric"]``; positive is better).

    Args:
        table: a :class:`~medse.compare.table.ComparisonTable` or its ``rows`` frame.
        path: PNG to write.
        structure: which structure's rows to plot. Defaults to ``"foreground"``.
        title: figure title. Defaults to a description.
        dpi: resolution. Defaults to 100.
    """
    return _save(gain_figure(table, structure=structure, title=title), path, dpi)


def gain_figure(table: ComparisonTable | pd.DataFrame, *, structure: str = "foreground",
                title: str | None = None) -> Any:
    """The ``Figure`` of :func:`gain_barchart` (bars, legend and colours in the table's block order)."""
    rows = table if not hasattr(table, "rows") else table.rows
    header = getattr(table, "header", {}) or {}
    baseline = header.get("baseline", "none")
    order = _table_order(rows["block"].tolist(), header.get("blocks"), baseline)  # before dropping NaN gains
    colors = block_colors(order, baseline)
    rows = rows[(rows["structure"] == structure) & (rows["block"] != baseline)]
    rows = rows[np.isfinite(rows["gain"].to_numpy(dtype=float))]
    if rows.empty:
        raise MedseError("no gains to plot (the table has no block paired with its baseline)")
    archs = _ordered(rows["arch"].tolist())
    present = set(rows["block"].tolist())
    blocks = [b for b in order if b in present]
    width = 0.8 / max(1, len(blocks))
    fig = _figure((max(4.0, 1.2 + 0.55 * len(archs) * len(blocks)), 3.4))
    ax = fig.subplots()
    for ai, arch in enumerate(archs):
        for bi, block in enumerate(blocks):
            r = rows[(rows["arch"] == arch) & (rows["block"] == block)]
            if r.empty:
                continue
            r = r.iloc[0]
            g = float(r["gain"])
            lo, hi = float(r["ci_low"]), float(r["ci_high"])
            pos = ai + (bi - (len(blocks) - 1) / 2) * width
            err = None
            if math.isfinite(lo) and math.isfinite(hi):
                err = np.array([[max(0.0, g - lo)], [max(0.0, hi - g)]])
            ax.bar(pos, g, width=width * 0.9, color=colors[block], alpha=0.8, yerr=err, capsize=3, ecolor="black")
            p = float(r.get("p_holm", float("nan")))
            if math.isfinite(p) and p < 0.05:
                ax.text(pos, (hi if math.isfinite(hi) else g) + 0.1, "*", ha="center", va="bottom", fontsize=10)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(archs)))
    ax.set_xticklabels(archs)
    ax.set_xlim(-0.6, len(archs) - 0.4)
    metric = get_metric(header.get("metric", "dice"))
    ax.set_ylabel(f"{metric.gain_label} over '{baseline}' ({header.get('gain_unit', metric.gain_unit)})")
    ax.set_title(title or "Mean paired gain with 95% bootstrap CI (* Holm p < 0.05)", fontsize=10)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, facecolor=colors[b], alpha=0.8) for b in blocks]  # one per block, always
    ax.legend(handles, blocks, fontsize=8, frameon=False, ncol=min(len(blocks), 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    return fig


def load_volume(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into an array in (x, y, z[, c]) voxel order (nibabel for NIfTI, else SimpleITK)."""
    path = Path(path)
    if not path.is_file():
        raise MedseError("image not found", path)
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return np.asanyarray(nib.load(str(path)).dataobj)
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        return np.transpose(arr, tuple(range(arr.ndim))[::-1]) if arr.ndim <= 3 else arr
    except Exception as e:
        raise MedseError(f"cannot read image ({type(e).__name__}: {e})", path) from e


def voxel_spacing(path: str | os.PathLike) -> tuple[float, float, float]:
    """Voxel size in mm of an image file along its first three voxel axes (column norms of the affine for NIfTI,
    so oblique grids are measured correctly; SimpleITK's spacing otherwise), read from the header only."""
    path = Path(path)
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            norms = np.linalg.norm(np.asarray(nib.load(str(path)).affine)[:3, :3], axis=0)
            return float(norms[0]), float(norms[1]), float(norms[2])
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        sp = [*reader.GetSpacing(), 1.0, 1.0][:3]
        return float(sp[0]), float(sp[1]), float(sp[2])
    except Exception as e:
        raise MedseError(f"cannot read image header ({type(e).__name__}: {e})", path) from e


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis).T  # transpose so that x runs left-right, y bottom-top


def pick_example_case(records: pd.DataFrame, arch: str, baseline: str, block: str, metric: str = "dice") -> str:
    """The case whose paired gain of ``block`` over ``baseline`` is closest to the median gain (not the best case).

    Showing the median case rather than the most favourable one keeps the overlay honest.
    """
    sc = case_scores(validate_records(records), metric=metric)
    a = sc[(sc["arch"] == arch) & (sc["block"] == baseline)].set_index("case_id")["value"]
    b = sc[(sc["arch"] == arch) & (sc["block"] == block)].set_index("case_id")["value"]
    common = a.index.intersection(b.index)
    if len(common) == 0:
        raise MedseError(f"no case evaluated for both '{baseline}' and '{block}' of '{arch}'")
    gain = (b.loc[common] - a.loc[common]).sort_index()
    med = float(np.median(gain.to_numpy()))
    return str((gain - med).abs().idxmin())


def overlay_figure(
    scan: str | os.PathLike | np.ndarray,
    reference: str | os.PathLike | np.ndarray,
    predictions: Mapping[str, str | os.PathLike | np.ndarray],
    path: str | os.PathLike,
    *,
    dpi: int = 90,
    **kwargs: Any,
) -> Path:
    """Draw :func:`overlay_panels` (``kwargs``: its keyword arguments) and write it to the PNG ``path`` at ``dpi``
    (defaults to 90)."""
    return _save(overlay_panels(scan, reference, predictions, **kwargs), path, dpi)


def overlay_panels(
    scan: str | os.PathLike | np.ndarray,
    reference: str | os.PathLike | np.ndarray,
    predictions: Mapping[str, str | os.PathLike | np.ndarray],
    *,
    axis: int = 2,
    slice_index: int | None = None,
    channel: int = 0,
    title: str | None = None,
    label_names: Mapping[str, int] | None = None,
    spacing: Sequence[float] | None = None,
) -> Any:
    """Panels of one slice: the scan, the reference labels, then each prediction (e.g. ``none`` and the best block).

    Args:
        scan: image path or array (x, y, z) or (x, y, z, c).
        reference: reference label map (path or array), same grid as the scan.
        predictions: title -> predicted label map (path or array), same grid.
        axis: slicing axis of the volume. Defaults to 2 (axial for RAS-ordered data).
        slice_index: slice to show. Defaults to the slice with the most reference foreground.
        channel: channel of a multi-channel scan. Defaults to 0.
        title: figure title. Defaults to none.
        label_names: ``{name: value}`` for a colour legend of the labels shown. Defaults to None (no legend).
        spacing: voxel size in mm per axis, for the aspect of the slices (:func:`slice_aspect`). Defaults to the
            scan file's (1 mm when the scan is an array).

    Returns:
        the matplotlib ``Figure``.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if spacing is None and not isinstance(scan, np.ndarray):
        spacing = voxel_spacing(scan)
    img = scan if isinstance(scan, np.ndarray) else load_volume(scan)
    ref = reference if isinstance(reference, np.ndarray) else load_volume(reference)
    if img.ndim == 4:
        img = img[..., channel]
    img = np.asarray(img, dtype=np.float32)
    ref = np.asarray(ref).astype(np.int64)
    if img.ndim != 3 or ref.shape != img.shape:
        raise MedseError(f"scan {img.shape} and reference {ref.shape} must be 3D volumes of the same shape")
    preds = {}
    for name, p in predictions.items():
        arr = np.asarray(p if isinstance(p, np.ndarray) else load_volume(p)).astype(np.int64)
        if arr.shape != ref.shape:
            raise MedseError(f"prediction '{name}' has shape {arr.shape}, reference {ref.shape}")
        preds[name] = arr
    if slice_index is None:
        other = tuple(i for i in range(3) if i != axis)
        area = (ref > 0).sum(axis=other)
        slice_index = int(np.argmax(area)) if area.max() > 0 else ref.shape[axis] // 2
    if not 0 <= slice_index < ref.shape[axis]:
        raise MedseError(f"slice index {slice_index} outside 0..{ref.shape[axis] - 1}")
    n_labels = int(max([ref.max(), *[p.max() for p in preds.values()], 1]))
    base_cols = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]
    cmap = ListedColormap([base_cols[i % len(base_cols)] for i in range(n_labels)])
    s_img = _slice(img, axis, slice_index)
    lo, hi = np.percentile(s_img, [1, 99]) if s_img.size else (0, 1)
    panels = [("scan", None), ("reference", ref), *preds.items()]
    aspect = slice_aspect(spacing, axis)
    fig = _figure((2.3 * len(panels), 2.6))
    axes = fig.subplots(1, len(panels))
    axes = np.atleast_1d(axes)
    for ax, (name, lab) in zip(axes, panels, strict=True):
        ax.imshow(s_img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower",
                  interpolation="nearest", aspect=aspect)
        if lab is not None:
            s_lab = _slice(lab, axis, slice_index)
            masked = np.ma.masked_where(s_lab == 0, s_lab)
            ax.imshow(masked, cmap=cmap, vmin=0.5, vmax=n_labels + 0.5, alpha=0.5, origin="lower",
                      interpolation="nearest", aspect=aspect)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if label_names:
        shown = set(np.unique(_slice(ref, axis, slice_index)).tolist())
        for p in preds.values():
            shown |= set(np.unique(_slice(p, axis, slice_index)).tolist())
        handles = [Patch(facecolor=cmap(v - 1), alpha=0.6, label=name)
                   for name, v in sorted(label_names.items(), key=lambda kv: kv[1]) if v > 0 and v in shown]
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False,
                       bbox_to_anchor=(0.5, -0.06))
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
