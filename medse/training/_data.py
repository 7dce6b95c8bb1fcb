"""The training engine's view of :mod:`medse.data`: load + validate the dataset, labels, splits, datasets.

Kept in one place so the trainer reads as a loop, and so a change in medse.data's API is a change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medse.utils.errors import MedseError

if TYPE_CHECKING:
    from medse.config import Config
    from medse.data.datasets import DatasetSpec
    from medse.data.loader import CaseStore, PatchDataset, VolumeDataset
    from medse.runs import DatasetInfo, Split


@dataclass
class PreparedData:
    """A validated dataset and the class layout training uses.

    ``class_values[i]`` is the label value that class index ``i`` stands for (``class_values[0] == 0``,
    background); ``class_names[i]`` its name.
    """

    spec: DatasetSpec
    class_names: list[str]
    class_values: list[int]
    channel_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def dataset_info(self) -> DatasetInfo:
        """What ``RUN_DIR/dataset.json`` records (read by inference to map class indices back to labels)."""
        from medse.runs import DatasetInfo

        return DatasetInfo(
            labels={n: int(v) for n, v in zip(self.class_names, self.class_values, strict=True)},
            class_values=[int(v) for v in self.class_values],
            channel_names=list(self.channel_names),
            source=self.source,
            num_cases=len(self.spec.cases),
        )


def _data_source(cfg: Config) -> str | Path:
    if cfg.data.source:
        return Path(cfg.data.source).expanduser()
    raise MedseError("config key 'data.root': no dataset given (set data.root=DIR or data.manifest=FILE)")


def prepare_data(cfg: Config) -> PreparedData:
    """Load the dataset named by ``cfg.data`` and validate it; every problem becomes one MedseError line.

    Classes: ``data.labels`` when pinned, else the dataset's declared labels, else the label values
    validation found (:func:`medse.data.validate.resolve_labels`).

    Raises:
        MedseError: the dataset cannot be read or validation found errors (nothing has been written yet).
    """
    from medse.data.datasets import load_dataset
    from medse.data.validate import resolve_labels, validate_dataset

    src = _data_source(cfg)
    if not Path(src).exists():
        key = "data.manifest" if getattr(cfg.data, "manifest", None) else "data.root"
        raise MedseError(f"config key '{key}': dataset path does not exist", src)
    spec = load_dataset(src, layout=cfg.data.layout)
    pinned = dict(cfg.data.labels) if cfg.data.labels else None
    nonfinite = getattr(getattr(cfg.data, "preprocess", None), "nonfinite", "replace")
    report = validate_dataset(spec, check_labels=True, labels=pinned, nonfinite=nonfinite)
    report.raise_if_errors()
    labels = resolve_labels(spec, report, pinned)
    items = sorted(((int(v), str(n)) for n, v in labels.items()), key=lambda t: t[0])
    values = [v for v, _ in items]
    if len(set(values)) != len(values):
        raise MedseError(f"config key 'data.labels': duplicate label values {values}")
    if len(values) < 2:
        raise MedseError("the dataset has no foreground label to train on", src)
    train_cases = [c for c in spec.cases if getattr(c, "label", None) is not None]
    if len(train_cases) < 2:
        raise MedseError(f"need at least 2 labelled cases to train and validate, found {len(train_cases)}", src)
    return PreparedData(
        spec=spec,
        class_names=[n for _, n in items],
        class_values=values,
        channel_names=list(spec.channel_names) or [f"channel_{i}" for i in range(max(report.num_channels, 1))],
        source=str(spec.source or src),
    )


def labelled_case_ids(prep: PreparedData) -> list[str]:
    return [c.case_id for c in prep.spec.cases if getattr(c, "label", None) is not None]


def make_splits(run_dir: Path, prep: PreparedData, cfg: Config) -> dict[str, list[str]]:
    """Draw (or reuse) the split stored in ``run_dir/splits.json``; returns {"train": [...], "val": [...]}."""
    from medse.data.splits import load_or_create_splits

    split = load_or_create_splits(run_dir, labelled_case_ids(prep), cfg.data.split)
    return _split_lists(split)


def _split_lists(split: Split | dict[str, list[str]]) -> dict[str, list[str]]:
    get = split.get if isinstance(split, dict) else (lambda k, d=None: getattr(split, k, d))
    out = {k: list(get(k, []) or []) for k in ("train", "val", "test")}
    if not out["train"]:
        raise MedseError("the split has no training cases (check data.split)")
    if not out["val"]:
        raise MedseError("the split has no validation cases (check data.split)")
    return out


def make_store(prep: PreparedData, cfg: Config) -> CaseStore:
    from medse.data.loader import CaseStore

    return CaseStore(
        prep.spec, cfg.data.preprocess, cache=cfg.data.cache, cache_dir=cfg.data.cache_dir,
        label_values=prep.class_values,
    )


def make_train_dataset(store: CaseStore, case_ids: list[str], cfg: Config) -> PatchDataset:
    from medse.data.loader import PatchDataset

    t = cfg.train
    return PatchDataset(
        store,
        case_ids,
        patch_size=tuple(t.patch_size),
        fg_ratio=t.fg_ratio,
        augment=cfg.augment,
        samples_per_epoch=t.iterations_per_epoch * t.batch_size,
        seed=t.seed,
        slice_axis=t.slice_axis if cfg.model.spatial_dims == 2 else None,
    )


def make_val_dataset(store: CaseStore, case_ids: list[str]) -> VolumeDataset:
    from medse.data.loader import VolumeDataset

    return VolumeDataset(store, case_ids)


def unpack(sample: Any) -> tuple[Any, Any]:
    """(image, label) from a dataset sample: a dict with image/label keys or an (image, label, ...) tuple."""
    if isinstance(sample, dict):
        return sample["image"], sample.get("label")
    return sample[0], sample[1]
