"""Predict label maps for new scans with a trained run, mapped back onto every input's own voxel grid.

:class:`Predictor` holds a network and the run's recorded preprocessing. ``predict_case(image_paths)``:

1. ``medse.data.preprocess.preprocess_case`` with the run's ``data.preprocess`` settings (reorientation,
   optional crop and resampling, intensity normalisation; NaN/Inf voxels replaced by the channel's finite
   minimum with a warning, or refused with ``strict_nonfinite``; wrong channel counts, 4D files and
   unreadable files raise :class:`~medse.utils.errors.MedseError` naming the file);
2. 3D networks: sliding windows (:func:`medse.inference.sliding.iter_window_slabs`, MONAI's window
   placement and Gaussian blending, streamed so that no float32 ``(K, X, Y, Z)`` is held);
   2D networks: slice by slice along the run's ``train.slice_axis``; an image or slice smaller than the window
   is padded up to the window (as MONAI does) and cropped back; optional flip TTA;
3. argmax per slab, then ``medse.data.preprocess.invert_to_original`` (nearest neighbour for the label
   map; with ``probabilities=True`` the class probabilities are inverted one class at a time, linearly,
   and the label map is their argmax);
4. class index -> label value (``dataset.json`` ``class_values``), optional largest connected component.

:func:`predict_folder` runs it over a folder / manifest, writes each mask with
:func:`medse.inference.writer.write_label_like` (input header copied, round-trip checked, atomic, fsync'd),
skips only masks its sidecar traces to the same run, checkpoint (sha256), settings and inputs, redoes this
run's own broken ones and refuses any other existing mask unless ``overwrite`` (docs/inference.md),
checks settings, the window against the network (UNETR's fixed ``img_size``) and the output folder before
loading anything, records failures in ``failures.csv`` (a full disk: ``no space left on device, <mask>``, the
batch goes on), lists every file of an input folder that is not an image among the failures (DICOM series
folders are cases), stops cleanly on SIGINT/SIGTERM (:class:`~medse.utils.interrupt.Interrupted`: where it
stopped, the command that resumes) and shards the cases over ``torchrun`` ranks (rank r takes
``cases[r::world]``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medse.runs import Run, build_model
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

__all__ = ["InputCase", "PredictReport", "Predictor", "collect_cases", "predict_folder"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_MANIFEST_SUFFIXES = (".json", ".csv")


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class InputCase:
    """One case to predict: an id and its channel files (one per channel, nnU-Net ``_XXXX`` order)."""

    case_id: str
    images: list[Path]
    error: str | None = None


def _split_suffix(path: Path) -> tuple[str, str]:
    from medse.data.io import split_suffix

    return split_suffix(path)


def _is_image(path: Path) -> bool:
    from medse.data.io import is_image_file, is_raster_file

    return path.is_file() and (is_image_file(path) or is_raster_file(path))


#: what an input folder may hold, for the one-line message about a file that is not one of them
SUPPORTED_INPUTS = ("NIfTI (.nii, .nii.gz), NRRD, MHA/MHD, DICOM series folders and, for 2D runs, PNG/JPEG/BMP/TIFF")


def _unsupported_case(f: Path, case_id: str | None = None) -> InputCase:
    suffix = _split_suffix(f)[1] or "no suffix"
    return InputCase(case_id or f.name, [f], f"not a supported image file ({suffix}): medse reads {SUPPORTED_INPUTS}")


def _companions(files: Sequence[Path], image_stems: set[str]) -> set[Path]:
    """Files that belong to an image without being one: the data halves of header/data pairs (``.img`` of
    ``.hdr``, ``.raw``/``.zraw`` of ``.mhd``/``.nhdr``), JSON sidecars of an image (BIDS ``case.json``),
    ``dataset.json`` and ``DICOMDIR`` (an index)."""
    headers = {_split_suffix(f)[0] for f in files if f.name.lower().endswith((".hdr", ".mhd", ".nhdr"))}
    out = set()
    for f in files:
        stem, suffix = _split_suffix(f)
        low = f.name.lower()
        if low in ("dataset.json", "dicomdir") or (suffix.lower() == ".json" and stem in image_stems):
            out.add(f)
        elif stem.split(".")[0] in headers and low.endswith((".img", ".img.gz", ".raw", ".raw.gz", ".zraw")):
            out.add(f)
    return out


def _dicom_file_case(f: Path) -> InputCase:
    """A single DICOM file given as the input: a one-file series (one slice or a multi-frame object), unless it
    is one slice of a larger series in its folder (then the folder must be given)."""
    import SimpleITK as sitk

    cid = _split_suffix(f)[0]
    with contextlib.suppress(RuntimeError):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(f.parent)):
            names = [Path(n).resolve() for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(f.parent), uid)]
            if f.resolve() in names and len(names) > 1:
                return InputCase(cid, [f], f"one slice of a DICOM series of {len(names)} files: give its folder "
                                           f"{f.parent} (medse reads the whole series)")
    return InputCase(cid, [f])


def _folder_cases(p: Path) -> list[InputCase]:
    """The cases of an input folder (see :func:`collect_cases`); every file that is not an image is a case with
    an error, so that it is listed among the failures, never skipped silently."""
    from medse.data.io import is_dicom_file

    entries = sorted(x for x in p.iterdir() if not x.name.startswith("."))
    files = [f for f in entries if f.is_file()]
    images = [f for f in files if _is_image(f)]
    dicoms = [f for f in files if is_dicom_file(f)]
    series_dirs = [d for d in entries if d.is_dir() and any(is_dicom_file(f) for f in d.iterdir() if f.is_file())]
    if not images and not dicoms and not series_dirs:
        if (p / "dataset.json").is_file() or any((p / d).is_dir() for d in ("images", "imagesTr", "imagesTs")):
            from medse.data.datasets import load_dataset

            spec = load_dataset(p)
            return sorted((InputCase(c.case_id, [Path(x) for x in c.images]) for c in spec.cases),
                          key=lambda c: c.case_id)
        found = f" (found: {', '.join(f.name for f in files[:5])}{', ...' if len(files) > 5 else ''})" if files else ""
        raise MedseError(f"no image files or DICOM series in the input folder{found}; medse reads {SUPPORTED_INPUTS}",
                         p)
    cases: list[InputCase] = []
    if dicoms and not images:  # the folder is itself one series: one case, named after the folder
        cases.append(InputCase(p.name, [p]))
    else:
        cases += [InputCase(f.name, [f], "stray DICOM file among other images: put each DICOM series in a folder "
                                         "of its own") for f in dicoms]
    for d in series_dirs:  # a folder of series folders: one case per folder, named after it
        cases.append(InputCase(d.name, [d]))
        inner = [f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")]
        skip = _companions(inner, set())
        cases += [_unsupported_case(f, f"{d.name}/{f.name}") for f in sorted(inner)
                  if not is_dicom_file(f) and f not in skip]
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f in images:
        stem = _split_suffix(f)[0]
        m = _CHANNEL_RE.match(stem)
        if m:
            groups.setdefault(m["case"], []).append((int(m["ch"]), f))
        else:
            groups.setdefault(stem, []).append((-1, f))
    for cid, items in groups.items():
        items.sort()
        files_ = [f for _, f in items]
        chans = [ch for ch, _ in items]
        error = None
        if len(items) > 1 and (-1 in chans or len(set(chans)) != len(chans)):
            error = f"several files for case '{cid}': {', '.join(f.name for f in files_)}"
        cases.append(InputCase(cid, files_, error))
    skip = _companions(files, {_split_suffix(f)[0] for f in images})
    cases += [_unsupported_case(f) for f in files if f not in skip and f not in images and f not in dicoms]
    return sorted(cases, key=lambda c: c.case_id)


def collect_cases(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputCase]:
    """The cases named by ``inputs``, sorted by case id.

    ``inputs`` may be a folder of images (``case.nii.gz`` single-channel, or nnU-Net channel files
    ``case_0000.nii.gz``, ``case_0001.nii.gz`` grouped into one case; 2D ``.png``/``.jpg``/``.bmp``/``.tif``
    for 2D runs), a folder holding one DICOM series (one case named after the folder), a folder of DICOM series
    folders (one case per folder, named after it), a dataset root or manifest
    (``medse.data.datasets.load_dataset``: JSON/CSV manifest, nnU-Net, MSD or folder layout), a single image
    file (a ``.dcm`` file: a one-file series, refused when it is one slice of a larger series), a list of image
    files (one single-channel case each), or a list of :class:`InputCase` (case id and its channel files, e.g.
    the test cases of a run's split).

    Files of an input folder that are not images (``.txt``, a stray ``.dcm`` among NIfTI files, ...) become
    cases with an ``error``, so that :func:`predict_folder` lists them among the failures; hidden files, JSON
    sidecars named like an image, ``dataset.json``, ``DICOMDIR`` and the data halves of header/data pairs are
    not listed.

    Raises:
        MedseError: the path does not exist, or no image was found.
    """
    if isinstance(inputs, (list, tuple)) and all(isinstance(c, InputCase) for c in inputs):
        return sorted(inputs, key=lambda c: c.case_id)  # type: ignore[arg-type]
    if isinstance(inputs, (list, tuple)):
        cases = [InputCase(_split_suffix(Path(p))[0], [Path(p)]) for p in inputs]
        return sorted(cases, key=lambda c: c.case_id)
    p = Path(inputs)  # type: ignore[arg-type]
    if not p.exists():
        raise MedseError("input folder or manifest not found", p)
    if p.is_file() and p.name.lower().endswith(_MANIFEST_SUFFIXES):
        from medse.data.datasets import load_dataset

        spec = load_dataset(p)
        return sorted((InputCase(c.case_id, [Path(x) for x in c.images]) for c in spec.cases),
                      key=lambda c: c.case_id)
    if p.is_file():
        from medse.data.io import is_dicom_file

        if is_dicom_file(p):
            return [_dicom_file_case(p)]
        return [InputCase(_split_suffix(p)[0], [p])]  # named explicitly: whatever SimpleITK reads is tried
    return _folder_cases(p)


# ------------------------------------------------------------------------------------------ settings
class InferenceSettingsError(MedseError, ValueError):
    """An inference setting out of its allowed range (a :class:`MedseError` and a ``ValueError``)."""


_BLENDS = ("gaussian", "constant")


def check_inference_settings(spatial_dims: int, *, roi_size: Any = None, overlap: Any = None, blend: Any = None,
                             sw_batch_size: Any = None, source: str = "") -> None:
    """Reject sliding-window settings outside their allowed range, before any model or case is loaded.

    ``roi_size``: ``spatial_dims`` integers >= 1 (required for 3D; None = whole slices for 2D);
    ``overlap`` in [0, 1); ``blend`` ``"gaussian"`` or ``"constant"``; ``sw_batch_size`` an integer >= 1.
    Arguments left None are not checked (except a missing 3D ``roi_size`` when ``source`` says it is final).

    Raises:
        InferenceSettingsError: one line naming the setting (``source``: where it came from, e.g. the
            run's config file), its value and the allowed range.
    """
    where = f" ({source})" if source else ""

    def fail(msg: str) -> None:
        raise InferenceSettingsError(msg + where)

    if roi_size is not None:
        try:
            vals = list(roi_size)
        except TypeError:
            vals = None
        if vals is None or len(vals) != spatial_dims:
            fail(f"roi_size {roi_size!r} must have {spatial_dims} entries for a {spatial_dims}D network")
        bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
               or not float(v).is_integer() or v < 1]
        if bad:
            fail(f"roi_size {list(vals)} must be {spatial_dims} integers >= 1 (got {bad[0]!r})")
    if overlap is not None:
        try:
            ov = float(overlap)
        except (TypeError, ValueError):
            ov = float("nan")
        if not 0.0 <= ov < 1.0:
            fail(f"overlap {overlap!r} must be in [0, 1)")
    if blend is not None and blend not in _BLENDS:
        fail(f"blend {blend!r} must be 'gaussian' or 'constant'")
    if sw_batch_size is not None and (isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, (int, np.integer))
                                      or sw_batch_size < 1):
        fail(f"sw_batch_size {sw_batch_size!r} must be an integer >= 1")


# --------------------------------------------------------------------------------------- predictor
def _load_weights(spec: _RunSpec, ck: Path) -> Any:
    """The run's network with the weights of checkpoint ``ck``."""
    from medse.utils.checkpoint import load_checkpoint

    state = load_checkpoint(ck)
    if "model" not in state:
        raise MedseError("checkpoint has no 'model' entry", ck)
    model = build_model(spec.cfg, spec.in_channels, spec.num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise MedseError(f"weights do not fit the configured model ({first[0] if first else e})", ck) from e
    return model


def _resolve_device(device: Any) -> Any:
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    return torch.device(device)


def _get(section: Any, key: str, default: Any = None) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


def _preprocess_config(data_section: Any) -> Any:
    from medse.data.preprocess import PreprocessConfig

    pre = _get(data_section, "preprocess")
    if pre is None:
        return PreprocessConfig()
    if isinstance(pre, PreprocessConfig):
        return pre
    if isinstance(pre, Mapping):
        from medse.utils.config import from_dict

        return from_dict(PreprocessConfig, dict(pre), prefix="data.preprocess")
    raise MedseError(f"config key 'data.preprocess': unsupported value {pre!r}")


@dataclass
class _RunSpec:
    """What a run folder says about inference, read without loading the weights."""

    run: Path
    cfg: Any
    labels: dict[str, int]
    class_values: list[int]
    num_classes: int
    in_channels: int
    kwargs: dict[str, Any]
    checkpoint: Path
    #: a line to show the user about the checkpoint chosen (``last.pt`` used because ``best.pt`` is missing)
    note: str | None = None


_OVERRIDES = ("roi_size", "overlap", "blend", "sw_batch_size", "tta_flips", "largest_component", "slice_axis",
              "amp", "stream_axis", "engine", "strict_nonfinite")


def _read_run(run_dir: str | os.PathLike, checkpoint: str, overrides: Mapping[str, Any],
              model_file: str | os.PathLike | None = None) -> _RunSpec:
    """Config, dataset.json and the inference settings (run's ``infer`` section + ``overrides``, checked);
    ``model_file`` (an exported network, ``medse predict --model``) takes the checkpoint's place."""
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        from medse.utils.errors import unknown_option_error

        raise unknown_option_error("Predictor override", sorted(unknown)[0], _OVERRIDES)
    run = Run.open(run_dir)
    cfg = run.config
    ds = run.dataset
    labels = dict(ds.labels)
    class_values = list(ds.class_values)
    num_classes = ds.num_classes
    in_channels = ds.num_channels
    inf = cfg.infer
    roi = inf.roi_size or cfg.train.patch_size
    run_kwargs: dict[str, Any] = dict(
        roi_size=None if roi is None else list(roi), overlap=inf.overlap, blend=inf.blend,
        sw_batch_size=inf.sw_batch_size, tta_flips=inf.tta_flips, largest_component=inf.largest_component,
        slice_axis=int(getattr(cfg.train, "slice_axis", 2)), amp=bool(getattr(cfg.train, "amp", True)),
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    dims = int(cfg.model.spatial_dims)
    # the run's own values first, so that an error names the right source
    check_inference_settings(dims, **{k: run_kwargs[k] for k in ("overlap", "blend", "sw_batch_size")
                                      if k not in given},
                             **({"roi_size": run_kwargs["roi_size"]} if "roi_size" not in given else {}),
                             source=f"infer.* / train.patch_size of {run.config_path}")
    check_inference_settings(dims, **{k: given[k] for k in ("roi_size", "overlap", "blend", "sw_batch_size")
                                      if k in given})
    run_kwargs.update(given)
    _check_window_fits(cfg, run_kwargs["roi_size"], "roi_size" in given, run.config_path)
    ck, note = (Path(model_file), None) if model_file is not None else _choose_checkpoint(run, checkpoint)
    return _RunSpec(run.path, cfg, labels, [int(v) for v in class_values], num_classes, in_channels, run_kwargs, ck,
                    note)


def _choose_checkpoint(run: Run, checkpoint: str) -> tuple[Path, str | None]:
    """The checkpoint file to load and a note when it is not the one asked for.

    ``best`` in a run without ``best.pt`` but with ``last.pt`` (training stopped, or the disk filled, before a
    validation made a best one) uses ``last.pt`` with a note; any other missing checkpoint is a one-line error
    naming the checkpoints the run has and how to pick one."""
    ck = run.checkpoint_path(checkpoint)
    if ck.is_file():
        return ck, None
    last = run.checkpoint_path("last")
    if str(checkpoint) == "best" and last.is_file():
        return last, f"{ck.name} not found in {ck.parent}; using {last.name} (the latest weights)"
    have = sorted(p.name for p in run.checkpoint_dir.glob("*.pt")) if run.checkpoint_dir.is_dir() else []
    if have:
        pick = " or ".join(f"--checkpoint {Path(n).stem if Path(n).stem in ('best', 'last') else run.checkpoint_dir / n}"
                           for n in have)
        hint = f"the run has {', '.join(have)}: pick it with {pick}"
    else:
        hint = "the run has no checkpoint (training stopped before it saved one)"
    raise MedseError(f"checkpoint not found; {hint}", ck)


def _check_window_fits(cfg: Any, roi: Sequence[int] | None, from_override: bool, config_path: Path) -> None:
    """Refuse a sliding window the run's network cannot take, before any model or case is loaded.

    Networks with a fixed input size (a ``ModelInfo.run_context`` holding ``img_size``: UNETR, whose position
    embeddings fix it) need the window to equal ``img_size``; the others pad any window to their size divisor
    (``size_divisor``), so every window fits them."""
    from medse.networks import list_models, run_context_kwargs

    m = cfg.model
    name = str(m.name).strip().lower().replace("-", "_")
    info = list_models().get(name)
    if roi is None or info is None or "img_size" not in info.run_context:
        return
    img = {**run_context_kwargs(name, cfg.train.patch_size), **dict(m.kwargs)}.get("img_size")
    if img is None:
        return
    dims = int(m.spatial_dims)
    img_t = tuple(int(v) for v in ((img,) * dims if isinstance(img, int) else img))
    if tuple(int(v) for v in roi) == img_t:
        return
    want = ",".join(map(str, img_t))
    got = ",".join(str(int(v)) for v in roi)
    where = "--roi-size" if from_override else f"infer.roi_size / train.patch_size of {config_path}"
    raise InferenceSettingsError(
        f"{where} {got} does not fit the run's network {name}: its input size is fixed to img_size {want} "
        f"(the transformer's position embeddings); use --roi-size {want}"
        + (" or leave --roi-size out" if from_override else ""))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_file_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, cached by (resolved path, size, mtime_ns) for this process."""
    from medse.inference.writer import file_sha256

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def _state_dict_sha256(model: Any) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and raw bytes of every tensor."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Predictor:
    """A trained network plus the preprocessing and inference settings of its run.

    Args:
        model: the network (``(B, C, *spatial) -> (B, K, *spatial)`` logits); put in eval mode.
        spatial_dims: 3 (sliding windows over the volume) or 2 (slice by slice).
        in_channels: channels the network expects; cases with another count fail with a one-line error.
        class_values: label value of each class index (``class_values[0]`` background). Defaults to
            ``range(K)`` when None.
        label_names: ``{name: value}`` for the sidecar JSON. Defaults to ``{"class_i": i}``.
        preprocess: a ``medse.data.preprocess.PreprocessConfig``. Defaults to its defaults.
        roi_size: sliding-window size (3 values for 3D, 2 for 2D windows inside each slice, or None for
            whole slices). Required for 3D networks.
        overlap: window overlap. Defaults to 0.5 (nnU-Net v2).
        blend: ``"gaussian"`` or ``"constant"``. Defaults to ``"gaussian"`` (nnU-Net v2).
        sw_batch_size: windows (or slices) per forward pass. Defaults to 2.
        tta_flips: average over all flips of the spatial axes. Defaults to False.
        largest_component: keep each label's largest connected component. Defaults to False.
        slice_axis: axis of the preprocessed volume 2D networks slice along. Defaults to 2.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``. Defaults to ``"auto"``.
        amp: autocast (float16) forward passes on CUDA. Defaults to True.
        stream_axis: axis the sliding window streams along; None picks the cheapest. Defaults to None.
        engine: ``"stream"`` (:func:`medse.inference.sliding.iter_window_slabs`, bounded memory) or
            ``"monai"`` (``monai.inferers.SlidingWindowInferer``, full float32 ``(K, X, Y, Z)``; same
            result up to float rounding). Defaults to ``"stream"``.
        strict_nonfinite: True refuses cases with NaN/Inf voxels (``nonfinite="error"``), False replaces
            them by the channel's finite minimum (``"replace"``). Defaults to None (``preprocess.nonfinite``,
            itself "replace" by default).
    """

    def __init__(
        self,
        model: Any,
        *,
        spatial_dims: int,
        in_channels: int,
        class_values: Sequence[int] | None = None,
        label_names: Mapping[str, int] | None = None,
        preprocess: Any = None,
        roi_size: Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "gaussian",
        sw_batch_size: int = 2,
        tta_flips: bool = False,
        largest_component: bool = False,
        slice_axis: int = 2,
        device: Any = "auto",
        amp: bool = True,
        stream_axis: int | None = None,
        engine: str = "stream",
        strict_nonfinite: bool | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if spatial_dims == 3 and roi_size is None:
            raise InferenceSettingsError("roi_size is required for 3D networks")
        check_inference_settings(spatial_dims, roi_size=roi_size, overlap=overlap, blend=blend,
                                 sw_batch_size=sw_batch_size)
        if engine not in ("stream", "monai"):
            raise ValueError(f"engine must be 'stream' or 'monai', got {engine!r}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        import monai.data.utils  # noqa: F401  (imported here, once, rather than inside the first case)
        import monai.inferers  # noqa: F401

        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.class_values = None if class_values is None else [int(v) for v in class_values]
        self.label_names = dict(label_names) if label_names else None
        if strict_nonfinite is not None:
            import dataclasses

            from medse.data.preprocess import PreprocessConfig

            base = preprocess if preprocess is not None else PreprocessConfig()
            preprocess = dataclasses.replace(base, nonfinite="error" if strict_nonfinite else "replace")
        self.preprocess = preprocess
        self.roi_size = None if roi_size is None else [int(r) for r in roi_size]
        self.overlap = float(overlap)
        self.blend = blend
        self.sw_batch_size = int(sw_batch_size)
        self.tta_flips = bool(tta_flips)
        self.largest_component = bool(largest_component)
        self.slice_axis = int(slice_axis)
        self.amp = bool(amp)
        self.stream_axis = stream_axis
        self.engine = engine
        self.run_dir: Path | None = None
        self.checkpoint: Path | None = None
        self.last_props: dict[str, Any] | None = None
        self._identity: dict[str, Any] | None = None
        #: seconds spent per stage, summed over the cases (see :func:`predict_folder` for what each key
        #: counts when cases are pipelined); updated from several threads through :meth:`_add_time`
        self.timings: dict[str, float] = {"preprocess": 0.0, "forward": 0.0, "postprocess": 0.0, "write": 0.0}
        self._timings_lock = threading.Lock()

    # ------------------------------------------------------------------ construction from a run
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, checkpoint: str = "best", device: Any = "auto",
                 **overrides: Any) -> Predictor:
        """Build the network of ``run_dir`` and load a checkpoint.

        Args:
            run_dir: a training run folder (``config.yaml``, ``dataset.json``, ``checkpoints/``).
            checkpoint: ``"best"``, ``"last"`` or a path to a ``.pt`` file. Defaults to ``"best"``.
            device: see :class:`Predictor`. Defaults to ``"auto"``.
            overrides: Predictor arguments overriding the run's ``infer`` section (``roi_size``,
                ``overlap``, ``blend``, ``sw_batch_size``, ``tta_flips``, ``largest_component``, ``amp``,
                ``stream_axis``, ``engine``, ``strict_nonfinite``).

        Raises:
            MedseError: naming the missing/invalid file (config, dataset.json, checkpoint) or key, or an
                inference setting out of range (checked before the checkpoint is read).
        """
        spec = _read_run(run_dir, checkpoint, overrides)
        if spec.note:
            import warnings

            warnings.warn(spec.note, UserWarning, stacklevel=2)
        return cls._from_spec(spec, device)

    @classmethod
    def _from_spec(cls, spec: _RunSpec, device: Any, exported: bool = False) -> Predictor:
        ck = spec.checkpoint
        if exported:  # an exported network (medse.export) in the network's place; the run gives the rest
            from medse.export.runtime import check_window, load_network, network_format

            if network_format(ck) == "onnx":
                if str(device) not in ("auto", "cpu"):
                    raise MedseError(f"an ONNX model runs on onnxruntime's CPU provider; use --device cpu, not "
                                     f"{device}", ck)
                device = "cpu"
            check_window(ck, spec.kwargs.get("roi_size"))
            model = load_network(ck, in_channels=spec.in_channels, num_classes=spec.num_classes)
        else:
            model = _load_weights(spec, ck)
        pred = cls(
            model, spatial_dims=spec.cfg.model.spatial_dims, in_channels=spec.in_channels,
            class_values=spec.class_values, label_names=spec.labels or None,
            preprocess=_preprocess_config(spec.cfg.data), device=device, **spec.kwargs,
        )
        pred.run_dir = spec.run
        pred.checkpoint = ck
        return pred

    # ------------------------------------------------------------------ identity (what a mask was made with)
    def identity(self) -> dict[str, Any]:
        """What made this predictor's masks: resolved run folder, checkpoint path and the sha256 of its
        file (or, without a checkpoint file, of the model's state dict). Computed once and cached."""
        if self._identity is None:
            ident: dict[str, Any] = {
                "run_dir": str(Path(self.run_dir).resolve()) if self.run_dir else None,
                "checkpoint": str(Path(self.checkpoint).resolve()) if self.checkpoint else None,
                "checkpoint_sha256": None,
                "model_sha256": None,
            }
            if self.checkpoint is not None and Path(self.checkpoint).is_file():
                ident["checkpoint_sha256"] = _cached_file_sha256(Path(self.checkpoint))
            else:
                ident["model_sha256"] = _state_dict_sha256(self.model)
            self._identity = ident
        return dict(self._identity)

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the predicted labels (recorded in each mask's sidecar and compared
        before a finished case is skipped): window, overlap, blending, TTA, largest component, slicing,
        class values and preprocessing (all but ``nonfinite``, which only decides whether a case fails)."""
        from medse.utils.config import to_dict

        pre = to_dict(self.preprocess) if self.preprocess is not None else None
        if isinstance(pre, dict):
            pre.pop("nonfinite", None)
        return {
            "spatial_dims": self.spatial_dims,
            "roi_size": self.roi_size,
            "overlap": self.overlap,
            "blend": self.blend,
            "tta_flips": self.tta_flips,
            "largest_component": self.largest_component,
            "slice_axis": self.slice_axis if self.spatial_dims == 2 else None,
            "class_values": self.class_values,
            "preprocess": pre,
        }

    # ------------------------------------------------------------------ core
    @property
    def num_classes(self) -> int | None:
        return None if self.class_values is None else len(self.class_values)

    def _add_time(self, key: str, seconds: float) -> None:
        with self._timings_lock:
            self.timings[key] = self.timings.get(key, 0.0) + seconds

    def _network(self) -> Any:
        import torch

        model = self.model
        amp = self.amp and self.device.type == "cuda"

        def forward(x: Any) -> Any:
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, enabled=amp):
                y = model(x)
            y = y.float()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._add_time("forward", time.perf_counter() - t0)
            return y

        if self.tta_flips:
            from medse.inference.sliding import flip_tta

            return flip_tta(forward, self.spatial_dims)
        return forward

    def predict_preprocessed(self, image: np.ndarray, *, probabilities: bool = False
                             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class-index map (and float16 probabilities ``(K, *shape)``) of a preprocessed ``(C, X, Y, Z)``."""
        return self._predict_deferred(image, probabilities, defer=False)()

    def _predict_deferred(self, image: np.ndarray, probabilities: bool, defer: bool
                          ) -> Callable[[], tuple[np.ndarray, np.ndarray | None]]:
        """Run the network over ``image``; returns ``finish()`` -> :meth:`predict_preprocessed`'s result.

        With ``defer`` (3D sliding window), this returns as soon as the last window batch is back from the
        network: ``finish`` then blends what is left and argmaxes the last slabs, and may be called from
        another thread (:func:`predict_folder`'s writer does it while the next case is in the network).
        Without it, or for the other engines, everything is done here and ``finish`` only hands it over."""
        import torch

        from medse.inference.sliding import (
            LabelAssembler,
            iter_slice_slabs,
            iter_window_slabs,
            monai_sliding_window,
        )

        if image.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        net = self._network()
        done = threading.Event() if defer else None
        asm = LabelAssembler(image.shape[1:], probabilities)
        with torch.inference_mode():
            if self.spatial_dims == 3 and self.engine == "monai":
                full = monai_sliding_window(x, net, self.roi_size, overlap=self.overlap,  # type: ignore[arg-type]
                                            mode=self.blend, sw_batch_size=self.sw_batch_size, device=self.device)
                slabs = iter([(2, 0, int(full.shape[-1]), full)])
            elif self.spatial_dims == 3:
                # background: the next window batch's forward runs while this one is blended and argmaxed
                slabs = iter_window_slabs(
                    x, net, self.roi_size, overlap=self.overlap, mode=self.blend,  # type: ignore[arg-type]
                    sw_batch_size=self.sw_batch_size, device=self.device, axis=self.stream_axis, background=True,
                    forwards_done=done)
            else:
                slabs = iter_slice_slabs(
                    x, net, axis=self.slice_axis, batch_size=max(1, self.sw_batch_size), roi_size=self.roi_size,
                    overlap=self.overlap, mode=self.blend, sw_batch_size=self.sw_batch_size, device=self.device)
            deferred = False
            for slab in slabs:
                if slab is None:  # the network is done with this case: the rest can wait for another thread
                    deferred = True
                    break
                asm.add(*slab)

        def finish() -> tuple[np.ndarray, np.ndarray | None]:
            if deferred:
                with torch.inference_mode():
                    for slab in slabs:
                        asm.add(*slab)
            labels, probs = asm.result()
            if self.num_classes is not None and probs is not None and probs.shape[0] != self.num_classes:
                raise MedseError(f"network returned {probs.shape[0]} classes, dataset.json says {self.num_classes}")
            return labels, probs

        return finish

    def _read(self, image_paths: Sequence[Path]) -> tuple[np.ndarray, dict[str, Any]]:
        from medse.data.io import is_raster_file
        from medse.data.preprocess import PreprocessConfig, preprocess_case

        if self.spatial_dims == 3:
            for p in image_paths:
                if is_raster_file(p) and not str(p).lower().endswith((".tif", ".tiff")):
                    raise MedseError(f"2D image ({_split_suffix(Path(p))[1]}) but the run's network is 3D: 3D runs "
                                     "predict volumes (NIfTI, NRRD, MHA, DICOM series); 2D images need a 2D run", p)

        cfg = self.preprocess if self.preprocess is not None else PreprocessConfig()
        image, _, props = preprocess_case(list(image_paths), None, cfg, expected_channels=self.in_channels)
        return image, props

    def predict_case(self, image_paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                     return_probabilities: bool = False, warn_nonfinite: bool = True) -> Any:
        """Label map of one case in the original grid of its (first) image file.

        NaN/Inf voxels are replaced by their channel's finite minimum (``preprocess.nonfinite``,
        ``strict_nonfinite``) with a :class:`~medse.data.preprocess.NonFiniteWarning` naming the count
        (``warn_nonfinite=False``: no warning; the count is in ``self.last_props["nonfinite_voxels"]``).

        Args:
            image_paths: one file per channel (or one file).
            return_probabilities: also return class probabilities ``(X, Y, Z, K)`` float32 in the original
                grid. Defaults to False.

        Returns:
            ``labels`` (uint8, uint16 above 255), shape = the input file's (x, y, z); or
            ``(labels, probabilities)``.

        Raises:
            MedseError: unreadable/4D input, NaN/Inf input with ``nonfinite="error"``, or wrong channel
                count, naming the file.
        """
        from medse.data.preprocess import NonFiniteWarning, nonfinite_message

        paths = [Path(image_paths)] if isinstance(image_paths, (str, os.PathLike)) else [Path(p) for p in image_paths]
        self.last_props = None
        t0 = time.perf_counter()
        image, props = self._read(paths)
        self.last_props = props
        msg = nonfinite_message(props)
        if msg and warn_nonfinite:
            import warnings

            warnings.warn(msg, NonFiniteWarning, stacklevel=2)
        self._add_time("preprocess", time.perf_counter() - t0)
        (idx, probs), _ = self._predict_timed(image, return_probabilities)
        del image
        t2 = time.perf_counter()
        res = self._finish(idx, probs, props, paths[0], return_probabilities)
        self._add_time("postprocess", time.perf_counter() - t2)
        return res

    def _predict_timed(self, image: np.ndarray, probabilities: bool, defer: bool = False) -> tuple[Any, float]:
        """:meth:`_predict_deferred` with its time outside the network added to ``timings["postprocess"]``;
        returns ``(result, wall seconds)``: ``result`` is ``(labels, probs)``, or with ``defer`` the ``finish``
        callable that produces them (its own time is not counted here). One case at a time (the forward
        delta is this case's)."""
        f0 = self.timings["forward"]
        t1 = time.perf_counter()
        finish = self._predict_deferred(image, probabilities, defer=defer)
        result = finish if defer else finish()
        wall = time.perf_counter() - t1
        # time in here that is not the network: blending, argmax, buffers, softmax
        self._add_time("postprocess", wall - (self.timings["forward"] - f0))
        return result, wall

    def _finish(self, idx: np.ndarray, probs: np.ndarray | None, props: dict[str, Any], reference: Path,
                return_probabilities: bool) -> Any:
        """Class indices (and float16 probabilities) of the preprocessed grid -> label values (and float32
        probabilities ``(X, Y, Z, K)``) on the original file's grid; largest component if configured."""
        from medse.data.preprocess import invert_to_original

        shape = tuple(int(s) for s in props["original_shape"])
        out_probs = None
        if probs is None:
            idx = invert_to_original(idx, props, is_label=True)
        else:
            k = probs.shape[0]
            out_probs = np.zeros((*shape, k), dtype=np.float32)
            for c in range(k):
                out_probs[..., c] = invert_to_original(probs[c].astype(np.float32), props, is_label=False)
            del probs
            idx = np.argmax(out_probs, axis=-1)
        if tuple(idx.shape) != shape:
            raise MedseError(f"prediction shape {tuple(idx.shape)} differs from the input grid {shape}", reference)
        values = self.class_values or list(range(int(idx.max()) + 1))
        from medse.inference.writer import label_dtype

        dtype = label_dtype(max(values))
        if values == list(range(len(values))) and idx.dtype == dtype and (idx.size == 0 or
                                                                        int(idx.max()) < len(values)):
            labels = idx  # class index == label value: the lookup would be a copy of idx
        else:
            lut = np.asarray(values, dtype=dtype)
            labels = lut[idx if idx.dtype.kind == "u" else np.asarray(idx, dtype=np.intp)]
        if self.largest_component:
            from medse.inference.postprocess import keep_largest_component

            labels = keep_largest_component(labels, [v for v in values if v != 0])
        if return_probabilities:
            return labels, out_probs
        return labels


# --------------------------------------------------------------------------------------- batches
@dataclass
class PredictReport:
    """What :func:`predict_folder` did: masks written, cases skipped (finished by the same run, checkpoint
    and settings), failures (including existing masks refused without ``overwrite``), cases redone because
    their own earlier output was broken (``(case, reason)``), NaN/Inf voxel counts replaced per case, and
    stale temporary files removed at the start."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    redone: list[tuple[str, str]] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    removed_temp: list[Path] = field(default_factory=list)
    failures_csv: Path | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    #: wall seconds of each predicted case (preprocess + network + postprocess; writing excluded)
    case_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"{len(self.written)} written, {len(self.skipped)} skipped (already there), "
                f"{len(self.failed)} failed in {self.seconds:.1f} s")


def _dist_info() -> tuple[int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise MedseError(f"invalid RANK={rank} / WORLD_SIZE={world} in the environment")
    return rank, world


def _gather_failures(failed: list[tuple[str, str]], world: int) -> list[tuple[str, str]]:
    if world <= 1:
        return failed
    import torch.distributed as dist

    if not dist.is_available() or (not dist.is_initialized() and "MASTER_ADDR" not in os.environ):
        return failed  # no rendezvous: each rank reports its own (failures.rank{r}.csv)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, failed)
    if created:  # ours: every rank has its answer, tear the group down again
        dist.barrier()
        dist.destroy_process_group()
    out = [tuple(f) for part in gathered for f in (part or [])]
    return sorted(out)  # type: ignore[arg-type]


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def write_failures_csv(path: Path, failed: Sequence[tuple[str, str]], inputs: Mapping[str, list[Path]]) -> Path:
    """``case_id,inputs,error`` one row per failed case (inputs joined with ``;``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case_id", "inputs", "error"])
    for cid, msg in failed:
        w.writerow([cid, ";".join(str(p) for p in inputs.get(cid, [])), msg])
    atomic_write_text(path, buf.getvalue())
    return path


_SETTINGS_ORDER = ("roi_size", "overlap", "blend", "tta_flips", "largest_component", "slice_axis", "spatial_dims",
                   "class_values", "preprocess")


def _input_stats(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Resolved path, size and mtime of each input (a DICOM series folder: its files' total size and newest
    mtime, so that a slice replaced in place makes the mask stale)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            sts = [f.stat() for f in p.iterdir() if f.is_file()]
            size, mtime = sum(st.st_size for st in sts), max((st.st_mtime_ns for st in sts), default=0)
        else:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        out.append({"path": str(p.resolve()), "size": size, "mtime_ns": mtime})
    return out


def _existing_output(target: Path, case: InputCase, identity: Mapping[str, Any], settings: Mapping[str, Any],
                     prob_target: Path | None) -> tuple[str, str]:
    """What to do with a case whose mask exists (no ``overwrite``): ``("skip"|"redo"|"refuse", reason)``.

    The rule (docs/inference.md): skip only a mask that this run and checkpoint wrote with the same
    output-changing settings and inputs, that still reads back (sha256 as recorded, header and data load,
    shape of the input). Redo what is provably this run's own but broken or stale (mask unreadable or
    truncated, input files updated in place, requested probabilities missing). Refuse everything else
    (no or unreadable sidecar, another run or checkpoint, other settings, other input files, a mask
    edited after it was written): the user decides with ``overwrite``.
    """
    from medse.inference.writer import file_sha256, mask_file_problem, read_sidecar

    side, why = read_sidecar(target)
    if side is None:
        return "refuse", f"mask exists with {why}: cannot tell which run wrote it; pass --overwrite"
    if not side.get("checkpoint_sha256") and not side.get("model_sha256"):
        return "refuse", "mask exists from another run/checkpoint (its sidecar records no checkpoint hash); " \
                         "pass --overwrite"
    for key, what in (("run_dir", "run"), ("checkpoint_sha256", "checkpoint"), ("model_sha256", "model")):
        if side.get(key) != identity.get(key):
            theirs_ = side.get(key)
            shown = theirs_[:12] if key.endswith("sha256") and isinstance(theirs_, str) else theirs_
            return "refuse", f"mask exists from another {what} ({shown}); pass --overwrite"
    theirs = side.get("settings") if isinstance(side.get("settings"), dict) else {}
    diffs = [f"{k} {theirs.get(k)!r} -> {settings.get(k)!r}" for k in _SETTINGS_ORDER
             if json.dumps(theirs.get(k), sort_keys=True, default=str) != json.dumps(settings.get(k), sort_keys=True,
                                                                                   default=str)]
    if diffs:
        return "refuse", f"mask exists from other inference settings ({'; '.join(diffs)}); pass --overwrite"
    recorded = side.get("input_files") if isinstance(side.get("input_files"), list) else []
    current = _input_stats(case.images)
    if [r.get("path") for r in recorded if isinstance(r, dict)] != [c["path"] for c in current]:
        return "refuse", "mask exists for other input files (" + \
            ", ".join(str(r.get("path")) for r in recorded if isinstance(r, dict)) + "); pass --overwrite"
    sha_ok = False
    try:
        sha_ok = file_sha256(target) == side.get("mask_sha256")
    except OSError as e:
        return "redo", f"existing mask unreadable ({e.strerror or type(e).__name__})"
    problem = mask_file_problem(target, case.images[0], read_data=not sha_ok)
    if problem is not None:
        return "redo", f"existing mask {problem}"
    if not sha_ok:
        return "refuse", "mask was modified after medse wrote it (sha256 differs from its sidecar); pass --overwrite"
    if [(r.get("size"), r.get("mtime_ns")) for r in recorded] != [(c["size"], c["mtime_ns"]) for c in current]:
        return "redo", "input file changed since the mask was written"
    if prob_target is not None:
        if not prob_target.is_file():
            return "redo", "probabilities requested but missing"
        if file_sha256(prob_target) != side.get("probabilities_sha256"):
            return "redo", "probabilities file differs from the one recorded in the sidecar"
    return "skip", ""


def _stopped(report: PredictReport, pending: tuple[_Prepared, Any] | None, cases: Sequence[InputCase], at: int,
             out: Path, created: Sequence[Path], resume: str | None) -> None:
    """Raise :class:`~medse.utils.interrupt.Interrupted` for a batch stopped at case ``at``; the write that was in
    flight counts as done when it finished. Folders this call created are removed again while still empty."""
    from medse.utils.interrupt import Interrupted

    if pending is not None:
        job, fut = pending
        with contextlib.suppress(Exception):
            fut.result()
            assert job.target is not None
            report.written.append(job.target)
    done = len(report.written) + len(report.skipped) + len(report.failed)
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty folder goes
    n = len(cases)
    current = f"case {at + 1} of {n} ({cases[at].case_id})" if cases else "the start"
    raise Interrupted(f"{current}: {done} of {n} cases done ({len(report.written)} masks written"
                      f"{f', {len(report.failed)} failed' if report.failed else ''}) in {out}", resume=resume)


def _failure_message(e: BaseException) -> str:
    """One line for a failed case: the error's message, with its type unless it is a MedseError, ValueError
    or OSError."""
    msg = str(e).replace("\n", " ").strip() or type(e).__name__
    if not isinstance(e, (MedseError, ValueError, OSError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg


@dataclass
class _Prepared:
    """One case on its way through :func:`predict_folder`'s pipeline."""

    case: InputCase
    action: str = "fail"  # "predict" | "skip" | "fail"
    error: str | None = None
    redo: str | None = None
    target: Path | None = None
    prob_target: Path | None = None
    image: np.ndarray | None = None
    props: dict[str, Any] | None = None
    read_s: float = 0.0
    n_bad: int = 0


class _Inline:
    """A "future" whose call runs in the calling thread: at once, or (``lazy``) when its result is asked for."""

    def __init__(self, fn: Any, args: tuple[Any, ...], lazy: bool) -> None:
        self._call: tuple[Any, tuple[Any, ...]] | None = (fn, args)
        self._value: Any = None
        self._error: Exception | None = None
        if not lazy:
            self._run()

    def _run(self) -> None:
        if self._call is not None:
            fn, args = self._call
            self._call = None
            try:
                self._value = fn(*args)
            except Exception as e:
                self._error = e

    def result(self) -> Any:
        self._run()
        if self._error is not None:
            raise self._error
        return self._value


class _Worker:
    """One background thread running calls in order (``concurrent.futures``), or, when not ``threaded``,
    the calls made in the calling thread (``lazy``: only when their result is asked for).

    An exception raised by a call is raised again by its future's ``result()`` in the caller's thread."""

    def __init__(self, name: str, threaded: bool, lazy: bool = False) -> None:
        self._pool = None
        self._lazy = lazy
        if threaded:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Any, *args: Any) -> Any:
        return _Inline(fn, args, self._lazy) if self._pool is None else self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:  # a write in flight is finished (it is atomic either way); queued calls dropped
            self._pool.shutdown(wait=True, cancel_futures=True)


def predict_folder(
    run_dir: str | os.PathLike | Predictor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    checkpoint: str = "best",
    device: Any = "auto",
    save_probabilities: bool = False,
    progress: bool = True,
    echo: Any = None,
    warmup: bool = False,
    prefetch: bool = True,
    resume: str | None = None,
    model_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> PredictReport:
    """Predict every case of ``inputs`` into ``output_dir``; failures don't stop the batch.

    Before any model or case is loaded: the inference settings are checked (run's ``infer`` section and
    ``overrides``; :func:`check_inference_settings`), the inputs are listed, and ``output_dir`` is created
    and checked for writing (a one-line :class:`MedseError` naming it). Temporary files a killed run left
    for this rank's cases are removed.

    Args:
        run_dir: a run folder (or a ready :class:`Predictor`).
        inputs: folder, manifest, image file or list of files (see :func:`collect_cases`).
        output_dir: where ``{case_id}{input suffix}`` masks and ``{case_id}.json`` sidecars go
            (probabilities in ``output_dir/probabilities/``).
        overwrite: redo every case whose mask exists. Defaults to False: a finished case of the same run,
            checkpoint, settings and inputs is skipped (a killed run resumes), this run's own broken
            outputs are redone, and any other existing mask is refused (a failure naming the reason).
        checkpoint: ``"best"``, ``"last"`` or a path. Defaults to ``"best"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"``. Defaults to ``"auto"`` (``cuda:LOCAL_RANK`` under torchrun).
        save_probabilities: also write float32 class probabilities ``(x, y, z, K)``. Defaults to False.
        progress: tqdm bar over the cases. Defaults to True.
        echo: callable taking a line for per-case failures and warnings. Defaults to ``tqdm.write`` to stderr.
        warmup: predict the first case once, untimed and unwritten, before the batch (allocator and kernel
            warm-up), so that ``report.case_seconds`` of the first case is comparable. Defaults to False.
        prefetch: pipeline the cases: a reader thread checks the existing mask and reads + preprocesses
            case i+1, and a writer thread maps case i-1 back to its grid and writes it (round-trip check,
            sidecar), while case i runs through the network. Masks, sidecars, failures and the order of
            ``report`` entries and echoed lines are those of ``prefetch=False``; a failure in either thread
            is that case's failure. Costs the memory of one more preprocessed image and one more label map.
            Defaults to True.
        resume: the command that continues the batch, for the message of an interruption. Defaults to None.
        model_file: an exported network (``model.onnx``, run by onnxruntime on the CPU, or ``model.ts``;
            :mod:`medse.export`) in place of the checkpoint; the run still gives the preprocessing, windows and
            labels. Defaults to None.
        overrides: inference settings passed to :meth:`Predictor.from_run` (``strict_nonfinite=True``
            refuses NaN/Inf voxels instead of replacing them).

    Raises:
        Interrupted: on ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM inside
            :func:`medse.utils.interrupt.stop_on_signals`) during the batch: the mask being written is finished
            (or nothing is left under its name), and the exception says at which case it stopped, how many were
            done and where the masks are; rerunning the same command skips the finished cases.

    Returns:
        A :class:`PredictReport`. Failures are also in ``output_dir/failures.csv`` (removed when a run has
        none). Under ``torchrun`` rank r predicts ``cases[r::world]`` and rank 0 writes the merged CSV.
        ``report.timings``: ``forward`` (network forward passes), and the time the batch spent *waiting*
        for each other stage: ``preprocess`` (the next case's existing-mask check, read and preprocessing),
        ``postprocess`` (blending and argmax not hidden behind the forward passes) and ``write`` (mapping
        back, label lookup, writing with its round-trip check); ``background_read`` / ``background_write``:
        the seconds the reader / writer threads worked (hidden behind the forward passes where they exceed
        the waits). Without ``prefetch`` the waits are the stages' whole durations.
    """
    import sys

    from tqdm.auto import tqdm

    from medse.inference.writer import file_sha256, output_suffix, write_label_like, write_probabilities_like
    from medse.utils.atomic import ensure_writable_dir, stale_temp_files

    t_start = time.perf_counter()
    out = Path(output_dir)
    spec = None
    if isinstance(run_dir, Predictor):
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ValueError(f"inference overrides ({', '.join(given)}) cannot be applied to a ready Predictor; "
                             "set them on it")
    else:
        spec = _read_run(run_dir, checkpoint, overrides, model_file)  # settings checked, nothing loaded yet
    if echo is None:
        def echo(line: str) -> None:
            tqdm.write(line, file=sys.stderr)
    all_cases = collect_cases(inputs)
    rank, world = _dist_info()
    cases = all_cases[rank::world]
    if spec is not None and spec.note and rank == 0:
        echo(f"note: {spec.note}")
    created = ensure_writable_dir(out)
    if save_probabilities:
        created += ensure_writable_dir(out / "probabilities", "probabilities folder")
    try:
        predictor = run_dir if isinstance(run_dir, Predictor) else \
            Predictor._from_spec(spec, device, exported=model_file is not None)  # type: ignore[arg-type]
    except BaseException:
        for d in reversed(created):  # nothing was written: leave no empty folder behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    report = PredictReport()
    targets = {c.case_id: out / f"{c.case_id}{output_suffix(c.images[0])}" for c in cases if c.images}
    from medse.inference.writer import sidecar_path

    own_files = [f for t in targets.values() for f in (t, sidecar_path(t), out / "probabilities" / t.name)]
    own_files += [out / "failures.csv", out / f"failures.rank{rank}.csv"] if rank == 0 else \
        [out / f"failures.rank{rank}.csv"]
    for tmp in stale_temp_files(own_files):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            report.removed_temp.append(tmp)
    if report.removed_temp:
        echo(f"removed {len(report.removed_temp)} temporary file(s) left by an interrupted run in {out}")
    identity = predictor.identity()
    settings = predictor.output_settings()
    base: dict[str, Any] = {**identity, "settings": settings}
    try:
        import medse

        base["medse_version"] = medse.__version__
    except Exception:  # pragma: no cover
        pass
    seen: set[str] = set()
    input_files = {Path(p).resolve() for c in all_cases for p in c.images}
    from medse.utils.progress import progress as progress_bar  # a tqdm bar on a terminal, plain lines otherwise

    if warmup and cases and cases[0].images and not cases[0].error:
        with contextlib.suppress(Exception):  # a bad first case is reported by the loop below
            predictor.predict_case(cases[0].images, warn_nonfinite=False)

    # what can be decided without touching a file, in input order (as before: the first of two equal ids wins)
    checks: list[str | None] = []
    for case in cases:
        cid = case.case_id
        problem = None
        if case.error:
            problem = "error"
        elif cid in seen:
            problem = "duplicate"
        else:
            seen.add(cid)
            if targets[cid].resolve() in input_files:
                problem = "input"
        checks.append(problem)

    def prepare(case: InputCase, problem: str | None) -> _Prepared:
        """Existing-mask decision, then read + preprocess (reader thread); exceptions stay with the case."""
        job = _Prepared(case)
        t0 = time.perf_counter()
        try:
            if problem == "error":  # one file: name it; several (a case's channel files): their folder
                raise MedseError(case.error or "", case.images[0] if len(case.images) == 1 else case.images[0].parent)
            if problem == "duplicate":
                raise MedseError(f"duplicate case id '{case.case_id}' in the inputs", case.images[0])
            job.target = target = targets[case.case_id]
            if problem == "input":
                raise MedseError("the mask would overwrite an input scan: choose another output folder", target)
            job.prob_target = out / "probabilities" / target.name if save_probabilities else None
            if (target.exists() or target.is_symlink()) and not overwrite:
                action, reason = _existing_output(target, case, identity, settings, job.prob_target)
                if action == "skip":
                    job.action = "skip"
                    return job
                if action == "refuse":
                    raise MedseError(reason, target)
                job.redo = reason
            t1 = time.perf_counter()
            job.image, job.props = predictor._read(case.images)
            job.read_s = time.perf_counter() - t1
            job.action = "predict"
        except Exception as e:  # one bad case never stops the batch
            job.action, job.error = "fail", _failure_message(e)
        finally:
            predictor._add_time("background_read", time.perf_counter() - t0)
        return job

    def finish_and_write(job: _Prepared, finish: Callable[[], tuple[np.ndarray, np.ndarray | None]]) -> float:
        """The case's last blending and argmax, map back, label lookup, write mask (+ probabilities) and
        sidecar (writer thread, while the next case is in the network); its seconds."""
        t0 = time.perf_counter()
        try:
            assert job.target is not None and job.props is not None
            idx, probs = finish()
            del finish
            res = predictor._finish(idx, probs, job.props, job.case.images[0], save_probabilities)
            labels, out_probs = res if save_probabilities else (res, None)
            del idx, probs, res
            extra = {**base, "case_id": job.case.case_id, "inputs": [str(p) for p in job.case.images],
                     "input_files": _input_stats(job.case.images), "nonfinite_voxels": job.n_bad}
            if out_probs is not None:
                assert job.prob_target is not None
                write_probabilities_like(out_probs, job.case.images[0], job.prob_target)
                extra["probabilities_sha256"] = file_sha256(job.prob_target)
            del out_probs
            write_label_like(labels, job.case.images[0], job.target, label_names=predictor.label_names, extra=extra)
        finally:
            predictor._add_time("background_write", time.perf_counter() - t0)
        return time.perf_counter() - t0

    def fail(cid: str, msg: str) -> None:
        report.failed.append((cid, msg))
        echo(f"failed: {cid}: {msg}")

    reader = _Worker("medse-predict-read", prefetch, lazy=True)  # inline: read when the loop gets there
    writer = _Worker("medse-predict-write", prefetch)
    pending: tuple[_Prepared, Any] | None = None  # the case being written and its future

    def settle() -> None:
        """Wait for the write in flight and record its outcome (before any later case's)."""
        nonlocal pending
        if pending is None:
            return
        job, fut = pending
        t0 = time.perf_counter()
        try:
            seconds = fut.result()  # a stop (SIGINT/SIGTERM) while waiting leaves `pending` for the summary
        except Exception as e:
            pending = None
            fail(job.case.case_id, _failure_message(e))
        else:
            pending = None
            report.case_seconds[job.case.case_id] += seconds
            assert job.target is not None
            report.written.append(job.target)
        finally:
            predictor._add_time("write", time.perf_counter() - t0)

    for k in ("background_read", "background_write"):
        predictor.timings.setdefault(k, 0.0)
    bar = progress_bar(cases, desc="predict", unit="case", disable=not progress or rank != 0, file=sys.stderr)
    at = 0  # the case in progress, for the line an interruption prints
    stopped = False
    try:
        nxt = reader.submit(prepare, cases[0], checks[0]) if cases else None
        for i, case in enumerate(bar):
            at = i
            cid = case.case_id
            t0 = time.perf_counter()
            job = nxt.result()  # type: ignore[union-attr]
            predictor._add_time("preprocess", time.perf_counter() - t0)
            nxt = reader.submit(prepare, cases[i + 1], checks[i + 1]) if i + 1 < len(cases) else None
            if job.action != "predict":
                settle()
                if job.action == "skip":
                    report.skipped.append(cid)
                else:
                    if job.redo is not None:  # this run's own broken mask, but the scan did not read
                        report.redone.append((cid, job.redo))
                        echo(f"redo: {cid}: {job.redo}")
                    fail(cid, job.error or "failed")
                continue
            assert job.image is not None and job.props is not None
            predictor.last_props = job.props
            try:
                finish, wall = predictor._predict_timed(job.image, save_probabilities, defer=True)
            except Exception as e:
                settle()
                if job.redo is not None:
                    report.redone.append((cid, job.redo))
                    echo(f"redo: {cid}: {job.redo}")
                fail(cid, _failure_message(e))
                continue
            finally:
                job.image = None  # the preprocessed image is not needed any more
            settle()
            if job.redo is not None:
                report.redone.append((cid, job.redo))
                echo(f"redo: {cid}: {job.redo}")
            report.case_seconds[cid] = job.read_s + wall
            job.n_bad = int(job.props.get("nonfinite_voxels") or 0)
            if job.n_bad:
                from medse.data.preprocess import nonfinite_message

                report.nonfinite[cid] = job.n_bad
                echo(f"warning: {cid}: {nonfinite_message(job.props)}")
            t0 = time.perf_counter()
            pending = (job, writer.submit(finish_and_write, job, finish))  # inline: the whole write
            predictor._add_time("write", time.perf_counter() - t0)
            del finish
        settle()
    except KeyboardInterrupt:  # SIGINT, or SIGTERM under medse.utils.interrupt.stop_on_signals
        stopped = True
    finally:
        reader.close()  # the write in flight is finished (atomic either way), queued work dropped
        writer.close()
    if stopped:
        _stopped(report, pending, cases, at, out, created, resume)
    gathered = world == 1 or _dist_initialized() or "MASTER_ADDR" in os.environ
    failed = _gather_failures(report.failed, world)
    writer_rank = rank == 0 if gathered else True
    if writer_rank:
        fpath = out / ("failures.csv" if gathered else f"failures.rank{rank}.csv")
        if failed:
            try:
                report.failures_csv = write_failures_csv(fpath, failed, {c.case_id: c.images for c in all_cases})
            except OSError as e:  # a full disk: the failures were printed one per line; say why no CSV
                from medse.inference.writer import disk_full_error

                full = disk_full_error(e, fpath)
                echo(f"error: {full if full is not None else e}; the failed cases are listed above")
        elif fpath.exists():
            fpath.unlink()
    report.failed = list(failed) if rank == 0 else report.failed
    report.seconds = time.perf_counter() - t_start
    report.timings = dict(predictor.timings)
    return report
