"""Comparison table from synthetic per-case records."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from medse.compare.records import ALL_LABELS, RUN_CASE, case_scores, cell_rows, load_records, validate_records
from medse.compare.table import build_table
from medse.utils.errors import MedseError

CASES = [f"case{i:02d}" for i in range(10)]
SHIFT = {"none": 0.0, "cse": 0.02, "scse": 0.05}
PARAMS = {"none": 1000, "cse": 1010, "scse": 1030}
STEP = {"none": 0.10, "cse": 0.11, "scse": 0.125}


def _dice(block: str, seed: int, i: int, label_value: int) -> float:
    # deterministic per-case values; label 2 is harder than label 1; seeds differ slightly
    return 0.6 + 0.02 * i + 0.05 * (label_value == 1) + SHIFT[block] * (1 + 0.1 * i) + 0.01 * seed


def make_records(archs=("unet",), blocks=("none", "cse", "scse"), seeds=(0, 1)) -> pd.DataFrame:
    frames = []
    for arch in archs:
        for block in blocks:
            for seed in seeds:
                ev = []
                for i, c in enumerate(CASES):
                    for name, lv in (("liver", 1), ("spleen", 2)):
                        ev.append({"case_id": c, "label": name, "label_value": lv, "metric": "dice",
                                   "value": _dice(block, seed, i, lv)})
                        ev.append({"case_id": c, "label": name, "label_value": lv, "metric": "hd95",
                                   "value": 3.0})
                frames.append(cell_rows(pd.DataFrame(ev), arch=arch, block=block, fold=0, seed=seed,
                                        params=PARAMS[block], train_step_s=STEP[block],
                                        infer_s={c: 0.5 if block == "none" else 0.55 for c in CASES},
                                        dataset="synthetic"))
    return pd.concat(frames, ignore_index=True)


def expected_case_fg(block: str) -> np.ndarray:
    return np.array([np.mean([np.mean([_dice(block, s, i, lv) for lv in (1, 2)]) for s in (0, 1)])
                     for i in range(len(CASES))])


def test_cell_rows_adds_run_level_rows():
    rec = make_records(blocks=("none",), seeds=(0,))
    assert set(rec.columns) >= {"arch", "block", "fold", "seed", "case_id", "label", "metric", "value", "dataset"}
    run = rec[rec["case_id"] == RUN_CASE]
    assert sorted(run["metric"]) == ["params", "train_step_s"]
    assert (rec[rec["metric"] == "infer_s"]["label"] == ALL_LABELS).all()
    assert len(rec[rec["metric"] == "dice"]) == 20


def test_case_scores_average_labels_then_runs():
    rec = make_records()
    sc = case_scores(rec)
    got = sc[(sc["block"] == "scse")].set_index("case_id")["value"].loc[CASES].to_numpy()
    np.testing.assert_allclose(got, expected_case_fg("scse"))
    liver = case_scores(rec, structure="liver")
    assert len(liver) == 30
    np.testing.assert_allclose(liver[liver["block"] == "none"]["value"].iloc[0],
                               np.mean([_dice("none", s, 0, 1) for s in (0, 1)]))


def test_table_values_statistics_and_overheads():
    from scipy import stats

    rec = make_records()
    t = build_table(rec, n_boot=2000, seed=0)
    rows = t.rows.set_index("block")
    assert list(t.rows["block"]) == ["none", "cse", "scse"]
    base, scse = expected_case_fg("none"), expected_case_fg("scse")
    assert rows.loc["scse", "dice_mean"] == pytest.approx(scse.mean())
    assert rows.loc["scse", "dice_std"] == pytest.approx(scse.std(ddof=1))
    assert rows.loc["scse", "gain_points"] == pytest.approx(100 * (scse - base).mean())
    assert rows.loc["scse", "gain_pct"] == pytest.approx(100 * (scse.mean() - base.mean()) / base.mean())
    # every case improves: exact two-sided p = 2/2**10; Holm over the 2 blocks doubles it
    p_raw = stats.wilcoxon(scse, base).pvalue
    assert rows.loc["scse", "p_value"] == pytest.approx(p_raw) == pytest.approx(2 / 1024)
    assert rows.loc["scse", "p_holm"] == pytest.approx(2 * p_raw)
    assert rows.loc["cse", "p_holm"] == pytest.approx(2 * rows.loc["cse", "p_value"])
    assert rows.loc["scse", "ci_low_points"] < rows.loc["scse", "gain_points"] < rows.loc["scse", "ci_high_points"]
    assert rows.loc["scse", "ci_low_points"] >= 100 * (scse - base).min() - 1e-9
    assert rows.loc["scse", "param_overhead_pct"] == pytest.approx(3.0)
    assert rows.loc["cse", "param_overhead_pct"] == pytest.approx(1.0)
    assert rows.loc["scse", "train_time_overhead_pct"] == pytest.approx(25.0)
    assert rows.loc["cse", "infer_time_overhead_pct"] == pytest.approx(10.0)
    assert rows.loc["none", "gain_points"] == 0.0 and math.isnan(rows.loc["none", "p_holm"])
    assert rows.loc["none", "n_cases"] == 10
    h = t.header
    assert h["dataset"] == "synthetic" and h["n_cases"] == 10 and h["seeds"] == [0, 1] and h["folds"] == [0]
    assert h["runs_per_cell"] == 2


def test_table_per_structure_rows():
    t = build_table(make_records(), structures=True, n_boot=500)
    assert list(t.rows["structure"].unique()) == ["foreground", "liver", "spleen"]
    liver = t.rows[(t.rows["structure"] == "liver") & (t.rows["block"] == "cse")].iloc[0]
    exp = np.array([np.mean([_dice("cse", s, i, 1) - _dice("none", s, i, 1) for s in (0, 1)]) for i in range(10)])
    assert liver["gain_points"] == pytest.approx(100 * exp.mean())
    md = t.to_markdown()
    assert "| Structure |" in md.replace("| Architecture | Block ", "")


def test_table_outputs_written(tmp_path):
    t = build_table(make_records(archs=("unet", "sdnet")), n_boot=500)
    paths = t.write(tmp_path)
    assert {p.name for p in paths.values()} == {"table.csv", "table.md", "table.tex", "table.json"}
    back = pd.read_csv(paths["csv"])
    assert len(back) == 6 and list(back["arch"].unique()) == ["unet", "sdnet"]
    md = paths["md"].read_text()
    assert "Dataset: synthetic; test cases: 10; folds: 0; seeds: 0, 1" in md
    assert "| unet | scse |" in md and "+3.00%" in md  # param overhead
    assert "Holm" in md and "bootstrap" in md
    tex = paths["tex"].read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "$\\pm$" in tex and "\\%" in tex
    assert tex.count("\\midrule") == 2  # header rule + one between architectures
    assert json.loads(paths["json"].read_text())["seeds"] == [0, 1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_table_missing_baseline_and_partial_pairs():
    rec = make_records(blocks=("none", "scse"), seeds=(0,))
    # drop 3 cases of the baseline: only 7 pairs remain
    drop = rec["case_id"].isin(CASES[:3]) & (rec["block"] == "none") & (rec["metric"] == "dice")
    t = build_table(rec[~drop], n_boot=200)
    scse = t.rows.set_index("block").loc["scse"]
    assert scse["n_cases"] == 7
    no_base = build_table(rec[rec["block"] == "scse"], n_boot=200)
    r = no_base.rows.iloc[0]
    assert math.isnan(r["gain_points"]) and math.isnan(r["p_holm"]) and r["dice_mean"] > 0
    assert "n/a" in no_base.to_markdown()


def test_records_errors(tmp_path):
    with pytest.raises(MedseError, match="lack column"):
        validate_records(pd.DataFrame({"arch": ["u"]}), "x.csv")
    with pytest.raises(MedseError, match="no per-case 'dice'"):
        build_table(make_records()[lambda d: d["metric"] != "dice"])
    bad = tmp_path / "records.csv"
    bad.write_text("")
    with pytest.raises(MedseError, match="records.csv"):
        load_records([bad])
    good = tmp_path / "ok.csv"
    make_records(blocks=("none",), seeds=(0,)).to_csv(good, index=False)
    back = load_records([good])
    assert back["case_id"].iloc[0] == "case00" and back["fold"].dtype.kind == "i"
