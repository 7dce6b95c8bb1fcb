"""The run folder: one typed object owns every file a training run writes and every reader reads.

Training creates a run with :meth:`Run.create` and writes through it; inference, comparison, ``explain`` and the
classifier read it with :meth:`Run.open`. No other module opens a run's files by name::

    run = Run.open("runs/demo")
    run.config            # medse.config.Config (segmentation) or the classifier's config
    run.dataset           # DatasetInfo: labels, class values, channels
    run.split             # Split: train / val / test case ids
    run.checkpoint("best")  # the checkpoint dict (torch.load(weights_only=True))
    run.build_model()     # the configured network, untrained

Layout (docs/ARCHITECTURE.md)::

    RUN_DIR/config.yaml  run_info.json  dataset.json  splits.json  timing.json  metrics.csv  curves.png
            checkpoints/{last,best}.pt  tensorboard/
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medse.tasks import get_task, list_tasks
from medse.utils.atomic import DiskFullError, atomic_write_text
from medse.utils.errors import MedseError
from medse.utils.folder import Folder

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medse.config import Config

__all__ = ["CHECKPOINTS", "DatasetInfo", "Run", "Split", "build_model"]

Task = Literal["segmentation", "classification"]
CheckpointName = Literal["best", "last"]
#: the names of a run's checkpoints (``checkpoints/<name>.pt``)
CHECKPOINTS: tuple[str, ...] = ("best", "last")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MedseError(f"{what} not found in the run folder", path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedseError(f"invalid JSON ({e})", path) from e
    if not isinstance(data, dict):
        raise MedseError("expected a JSON object", path)
    return data


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` records: the classes a run was trained on and its input channels.

    ``class_values[i]`` is the label value that the network's class index ``i`` stands for (``0`` first,
    background, for segmentation); ``labels`` maps each class name to its value. Keys this class does not
    know are kept in ``extra`` and written back unchanged.
    """

    labels: dict[str, int]
    class_values: list[int]
    channel_names: list[str]
    task: Task = "segmentation"
    source: str | None = None
    num_cases: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("labels", "class_values", "channel_names", "num_channels", "num_classes", "task", "source",
              "num_cases", "class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @property
    def num_channels(self) -> int:
        return max(len(self.channel_names), 1)

    @property
    def class_names(self) -> list[str]:
        """Class names in class-index order."""
        by_value = {v: n for n, v in self.labels.items()}
        return [by_value.get(v, str(v)) for v in self.class_values]

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> DatasetInfo:
        """Parse ``dataset.json`` (older runs without ``class_values`` get them from ``labels``)."""
        try:
            labels = {str(k): int(v) for k, v in (d.get("labels") or {}).items()}
            values = [int(v) for v in (d.get("class_values") or sorted(set(labels.values()) | {0}))]
            if d.get("task") == "classification" and not d.get("class_values"):
                values = sorted(labels.values())
            channels = [str(c) for c in (d.get("channel_names") or [])]
            n_ch = int(d.get("num_channels") or len(channels) or 1)
        except (TypeError, ValueError, AttributeError) as e:
            raise MedseError(f"malformed dataset description ({e})", path) from e
        if len(channels) != n_ch:
            channels = channels[:n_ch] + [f"channel_{i}" for i in range(len(channels), n_ch)]
        n = d.get("num_classes")
        if n is not None and int(n) != len(values):
            raise MedseError(f"class_values has {len(values)} entries but num_classes is {n}", path)
        task = d.get("task") or "segmentation"
        if task not in list_tasks():
            raise MedseError(f"unknown task '{task}'", path)
        extra = {k: v for k, v in d.items() if k not in cls._KNOWN}
        return cls(labels=labels, class_values=values, channel_names=channels, task=task,
                   source=d.get("source"), num_cases=d.get("num_cases"), extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": dict(self.labels),
            "channel_names": list(self.channel_names),
            "num_channels": self.num_channels,
            "num_classes": self.num_classes,
            "class_values": list(self.class_values),
            "source": self.source,
        }
        if self.num_cases is not None:
            out["num_cases"] = int(self.num_cases)
        if self.task != "segmentation":
            out["task"] = self.task
            out["class_names"] = self.class_names
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Split:
    """``splits.json``: which case (or image) ids a run trained, validated and is tested on."""

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int | None = None
    kind: str = "holdout"
    fold: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Split:
        if not all(isinstance(d.get(k), list) for k in ("train", "val", "test")):
            raise MedseError("splits file lacks train/val/test lists", path)
        extra = {k: v for k, v in d.items() if k not in ("train", "val", "test", "seed", "kind", "fold")}
        return cls(train=[str(c) for c in d["train"]], val=[str(c) for c in d["val"]],
                   test=[str(c) for c in d["test"]], seed=d.get("seed"), kind=str(d.get("kind") or "holdout"),
                   fold=d.get("fold"), extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "kind": self.kind, "fold": self.fold, **self.extra,
                "train": list(self.train), "val": list(self.val), "test": list(self.test)}

    def ids(self, part: Literal["train", "val", "test"]) -> list[str]:
        if part not in ("train", "val", "test"):
            raise MedseError(f"unknown split '{part}', expected train, val or test")
        return list(getattr(self, part))


class Run(Folder):
    """A training run folder. Build with :meth:`create` (training) or :meth:`open` (everyone else)."""

    CONFIG = "config.yaml"
    RUN_INFO = "run_info.json"
    DATASET = "dataset.json"
    SPLITS = "splits.json"
    TIMING = "timing.json"
    METRICS = "metrics.csv"
    CURVES = "curves.png"
    TENSORBOARD = "tensorboard"
    CHECKPOINT_DIR = "checkpoints"


    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | os.PathLike | Run) -> Run:
        """An existing run; raises a one-line :class:`MedseError` unless ``path`` holds a ``config.yaml``."""
        if isinstance(path, Run):
            return path
        run = cls(path)
        if not run.path.is_dir():
            raise MedseError("run folder not found", run.path)
        if not (run.path / cls.CONFIG).is_file():
            raise MedseError("not a run folder (no config.yaml)", run.path)
        return run

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        config: dict[str, Any],
        dataset: DatasetInfo,
        split: Split | Callable[[Path], object],
        run_info: dict[str, Any] | None = None,
    ) -> Run:
        """Write ``config.yaml``, ``run_info.json``, ``dataset.json`` and ``splits.json`` into a temporary
        folder beside ``path`` and rename it into place, so that no half-made run folder is ever visible.

        Args:
            path: the run folder; absent or an empty folder.
            config: the resolved config as a plain mapping (all defaults filled in).
            dataset: the classes and channels.
            split: the split, or a function that writes ``splits.json`` into the folder it is given.
            run_info: extra ``run_info.json`` entries (e.g. ``{"task": ...}``).
        """
        from medse.utils.config import dump_yaml
        from medse.utils.runinfo import write_run_info

        target = Path(path).expanduser().absolute()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise MedseError("output folder already exists and is not empty", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.creating-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            atomic_write_text(tmp / cls.CONFIG, dump_yaml(config))
            write_run_info(tmp, extra=run_info)
            atomic_write_text(tmp / cls.DATASET, json.dumps(dataset.to_dict(), indent=2) + "\n")
            if isinstance(split, Split):
                atomic_write_text(tmp / cls.SPLITS, json.dumps(split.to_dict(), indent=1) + "\n")
            else:
                split(tmp)
            if not (tmp / cls.SPLITS).is_file():
                raise MedseError("the split was not written", tmp / cls.SPLITS)
            if target.exists():  # an empty folder the user made beforehand
                target.rmdir()
            os.replace(tmp, target)
        except DiskFullError as e:  # name the file as it would have been, not the temporary folder's
            shutil.rmtree(tmp, ignore_errors=True)
            name = Path(e.filename or "")
            raise DiskFullError(target / name.relative_to(tmp) if name.is_relative_to(tmp) else target) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(target)

    # ------------------------------------------------------------------ files
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT_DIR

    def checkpoint_path(self, which: str | os.PathLike = "best") -> Path:
        """``checkpoints/best.pt`` / ``last.pt``, or ``which`` itself when it is a path to a file."""
        if str(which) in CHECKPOINTS:
            return self.checkpoint_dir / f"{which}.pt"
        return Path(which)

    def has_checkpoint(self, which: str = "last") -> bool:
        return self.checkpoint_path(which).is_file()

    def checkpoint(self, which: str | os.PathLike = "best", map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint dict (loaded with ``weights_only=True``); a one-line error when it is missing."""
        from medse.utils.checkpoint import load_checkpoint

        path = self.checkpoint_path(which)
        if not path.is_file():
            raise MedseError("checkpoint not found", path)
        return load_checkpoint(path, map_location=map_location)

    def save_checkpoint(self, which: str, state: dict[str, Any]) -> Path:
        from medse.utils.checkpoint import save_checkpoint

        path = self.checkpoint_path(which)
        save_checkpoint(path, state)
        return path

    # ------------------------------------------------------------------ contents
    @property
    def raw_config(self) -> dict[str, Any]:
        """``config.yaml`` as a plain mapping (``yaml.safe_load``)."""
        from medse.utils.config import load_yaml

        return load_yaml(self.config_path)

    @property
    def task(self) -> Task:
        return self.dataset.task

    @cached_property
    def config(self) -> Config | Any:
        """The validated config, read as the run's task reads it (:mod:`medse.tasks`): :class:`medse.config.Config`
        for segmentation runs, the classifier's :class:`~medse.classify.train.ClassifierConfig` for classification
        runs."""
        return get_task(self.task).load_config(self)

    def reload(self) -> Run:
        """Forget cached contents (after the config or dataset files were rewritten)."""
        for key in ("config", "dataset", "split"):
            self.__dict__.pop(key, None)
        return self

    def write_config(self, config: dict[str, Any]) -> None:
        from medse.utils.config import dump_yaml

        atomic_write_text(self.config_path, dump_yaml(config))
        self.reload()

    @cached_property
    def dataset(self) -> DatasetInfo:
        path = self.path / self.DATASET
        return DatasetInfo.from_dict(_read_json(path, "dataset.json"), path)

    @cached_property
    def split(self) -> Split:
        path = self.path / self.SPLITS
        return Split.from_dict(_read_json(path, "splits.json"), path)

    @property
    def timing(self) -> dict[str, Any] | None:
        """``timing.json`` (mean training-step time and the run's facts), ``None`` before the first epoch."""
        path = self.path / self.TIMING
        return _read_json(path, "timing.json") if path.is_file() else None

    @property
    def run_info(self) -> dict[str, Any]:
        return _read_json(self.path / self.RUN_INFO, "run_info.json")

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """The run's network, untrained (load ``checkpoint(...)["model"]`` into it), as its task builds it."""
        return get_task(self.task).build_model(self.config, self.dataset)

    def load_model(self, which: str | os.PathLike = "best", map_location: str | torch.device = "cpu") -> nn.Module:
        """The network with the weights of checkpoint ``which`` (a one-line error when they do not fit)."""
        state = self.checkpoint(which, map_location=map_location)
        if "model" not in state:
            raise MedseError("checkpoint has no 'model' entry", self.checkpoint_path(which))
        model = self.build_model()
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise MedseError(f"weights do not fit the configured model ({first[0] if first else e})",
                             self.checkpoint_path(which)) from e
        return model

    def inference_settings(self) -> dict[str, Any]:
        """How ``medse predict`` runs this run's network unless told otherwise, as keyword arguments of
        :class:`medse.inference.Predictor`: the ``infer`` section (``train.patch_size`` for a null
        ``infer.roi_size``), ``train.slice_axis`` and ``train.amp``. The inference checks them together with its
        caller's overrides (:func:`medse.inference.settings.resolve_settings`)."""
        if self.task != "segmentation":
            raise MedseError(f"a {self.task} run has no segmentation inference: medse predict takes segmentation "
                             "runs (evaluate a classification run with medse classify evaluate)", self.path)
        cfg = self.config
        inf = cfg.infer
        return {"roi_size": cfg.roi_size, "overlap": inf.overlap, "blend": inf.blend,
                "sw_batch_size": inf.sw_batch_size, "tta_flips": inf.tta_flips,
                "largest_component": inf.largest_component, "slice_axis": int(cfg.train.slice_axis),
                "amp": bool(cfg.train.amp)}

def build_model(cfg: Config, in_channels: int, out_channels: int) -> nn.Module:
    """The segmentation network named by ``cfg.model`` (``medse.networks.create_model``).

    Architecture arguments that depend on the run (DynUNet's ``patch_size`` and ``spacing``, UNETR's
    ``img_size``; ``medse.networks.run_context_kwargs``) come from ``train.patch_size`` and
    ``data.preprocess.target_spacing`` unless ``model.kwargs`` sets them.
    """
    from medse.networks import create_model, run_context_kwargs

    m = cfg.model
    spacing = getattr(getattr(cfg.data, "preprocess", None), "target_spacing", None)
    if spacing is not None and m.spatial_dims == 2:  # slices along train.slice_axis: the in-plane spacing
        spacing = [v for i, v in enumerate(spacing) if i != cfg.train.slice_axis]
    context = run_context_kwargs(m.name, cfg.train.patch_size, spacing)
    return create_model(
        m.name,
        spatial_dims=m.spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        attention=m.attention,
        attention_positions=tuple(m.attention_positions),
        attention_kwargs=dict(m.attention_kwargs) or None,
        **{**context, **dict(m.kwargs)},
    )
