"""Atomic file writes: write to a temporary name in the same folder, then rename into place.

No reader ever sees a half-written file, and a killed process leaves at most a ``.tmp-*`` file behind
(:func:`stale_temp_files` finds those of a given target, so a later run can remove them).

Files get the mode a plain ``open(path, "w")`` gives (``0o666`` minus the caller's umask, default ACLs
applied by the kernel): the temporary file is created with ``os.open(..., 0o666)``, not ``mkstemp``
(which always uses ``0o600``). With ``fsync=True`` the file's data are flushed to disk before the rename
and the folder entry after it, so that a crash right after the call cannot leave an empty or truncated
file under the final name (checkpoints and masks use it).

A full disk (``ENOSPC``, or a full quota, ``EDQUOT``) while writing, flushing or renaming becomes a
:class:`DiskFullError`: one line, ``no space left on device, <final path>`` (not the temporary name), still an
``OSError`` with that ``errno`` for callers that catch those. :func:`raise_if_disk_full` does the same for
writes that do not go through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from medse.utils.errors import MedseError

__all__ = ["TEMP_PREFIX", "DiskFullError", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "ensure_writable_dir", "fsync_dir", "fsync_file", "is_disk_full", "raise_if_disk_full", "stale_temp_files",
           "temp_name_parts"]

TEMP_PREFIX = ".tmp-"
# the 8 random characters: tempfile.mkstemp's alphabet (older medse versions used mkstemp), hex today
_RANDOM_RE = "[a-z0-9_]{8}"


#: errno values of a full file system or quota
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class DiskFullError(MedseError, OSError):
    """No space left on the device (or quota) while writing ``path``: a one-line :class:`MedseError` that is
    also an ``OSError`` with ``errno`` ``ENOSPC`` (or ``EDQUOT``) and ``filename`` the final path."""

    def __init__(self, path: str | os.PathLike, code: int = errno.ENOSPC):
        super().__init__(f"no space left on device, {path}", path)
        self.errno = code
        self.strerror = os.strerror(code)
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.args[0])


def is_disk_full(e: BaseException) -> bool:
    """True for an ``OSError`` of a full file system or quota."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


@contextlib.contextmanager
def raise_if_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full-disk ``OSError`` raised in the block into :class:`DiskFullError` naming ``path``
    (a :class:`DiskFullError` raised inside keeps the path it names)."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(path, e.errno) from e
        raise


def temp_name_parts(path: str | os.PathLike, suffix: str | None = None) -> tuple[str, str]:
    """``(prefix, suffix)`` of the temporary names :func:`atomic_path` uses for ``path``:
    ``.tmp-<name up to the first dot>-<8 random characters><suffix>``."""
    name = Path(path).name
    if suffix is None:
        suffix = name[name.index("."):] if "." in name else ""
    return f"{TEMP_PREFIX}{name.split('.')[0]}-", suffix


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk."""
    flags = os.O_RDONLY if os.name != "nt" else os.O_RDWR
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    if os.name == "nt":  # pragma: no cover - no directory handles to fsync on Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on folders
            os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(folder: Path, prefix: str, suffix: str) -> Path:
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            # 0o666 & ~umask, as open() would give; O_EXCL: never reuse an existing name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:  # pragma: no cover - 2**32 names
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name in {folder}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    Args:
        path: the final file name (its folder is created).
        suffix: the temporary name's ending; defaults to the full suffix of ``path`` (e.g. ``.nii.gz``) so
            that libraries choosing a format from the file name (nibabel, SimpleITK, matplotlib) write the
            right format.
        fsync: flush the file to disk before the rename and the folder after it. Defaults to False.

    Raises:
        DiskFullError: the disk (or quota) filled up; the temporary file is removed, ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = temp_name_parts(path, suffix)
    with raise_if_disk_full(path):
        tmp_path = _create_temp(path.parent, prefix, suffix)
    try:
        with raise_if_disk_full(path):
            yield tmp_path
            if fsync:
                fsync_file(tmp_path)
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk unless ``fsync=False``)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def stale_temp_files(targets: Iterable[str | os.PathLike]) -> list[Path]:
    """Temporary files :func:`atomic_path` left beside each of ``targets`` (killed writers), existing now.

    Only names of medse's own pattern (``.tmp-<stem>-<8 characters><target's suffix>``) for exactly
    these targets are returned; other files in the folders are never matched.
    """
    found: list[Path] = []
    by_folder: dict[Path, list[re.Pattern[str]]] = {}
    for t in targets:
        t = Path(t)
        prefix, suffix = temp_name_parts(t)
        by_folder.setdefault(t.parent, []).append(re.compile(re.escape(prefix) + _RANDOM_RE + re.escape(suffix) + "$"))
    for folder, patterns in by_folder.items():
        try:
            names = [e.name for e in os.scandir(folder) if e.name.startswith(TEMP_PREFIX) and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.extend(folder / n for n in sorted(names) if any(p.match(n) for p in patterns))
    return found


def ensure_writable_dir(folder: str | os.PathLike, what: str = "output folder", *, create: bool = True) -> list[Path]:
    """Check, before any work, that ``folder`` can be written; create it (and its parents) unless ``create=False``.

    A probe file is really created and removed (not only ``os.access`` asked), so permissions, read-only mounts
    and a full quota are found as the real write would find them, also as root. With ``create=False`` the probe
    goes into the nearest existing parent (for a folder the caller creates later, e.g. atomically).

    Returns:
        The folders that were created (outermost first), so that a caller failing before it wrote anything
        can remove them again; empty with ``create=False``.

    Raises:
        MedseError: naming the folder, when it (or a parent) is a file, or cannot be created or written.
    """
    folder = Path(folder).expanduser().absolute()
    missing = []
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    if folder.exists() and not folder.is_dir():
        raise MedseError(f"{what} exists and is not a folder", folder)
    if not p.is_dir():
        raise MedseError(f"cannot create the {what}: a parent path is a file ({p})", folder)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MedseError(f"cannot create the {what} ({e.strerror or type(e).__name__})", folder) from None
    probe_dir = folder if create else p
    try:
        probe = _create_temp(probe_dir, f"{TEMP_PREFIX}write-check-", "")
    except OSError as e:
        where = "" if probe_dir == folder else f" (it would be created in {probe_dir})"
        raise MedseError(f"cannot write into the {what}{where} ({e.strerror or type(e).__name__})", folder) from None
    probe.unlink()
    return missing[::-1] if create else []
