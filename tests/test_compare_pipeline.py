"""Comparison grid: resume after a kill, skip finished cells, shards, failed cells, config validation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medse.compare.cell import Cell
from medse.compare.pipeline import (
    CellKey,
    CompareConfig,
    cell_overrides,
    grid_cells,
    load_pipeline,
    parse_shard,
    run_compare,
)
from medse.compare.records import cell_rows
from medse.utils.errors import MedseError

REPO = Path(__file__).resolve().parents[1]
SHIFT = {"none": 0.0, "cse": 0.01, "sse": 0.02, "scse": 0.03}


def fake_records(cell: CellKey, n_cases: int = 6) -> pd.DataFrame:
    """Deterministic per-case records standing in for train + predict + evaluate."""
    rng = np.random.default_rng(abs(hash((cell.arch, cell.fold, cell.seed))) % 2**32)
    base = 0.6 + 0.05 * rng.random(n_cases)
    ev = pd.DataFrame([{"case_id": f"c{i}", "label": "fg", "label_value": 1, "metric": "dice",
                        "value": base[i] + SHIFT[cell.block] * (1 + i / 10)} for i in range(n_cases)])
    return cell_rows(ev, arch=cell.arch, block=cell.block, fold=cell.fold, seed=cell.seed,
                     params=1000 + 10 * list(SHIFT).index(cell.block), train_step_s=0.1,
                     infer_s={f"c{i}": 0.2 for i in range(n_cases)}, dataset="fake")


def write_pipeline(tmp_path: Path, **extra) -> Path:
    (tmp_path / "train.yaml").write_text("model:\n  name: unet\n")
    lines = [
        "name: tiny",
        "train_config: train.yaml",
        "architectures: [unet, {name: unet, label: unet_wide, overrides: [\"model.kwargs.channels=[8,16]\"]}]",
        "blocks: [none, cse, scse]",
        "seeds: [0, 1]",
        "table: {n_boot: 200}",
        "figures: false",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    p = tmp_path / "pipe.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


class Counting:
    def __init__(self, fail: set[str] | None = None, interrupt_at: int | None = None):
        self.calls: list[str] = []
        self.fail = fail or set()
        self.interrupt_at = interrupt_at

    def __call__(self, cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        self.calls.append(cell.cell_id)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            (cell_dir / "partial.txt").write_text("half-done")  # a killed cell leaves partial files
            raise KeyboardInterrupt
        if cell.cell_id in self.fail:
            raise RuntimeError("boom in training")
        return fake_records(cell)


def test_grid_and_overrides(tmp_path):
    cfg = load_pipeline(write_pipeline(tmp_path))
    cells = grid_cells(cfg)
    assert len(cells) == 2 * 3 * 2
    assert cells[0] == CellKey("unet", "none", -1, 0) and cells[0].cell_id == "unet-none-holdout-seed0"
    ov = cell_overrides(cfg, CellKey("unet_wide", "scse", -1, 1))
    assert ov[:3] == ["model.kwargs.channels=[8,16]", "model.name=unet", "model.attention=scse"]
    assert "train.seed=1" in ov and "train.progress=false" in ov
    assert not any(o.startswith("data.split.fold") for o in ov)
    cfg2 = load_pipeline(write_pipeline(tmp_path, folds="[0, 1]", block_overrides="{cse: [x.y=2]}"))
    ov2 = cell_overrides(cfg2, CellKey("unet", "cse", 1, 0))
    assert "data.split.fold=1" in ov2 and "x.y=2" in ov2
    assert grid_cells(cfg2)[1].cell_id == "unet-cse-fold0-seed0"


def test_killed_compare_resumes_only_missing_cells(tmp_path):
    pipe = write_pipeline(tmp_path)
    out = tmp_path / "out"
    first = Counting(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_compare(pipe, out, runner=first, log=None)
    done = sorted(p.parent.name for p in (out / "cells").glob("*/records.csv"))
    assert done == sorted(first.calls[:4])
    killed = first.calls[4]
    assert (out / "cells" / killed / "partial.txt").is_file() and not (out / "cells" / killed / "records.csv").exists()
    mtimes = {c: (out / "cells" / c / "records.csv").stat().st_mtime_ns for c in done}

    second = Counting()
    rep = run_compare(pipe, out, runner=second, log=None)
    all_ids = [c.cell_id for c in grid_cells(load_pipeline(pipe))]
    assert second.calls == [c for c in all_ids if c not in done]  # only the missing cells, killed one included
    assert sorted(rep.skipped) == done and not rep.failed
    assert {c: (out / "cells" / c / "records.csv").stat().st_mtime_ns for c in done} == mtimes
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 6 and set(table["block"]) == {"none", "cse", "scse"}
    assert (table[table["block"] == "none"]["n_cases"] == 6).all()
    assert "seeds: 0, 1" in (out / "table.md").read_text()
    # a third run has nothing left to do
    third = Counting()
    rep3 = run_compare(pipe, out, runner=third, log=None)
    assert third.calls == [] and len(rep3.skipped) == 12


def test_sigkilled_compare_process_resumes(tmp_path):
    pipe = write_pipeline(tmp_path)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_compare_pipeline import fake_records
        from medse.compare.pipeline import run_compare
        def slow(cell, cell_dir, cfg):
            time.sleep(0.4)
            return fake_records(cell)
        run_compare({str(pipe)!r}, {str(out)!r}, runner=slow, log=None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list((out / "cells").glob("*/records.csv"))) < 3:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = {p.parent.name for p in (out / "cells").glob("*/records.csv")}
    assert 3 <= len(done) < 12
    assert not list((out / "cells").glob("*/.tmp-*"))  # nothing half-written counts as finished
    again = Counting()
    run_compare(pipe, out, runner=again, log=None)
    assert set(again.calls) == {c.cell_id for c in grid_cells(load_pipeline(pipe))} - done
    assert len(pd.read_csv(out / "table.csv")) == 6


def test_failed_cell_reported_rest_go_on(tmp_path):
    pipe = write_pipeline(tmp_path)
    out = tmp_path / "out"
    bad = "unet-cse-holdout-seed1"
    lines: list[str] = []
    rep = run_compare(pipe, out, runner=Counting(fail={bad}), log=lines.append)
    assert list(rep.failed) == [bad] and "boom in training" in rep.failed[bad]
    assert len(rep.ran) == 11
    assert "RuntimeError" in (out / "cells" / bad / "error.txt").read_text()
    assert any("FAILED" in line and bad in line for line in lines)
    t = pd.read_csv(out / "table.csv").set_index(["arch", "block"])
    assert t.loc[("unet", "cse"), "n_cases"] == 6  # seed 0 only, still 6 cases
    assert t.loc[("unet_wide", "cse"), "n_cases"] == 6
    retry = Counting()
    rep2 = run_compare(pipe, out, runner=retry, log=None)
    assert retry.calls == [bad] and not rep2.failed
    assert not (out / "cells" / bad / "error.txt").exists()


def test_shards_split_the_grid(tmp_path):
    pipe = write_pipeline(tmp_path)
    out = tmp_path / "out"
    a, b = Counting(), Counting()
    rep_a = run_compare(pipe, out, shard="0/2", runner=a, log=None)
    assert len(a.calls) == 6
    assert len(pd.read_csv(out / "table.csv")) <= 6  # partial table from the records so far
    run_compare(pipe, out, shard="1/2", runner=b, log=None)
    assert set(a.calls).isdisjoint(b.calls) and len(set(a.calls) | set(b.calls)) == 12
    assert rep_a.cells == a.calls
    assert len(pd.read_csv(out / "table.csv")) == 6
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(MedseError, match="shard"):
            parse_shard(bad)


def test_pipeline_validation_errors(tmp_path):
    with pytest.raises(MedseError, match="unknown config key 'blokcs'"):
        load_pipeline(write_pipeline(tmp_path, blokcs="[none]"))
    with pytest.raises(MedseError, match="baseline"):
        load_pipeline(write_pipeline(tmp_path), overrides=["blocks=[cse, scse]"])
    with pytest.raises(MedseError, match="train_config"):
        load_pipeline(write_pipeline(tmp_path), overrides=["train_config=missing.yaml"])
    with pytest.raises(MedseError, match="more than once"):
        load_pipeline(write_pipeline(tmp_path), overrides=["seeds=[0, 0]"])
    with pytest.raises(MedseError, match="pipe.yaml"):
        load_pipeline(write_pipeline(tmp_path), overrides=["architectures=[]"])


@pytest.mark.parametrize("name", ["scse_paper.yaml", "all_blocks.yaml", "demo.yaml"])
def test_shipped_pipelines_load(name):
    cfg = load_pipeline(REPO / "pipelines" / name)  # every train_config it names must exist and load
    assert cfg.table.baseline in cfg.blocks
    assert len(grid_cells(cfg)) >= 4
    if name == "scse_paper.yaml":
        assert [a.name for a in cfg.architectures] == ["unet", "fc_densenet", "sdnet"]
        assert cfg.blocks == ["none", "cse", "sse", "scse"]
    if name == "all_blocks.yaml":
        from medse.attention import list_attention

        assert set(cfg.blocks) == {"none", *list_attention()}


@pytest.mark.parametrize("name,labels,channels", [
    ("malc2012", {}, ["T1"]),
    ("msd_task04_hippocampus", {"background": 0, "anterior": 1, "posterior": 2}, ["MRI"]),
    ("brats_style", {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4},
     ["flair", "t1", "t1ce", "t2"]),
])
def test_dataset_templates_are_valid_manifests(name, labels, channels):
    from medse.data.datasets import read_manifest

    spec = read_manifest(REPO / "data_manifests" / "templates" / f"{name}.json")
    assert spec.labels == labels and spec.channel_names == channels
    assert spec.cases and all(len(c.images) == len(channels) and c.label is not None for c in spec.cases)
    assert f"`{name}.json`" in (REPO / "data_manifests" / "templates" / "README.md").read_text()


def test_unmatched_cases_are_warned_and_reported(tmp_path):
    pipe = write_pipeline(tmp_path)
    out = tmp_path / "out"

    def runner(cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        rec = fake_records(cell)
        if cell.block == "scse" and cell.arch == "unet":  # scse of unet never evaluated case c5
            rec = rec[~((rec["case_id"] == "c5") & (rec["metric"] == "dice"))]
        return rec

    lines: list[str] = []
    rep = run_compare(pipe, out, runner=runner, log=lines.append)
    assert rep.unmatched == ["unet: case c5 not scored for scse"]
    assert any(line.startswith("warning: unmatched") and "c5" in line for line in lines)
    import json

    assert json.loads((out / "report.json").read_text())["unmatched"] == rep.unmatched
    table = pd.read_csv(out / "table.csv").set_index(["arch", "block"])
    assert (table.loc["unet", "n_cases"] == 5).all() and (table.loc["unet_wide", "n_cases"] == 6).all()
    assert "Unmatched cases" in (out / "table.md").read_text()
