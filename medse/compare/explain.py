"""Attention maps: the spatial gates of sSE, scSE, CA, SimAM and PE blocks over a scan, as NIfTI and PNG.

sSE's gate ``q = sigmoid(conv1x1(x))`` (Roy et al., MICCAI 2018, arXiv 1803.02579) is a voxel-wise map of how
much each position of a feature map is kept; the papers show such maps to argue that sSE highlights the
structures being segmented. ``explain`` records the gate of every spatial-gate block of a trained network
(``record_gate=True`` -> ``last_gate``, see ``docs/ARCHITECTURE.md``) for one scan and maps it back onto the
scan's own voxel grid.

Procedure: the scan is preprocessed exactly as for prediction (the run's ``data.preprocess``), padded at the
far end (edge values) to a multiple of the network's ``size_divisor`` so the network sees the whole volume
in one forward pass (3D networks) or one slice at a time (2D networks, along ``train.slice_axis``), each
layer's gate is averaged over its channels when it has more than one (CA, SimAM), broadcast to the layer's
feature-map size, linearly upsampled to the padded input size, cropped, and inverted to the original grid
(:func:`medse.data.preprocess.invert_to_original`).

NOTE: not in paper — channel averaging of multi-channel gates, the upsampling to the input grid and the
whole-volume forward pass (instead of sliding windows, so the map has no window seams) are medse's choices.

Layers are named by their position in the network (``encoder.0``, ``bottleneck``, ``decoder.2``: the site the
network put the block at, ``docs/networks.md``), not by module path; a network that does not record positions
(a plugin's own) falls back to the module path. Figures use constrained layout (titles and colour bars do not
overlap), the scan's voxel aspect, and each block's colour from :func:`medse.compare.figures.block_colors`.

Outputs: ``axis``/``slice`` are checked before anything is created. The maps are written into a temporary
folder inside ``output_dir``; then the files an earlier ``explain`` of the same scan wrote there (those its
``<case>_gates.json`` lists, and any ``<case>_gateNN_*`` map) are removed and the new ones moved in, so a
folder never mixes two runs' maps (other files in it are left alone).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ExplainResult", "explain", "gate_layers", "gate_montage_figure", "gate_overlay_figure", "layer_names"]


def spatial_gate_blocks() -> list[str]:
    """Names of the registered blocks with a spatial gate (``AttentionInfo.spatial_gate``)."""
    from medse.attention import list_attention

    return [n for n, info in list_attention().items() if info.spatial_gate]


@dataclass
class ExplainResult:
    """Files written by :func:`explain`: per layer a NIfTI map and a PNG overlay, plus a montage and a summary."""

    output_dir: Path
    layers: list[str] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)
    png: list[Path] = field(default_factory=list)
    montage: Path | None = None
    summary: Path | None = None


def gate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, module)`` of every block in ``model`` that can record a spatial gate, in module order.

    Gate-recording sub-modules of a gate block (e.g. the sSE branch inside scSE) are not listed: the outer
    block records the gate it applies.
    """
    out: list[tuple[str, Any]] = []
    for name, m in model.named_modules():
        if not (hasattr(m, "record_gate") and hasattr(m, "last_gate")):
            continue
        if any(name.startswith(parent + ".") for parent, _ in out):
            continue
        out.append((name, m))
    return out


