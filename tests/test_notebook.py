"""The tutorial notebook: stored without outputs, and it runs end to end on tiny settings.

Executing it takes about 17 s on an idle 2-core machine (not marked slow: under 60 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NB, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(not c.outputs and c.execution_count is None for c in code)
    src = "\n".join(c.source for c in code)
    for api in ("create_attention", "create_model", "generate_dataset", "train(", "Predictor", "explain("):
        assert api in src


def test_notebook_executes_on_tiny_settings(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MEDSE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MEDSE_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    nb = nbformat.read(NB, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "params 297 formula 297" in text  # scSE with C = 16
    assert "scSE blocks" in text and "Dice per structure" in text
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1  # the gate montage
    assert list((tmp_path / "work" / "gates").glob("*.nii.gz"))
    assert os.path.isfile(tmp_path / "work" / "run_scse" / "checkpoints" / "best.pt")
