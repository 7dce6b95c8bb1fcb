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
    assert rows.loc["scse", "mean"] == pytest.approx(scse.mean())
    assert rows.loc["scse", "std"] == pytest.approx(scse.std(ddof=1))
    assert rows.loc["scse", "gain"] == pytest.approx(100 * (scse - base).mean())
    assert rows.loc["scse", "gain_pct"] == pytest.approx(100 * (scse.mean() - base.mean()) / base.mean())
    # every case improves: exact two-sided p = 2/2**10; Holm over the 2 blocks doubles it
    p_raw = stats.wilcoxon(scse, base).pvalue
    assert rows.loc["scse", "p_value"] == pytest.approx(p_raw) == pytest.approx(2 / 1024)
    assert rows.loc["scse", "p_holm"] == pytest.approx(2 * p_raw)
    assert rows.loc["cse", "p_holm"] == pytest.approx(2 * rows.loc["cse", "p_value"])
    assert rows.loc["scse", "ci_low"] < rows.loc["scse", "gain"] < rows.loc["scse", "ci_high"]
    assert rows.loc["scse", "ci_low"] >= 100 * (scse - base).min() - 1e-9
    assert rows.loc["scse", "param_overhead_pct"] == pytest.approx(3.0)
    assert rows.loc["cse", "param_overhead_pct"] == pytest.approx(1.0)
    # training step: one mean per run, 2 paired runs < MIN_TIMING_N measurements -> computed but not shown
    assert rows.loc["scse", "train_time_overhead_pct"] == pytest.approx(25.0)
    assert rows.loc["scse", "train_time_n"] == 2 and "needs >= 5" in rows.loc["scse", "train_time_note"]
    # inference: 10 cases x 2 runs paired measurements, all exactly +10%: shown, IQR 0
    assert rows.loc["cse", "infer_time_overhead_pct"] == pytest.approx(10.0)
    assert rows.loc["cse", "infer_time_n"] == 20 and rows.loc["cse", "infer_time_note"] == ""
    assert rows.loc["none", "gain"] == 0.0 and math.isnan(rows.loc["none", "p_holm"])
    assert rows.loc["none", "n_cases"] == 10
    h = t.header
    assert h["dataset"] == "synthetic" and h["n_cases"] == 10 and h["seeds"] == [0, 1] and h["folds"] == [0]
    assert h["runs_per_cell"] == 2


def test_table_per_structure_rows():
    t = build_table(make_records(), structures=True, n_boot=500)
    assert list(t.rows["structure"].unique()) == ["foreground", "liver", "spleen"]
    liver = t.rows[(t.rows["structure"] == "liver") & (t.rows["block"] == "cse")].iloc[0]
    exp = np.array([np.mean([_dice("cse", s, i, 1) - _dice("none", s, i, 1) for s in (0, 1)]) for i in range(10)])
    assert liver["gain"] == pytest.approx(100 * exp.mean())
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
    assert "+10.0% [+10.0, +10.0]" in md and "n/a (2 measurements from 2 paired runs" in md
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
    with pytest.warns(UserWarning, match="3 case"):
        t = build_table(rec[~drop], n_boot=200)
    rows = t.rows.set_index("block")
    scse, none = rows.loc["scse"], rows.loc["none"]
    assert scse["n_cases"] == 7 and none["n_cases"] == 7 and scse["n_unmatched"] == 3
    # every figure of the row rests on the 7 paired cases: mean, std, gain, p
    kept = np.array(CASES[3:])
    sc = case_scores(rec[~drop])
    x = sc[sc.block == "none"].set_index("case_id").value.loc[kept].to_numpy()
    y = sc[sc.block == "scse"].set_index("case_id").value.loc[kept].to_numpy()
    assert scse["mean"] == pytest.approx(y.mean()) and scse["std"] == pytest.approx(y.std(ddof=1))
    assert none["mean"] == pytest.approx(x.mean()) and none["std"] == pytest.approx(x.std(ddof=1))
    assert scse["gain"] == pytest.approx(100 * (scse["mean"] - none["mean"]))
    assert t.header["unmatched"] == [f"unet: case {c} not scored for none" for c in CASES[:3]]
    assert "Unmatched cases, left out of the paired comparison: unet: case case00 not scored for none" in \
        t.to_markdown()
    no_base = build_table(rec[rec["block"] == "scse"], n_boot=200)
    r = no_base.rows.iloc[0]
    assert math.isnan(r["gain"]) and math.isnan(r["p_holm"]) and r["mean"] > 0
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


def test_row_mean_and_gain_agree_when_the_block_lacks_cases():
    rec = make_records(blocks=("none", "scse"), seeds=(0,))
    # scse lacks its three best cases: with all-case means it showed a lower mean than none and a positive gain
    drop = rec["case_id"].isin(CASES[7:]) & (rec["block"] == "scse") & (rec["metric"] == "dice")
    with pytest.warns(UserWarning, match="left out"):
        t = build_table(rec[~drop], n_boot=200)
    rows = t.rows.set_index("block")
    assert (rows["n_cases"] == 7).all()
    assert rows.loc["scse", "gain"] > 0 and rows.loc["scse", "mean"] > rows.loc["none", "mean"]
    assert rows.loc["scse", "gain"] == pytest.approx(100 * (rows.loc["scse", "mean"] - rows.loc["none", "mean"]))