def layer_names(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
    """The position name of each gate layer: the site the network recorded on the attention module it inserted
    (``_medse_site``: ``encoder.0``, ``bottleneck``, ``decoder.2``), with the path below it for a block inside a
    composition (``decoder.1.0``); the module path when the network records no site."""
    sites = {name: m._medse_site for name, m in model.named_modules() if getattr(m, "_medse_site", None)}
    out = []
    for name, _ in layers:
        owner = max((p for p in sites if name == p or name.startswith(p + ".")), key=len, default=None)
        out.append(name if owner is None else sites[owner] + name[len(owner):])
    return out


def _select(layers: list[tuple[str, Any]], wanted: Sequence[str | int] | None,
            aliases: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The layers ``wanted`` by index, position name (``aliases``, one per layer) or module path."""
    if not wanted:
        return layers
    names = [n for n, _ in layers]
    alias_of = {a: i for i, a in enumerate(aliases)}
    out = []
    for w in wanted:
        key = str(w).strip()
        if key.lstrip("-").isdigit():
            i = int(key)
            if not -len(layers) <= i < len(layers):
                raise MedseError(f"--layers: index {i} out of range; the network has {len(layers)} gate layers "
                                 f"(0..{len(layers) - 1})")
            out.append(layers[i])
        elif key in alias_of:
            out.append(layers[alias_of[key]])
        elif key in names:
            out.append(layers[names.index(key)])
        else:
            from medse.utils.errors import did_you_mean

            shown = list(aliases) or names
            raise MedseError(f"--layers: no gate layer '{key}'.{did_you_mean(key, [*shown, *names])} "
                             f"Layers: {', '.join(shown)} (or indices 0..{len(layers) - 1})")
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "layer"


def _pad_to(x: Any, divisor: int) -> tuple[Any, list[int]]:
    import torch.nn.functional as F

    spatial = list(x.shape[2:])
    target = [((s + divisor - 1) // divisor) * divisor for s in spatial]
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        pad += [0, t - s]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return x, target


def _gate_maps(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, divisor: int) -> list[np.ndarray]:
    """Run ``x`` (1, C, *spatial) through ``model`` and return each layer's gate at the size of ``x``."""
    import torch
    import torch.nn.functional as F

    spatial = list(x.shape[2:])
    xp, target = _pad_to(x, divisor)
    shapes: dict[int, list[int]] = {}
    hooks = []
    for i, (_, m) in enumerate(layers):
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, i=i: shapes.__setitem__(i, list(inp[0].shape[2:]))))
        m.record_gate = True
        m.last_gate = None
    try:
        with torch.inference_mode():
            model(xp)
    finally:
        for h in hooks:
            h.remove()
        for _, m in layers:
            m.record_gate = False
    maps = []
    for i, (name, m) in enumerate(layers):
        g = m.last_gate
        m.last_gate = None
        if g is None:
            raise MedseError(f"layer '{name}' recorded no gate (was it used in the forward pass?)")
        g = g.float()
        if g.shape[1] > 1:
            g = g.mean(dim=1, keepdim=True)
        g = torch.broadcast_to(g[:1], (1, 1, *shapes.get(i, list(g.shape[2:]))))
        mode = "trilinear" if len(target) == 3 else "bilinear"
        up = F.interpolate(g.contiguous(), size=target, mode=mode, align_corners=False)
        crop = tuple(slice(0, s) for s in spatial)
        maps.append(up[(0, 0, *crop)].cpu().numpy().astype(np.float32))
    return maps


