"""Dataset layouts and versioned manifests.

Public API
----------
``Case(case_id, images, label)``: one case, ``images`` a list of paths (one per channel, or a single
4D file holding all channels), ``label`` a path or None.

``DatasetSpec(cases, labels, channel_names, source, layout, issues)``: ``labels`` maps names to integer
values (background 0), empty when the dataset does not declare them (validation then finds them);
``issues`` are one-line problems found while listing the files (label without image, unreadable
dataset.json entry, ...) that :func:`medse.data.validate.validate_dataset` reports as errors.

``load_dataset(root_or_manifest, layout="auto") -> DatasetSpec`` accepts

* ``"folder"`` (a): ``ROOT/images/`` and ``ROOT/labels/`` whose files match by name (``case.nii.gz``;
  channel files ``case_0000.nii.gz``, ``case_0001.nii.gz`` are grouped); an optional
  ``ROOT/dataset.json`` gives label names (``{"labels": {"name": int}}``) and channel names.
* ``"nnunet"`` (b): nnU-Net v2 ``imagesTr/{CASE}_{XXXX}{ending}``, ``labelsTr/{CASE}{ending}`` and
  ``dataset.json`` (``channel_names``, ``labels`` name -> int, ``file_ending``).
* ``"msd"`` (c): Medical Segmentation Decathlon ``dataset.json`` (``training`` list of
  ``{"image", "label"}``, ``labels`` {"0": "background", ...}, ``modality``); one 4D image holds
  several channels.
* ``"manifest"`` (d): a medse JSON manifest (``{"format": "medse-manifest", "version": 1, ...}``) or a
  CSV with columns ``case_id``, ``image`` (or ``image_0000``, ``image_0001``, ...; or
  ``image_<channel name>``) and ``label``; paths are relative to the manifest file.

``"auto"`` picks the layout from what is there. ``write_manifest(spec, path)`` writes (d) as JSON with
paths relative to the manifest's folder; ``read_manifest(path)`` reads it back.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medse.data.io import is_image_file, split_suffix
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError, unknown_option_error

__all__ = [
    "LAYOUTS",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "Case",
    "DatasetSpec",
    "load_dataset",
    "detect_layout",
    "write_manifest",
    "read_manifest",
    "channel_groups",
    "split_channel",
]

LAYOUTS = ("auto", "folder", "nnunet", "msd", "manifest")
MANIFEST_FORMAT = "medse-manifest"
MANIFEST_VERSION = 1
#: nnU-Net's channel suffix: ``case_0001`` is channel 1 of case ``case``
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class Case:
    """One case: ``case_id``, channel image paths, label path (None when the case has none)."""

    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class DatasetSpec:
    """A dataset: its cases, declared labels (name -> value), channel names, where it came from."""

    cases: list[Case]
    labels: dict[str, int] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    source: str = ""
    layout: str = ""
    issues: list[str] = field(default_factory=list)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def num_channels(self) -> int:
        if self.channel_names:
            return len(self.channel_names)
        return max((len(c.images) for c in self.cases), default=1)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)

    def subset(self, case_ids: list[str]) -> DatasetSpec:
        """The same dataset restricted to ``case_ids`` (in that order)."""
        by_id = {c.case_id: c for c in self.cases}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise MedseError(f"case '{missing[0]}' is not in the dataset", self.source)
        return DatasetSpec([by_id[c] for c in case_ids], dict(self.labels), list(self.channel_names), self.source,
                           self.layout, list(self.issues))


# ----------------------------------------------------------------------------------------------- helpers
def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MedseError("file not found", path) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedseError(f"invalid JSON ({e})", path) from e


def _parse_labels(raw: Any, where: Path) -> dict[str, int]:
    """nnU-Net style {name: int} or MSD style {"0": "background"} -> {name: int}, sorted by value."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MedseError("'labels' must be a mapping", where)
    out: dict[str, int] = {}
    for k, v in raw.items():
        if isinstance(v, bool):
            raise MedseError(f"label '{k}': value must be an integer, got {v!r}", where)
        if isinstance(v, int):
            name, value = str(k), int(v)
        elif isinstance(v, str) and str(k).lstrip("-").isdigit():
            name, value = v, int(k)
        elif isinstance(v, (list, tuple)):
            raise MedseError(f"label '{k}': region-based labels (lists of values) are not supported", where)
        else:
            raise MedseError(f"label '{k}': value must be an integer, got {v!r}", where)
        if not 0 <= value <= 255:
            raise MedseError(f"label '{name}': value {value} is outside 0..255", where)
        if name in out:
            raise MedseError(f"label name '{name}' appears twice", where)
        if value in out.values():
            raise MedseError(f"label value {value} appears twice", where)
        out[name] = value
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def _parse_channels(raw: Any) -> list[str]:
    """nnU-Net ``channel_names`` / MSD ``modality`` ({"0": "T1"}) or a list -> ordered names."""
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(v) for v in raw]
    if isinstance(raw, dict):
        items = sorted(raw.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
        return [str(v) for _, v in items]
    return [str(raw)]


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def split_channel(stem: str) -> tuple[str, int | None]:
    """``(case id, channel)`` of a file stem: ``"case_0001"`` -> ``("case", 1)``; a stem without nnU-Net's
    ``_XXXX`` channel suffix -> ``(stem, None)``."""
    m = _CHANNEL_RE.match(stem)
    return (stem, None) if m is None else (m["case"], int(m["ch"]))


def channel_groups(files: Sequence[Path], stems: Sequence[str] | None = None) -> dict[str, list[tuple[int, Path]]]:
    """Files grouped into cases by their channel suffix (:func:`split_channel`): ``{case: [(channel, file),
    ...]}`` sorted by channel, cases in the order of their first file. A file without the suffix is a case of
    its own named after its stem, with channel -1. This is the one rule by which training's dataset layouts
    and ``medse predict``'s input folders (:func:`medse.inference.inputs.collect_cases`) make cases of files.

    Args:
        files: image files.
        stems: each file's name without its image suffix. Defaults to :func:`medse.data.io.split_suffix`'s.
    """
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f, stem in zip(files, stems if stems is not None else [split_suffix(f)[0] for f in files], strict=True):
        case, ch = split_channel(stem)
        groups.setdefault(case, []).append((-1 if ch is None else ch, f))
    for items in groups.values():
        items.sort()
    return groups


def _group_channels(files: list[Path]) -> tuple[dict[str, list[Path]], bool]:
    """Group ``case_0000`` style channel files by case when every file has the suffix; returns (groups,
    used_channel_suffixes)."""
    stems = [split_suffix(f)[0] for f in files]
    if stems and all(split_channel(s)[1] is not None for s in stems):
        groups = channel_groups(files, stems)
        return {k: [p for _, p in v] for k, v in sorted(groups.items())}, True
    return {s: [f] for s, f in sorted(zip(stems, files, strict=False))}, False


# ----------------------------------------------------------------------------------------------- layouts
def _load_folder(root: Path) -> DatasetSpec:
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise MedseError("no 'images/' folder (layout 'folder' needs images/ and labels/)", root)
    files = _list_images(img_dir)
    if not files:
        raise MedseError("no image files found", img_dir)
    labels_by_stem: dict[str, Path] = {}
    if lab_dir.is_dir():
        labels_by_stem = {split_suffix(p)[0]: p for p in _list_images(lab_dir)}
    stems = [split_suffix(f)[0] for f in files]
    if labels_by_stem and any(s in labels_by_stem for s in stems):
        # image names equal label names (e.g. case_0001 with label case_0001): one file per case
        groups = {s: [f] for s, f in sorted(zip(stems, files, strict=False))}
    else:
        groups, _ = _group_channels(files)
    meta: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        meta = _load_json(root / "dataset.json")
    cases = [Case(cid, imgs, labels_by_stem.get(cid)) for cid, imgs in groups.items()]
    issues = [f"{p}: label file has no matching image in {img_dir}" for s, p in labels_by_stem.items()
              if s not in groups]
    return DatasetSpec(
        cases=cases,
        labels=_parse_labels(meta.get("labels"), root / "dataset.json"),
        channel_names=_parse_channels(meta.get("channel_names", meta.get("modality"))),
        source=str(root),
        layout="folder",
        issues=issues,
    )


def _load_nnunet(root: Path) -> DatasetSpec:
    ds_json = root / "dataset.json"
    meta = _load_json(ds_json)
    if not isinstance(meta, dict):
        raise MedseError("dataset.json must be a JSON object", ds_json)
    ending = meta.get("file_ending", ".nii.gz")
    channels = _parse_channels(meta.get("channel_names", meta.get("modality")))
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir():
        raise MedseError("no 'imagesTr/' folder", root)
    files = sorted(p for p in img_dir.iterdir() if p.is_file() and p.name.endswith(ending)
                   and not p.name.startswith("."))
    stems = [f.name[: -len(ending)] for f in files]
    suffixed = [split_channel(s)[1] is not None for s in stems]
    issues = [f"{f}: image name lacks the nnU-Net channel suffix _XXXX" for f, ok in zip(files, suffixed, strict=True)
              if not ok]
    groups = channel_groups([f for f, ok in zip(files, suffixed, strict=True) if ok],
                            [s for s, ok in zip(stems, suffixed, strict=True) if ok])
    cases = []
    n_ch = len(channels) if channels else None
    for cid, chans in sorted(groups.items()):
        idx = [c for c, _ in chans]
        if n_ch is not None and idx != list(range(n_ch)):
            issues.append(f"{img_dir / cid}: channels {idx} found, dataset.json declares {n_ch} ({channels})")
        label = lab_dir / f"{cid}{ending}"
        cases.append(Case(cid, [p for _, p in chans], label if label.is_file() else None))
    if lab_dir.is_dir():
        for p in sorted(lab_dir.iterdir()):
            if p.name.endswith(ending) and not p.name.startswith(".") and p.name[: -len(ending)] not in groups:
                issues.append(f"{p}: label file has no matching image in {img_dir}")
    if not cases:
        raise MedseError(f"no images ending in '{ending}' found", img_dir)
    return DatasetSpec(cases, _parse_labels(meta.get("labels"), ds_json), channels, str(root), "nnunet", issues)


def _load_msd(ds_json: Path) -> DatasetSpec:
    meta = _load_json(ds_json)
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise MedseError("not a Decathlon dataset.json (no 'training' list)", ds_json)
    base = ds_json.parent
    cases: list[Case] = []
    issues: list[str] = []
    for i, item in enumerate(meta["training"]):
        if not isinstance(item, dict) or "image" not in item:
            issues.append(f"{ds_json}: training[{i}] has no 'image'")
            continue
        imgs = item["image"] if isinstance(item["image"], list) else [item["image"]]
        img_paths = [(base / str(p)).resolve() for p in imgs]
        lab = item.get("label")
        cid = split_suffix(img_paths[0])[0]
        cases.append(Case(cid, img_paths, (base / str(lab)).resolve() if lab else None))
    if not cases:
        raise MedseError("the 'training' list is empty", ds_json)
    return DatasetSpec(cases, _parse_labels(meta.get("labels"), ds_json),
                       _parse_channels(meta.get("channel_names", meta.get("modality"))), str(ds_json), "msd", issues)


def read_manifest(path: str | os.PathLike) -> DatasetSpec:
    """Read a medse manifest (JSON, versioned, or CSV); paths are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise MedseError("manifest not found", path)
    base = path.parent
    if path.suffix.lower() == ".csv":
        return _read_csv_manifest(path)
    meta = _load_json(path)
    if not isinstance(meta, dict) or meta.get("format") != MANIFEST_FORMAT:
        raise MedseError(f"not a medse manifest (expected \"format\": \"{MANIFEST_FORMAT}\")", path)
    version = meta.get("version")
    if version != MANIFEST_VERSION:
        raise MedseError(f"unsupported manifest version {version!r} (this medse reads {MANIFEST_VERSION})", path)
    raw_cases = meta.get("cases")
    if not isinstance(raw_cases, list):
        raise MedseError("'cases' must be a list", path)
    cases = []
    for i, c in enumerate(raw_cases):
        if not isinstance(c, dict) or "case_id" not in c or not isinstance(c.get("images"), list) or not c["images"]:
            raise MedseError(f"cases[{i}] needs 'case_id' and a non-empty 'images' list", path)
        lab = c.get("label")
        cases.append(Case(str(c["case_id"]), [base / str(p) for p in c["images"]], base / str(lab) if lab else None))
    return DatasetSpec(cases, _parse_labels(meta.get("labels"), path), _parse_channels(meta.get("channel_names")),
                       str(path), "manifest")


def _read_csv_manifest(path: Path) -> DatasetSpec:
    base = path.parent
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MedseError("CSV manifest has no rows", path)
    cols = list(rows[0].keys())
    if "case_id" not in cols:
        raise MedseError(f"CSV manifest needs a 'case_id' column (columns: {', '.join(cols)})", path)
    img_cols = ["image"] if "image" in cols else [c for c in cols if c.startswith("image_")]
    if not img_cols:
        raise MedseError("CSV manifest needs an 'image' or 'image_XXXX' column", path)
    channel_names = [] if img_cols == ["image"] else [c[len("image_"):] for c in img_cols]
    cases = []
    for i, r in enumerate(rows, start=2):
        imgs = [r[c].strip() for c in img_cols if (r.get(c) or "").strip()]
        if not imgs or not (r.get("case_id") or "").strip():
            raise MedseError(f"line {i}: empty case_id or image", path)
        lab = (r.get("label") or "").strip()
        cases.append(Case(r["case_id"].strip(), [base / p for p in imgs], base / lab if lab else None))
    if all(n.isdigit() for n in channel_names):
        channel_names = []
    return DatasetSpec(cases, {}, channel_names, str(path), "manifest")


def detect_layout(path: str | os.PathLike) -> str:
    """Guess the layout of ``path``: "manifest", "msd", "nnunet" or "folder"."""
    path = Path(path)
    if not path.exists():
        raise MedseError("dataset not found", path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "manifest"
        meta = _load_json(path)
        if isinstance(meta, dict) and meta.get("format") == MANIFEST_FORMAT:
            return "manifest"
        if isinstance(meta, dict) and isinstance(meta.get("training"), list):
            return "msd"
        if path.name == "dataset.json" and (path.parent / "imagesTr").is_dir():
            return "nnunet"
        raise MedseError("cannot tell the layout of this file (not a medse manifest, CSV, or Decathlon "
                         "dataset.json)", path)
    ds_json = path / "dataset.json"
    if (path / "imagesTr").is_dir() and ds_json.is_file():
        meta = _load_json(ds_json)
        if isinstance(meta, dict) and isinstance(meta.get("training"), list) and meta["training"] \
                and isinstance(meta["training"][0], dict) and "image" in meta["training"][0]:
            return "msd"
        return "nnunet"
    if (path / "images").is_dir():
        return "folder"
    for name in ("manifest.json", "manifest.csv"):
        if (path / name).is_file():
            return "manifest"
    raise MedseError("cannot tell the dataset layout: expected images/ + labels/, imagesTr/ + dataset.json "
                     "(nnU-Net or Decathlon), or a manifest file", path)


def load_dataset(root_or_manifest: str | os.PathLike, layout: str = "auto") -> DatasetSpec:
    """Load a dataset in any supported layout (see the module docstring). Defaults to layout "auto".

    Raises:
        ValueError: unknown ``layout`` name.
        MedseError: the path does not exist or does not look like the layout.
    """
    if layout not in LAYOUTS:
        raise unknown_option_error("layout", layout, LAYOUTS)
    path = Path(root_or_manifest).expanduser()
    if not path.exists():
        raise MedseError("dataset not found", path)
    if layout == "auto":
        layout = detect_layout(path)
    if layout == "folder":
        return _load_folder(path)
    if layout == "nnunet":
        return _load_nnunet(path if path.is_dir() else path.parent)
    if layout == "msd":
        return _load_msd(path if path.is_file() else path / "dataset.json")
    if path.is_dir():
        for name in ("manifest.json", "manifest.csv"):
            if (path / name).is_file():
                return read_manifest(path / name)
        raise MedseError("no manifest.json or manifest.csv in this folder", path)
    return read_manifest(path)


def _rel(p: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(p).resolve(), base.resolve())).as_posix()


def manifest_dict(spec: DatasetSpec, base: Path, description: str | None = None) -> dict[str, Any]:
    """The JSON manifest of ``spec`` with paths relative to folder ``base``."""
    out: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
    if description:
        out["description"] = description
    return out | {
        "source_layout": spec.layout,
        "labels": dict(spec.labels),
        "channel_names": list(spec.channel_names),
        "num_cases": len(spec.cases),
        "cases": [
            {
                "case_id": c.case_id,
                "images": [_rel(p, base) for p in c.images],
                "label": _rel(c.label, base) if c.label is not None else None,
            }
            for c in spec.cases
        ],
    }


def write_manifest(spec: DatasetSpec, path: str | os.PathLike, description: str | None = None) -> Path:
    """Write ``spec`` as a versioned JSON manifest (paths relative to the manifest's folder), atomically.

    ``description`` (optional) is stored as a free-text ``"description"`` key.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise MedseError("manifest must be written as .json", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(manifest_dict(spec, path.parent, description), indent=2) + "\n")
    return path
