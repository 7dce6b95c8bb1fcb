"""Provenance recorded in every run folder: package versions, git commit, command line, time."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
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
    from medse.utils.plugins import recorded_entries

    if recorded_entries():  # a run trained with plugin blocks says which (the hint when they are missing later)
        info["medse_plugins"] = recorded_entries()
    if extra:
        info.update(extra)
    return info


def write_run_info(run_dir: str | Path, extra: dict[str, Any] | None = None, name: str = "run_info.json") -> Path:
    path = Path(run_dir) / name
    atomic_write_text(path, json.dumps(run_info(extra), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- environment of a results file
ENV_PACKAGES = (("torch", "torch"), ("MONAI", "monai"), ("torchio", "torchio"), ("numpy", "numpy"),
                ("scipy", "scipy"), ("nibabel", "nibabel"), ("SimpleITK", "SimpleITK"))


def package_version(module: str) -> str:
    """The installed version of ``module`` without importing it (importing torchio or MONAI takes seconds and
    would change what a benchmark measures); "not installed" if it is absent."""
    from importlib import metadata

    dist = {"SimpleITK": "SimpleITK", "monai": "monai"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        mod = sys.modules.get(module)
        return getattr(mod, "__version__", "not installed") if mod is not None else "not installed"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment_description(threads: int | None = None, device: str | None = None,
                            load: float | None = None) -> str:
    """One line describing where numbers were measured: package versions (torch, MONAI, torchio, numpy, scipy,
    nibabel, SimpleITK, Python), the CPU model and count, torch's threads, the device and the load average at the
    start. Shared by ``docsync generate`` and every benchmark script, so their headers say the same things.
    ``load`` is the 1-minute load average taken when the measurement started (now if None)."""
    import os

    versions = ", ".join(f"{name} {package_version(mod)}" for name, mod in ENV_PACKAGES)
    if threads is None:
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else None
    if load is None and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
    parts = [f"{versions}, Python {platform.python_version()}",
             f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs",
             f"threads: {threads if threads is not None else 'torch default'}"]
    if device:
        parts.append(f"device: {device}")
    parts.append(f"load average at start: {load:.2f}" if load is not None else "load average: unknown")
    parts.append(platform.platform())
    return "; ".join(parts)


# ----------------------------------------------------------------------------- source fingerprint
REPO_ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT_ENV = "MEDSE_SOURCES_LOG"  # set by docsync generate: where the hook appends the files a process used


def is_repo_source(path: Path, repo: Path = REPO_ROOT) -> str | None:
    """``path`` relative to the repository if it is one of its own files (not an environment or run folder)."""
    try:
        rel = Path(path).resolve().relative_to(repo)
    except (ValueError, OSError):
        return None
    if not rel.parts or rel.parts[0].startswith(".") or rel.parts[0] in ("runs", "build", "dist"):
        return None
    return rel.as_posix()


def imported_repo_files(repo: Path = REPO_ROOT) -> list[str]:
    """The repository's own source files that this process has imported (``sys.modules``, the main script
    included), relative to the repository."""
    found = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.endswith(".py") and Path(f).is_absolute():  # a few extension modules give a bare name
            rel = is_repo_source(Path(f), repo)
            if rel:
                found.add(rel)
    return sorted(found)


_NAMED_FILE = re.compile(r"[\w./-]+\.(?:ya?ml|json|csv|py|txt)\b")


def files_named_in(text: str, repo: Path = REPO_ROOT, _seen: set[str] | None = None) -> list[str]:
    """Repository files named in a command (configs, pipelines, scripts), and those named inside a named YAML file
    (a pipeline's configs), relative to the repository."""
    seen = set() if _seen is None else _seen
    for token in _NAMED_FILE.findall(text):
        p = (repo / token) if not Path(token).is_absolute() else Path(token)
        rel = is_repo_source(p, repo) if p.is_file() else None
        if rel and rel not in seen:
            seen.add(rel)
            if rel.endswith((".yaml", ".yml")):
                files_named_in((repo / rel).read_text(encoding="utf-8", errors="replace"), repo, seen)
    return sorted(seen)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(files: Iterable[str], repo: Path = REPO_ROOT) -> tuple[str, dict[str, str]]:
    """(sha256 over the files' paths and contents, {file: first 12 hex digits of its own sha256}). A missing
    file counts with the digest "missing"."""
    whole = hashlib.sha256()
    each = {}
    for rel in sorted(set(files)):
        p = repo / rel
        d = file_digest(p) if p.is_file() else "missing"
        whole.update(rel.encode() + b"\0" + d.encode() + b"\n")
        each[rel] = d[:12]
    return whole.hexdigest(), each


def fingerprint_fields(files: Iterable[str], repo: Path = REPO_ROOT) -> dict[str, str]:
    """The ``sources`` and ``source_files`` fields of a results file's provenance header."""
    whole, each = fingerprint(files, repo)
    return {"sources": f"sha256 {whole} over {len(each)} files",
            "source_files": " ".join(f"{f}@{h}" for f, h in each.items())}


def changed_sources(fields: dict[str, str], repo: Path = REPO_ROOT) -> list[str] | None:
    """The recorded source files whose content differs now (missing ones included); None if the header has no
    fingerprint. An empty list means the fingerprint matches."""
    if "sources" not in fields or "source_files" not in fields:
        return None
    recorded = dict(item.rsplit("@", 1) for item in fields["source_files"].split())
    whole, now = fingerprint(recorded, repo)
    if f"sha256 {whole} " in fields["sources"] + " ":
        return []
    changed = [f for f, h in recorded.items() if now.get(f) != h]
    return changed or ["(the recorded hash does not match its file list: header edited by hand?)"]


# The hook ``docsync generate`` puts on PYTHONPATH: every Python process of the command (subprocesses and
# spawned workers too) appends, at exit, the repository files it imported to the file named by FINGERPRINT_ENV.
SITECUSTOMIZE = '''\
"""Written by tools/docsync.py: records the repository files this process imported (at exit)."""
import atexit, os, sys


def _medse_record_sources():
    log = os.environ.get("MEDSE_SOURCES_LOG")
    if not log:
        return
    files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write("".join(p + "\\n" for p in files if p and p.endswith(".py") and os.path.isabs(p)))
    except OSError:
        pass


atexit.register(_medse_record_sources)
'''


def read_sources_log(log: Path, repo: Path = REPO_ROOT) -> list[str]:
    """The repository files listed in a hook's log, relative to the repository."""
    if not Path(log).is_file():
        return []
    return sorted({rel for line in Path(log).read_text(encoding="utf-8").splitlines()
                   if line and (rel := is_repo_source(Path(line), repo))})
