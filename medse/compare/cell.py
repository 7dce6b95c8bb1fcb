"""One compare/search cell folder: :class:`Cell` owns it as :class:`medse.runs.Run` owns a run folder.

Only this module knows the file names of a cell::

    OUT/cells/<cell_id>/run/              the training run (docs/ARCHITECTURE.md); ``run/.medse_reused`` when the
                                          run was copied from an earlier search rung instead of trained
                       /pred/             predicted masks of the evaluated cases
                       /eval/             metrics.csv, summary.json of :func:`medse.evaluation.evaluate_cases`
                       /records.csv       per-case records (:mod:`medse.compare.records`): the finished marker
                       /cell.json         what the cell was made with (freshness check of a rerun)
                       /cell_times.json   wall and CPU seconds of training, prediction and evaluation
                       /error.txt         traceback of the last failed attempt
    OUT/decision.json                     a search rung's decision (:func:`decision_path`)

Everyone else builds a cell with :meth:`Cell.create` (the grid) or :meth:`Cell.open` / :meth:`Cell.in_grid` and
reads it through its properties. A ``Cell`` joins and prints like its path (``cell / "notes.txt"``, ``str(cell)``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medse.runs import Run
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError
from medse.utils.folder import Folder

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["CELLS", "Cell", "decision_path"]

#: the folder of a grid output that holds one folder per cell
CELLS = "cells"


def decision_path(grid: str | os.PathLike) -> Path:
    """Where a search rung (a compare grid in ``OUT/rung<k>``) records its decision, once every candidate cell has
    records: the scores and the survivors."""
    return Path(grid) / "decision.json"


class Cell(Folder):
    """A compare/search cell folder. Build with :meth:`create` (the grid) or :meth:`open` (everyone else)."""

    RUN = "run"
    PREDICTIONS = "pred"
    EVALUATION = "eval"
    RECORDS = "records.csv"
    IDENTITY = "cell.json"
    TIMES = "cell_times.json"
    ERROR = "error.txt"
    REUSED = ".medse_reused"  # inside run/: the run folder it was copied from


    # ------------------------------------------------------------------ construction
    @classmethod
    def in_grid(cls, out: str | os.PathLike, cell_id: str) -> Cell:
        """The cell ``cell_id`` of the grid output folder ``out`` (``OUT/cells/<cell_id>``), made or not."""
        return cls(Path(out) / CELLS / cell_id)

    @classmethod
    def all_in(cls, out: str | os.PathLike) -> list[Cell]:
        """Every cell folder of the grid output folder ``out``, sorted by cell id (all shards' cells)."""
        folder = Path(out) / CELLS
        return [cls(p) for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []

    @classmethod
    def create(cls, path: str | os.PathLike | Cell) -> Cell:
        """The cell folder, made if absent (a cell that was started before keeps what it holds: its run resumes)."""
        cell = path if isinstance(path, Cell) else cls(path)
        cell.path.mkdir(parents=True, exist_ok=True)
        return cell

    @classmethod
    def open(cls, path: str | os.PathLike | Cell) -> Cell:
        """An existing cell; raises a one-line :class:`MedseError` unless ``path`` is a folder."""
        cell = path if isinstance(path, Cell) else cls(path)
        if not cell.path.is_dir():
            raise MedseError("cell folder not found", cell.path)
        return cell

    @property
    def cell_id(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ the run and its outputs
    @property
    def run_dir(self) -> Path:
        return self.path / self.RUN

    @property
    def run(self) -> Run:
        """The cell's run (``Run.open`` raises when it was not made yet)."""
        return Run.open(self.run_dir)

    @property
    def has_run(self) -> bool:
        """Whether training has made the run folder (a killed cell resumes it)."""
        return (self.run_dir / Run.CONFIG).is_file()

    @property
    def predictions_dir(self) -> Path:
        return self.path / self.PREDICTIONS

    def predictions(self) -> dict[str, Path]:
        """``{case_id: predicted mask}`` of the masks written so far (empty before prediction)."""
        from medse.evaluation.runner import image_files

        return image_files(self.predictions_dir) if self.predictions_dir.is_dir() else {}

    def evaluation_cases(self, references: Mapping[str, str | os.PathLike]) -> list[tuple[str, Path | None, Path]]:
        """``(case_id, prediction or None, reference)`` of every case of ``references`` (``{case_id: mask}``): the
        triples :func:`medse.evaluation.evaluate_cases` scores (a case without a prediction scores as a failure)."""
        preds = self.predictions()
        return [(cid, preds.get(cid), Path(ref)) for cid, ref in references.items()]

    @property
    def evaluation_dir(self) -> Path:
        return self.path / self.EVALUATION

    # ------------------------------------------------------------------ records: the finished marker
    @property
    def records_path(self) -> Path:
        return self.path / self.RECORDS

    @property
    def finished(self) -> bool:
        """Whether the cell has records (written last, atomically: a finished cell is complete)."""
        return self.records_path.is_file()

    def records(self) -> pd.DataFrame:
        from medse.compare.records import load_records

        return load_records([self.records_path])

    def write_records(self, records: pd.DataFrame) -> Path:
        atomic_write_text(self.records_path, records.to_csv(index=False))
        return self.records_path

    # ------------------------------------------------------------------ what it was made with, how long it took
    @property
    def identity_path(self) -> Path:
        return self.path / self.IDENTITY

    @property
    def identity(self) -> dict[str, Any] | None:
        """``cell.json``: the resolved config, data fingerprint and medse version it was made with; None when
        missing or unreadable."""
        try:
            return json.loads(self.identity_path.read_text())
        except (OSError, ValueError):
            return None

    def write_identity(self, identity: Mapping[str, Any]) -> None:
        atomic_write_text(self.identity_path, json.dumps(identity, indent=2, default=str) + "\n")

    @property
    def times(self) -> dict[str, Any] | None:
        """``cell_times.json``: wall and CPU seconds of training, prediction and evaluation; None when missing."""
        try:
            return json.loads((self.path / self.TIMES).read_text())
        except (OSError, ValueError):
            return None

    def write_times(self, times: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / self.TIMES, json.dumps(dict(times), indent=2) + "\n")

    # ------------------------------------------------------------------ failures
    @property
    def error_path(self) -> Path:
        return self.path / self.ERROR

    @property
    def failed(self) -> bool:
        """Whether the last attempt failed (an error and no records)."""
        return self.error_path.is_file() and not self.finished

    @property
    def error_line(self) -> str | None:
        """The last non-blank line of the recorded traceback (the exception); None when there is none."""
        try:
            lines = [ln.strip() for ln in self.error_path.read_text().splitlines() if ln.strip()]
        except OSError:
            return None
        return lines[-1] if lines else None

    def write_error(self, text: str) -> None:
        atomic_write_text(self.error_path, text)

    def clear_error(self) -> None:
        self.error_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ a run reused from another cell
    @property
    def reused_from(self) -> Path | None:
        """The run folder this cell's run was copied from (:meth:`reuse_run`); None when it was trained here."""
        try:
            return Path(self.run_dir.joinpath(self.REUSED).read_text().strip())
        except OSError:
            return None

    def reuse_run(self, source: Cell) -> None:
        """Copy ``source``'s run into this cell (marked :attr:`reused_from`), so that it is only predicted and
        evaluated here, not trained again. Atomic: a copy is renamed into place; when another process got there
        first, its copy stays."""
        tmp = self.run_dir.with_name(f".{self.RUN}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source.run_dir, tmp, symlinks=True)
        (tmp / self.REUSED).write_text(f"{source.run_dir}\n")
        try:
            os.rename(tmp, self.run_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
