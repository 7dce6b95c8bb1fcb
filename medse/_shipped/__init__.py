"""The configs and pipelines that ship with medse (``configs/*.yaml``, ``pipelines/**/*.yaml``), wherever medse runs.

In the repository they stay where they are, at the top of the checkout, next to the ``medse`` package (an editable
install runs from there). A built wheel or sdist carries them as package data under ``medse/_shipped/configs`` and
``medse/_shipped/pipelines`` (``setup.py`` maps the two folders into this package), with the same relative layout,
so that a pipeline's ``train_config: ../configs/demo.yaml`` and a config's ``_base_: _base.yaml`` resolve the same
in both places.

A config or pipeline given on the command line is read from the local path when that file exists; otherwise a
shipped one is used when the argument names one: ``demo`` / ``demo.yaml`` (a config name; a pipeline name for the
pipeline commands) or ``configs/demo.yaml`` / ``pipelines/demo.yaml`` (the path the README uses, relative to the
checkout). So ``medse train --config demo ...`` and ``medse train --config configs/demo.yaml ...`` work from any
folder with a pip-installed medse, and a local file of the same name always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from medse.utils.errors import MedseError

__all__ = ["FOLDERS", "find", "names", "shipped_root"]

#: the shipped folders, as named in the checkout and inside this package.
FOLDERS = ("configs", "pipelines")


def shipped_root() -> Path:
    """The folder that holds ``configs/`` and ``pipelines/``: this package in an installed wheel, else the checkout.

    Raises:
        MedseError: neither has them (a broken install).
    """
    here = Path(__file__).resolve().parent
    for root in (here, here.parents[1]):  # installed wheel: medse/_shipped/configs; checkout: <repo>/configs
        if all((root / f).is_dir() for f in FOLDERS):
            return root
    raise MedseError("medse's shipped configs/ and pipelines/ are missing (neither in the installed package nor "
                     "next to it): reinstall medse", here)


def names(folder: str = "configs") -> list[str]:
    """The shipped names in ``folder`` (``configs`` or ``pipelines``), e.g. ``demo`` or ``train/scse_paper_2d``;
    files whose name starts with ``_`` (bases such as ``_base.yaml``) are left out."""
    base = shipped_root() / folder
    return sorted(p.relative_to(base).with_suffix("").as_posix() for p in base.rglob("*.yaml")
                  if not p.name.startswith("_"))


def find(path: str | os.PathLike, folder: str = "configs") -> Path:
    """The file to read for a config or pipeline argument: the local file when it exists, else the shipped one.

    Args:
        path: what the user gave: a path, a shipped name (``demo``, ``demo.yaml``) or a checkout-relative path
            (``configs/demo.yaml``).
        folder: where a bare name is looked up, ``configs`` or ``pipelines``. Defaults to ``configs``.

    Returns:
        ``path`` itself when it exists or when it cannot name a shipped file (an absolute path, ``~/x.yaml``):
        the caller's reader reports it missing.

    Raises:
        MedseError: a name-like argument that is neither a local file nor shipped; the message lists the
            shipped names.
    """
    given = Path(path)
    if given.expanduser().exists() or given.is_absolute() or str(path).startswith("~"):
        return given
    parts = given.parts
    if len(parts) == 1:  # a bare name: demo or demo.yaml
        rel = Path(folder, given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
    elif parts[0] in FOLDERS:  # the README's checkout-relative form
        rel, folder = given, parts[0]
    else:
        return given
    shipped = shipped_root() / rel
    if shipped.is_file():
        return shipped
    kind = folder.rstrip("s")
    raise MedseError(f"{path}: no such file here, and medse ships no {kind} '{rel.as_posix()}' (shipped {folder}: "
                     f"{', '.join(names(folder))})", given)
