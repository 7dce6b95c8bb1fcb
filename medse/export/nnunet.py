"""Export a network trained by nnU-Net v2 (medse's attention plans or nnU-Net's own) to ONNX or TorchScript.

:func:`export_nnunet` takes an nnU-Net results folder (``$nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<config>``,
holding ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``) and a fold. It rebuilds the network
the way ``nnUNetv2_predict`` does: nnU-Net's ``PlansManager`` reads the folder's plans, the configuration comes
from the checkpoint's ``init_args`` (the folder name when the checkpoint lacks it), and nnU-Net's
``get_network_from_plans`` builds the class the plans name (``network_class_name``: medse's
``AttentionPlainConvUNet`` / ``AttentionResidualEncoderUNet``, or dynamic-network-architectures' own) with deep
supervision off, as nnU-Net builds it for inference. The fold's weights load strictly. The file is then written and
checked by the same code as :func:`medse.export.export_run`: traced, compared with the eager network at batch 2
and 1 and at two spatial sizes (the configuration's patch and the patch grown by the network's downsampling
factor), put in place only within ``tolerance``, with an ``export.json`` beside it.

The exported network takes what nnU-Net's preprocessing produces (axes transposed by the plans'
``transpose_forward``, resampled to the configuration's spacing, normalised by its schemes) and returns logits;
``export.json`` records those settings, the labels and the mirroring axes nnU-Net allows for test-time
augmentation. nnU-Net's sliding window, resampling back and export of masks are not part of the file.

nnU-Net writes its checkpoints as pickled dicts (``torch.save`` of the trainer's state). They are read with
``torch.load(weights_only=True)``, allowing only numpy's scalar and dtype types (the training log's numbers) on top
of torch's own safe types: a checkpoint that needs anything else is refused with a one-line error, never
unpickled without ``weights_only``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from medse.export import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    META_NAME,
    ExportResult,
    _export_onnx,
    _export_torchscript,
    _other_format,
    _parity,
    model_file_name,
)
from medse.utils.errors import MedseError

__all__ = ["export_nnunet", "load_nnunet_checkpoint"]


def _numpy_safe_globals() -> list[Any]:
    """The numpy types a trainer's log puts into an nnU-Net checkpoint (``np.float64`` Dice/EMA values)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)
    return [core.multiarray.scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]


