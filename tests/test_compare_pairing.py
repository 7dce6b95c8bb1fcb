"""medse compare through the CLI: rows paired by run, stale cells refused, grid checked up front, clean SIGTERM."""

from __future__ import annotations

import json
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

from medse.cli import main
from medse.compare import pipeline as pl
from medse.compare.cell import Cell
from medse.compare.pipeline import CellKey, CompareConfig
from medse.compare.records import cell_rows

REPO = Path(__file__).resolve().parents[1]
CASES = [f"c{i}" for i in range(8)]


def scores(cell: CellKey) -> np.ndarray:
    """Per-case Dice: scSE +0.05 over none in seed 0; in seed 1 every model is 0.2 worse (a bad seed)."""
    base = 0.6 + 0.02 * np.arange(len(CASES)) - (0.2 if cell.seed == 1 else 0.0)
    return base + (0.05 if cell.block == "scse" else 0.0)


def fake_runner(fail: set[str] = frozenset()):  # type: ignore[assignment]
    calls: list[str] = []

    def run(cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        calls.append(cell.cell_id)
        if cell.cell_id in fail:
            raise RuntimeError("out of memory in training")
        ev = pd.DataFrame([{"case_id": c, "label": "fg", "label_value": 1, "metric": "dice", "value": v}
                           for c, v in zip(CASES, scores(cell), strict=True)])
        return cell_rows(ev, arch=cell.arch, block=cell.block, fold=cell.fold, seed=cell.seed, params=100,
                         train_step_s=0.1, dataset="fake")

    run.calls = calls  # type: ignore[attr-defined]
    return run


def write_grid(tmp_path: Path, blocks: str = "[none, scse]") -> Path:
    (tmp_path / "train.yaml").write_text("model:\n  name: unet\n  kwargs: {channels: [4, 8], strides: [2]}\n"
                                         "train:\n  patch_size: [16, 16, 16]\n  batch_size: 1\n  epochs: 1\n")
    p = tmp_path / "grid.yaml"
    p.write_text(f"name: g\ntrain_config: train.yaml\narchitectures: [unet]\nblocks: {blocks}\nseeds: [0, 1]\n"
                 "table: {n_boot: 200}\nfigures: false\n")
    return p


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_row_rests_on_runs_present_for_it_and_the_baseline(tmp_path, monkeypatch, capsys):
    """The baseline's seed-1 cell failed, scSE's seed-1 run exists: the scSE row uses seed 0 only (gain +5 points,
    where averaging scSE over both seeds against the baseline's seed 0 gave -5), the header says so, exit 1."""
    grid, out = write_grid(tmp_path), tmp_path / "cmp"
    monkeypatch.setattr(pl, "run_cell", fake_runner(fail={"unet-none-holdout-seed1"}))
    rc, stdout, err = cli(["compare", "-c", str(grid), "-o", str(out)], capsys)
    assert rc == 1
    rows = pd.read_csv(out / "table.csv").set_index("block")
    assert rows.loc["scse", "gain"] == pytest.approx(5.0)
    assert list(rows["n_runs"]) == [1, 1] and list(rows["runs"]) == ["seed 0", "seed 0"]
    assert rows.loc["scse", "n_cases"] == 8
    md = (out / "table.md").read_text()
    assert "Runs per row (a row rests only on the runs present for both it and the baseline): unet none: seed 0; " \
           "unet scse: seed 0." in md
    assert "Unmatched runs, left out of the rows that lack them: unet: run seed 1 has no records for none." in md
    assert "unet-none-holdout-seed1: failed (RuntimeError: out of memory in training)" in md
    assert "warning: unmatched run, left out of the rows that lack it: unet: run seed 1 has no records for none" \
        in stdout
    assert json.loads((out / "table.json").read_text())["runs_by_row"] == {"unet/none": [[-1, 0]],
                                                                          "unet/scse": [[-1, 0]]}
    # the same table from the records alone (--table-only) is incomplete too, unless the user accepts it
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out), "--table-only"], capsys)
    assert rc == 1 and "error: the table is incomplete: unet: run seed 1 has no records for none" in err
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out), "--table-only", "--allow-incomplete"], capsys)
    assert rc == 0 and "warning: incomplete table" in err

    # once the cell succeeds, both rows rest on both seeds and the exit code is 0
    monkeypatch.setattr(pl, "run_cell", fake_runner())
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out)], capsys)
    assert rc == 0, err
    rows = pd.read_csv(out / "table.csv").set_index("block")
    assert list(rows["runs"]) == ["seeds 0, 1", "seeds 0, 1"] and rows.loc["scse", "gain"] == pytest.approx(5.0)
    assert "Runs per row (" not in (out / "table.md").read_text()


