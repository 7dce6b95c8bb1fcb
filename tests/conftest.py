"""Shared pytest fixtures (owned by the data area; every area may use them).

Datasets (written once per test session with :mod:`medse.data.synth`, ~1 s):

* ``synth_dataset`` -> Path: 6 synthetic brain phantoms at 24^3 (seed 0), layout "folder"
  (``images/case_000.nii.gz``, ``labels/case_000.nii.gz``, ``dataset.json`` with label names,
  ``manifest.json``); labels 0..6 (:data:`medse.data.synth.LABELS`), varied orientations, oblique and
  anisotropic headers. Treat it as read-only (copy it into ``tmp_path`` to modify).
* ``synth_manifest`` -> Path: ``synth_dataset / "manifest.json"``.
* ``synth_nnunet`` -> Path: 4 phantoms at 20^3 in the nnU-Net v2 layout (imagesTr/case_000_0000.nii.gz,
  labelsTr/, dataset.json).

Random volumes with non-trivial headers (function-scoped, written under ``tmp_path``):

* ``affine_kind`` -> str: parametrised over :data:`medse.testing.AFFINE_KINDS`
  ("ras", "lps", "flipped", "permuted", "oblique", "anisotropic"); a test using it runs once per kind.
* ``random_volume`` -> callable ``(name="img.nii.gz", shape=(20, 22, 24), kind="oblique", seed=0,
  label=False, n_labels=4, foreground_box=True, dtype=None, affine=None) -> (path, array, affine)``:
  writes under ``tmp_path`` (suffix picks the format: .nii, .nii.gz, .nrrd, .mha).
* ``folder_dataset`` -> callable ``(n_cases=3, shape=(16, 18, 20), kinds=AFFINE_KINDS, n_labels=4)
  -> Path``: a layout-"folder" dataset of random image/label pairs under ``tmp_path/ds`` (no dataset.json).

Broken datasets (one per validation problem of issue 4; e.g. to show that training stops with the
one-line error before creating a run folder):

* ``broken_dataset`` -> ``(path, file_fragment, message_fragment)``: parametrised over
  :data:`medse.testing.VALIDATION_PROBLEMS`; a 3-case dataset under ``tmp_path/broken`` (labels
  declared in dataset.json, so it is trainable apart from the problem) with one problem injected. The
  validation error names a file containing ``file_fragment`` and contains ``message_fragment``.
  ``path`` is the dataset folder, or a manifest for "duplicate_ids".

Runs and compare cells, made through their owners (:meth:`medse.runs.Run.create`, :class:`medse.compare.cell.Cell`),
never by writing their files by hand:

* ``tiny_run`` -> callable ``(name="run", config=None, **kwargs) -> Run``: :func:`medse.testing.make_run` under
  ``tmp_path/<name>`` (a tiny 3D U-Net by default; ``labels``, ``channel_names``, ``checkpoints``, ``seed``).
* ``tiny_cell`` -> callable ``(cell_id="unet-none-holdout-seed0", **make_run_kwargs) -> Cell``: a cell of the grid
  folder ``tmp_path/grid`` (``Cell.in_grid``) whose run is ``tiny_run``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from medse.testing import (
    AFFINE_KINDS,
    VALIDATION_PROBLEMS,
    make_broken_dataset,
    make_run,
    write_case,
    write_random_volume,
)

if TYPE_CHECKING:
    from medse.compare.cell import Cell
    from medse.runs import Run


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medse.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "demo", n_cases=6, size=24, seed=0)


@pytest.fixture(scope="session")
def synth_manifest(synth_dataset: Path) -> Path:
    return synth_dataset / "manifest.json"


@pytest.fixture(scope="session")
def synth_nnunet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medse.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth_nnunet") / "Dataset001_Synth", n_cases=4, size=20,
                            seed=1, layout="nnunet")


@pytest.fixture()
def one_intra_op_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the threads of parallel
    jobs spin against each other (5x slower here); one thread for the test, the setting restored after. Network
    and block test files use it for every test (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=AFFINE_KINDS)
def affine_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def random_volume(tmp_path: Path):
    def _write(name: str = "img.nii.gz", shape=(20, 22, 24), kind: str = "oblique", seed: int = 0, **kwargs):
        return write_random_volume(tmp_path / name, shape, kind, seed, **kwargs)

    return _write


@pytest.fixture
def folder_dataset(tmp_path: Path):
    def _make(n_cases: int = 3, shape=(16, 18, 20), kinds=AFFINE_KINDS, n_labels: int = 4) -> Path:
        root = tmp_path / "ds"
        for i in range(n_cases):
            write_case(root, f"c{i:02d}", shape, kinds[i % len(kinds)], seed=i, n_labels=n_labels)
        return root

    return _make


@pytest.fixture(params=VALIDATION_PROBLEMS)
def broken_dataset(request: pytest.FixtureRequest, tmp_path: Path):
    return make_broken_dataset(tmp_path / "broken", request.param)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Callable[..., Run]:
    def _make(name: str = "run", config: dict[str, Any] | None = None, **kwargs: Any) -> Run:
        return make_run(tmp_path / name, config, **kwargs)

    return _make


@pytest.fixture
def tiny_cell(tmp_path: Path) -> Callable[..., Cell]:
    from medse.compare.cell import Cell

    def _make(cell_id: str = "unet-none-holdout-seed0", **kwargs: Any) -> Cell:
        cell = Cell.create(Cell.in_grid(tmp_path / "grid", cell_id))
        make_run(cell.run_dir, **kwargs)
        return cell

    return _make


@pytest.fixture
def torchrun():
    """``torchrun(*medse_args)``: run ``python -m medse ARGS`` as 2 DDP processes (gloo on CPU, one thread each,
    any launcher variables of the calling environment removed); returns the completed process."""
    import os
    import subprocess
    import sys

    def run(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
        drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "medse", *args]
        return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                              text=True, timeout=timeout)

    return run