def explain(
    run_dir: str | os.PathLike,
    image: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    layers: Sequence[str | int] | None = None,
    checkpoint: str = "best",
    axis: int = 2,
    slice_index: int | None = None,
    device: str = "cpu",
    dpi: int = 90,
    block_order: Sequence[str] | None = None,
) -> ExplainResult:
    """Save the spatial-gate maps of a trained run's attention blocks over one scan.

    Args:
        run_dir: training run folder (``config.yaml``, ``dataset.json``, ``checkpoints/``).
        image: the scan (one file, or one file per channel).
        output_dir: where ``<case>_gateNN_<position>.nii.gz``, ``<case>_gateNN_<position>.png``,
            ``<case>_gates.png`` and ``<case>_gates.json`` go; maps an earlier call wrote there for the same scan
            are replaced, not kept (see the module docstring).
        layers: gate layers to save, by index (0-based, in module order), position name (``decoder.2``) or
            module path. Defaults to all.
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` path. Defaults to ``"best"``.
        axis: axis of the original volume the PNGs slice along (0, 1 or 2). Defaults to 2.
        slice_index: slice shown in the PNGs. Defaults to the slice where the last selected layer's gate
            varies most.
        device: torch device of the forward pass. Defaults to ``"cpu"``.
        dpi: PNG resolution. Defaults to 90.
        block_order: the comparison table's block order, for the block colours
            (:func:`medse.compare.figures.block_colors`). Defaults to the registry's order.

    Returns:
        :class:`ExplainResult`.

    Raises:
        MedseError: a bad ``axis`` or ``slice_index``, the run's network has no spatial-gate block, an unknown
            layer, an unreadable scan (all before the output folder is created).
    """
    import torch

    from medse.data.io import read_image, split_suffix
    from medse.data.preprocess import PreprocessConfig, invert_to_original, preprocess_case
    from medse.inference import Predictor

    paths = [Path(image)] if isinstance(image, (str, os.PathLike)) else [Path(p) for p in image]
    if not paths:
        raise MedseError("no image given")
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise MedseError(f"--axis must be 0, 1 or 2, got {axis}")
    for p in paths:
        if not p.is_file():
            raise MedseError("image not found", p)
    ref = read_image(paths[0])
    scan = np.asarray(ref.array, dtype=np.float32)
    if scan.ndim == 4:
        scan = scan[..., 0]
    if slice_index is not None and not 0 <= slice_index < scan.shape[axis]:
        raise MedseError(f"--slice {slice_index} outside 0..{scan.shape[axis] - 1} (axis {axis} of a "
                         f"{'x'.join(map(str, scan.shape))} scan)", paths[0])
    pred = Predictor.from_run(run_dir, checkpoint=checkpoint, device=device)
    model = pred.model
    all_layers = gate_layers(model)
    if not all_layers:
        from medse.runs import Run

        att = Run.open(run_dir).config.model.attention
        raise MedseError(f"the run's network (attention '{att}') has no spatial-gate block; maps exist for "
                         f"{', '.join(spatial_gate_blocks())}", run_dir)
    positions = layer_names(model, all_layers)
    chosen = _select(all_layers, layers, positions)
    index_of = {id(m): i for i, (_, m) in enumerate(all_layers)}
    cfg = pred.preprocess if pred.preprocess is not None else PreprocessConfig()
    img, _, props = preprocess_case(paths, None, cfg, expected_channels=pred.in_channels)
    divisor = int(getattr(model, "size_divisor", 1) or 1)
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None].to(pred.device)
    if pred.spatial_dims == 3:
        maps = _gate_maps(model, chosen, x, divisor)
    else:
        sa = pred.slice_axis
        per_slice: list[list[np.ndarray]] = [[] for _ in chosen]
        for k in range(x.shape[2 + sa]):
            xs = x.select(2 + sa, k)
            for j, m in enumerate(_gate_maps(model, chosen, xs, divisor)):
                per_slice[j].append(m)
        maps = [np.stack(s, axis=sa) for s in per_slice]
    originals = [invert_to_original(m, props, is_label=False, outside_background=0.0) for m in maps]
    if slice_index is None:
        other = tuple(i for i in range(3) if i != axis)
        slice_index = int(np.argmax(originals[-1].std(axis=other)))

    from medse.compare.figures import block_colors
    from medse.utils.atomic import ensure_writable_dir

    block_of = _block_names()
    colors = block_colors(list(block_order) if block_order else ["none", *spatial_gate_blocks()])
    out = Path(output_dir)
    ensure_writable_dir(out)
    stem, _ = split_suffix(paths[0])
    stage = Path(tempfile.mkdtemp(prefix=".explain-", dir=out))
    try:
        res = _write_maps(stage, out, stem, ref, scan, chosen, originals, positions, index_of, block_of, colors,
                          axis, slice_index, dpi, {"run": str(Path(run_dir).resolve()),
                                                   "image": [str(p) for p in paths], "checkpoint": checkpoint})
        for old in _previous_outputs(out, stem):
            old.unlink(missing_ok=True)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return res


def _block_names() -> dict[type, str]:
    """Block class -> registry name (a composition's parts are their own classes)."""
    from medse.attention import list_attention

    return {info.cls: name for name, info in list_attention().items() if isinstance(info.cls, type)}


def _write_maps(stage: Path, out: Path, stem: str, ref: Any, scan: np.ndarray, chosen: list[tuple[str, Any]],
                originals: list[np.ndarray], positions: list[str], index_of: dict[int, int],
                block_of: dict[type, str], colors: dict[str, str], axis: int, slice_index: int, dpi: int,
                info: dict[str, Any]) -> ExplainResult:
    """Write every map, PNG, the montage and the summary into ``stage``; the result names their final paths."""
    from medse.compare.figures import _save, slice_aspect
    from medse.data.io import write_image

    aspect = slice_aspect(ref.spacing[:3] if len(ref.spacing) >= 3 else None, axis)
    res = ExplainResult(output_dir=out)
    summary = {**info, "axis": axis, "slice": slice_index, "layers": []}
    titles, tints = [], []
    for (name, mod), gmap in zip(chosen, originals, strict=True):
        idx = index_of[id(mod)]
        where = positions[idx]
        block = block_of.get(type(mod), type(mod).__name__)
        tag = f"{idx:02d}_{_safe(where)}"
        nii = write_image(gmap.astype(np.float32), ref.affine, stage / f"{stem}_gate{tag}.nii.gz", like=ref)
        title = f"{where}: {block} gate"
        fig = gate_overlay_figure(scan, gmap, axis, slice_index, title, aspect=aspect, color=colors.get(block))
        png = _save(fig, stage / f"{stem}_gate{tag}.png", dpi)
        titles.append(title)
        tints.append(colors.get(block))
        res.layers.append(where)
        res.nifti.append(out / nii.name)
        res.png.append(out / png.name)
        summary["layers"].append({"index": idx, "name": where, "module": name, "block": block,
                                  "nifti": nii.name, "png": png.name, "min": float(gmap.min()),
                                  "mean": float(gmap.mean()), "max": float(gmap.max())})
    fig = gate_montage_figure(scan, originals, titles, axis, slice_index, aspect=aspect, colors=tints)
    res.montage = out / _save(fig, stage / f"{stem}_gates.png", dpi).name
    res.summary = out / atomic_write_text(stage / f"{stem}_gates.json", json.dumps(summary, indent=2) + "\n").name
    return res


