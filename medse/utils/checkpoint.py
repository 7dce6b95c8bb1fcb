"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (state dicts of model,
optimizer, scheduler, scaler, RNG states, epoch): nothing that needs unpickling of arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medse.utils.atomic import atomic_path
from medse.utils.errors import MedseError


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    import torch

    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
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
