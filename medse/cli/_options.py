"""Shared option parsing and up-front checks of the CLI commands (bad values fail before any work)."""

from __future__ import annotations

import typer

from medse.utils.errors import MedseError


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


def check_device(device: str, option: str = "--device") -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this torch can use; otherwise a one-line MedseError."""
    d = str(device).strip().lower()
    if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
        raise MedseError(f"{option} {device!r}: use auto, cpu, cuda or cuda:N")
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise MedseError(f"{option} {device!r}: CUDA is not available (torch {torch.__version__}, {build}); "
                             "use --device cpu or auto")
        n = torch.cuda.device_count()
        if d.startswith("cuda:") and int(d[5:]) >= n:
            raise MedseError(f"{option} {device!r}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return d
