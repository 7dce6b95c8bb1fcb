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

Building one from a run (:meth:`Predictor.from_run`): the run's inference settings
(:meth:`medse.runs.Run.inference_settings`) with the caller's overrides, checked before anything is loaded
(:func:`medse.inference.settings.resolve_settings`), its network with the checkpoint's weights
(:meth:`medse.runs.Run.load_model`), its preprocessing and labels. Batches over folders:
:func:`medse.inference.batch.predict_folder`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medse.data.io import split_suffix
from medse.inference.settings import InferenceSettings, InferenceSettingsError, check_inference_settings
from medse.runs import Run
from medse.utils.device import resolve_device
from medse.utils.errors import MedseError

__all__ = ["Predictor"]


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
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            (:func:`medse.utils.device.resolve_device`). Defaults to ``"auto"``.
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

        self.device = resolve_device(device)
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
    def from_run(cls, run: str | os.PathLike | Run, checkpoint: str = "best", device: Any = "auto", *,
                 model_file: str | os.PathLike | None = None, **overrides: Any) -> Predictor:
        """Build the network of ``run`` and load a checkpoint.

        Args:
            run: a training run (:class:`~medse.runs.Run`) or its folder (``config.yaml``, ``dataset.json``,
                ``checkpoints/``).
            checkpoint: ``"best"``, ``"last"`` or a path to a ``.pt`` file. Defaults to ``"best"``.
            device: see :class:`Predictor`. Defaults to ``"auto"``.
            model_file: an exported network (``model.onnx``, ``model.ts``; :mod:`medse.export`) in place of the
                checkpoint; the run still gives the preprocessing, windows and labels. Defaults to None.
            overrides: Predictor arguments overriding the run's ``infer`` section (``roi_size``,
                ``overlap``, ``blend``, ``sw_batch_size``, ``tta_flips``, ``largest_component``, ``amp``,
                ``stream_axis``, ``engine``, ``strict_nonfinite``).

        Raises:
            MedseError: naming the missing/invalid file (config, dataset.json, checkpoint) or key, or an
                inference setting out of range (checked before the checkpoint is read).
        """
        from medse.inference.settings import choose_checkpoint, resolve_settings

        run = Run.open(run)
        settings = resolve_settings(run, overrides)
        weights, note = choose_checkpoint(run, checkpoint, model_file)
        if note:
            import warnings

            warnings.warn(note, UserWarning, stacklevel=2)
        return cls._load(run, settings, weights, device, exported=model_file is not None)

    @classmethod
    def _load(cls, run: Run, settings: InferenceSettings, weights: Path, device: Any, exported: bool = False
              ) -> Predictor:
        """The predictor of ``run`` with ``settings`` (already checked) and the network of file ``weights``: a
        checkpoint (:meth:`medse.runs.Run.load_model`) or, ``exported``, a network from :mod:`medse.export`."""
        cfg = run.config
        ds = run.dataset
        if exported:  # an exported network (medse.export) in the network's place; the run gives the rest
            from medse.inference.runtime import check_window, load_network, network_format

            if network_format(weights) == "onnx":
                if str(device) not in ("auto", "cpu"):
                    raise MedseError(f"an ONNX model runs on onnxruntime's CPU provider; use --device cpu, not "
                                     f"{device}", weights)
                device = "cpu"
            check_window(weights, settings.roi_size)
            model = load_network(weights, in_channels=ds.num_channels, num_classes=ds.num_classes)
        else:
            model = run.load_model(weights)
        pred = cls(
            model, spatial_dims=cfg.model.spatial_dims, in_channels=ds.num_channels,
            class_values=ds.class_values, label_names=ds.labels or None, preprocess=cfg.data.preprocess,
            device=device, **settings.predictor_kwargs(),
        )
        pred.run_dir = run.path
        pred.checkpoint = weights
        return pred

    # ------------------------------------------------------------------ identity (what a mask was made with)
    def identity(self) -> dict[str, Any]:
        """What made this predictor's masks: resolved run folder, checkpoint path and the sha256 of its
        file (or, without a checkpoint file, of the model's state dict). Computed once and cached."""
        if self._identity is None:
            from medse.inference.resume import cached_file_sha256, state_dict_sha256

            ident: dict[str, Any] = {
                "run_dir": str(Path(self.run_dir).resolve()) if self.run_dir else None,
                "checkpoint": str(Path(self.checkpoint).resolve()) if self.checkpoint else None,
                "checkpoint_sha256": None,
                "model_sha256": None,
            }
            if self.checkpoint is not None and Path(self.checkpoint).is_file():
                ident["checkpoint_sha256"] = cached_file_sha256(Path(self.checkpoint))
            else:
                ident["model_sha256"] = state_dict_sha256(self.model)
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
                    raise MedseError(f"2D image ({split_suffix(Path(p))[1]}) but the run's network is 3D: 3D runs "
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
