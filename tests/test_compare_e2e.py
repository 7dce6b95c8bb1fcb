"""End to end with real (tiny) training: demo -> table, figures, gate maps; rerun skips; a removed cell reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("medse.training")
pytest.importorskip("medse.inference")
pytest.importorskip("medse.evaluation")

TRAIN = """
data:
  split: {kind: holdout, val_fraction: 0.2, test_fraction: 0.5, seed: 0}
model:
  name: unet
  kwargs: {channels: [4, 8, 16], strides: [2, 2]}
train:
  epochs: 1
  iterations_per_epoch: 5
  batch_size: 1
  patch_size: [16, 16, 16]
  device: cpu
  tensorboard: false
  val_every: 1
"""


def tiny_pipeline(tmp_path: Path) -> Path:
    (tmp_path / "train.yaml").write_text(TRAIN)
    p = tmp_path / "tiny.yaml"
    p.write_text("name: tiny\ndataset: tiny phantoms\ntrain_config: train.yaml\n"
                 "synthetic: {n_cases: 6, size: 20, seed: 0}\narchitectures: [unet]\nblocks: [none, scse]\n"
                 "table: {n_boot: 500, structures: true}\n")
    return p


@pytest.mark.slow
def test_demo_end_to_end_and_resume(tmp_path, capsys):
    from medse.cli import main
    from medse.compare import pipeline as pl
    from medse.compare.demo import run_demo

    pipe = tiny_pipeline(tmp_path)
    out = tmp_path / "demo"
    lines: list[str] = []
    summary = run_demo(out, pipeline=pipe, log=lines.append)
    assert sorted(summary["cells_run"]) == ["unet-none-holdout-seed0", "unet-scse-holdout-seed0"]
    table = pd.read_csv(out / "table.csv")
    assert list(table["block"]) == ["none", "scse"] and (table["n_cases"] == 3).all()
    scse = table.set_index("block").loc["scse"]
    assert scse["param_overhead_pct"] > 0 and scse["infer_s"] > 0
    assert (out / "table_structures.csv").is_file()
    md = (out / "table.md").read_text()
    assert "Dataset: tiny phantoms; test cases: 3; folds: -; seeds: 0" in md
    # one run of 3 cases per block: no timing overhead is printed, only the reason (never a noise number)
    scse_line = next(line for line in md.splitlines() if line.startswith("| unet | scse |"))
    assert scse_line.count("n/a (3 measurements from 1 paired run; needs >= 5 from >= 2 runs)") == 1
    assert scse_line.count("n/a (1 measurement from 1 paired run; needs >= 5 from >= 2 runs)") == 1
    assert "| unet | scse |" in "\n".join(lines) and "needs >= 5" in "\n".join(lines)  # the demo prints it
    for name in ("dice_boxplot.png", "gain.png", "overlay.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert Path(summary["outputs"]["gates_montage"]).is_file()
    assert list((out / "figures" / "gates").glob("*.nii.gz"))
    assert any("| unet | scse |" in line for line in lines) and any("demo finished" in line for line in lines)
    assert json.loads((out / "demo_summary.json").read_text())["cpu_s"] > 0
    records = pd.read_csv(out / "cells" / "unet-scse-holdout-seed0" / "records.csv")
    assert set(records["metric"]) >= {"dice", "hd95", "params", "infer_s"}
    assert len(list((out / "cells" / "unet-scse-holdout-seed0" / "pred").glob("*.nii.gz"))) == 3

    # rerun: everything is reused
    again = run_demo(out, pipeline=pipe, log=None, explain_maps=False)
    assert again["cells_run"] == [] and len(again["cells_skipped"]) == 2

    # a cell killed after training (records missing): only it runs again, and its training is resumed, not redone
    ck = out / "cells" / "unet-scse-holdout-seed0" / "run" / "checkpoints" / "best.pt"
    mtime = ck.stat().st_mtime_ns
    (out / "cells" / "unet-scse-holdout-seed0" / "records.csv").unlink()
    calls: list[str] = []

    def spy(cell, cell_dir, cfg):
        calls.append(cell.cell_id)
        return pl.run_cell(cell, cell_dir, cfg)

    rep = pl.run_compare(pipe, out, runner=spy, log=None)
    assert calls == ["unet-scse-holdout-seed0"] and rep.skipped == ["unet-none-holdout-seed0"]
    assert ck.stat().st_mtime_ns == mtime
    assert len(pd.read_csv(out / "table.csv")) == 2

    # the cells were trained with train.epochs=1: asking for 2 refuses them (naming the key) before any training
    capsys.readouterr()
    assert main(["compare", "--config", str(pipe), "--output", str(out), "-t", "train.epochs=2"]) == 2
    captured = capsys.readouterr()
    assert "train.epochs: 1 -> 2" in captured.err and "skipped" not in captured.out
    assert ck.stat().st_mtime_ns == mtime

    # CLI: table-only rebuild and explain with a layer selection
    capsys.readouterr()
    assert main(["compare", "--config", str(pipe), "--output", str(out), "--table-only"]) == 0
    assert "| unet | scse |" in capsys.readouterr().out
    scan = next((out / "data" / "images").glob("*.nii.gz"))
    assert main(["explain", "--run", str(out / "cells" / "unet-scse-holdout-seed0" / "run"), "--image", str(scan),
                 "--output", str(tmp_path / "maps"), "--layers", "0,-1"]) == 0
    assert len(list((tmp_path / "maps").glob("*_gate*.nii.gz"))) == 2
    assert main(["explain", "--run", str(out / "cells" / "unet-none-holdout-seed0" / "run"), "--image", str(scan),
                 "--output", str(tmp_path / "maps2")]) == 2
    assert "no spatial-gate block" in capsys.readouterr().err
