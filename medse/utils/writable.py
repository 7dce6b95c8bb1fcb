"""Up-front checks that an output folder can be written, before any work is done.

A command that would fail only when it writes its first file (after minutes of training or inference) checks
its output folder first: :func:`ensure_writable_dir` creates and deletes a probe file in the folder, or in
its nearest existing parent when the folder does not exist yet (the command creates it later), so
permissions, read-only mounts and full quota are all found the way the real write would find them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from medse.utils.errors import MedseError

__all__ = ["ensure_writable_dir", "nearest_existing"]


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else its nearest existing parent."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Raise a one-line :class:`MedseError` naming ``path`` unless a folder can be created/written there.

    Args:
        path: the folder a command will write into (it may not exist yet).
        what: how the message names it. Defaults to ``"output folder"``.

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        MedseError: ``path`` (or a parent) is a file, or the folder (or the parent it would be created in)
            cannot be written.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise MedseError(f"{what} is a file, not a folder", target)
    anc = nearest_existing(target)
    if not anc.is_dir():
        raise MedseError(f"{what} cannot be created: {anc} is a file, not a folder", target)
    try:
        fd, probe = tempfile.mkstemp(prefix=".medse-write-test-", dir=anc)
    except OSError as e:
        where = "" if anc == target else f" (it would be created in {anc})"
        raise MedseError(f"{what} is not writable{where}: {e.strerror or e}", target) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return target
