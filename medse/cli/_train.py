"""CLI commands of the 'train' area (filled in by that area's owner)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the medse app."""
