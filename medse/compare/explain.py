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
"""

from __future__ import annotations

import json
import os
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

__all__ = ["ExplainResult", "explain", "gate_layers"]

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


def _select(layers: list[tuple[str, Any]], wanted: Sequence[str | int] | None) -> list[tuple[str, Any]]:
    if not wanted:
        return layers
    names = [n for n, _ in layers]
    out = []
    for w in wanted:
        key = str(w).strip()
        if key.lstrip("-").isdigit():
            i = int(key)
            if not -len(layers) <= i < len(layers):
                raise MedseError(f"--layers: index {i} out of range; the network has {len(layers)} gate layers "
                                 f"(0..{len(layers) - 1})")
            out.append(layers[i])
        elif key in names:
            out.append(layers[names.index(key)])
        else:
            from medse.utils.errors import did_you_mean

            raise MedseError(f"--layers: no gate layer '{key}'.{did_you_mean(key, names)} "
                             f"Layers: {', '.join(names)} (or indices 0..{len(layers) - 1})")
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
) -> ExplainResult:
    """Save the spatial-gate maps of a trained run's attention blocks over one scan.

    Args:
        run_dir: training run folder (``config.yaml``, ``dataset.json``, ``checkpoints/``).
        image: the scan (one file, or one file per channel).
        output_dir: where ``<case>_<layer>.nii.gz``, ``<case>_<layer>.png``, ``<case>_gates.png`` and
            ``<case>_gates.json`` go.
        layers: gate layers to save, by index (0-based, in module order) or module name. Defaults to all.
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` path. Defaults to ``"best"``.
        axis: axis of the original volume the PNGs slice along. Defaults to 2.
        slice_index: slice shown in the PNGs. Defaults to the slice where the last selected layer's gate
            varies most.
        device: torch device of the forward pass. Defaults to ``"cpu"``.
        dpi: PNG resolution. Defaults to 90.

    Returns:
        :class:`ExplainResult`.

    Raises:
        MedseError: the run's network has no spatial-gate block, an unknown layer, an unreadable scan.
    """
    import torch

    from medse.data.io import read_image, split_suffix, write_image
    from medse.data.preprocess import PreprocessConfig, invert_to_original, preprocess_case
    from medse.inference import Predictor

    paths = [Path(image)] if isinstance(image, (str, os.PathLike)) else [Path(p) for p in image]
    if not paths:
        raise MedseError("no image given")
    for p in paths:
        if not p.is_file():
            raise MedseError("image not found", p)
    pred = Predictor.from_run(run_dir, checkpoint=checkpoint, device=device)
    model = pred.model
    all_layers = gate_layers(model)
    if not all_layers:
        from medse.runs import Run

        att = Run.open(run_dir).config.model.attention
        raise MedseError(f"the run's network (attention '{att}') has no spatial-gate block; maps exist for "
                         f"{', '.join(spatial_gate_blocks())}", run_dir)
    chosen = _select(all_layers, layers)
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

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = read_image(paths[0])
    stem, _ = split_suffix(paths[0])
    scan = np.asarray(ref.array, dtype=np.float32)
    if scan.ndim == 4:
        scan = scan[..., 0]
    if not 0 <= axis <= 2:
        raise MedseError(f"--axis must be 0, 1 or 2, got {axis}")
    if slice_index is None:
        other = tuple(i for i in range(3) if i != axis)
        slice_index = int(np.argmax(originals[-1].std(axis=other)))
    if not 0 <= slice_index < scan.shape[axis]:
        raise MedseError(f"--slice {slice_index} outside 0..{scan.shape[axis] - 1}")
    res = ExplainResult(output_dir=out)
    summary = {"run": str(Path(run_dir).resolve()), "image": [str(p) for p in paths], "checkpoint": checkpoint,
               "axis": axis, "slice": slice_index, "layers": []}
    for (name, mod), gmap in zip(chosen, originals, strict=True):
        idx = index_of[id(mod)]
        tag = f"{idx:02d}_{_safe(name)}"
        nii = write_image(gmap.astype(np.float32), ref.affine, out / f"{stem}_gate{tag}.nii.gz", like=ref)
        png = _overlay_png(scan, gmap, axis, slice_index, out / f"{stem}_gate{tag}.png",
                           f"{type(mod).__name__} gate, layer {idx} ({name})", dpi)
        res.layers.append(name)
        res.nifti.append(nii)
        res.png.append(png)
        summary["layers"].append({"index": idx, "name": name, "block": type(mod).__name__, "nifti": nii.name,
                                  "png": png.name, "min": float(gmap.min()), "mean": float(gmap.mean()),
                                  "max": float(gmap.max())})
    res.montage = _montage(scan, originals, [f"{index_of[id(m)]}: {type(m).__name__}" for _, m in chosen], axis,
                           slice_index, out / f"{stem}_gates.png", dpi)
    res.summary = atomic_write_text(out / f"{stem}_gates.json", json.dumps(summary, indent=2) + "\n")
    return res


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis).T


def _overlay_png(scan: np.ndarray, gate: np.ndarray, axis: int, index: int, path: Path, title: str,
                 dpi: int) -> Path:
    from medse.compare.figures import _figure, _save

    fig = _figure((3.2, 3.0))
    ax = fig.subplots()
    s = _slice(scan, axis, index)
    lo, hi = np.percentile(s, [1, 99])
    ax.imshow(s, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", interpolation="nearest")
    im = ax.imshow(_slice(gate, axis, index), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45, origin="lower",
                   interpolation="bilinear")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    return _save(fig, path, dpi)


def _montage(scan: np.ndarray, gates: list[np.ndarray], titles: list[str], axis: int, index: int, path: Path,
             dpi: int) -> Path:
    from medse.compare.figures import _figure, _save

    n = len(gates) + 1
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure((2.2 * cols, 2.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    s = _slice(scan, axis, index)
    lo, hi = np.percentile(s, [1, 99])
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(s, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", interpolation="nearest")
        if k == 0:
            ax.set_title("scan", fontsize=8)
            continue
        ax.imshow(_slice(gates[k - 1], axis, index), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45, origin="lower",
                  interpolation="bilinear")
        ax.set_title(titles[k - 1], fontsize=7)
    return _save(fig, path, dpi)
