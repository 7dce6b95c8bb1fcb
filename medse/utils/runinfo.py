"""Provenance recorded in every run folder: package versions, git commit, command line, time."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from medse.utils.atomic import atomic_write_text


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the medse checkout (or of ``path``), with ``+dirty`` if uncommitted changes exist."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return None


def run_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import medse

    info: dict[str, Any] = {
        "medse_version": medse.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for mod in ("torch", "monai", "torchio", "nibabel", "SimpleITK", "numpy"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except Exception:
            pass
    if extra:
        info.update(extra)
    return info


def write_run_info(run_dir: str | Path, extra: dict[str, Any] | None = None, name: str = "run_info.json") -> Path:
    path = Path(run_dir) / name
    atomic_write_text(path, json.dumps(run_info(extra), indent=2) + "\n")
    return path
