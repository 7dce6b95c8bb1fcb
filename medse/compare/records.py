"""Per-case comparison records: the long-format rows that every table and figure is computed from.

A record row extends the evaluation's long format (``case_id, label, label_value, metric, value``, see
``medse.evaluation.evaluate``) with the grid cell it came from (``arch, block, fold, seed``) and optionally
``dataset``. Quantities that belong to a whole run rather than to a case are stored as rows too, so that a
table needs nothing but the records:

* ``metric == "params"``: learnable parameters of the cell's network (``case_id == RUN_CASE``);
* ``metric == "train_step_s"``: mean training-step time in seconds (``case_id == RUN_CASE``);
* ``metric == "infer_s"``: inference time of one case in seconds (``label == ALL_LABELS``).

Run-level and case-level-without-structure rows use ``label == ALL_LABELS`` and ``label_value == -1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from medse.utils.errors import MedseError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "ALL_LABELS",
    "CELL_COLUMNS",
    "RECORD_COLUMNS",
    "RUN_CASE",
    "case_scores",
    "cell_rows",
    "load_records",
    "run_level",
    "run_scores",
    "validate_records",
]

RUN_CASE = "__run__"
ALL_LABELS = "__all__"
CELL_COLUMNS = ["arch", "block", "fold", "seed"]
RECORD_COLUMNS = [*CELL_COLUMNS, "case_id", "label", "label_value", "metric", "value"]
RUN_METRICS = ("params", "train_step_s")


def validate_records(df: pd.DataFrame, source: object | None = None) -> pd.DataFrame:
    """Check columns and types of a records frame; return a normalised copy (str ids, int fold/seed, float value).

    Raises:
        MedseError: naming ``source`` and the missing columns.
    """
    import pandas as pd

    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise MedseError(f"records lack column(s) {missing}; expected {RECORD_COLUMNS}", source)
    out = df.copy()
    for c in ("arch", "block", "case_id", "label", "metric"):
        out[c] = out[c].astype(str)
    for c in ("fold", "seed", "label_value"):
        out[c] = pd.to_numeric(out[c], errors="coerce").fillna(-1).astype(int)
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)
    if "dataset" in out.columns:
        out["dataset"] = out["dataset"].fillna("").astype(str)
    return out


def load_records(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate records CSV files (e.g. every ``cells/*/records.csv`` of a compare run), validated."""
    import pandas as pd

    frames = []
    for p in paths:
        p = Path(p)
        try:
            frame = pd.read_csv(p, dtype={"case_id": str, "label": str, "arch": str, "block": str})
        except Exception as e:  # unreadable / empty file
            raise MedseError(f"cannot read records ({type(e).__name__}: {e})", p) from e
        frames.append(validate_records(frame, p))
    if not frames:
        return pd.DataFrame(columns=RECORD_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def cell_rows(
    evaluation: pd.DataFrame,
    *,
    arch: str,
    block: str,
    fold: int,
    seed: int,
    params: int | None = None,
    train_step_s: float | None = None,
    infer_s: dict[str, float] | None = None,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Turn one cell's evaluation frame and measurements into records rows.

    Args:
        evaluation: long-format evaluation (``case_id, label, label_value, metric, value``).
        arch, block, fold, seed: the grid cell.
        params: learnable parameters of the cell's network. Defaults to None (no row).
        train_step_s: mean training-step time in seconds. Defaults to None (no row).
        infer_s: per-case inference seconds, keyed by case id. Defaults to None (no rows).
        dataset: dataset name stored in a ``dataset`` column. Defaults to None (no column).
    """
    import pandas as pd

    base_cols = ["case_id", "label", "label_value", "metric", "value"]
    missing = [c for c in base_cols if c not in evaluation.columns]
    if missing:
        raise MedseError(f"evaluation frame lacks column(s) {missing}")
    ev = evaluation[base_cols].copy()
    extra = []
    if params is not None:
        extra.append({"case_id": RUN_CASE, "label": ALL_LABELS, "label_value": -1, "metric": "params",
                      "value": float(params)})
    if train_step_s is not None:
        extra.append({"case_id": RUN_CASE, "label": ALL_LABELS, "label_value": -1, "metric": "train_step_s",
                      "value": float(train_step_s)})
    for case_id, sec in (infer_s or {}).items():
        extra.append({"case_id": str(case_id), "label": ALL_LABELS, "label_value": -1, "metric": "infer_s",
                      "value": float(sec)})
    if extra:
        ev = pd.concat([ev, pd.DataFrame(extra)], ignore_index=True)
    ev.insert(0, "seed", int(seed))
    ev.insert(0, "fold", int(fold))
    ev.insert(0, "block", str(block))
    ev.insert(0, "arch", str(arch))
    if dataset is not None:
        ev["dataset"] = str(dataset)
    return validate_records(ev)


def run_scores(records: pd.DataFrame, *, metric: str = "dice", structure: str | None = None) -> pd.DataFrame:
    """Per-case scores of every run (``arch, block, fold, seed, case_id, value``): the units that are paired.

    Args:
        records: validated records.
        metric: metric name in the evaluation. Defaults to ``"dice"``.
        structure: a label name for one structure; None for the mean over foreground labels
            (``label_value > 0``) of each case. Defaults to None.

    Returns:
        one row per run and case; a case with a NaN value for some label keeps NaN (it has no score in that run,
        rather than the mean of its remaining labels), so that a failure is never averaged away.
    """
    import pandas as pd

    r = records[(records["metric"] == metric) & (records["case_id"] != RUN_CASE)]
    if structure is None:
        r = r[r["label_value"] > 0]
    else:
        r = r[r["label"] == str(structure)]
    if r.empty:
        return pd.DataFrame(columns=[*CELL_COLUMNS, "case_id", "value"])
    return r.groupby([*CELL_COLUMNS, "case_id"], sort=False)["value"].agg(_mean_keep_nan).reset_index()


def _mean_keep_nan(v: pd.Series) -> float:
    return float(v.to_numpy(dtype=float).mean())


def case_scores(records: pd.DataFrame, *, metric: str = "dice", structure: str | None = None,
                runs: Iterable[tuple[int, int]] | None = None) -> pd.DataFrame:
    """Per-case scores per architecture x block, averaged over the runs (folds x seeds) a case appears in.

    Args:
        records: validated records.
        metric: metric name in the evaluation. Defaults to ``"dice"``.
        structure: a label name for one structure; None for the mean over foreground labels
            (``label_value > 0``) of each case. Defaults to None.
        runs: only these ``(fold, seed)`` runs; a case must then be scored in every one of them that it appears
            in. Defaults to None (every run).

    Returns:
        frame with columns ``arch, block, case_id, value`` (one row per case). A case with a NaN value for some
        label (or in some run) has no score: it is dropped rather than averaged over the remaining labels, so that
        a failure is never averaged away (the table lists it as unmatched).
    """
    import pandas as pd

    per_run = run_scores(records, metric=metric, structure=structure)
    if runs is not None:
        keep = {(int(f), int(s)) for f, s in runs}
        per_run = per_run[[(int(f), int(s)) in keep for f, s in zip(per_run["fold"], per_run["seed"], strict=True)]]
    if per_run.empty:
        return pd.DataFrame(columns=["arch", "block", "case_id", "value"])
    per_case = per_run.groupby(["arch", "block", "case_id"], sort=False)["value"].agg(_mean_keep_nan).reset_index()
    return per_case.dropna(subset=["value"]).reset_index(drop=True)


def run_level(records: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean of a run-level or per-case measurement (``params``, ``train_step_s``, ``infer_s``) per arch x block.

    Per-case values (``infer_s``) are averaged within each run first, then over runs.

    Returns:
        frame with columns ``arch, block, value``.
    """
    r = records[records["metric"] == metric]
    if r.empty:
        import pandas as pd

        return pd.DataFrame(columns=["arch", "block", "value"])
    per_run = r.groupby(CELL_COLUMNS, sort=False)["value"].mean().reset_index()
    return per_run.groupby(["arch", "block"], sort=False)["value"].mean().reset_index()
