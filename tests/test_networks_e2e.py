"""End to end (slow): a per-position attention assignment on MONAI's DynUNet with deep supervision trains,
predicts the held-out cases and appears in the comparison table under its readable name."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("medse.training")
pytest.importorskip("medse.inference")

TRAIN = """
data:
  split: {kind: holdout, val_fraction: 0.2, test_fraction: 0.5, seed: 0}
model:
  name: dynunet
  kwargs: {filters: [8, 16, 16], deep_supervision: true}
train:
  epochs: 1
  iterations_per_epoch: 4
  batch_size: 1
  patch_size: [16, 16, 16]
  device: cpu
  tensorboard: false
  num_threads: 1
"""


@pytest.mark.slow
def test_per_position_dynunet_trains_predicts_and_is_named_in_the_table(tmp_path: Path) -> None:
    from medse.compare.pipeline import run_compare
    from medse.config import load_config

    (tmp_path / "train.yaml").write_text(TRAIN)
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: pos\ndataset: tiny phantoms\ntrain_config: train.yaml\n"
                    "synthetic: {n_cases: 6, size: 20, seed: 0}\narchitectures: [dynunet]\n"
                    "blocks: [none, {decoder: scse, encoder.0: cse}]\nfigures: false\ntable: {n_boot: 200}\n")
    report = run_compare(pipe, tmp_path / "out", log=None)
    assert not report.failed, report.failed
    name = "encoder.0=cse,decoder=scse"
    cell = tmp_path / "out" / "cells" / f"dynunet-{name}-holdout-seed0"
    assert (cell / "records.csv").is_file()
    cfg = load_config(cell / "run" / "config.yaml")
    assert cfg.model.attention == name and cfg.model.kwargs["deep_supervision"] is True
    assert len(list((cell / "pred").glob("*.nii.gz"))) == 3
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(table["block"]) == ["none", name]
    assert table.set_index("block").loc[name, "param_overhead_pct"] > 0
    assert f"| {name} |" in (tmp_path / "out" / "table.md").read_text()
