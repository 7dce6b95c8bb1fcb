"""Export a trained run's network for deployment: ONNX (onnxruntime, TensorRT), TorchScript (``torch.jit.load``)
and a MONAI bundle (:mod:`medse.export.bundle`: MONAI Label, ``monai.bundle run``).

:func:`export_run` loads the run the way ``medse predict`` does (:meth:`medse.inference.Predictor.from_run`: the
run's config, ``dataset.json`` and checkpoint, ``best`` falling back to ``last`` with a note), on the CPU in eval
mode, writes ``model.onnx`` or ``model.ts`` and an ``export.json`` beside it, and checks the written file against
the eager network before it is put in place: at batch 1 and 2 and at two spatial sizes (the run's patch size and
the patch grown by the network's size divisor), the largest absolute logit difference must stay within
``tolerance`` or nothing is written. :mod:`medse.inference.runtime` loads the files back for ``medse predict --model``.

Both formats are recorded by tracing (the legacy ONNX exporter, ``torch.jit.trace``): ``torch.jit.script`` cannot
compile medse's networks, and the dynamo ONNX exporter specialises their spatial axes (the padding to the size
divisor is Python arithmetic on the shape) to the example's size. A trace records that padding as constants, so
an exported network takes every batch size and the spatial sizes that need the same padding as the example: the
multiples of its size divisor when the patch is one (the sliding window always feeds windows of the run's patch
size). ``export.json`` states which (``spatial_sizes``). The fused attention kernels step aside while a graph is
recorded (:func:`medse.attention.kernels.core.capturing`), so the file holds the plain formula, which differs from
the eager fused output by float rounding (about 1e-7).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medse.utils.errors import MedseError

__all__ = ["DEFAULT_OPSET", "DEFAULT_TOLERANCE", "FORMATS", "ExportResult", "export_nnunet", "export_run",
           "model_file_name"]

#: the export formats and the model file each writes in the output folder
FORMATS: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.ts", "bundle": "configs/inference.json"}
#: ONNX opset written (17: LayerNormalization as one node; onnxruntime >= 1.13, TensorRT >= 8.6 read it)
DEFAULT_OPSET = 17
#: largest absolute logit difference accepted between the exported file and the eager network
DEFAULT_TOLERANCE = 1e-4
#: the names of the graph's input and output (``export.json`` records them)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
META_NAME = "export.json"


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and measured."""

    format: str
    model_path: Path
    meta_path: Path
    opset: int | None
    tolerance: float
    #: one entry per checked input: ``{"shape": [...], "max_abs_diff": float}``
    parity: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((p["max_abs_diff"] for p in self.parity), default=0.0)

    def summary(self) -> str:
        """The lines ``medse export`` prints."""
        what = f"ONNX opset {self.opset}" if self.format == "onnx" else "TorchScript (traced)"
        runtime = "onnxruntime" if self.format == "onnx" else "torch.jit.load"
        if self.format == "bundle":
            root = self.meta_path.parent
            lines = [f"wrote MONAI bundle {root} (configs/inference.json, configs/metadata.json, models/model.ts, "
                     f"models/model.pt, scripts/) and {self.meta_path}; run it from {root} with: python -m "
                     "monai.bundle run --config_file configs/inference.json --input_dir SCANS --output_dir MASKS"]
        else:
            lines = [f"wrote {self.model_path} ({what}) and {self.meta_path}"]
        for p in self.parity:
            lines.append(f"  parity {runtime} vs torch, input {'x'.join(map(str, p['shape']))}: "
                         f"max abs diff {p['max_abs_diff']:.3g}")
        lines.append(f"max abs diff {self.max_abs_diff:.3g} <= tolerance {self.tolerance:g} "
                     f"({len(self.parity)} inputs, {self.seconds:.1f} s)")
        return "\n".join(lines)


