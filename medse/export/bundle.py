"""A MONAI bundle of a run (``medse export --format bundle``): what MONAI Label, 3D Slicer's MONAI Label plugin and
``python -m monai.bundle run`` load.

Layout (``BUNDLE/``, written into a temporary folder beside it and renamed into place)::

    configs/metadata.json    network_data_format (input channels, window, classes), versions
    configs/inference.json   LoadImaged -> medse's preprocessing -> SlidingWindowInferer -> argmax -> Invertd ->
                             label values -> (largest component) -> SaveImaged, as ``medse predict`` does
    models/model.ts          the traced network (TorchScript): what inference.json runs; medse not needed
    models/model.pt          the weights (state dict) for ``network_def`` (medse's network), for MONAI's tools
                             that build the network (``verify_net_in_out``, fine-tuning); these need medse
    scripts/medse_transforms.py   the preprocessing steps MONAI has no transform for (numpy/torch/MONAI only)

The transforms reproduce the run's ``data.preprocess``: NaN/Inf replacement, ``Orientationd`` (permutations and
flips, exact), ``CropForegroundd`` on medse's foreground with its margin, medse's z-score / CT normalisation; the
inverse is ``Invertd`` with nearest-neighbour labels. Two things are not reproduced exactly and are said where
they apply (``BundleInfo.notes``, printed by the command and kept in ``metadata.json``): resampling to
``target_spacing`` uses MONAI's ``Spacingd`` grid (medse aligns voxel edges), and flip test-time augmentation is
left out. Run it from the bundle folder: ``python -m monai.bundle run --config_file configs/inference.json
--input_dir SCANS --output_dir MASKS``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundleInfo", "write_bundle"]

#: MONAI's metadata schema (``verify_metadata`` downloads it)
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20220324.json")


@dataclass
class BundleInfo:
    """What :func:`write_bundle` wrote and what the bundle does not reproduce."""

    notes: list[str] = field(default_factory=list)


def _preprocessing(pre: Any, spatial_dims: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``preprocessing`` transforms of ``inference.json`` for a ``PreprocessConfig``, and notes."""
    notes: list[str] = []
    t: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    if pre.nonfinite == "replace":
        t.append({"_target_": "scripts.medse_transforms.ReplaceNonFinited", "keys": "image"})
    if str(pre.orientation).lower() != "none":
        t.append({"_target_": "Orientationd", "keys": "image", "axcodes": str(pre.orientation)})
    if pre.crop_foreground:
        t.append({"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                  "select_fn": f"$lambda x: scripts.medse_transforms.foreground(x, '{pre.foreground}')",
                  "margin": int(pre.crop_margin), "allow_smaller": True})
    if pre.target_spacing is not None:
        order = int(pre.image_order)
        mode = {0: "nearest", 1: "bilinear"}.get(order, order)
        t.append({"_target_": "Spacingd", "keys": "image", "pixdim": [float(v) for v in pre.target_spacing],
                  "mode": mode})
        notes.append("resampling to data.preprocess.target_spacing uses MONAI's Spacingd grid, not medse's "
                     "edge-aligned one: masks may differ from medse predict's at boundaries")
    t.append({"_target_": "scripts.medse_transforms.MedseNormalized", "keys": "image",
              "normalization": pre.normalization, "foreground": pre.foreground,
              "ct_window": [float(v) for v in pre.ct_window]})
    return t, notes


def _network_def(cfg: Any, in_channels: int, out_channels: int) -> dict[str, Any]:
    """``network_def``: the arguments :func:`medse.runs.build_model` gives ``medse.networks.create_model``."""
    from medse.networks import run_context_kwargs

    m = cfg.model
    spacing = getattr(getattr(cfg.data, "preprocess", None), "target_spacing", None)
    if spacing is not None and m.spatial_dims == 2:
        spacing = [v for i, v in enumerate(spacing) if i != cfg.train.slice_axis]
    kwargs = {**run_context_kwargs(m.name, cfg.train.patch_size, spacing), **dict(m.kwargs)}
    return json.loads(json.dumps({
        "_target_": "medse.networks.create_model", "name": m.name, "spatial_dims": int(m.spatial_dims),
        "in_channels": int(in_channels), "out_channels": int(out_channels), "attention": m.attention,
        "attention_positions": list(m.attention_positions), "attention_kwargs": dict(m.attention_kwargs) or None,
        **kwargs}, default=list))


