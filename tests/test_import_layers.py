"""The import floors of docs/ARCHITECTURE.md hold: ``lint-imports`` (import-linter, a dev dependency) passes with
the contracts of pyproject.toml, and fails on a planted upward import (a block importing the CLI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the ``medse`` package found first from ``cwd`` with ``cwd/pyproject.toml``'s contracts
    (``--no-cache``: nothing written beside the code)."""
    assert LINT_IMPORTS.is_file(), f"import-linter is a dev dependency (pip install -e '.[dev]'): {LINT_IMPORTS}"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(cwd / "pyproject.toml")], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_floors_are_kept():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_planted_upward_import_breaks_the_floors(tmp_path):
    """A copy of the package in which the SE block imports the CLI (the top floor): the check fails naming it."""
    shutil.copytree(ROOT / "medse", tmp_path / "medse", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    se = tmp_path / "medse" / "attention" / "se.py"
    se.write_text(se.read_text() + "\nimport medse.cli  # planted: a block importing the CLI\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "medse.attention is not allowed to import medse.cli" in proc.stdout, proc.stdout
    assert "medse.attention.se -> medse.cli" in proc.stdout, proc.stdout