def _distance_records(missed_value: float) -> pd.DataFrame:
    """hd95 records: scse is 0.5 mm closer on every case; case03's 'spleen' is missed by none (worst value)."""
    frames = []
    for block, delta in (("none", 0.0), ("scse", -0.5)):
        ev = []
        for i, c in enumerate(CASES):
            for name, lv in (("liver", 1), ("spleen", 2)):
                v = 4.0 + 0.1 * i + delta
                if block == "none" and c == "case03" and name == "spleen":
                    v = missed_value
                ev.append({"case_id": c, "label": name, "label_value": lv, "metric": "hd95", "value": v})
        frames.append(cell_rows(pd.DataFrame(ev), arch="unet", block=block, fold=0, seed=0, params=1))
    return pd.concat(frames, ignore_index=True)


def test_distance_tables_lower_is_better_in_mm_and_missed_structures_count():
    t = build_table(_distance_records(missed_value=55.4), metric="hd95", n_boot=500)
    scse = t.rows.set_index("block").loc["scse"]
    per_case_none = np.array([4.0 + 0.1 * i for i in range(10)])
    per_case_none[3] = (4.3 + 55.4) / 2  # the worst value of the missed structure is in the mean
    per_case_scse = np.array([3.5 + 0.1 * i for i in range(10)])
    assert scse["n_cases"] == 10
    assert scse["mean"] == pytest.approx(per_case_scse.mean())
    assert t.rows.set_index("block").loc["none", "mean"] == pytest.approx(per_case_none.mean())
    # gain = improvement = baseline - block in mm (no x100), positive because scse is closer
    assert scse["gain"] == pytest.approx((per_case_none - per_case_scse).mean())
    assert scse["gain_pct"] == pytest.approx(100 * (per_case_none.mean() - per_case_scse.mean()) / per_case_none.mean())
    assert scse["ci_low"] > 0
    md = t.to_markdown()
    assert "| HD95 (mm) (mean ± std) | Gain (mm) |" in md and "95% CI (mm)" in md and "points" not in md
    assert "baseline - block (lower is better)" in md and "worst distance" in md
    assert t.header["higher_is_better"] is False and t.header["gain_unit"] == "mm"
    # a NaN distance (older evaluations) is not averaged over the other label: the case becomes unmatched
    with pytest.warns(UserWarning, match="case03"):
        nan_t = build_table(_distance_records(missed_value=float("nan")), metric="hd95", n_boot=100)
    assert (nan_t.rows["n_cases"] == 9).all() and nan_t.header["unmatched"] == ["unet: case case03 not scored for none"]
    with pytest.raises(MedseError, match="not one of dice, hd95, assd"):
        build_table(_distance_records(1.0), metric="volume_diff_mm3")


def test_timing_overhead_rule():
    from medse.compare.table import timing_overhead

    steady = [(1.0, 1.2 + 0.01 * (i % 3)) for i in range(8)]
    t = timing_overhead(steady, n_runs=2)
    assert t.shown and t.median == pytest.approx(21.0) and t.n == 8 and t.note == ""
    noisy = [(1.0, v) for v in (0.6, 1.5, 0.8, 1.3, 0.7, 1.4)]  # median +5%, IQR ~60%
    nt = timing_overhead(noisy, n_runs=3)
    assert not nt.shown and nt.note.startswith("n/a (below noise: IQR") and "effect" in nt.note
    one_run = timing_overhead(steady, n_runs=1)  # between-run noise unmeasured
    assert not one_run.shown and "from 1 paired run;" in one_run.note
    few = timing_overhead(steady[:4], n_runs=4)
    assert not few.shown and "4 measurements" in few.note
    assert timing_overhead([], 0).note == "n/a (not measured)"


def test_noisy_single_run_inference_timing_is_not_printed():
    rec = make_records(blocks=("none", "scse"), seeds=(0,))
    rng = np.random.default_rng(0)
    noisy = rec["metric"] == "infer_s"
    rec.loc[noisy, "value"] = rng.uniform(0.5, 1.5, int(noisy.sum()))  # ~1 s per case, pure noise
    t = build_table(rec, n_boot=100)
    scse = t.rows.set_index("block").loc["scse"]
    assert scse["infer_time_note"].startswith("n/a (10 measurements from 1 paired run")
    md_row = next(line for line in t.to_markdown().splitlines() if line.startswith("| unet | scse |"))
    assert md_row.rstrip(" |").endswith("needs >= 5 from >= 2 runs)")
    assert "%" not in md_row.split("|")[-2]  # the inference column prints no percentage
