"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (state dicts of model,
optimizer, scheduler, scaler, RNG states, epoch): nothing that needs unpickling of arbitrary objects.

A full disk while saving is :class:`~medse.utils.atomic.DiskFullError` (``no space left on device, <path>``) and
leaves the previous file under ``path`` as it was. ``torch.save`` itself reports a failed write only as
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``; writing through a Python file object
keeps the ``OSError`` that caused it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from medse.utils.atomic import atomic_path
from medse.utils.errors import MedseError


class _KeepWriteError:
    """A binary file for ``torch.save`` that remembers the ``OSError`` of a failed write (torch replaces it by
    a ``RuntimeError`` that says neither what failed nor where)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary name, flushed, renamed).

    Raises:
        DiskFullError: no space left; ``path`` keeps its previous content.
    """
    import torch

    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        out = _KeepWriteError(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise MedseError("checkpoint not found", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt or unsafe file
        raise MedseError(f"cannot load checkpoint with weights_only=True ({type(e).__name__}: {e})", path) from e