def model_file_name(fmt: str) -> str:
    """The model file name of format ``fmt`` (a one-line error naming the formats for an unknown one)."""
    if fmt not in FORMATS:
        from medse.utils.errors import did_you_mean

        raise MedseError(f"unknown export format '{fmt}'.{did_you_mean(fmt, FORMATS)} Available: "
                         f"{', '.join(FORMATS)}")
    return FORMATS[fmt]


def _check_sizes(model: Any, patch: Sequence[int], fixed: bool) -> tuple[list[list[int]], dict[str, Any]]:
    """The spatial sizes to check, and the sizes the exported file takes (``export.json``'s ``spatial_sizes``:
    ``multiple_of`` every axis, or exactly ``fixed``, with a description).

    The second size is the patch grown by the network's size divisor along every axis, when the patch is a
    multiple of it (the trace then recorded no padding, valid at every multiple) and the network's input size is
    not fixed (UNETR's ``img_size``)."""
    patch = [int(p) for p in patch]
    div = int(getattr(model, "size_divisor", 0) or 0)
    if fixed:
        return [patch], {"fixed": patch, "multiple_of": None, "why": "the network's input size is fixed"}
    if div > 0 and all(p % div == 0 for p in patch):
        return [patch, [p + div for p in patch]], {"fixed": None, "multiple_of": div,
                                                   "why": "multiples of the network's size divisor"}
    if div > 0:
        return [patch], {"fixed": patch, "multiple_of": None,
                         "why": f"the patch is not a multiple of the network's size divisor {div}: the trace "
                                "recorded its padding"}
    return [patch, [p + 16 for p in patch]], {"fixed": None, "multiple_of": 1, "why": "the network pads nothing"}


def _parity(run_file: Callable[[Any], Any], model: Any, shapes: list[list[int]]) -> list[dict[str, Any]]:
    """Largest absolute difference between ``run_file(x)`` and ``model(x)`` for a seeded normal input of each
    shape (the preprocessed scans are z-scored)."""
    import torch

    out = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x).float()
            got = run_file(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise MedseError(f"exported network gives shape {tuple(got.shape)} for input {tuple(shape)}, torch "
                             f"gives {tuple(ref.shape)}")
        out.append({"shape": list(shape), "max_abs_diff": float((got.float() - ref).abs().max())})
    return out


def _export_onnx(model: Any, example: Any, path: Path, opset: int) -> None:
    import torch

    spatial = {i: "xyz"[i - 2] if example.ndim == 5 else "xy"[i - 2] for i in range(2, example.ndim)}
    axes = {0: "batch", **spatial}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shape arithmetic of the padding
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def _export_torchscript(model: Any, example: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path))