def _previous_outputs(out: Path, stem: str) -> list[Path]:
    """Files an earlier ``explain`` of scan ``stem`` wrote into ``out``: those its summary lists, and any
    ``<stem>_gateNN_*.nii.gz`` / ``.png`` map (also from a summary that was lost)."""
    found: set[Path] = set()
    summary = out / f"{stem}_gates.json"
    try:
        old = json.loads(summary.read_text())
        for layer in old.get("layers", []):
            for key in ("nifti", "png"):
                name = str(layer.get(key, ""))
                if name and "/" not in name and name.startswith(f"{stem}_gate"):
                    found.add(out / name)
    except (OSError, ValueError, AttributeError):
        pass
    pattern = re.compile(re.escape(stem) + r"_gate\d{2}_[\w.-]*\.(nii\.gz|png)$")
    found |= {f for f in out.iterdir() if f.is_file() and pattern.match(f.name)}
    return sorted(found)


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    from medse.compare.figures import _slice as figure_slice  # one slice layout for every figure

    return figure_slice(vol, axis, index)


def _show_scan(ax: Any, s: np.ndarray, aspect: float) -> None:
    lo, hi = np.percentile(s, [1, 99])
    ax.imshow(s, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", interpolation="nearest",
              aspect=aspect)


def _title(ax: Any, title: str, color: str | None, fontsize: int) -> None:
    ax.set_title(title, fontsize=fontsize)
    if color:  # the block's colour (figures.block_colors) as a bar under the title
        ax.spines["top"].set_visible(True)
        ax.spines["top"].set_color(color)
        ax.spines["top"].set_linewidth(3)


def gate_overlay_figure(scan: np.ndarray, gate: np.ndarray, axis: int, index: int, title: str, *,
                        aspect: float = 1.0, color: str | None = None) -> Any:
    """One gate over its scan slice, with a colour bar: a ``Figure`` in constrained layout (no overlap)."""
    from medse.compare.figures import _figure

    fig = _figure((3.4, 3.0), layout="constrained")
    ax = fig.subplots()
    _show_scan(ax, _slice(scan, axis, index), aspect)
    im = ax.imshow(_slice(gate, axis, index), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45, origin="lower",
                   interpolation="bilinear", aspect=aspect)
    fig.colorbar(im, ax=ax, shrink=0.9, label="gate")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    _title(ax, title, color, 8)
    return fig


def gate_montage_figure(scan: np.ndarray, gates: list[np.ndarray], titles: list[str], axis: int, index: int, *,
                        aspect: float = 1.0, colors: Sequence[str | None] = ()) -> Any:
    """The scan and every gate on one slice, one shared colour bar: a ``Figure`` in constrained layout."""
    from medse.compare.figures import _figure

    n = len(gates) + 1
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure((2.4 * cols + 0.6, 2.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    s = _slice(scan, axis, index)
    im = None
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if k >= n:
            ax.set_visible(False)
            continue
        _show_scan(ax, s, aspect)
        if k == 0:
            ax.set_title("scan", fontsize=8)
            continue
        im = ax.imshow(_slice(gates[k - 1], axis, index), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45,
                       origin="lower", interpolation="bilinear", aspect=aspect)
        _title(ax, titles[k - 1], colors[k - 1] if k - 1 < len(colors) else None, 7)
    if im is not None:
        fig.colorbar(im, ax=[a for a in axes if a.get_visible()], shrink=0.8, label="gate")
    return fig
