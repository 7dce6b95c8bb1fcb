"""medse inside nnU-Net v2: derived plans on plans made by nnU-Net itself, compare, and the CPU end-to-end run.

A tiny synthetic dataset (6 cases of 24^3) is written in nnU-Net's raw layout and planned + preprocessed by
``nnUNetv2_plan_and_preprocess`` (default planner) and ``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM`` once
per session. Needs nnunetv2 (``make setup-nnunet``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

from medse.cli import main  # noqa: E402

pytestmark = pytest.mark.nnunet

DATASET_ID = 517
DATASET = f"Dataset{DATASET_ID}_MedseTiny"
BIN = Path(sys.executable).parent


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               nnUNet_compile="f")
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({res.returncode}); tail of {log}:\n" + log.read_text()[-3000:])


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raw/ + pre/ (plans by nnU-Net's default and ResEnc M planners, 3d_fullres preprocessed) + res/."""
    from medse.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("nnunet")
    generate_dataset(root / "raw" / DATASET, n_cases=6, size=24, seed=0, layout="nnunet", anisotropy=False,
                     oblique=False)
    (root / "res").mkdir()
    env = _env(root)
    log = root / "plan.log"
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
          "-npfp", "1"], env, log)
    _run([str(BIN / "nnUNetv2_plan_experiment"), "-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM"], env, log)
    return root


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("source,expected_class", [
    ("nnUNetPlans", "AttentionPlainConvUNet"),
    ("nnUNetResEncUNetMPlans", "AttentionResidualEncoderUNet"),
])
def test_plans_derived_from_nnunet_plans_build_medse_networks(
    nnunet_root: Path, source: str, expected_class: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medse.networks.registry import attention_modules

    folder = nnunet_root / "pre" / DATASET
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_root / "pre"))
    original = (folder / f"{source}.json").read_bytes()
    rc, out, err = _cli(["nnunet", "plans", str(DATASET_ID), "--attention", "scse,eca+ca", "--plans", source], capsys)
    assert rc == 0, err
    assert (folder / f"{source}.json").read_bytes() == original  # never changed
    src = json.loads(original)
    for block, n_parts in (("scse", 1), ("eca+ca", 2)):
        path = folder / f"{source}_medse_{block}.json"
        assert f"wrote {path}" in out
        assert f"nnUNetv2_train {DATASET_ID} 3d_fullres FOLD -p {source}_medse_{block}" in out
        assert f"-p {source}_medse_{block} -f 0 1 2 3 4" in out  # the predict command
        derived = json.loads(path.read_text())
        assert derived["plans_name"] == f"{source}_medse_{block}"
        cfg = derived["configurations"]["3d_fullres"]
        assert cfg["data_identifier"] == src["configurations"]["3d_fullres"]["data_identifier"]
        arch = cfg["architecture"]
        assert arch["network_class_name"] == f"medse.integrations.nnunet.{expected_class}"
        src_kwargs = src["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        assert {k: arch["arch_kwargs"][k] for k in src_kwargs} == src_kwargs
        assert arch["arch_kwargs"]["attention"] == block
        # everything else identical to nnU-Net's plans
        assert {k: v for k, v in derived.items() if k not in ("plans_name", "configurations", "medse")} == \
            {k: v for k, v in src.items() if k not in ("plans_name", "configurations")}

        pm = PlansManager(str(path))
        cm = pm.get_configuration("3d_fullres")
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 7, deep_supervision=True)
        assert type(net).__name__ == expected_class
        n_stages = cm.network_arch_init_kwargs["n_stages"]
        mods = attention_modules(net)
        assert len(mods) == 2 * n_stages - 1
        if n_parts == 2:
            assert all(len(m) == 2 for m in mods)  # eca then ca
        with torch.no_grad():
            y = net(torch.randn(1, 1, *cm.patch_size))
        assert y[0].shape == (1, 7, *cm.patch_size)
        assert net.compute_conv_feature_map_size(cm.patch_size) > 0


