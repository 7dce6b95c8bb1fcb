"""The comparison grid: architectures x attention blocks x folds x seeds, each cell a normal training run.

Every cell is trained with :func:`medse.training.train` in its own run folder, then the held-out test cases
of its split (``splits.json`` ``test``) are predicted (timed per case) and evaluated with
:func:`medse.evaluation.evaluate_cases` against the dataset's labels. The cell's per-case records
(:mod:`medse.compare.records`) are written atomically to ``cells/<cell_id>/records.csv`` (the cell folder:
:class:`medse.compare.cell.Cell`): that file marks the cell as finished, and ``cell.json`` records what it was made
with (resolved config, data fingerprint, medse version), so a rerun skips it only when the grid
still asks for exactly that (:func:`stale_cells`; otherwise refused until ``retrain_stale``/``overwrite``).
Every cell's config and network are checked before the first cell trains (:func:`check_grid`). A cell killed
mid-training resumes from its last checkpoint (:func:`medse.training.resume`); SIGINT/SIGTERM stop with the cell
and the command that resumes. A failing cell is reported (``cells/<cell_id>/error.txt``) and the rest go on. At
the end the table and figures are rebuilt from all records available in the output folder (all shards), each row
on the runs present for both it and the baseline; failed cells and unmatched runs or cases are in its notes.

Output folder::

    OUT/pipeline.yaml                  the resolved pipeline (grid, base training config, overrides)
    OUT/cells/<arch>-<block>-<fold>-seed<s>/   one cell (:class:`medse.compare.cell.Cell`): run/, pred/, eval/,
                                               records.csv (finished marker), cell.json, cell_times.json, error.txt
    OUT/table.{csv,md,tex,json}, OUT/table_structures.*  (when per-structure rows are requested)
    OUT/figures/dice_boxplot.png, gain.png, overlay.png
    OUT/report.json                    cells run / skipped / failed in the last invocation, unmatched cases

The grid design follows the scSE papers (Roy et al., MICCAI 2018, arXiv 1803.02579; IEEE TMI 2019,
arXiv 1808.08127): each architecture trained without attention and with cSE, sSE and scSE.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medse.compare.cell import Cell
from medse.compare.records import load_records
from medse.runs import Run
from medse.utils.atomic import atomic_write_text
from medse.utils.config import apply_overrides, dump_yaml, from_dict, load_yaml
from medse.utils.errors import MedseError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "ArchSpec",
    "CellKey",
    "SynthSpec",
    "ensure_synthetic",
    "CompareConfig",
    "CompareReport",
    "TableSpec",
    "grid_cells",
    "load_pipeline",
    "parse_shard",
    "rebuild_outputs",
    "run_cell",
    "run_compare",
    "stale_cells",
]


@dataclass
class ArchSpec:
    """One architecture of the grid.

    Args:
        name: registered model name (``model.name`` of the training config).
        label: name shown in tables and used in cell folder names. Defaults to ``name``.
        overrides: training-config overrides for this architecture only (``key=value``). Defaults to none.
    """

    name: str
    label: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class TableSpec:
    """How the table is computed (:func:`medse.compare.table.build_table`).

    Args:
        baseline: block the others are compared with. Defaults to ``"none"``.
        structures: also write per-structure rows (``table_structures.*``). Defaults to False.
        n_boot: bootstrap resamples. Defaults to 10000.
        seed: bootstrap seed. Defaults to 0.
        confidence: CI coverage. Defaults to 0.95.
        metric: evaluation metric tabulated: ``dice`` (higher is better, gains in points), ``hd95`` or ``assd``
            (lower is better, gains = reduction in mm). Defaults to ``"dice"``.
    """

    baseline: str = "none"
    structures: bool = False
    n_boot: int = 10000
    seed: int = 0
    confidence: float = 0.95
    metric: str = "dice"


@dataclass
class SynthSpec:
    """Generate the synthetic phantom dataset (``medse.data.synth.generate_dataset``) into ``OUT/data`` first.

    Args:
        n_cases: number of cases. Defaults to 20.
        size: voxels along the finest axes. Defaults to 64.
        seed: generator seed. Defaults to 0.
    """

    n_cases: int = 20
    size: int = 64
    seed: int = 0


@dataclass
class CompareConfig:
    """A comparison pipeline (``pipelines/*.yaml``).

    Args:
        name: pipeline name (default output folder ``runs/compare/<name>``).
        train_config: base training config (path relative to the pipeline file), e.g. ``../configs/demo.yaml``.
        architectures: list of architectures (a name or a mapping, see :class:`ArchSpec`).
        blocks: attention blocks (``medse blocks``); the baseline must be among them.
            Defaults to ``[none, cse, sse, scse]`` (the papers' design).
        folds: cross-validation folds (sets ``data.split.fold``), or null for the config's own split.
            Defaults to null.
        seeds: training seeds (sets ``train.seed``). Defaults to ``[0]``.
        dataset: dataset name stated in the table header. Defaults to the data root's folder name.
        overrides: training-config overrides for every cell. Defaults to none.
        block_overrides: per-block overrides, e.g. ``{cse: [model.attention_kwargs.reduction=2]}``.
            Defaults to none.
        evaluate_on: which cases of each run's ``splits.json`` are predicted and evaluated: ``test`` (held out
            from training and model selection) or ``val`` (k-fold cross-validation, every case evaluated once
            across folds; the validation fold also picks ``best.pt``, so slightly optimistic). Defaults to ``test``.
        fold_key: config key set to each fold. Defaults to ``data.split.fold``.
        seed_key: config key set to each seed. Defaults to ``train.seed``.
        quiet: turn off per-iteration progress bars of the cells (``train.progress=false``). Defaults to True.
        figures: draw figures after the table. Defaults to True.
        table: :class:`TableSpec`.
        synthetic: when set (:class:`SynthSpec`), the synthetic dataset is generated into ``OUT/data`` (once)
            and every cell trains on it (``data.root``). Defaults to null (the training config names the data).
    """

    name: str
    train_config: str
    architectures: list[ArchSpec]
    blocks: list[str] = field(default_factory=lambda: ["none", "cse", "sse", "scse"])
    folds: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    dataset: str | None = None
    overrides: list[str] = field(default_factory=list)
    block_overrides: dict[str, list[str]] = field(default_factory=dict)
    evaluate_on: Literal["test", "val"] = "test"
    fold_key: str = "data.split.fold"
    seed_key: str = "train.seed"
    quiet: bool = True
    figures: bool = True
    table: TableSpec = field(default_factory=TableSpec)
    synthetic: SynthSpec | None = None
    source: str | None = None  # the pipeline file, filled in by load_pipeline

    def __post_init__(self) -> None:
        if not self.architectures:
            raise ValueError("architectures must list at least one architecture")
        if not self.blocks:
            raise ValueError("blocks must list at least one block")
        if self.table.baseline not in self.blocks:
            raise ValueError(f"table.baseline '{self.table.baseline}' is not among blocks {self.blocks}")
        keys = [a.key for a in self.architectures]
        for what, values in (("architectures", keys), ("blocks", self.blocks), ("seeds", self.seeds),
                             ("folds", self.folds or [])):
            dup = sorted({str(v) for v in values if list(values).count(v) > 1})
            if dup:
                raise ValueError(f"{what} lists {dup} more than once")
        for k in keys + list(self.blocks):
            if not k or any(c in k for c in "/\\ ") or k.startswith("."):
                raise ValueError(f"name '{k}' cannot be used in a folder name")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        unknown = sorted(set(self.block_overrides) - set(self.blocks))
        if unknown:
            raise ValueError(f"block_overrides names {unknown}, which are not among blocks {self.blocks}")

    def train_config_path(self) -> Path:
        p = Path(self.train_config).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p.resolve()


@dataclass(frozen=True)
class CellKey:
    """Where a cell sits in the grid: architecture key, block, fold (-1: the config's own split), seed. Its folder
    is ``Cell.in_grid(out, key.cell_id)`` (:class:`medse.compare.cell.Cell`)."""

    arch: str
    block: str
    fold: int
    seed: int

    @property
    def cell_id(self) -> str:
        fold = "holdout" if self.fold < 0 else f"fold{self.fold}"
        return f"{self.arch}-{self.block}-{fold}-seed{self.seed}"


@dataclass
class CompareReport:
    """What one invocation of :func:`run_compare` did."""

    output: Path
    cells: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    table_markdown: str = ""
    unmatched: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


def _block_name(block: Any) -> Any:
    """A grid block: a name as is; a mapping position -> block (or its ``a=b,c=d`` form) in canonical form."""
    if isinstance(block, dict) or (isinstance(block, str) and "=" in block):
        from medse.networks import format_assignment

        try:
            return format_assignment(block)
        except ValueError as e:
            raise MedseError(f"blocks: {e}") from None
    return block


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    archs = data.get("architectures")
    if isinstance(archs, (list, tuple)):
        data["architectures"] = [{"name": a} if isinstance(a, str) else a for a in archs]
    elif isinstance(archs, str):
        data["architectures"] = [{"name": archs}]
    if isinstance(data.get("blocks"), (str, dict)):
        data["blocks"] = [data["blocks"]]
    if isinstance(data.get("blocks"), list):  # a per-position assignment is named "encoder=cse,decoder=scse"
        data["blocks"] = [_block_name(b) for b in data["blocks"]]
    if isinstance(data.get("block_overrides"), dict):
        data["block_overrides"] = {_block_name(k): v for k, v in data["block_overrides"].items()}
    for k in ("seeds", "folds"):
        if isinstance(data.get(k), int) and not isinstance(data.get(k), bool):
            data[k] = [data[k]]
    return data


def load_validated(config: str | Path | dict[str, Any] | Any, overrides: Sequence[str], schema: type,
                   normalise: Callable[[dict[str, Any]], dict[str, Any]], what: str) -> tuple[Any, Path | None]:
    """A YAML path or mapping (``_base_`` inheritance, ``key=value`` overrides) validated against ``schema`` (a
    dataclass with ``train_config_path()``), or a ready ``schema`` instance; returns it and its file, if any.

    Raises:
        MedseError: naming the file and the key that is wrong, or a ``train_config`` that does not exist.
    """
    if isinstance(config, schema):
        if overrides:
            raise MedseError(f"overrides need a {what} file or mapping, not a {schema.__name__}")
        return config, None
    path: Path | None = None
    if isinstance(config, dict):
        data = dict(config)
    else:
        from medse._shipped import find

        path = find(config, "pipelines").expanduser().resolve()  # a local file, else a shipped pipeline
        data = load_yaml(path)
    data = normalise(apply_overrides(data, list(overrides)))
    if path is not None:
        data.setdefault("source", str(path))
    try:
        cfg = from_dict(schema, data)
    except MedseError as e:
        raise MedseError(str(e), path) from None
    if not cfg.train_config_path().is_file():
        raise MedseError(f"train_config '{cfg.train_config}' not found at {cfg.train_config_path()}", path)
    return cfg, path


def load_pipeline(
    config: str | Path | dict[str, Any] | CompareConfig, overrides: Sequence[str] = ()
) -> CompareConfig:
    """Load and validate a pipeline YAML (``_base_`` inheritance and ``key=value`` overrides supported).

    Raises:
        MedseError: naming the file and the key that is wrong.
    """
    return load_validated(config, overrides, CompareConfig, _normalise, "pipeline")[0]


def grid_cells(cfg: CompareConfig) -> list[CellKey]:
    """All cells in a stable order: architecture, fold, seed, block (so a block's cells sit together)."""
    folds = list(cfg.folds) if cfg.folds is not None else [-1]
    return [CellKey(a.key, b, f, s) for a in cfg.architectures for f in folds for s in cfg.seeds for b in cfg.blocks]


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based i, 0 <= i < n) -> ``(i, n)``; None stays None."""
    if shard is None or shard == "":
        return None
    if isinstance(shard, tuple):
        i, n = shard
    else:
        try:
            a, b = str(shard).split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise MedseError(f"--shard '{shard}' must look like i/n, e.g. 0/4 (0-based index)") from None
    if n < 1 or not 0 <= i < n:
        raise MedseError(f"--shard '{shard}': need n >= 1 and 0 <= i < n (0-based index)")
    return i, n


def cell_overrides(cfg: CompareConfig, cell: CellKey) -> list[str]:
    """Training-config overrides of one cell: pipeline, architecture, block, then the grid coordinates."""
    arch = next(a for a in cfg.architectures if a.key == cell.arch)
    ov = [*cfg.overrides, *arch.overrides, f"model.name={arch.name}", f"model.attention={cell.block}",
          *cfg.block_overrides.get(cell.block, []), f"{cfg.seed_key}={cell.seed}"]
    if cell.fold >= 0:
        ov.append(f"{cfg.fold_key}={cell.fold}")
    if cfg.quiet:
        ov.append("train.progress=false")
    return ov


#: runs one cell (its grid key, its folder, the grid) and returns its records
CellRunner = Callable[[CellKey, Cell, CompareConfig], "pd.DataFrame"]


def _dataset_of_run(run: Run | Path) -> Any:
    """The DatasetSpec the run was trained on (from its resolved config)."""
    from medse.data.datasets import load_dataset

    run = Run.open(run)
    data = run.config.data
    source = data.manifest or data.root
    if not source:
        raise MedseError("the run's config has no data.root / data.manifest", run.config_path)
    return load_dataset(source, layout=data.layout or "auto")


def _dataset_name(run: Run | Path) -> str:
    data = Run.open(run).config.data
    src = Path(str(data.manifest or data.root or "dataset"))
    return src.stem if src.suffix else src.name


def run_cell(key: CellKey, cell: Cell | Path, cfg: CompareConfig) -> pd.DataFrame:
    """Default cell runner: train (or resume) -> :func:`~medse.inference.predict_folder` on the run's test
    cases (timed per case, after an untimed warm-up) -> :func:`~medse.evaluation.evaluate_cases` of the predictions
    and the dataset's labels -> records.

    Returns:
        the cell's records (:func:`medse.compare.records.cell_rows`).
    """
    from medse.compare.records import cell_rows
    from medse.evaluation import evaluate_cases
    from medse.inference import InputCase, Predictor, predict_folder
    from medse.training import resume, train
    from medse.utils.complexity import count_params

    cell = Cell.create(cell)
    t_start, c_start = time.perf_counter(), time.process_time()
    if cell.has_run:
        run = resume(cell.run_dir)  # a killed cell continues from its last checkpoint; a finished run returns at once
    else:
        if cell.run_dir.exists() and not any(cell.run_dir.iterdir()):
            cell.run_dir.rmdir()
        run = train(cfg.train_config_path(), cell.run_dir, overrides=cell_overrides(cfg, key))
    test_ids = run.split.ids(cfg.evaluate_on)
    if not test_ids:
        hint = "set data.split.test_fraction" if cfg.evaluate_on == "test" else "use a kfold split"
        raise MedseError(f"the split has no '{cfg.evaluate_on}' cases to evaluate ({hint})", run / Run.SPLITS)
    spec = _dataset_of_run(run)
    by_id = {c.case_id: c for c in spec.cases}
    missing = [c for c in test_ids if c not in by_id or by_id[c].label is None]
    if missing:
        raise MedseError(f"test cases {missing[:5]} have no image/label in the dataset", run / Run.SPLITS)

    t_trained, c_trained = time.perf_counter(), time.process_time()
    predictor = Predictor.from_run(run, checkpoint="best")
    pred_dir = cell.predictions_dir
    cases = [InputCase(cid, [Path(p) for p in by_id[cid].images]) for cid in test_ids]
    # sequential (prefetch=False): the per-case seconds are the inference-overhead column's measurements, and
    # overlapping reads/writes of neighbouring cases would fold into them
    report = predict_folder(predictor, cases, pred_dir, overwrite=True, progress=False, warmup=True, prefetch=False)
    if report.failed:
        cid, msg = report.failed[0]
        raise MedseError(f"{len(report.failed)} test case(s) failed to predict, first {cid}: {msg}", pred_dir)
    t_predicted, c_predicted = time.perf_counter(), time.process_time()
    labels = {k: int(v) for k, v in (spec.labels or {}).items() if int(v) != 0} or None
    references = {cid: Path(by_id[cid].label) for cid in test_ids}
    ev = evaluate_cases(cell.evaluation_cases(references), cell.evaluation_dir, labels=labels, pred_dir=pred_dir,
                        ref=spec.source)
    t_done, c_done = time.perf_counter(), time.process_time()
    cell.write_times({
        "train_s": round(t_trained - t_start, 2), "predict_s": round(t_predicted - t_trained, 2),
        "evaluate_s": round(t_done - t_predicted, 2), "train_cpu_s": round(c_trained - c_start, 2),
        "predict_cpu_s": round(c_predicted - c_trained, 2), "evaluate_cpu_s": round(c_done - c_predicted, 2),
        "n_cases": len(test_ids)})
    step = (run.timing or {}).get("train_step_time_mean_s")
    params = count_params(predictor.model)
    return cell_rows(ev, arch=key.arch, block=key.block, fold=key.fold, seed=key.seed, params=params,
                     train_step_s=step, infer_s=dict(report.case_seconds), dataset=cfg.dataset or _dataset_name(run))


#: config keys that change how a run is shown or scheduled on the machine, not what it learns: a change of them
#: leaves a finished cell fresh
NON_RESULT_KEYS = ("train.progress", "train.tensorboard", "train.num_threads", "train.num_workers")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _data_fingerprint(source: str | None, layout: str | None) -> str | None:
    """sha256 over the dataset's case files (path, size, modification time), as predict's skip rule does."""
    import hashlib

    from medse.data.datasets import load_dataset

    if not source or not Path(source).exists():
        return None
    try:
        spec = load_dataset(source, layout=layout or "auto")
    except MedseError:
        return None
    items = []
    for c in spec.cases:
        for f in [*c.images, *([c.label] if c.label is not None else [])]:
            st = Path(f).stat()
            items.append([c.case_id, str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def cell_identity(cfg: CompareConfig, cell: CellKey, *, data: dict[str, str | None] | None = None) -> dict[str, Any]:
    """What a cell's results depend on: its resolved training config (less :data:`NON_RESULT_KEYS`), a fingerprint
    of its data files and the medse version. A finished cell is reused only when this equals what it recorded.

    Args:
        data: a cache of data fingerprints by data source (shared across the cells of a grid).
    """
    import medse
    from medse.config import config_to_dict, load_config

    resolved = config_to_dict(load_config(cfg.train_config_path(), cell_overrides(cfg, cell)))
    flat = {k: v for k, v in _flatten(resolved).items() if k not in NON_RESULT_KEYS}
    source = flat.get("data.manifest") or flat.get("data.root")
    cache = data if data is not None else {}
    if str(source) not in cache:
        cache[str(source)] = _data_fingerprint(source, flat.get("data.layout"))
    return {"config": flat, "data": cache[str(source)], "medse_version": medse.__version__}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key old -> new`` for every config key, the data and the medse version that differ."""

    def show(v: Any) -> str:
        return json.dumps(v, default=str)

    diffs = []
    oc, nc = old.get("config") or {}, new.get("config") or {}
    for k in sorted(set(oc) | set(nc)):
        if show(oc.get(k)) != show(nc.get(k)):
            diffs.append(f"{k}: {show(oc.get(k))} -> {show(nc.get(k))}")
    if old.get("data") != new.get("data"):
        diffs.append("data: the dataset's files changed")
    if old.get("medse_version") != new.get("medse_version"):
        diffs.append(f"medse version: {old.get('medse_version')} -> {new.get('medse_version')}")
    return diffs


def stale_cells(cfg: CompareConfig, out: Path, cells: Sequence[CellKey] | None = None) -> dict[str, list[str]]:
    """Cells under ``out`` whose finished records (or partly trained run) were made with other settings than the
    grid now asks: ``cell_id -> differences`` (``key: old -> new``). Cells not started are not stale."""
    from medse.config import config_to_dict

    cache: dict[str, str | None] = {}
    stale: dict[str, list[str]] = {}
    for key in cells if cells is not None else grid_cells(cfg):
        cell = Cell.in_grid(out, key.cell_id)
        if cell.finished:
            want = cell_identity(cfg, key, data=cache)
            have = cell.identity
            if have is None:
                stale[key.cell_id] = [f"{Cell.IDENTITY} missing or unreadable: the settings it was made with are "
                                      "unknown"]
                continue
            diffs = _differences(have, want)
        elif cell.has_run:  # a killed cell would resume with its stored config
            want = cell_identity(cfg, key, data=cache)
            try:
                have_cfg = _flatten(config_to_dict(cell.run.config))
            except MedseError:
                continue
            have = {"config": {k: v for k, v in have_cfg.items() if k not in NON_RESULT_KEYS}}
            diffs = _differences(have, {"config": want["config"]})
        else:
            continue
        if diffs:
            stale[key.cell_id] = diffs
    return stale


def refuse_stale(stale: dict[str, list[str]], out: Path, flags: str = "--retrain-stale to retrain the stale "
                 "cells, or --overwrite to retrain every cell") -> None:
    """Raise the one-line refusal of stale cells (see :func:`stale_cells`): the first cell and its differences."""
    first, diffs = next(iter(stale.items()))
    more = f" (and {len(stale) - 1} more cell(s))" if len(stale) > 1 else ""
    raise MedseError(f"cell {first}{more} was made with other settings than the grid now asks: "
                     f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}; pass {flags}",
                     Cell.in_grid(out, first).identity_path)


def check_grid(cfg: CompareConfig, cells: Sequence[CellKey], source: str | Path | None = None) -> None:
    """Validate every cell's config and build every cell's network (on the meta device, with the dataset's channels
    and classes) before the first cell trains, so that a typo fails at once, not after hours of earlier cells.

    Raises:
        MedseError: one line naming the grid file, the key (``blocks``, or the cell and the config key) and what is
            wrong, with a did-you-mean for an unknown block.
    """
    from medse.attention import list_attention
    from medse.config import load_config
    from medse.training.trainer import check_model
    from medse.utils.errors import did_you_mean

    known = set(list_attention())
    for b in cfg.blocks:
        for part in str(b).split(","):
            for name in part.split("=")[-1].split("+"):
                name = name.strip()
                if name and name != "none" and name not in known:
                    raise MedseError(f"blocks: unknown block '{name}' in '{b}'.{did_you_mean(name, known)} Available: "
                                     f"none, {', '.join(sorted(known))} (see medse blocks)", source)
    shapes: dict[str, tuple[int, int]] = {}
    for cell in cells:
        try:
            run_cfg = load_config(cfg.train_config_path(), cell_overrides(cfg, cell))
        except MedseError as e:
            raise MedseError(f"cell {cell.cell_id}: {e}", source) from None
        data_src = str(run_cfg.data.manifest or run_cfg.data.root or "")
        if data_src not in shapes:
            shapes[data_src] = _channels_and_classes(run_cfg)
        try:
            check_model(run_cfg, *shapes[data_src])
        except MedseError as e:
            raise MedseError(f"cell {cell.cell_id}: {e}", source) from None


def _channels_and_classes(run_cfg: Any) -> tuple[int, int]:
    """Input channels and classes of the run's dataset (1 and 2 where the data cannot be read yet: the cell's own
    training will say why)."""
    from medse.data.datasets import load_dataset

    src = run_cfg.data.manifest or run_cfg.data.root
    labels = dict(run_cfg.data.labels or {})
    n_in = 1
    if src and Path(src).exists():
        try:
            spec = load_dataset(src, layout=run_cfg.data.layout or "auto")
            n_in = spec.num_channels
            labels = labels or dict(spec.labels)
        except MedseError:
            pass
    return n_in, max(2, len({0, *(int(v) for v in labels.values())}))


def run_compare(
    config: str | Path | dict[str, Any] | CompareConfig,
    output: str | Path | None = None,
    *,
    shard: str | tuple[int, int] | None = None,
    overrides: Sequence[str] = (),
    train_overrides: Sequence[str] = (),
    runner: CellRunner | None = None,
    log: Callable[[str], None] | None = print,
    retrain_stale: bool = False,
    overwrite: bool = False,
    resume_command: str | None = None,
) -> CompareReport:
    """Run (or continue) a comparison grid and rebuild its table and figures.

    Before any cell trains, every cell's config is validated and its network built (:func:`check_grid`), and the
    finished cells are checked against what the grid now asks (:func:`stale_cells`): a finished cell is reused
    only when its recorded resolved config (less :data:`NON_RESULT_KEYS`), data and medse version are the same.

    Args:
        config: pipeline YAML path, mapping or :class:`CompareConfig`.
        output: output folder. Defaults to ``runs/compare/<name>``.
        shard: ``"i/n"``: run only cells ``i, i+n, i+2n, ...`` of the grid (0-based). Defaults to all.
        overrides: ``key=value`` overrides of the pipeline config (e.g. ``seeds=[0,1]``).
        train_overrides: training-config overrides appended to every cell's (e.g. ``train.epochs=1``). A finished
            cell made with other values is stale (see ``retrain_stale``). Defaults to none.
        runner: the function that runs one cell and returns its records. Defaults to :func:`run_cell`.
        log: where progress lines go. Defaults to ``print``; None for silence.
        retrain_stale: retrain the stale cells (their folders are removed first) instead of refusing.
            Defaults to False.
        overwrite: retrain every cell of this invocation, finished or not. Defaults to False.
        resume_command: the command printed when SIGINT/SIGTERM stops the grid. Defaults to the ``medse compare``
            command of these arguments.

    Returns:
        :class:`CompareReport` (also written to ``OUT/report.json``).

    Raises:
        MedseError: a cell's config or network is invalid, or finished cells are stale (naming the differing
            keys) and neither ``retrain_stale`` nor ``overwrite`` is set.
        Interrupted: SIGINT/SIGTERM; says which cell it stopped in and the command that resumes.
    """
    import shutil

    from medse.utils.interrupt import Interrupted, stop_on_signals

    cfg = load_pipeline(config, overrides)
    source = cfg.source
    if train_overrides:
        cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, *train_overrides])
    out = Path(output) if output is not None else Path("runs") / "compare" / cfg.name
    out = out.expanduser().resolve()
    say = log or (lambda _m: None)
    runner = runner or run_cell
    sh = parse_shard(shard)
    if resume_command is None:
        resume_command = grid_command("compare", config, out, overrides, train_overrides, shard)
    if cfg.synthetic is not None:
        data_dir = (out / "data").resolve()
        cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, f"data.root={data_dir}"])
    cells = grid_cells(cfg)
    mine = cells if sh is None else cells[sh[0]:: sh[1]]
    check_grid(cfg, cells, source)  # every cell's config and network (all shards'), before the first one trains
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline.yaml", dump_yaml(cfg))
    if cfg.synthetic is not None:
        ensure_synthetic(cfg.synthetic, out / "data", log=say)
    stale = {} if overwrite else stale_cells(cfg, out, mine)
    if stale and not retrain_stale:
        refuse_stale(stale, out)
    report = CompareReport(output=out, cells=[c.cell_id for c in mine])
    fingerprints: dict[str, str | None] = {}  # data fingerprints by source, computed once per invocation
    say(f"compare '{cfg.name}': {len(mine)} of {len(cells)} cells" + (f" (shard {sh[0]}/{sh[1]})" if sh else "")
        + f" -> {out}")
    with stop_on_signals():
        for k, key in enumerate(mine, 1):
            cell = Cell.in_grid(out, key.cell_id)
            if cell.path.exists() and (overwrite or key.cell_id in stale):
                why = "--overwrite" if overwrite else "stale: " + "; ".join(stale[key.cell_id][:3])
                say(f"[{k}/{len(mine)}] {key.cell_id}: retraining ({why})")
                shutil.rmtree(cell.path)
            if cell.finished:
                report.skipped.append(key.cell_id)
                say(f"[{k}/{len(mine)}] {key.cell_id}: finished earlier with the same settings, skipped")
                continue
            say(f"[{k}/{len(mine)}] {key.cell_id}: running")
            t0 = time.perf_counter()
            try:
                Cell.create(cell)
                identity = cell_identity(cfg, key, data=fingerprints)
                records = runner(key, cell, cfg)
                cell.write_identity(identity)
                cell.write_records(records)
            except KeyboardInterrupt as e:  # SIGINT/SIGTERM (train's own Interrupted included): say where
                where = f"cell {key.cell_id} ({k} of {len(mine)}) of {out}"
                if isinstance(e, Interrupted):
                    where += f", in {e.where}"
                raise Interrupted(where, resume=resume_command) from None
            except Exception as e:  # a failed cell is reported; the rest go on
                msg = f"{type(e).__name__}: {e}".replace("\n", " ")
                report.failed[key.cell_id] = msg
                cell.write_error(traceback.format_exc())
                say(f"[{k}/{len(mine)}] {key.cell_id}: FAILED ({msg}); see {cell.error_path}")
                continue
            cell.clear_error()
            report.ran.append(key.cell_id)
            say(f"[{k}/{len(mine)}] {key.cell_id}: done in {time.perf_counter() - t0:.1f} s{_times(cell)}")
        report.outputs, report.table_markdown = rebuild_outputs(cfg, out, log=say)
    report.unmatched = _unmatched(out)
    report.incomplete = _incomplete(out, waiting_ok=sh is not None)
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    if report.failed:
        say(f"{len(report.failed)} cell(s) failed: {', '.join(report.failed)} (rerun to retry them); the table "
            "was rebuilt without them")
    return report


def grid_command(command: str, config: Any, out: Path, overrides: Sequence[str], train_overrides: Sequence[str],
                 shard: Any, *flags: str) -> str:
    """The ``medse compare`` / ``medse search`` command line that continues a grid in ``out`` (finished cells are
    reused): the pipeline file, the output folder, ``flags`` (e.g. ``--resume``), the overrides and the shard."""
    import shlex

    from medse._shipped import find

    cfg_arg = (str(find(config, "pipelines").expanduser().resolve()) if isinstance(config, (str, Path))
               else "PIPELINE.yaml")  # a shipped name (demo) as the file it resolved to
    parts = ["medse", command, "-c", cfg_arg, "-o", str(out), *flags, *overrides]
    for t in train_overrides:
        parts += ["-t", t]
    if shard:
        parts += ["--shard", shard if isinstance(shard, str) else f"{shard[0]}/{shard[1]}"]
    return " ".join(shlex.quote(p) for p in parts)


def ensure_synthetic(spec: SynthSpec, data_dir: Path, *, log: Callable[[str], None] | None = None) -> Path:
    """Generate the synthetic dataset into ``data_dir`` unless a complete one with the same settings is there."""
    from medse.data.synth import generate_dataset

    say = log or (lambda _m: None)
    stamp = data_dir / "medse_synth.json"
    want = dataclasses.asdict(spec)
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return data_dir.resolve()
        except json.JSONDecodeError:
            pass
    say(f"generating {spec.n_cases} synthetic cases of {spec.size}^3 voxels (seed {spec.seed}) -> {data_dir}")
    t0 = time.perf_counter()
    generate_dataset(data_dir, n_cases=spec.n_cases, size=spec.size, seed=spec.seed, overwrite=True)
    atomic_write_text(stamp, json.dumps(want) + "\n")
    say(f"synthetic data ready in {time.perf_counter() - t0:.1f} s")
    return data_dir.resolve()


def _times(cell: Cell) -> str:
    try:
        t = cell.times
        return (f" (wall/CPU s: train {t['train_s']:.0f}/{t['train_cpu_s']:.0f}, predict {t['n_cases']} cases "
                f"{t['predict_s']:.0f}/{t['predict_cpu_s']:.0f}, evaluate {t['evaluate_s']:.0f}/{t['evaluate_cpu_s']:.0f})")
    except (KeyError, TypeError):  # no times (None) or written by another medse
        return ""


def rebuild_outputs(
    cfg: CompareConfig, out: Path, *, log: Callable[[str], None] | None = None
) -> tuple[dict[str, str], str]:
    """Rebuild the table(s) and figures from every ``cells/*/records.csv`` under ``out``.

    Only cells of the current grid are used (records of cells removed from the pipeline are ignored).
    Returns the written paths and the Markdown table ('' when there are no records yet).
    """
    from medse.compare.table import build_table

    say = log or (lambda _m: None)
    wanted = {c.cell_id for c in grid_cells(cfg)}
    paths = [c.records_path for c in Cell.all_in(out) if c.cell_id in wanted and c.finished]
    if not paths:
        say("no finished cells yet: no table")
        return {}, ""
    import warnings

    records = load_records(paths)
    t = cfg.table
    folds = list(cfg.folds) if cfg.folds is not None else [-1]
    common = dict(baseline=t.baseline, metric=t.metric, confidence=t.confidence, n_boot=t.n_boot, seed=t.seed,
                  dataset=cfg.dataset, arch_order=[a.key for a in cfg.architectures], block_order=cfg.blocks,
                  expected_runs=[(f, s) for f in folds for s in cfg.seeds])
    not_done = _unfinished(cfg, out)
    outputs: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unmatched cases and runs: said once below, in table.json
        table = build_table(records, **common)
        st = build_table(records, structures=True, **common) if t.structures else None
    for tab in (table, st):
        if tab is not None:
            tab.header["failed_runs"] = not_done
    for line in not_done:
        say(f"warning: not in the table: {line}")
    for line in table.header.get("unmatched_runs", []):
        say(f"warning: unmatched run, left out of the rows that lack it: {line}")
    for line in table.header.get("unmatched", []):
        say(f"warning: unmatched, left out of the paired comparison: {line}")
    for kind, p in table.write(out, "table").items():
        outputs[f"table_{kind}"] = str(p)
    if st is not None:
        for line in st.header.get("unmatched", []):
            if "/" in line.split(":")[0]:
                say(f"warning: unmatched, left out of the paired comparison: {line}")
        for kind, p in st.write(out, "table_structures").items():
            outputs[f"table_structures_{kind}"] = str(p)
    if cfg.figures:
        outputs.update(_figures(cfg, out, records, table, say))
    return outputs, table.to_markdown()


def _unfinished(cfg: CompareConfig, out: Path) -> list[str]:
    """Grid cells without records: ``<cell_id>: failed (<last line of error.txt>)`` or ``<cell_id>: not finished``."""
    lines = []
    for key in grid_cells(cfg):
        cell = Cell.in_grid(out, key.cell_id)
        if cell.finished:
            continue
        last = cell.error_line
        lines.append(f"{key.cell_id}: failed ({last[:200]})" if last is not None else f"{key.cell_id}: not finished")
    return lines


def _incomplete(out: Path, *, waiting_ok: bool = False) -> list[str]:
    """What keeps the written table from resting on the whole grid (``table.json``): unmatched runs, failed or
    unfinished cells, unmatched cases. ``waiting_ok`` (a shard): cells not yet run by other shards, and the runs
    they leave unmatched, do not count."""
    try:
        h = json.loads((out / "table.json").read_text())
    except (OSError, ValueError):
        return []
    failed = [x for x in h.get("failed_runs") or [] if not (waiting_ok and x.endswith(": not finished"))]
    runs = [] if waiting_ok and len(failed) == 0 else list(h.get("unmatched_runs") or [])
    return [*runs, *failed, *_unmatched(out)]


def _unmatched(out: Path) -> list[str]:
    """The unmatched cases listed in the written table headers (``table.json``, ``table_structures.json``)."""
    lines: list[str] = []
    for name in ("table.json", "table_structures.json"):
        try:
            lines += [u for u in json.loads((out / name).read_text()).get("unmatched", []) if u not in lines]
        except (OSError, ValueError):
            continue
    return lines


def _figures(cfg: CompareConfig, out: Path, records: pd.DataFrame, table: Any,
             say: Callable[[str], None]) -> dict[str, str]:
    from medse.compare.figures import dice_boxplot, gain_barchart, overlay_figure, pick_example_case

    fig_dir = out / "figures"
    outputs: dict[str, str] = {}
    try:
        outputs["fig_boxplot"] = str(dice_boxplot(records, fig_dir / "dice_boxplot.png",
                                                  baseline=cfg.table.baseline, metric=cfg.table.metric,
                                                  block_order=table.header.get("blocks")))
    except MedseError as e:
        say(f"box plot skipped: {e}")
    try:
        outputs["fig_gain"] = str(gain_barchart(table, fig_dir / "gain.png"))
    except MedseError as e:
        say(f"gain chart skipped: {e}")
    try:
        outputs["fig_overlay"] = str(_overlay(cfg, out, records, table, fig_dir / "overlay.png",
                                              overlay_figure, pick_example_case))
    except (MedseError, FileNotFoundError, ImportError, ValueError) as e:
        say(f"overlay skipped: {e}")
    return outputs


def _overlay(cfg: CompareConfig, out: Path, records: pd.DataFrame, table: Any, path: Path,
             overlay_figure: Callable[..., Path], pick_example_case: Callable[..., str]) -> Path:
    """Overlay of the median-gain case of the first architecture: scan, reference, none, best block."""
    import math

    base = cfg.table.baseline
    rows = table.rows[(table.rows["structure"] == "foreground") & (table.rows["block"] != base)]
    rows = rows[rows["gain"].map(lambda v: isinstance(v, float) and math.isfinite(v))]
    if rows.empty:
        raise MedseError("no block paired with the baseline")
    arch = rows["arch"].iloc[0]
    arow = rows[rows["arch"] == arch]
    best = str(arow.loc[arow["gain"].idxmax(), "block"])  # gains are improvements for every metric
    case_id = pick_example_case(records, arch, base, best, metric=cfg.table.metric)
    for key in grid_cells(cfg):
        if key.arch != arch or key.block != base:
            continue
        cell = Cell.in_grid(out, key.cell_id)
        p_base = cell.predictions().get(case_id)
        p_best = Cell.in_grid(out, CellKey(arch, best, key.fold, key.seed).cell_id).predictions().get(case_id)
        if p_base is None or p_best is None:
            continue
        spec = _dataset_of_run(cell.run_dir)
        case = next(c for c in spec.cases if c.case_id == case_id)
        return overlay_figure(case.images[0], case.label, {base: p_base, best: p_best}, path,
                              title=f"{arch}, case {case_id} (the case with the median gain of {best})",
                              label_names=spec.labels or None)
    raise MedseError(f"no predictions of case '{case_id}' for both '{base}' and '{best}'")

