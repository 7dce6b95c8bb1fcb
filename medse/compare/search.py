"""Per-position attention search by successive halving (``medse search``), scored on untouched test cases.

The search space is every assignment of ``space.blocks`` to ``space.positions`` (e.g. positions
``[encoder, decoder]`` x blocks ``[none, cse, scse]``: 9 candidates, ``decoder=scse``, ``encoder=cse,decoder=scse``,
...; the all-``none`` assignment is the baseline ``none``). Successive halving (Jamieson & Talwalkar, AISTATS 2016,
arXiv 1502.07943; the inner loop of Hyperband, Li et al., JMLR 2018, arXiv 1603.06560):

1. rung 0 trains every candidate with budget ``min_budget`` (``budget_key``, e.g. ``train.epochs``);
2. each candidate is scored on validation cases (the ``val`` cases of every run's split: the holdout validation
   cases, or every non-test case once across ``folds``); the best ``floor(n / eta)`` (at least 1) survive;
3. rung ``k`` trains the survivors anew with budget ``min_budget * eta**k``; repeat until one is left.

Each rung is a :mod:`medse.compare.pipeline` grid (``OUT/rung<k>/``, ``evaluate_on: val``), so training,
prediction, evaluation, records, resuming, failures and shards are compare's. The rung's decision is frozen in
``OUT/rung<k>/decision.json`` once every candidate has records. Then the winner and the baseline are trained with
the last rung's budget (or ``final_budget``; a run of the last rung with that budget is copied, not retrained)
and scored on the split's **test** cases, which no selection step
trained or validated on (checked: :func:`check_disjoint`), in ``OUT/final/`` with compare's paired table.

NOTE: not in paper — the restart-per-rung budgets, the per-position space and the test-set step are medse's
design for this toolkit.

Output folder::

    OUT/search.yaml        the resolved search config          OUT/report.md, OUT/report.json  the search report
    OUT/data/              the synthetic phantoms (when ``synthetic`` is set)
    OUT/rung<k>/           a compare grid of the rung's candidates (cells/, table.*, report.json) + decision.json
    OUT/final/             a compare grid: baseline and winner on the test cases (table.*, figures/)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medse.compare.cell import Cell, decision_path
from medse.compare.pipeline import (
    ArchSpec,
    CellRunner,
    CompareConfig,
    SynthSpec,
    TableSpec,
    ensure_synthetic,
    grid_cells,
    grid_command,
    load_validated,
    parse_shard,
    refuse_stale,
    run_compare,
    stale_cells,
)
from medse.evaluation.metrics import get_metric, list_metrics
from medse.runs import Run
from medse.utils.atomic import atomic_write_text
from medse.utils.config import dump_yaml, load_yaml, to_dict
from medse.utils.errors import MedseError

__all__ = [
    "Rung",
    "SearchConfig",
    "SearchReport",
    "SpaceSpec",
    "candidate_names",
    "check_disjoint",
    "halving_schedule",
    "load_search",
    "run_search",
    "select_survivors",
    "validation_scores",
]

OPTIMISM_NOTE = ("The validation scores above chose the winner, so the winner's validation score is optimistic (the "
                 "maximum of several noisy scores, the winner's curse); only the test-set comparison below estimates "
                 "its performance, on cases that no selection step trained or validated on.")


# ------------------------------------------------------------------ the halving logic (pure functions)


@dataclass(frozen=True)
class Rung:
    """One rung of successive halving: index, number of candidates trained, budget each, survivors kept."""

    index: int
    n_candidates: int
    budget: int
    n_survivors: int


def _n_keep(n: int, eta: int) -> int:
    return max(1, n // eta)


def halving_schedule(n_candidates: int, eta: int, min_budget: int) -> list[Rung]:
    """The rungs for ``n_candidates``: rung k trains ``n_k`` candidates with ``min_budget * eta**k`` each and keeps
    ``max(1, n_k // eta)``; the last rung keeps one. A single candidate needs no rung (``[]``).

    Raises:
        ValueError: ``n_candidates < 1``, ``eta < 2`` or ``min_budget < 1``.
    """
    if n_candidates < 1:
        raise ValueError(f"need at least one candidate, got {n_candidates}")
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    if min_budget < 1:
        raise ValueError(f"min_budget must be >= 1, got {min_budget}")
    rungs: list[Rung] = []
    n, k = n_candidates, 0
    while n > 1:
        keep = _n_keep(n, eta)
        rungs.append(Rung(k, n, min_budget * eta**k, keep))
        n, k = keep, k + 1
    return rungs


def select_survivors(scores: Mapping[str, float], eta: int, *, higher_is_better: bool = True) -> list[str]:
    """The best ``max(1, len(scores) // eta)`` candidates, best first.

    NaN scores rank last; ties keep the order of ``scores`` (the space order, so the result is deterministic).
    """
    if not scores:
        raise ValueError("no scores to select from")
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    names = list(scores)

    def key(i: int) -> tuple[int, float, int]:
        v = float(scores[names[i]])
        if math.isnan(v):
            return (1, 0.0, i)
        return (0, -v if higher_is_better else v, i)

    order = sorted(range(len(names)), key=key)
    return [names[i] for i in order[: _n_keep(len(names), eta)]]


def check_disjoint(selection_cases: Mapping[str, Sequence[str]] | Sequence[str], test_cases: Sequence[str],
                   source: object | None = None) -> None:
    """Raise :class:`MedseError` when a test case was used by a selection step (trained or validated on).

    Args:
        selection_cases: the case ids any selection step used, or a mapping ``step -> case ids`` (named in the error).
        test_cases: the case ids of the final test-set evaluation.
    """
    steps = selection_cases if isinstance(selection_cases, Mapping) else {"selection": selection_cases}
    test = {str(c) for c in test_cases}
    if not test:
        raise MedseError("the final evaluation has no test cases", source)
    for step, cases in steps.items():
        both = sorted(test & {str(c) for c in cases})
        if both:
            raise MedseError(f"test case(s) {both[:5]} were also used by {step}: the test-set evaluation would not be "
                             "independent of the selection (use the same data.split for every stage)", source)


def candidate_names(positions: Sequence[str], blocks: Sequence[str]) -> list[str]:
    """Every assignment of ``blocks`` to ``positions``, in canonical form (:func:`medse.networks.format_assignment`).

    ``none`` entries are left out of a mapping (an unnamed position gets no attention), so the all-``none``
    assignment is ``"none"`` and a single named position reads e.g. ``"decoder=scse"``. Order: the product in the
    order given (the first block varies slowest over the first position), duplicates removed.
    """
    from medse.networks import format_assignment

    out: list[str] = []
    for combo in itertools.product(blocks, repeat=len(positions)):
        mapping = {p: b for p, b in zip(positions, combo, strict=True) if b != "none"}
        name = format_assignment(mapping) if mapping else "none"
        if name not in out:
            out.append(name)
    return out


# ------------------------------------------------------------------ config


@dataclass
class SpaceSpec:
    """The search space: every assignment of ``blocks`` to ``positions``.

    Args:
        positions: network positions (``encoder``, ``bottleneck``, ``decoder``, ``tokens``) or stages (``encoder.0``).
        blocks: block names (``medse blocks``; ``a+b`` compositions allowed); include ``none`` for "no block here".
    """

    positions: list[str]
    blocks: list[str]

    def __post_init__(self) -> None:
        self.positions = [str(p).strip().lower() for p in self.positions]
        self.blocks = [str(b).strip().lower() for b in self.blocks]
        if not self.positions:
            raise ValueError("space.positions must list at least one position")
        if not self.blocks:
            raise ValueError("space.blocks must list at least one block")
        for what, values in (("space.positions", self.positions), ("space.blocks", self.blocks)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"{what} lists {dup} more than once")


@dataclass
class SearchConfig:
    """A search pipeline (``pipelines/search_*.yaml``).

    Args:
        name: search name (default output folder ``runs/search/<name>``).
        train_config: base training config (path relative to the search file).
        space: :class:`SpaceSpec`.
        architecture: the network (a registered name or ``{name, label, overrides}``). Defaults to the training
            config's ``model.name``.
        eta: halving rate: keep the best ``1/eta`` of each rung, multiply the budget by ``eta``. Defaults to 3.
        min_budget: budget of rung 0 (a positive integer set at ``budget_key``). Defaults to 1.
        budget_key: training-config key that receives the budget: ``train.epochs`` (restart with that many epochs)
            or ``train.iterations_per_epoch``. Defaults to ``train.epochs``.
        final_budget: budget of the winner and baseline trained for the test set. Defaults to the last rung's.
        baseline: the assignment the winner is compared with on the test cases. Defaults to ``none``.
        folds: cross-validation folds (``data.split.fold``) every candidate is trained on; the validation score is
            then over every non-test case once. Defaults to null (the split's holdout validation cases).
        seeds: training seeds (``train.seed``) of every candidate. Defaults to ``[0]``.
        dataset, overrides, fold_key, seed_key, quiet, synthetic: as in :class:`medse.compare.pipeline.CompareConfig`.
        figures: draw compare's figures for the test-set comparison. Defaults to True.
        table: :class:`medse.compare.pipeline.TableSpec` of the test-set comparison; ``table.metric`` (``dice``,
            ``hd95``, ``assd``) is also the selection metric. ``table.baseline`` is ignored (``baseline`` is used).
    """

    name: str
    train_config: str
    space: SpaceSpec
    architecture: ArchSpec | None = None
    eta: int = 3
    min_budget: int = 1
    budget_key: str = "train.epochs"
    final_budget: int | None = None
    baseline: str = "none"
    folds: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    dataset: str | None = None
    overrides: list[str] = field(default_factory=list)
    fold_key: str = "data.split.fold"
    seed_key: str = "train.seed"
    quiet: bool = True
    figures: bool = True
    table: TableSpec = field(default_factory=TableSpec)
    synthetic: SynthSpec | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError(f"eta must be an integer >= 2, got {self.eta}")
        if self.min_budget < 1:
            raise ValueError(f"min_budget must be >= 1, got {self.min_budget}")
        if self.final_budget is not None and self.final_budget < 1:
            raise ValueError(f"final_budget must be >= 1, got {self.final_budget}")
        if self.budget_key not in ("train.epochs", "train.iterations_per_epoch"):
            raise ValueError(f"budget_key must be train.epochs or train.iterations_per_epoch, got '{self.budget_key}'")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.table.metric not in list_metrics():
            *first, last = list_metrics()
            raise ValueError(f"table.metric must be {', '.join(first)} or {last}, got '{self.table.metric}'")

    def train_config_path(self) -> Path:
        p = Path(self.train_config).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p.resolve()

    @property
    def arch(self) -> ArchSpec:
        assert self.architecture is not None, "load_search fills in the architecture"
        return self.architecture

    def candidates(self) -> list[str]:
        return candidate_names(self.space.positions, self.space.blocks)

    def schedule(self) -> list[Rung]:
        return halving_schedule(len(self.candidates()), self.eta, self.min_budget)

    def final_budget_value(self) -> int:
        if self.final_budget is not None:
            return self.final_budget
        rungs = self.schedule()
        return rungs[-1].budget if rungs else self.min_budget


def _check_space(cfg: SearchConfig, path: Path | None) -> None:
    """Unknown positions (for the architecture) and unknown blocks: one-line errors naming the key."""
    from medse.attention import list_attention
    from medse.networks import format_assignment, list_models
    from medse.networks.placement import check_position_key

    models = list_models()
    info = models.get(cfg.arch.name)
    if info is None:
        raise MedseError(f"architecture: unknown network '{cfg.arch.name}'; available: {', '.join(sorted(models))}",
                         path)
    for p in cfg.space.positions:
        try:
            check_position_key(f"space.positions: '{cfg.arch.name}'", p, info.positions)
        except ValueError as e:
            raise MedseError(str(e), path) from None
    known = set(list_attention())
    for b in cfg.space.blocks:
        bad = [part for part in b.split("+") if part.strip() not in known and part.strip() != "none"]
        if bad or (b != "none" and "none" in b.split("+")):
            from medse.utils.errors import did_you_mean

            raise MedseError(f"space.blocks: unknown block '{b}'.{did_you_mean(bad[0] if bad else b, known)} "
                             f"Available: none, {', '.join(sorted(known))} (see medse blocks)", path)
    try:
        baseline = format_assignment(cfg.baseline)
    except ValueError as e:
        raise MedseError(f"baseline: {e}", path) from None
    if baseline not in cfg.candidates() and baseline != "none":
        raise MedseError(f"baseline '{baseline}' is not in the search space {cfg.candidates()}", path)


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    arch = data.get("architecture")
    if isinstance(arch, str):
        data["architecture"] = {"name": arch}
    for k in ("seeds", "folds"):
        if isinstance(data.get(k), int) and not isinstance(data.get(k), bool):
            data[k] = [data[k]]
    return data


def load_search(config: str | Path | dict[str, Any] | SearchConfig, overrides: Sequence[str] = ()) -> SearchConfig:
    """Load and validate a search YAML (``_base_`` inheritance and ``key=value`` overrides supported).

    Raises:
        MedseError: naming the file and the key that is wrong (unknown position or block included).
    """
    cfg, path = load_validated(config, overrides, SearchConfig, _normalise, "search")
    if not cfg.train_config_path().is_file():  # also for a ready SearchConfig
        raise MedseError(f"train_config '{cfg.train_config}' not found at {cfg.train_config_path()}", path)
    if cfg.architecture is None:
        model = (load_yaml(cfg.train_config_path()).get("model") or {}).get("name")
        if not model:
            raise MedseError("architecture is not set and the training config names no model.name", path)
        cfg = dataclasses.replace(cfg, architecture=ArchSpec(name=str(model)))
    _check_space(cfg, path)
    from medse.networks import format_assignment

    return dataclasses.replace(cfg, baseline=format_assignment(cfg.baseline))


# ------------------------------------------------------------------ running


@dataclass
class SearchReport:
    """What :func:`run_search` found (also ``OUT/report.json``).

    ``status``: ``done``; ``waiting`` (a rung or the final stage has cells of other shards still unfinished:
    rerun after they finish); ``failed`` (cells failed in this invocation: rerun to retry them); ``incomplete``
    (the test-set table has unmatched runs or cases, listed in ``incomplete``).
    """

    output: Path
    status: str = "waiting"
    message: str = ""
    metric: str = "dice"
    schedule: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    winner: str | None = None
    runner_up: str | None = None
    baseline: str = "none"
    final_budget: int | None = None
    test_cases: list[str] = field(default_factory=list)
    selection_cases: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    test_table_markdown: str = ""
    reused: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


def _stage_config(cfg: SearchConfig, name: str, blocks: list[str], budget: int, evaluate_on: str,
                  final: bool) -> CompareConfig:
    baseline = cfg.baseline if cfg.baseline in blocks else blocks[0]
    table = cfg.table if final else TableSpec(baseline=baseline, n_boot=1000, seed=cfg.table.seed,
                                              confidence=cfg.table.confidence, metric=cfg.table.metric)
    return CompareConfig(
        name=name, train_config=str(cfg.train_config_path()), architectures=[cfg.arch], blocks=list(blocks),
        folds=cfg.folds, seeds=list(cfg.seeds), dataset=cfg.dataset,
        overrides=[*cfg.overrides, f"{cfg.budget_key}={int(budget)}"],
        evaluate_on=evaluate_on,  # type: ignore[arg-type]
        fold_key=cfg.fold_key, seed_key=cfg.seed_key, quiet=cfg.quiet, figures=cfg.figures and final,
        table=dataclasses.replace(table, baseline=baseline), synthetic=None)


def _stage_state(ccfg: CompareConfig, stage_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Cells of a stage grid: finished (records.csv), failed (error.txt, no records), pending (neither)."""
    done, failed, pending = [], [], []
    for key in grid_cells(ccfg):
        cell = Cell.in_grid(stage_dir, key.cell_id)
        (done if cell.finished else failed if cell.failed else pending).append(key.cell_id)
    return done, failed, pending


def validation_scores(records: Any, candidates: Sequence[str], metric: str = "dice") -> dict[str, dict[str, float]]:
    """Per candidate: mean and std (ddof 1) over the scored cases of the per-case foreground score, and n.

    A case scored in several runs (folds, seeds) is averaged over them first (:func:`records.case_scores`).
    """
    from medse.compare.records import case_scores

    per_case = case_scores(records, metric=metric)
    out: dict[str, dict[str, float]] = {}
    for name in candidates:
        v = per_case.loc[per_case["block"] == name, "value"].to_numpy(dtype=float)
        out[name] = {"mean": float(v.mean()) if v.size else math.nan,
                     "std": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}
    return out


def _split_cases(stage_dir: Path, ccfg: CompareConfig, keys: Sequence[str]) -> dict[str, list[str]]:
    """``cell_id -> case ids`` of ``keys`` (train/val/test) in every cell's ``run/splits.json``."""
    out: dict[str, list[str]] = {}
    for key in grid_cells(ccfg):
        run = Run(Cell.in_grid(stage_dir, key.cell_id).run_dir)
        if not (run / Run.SPLITS).is_file():
            raise MedseError("the run's split is missing (was the cell's run folder removed?)", run / Run.SPLITS)
        split = run.split
        out[key.cell_id] = sorted({c for k in keys for c in split.ids(k)})
    return out


def _reuse_runs(src_stage: Path, final_dir: Path, fcfg: CompareConfig, trained: Sequence[str],
                say: Callable[[str], None]) -> list[str]:
    """Copy the finished last-rung runs of final-stage blocks (same budget, seeds, folds: the same training) into the
    final stage, so that they are only predicted on the test cases there, not trained again. Returns the cell ids."""
    reused: list[str] = []
    for key in grid_cells(fcfg):
        src, dst = Cell.in_grid(src_stage, key.cell_id), Cell.in_grid(final_dir, key.cell_id)
        finished = src.finished and (src.run_dir / Run.SPLITS).is_file()
        if key.block not in trained or not finished:
            continue
        if dst.run_dir.exists():
            reused += [key.cell_id] if dst.reused_from is not None else []
            continue
        dst.reuse_run(src)  # atomic; another shard may have done it first
        reused.append(key.cell_id)
        say(f"{key.cell_id}: the trained run of {src_stage.name} is reused (same budget and seed), not retrained")
    return reused


def _records_of(stage_dir: Path, ccfg: CompareConfig) -> Any:
    from medse.compare.records import load_records

    return load_records(Cell.in_grid(stage_dir, c.cell_id).records_path for c in grid_cells(ccfg))


def _stored_settings(cfg: SearchConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    d.pop("source", None)
    return d


def _check_output(cfg: SearchConfig, out: Path, resume: bool, sharded: bool, train_overrides: Sequence[str]) -> None:
    stored_path = out / "search.yaml"
    if not stored_path.is_file():
        return
    if not (resume or sharded):
        raise MedseError("the output folder already holds a search; pass --resume to continue it, or choose another "
                         "--output", out)
    stored = load_yaml(stored_path)
    stored.pop("source", None)
    want = _stored_settings(cfg)
    n_t = len(train_overrides)
    if n_t and isinstance(want.get("overrides"), list):
        want["overrides"] = want["overrides"][: len(want["overrides"]) - n_t]
    diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
    if diff:
        raise MedseError(f"the stored search differs from this config in {diff}: its rung decisions would not apply; "
                         "use another --output", stored_path)


def run_search(
    config: str | Path | dict[str, Any] | SearchConfig,
    output: str | Path | None = None,
    *,
    shard: str | tuple[int, int] | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    train_overrides: Sequence[str] = (),
    runner: CellRunner | None = None,
    log: Callable[[str], None] | None = print,
    retrain_stale: bool = False,
    allow_incomplete: bool = False,
) -> SearchReport:
    """Run (or continue) a successive-halving search, then score the winner and the baseline on the test cases.

    Args:
        config: search YAML path, mapping or :class:`SearchConfig`.
        output: output folder. Defaults to ``runs/search/<name>``.
        shard: ``"i/n"``: run only cells ``i, i+n, ...`` of each stage (0-based). A shard that finds a stage
            unfinished by the others stops (status ``waiting``); rerunning continues.
        resume: continue the search already in ``output`` (required when it holds one; implied by ``shard``).
        overrides: ``key=value`` overrides of the search config.
        train_overrides: training-config overrides for every run (e.g. ``train.num_threads=1``). A finished
            candidate trained with other values of a key that changes results (not ``train.num_threads``,
            ``train.progress``, ...: :data:`medse.compare.pipeline.NON_RESULT_KEYS`) is stale. Defaults to none.
        runner: cell runner passed to :func:`medse.compare.pipeline.run_compare` (tests). Defaults to compare's.
        log: where progress lines go. Defaults to ``print``; None for silence.
        retrain_stale: retrain the cells made with other settings than the search now asks, and redo the rung
            decisions from the first rung that holds one; otherwise such cells are refused (one line naming the
            keys). Defaults to False.
        allow_incomplete: accept a test-set table with unmatched runs or cases (status ``done``, not
            ``incomplete``). Defaults to False.

    Returns:
        :class:`SearchReport` (also ``OUT/report.json`` and ``OUT/report.md``).

    Raises:
        Interrupted: SIGINT/SIGTERM; names the stage and cell it stopped in and the ``--resume`` command.
    """
    from medse.utils.interrupt import Interrupted, stop_on_signals

    with stop_on_signals():
        try:
            return _run_search(config, output, shard=shard, resume=resume, overrides=overrides,
                               train_overrides=train_overrides, runner=runner, log=log, retrain_stale=retrain_stale,
                               allow_incomplete=allow_incomplete)
        except Interrupted:
            raise  # inside a cell: run_compare said which one, with the --resume command
        except KeyboardInterrupt:
            cfg = load_search(config, overrides)
            out = (Path(output) if output is not None else Path("runs") / "search" / cfg.name).expanduser().resolve()
            raise Interrupted(f"search {out}, between cells",
                              resume=grid_command("search", config, out, overrides, train_overrides, shard, "--resume")) from None


def _run_search(
    config: Any, output: Any, *, shard: Any, resume: bool, overrides: Sequence[str], train_overrides: Sequence[str],
    runner: CellRunner | None, log: Callable[[str], None] | None, retrain_stale: bool, allow_incomplete: bool,
) -> SearchReport:
    cfg = load_search(config, overrides)
    sh = parse_shard(shard)
    out = (Path(output) if output is not None else Path("runs") / "search" / cfg.name).expanduser().resolve()
    if train_overrides:
        cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, *train_overrides])
    _check_output(cfg, out, resume, sh is not None, train_overrides)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    stored = cfg if not train_overrides else dataclasses.replace(
        cfg, overrides=cfg.overrides[: len(cfg.overrides) - len(train_overrides)])
    atomic_write_text(out / "search.yaml", dump_yaml(stored))
    resume_cmd = grid_command("search", config, out, overrides, train_overrides, shard, "--resume")
    if cfg.synthetic is not None:
        data_dir = ensure_synthetic(cfg.synthetic, out / "data", log=say)
        cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, f"data.root={data_dir}"])

    metric = cfg.table.metric
    higher = get_metric(metric).higher_is_better
    candidates = cfg.candidates()
    schedule = cfg.schedule()
    report = SearchReport(output=out, metric=metric, baseline=cfg.baseline, final_budget=cfg.final_budget_value(),
                          schedule=[dataclasses.asdict(r) for r in schedule])
    rows = {c: {"candidate": c, "rung": 0, "budget": schedule[0].budget if schedule else None,
                "val_mean": math.nan, "val_std": math.nan, "val_n": 0, "status": "pending", "scores": []}
            for c in candidates}
    say(f"search '{cfg.name}': {len(candidates)} candidates ({cfg.arch.key}: positions {cfg.space.positions} x "
        f"blocks {cfg.space.blocks}), {len(schedule)} rung(s), eta {cfg.eta}, {cfg.budget_key} "
        f"{[r.budget for r in schedule]} -> {out}")
    alive = list(candidates)
    selection_cases: dict[str, list[str]] = {}

    def finish(status: str, message: str) -> SearchReport:
        report.status, report.message = status, message
        report.candidates = [_jsonable(rows[c]) for c in candidates]
        _write_report(cfg, out, report, say)
        return report

    for rung in schedule:
        stage_dir = out / f"rung{rung.index}"
        ccfg = _stage_config(cfg, f"{cfg.name}-rung{rung.index}", alive, rung.budget, "val", final=False)
        decision_file = decision_path(stage_dir)
        for c in alive:
            rows[c].update(rung=rung.index, budget=rung.budget, status="running")
        if decision_file.is_file():
            stale = stale_cells(ccfg, stage_dir)
            if stale and not retrain_stale:
                refuse_stale(stale, stage_dir, "--retrain-stale to retrain them (the rung decisions are redone)")
            if stale:  # this rung's decision and every later one rest on stale runs
                for later in out.glob("rung*"):
                    if later.name[4:].isdigit() and int(later.name[4:]) >= rung.index:
                        decision_path(later).unlink(missing_ok=True)
        if not decision_file.is_file():
            say(f"rung {rung.index}: {len(alive)} candidate(s), {cfg.budget_key}={rung.budget}, keep "
                f"{rung.n_survivors}")
            rep = run_compare(ccfg, stage_dir, shard=sh, runner=runner, log=say, retrain_stale=retrain_stale,
                              resume_command=resume_cmd)
            report.failed.update({f"rung{rung.index}/{k}": v for k, v in rep.failed.items()})
            done, failed, pending = _stage_state(ccfg, stage_dir)
            if rep.failed or failed:
                return finish("failed", f"rung {rung.index}: {len(failed)} cell(s) failed ({', '.join(failed)}); "
                                        "fix the cause and rerun with --resume to retry them")
            if pending:
                return finish("waiting", f"rung {rung.index}: {len(pending)} of {len(done) + len(pending)} cells "
                                         "belong to other shards and are not finished; rerun with --resume when "
                                         "they are")
            scores = validation_scores(_records_of(stage_dir, ccfg), alive, metric)
            survivors = select_survivors({c: scores[c]["mean"] for c in alive}, cfg.eta, higher_is_better=higher)
            decision = {"rung": rung.index, "budget": rung.budget, "budget_key": cfg.budget_key, "metric": metric,
                        "candidates": alive, "scores": scores, "survivors": survivors}
            atomic_write_text(decision_file, json.dumps(_jsonable(decision), indent=2) + "\n")
        decision = json.loads(decision_file.read_text())
        split = _split_cases(stage_dir, ccfg, ("train", "val"))
        selection_cases.update({f"rung{rung.index}/{k}": v for k, v in split.items()})
        for c in decision["candidates"]:
            s = decision["scores"][c]
            mean = math.nan if s["mean"] is None else float(s["mean"])
            rows[c].update(val_mean=mean, val_std=math.nan if s["std"] is None else float(s["std"]), val_n=s["n"],
                           status="promoted" if c in decision["survivors"] else "eliminated")
            rows[c]["scores"].append({"rung": rung.index, "budget": rung.budget, "mean": mean, "n": s["n"]})
        alive = [c for c in candidates if c in decision["survivors"]]
        say(f"rung {rung.index}: kept {', '.join(decision['survivors'])}")

    alive_last = list(decision["candidates"]) if schedule else []
    winner = alive[0]
    report.winner = winner
    rows[winner]["status"] = "winner"
    report.selection_cases = sorted({c for v in selection_cases.values() for c in v})
    final_blocks = [cfg.baseline] if winner == cfg.baseline else [cfg.baseline, winner]
    if winner == cfg.baseline and schedule:  # nothing to compare: also score the best other candidate, for reference
        others = sorted((c for c in decision["candidates"] if c != cfg.baseline),
                        key=lambda c: _sort_value(rows[c]["val_mean"], metric))
        if others:
            report.runner_up = others[0]
            final_blocks.append(others[0])
    final_dir = out / "final"
    fcfg = _stage_config(cfg, f"{cfg.name}-final", final_blocks, cfg.final_budget_value(), "test", final=True)
    say(f"test set: {' vs '.join(final_blocks)}, {cfg.budget_key}={cfg.final_budget_value()}")
    if schedule and cfg.final_budget_value() == schedule[-1].budget:
        last = schedule[-1].index
        report.reused = _reuse_runs(out / f"rung{last}", final_dir, fcfg, alive_last, say)
    rep = run_compare(fcfg, final_dir, shard=sh, runner=runner, log=say, retrain_stale=retrain_stale,
                      resume_command=resume_cmd)
    report.failed.update({f"final/{k}": v for k, v in rep.failed.items()})
    done, failed, pending = _stage_state(fcfg, final_dir)
    if rep.failed or failed:
        return finish("failed", f"test-set stage: {len(failed)} cell(s) failed ({', '.join(failed)}); rerun with "
                                "--resume to retry them")
    if pending:
        return finish("waiting", f"test-set stage: {len(pending)} cell(s) of other shards not finished; rerun with "
                                 "--resume when they are")
    # the test cases: those of every final run's split, and exactly those are scored
    test_split = _split_cases(final_dir, fcfg, ("test",))
    records = _records_of(final_dir, fcfg)
    scored = sorted({str(c) for c in records.loc[records["metric"] == metric, "case_id"]} - {"__run__"})
    test_cases = sorted({c for v in test_split.values() for c in v})
    if not set(scored) <= set(test_cases):
        raise MedseError(f"the test-set records score case(s) {sorted(set(scored) - set(test_cases))[:5]} that are not "
                         "test cases of their runs", final_dir)
    check_disjoint(selection_cases, scored, final_dir)
    report.test_cases = scored
    report.test_table_markdown = rep.table_markdown
    report.outputs = {**rep.outputs, "report_md": str(out / "report.md"), "report_json": str(out / "report.json")}
    report.incomplete = list(rep.incomplete)
    if rep.incomplete and not allow_incomplete:
        return finish("incomplete", f"winner {winner}; the test-set table does not rest on every run and case "
                                    f"({'; '.join(rep.incomplete[:3])}); pass --allow-incomplete to accept it")
    return finish("done", f"winner {winner}; scored with {cfg.baseline} on {len(scored)} test case(s)")


