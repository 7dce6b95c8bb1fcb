"""``medse search``: the halving logic, config validation, a search with a stand-in cell runner (resume, shards,
the test-set independence check), and (slow) a real tiny search on the synthetic phantoms."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medse.compare.cell import Cell
from medse.compare.pipeline import CellKey, CompareConfig, cell_overrides
from medse.compare.records import cell_rows
from medse.compare.search import (
    OPTIMISM_NOTE,
    Rung,
    candidate_names,
    check_disjoint,
    halving_schedule,
    load_search,
    run_search,
    select_survivors,
)
from medse.utils.errors import MedseError

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ pure functions


def test_schedule_halves_candidates_and_multiplies_budgets() -> None:
    assert halving_schedule(4, 2, 1) == [Rung(0, 4, 1, 2), Rung(1, 2, 2, 1)]
    assert halving_schedule(9, 3, 2) == [Rung(0, 9, 2, 3), Rung(1, 3, 6, 1)]
    # 10 -> 3 -> 1 with eta 3; 27 -> 9 -> 3 -> 1
    assert [(r.n_candidates, r.budget, r.n_survivors) for r in halving_schedule(10, 3, 1)] == [(10, 1, 3), (3, 3, 1)]
    assert [r.n_candidates for r in halving_schedule(27, 3, 1)] == [27, 9, 3]
    assert [r.budget for r in halving_schedule(27, 3, 1)] == [1, 3, 9]
    assert [r.n_candidates for r in halving_schedule(5, 2, 1)] == [5, 2]
    assert halving_schedule(1, 3, 4) == []  # nothing to choose
    for bad in ((0, 2, 1), (4, 1, 1), (4, 2, 0)):
        with pytest.raises(ValueError):
            halving_schedule(*bad)


def test_survivors_best_first_nan_last_ties_in_space_order() -> None:
    scores = {"a": 0.5, "b": 0.7, "c": math.nan, "d": 0.6}
    assert select_survivors(scores, 2) == ["b", "d"]
    assert select_survivors(scores, 3) == ["b"]
    assert select_survivors(scores, 2, higher_is_better=False) == ["a", "d"]  # hd95 / assd: smaller wins
    assert select_survivors({"x": math.nan, "y": math.nan, "z": 0.1}, 3) == ["z"]
    assert select_survivors({"x": 0.5, "y": 0.5, "z": 0.5, "w": 0.5}, 2) == ["x", "y"]
    assert select_survivors({"only": 0.2}, 3) == ["only"]
    with pytest.raises(ValueError):
        select_survivors({}, 2)


def test_candidates_are_canonical_assignments() -> None:
    assert candidate_names(["encoder", "decoder"], ["none", "cse"]) == [
        "none", "decoder=cse", "encoder=cse", "encoder=cse,decoder=cse"]
    names = candidate_names(["decoder", "encoder"], ["none", "cse", "scse"])
    assert len(names) == 9 and names[0] == "none"
    assert "encoder=scse,decoder=cse" in names  # network order, whatever the order of positions


def test_disjointness_check_names_the_step() -> None:
    check_disjoint({"rung0/a": ["c3", "c4"], "rung1/a": ["c5"]}, ["c0", "c1"])
    with pytest.raises(MedseError, match=r"\['c1'\] were also used by rung1/a"):
        check_disjoint({"rung0/a": ["c3"], "rung1/a": ["c1", "c5"]}, ["c0", "c1"])
    with pytest.raises(MedseError, match="no test cases"):
        check_disjoint(["c3"], [])


# ------------------------------------------------------------------ config validation


def write_search(tmp_path: Path, **extra: str) -> Path:
    (tmp_path / "train.yaml").write_text("model:\n  name: unet\n")
    body = {"name": "s", "train_config": "train.yaml", "architecture": "unet",
            "space": "{positions: [encoder, decoder], blocks: [none, cse]}", "eta": "2", "min_budget": "1"}
    body.update(extra)
    p = tmp_path / "search.yaml"
    p.write_text("".join(f"{k}: {v}\n" for k, v in body.items()))
    return p


def test_load_search_defaults(tmp_path: Path) -> None:
    cfg = load_search(write_search(tmp_path))
    assert cfg.arch.name == "unet" and cfg.baseline == "none"
    assert cfg.candidates() == ["none", "decoder=cse", "encoder=cse", "encoder=cse,decoder=cse"]
    assert cfg.final_budget_value() == 2  # the last rung's budget
    # the architecture defaults to the training config's model
    p = write_search(tmp_path)
    p.write_text("\n".join(line for line in p.read_text().splitlines() if not line.startswith("architecture")))
    assert load_search(p).arch.name == "unet"


def test_shipped_search_demo_loads() -> None:
    cfg = load_search(REPO / "pipelines" / "search_demo.yaml")
    assert len(cfg.candidates()) == 9 and cfg.arch.name == "unet"
    assert [(r.n_candidates, r.budget, r.n_survivors) for r in cfg.schedule()] == [(9, 4, 3), (3, 12, 1)]
    assert cfg.final_budget_value() == 12


@pytest.mark.parametrize("key, value, message", [
    ("space", "{positions: [encoder, decodr], blocks: [none, cse]}", "unknown attention position 'decodr'"),
    ("space", "{positions: [tokens], blocks: [none, cse]}", "unknown attention position 'tokens'"),
    ("space", "{positions: [encoder], blocks: [none, cse, sce]}", "unknown block 'sce'"),
    ("space", "{positions: [encoder], blocks: [none, cse, cse]}", "lists ['cse'] more than once"),
    ("eta", "1", "eta must be an integer >= 2"),
    ("min_budget", "0", "min_budget must be >= 1"),
    ("budget_key", "train.lr", "budget_key must be"),
    ("baseline", "scse", "baseline 'scse' is not in the search space"),
    ("architecture", "unett", "unknown network 'unett'"),
    ("spaces", "1", "unknown config key 'spaces'"),
])
def test_bad_config_is_a_one_line_error(tmp_path: Path, key: str, value: str, message: str) -> None:
    p = write_search(tmp_path, **{key: value})
    with pytest.raises(MedseError) as e:
        load_search(p)
    text = str(e.value)
    assert message in text and "\n" not in text and str(p) in text
    if "position" in message:
        assert "positions encoder, bottleneck, decoder" in text  # lists the network's positions


def test_cli_unknown_position_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    p = write_search(tmp_path, space="{positions: [encoder, middle], blocks: [none, cse]}")
    res = subprocess.run([sys.executable, "-m", "medse", "search", "--config", str(p), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert res.returncode == 2, res.stderr
    err = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "unknown attention position 'middle'" in err[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ a search with a stand-in runner

CASES = [f"c{i}" for i in range(10)]
SPLIT = {"train": CASES[6:], "val": CASES[3:6], "test": CASES[:3]}
# validation Dice per candidate at budget 1 and 2: encoder=cse leads rung 0, but encoder=cse,decoder=cse wins rung 1
SCORE = {1: {"none": 0.50, "decoder=cse": 0.55, "encoder=cse": 0.60, "encoder=cse,decoder=cse": 0.58},
         2: {"encoder=cse": 0.62, "encoder=cse,decoder=cse": 0.66, "none": 0.52}}


class FakeRunner:
    """Stands in for train + predict + evaluate: writes the run's split, returns records of the evaluated cases."""

    def __init__(self, split: dict[str, list[str]] | None = None, score: dict | None = None) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.split = split or SPLIT
        self.score = score or SCORE

    def __call__(self, cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        ov = cell_overrides(cfg, cell)
        budget = int(next(o for o in reversed(ov) if o.startswith("train.epochs=")).split("=")[1])
        assert f"model.attention={cell.block}" in ov
        self.calls.append((cfg.evaluate_on, cell.block, budget))
        (cell_dir / "run").mkdir(parents=True, exist_ok=True)
        (cell_dir / "run" / "splits.json").write_text(json.dumps(self.split))
        origin = cell_dir / "run" / "origin.txt"  # which stage "trained" the run
        if not origin.is_file():
            origin.write_text(cfg.name)
        cases = self.split[cfg.evaluate_on]
        base = self.score[budget][cell.block] if cfg.evaluate_on == "val" else self.score[2][cell.block]
        ev = pd.DataFrame([{"case_id": c, "label": "fg", "label_value": 1, "metric": "dice",
                            "value": base + 0.01 * (i - 1)} for i, c in enumerate(cases)])
        return cell_rows(ev, arch=cell.arch, block=cell.block, fold=cell.fold, seed=cell.seed, params=100,
                         train_step_s=0.1, infer_s={c: 0.1 for c in cases}, dataset="fake")


def test_search_halves_scores_on_test_and_reports(tmp_path: Path) -> None:
    p = write_search(tmp_path, table="{n_boot: 200}", figures="false")
    runner = FakeRunner()
    out = tmp_path / "out"
    rep = run_search(p, out, runner=runner, log=None)
    assert rep.status == "done" and rep.winner == "encoder=cse,decoder=cse"
    # rung 0: 4 candidates at budget 1; rung 1: the best 2 at budget 2; final: baseline + winner at budget 2, test
    assert sorted(runner.calls) == sorted(
        [("val", c, 1) for c in SCORE[1]] + [("val", "encoder=cse", 2), ("val", "encoder=cse,decoder=cse", 2)]
        + [("test", "none", 2), ("test", "encoder=cse,decoder=cse", 2)])
    d0 = json.loads((out / "rung0" / "decision.json").read_text())
    assert d0["survivors"] == ["encoder=cse", "encoder=cse,decoder=cse"] and d0["budget"] == 1
    assert d0["scores"]["none"]["n"] == 3 and d0["scores"]["none"]["mean"] == pytest.approx(0.50)
    js = json.loads((out / "report.json").read_text())
    by = {r["candidate"]: r for r in js["candidates"]}
    assert set(by) == set(SCORE[1])
    assert by["none"]["status"] == "eliminated" and by["none"]["rung"] == 0 and by["none"]["budget"] == 1
    assert by["encoder=cse"]["status"] == "eliminated" and by["encoder=cse"]["rung"] == 1
    assert by["encoder=cse"]["val_mean"] == pytest.approx(0.62) and len(by["encoder=cse"]["scores"]) == 2
    assert by["encoder=cse,decoder=cse"]["status"] == "winner" and by["encoder=cse,decoder=cse"]["budget"] == 2
    # the test set: exactly the split's test cases, none of them used by any selection step
    assert js["test_cases"] == SPLIT["test"]
    assert not set(js["test_cases"]) & set(js["selection_cases"])
    assert set(js["selection_cases"]) == set(SPLIT["train"]) | set(SPLIT["val"])
    # the winner's final run is its last-rung run (same budget and seed), copied rather than retrained
    assert js["reused"] == ["unet-encoder=cse,decoder=cse-holdout-seed0"]
    final_cells = out / "final" / "cells"
    assert (final_cells / js["reused"][0] / "run" / "origin.txt").read_text() == "s-rung1"
    assert (final_cells / "unet-none-holdout-seed0" / "run" / "origin.txt").read_text() == "s-final"
    assert "the last rung's runs, reused rather than retrained" in (out / "report.md").read_text()
    table = pd.read_csv(out / "final" / "table.csv")
    assert list(table["block"]) == ["none", "encoder=cse,decoder=cse"]
    win = table.set_index("block").loc["encoder=cse,decoder=cse"]
    assert win["n_cases"] == 3 and win["gain"] == pytest.approx(100 * (0.66 - 0.52))
    md = (out / "report.md").read_text()
    assert OPTIMISM_NOTE in md and "optimistic" in md
    for c in SCORE[1]:
        assert f"| {c} |" in md
    assert "| encoder=cse,decoder=cse | 1 | 2 | 0.5800 | 0.6600 | 0.0100 | 3 | winner |" in md
    assert "| none | 0 | 1 | 0.5000 | - | 0.0100 | 3 | eliminated |" in md
    assert "Paired statistics" in md and "| unet | encoder=cse,decoder=cse |" in md

    # a rerun needs --resume, then skips everything
    with pytest.raises(MedseError, match="pass --resume"):
        run_search(p, out, runner=runner, log=None)
    again = FakeRunner()
    rep2 = run_search(p, out, runner=again, resume=True, log=None)
    assert rep2.status == "done" and rep2.winner == rep.winner and again.calls == []
    # a changed search is refused rather than mixed with the stored decisions
    with pytest.raises(MedseError, match=r"differs from this config in \['eta'\]"):
        run_search(p, out, runner=again, resume=True, overrides=["eta=3"], log=None)


def test_when_the_baseline_wins_the_runner_up_is_scored_for_reference(tmp_path: Path) -> None:
    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    score = {1: {"none": 0.60, "decoder=cse": 0.55, "encoder=cse": 0.58, "encoder=cse,decoder=cse": 0.50},
             2: {"none": 0.70, "encoder=cse": 0.65, "decoder=cse": 0.5, "encoder=cse,decoder=cse": 0.5}}
    rep = run_search(p, tmp_path / "out", runner=FakeRunner(score=score), log=None)
    assert rep.status == "done" and rep.winner == "none" and rep.runner_up == "encoder=cse"
    table = pd.read_csv(tmp_path / "out" / "final" / "table.csv")
    assert list(table["block"]) == ["none", "encoder=cse"]
    assert table.set_index("block").loc["encoder=cse", "gain"] == pytest.approx(-5.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "The search chose the baseline itself" in md and "`encoder=cse` (not the search's choice)" in md


def test_resume_continues_a_killed_rung(tmp_path: Path) -> None:
    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    out = tmp_path / "out"
    first = FakeRunner()
    rep = run_search(p, out, runner=first, log=None)
    # pretend the search was killed in rung 1: one rung-1 cell and everything after it are gone
    import shutil

    shutil.rmtree(out / "rung1" / "cells" / "unet-encoder=cse-holdout-seed0")
    (out / "rung1" / "decision.json").unlink()
    shutil.rmtree(out / "final")
    again = FakeRunner()
    rep2 = run_search(p, out, runner=again, resume=True, log=None)
    assert rep2.winner == rep.winner
    assert sorted(again.calls) == sorted([("val", "encoder=cse", 2), ("test", "none", 2),
                                          ("test", "encoder=cse,decoder=cse", 2)])


def test_shards_wait_for_each_other(tmp_path: Path) -> None:
    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    out = tmp_path / "out"
    r0 = FakeRunner()
    rep = run_search(p, out, shard="0/2", runner=r0, log=None)
    assert rep.status == "waiting" and "other shards" in rep.message
    assert len(r0.calls) == 2 and not (out / "rung0" / "decision.json").exists()
    r1 = FakeRunner()
    rep = run_search(p, out, shard="1/2", runner=r1, log=None)  # finishes rung 0, runs its half of rung 1
    assert rep.status == "waiting" and (out / "rung0" / "decision.json").is_file()
    rep = run_search(p, out, shard="0/2", runner=r0, log=None)
    rep = run_search(p, out, shard="1/2", runner=r1, log=None)
    assert rep.status == "done" and rep.winner == "encoder=cse,decoder=cse"
    calls = r0.calls + r1.calls
    assert len(calls) == len(set(calls)) == 8  # every cell ran once, in one of the shards


def test_a_test_case_seen_by_selection_is_refused(tmp_path: Path) -> None:
    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    leaky = FakeRunner(split={"train": CASES[6:], "val": CASES[2:6], "test": CASES[:3]})  # c2 in val and test
    with pytest.raises(MedseError, match=r"\['c2'\] were also used by rung"):
        run_search(p, tmp_path / "out", runner=leaky, log=None)


def test_failed_candidate_stops_the_search_and_is_retried(tmp_path: Path) -> None:
    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    out = tmp_path / "out"

    class Failing(FakeRunner):
        def __call__(self, cell, cell_dir, cfg):  # type: ignore[override]
            if cell.block == "decoder=cse":
                raise RuntimeError("out of memory")
            return super().__call__(cell, cell_dir, cfg)

    rep = run_search(p, out, runner=Failing(), log=None)
    assert rep.status == "failed" and "unet-decoder=cse-holdout-seed0" in rep.message
    assert any("out of memory" in v for v in rep.failed.values())
    assert not (out / "rung0" / "decision.json").exists()
    again = FakeRunner()
    rep = run_search(p, out, runner=again, resume=True, log=None)
    assert rep.status == "done" and again.calls[0] == ("val", "decoder=cse", 1)


# ------------------------------------------------------------------ real training (slow)

TRAIN = """
data:
  split: {kind: holdout, val_fraction: 0.25, test_fraction: 0.375, seed: 0}
model:
  name: unet
  kwargs: {channels: [4, 8, 16], strides: [2, 2]}
train:
  epochs: 1
  iterations_per_epoch: 2
  batch_size: 1
  patch_size: [16, 16, 16]
  device: cpu
  tensorboard: false
  val_every: 1
  num_threads: 1
"""


@pytest.mark.slow
def test_tiny_search_on_phantoms(tmp_path: Path) -> None:
    pytest.importorskip("medse.training")
    (tmp_path / "train.yaml").write_text(TRAIN)
    p = tmp_path / "search.yaml"
    p.write_text("name: tiny\ndataset: tiny phantoms\ntrain_config: train.yaml\narchitecture: unet\n"
                 "synthetic: {n_cases: 8, size: 20, seed: 0}\n"
                 "space: {positions: [encoder, decoder], blocks: [none, cse]}\n"
                 "eta: 2\nmin_budget: 1\nbudget_key: train.iterations_per_epoch\n"
                 "figures: false\ntable: {n_boot: 200}\n")
    out = tmp_path / "out"
    rep = run_search(p, out, log=None)
    assert rep.status == "done", (rep.message, rep.failed)
    assert rep.winner in candidate_names(["encoder", "decoder"], ["none", "cse"])
    js = json.loads((out / "report.json").read_text())
    assert len(js["candidates"]) == 4 and {r["rung"] for r in js["candidates"]} == {0, 1}
    assert all(r["val_n"] == 2 and r["val_mean"] is not None for r in js["candidates"])
    # the budget reached the runs: rung 0 trained 1 iteration per epoch, rung 1 two
    for rung, budget in ((0, 1), (1, 2)):
        for cfg_path in (out / f"rung{rung}" / "cells").glob("*/run/config.yaml"):
            import yaml

            assert yaml.safe_load(cfg_path.read_text())["train"]["iterations_per_epoch"] == budget
    # independence: every case any rung run trained or validated on is disjoint from the scored test cases
    seen: set[str] = set()
    for sp in out.glob("rung*/cells/*/run/splits.json"):
        s = json.loads(sp.read_text())
        seen |= set(s["train"]) | set(s["val"])
    records = pd.concat(pd.read_csv(r, dtype={"case_id": str}) for r in (out / "final" / "cells").glob("*/records.csv"))
    scored = set(records.loc[records["metric"] == "dice", "case_id"])
    assert len(scored) == 3 and seen and not scored & seen
    assert sorted(scored) == js["test_cases"]
    assert len(seen) == 5 and len(seen | scored) == 8
    md = (out / "report.md").read_text()
    assert "optimistic" in md and "| unet |" in md and np.isfinite(js["candidates"][0]["val_mean"])
    # the winner's test-set model is its last-rung run (same checkpoint), the baseline's too when it was there
    final_blocks = {"none", rep.winner, rep.runner_up} - {None}  # the runner-up is scored when none wins
    assert js["reused"] and all(c.split("-")[1] in final_blocks for c in js["reused"])
    assert rep.winner != "none" or rep.runner_up in candidate_names(["encoder", "decoder"], ["none", "cse"])
    for cid in js["reused"]:
        a = (out / "rung1" / "cells" / cid / "run" / "checkpoints" / "best.pt").read_bytes()
        assert (out / "final" / "cells" / cid / "run" / "checkpoints" / "best.pt").read_bytes() == a
    # rerun with --resume trains nothing
    lines: list[str] = []
    run_search(p, out, resume=True, log=lines.append)
    assert not any(": running" in line for line in lines)


# ------------------------------------------------------------------ fresh cells, incomplete tables, interruptions


def test_stale_candidates_are_refused_naming_the_key_then_retrained(tmp_path: Path, monkeypatch, capsys) -> None:
    from medse.cli import main
    from medse.compare import pipeline as pl

    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    out = tmp_path / "out"
    runner = FakeRunner()
    monkeypatch.setattr(pl, "run_cell", runner)
    args = ["search", "-c", str(p), "-o", str(out)]
    assert main([*args, "-t", "train.lr=0.01"]) == 0
    n = len(runner.calls)
    capsys.readouterr()
    assert main([*args, "--resume", "-t", "train.lr=0.02"]) == 2  # the decisions rest on lr 0.01
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lr: 0.01 -> 0.02" in err and "--retrain-stale" in err, err
    assert len(runner.calls) == n
    assert main([*args, "--resume", "-t", "train.lr=0.02", "--retrain-stale"]) == 0
    assert len(runner.calls) == 2 * n  # every rung and the test set again (the copied last-rung run included)
    stamp = json.loads((out / "rung0" / "cells" / "unet-none-holdout-seed0" / "cell.json").read_text())
    assert stamp["config"]["train.lr"] == 0.02


def test_incomplete_test_table_exits_1_unless_allowed(tmp_path: Path, monkeypatch, capsys) -> None:
    from medse.cli import main
    from medse.compare import pipeline as pl

    inner = FakeRunner()

    def runner(cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        rec = inner(cell, cell_dir, cfg)
        if cfg.evaluate_on == "test" and cell.block == "none":  # c1 failed to evaluate for the baseline
            rec = rec[~((rec["case_id"] == "c1") & (rec["metric"] == "dice"))]
        return rec

    monkeypatch.setattr(pl, "run_cell", runner)
    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    out = tmp_path / "out"
    assert main(["search", "-c", str(p), "-o", str(out)]) == 1
    captured = capsys.readouterr().out
    assert "incomplete: winner encoder=cse,decoder=cse" in captured and "case c1 not scored for none" in captured
    assert "## Incomplete test-set table" in (out / "report.md").read_text()
    assert main(["search", "-c", str(p), "-o", str(out), "--resume", "--allow-incomplete"]) == 0
    assert json.loads((out / "report.json").read_text())["status"] == "done"


def test_interrupted_search_names_the_cell_and_the_resume_command(tmp_path: Path) -> None:
    from medse.utils.interrupt import Interrupted

    p = write_search(tmp_path, table="{n_boot: 100}", figures="false")
    out = tmp_path / "out"
    inner = FakeRunner()

    def runner(cell: CellKey, cell_dir: Cell, cfg: CompareConfig) -> pd.DataFrame:
        if cfg.name.endswith("rung1"):
            raise KeyboardInterrupt
        return inner(cell, cell_dir, cfg)

    with pytest.raises(Interrupted) as e:
        run_search(p, out, runner=runner, log=None, train_overrides=["train.lr=0.01"])
    assert e.value.where.startswith("cell unet-encoder=cse-holdout-seed0 (1 of 2) of ") and "rung1" in e.value.where
    assert e.value.resume == f"medse search -c {p} -o {out} --resume -t train.lr=0.01"
    again = FakeRunner()
    rep = run_search(p, out, runner=again, resume=True, log=None, train_overrides=["train.lr=0.01"])
    assert rep.status == "done" and all(c[0] == "test" or c[2] == 2 for c in again.calls)  # rung 0 is reused