def _inference_config(pred: Any, cfg: Any, notes: list[str]) -> dict[str, Any]:
    pre_t, pre_notes = _preprocessing(pred.preprocess, pred.spatial_dims)
    notes += pre_notes
    k = int(pred.num_classes)
    values = [int(v) for v in pred.class_values]
    post: list[dict[str, Any]] = [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": True, "to_tensor": True},
    ]
    if values != list(range(k)):
        post.append({"_target_": "MapLabelValued", "keys": "pred", "orig_labels": list(range(k)),
                     "target_labels": values})
    if pred.largest_component:
        post.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": values[1:],
                     "independent": True})
    post.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
                 "output_ext": ".nii.gz", "separate_folder": False, "resample": False,
                 "output_dtype": "$numpy.uint8" if max(values) < 256 else "$numpy.uint16" if max(values) < 65536
                 else "$numpy.int32",
                 "output_name_formatter": "$scripts.medse_transforms.case_name_formatter", "print_log": False})
    if pred.tta_flips:
        notes.append("the run predicts with flip test-time augmentation (infer.tta_flips); the bundle does not")
    return {
        "imports": ["$import os", "$import numpy", "$import torch", "$import scripts"],
        "bundle_root": ".",
        "input_dir": "input",
        "output_dir": "output",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_def(cfg, pred.in_channels, k),
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)",
        "datalist": "$scripts.medse_transforms.datalist(@input_dir)",
        "preprocessing": {"_target_": "Compose", "transforms": pre_t},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": _inferer(pred),
        "postprocessing": {"_target_": "Compose", "transforms": post},
        # the loop of SupervisedEvaluator, without its pytorch-ignite dependency
        "run": ["$scripts.medse_transforms.run_inference(@dataloader, @network, @inferer, @postprocessing, "
                "@device)"],
    }


def _inferer(pred: Any) -> dict[str, Any]:
    """MONAI's sliding window with the run's window, overlap and blending; 2D networks slide inside every slice
    along the run's ``train.slice_axis`` (``SliceInferer``), as ``medse predict`` slices the volume."""
    args = {"roi_size": [int(v) for v in pred.roi_size], "sw_batch_size": int(pred.sw_batch_size),
            "overlap": float(pred.overlap), "mode": pred.blend, "sigma_scale": 0.125, "padding_mode": "constant",
            "cval": 0.0}
    if pred.spatial_dims == 2:
        return {"_target_": "SliceInferer", "spatial_dim": int(pred.slice_axis), **args}
    return {"_target_": "SlidingWindowInferer", **args}


def _metadata(pred: Any, run: Any, notes: list[str]) -> dict[str, Any]:
    import monai
    import numpy
    import torch

    import medse

    dims = pred.spatial_dims
    names = {int(v): n for n, v in (pred.label_names or {}).items()}
    channels = {str(i): names.get(int(v), f"class {v}") for i, v in enumerate(pred.class_values)}
    channels["0"] = names.get(int(pred.class_values[0]), "background")
    return {
        "schema": METADATA_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medse {medse.__version__} from {Path(run.path).resolve()}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"medse": medse.__version__},
        "optional_packages_version": {},
        "name": f"medse {run.config.model.name} {run.config.model.attention}",
        "task": f"{dims}D segmentation",
        "description": f"medse run {Path(run.path).name}: {run.config.model.name} with "
                       f"{run.config.model.attention} attention; inference.json runs models/model.ts (medse not "
                       "needed), network_def + models/model.pt need medse"
                       + ("".join(f"; note: {n}" for n in notes)),
        "authors": "medse export",
        "copyright": "the run's owner",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR or CT",
                "num_channels": int(pred.in_channels), "spatial_shape": [int(v) for v in pred.roi_size],
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): f"channel {i}" for i in range(int(pred.in_channels))}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": int(pred.num_classes),
                "spatial_shape": [int(v) for v in pred.roi_size], "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": channels}},
        },
        "medse_notes": notes,
    }


def write_bundle(folder: Path, pred: Any, run: Any, model: Any, traced_ts: Path) -> BundleInfo:
    """Write the bundle's files into ``folder`` (an empty temporary folder the caller renames into place);
    ``traced_ts`` is the TorchScript file already checked for parity (moved into ``models/``)."""
    import torch

    from medse.export import _bundle_transforms

    info = BundleInfo()
    for sub in ("configs", "models", "scripts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    inference = _inference_config(pred, run.config, info.notes)
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (folder / "configs" / "metadata.json").write_text(json.dumps(_metadata(pred, run, info.notes), indent=2) + "\n")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "models" / "model.pt")
    shutil.move(str(traced_ts), folder / "models" / "model.ts")
    (folder / "scripts" / "__init__.py").write_text("from . import medse_transforms  # noqa: F401\n")
    shutil.copyfile(_bundle_transforms.__file__, folder / "scripts" / "medse_transforms.py")
    return info
