"""Shared option parsing and up-front checks of the CLI commands (bad values fail before any work)."""

from __future__ import annotations

import typer

from medse.utils.device import check_device

__all__ = ["check_device", "check_overlap", "parse_roi_size"]  # check_device: the one device rule, re-exported


def parse_roi_size(value: str | None) -> list[int] | None:
    """Typer callback of ``--roi-size``: ``96,96,96`` (or ``96x96x96``) -> [96, 96, 96], every size >= 1."""
    if value is None or not str(value).strip():
        return None
    parts = [v.strip() for v in str(value).replace("x", ",").split(",") if v.strip()]
    try:
        sizes = [int(v) for v in parts]
    except ValueError:
        raise typer.BadParameter(f"{value!r} must be 2 or 3 integers >= 1, like 96,96,96") from None
    if len(sizes) not in (2, 3) or any(s < 1 for s in sizes):
        raise typer.BadParameter(f"{value!r} must be 2 or 3 integers >= 1, like 96,96,96")
    return sizes


def check_overlap(value: float | None) -> float | None:
    """Typer callback of ``--overlap``: a fraction in [0, 1)."""
    if value is not None and not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{value} is not in the range 0 <= x < 1")
    return value
