"""Shared utilities: errors, atomic writes, run metadata, seeding, checkpoints and typed configs."""

from __future__ import annotations

from medse.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from medse.utils.errors import MedseError

__all__ = ["MedseError", "atomic_path", "atomic_write_bytes", "atomic_write_text"]