def export_run(
    run_dir: str | os.PathLike,
    fmt: str,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export the network of a segmentation run to ``out_dir`` and check it against the eager network.

    Args:
        run_dir: a training run folder (``config.yaml``, ``dataset.json``, ``checkpoints/``).
        fmt: ``"onnx"`` (``model.onnx``: dynamic batch and spatial axes, input ``image`` ``(B, C, *spatial)``,
            output ``logits`` ``(B, K, *spatial)``) or ``"torchscript"`` (``model.ts``, loadable with
            ``torch.jit.load`` without medse installed) or ``"bundle"`` (a MONAI bundle folder,
            :mod:`medse.export.bundle`).
        out_dir: the folder for the model file and ``export.json`` (created); for ``"bundle"`` the bundle folder
            itself (new or empty; ``overwrite`` replaces an earlier bundle only).
        checkpoint: ``"best"``, ``"last"`` or a path to a ``.pt`` file. Defaults to ``"best"``.
        overwrite: replace an existing model file / ``export.json``. Defaults to False (refused).
        opset: ONNX opset. Defaults to :data:`DEFAULT_OPSET`.
        tolerance: largest absolute logit difference accepted. Defaults to :data:`DEFAULT_TOLERANCE`.

    Raises:
        MedseError: one line naming the run, file or setting: an unknown format, a classification run, an output
            that exists without ``overwrite``, a missing checkpoint, a difference above ``tolerance`` (then
            nothing is written).

    Returns:
        An :class:`ExportResult` (files, opset, the difference measured at each checked input).
    """
    import torch

    t0 = time.perf_counter()
    name = model_file_name(fmt)
    if not float(tolerance) > 0:
        raise MedseError(f"tolerance must be > 0, got {tolerance}")
    out = Path(out_dir)
    target, meta_path = out / name, out / META_NAME
    if fmt == "bundle":
        _check_bundle_target(out, overwrite)
    elif not overwrite:
        for f in (target, meta_path):
            if f.exists() or f.is_symlink():
                raise MedseError(f"already exists{_other_format(f, fmt)}; pass --overwrite to replace it", f)
    from medse.runs import Run

    run = Run.open(run_dir)
    if run.task != "segmentation":
        raise MedseError(f"medse export takes segmentation runs; this run's task is {run.task}", run.config_path)
    from medse.inference import Predictor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        pred = Predictor.from_run(run.path, checkpoint=checkpoint, device="cpu")
    note = next((str(w.message) for w in caught if "not found" in str(w.message)), None)
    model = pred.model.float().eval()
    cfg = run.config
    patch = list(cfg.train.patch_size)
    fixed = "img_size" in _run_context(cfg)
    sizes, valid = _check_sizes(model, patch, fixed)
    shapes = [[b, pred.in_channels, *s] for s in sizes for b in (2, 1)]
    example = torch.randn(*shapes[0], generator=torch.Generator().manual_seed(1))

    from medse.utils.atomic import atomic_path, atomic_write_text, ensure_writable_dir

    def write_checked(tmp: Path) -> list[dict[str, Any]]:
        """Trace the network into ``tmp`` and measure it against the eager network; raise above tolerance."""
        if fmt == "onnx":
            _export_onnx(model, example, tmp, opset)
        else:
            _export_torchscript(model, example, tmp)
        from medse.inference.runtime import load_network

        parity = _parity(load_network(tmp, "onnx" if fmt == "onnx" else "torchscript"), model, shapes)
        worst = max(p["max_abs_diff"] for p in parity)
        if not worst <= tolerance:  # NaN fails too
            bad = next(p for p in parity if not p["max_abs_diff"] <= tolerance)
            raise MedseError(f"exported {fmt} network differs from torch by {worst:.3g} (input "
                             f"{'x'.join(map(str, bad['shape']))}), above the tolerance {tolerance:g}; nothing "
                             f"written", run.path)
        return parity

    if fmt == "bundle":
        return _export_bundle(out, write_checked, pred, run, model, example, valid, checkpoint, tolerance, note, t0)
    ensure_writable_dir(out)
    with atomic_path(target) as tmp:
        parity = write_checked(tmp)
    result = ExportResult(fmt, target, meta_path, opset if fmt == "onnx" else None, float(tolerance), parity, note)
    atomic_write_text(meta_path, json.dumps(_metadata(result, run, pred, example, valid, checkpoint), indent=2) + "\n")
    result.seconds = time.perf_counter() - t0
    return result


def _check_bundle_target(out: Path, overwrite: bool) -> None:
    """A bundle goes into a new or empty folder; ``overwrite`` replaces an earlier bundle, never another folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MedseError("exists and is not a folder", out)
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise MedseError("already exists and is not empty; pass --overwrite to replace the bundle in it", out)
    if not (out / FORMATS["bundle"]).is_file():
        raise MedseError(f"is not a MONAI bundle (no {FORMATS['bundle']}): not replaced, even with --overwrite",
                         out)


def _export_bundle(out: Path, write_checked: Callable[[Path], list[dict[str, Any]]], pred: Any, run: Any,
                   model: Any, example: Any, valid: dict[str, Any], checkpoint: str, tolerance: float,
                   note: str | None, t0: float) -> ExportResult:
    """Write the bundle into a temporary folder beside ``out``, then rename it into place (the earlier bundle,
    with ``overwrite``, is removed only after that)."""
    import secrets
    import shutil

    from medse.export.bundle import write_bundle
    from medse.utils.atomic import TEMP_PREFIX, ensure_writable_dir

    ensure_writable_dir(out.parent)
    tmp = out.parent / f"{TEMP_PREFIX}{out.name}-{secrets.token_hex(4)}"
    old = out.parent / f"{TEMP_PREFIX}{out.name}-old-{secrets.token_hex(4)}"
    moved = False
    try:
        tmp.mkdir()
        parity = write_checked(tmp / "model.ts")
        info = write_bundle(tmp, pred, run, model, tmp / "model.ts")
        result = ExportResult("bundle", out / FORMATS["bundle"], out / META_NAME, None, float(tolerance), parity,
                              "; ".join(filter(None, [note, *info.notes])) or None)
        meta = _metadata(result, run, pred, example, valid, checkpoint)
        meta.update(file="models/model.ts", method="torch.jit.trace (inside a MONAI bundle)", notes=info.notes)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            os.replace(out, old)
            moved = True
        os.replace(tmp, out)
        moved = False
    except BaseException:
        if moved and not out.exists():  # the new bundle could not be put in place: the earlier one goes back
            os.replace(old, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _other_format(meta: Path, fmt: str) -> str:
    """``" (the metadata of a <other> export: ...)"`` when ``meta`` is an ``export.json`` of another format."""
    if meta.name != META_NAME:
        return ""
    try:
        other = json.loads(meta.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return ""
    if other and other != fmt:
        return f" (the metadata of a {other} export: export each format to a folder of its own)"
    return ""


def _run_context(cfg: Any) -> tuple[str, ...]:
    from medse.networks import list_models

    info = list_models().get(str(cfg.model.name).strip().lower().replace("-", "_"))
    return tuple(info.run_context) if info is not None else ()


def _metadata(result: ExportResult, run: Any, pred: Any, example: Any, valid: dict[str, Any], checkpoint: str
              ) -> dict:
    """``export.json``: what the file is, what it was made from, how it was checked."""
    import torch

    import medse

    versions = {"medse": medse.__version__, "torch": torch.__version__}
    if result.format == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    ident = pred.identity()
    return {
        "format": result.format,
        "file": result.model_path.name,
        "opset": result.opset,
        "method": "torch.onnx.export (legacy tracer)" if result.format == "onnx" else "torch.jit.trace",
        "input": {"name": INPUT_NAME, "layout": "B,C," + ",".join("XYZ"[: pred.spatial_dims]),
                  "dtype": "float32", "example_shape": list(example.shape)},
        "output": {"name": OUTPUT_NAME, "layout": "B,K," + ",".join("XYZ"[: pred.spatial_dims]),
                   "what": "logits (argmax over K: class index; class_values: label value of each index)"},
        "dynamic_axes": "batch and spatial",
        "spatial_sizes": valid,
        "spatial_dims": pred.spatial_dims,
        "in_channels": pred.in_channels,
        "num_classes": pred.num_classes,
        "class_values": pred.class_values,
        "labels": pred.label_names,
        "inference": pred.output_settings(),
        "run_dir": str(Path(run.path).resolve()),
        "checkpoint": ident.get("checkpoint") or checkpoint,
        "checkpoint_sha256": ident.get("checkpoint_sha256"),
        "versions": versions,
        "parity": {"tolerance": result.tolerance, "max_abs_diff": result.max_abs_diff,
                   "reference": "the eager torch network on the CPU", "inputs": result.parity},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "medse_version": medse.__version__,
    }


# an nnU-Net results folder + fold (medse.export.nnunet reuses the writer and parity check above)
from medse.export.nnunet import export_nnunet  # noqa: E402