def test_plans_positions_and_reduction(nnunet_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pre = nnunet_root / "pre"
    rc, out, err = _cli(["nnunet", "plans", DATASET, "-a", "cse", "--positions", "decoder", "--reduction", "4",
                         "--preprocessed", str(pre)], capsys)
    assert rc == 0, err
    kw = json.loads((pre / DATASET / "nnUNetPlans_medse_cse.json").read_text())[
        "configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kw["attention_positions"] == ["decoder"] and kw["attention_kwargs"] == {"reduction": 4}
    # a block per position
    rc, out, err = _cli(["nnunet", "plans", DATASET, "-a", "encoder=eca/decoder=scse", "--preprocessed", str(pre)],
                        capsys)
    assert rc == 0, err
    path = pre / DATASET / "nnUNetPlans_medse_enc-eca_dec-scse.json"
    kw = json.loads(path.read_text())["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kw["attention"] == {"encoder": "eca", "decoder": "scse"}
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(str(path)).get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 7, deep_supervision=False)
    assert type(net.encoder_attention[0]).__name__ == "ECA" and type(net.decoder_attention[0]).__name__ == "SCSE"
    assert type(net.bottleneck_attention).__name__ == "Identity"
    rc, _, err = _cli(["nnunet", "plans", DATASET, "-a", "encoder=eca/decoder", "--preprocessed", str(pre)], capsys)
    assert rc == 2 and "position=block" in err


@pytest.mark.parametrize("args,message", [
    (["-a", "scse,nope"], "unknown attention block 'nope'"),
    (["-a", "scse", "-c", "3d_fulres"], "unknown configuration '3d_fulres'. Did you mean '3d_fullres'?"),
    (["-a", "scse", "-p", "nnUNetPlanz"], "no plans file 'nnUNetPlanz.json'"),
    (["-a", "scse", "--positions", "middle"], "unknown attention position 'middle'"),
    (["-a", "none"], "'none' needs no derived plans"),
    (["-a", "pe", "-c", "2d"], "block 'pe' supports 3D only, the configuration is 2D"),
])
def test_plans_errors_are_one_line_and_write_nothing(
    nnunet_root: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    pre = nnunet_root / "pre"
    before = sorted(p.name for p in (pre / DATASET).iterdir())
    rc, out, err = _cli(["nnunet", "plans", str(DATASET_ID), *args, "--preprocessed", str(pre)], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert DATASET in err  # names the file / folder
    assert sorted(p.name for p in (pre / DATASET).iterdir()) == before


def test_plans_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pre").mkdir()
    rc, _, err = _cli(["nnunet", "plans", "999", "-a", "scse", "--preprocessed", str(tmp_path / "pre")], capsys)
    assert rc == 2 and "no dataset with id 999" in err and str(tmp_path / "pre") in err
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    rc, _, err = _cli(["nnunet", "plans", "999", "-a", "scse"], capsys)
    assert rc == 2 and "nnUNet_preprocessed is not set" in err


def _fake_results(root: Path, pre: Path, plans: str, cases_by_fold: dict[int, list[str]], perturb: bool,
                  epoch_s: float, trainer: str = "nnUNetTrainer") -> None:
    """A results folder as nnU-Net writes it: plans.json, dataset.json, fold_f/{validation, training log, debug}."""
    import nibabel as nib

    model = root / DATASET / f"{trainer}__{plans}__3d_fullres"
    model.mkdir(parents=True)
    shutil.copy(pre / f"{plans}.json", model / "plans.json")
    shutil.copy(pre / "dataset.json", model / "dataset.json")
    for f, cases in cases_by_fold.items():
        fold = model / f"fold_{f}"
        (fold / "validation").mkdir(parents=True)
        (fold / "debug.json").write_text(json.dumps({"num_iterations_per_epoch": 10}))
        (fold / "training_log_2026_1_1_00_00_00.txt").write_text(
            "".join(f"2026-01-01 00:00:0{i}: Epoch time: {epoch_s + i} s\n" for i in range(3)))
        for cid in cases:
            img = nib.load(str(pre / "gt_segmentations" / f"{cid}.nii.gz"))
            arr = np.asarray(img.dataobj).astype(np.uint8)
            if perturb:  # baseline: shift the label map by one voxel, so it scores lower
                arr = np.roll(arr, 1, axis=0)
            nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(fold / "validation" / f"{cid}.nii.gz"))


def test_compare_pairs_cases_and_lists_what_is_missing(nnunet_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pre_src = nnunet_root / "pre" / DATASET
    pre = tmp_path / "pre" / DATASET
    pre.mkdir(parents=True)
    for name in ("dataset.json", "nnUNetPlans.json"):
        shutil.copy(pre_src / name, pre / name)
    shutil.copytree(pre_src / "gt_segmentations", pre / "gt_segmentations")
    rc, _, err = _cli(["nnunet", "plans", DATASET, "-a", "scse", "--preprocessed", str(tmp_path / "pre")], capsys)
    assert rc == 0, err
    splits = [{"train": ["case_002", "case_003", "case_004", "case_005"], "val": ["case_000", "case_001"]},
              {"train": ["case_000", "case_001", "case_004", "case_005"], "val": ["case_002", "case_003"]},
              {"train": ["case_000", "case_001", "case_002", "case_003"], "val": ["case_004", "case_005"]}]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    res = tmp_path / "res"
    _fake_results(res, pre, "nnUNetPlans", {0: ["case_000", "case_001"], 1: ["case_002", "case_003"]},
                  perturb=True, epoch_s=10.0)
    # scse: fold 1 lacks case_003; fold 2 only exists for scse (no baseline) -> its cases cannot pair
    _fake_results(res, pre, "nnUNetPlans_medse_scse", {0: ["case_000", "case_001"], 1: ["case_002"],
                                                       2: ["case_004", "case_005"]}, perturb=False, epoch_s=12.0)
    out = tmp_path / "cmp"
    rc, stdout, err = _cli(["nnunet", "compare", str(DATASET_ID), "--plans", "nnUNetPlans,nnUNetPlans_medse_scse",
                            "--folds", "0-2", "-o", str(out), "--results", str(res), "--preprocessed",
                            str(tmp_path / "pre"), "--n-boot", "200", "--allow-incomplete"], capsys)
    assert rc == 0, err
    rows = __import__("pandas").read_csv(out / "table.csv")
    assert list(rows["block"]) == ["none", "scse"]
    assert list(rows["n_cases"]) == [3, 3]  # case_000, case_001, case_002 only
    assert rows.loc[1, "gain"] > 0  # exact labels beat the shifted ones
    assert rows.loc[0, "mean"] < 1.0 and abs(rows.loc[1, "mean"] - 1.0) < 1e-9
    # parameters from the networks nnU-Net builds from each plans.json: scSE adds some
    assert rows.loc[1, "params"] > rows.loc[0, "params"] > 0
    # training step: epochs 1 and 2 of the log (first left out) / 10 iterations
    assert abs(rows.loc[0, "train_step_s"] - 1.15) < 1e-9 and abs(rows.loc[1, "train_step_s"] - 1.35) < 1e-9
    md = (out / "table.md").read_text()
    assert "Paired over the 3 validation cases" in md
    assert "nnUNetPlans: no predictions for fold(s) 2" in md
    assert "nnUNetPlans_medse_scse: missing cases fold 1: case_003" in md
    assert "left out (not present for every plans): case_003, case_004, case_005" in md
    # step times on the folds timed for both plans (0, 1), as paired ratios per fold
    assert "scse vs none on fold(s) 0, 1: 1.350 s vs 1.150 s, paired overhead median +17.4%" in md
    missing = json.loads((out / "missing.json").read_text())
    assert missing["folds"] == {"nnUNetPlans": [2]}
    assert {d["case_id"] for d in missing["dropped_cases"]} == {"case_003", "case_004", "case_005"}
    for name in ("table.tex", "table_structures.md", "table_structures.csv", "records.csv",
                 "figures/dice_boxplot.png", "figures/gain.png",
                 "evaluations/nnUNetPlans/fold_0/metrics.csv"):
        assert (out / name).is_file(), name
    ev = __import__("pandas").read_csv(out / "evaluations/nnUNetPlans_medse_scse/fold_0/metrics.csv")
    assert {"dice", "hd95", "assd"} <= set(ev["metric"])
    assert "| nnU-Net 3d_fullres | scse |" in stdout

    # no baseline among the plans -> one-line error
    rc, _, err = _cli(["nnunet", "compare", str(DATASET_ID), "--plans", "nnUNetPlans_medse_scse,nnUNetPlans_medse_x",
                       "-o", str(out), "--results", str(res), "--preprocessed", str(tmp_path / "pre")], capsys)
    assert rc == 2 and "nnUNetPlans_medse_x" in err and err.count("\n") == 1


def test_short_trainer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, __import__("medse.integrations.nnunet", fromlist=["x"]).trainer_folder())
    try:
        from nnUNetTrainer_medse import _setting, describe_network, nnUNetTrainer_medseShort
    finally:
        sys.path.pop(0)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert issubclass(nnUNetTrainer_medseShort, nnUNetTrainer)
    monkeypatch.setenv("MEDSE_NNUNET_ITERS", "7")
    assert _setting(10, "MEDSE_NNUNET_ITERS") == 7
    monkeypatch.delenv("MEDSE_NNUNET_ITERS")
    assert _setting(10, "MEDSE_NNUNET_ITERS") == 10
    monkeypatch.setenv("MEDSE_NNUNET_ITERS", "zero")
    with pytest.raises(ValueError, match="MEDSE_NNUNET_ITERS must be a positive integer"):
        _setting(10, "MEDSE_NNUNET_ITERS")
    from torch import nn

    from medse.integrations.nnunet import AttentionPlainConvUNet

    net = AttentionPlainConvUNet(1, 2, [4, 8], nn.Conv2d, 3, [1, 2], 1, 2, 1, attention="cse",
                                 attention_kwargs={"reduction": 2})
    assert describe_network(net).endswith("AttentionPlainConvUNet, 3 medse attention modules "
                                          "(encoder=cse, bottleneck=cse, decoder=cse)")


def _load_checkpoint_weights(path: Path) -> dict:
    """nnU-Net's checkpoint, loaded with weights_only=True (numpy scalars allow-listed)."""
    import torch

    allowed = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
               type(np.dtype(np.int64))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_end_to_end_cpu(nnunet_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plan+preprocess (fixture) -> scse plans -> short trainer for baseline and scse on fold 0 ->
    nnUNetv2_predict with the scse plans -> medse nnunet compare."""
    import nibabel as nib

    from medse.integrations.nnunet import trainer_folder

    t0 = time.perf_counter()
    root = nnunet_root
    env = _env(root, nnUNet_extTrainer=trainer_folder(), nnUNet_n_proc_DA="0", MEDSE_NNUNET_EPOCHS="1",
               MEDSE_NNUNET_ITERS="2", MEDSE_NNUNET_VAL_ITERS="1")
    log = root / "e2e.log"
    rc, out, err = _cli(["nnunet", "plans", str(DATASET_ID), "-a", "scse", "--preprocessed", str(root / "pre")],
                        capsys)
    assert rc == 0, err
    trainer = "nnUNetTrainer_medseShort"
    for plans in ("nnUNetPlans", "nnUNetPlans_medse_scse"):
        _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-p", plans,
              "-device", "cpu"], env, log)
    res = root / "res" / DATASET
    fold = res / f"{trainer}__nnUNetPlans_medse_scse__3d_fullres" / "fold_0"
    # nnUNetv2_train -p <derived> built the medse network: its log says so and its checkpoint holds the blocks
    train_log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "medse: network medse.integrations.nnunet.networks.AttentionPlainConvUNet, 5 medse attention modules " \
           "(encoder=scse, bottleneck=scse, decoder=scse)" in train_log
    weights = _load_checkpoint_weights(fold / "checkpoint_final.pth")["network_weights"]
    assert any(k.startswith("encoder_attention.0.cse.") for k in weights)
    assert any(k.startswith("bottleneck_attention.sse.") for k in weights)
    base_fold = res / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    base_weights = _load_checkpoint_weights(base_fold / "checkpoint_final.pth")["network_weights"]
    assert not any("_attention" in k for k in base_weights)
    assert set(base_weights) < set(weights)

    # predict two raw images with the scse model
    inp = root / "predict_in"
    inp.mkdir()
    for cid in ("case_000", "case_001"):
        shutil.copy(root / "raw" / DATASET / "imagesTr" / f"{cid}_0000.nii.gz", inp)
    pred = root / "predict_out"
    _run([str(BIN / "nnUNetv2_predict"), "-i", str(inp), "-o", str(pred), "-d", str(DATASET_ID), "-c", "3d_fullres",
          "-p", "nnUNetPlans_medse_scse", "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta",
          "-npp", "1", "-nps", "1"], env, log)
    for cid in ("case_000", "case_001"):
        p = nib.load(str(pred / f"{cid}.nii.gz"))
        ref = nib.load(str(root / "raw" / DATASET / "labelsTr" / f"{cid}.nii.gz"))
        assert p.shape == ref.shape
        assert np.allclose(p.affine, ref.affine, atol=1e-3)

    cmp = root / "compare"
    rc, out, err = _cli(["nnunet", "compare", str(DATASET_ID), "--plans", "nnUNetPlans,nnUNetPlans_medse_scse",
                         "--trainer", trainer, "--folds", "0", "-o", str(cmp), "--results", str(root / "res"),
                         "--preprocessed", str(root / "pre"), "--n-boot", "200"], capsys)
    assert rc == 0, err
    rows = __import__("pandas").read_csv(cmp / "table.csv")
    assert list(rows["block"]) == ["none", "scse"]
    assert (rows["n_cases"] == 2).all()  # fold 0's two validation cases, paired
    assert rows["params"].iloc[1] > rows["params"].iloc[0]
    assert rows["train_step_s"].notna().all()
    md = (cmp / "table.md").read_text()
    assert "| nnU-Net 3d_fullres | none |" in md and "| nnU-Net 3d_fullres | scse |" in md
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nnnU-Net end-to-end (after plan+preprocess): {elapsed:.0f} s")