def test_unmatched_case_in_one_run_makes_the_exit_code_nonzero(tmp_path, monkeypatch, capsys):
    grid, out = write_grid(tmp_path), tmp_path / "cmp"
    inner = fake_runner()

    def runner(cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        rec = inner(cell, cell_dir, cfg)
        if cell.block == "scse" and cell.seed == 1:  # c3 was not evaluated in this run only
            rec = rec[~((rec["case_id"] == "c3") & (rec["metric"] == "dice"))]
        return rec

    monkeypatch.setattr(pl, "run_cell", runner)
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out)], capsys)
    assert rc == 1 and "unet: case c3 not scored for scse" in err
    assert (pd.read_csv(out / "table.csv")["n_cases"] == 7).all()
    rc, _, _ = cli(["compare", "-c", str(grid), "-o", str(out), "--allow-incomplete"], capsys)
    assert rc == 0


def test_stale_cells_are_refused_naming_the_keys_then_retrained(tmp_path, monkeypatch, capsys):
    grid, out = write_grid(tmp_path), tmp_path / "cmp"
    runner = fake_runner()
    monkeypatch.setattr(pl, "run_cell", runner)
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out), "-t", "train.epochs=1"], capsys)
    assert rc == 0, err and len(runner.calls) == 4
    stamp = json.loads((out / "cells" / "unet-none-holdout-seed0" / "cell.json").read_text())
    assert stamp["config"]["train.epochs"] == 1 and stamp["medse_version"]
    # the same command again: every cell reused
    rc, stdout, err = cli(["compare", "-c", str(grid), "-o", str(out), "-t", "train.epochs=1",
                           "-t", "train.num_threads=1"], capsys)  # threads do not change what a run learns
    assert rc == 0 and len(runner.calls) == 4 and stdout.count("same settings, skipped") == 4
    # other epochs: refused in one line naming the key, before anything runs
    rc, stdout, err = cli(["compare", "-c", str(grid), "-o", str(out), "-t", "train.epochs=2"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "train.epochs: 1 -> 2" in err and "--retrain-stale" in err and "(and 3 more cell(s))" in err
    assert "skipped" not in stdout and len(runner.calls) == 4
    rc, stdout, err = cli(["compare", "-c", str(grid), "-o", str(out), "-t", "train.epochs=2", "--retrain-stale"],
                          capsys)
    assert rc == 0, err
    assert len(runner.calls) == 8 and stdout.count("retraining (stale: train.epochs: 1 -> 2)") == 4
    assert json.loads((out / "cells" / "unet-none-holdout-seed0" / "cell.json").read_text())[
        "config"]["train.epochs"] == 2
    # --overwrite retrains every cell even when fresh
    rc, stdout, _ = cli(["compare", "-c", str(grid), "-o", str(out), "-t", "train.epochs=2", "--overwrite"], capsys)
    assert rc == 0 and len(runner.calls) == 12 and stdout.count("retraining (--overwrite)") == 4


def test_block_typo_fails_before_the_first_cell_trains(tmp_path, monkeypatch, capsys):
    grid, out = write_grid(tmp_path, blocks="[none, scsee]"), tmp_path / "cmp"
    runner = fake_runner()
    monkeypatch.setattr(pl, "run_cell", runner)
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out)], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "blocks: unknown block 'scsee'" in err and "Did you mean 'scse'?" in err and str(grid) in err
    assert runner.calls == [] and not (out / "cells").exists()
    # a network that cannot be built for one cell (a bad per-block override) also fails before any training
    grid = write_grid(tmp_path)
    grid.write_text(grid.read_text() + "block_overrides: {scse: [model.attention_kwargs.reduction=0]}\n")
    rc, _, err = cli(["compare", "-c", str(grid), "-o", str(out)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "cell unet-scse-holdout-seed0" in err and str(grid) in err, err
    assert runner.calls == []


def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path):
    grid, out = write_grid(tmp_path), tmp_path / "cmp"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_compare_pairing import fake_runner
        from medse.compare import pipeline as pl
        from medse.cli import main
        inner = fake_runner()
        def slow(cell, cell_dir, cfg):
            time.sleep(0.5 if cell.cell_id.endswith("seed0") else 30)
            return inner(cell, cell_dir, cfg)
        pl.run_cell = slow
        sys.exit(main(sys.argv[1:]))
    """)
    cmd = [sys.executable, "-c", script, "compare", "-c", str(grid), "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list((out / "cells").glob("*/records.csv"))) < 2:
            time.sleep(0.05)
        time.sleep(0.3)  # inside the first seed-1 cell
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-2] == f"interrupted (SIGTERM): stopped at cell unet-none-holdout-seed1 (3 of 4) of {out}"
    assert lines[-1] == f"resume with: medse compare -c {grid} -o {out}"
    assert "Traceback" not in stderr
    done = sorted(p.parent.name for p in (out / "cells").glob("*/records.csv"))
    assert done == ["unet-none-holdout-seed0", "unet-scse-holdout-seed0"]
    assert not (out / "cells" / "unet-none-holdout-seed1" / "error.txt").exists()  # a stop is not a failure
    # the resume command continues from the finished cells
    runner = fake_runner()
    pl_report = pl.run_compare(grid, out, runner=runner, log=None)
    assert runner.calls == ["unet-none-holdout-seed1", "unet-scse-holdout-seed1"] and not pl_report.incomplete
