"""Packaging beyond what pyproject.toml can say: the shipped configs/ and pipelines/ as package data.

The metadata is all in pyproject.toml. This file only adds the packages that map the repository's top-level
``configs/`` and ``pipelines/`` folders into the wheel as ``medse/_shipped/configs`` and
``medse/_shipped/pipelines`` (``package-data`` *.yaml in pyproject.toml), so that a pip-installed medse finds the
demo and the configs (:mod:`medse._shipped`) while the checkout keeps its layout. pyproject.toml's
``packages.find`` cannot add packages that live outside the ``medse/`` folder, hence ``find_packages`` here.
"""

from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).resolve().parent
#: package name -> folder: configs/, pipelines/ and every subfolder of them that holds YAML (pipelines/train/)
_SHIPPED = {
    "medse._shipped." + ".".join(d.relative_to(_HERE).parts): d.relative_to(_HERE).as_posix()
    for top in ("configs", "pipelines")
    for d in [_HERE / top, *sorted(p for p in (_HERE / top).rglob("*") if p.is_dir())]
    if any(d.glob("*.yaml")) and "__pycache__" not in d.parts
}

setup(
    packages=[*find_packages(include=["medse", "medse.*"]), *_SHIPPED],
    package_dir=_SHIPPED,
)
