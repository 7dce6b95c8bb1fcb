"""What inference runs with: the sliding-window and post-processing settings of a run, checked, and its weights.

:func:`resolve_settings` gives a run's :class:`InferenceSettings`: what the run recorded
(:meth:`medse.runs.Run.inference_settings`: its ``infer`` section, ``train.patch_size`` when ``infer.roi_size``
is null, ``train.slice_axis`` and ``train.amp``) with the caller's overrides (``medse predict --roi-size ...``). Every value is checked here, before any model or case is
loaded: :func:`check_inference_settings` (ranges, one line naming the setting and where it came from) and the
window against the network (UNETR's fixed ``img_size``). :func:`choose_checkpoint` picks the weights file
(``best``, else ``last`` with a note).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medse.utils.errors import MedseError

if TYPE_CHECKING:
    from medse.config import Config
    from medse.runs import Run

__all__ = ["OVERRIDES", "InferenceSettings", "InferenceSettingsError", "check_inference_settings",
           "choose_checkpoint", "resolve_settings"]

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


@dataclass(frozen=True)
class InferenceSettings:
    """The :class:`~medse.inference.Predictor` arguments a run fixes (its ``infer`` section, ``train.slice_axis``,
    ``train.amp``) plus those only a caller sets (``stream_axis``, ``engine``, ``strict_nonfinite``); see
    :class:`~medse.inference.Predictor` for each. Build a run's with :func:`resolve_settings`."""

    roi_size: list[int] | None
    overlap: float
    blend: str
    sw_batch_size: int
    tta_flips: bool
    largest_component: bool
    slice_axis: int
    amp: bool
    stream_axis: int | None = None
    engine: str = "stream"
    strict_nonfinite: bool | None = None

    def predictor_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of :class:`~medse.inference.Predictor`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: the settings a caller may override (``Predictor.from_run(..., **overrides)``, ``predict_folder``)
OVERRIDES = tuple(f.name for f in dataclasses.fields(InferenceSettings))


def resolve_settings(run: Run, overrides: Mapping[str, Any]) -> InferenceSettings:
    """The run's settings (:meth:`medse.runs.Run.inference_settings`) with ``overrides`` (None = the run's value),
    checked; nothing is loaded.

    Raises:
        ValueError: an override that is not an inference setting.
        MedseError: a classification run, or a config/dataset file the run cannot read.
        InferenceSettingsError: a setting out of range (naming the run's config file when the value is the
            run's), or a window the run's network cannot take.
    """
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        from medse.utils.errors import unknown_option_error

        raise unknown_option_error("Predictor override", sorted(unknown)[0], OVERRIDES)
    own = run.inference_settings()
    cfg: Config = run.config
    given = {k: v for k, v in overrides.items() if v is not None}
    dims = int(cfg.model.spatial_dims)
    # the run's own values first, so that an error names the right source
    check_inference_settings(dims, **{k: own[k] for k in ("roi_size", "overlap", "blend", "sw_batch_size")
                                      if k not in given},
                             source=f"infer.* / train.patch_size of {run.config_path}")
    check_inference_settings(dims, **{k: given[k] for k in ("roi_size", "overlap", "blend", "sw_batch_size")
                                      if k in given})
    settings = InferenceSettings(**{**own, **given})
    _check_window_fits(cfg, settings.roi_size, "roi_size" in given, run.config_path)
    return settings


def choose_checkpoint(run: Run, checkpoint: str | os.PathLike = "best", model_file: str | os.PathLike | None = None
                      ) -> tuple[Path, str | None]:
    """The checkpoint file to load and a note when it is not the one asked for; ``model_file`` (an exported
    network, ``medse predict --model``) takes the checkpoint's place.

    ``best`` in a run without ``best.pt`` but with ``last.pt`` (training stopped, or the disk filled, before a
    validation made a best one) uses ``last.pt`` with a note; any other missing checkpoint is a one-line error
    naming the checkpoints the run has and how to pick one."""
    if model_file is not None:
        return Path(model_file), None
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


def _check_window_fits(cfg: Config, roi: Sequence[int] | None, from_override: bool, config_path: Path) -> None:
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
