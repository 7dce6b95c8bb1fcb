"""A folder that an object owns (a training run, a compare cell): it prints, joins and compares like its path.

:class:`medse.runs.Run` and :class:`medse.compare.cell.Cell` derive from :class:`Folder`, so ``run / "metrics.csv"``,
``str(cell)``, ``os.fspath(run)`` and ``run == "path/to/run"`` work alike for both.
"""

from __future__ import annotations

import os
from pathlib import Path


class Folder:
    """An absolute folder path (``~`` expanded) with path behaviour; subclasses add what lives inside."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().absolute()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str | os.PathLike) -> Path:
        """``folder / "name"``: a path inside the folder (joins like a :class:`Path`)."""
        return self.path / name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, type(self)):
            return self.path == other.path
        if isinstance(other, (str, os.PathLike)) and not isinstance(other, Folder):
            return self.path == Path(other).expanduser().absolute()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.path)