def load_nnunet_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An nnU-Net checkpoint as a dict, read with ``torch.load(weights_only=True)`` and numpy's scalar types
    allowed (one-line :class:`MedseError` naming the file when it needs any other type, or is not a checkpoint)."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unsafe global, truncated or not a torch file
        import re

        text = str(e).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL [\w.]+", text)  # torch's long advice names the type here
        first = unsafe.group(0) if unsafe else (text.splitlines() or [type(e).__name__])[0]
        raise MedseError(f"cannot read the nnU-Net checkpoint with torch.load(weights_only=True): {first}",
                         path) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise MedseError("not an nnU-Net checkpoint (no 'network_weights')", path)
    return ckpt


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedseError("not found: an nnU-Net results folder holds plans.json and dataset.json", path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MedseError(f"cannot read JSON ({e})", path) from e
    if not isinstance(data, dict):
        raise MedseError("expected a JSON object", path)
    return data


def _fold_checkpoint(results: Path, fold: int | str, checkpoint: str) -> Path:
    """``results/fold_<fold>/<checkpoint>``, or a one-line error listing the folds / checkpoints there are."""
    fold_dir = results / f"fold_{fold}"
    if not fold_dir.is_dir():
        have = sorted(p.name.removeprefix("fold_") for p in results.glob("fold_*") if p.is_dir())
        raise MedseError(f"no fold {fold} in this nnU-Net results folder (folds: {', '.join(have) or 'none'})",
                         fold_dir)
    path = fold_dir / checkpoint
    if not path.is_file():
        have = sorted(p.name for p in fold_dir.glob("*.pth"))
        raise MedseError(f"checkpoint not found (checkpoints in fold_{fold}: {', '.join(have) or 'none'}; an "
                         "unfinished training has checkpoint_latest.pth or checkpoint_best.pth)", path)
    return path


def _size_divisors(arch_kwargs: dict[str, Any], spatial_dims: int) -> list[int] | None:
    """The product of the encoder's strides per axis (an input side must be a multiple of it), or None when the
    plans name no ``strides``."""
    strides = arch_kwargs.get("strides")
    if not isinstance(strides, (list, tuple)):
        return None
    div = [1] * spatial_dims
    for s in strides:
        s = [int(s)] * spatial_dims if isinstance(s, int) else [int(v) for v in s]
        div = [d * v for d, v in zip(div, s, strict=True)]
    return div


def _check_sizes(patch: list[int], div: list[int] | None) -> tuple[list[list[int]], dict[str, Any]]:
    """The spatial sizes to check and the sizes the file takes (``export.json``'s ``spatial_sizes``, in the
    layout :func:`medse.inference.runtime.check_window` reads; ``multiple_of_per_axis`` for anisotropic strides).

    nnU-Net's networks pad nothing: a trace holds no size constants, and the file takes every side that is a
    multiple of the downsampling factor of its axis, as the eager network does."""
    if div is None or any(p % d for p, d in zip(patch, div, strict=True)):
        return [patch], {"fixed": patch, "multiple_of": None,
                         "why": "the plans' patch is not a multiple of the network's downsampling factor"}
    return [patch, [p + d for p, d in zip(patch, div, strict=True)]], {
        "fixed": None, "multiple_of": math.lcm(*div), "multiple_of_per_axis": div,
        "why": "multiples of the network's downsampling factor per axis (nnU-Net's networks pad nothing)"}


def _build_network(results: Path, plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str,
                   weights: dict[str, Any], ckpt_path: Path) -> tuple[Any, Any, Any, Any, int]:
    """nnU-Net's network for ``configuration`` (deep supervision off) with ``weights`` loaded strictly; also the
    plans, configuration and label managers and the number of input channels."""
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as e:
        raise MedseError(f"exporting an nnU-Net model needs nnunetv2 (pip install 'medse[nnunet]'): {e}") from e

    plans_path = results / "plans.json"
    pm = PlansManager(plans)
    known = list(plans.get("configurations") or {})
    if configuration not in known:
        raise MedseError(f"the checkpoint was trained with configuration '{configuration}', which plans.json does "
                         f"not have (configurations: {', '.join(known) or 'none'})", plans_path)
    try:
        cm = pm.get_configuration(configuration)
        lm = pm.get_label_manager(dataset_json)
        in_channels = determine_num_input_channels(pm, cm, dataset_json)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, in_channels,
                                     lm.num_segmentation_heads, allow_init=False, deep_supervision=False)
    except MedseError:
        raise
    except Exception as e:  # a class the plans name that cannot be imported, kwargs it does not take, bad labels
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MedseError(f"nnU-Net cannot build the '{configuration}' network from these plans "
                         f"({type(e).__name__}: {first})", plans_path) from e
    decoder = getattr(net, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False  # nnU-Net's inference switch: one full-resolution output
    result = net.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                 (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise MedseError(f"the weights do not fit the network plans.json builds ({type(net).__name__}): "
                         f"{', '.join(parts)}", ckpt_path)
    return net.float().eval(), pm, cm, lm, int(in_channels)


def export_nnunet(
    results_dir: str | os.PathLike,
    fold: int | str,
    fmt: str,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str = "checkpoint_final.pth",
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Export fold ``fold`` of an nnU-Net results folder to ``out_dir`` and check it against the eager network.

    Args:
        results_dir: ``$nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<configuration>`` (``plans.json``,
            ``dataset.json``, ``fold_N/``).
        fold: the fold (``0``-``4`` or ``"all"``).
        fmt: ``"onnx"`` (``model.onnx``, dynamic batch and spatial axes) or ``"torchscript"`` (``model.ts``).
        out_dir: the folder for the model file and ``export.json`` (created).
        checkpoint: the checkpoint file in the fold folder. Defaults to ``checkpoint_final.pth``.
        overwrite: replace an existing model file / ``export.json``. Defaults to False (refused).
        tolerance: largest absolute logit difference accepted. Defaults to
            :data:`medse.export.DEFAULT_TOLERANCE` (1e-4).
        opset: ONNX opset. Defaults to :data:`medse.export.DEFAULT_OPSET` (17).

    Raises:
        MedseError: one line naming the folder, file or setting: a missing fold, checkpoint, ``plans.json`` or
            ``dataset.json``; a checkpoint that needs unsafe unpickling; weights that do not fit the plans'
            network; an output that exists without ``overwrite``; a difference above ``tolerance`` (then nothing
            is written); ``"bundle"`` (a bundle needs a medse run's preprocessing).

    Returns:
        An :class:`medse.export.ExportResult` (files, opset, the difference measured at each checked input).
    """
    import torch

    t0 = time.perf_counter()
    name = model_file_name(fmt)
    if fmt == "bundle":
        raise MedseError("an nnU-Net model exports as onnx or torchscript: a MONAI bundle reproduces a medse run's "
                         "preprocessing, and nnU-Net's is its own")
    if not float(tolerance) > 0:
        raise MedseError(f"tolerance must be > 0, got {tolerance}")
    results = Path(results_dir)
    if not results.is_dir():
        raise MedseError("nnU-Net results folder not found", results)
    out = Path(out_dir)
    target, meta_path = out / name, out / META_NAME
    if not overwrite:
        for f in (target, meta_path):
            if f.exists() or f.is_symlink():
                raise MedseError(f"already exists{_other_format(f, fmt)}; pass --overwrite (overwrite=True) to replace it", f)
    plans = _read_json(results / "plans.json")
    dataset_json = _read_json(results / "dataset.json")
    ckpt_path = _fold_checkpoint(results, fold, checkpoint)
    ckpt = load_nnunet_checkpoint(ckpt_path)
    init_args = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    configuration = str(init_args.get("configuration") or results.name.split("__")[-1])
    model, pm, cm, lm, in_channels = _build_network(results, plans, dataset_json, configuration,
                                                    ckpt["network_weights"], ckpt_path)

    patch = [int(p) for p in cm.patch_size]
    sizes, valid = _check_sizes(patch, _size_divisors(cm.network_arch_init_kwargs, len(patch)))
    shapes = [[b, in_channels, *s] for s in sizes for b in (2, 1)]
    example = torch.randn(*shapes[0], generator=torch.Generator().manual_seed(1))

    from medse.inference.runtime import load_network
    from medse.utils.atomic import atomic_path, atomic_write_text, ensure_writable_dir

    ensure_writable_dir(out)
    with atomic_path(target) as tmp:
        if fmt == "onnx":
            _export_onnx(model, example, tmp, opset)
        else:
            _export_torchscript(model, example, tmp)
        parity = _parity(load_network(tmp, fmt), model, shapes)
        worst = max(p["max_abs_diff"] for p in parity)
        if not worst <= tolerance:  # NaN fails too
            raise MedseError(f"exported {fmt} network differs from torch by {worst:.3g}, above the tolerance "
                             f"{tolerance:g}; nothing written", ckpt_path)
    result = ExportResult(fmt, target, meta_path, opset if fmt == "onnx" else None, float(tolerance), parity)
    meta = _metadata(result, results, fold, ckpt_path, ckpt, configuration, model, pm, cm, lm, in_channels,
                     example, valid)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str) + "\n")
    result.seconds = time.perf_counter() - t0
    return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metadata(result: ExportResult, results: Path, fold: int | str, ckpt_path: Path, ckpt: dict[str, Any],
              configuration: str, model: Any, pm: Any, cm: Any, lm: Any, in_channels: int, example: Any,
              valid: dict[str, Any]) -> dict[str, Any]:
    """``export.json`` for an nnU-Net model: the file, what it was made from, what input it expects (nnU-Net's
    preprocessing settings), how it was checked."""
    from importlib.metadata import version

    import torch

    import medse

    versions = {"medse": medse.__version__, "torch": torch.__version__, "nnunetv2": version("nnunetv2")}
    if result.format == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    axes = ",".join("XYZ"[: len(cm.patch_size)])
    regions = bool(lm.has_regions)
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    return {
        "format": result.format,
        "file": result.model_path.name,
        "opset": result.opset,
        "method": "torch.onnx.export (legacy tracer)" if result.format == "onnx" else "torch.jit.trace",
        "source": "nnU-Net v2",
        "input": {"name": "image", "layout": f"B,C,{axes}", "dtype": "float32", "example_shape": list(example.shape),
                  "what": "nnU-Net's preprocessed array (see preprocessing)"},
        "output": {"name": "logits", "layout": f"B,K,{axes}",
                   "what": "region logits (sigmoid per channel; nnU-Net's region-based training)" if regions
                   else "logits (argmax over K: label value of each index, see labels)"},
        "dynamic_axes": "batch and spatial",
        "spatial_sizes": valid,
        "spatial_dims": len(cm.patch_size),
        "in_channels": in_channels,
        "num_classes": int(lm.num_segmentation_heads),
        "labels": lm.label_dict,
        "preprocessing": {"spacing": list(cm.spacing), "transpose_forward": list(pm.transpose_forward),
                          "normalization_schemes": list(cm.normalization_schemes),
                          "use_mask_for_norm": list(cm.use_mask_for_norm),
                          "foreground_intensity_properties_per_channel":
                              pm.plans.get("foreground_intensity_properties_per_channel")},
        "inference": {"patch_size": list(cm.patch_size),
                      "mirroring_axes": list(mirror) if mirror is not None else None},
        "network": f"{type(model).__module__}.{type(model).__name__}",
        "attention": getattr(model, "attention", None),
        "results_dir": str(results.resolve()),
        "plans_name": pm.plans_name,
        "configuration": configuration,
        "fold": fold,
        "trainer_name": ckpt.get("trainer_name"),
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": _sha256(ckpt_path),
        "epoch": ckpt.get("current_epoch"),
        "versions": versions,
        "parity": {"tolerance": result.tolerance, "max_abs_diff": result.max_abs_diff,
                   "reference": "the eager torch network on the CPU", "inputs": result.parity},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "medse_version": medse.__version__,
    }