def _jsonable(obj: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(v: Any, nd: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _write_report(cfg: SearchConfig, out: Path, report: SearchReport, say: Callable[[str], None]) -> None:
    atomic_write_text(out / "report.json", json.dumps(_jsonable(report.to_dict()), indent=2) + "\n")
    metric = report.metric
    direction = get_metric(metric).direction
    n_runs = len(cfg.seeds) * len(cfg.folds or [None])
    val = (f"the validation cases of {len(cfg.folds)} folds (every non-test case once)" if cfg.folds
           else "the split's holdout validation cases")
    lines = [
        f"# Attention search: {cfg.name}",
        "",
        f"Status: **{report.status}**. {report.message}",
        "",
        f"Network `{cfg.arch.key}`; space: positions {', '.join(cfg.space.positions)} x blocks "
        f"{', '.join(cfg.space.blocks)} = {len(report.candidates)} candidates. Successive halving with eta = "
        f"{cfg.eta}: rung k trains its candidates anew with `{cfg.budget_key}` = {cfg.min_budget} x {cfg.eta}^k and "
        f"keeps the best floor(n / {cfg.eta}); seeds {cfg.seeds}, folds {cfg.folds or '-'} ({n_runs} run(s) per "
        f"candidate and rung). Validation score: mean per-case foreground {metric} ({direction}) over {val}.",
        "",
        "| rung | candidates | budget | kept |",
        "|---|---|---|---|",
        *[f"| {r['index']} | {r['n_candidates']} | {r['budget']} | {r['n_survivors']} |" for r in report.schedule],
        "",
        "## Candidates (validation)",
        "",
        "| candidate | last rung | budget | " + "".join(f"val {metric} rung {r['index']} | " for r in report.schedule)
        + "std (last rung) | n cases | status |",
        "|---|---|---|" + "---|" * len(report.schedule) + "---|---|---|",
    ]
    order = sorted(report.candidates, key=lambda r: (-(r["rung"] or 0), r["status"] != "winner",
                                                     _sort_value(r["val_mean"], metric)))
    for r in order:
        at = {s["rung"]: s["mean"] for s in r["scores"]}
        per_rung = "".join(f"{_fmt(at.get(k['index']))} | " for k in report.schedule)
        lines.append(f"| {r['candidate']} | {r['rung']} | {r['budget']} | {per_rung}"
                     f"{_fmt(r['val_std'])} | {r['val_n']} | {r['status']} |")
    lines += ["", f"Budget: `{cfg.budget_key}` of the candidate's last rung; the rung columns are the validation "
              "scores at each rung (also in `report.json`, `candidates[].scores`).", "", OPTIMISM_NOTE, ""]
    lines += ["## Test set", ""]
    if report.status in ("done", "incomplete"):
        how = ("" if not report.reused else
               f" (the last rung's runs, reused rather than retrained: {', '.join(report.reused)})")
        if report.winner != report.baseline:
            who = f"Winner `{report.winner}` and baseline `{report.baseline}`"
        else:
            who = f"The winner is the baseline `{report.baseline}`"
            who += f"; with it `{report.runner_up}`" if report.runner_up else ""
        lines += [f"{who}, trained with `{cfg.budget_key}` = {report.final_budget}{how}, scored on "
                  f"{len(report.test_cases)} test case(s) "
                  f"({', '.join(report.test_cases)}), none of which any selection step trained or validated on "
                  f"(checked against the {len(report.selection_cases)} cases the rung runs used). Paired statistics "
                  "as in `medse compare` (docs/compare.md):", "", report.test_table_markdown.strip(), ""]
        if report.winner == report.baseline:
            lines += ["The search chose the baseline itself. "
                      + (f"For reference, the table also scores the best other candidate of the last rung, "
                         f"`{report.runner_up}` (not the search's choice)." if report.runner_up
                         else "There is no other candidate to compare with."), ""]
    else:
        lines += ["(not yet: the search is not finished)", ""]
    if report.incomplete:
        lines += ["## Incomplete test-set table", "", "Left out of the paired comparison (the table's notes):", "",
                  *[f"- {x}" for x in report.incomplete], ""]
    if report.failed:
        lines += ["## Failed cells", "", *[f"- {k}: {v}" for k, v in report.failed.items()], ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    say(f"report: {out / 'report.md'}")


def _sort_value(v: Any, metric: str) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.inf
    return get_metric(metric).best_first(v)
