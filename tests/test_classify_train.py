"""Classifier training, resume, evaluation and comparison end to end on tiny synthetic data (width 1/8, 32 px)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from medse.classify.synth import generate_classification_dataset
from medse.classify.train import load_config, resume, train
from medse.utils.errors import MedseError

TINY = {
    "model": {"in_channels": 1, "arch": {"width": 0.125}},
    "data": {"image_size": 32, "val_fraction": 0.2, "test_fraction": 0.25},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "progress": False, "seed": 3, "num_threads": 1},
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_classification_dataset(tmp_path_factory.mktemp("cls") / "data", n_images=48, size=40, seed=1)


def _cfg(root, **extra):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(root)
    for section, values in extra.items():
        cfg[section].update(values)
    return cfg


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = train(_cfg(synth / "manifest.csv"), out / "base")
    se = train(_cfg(synth / "manifest.csv", model={"attention": "se", "attention_kwargs": {"reduction": 4}}),
               out / "se")
    return base, se


def test_run_folder_contents(runs):
    base, _ = runs
    for name in ("config.yaml", "run_info.json", "dataset.json", "splits.json", "metrics.csv", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (base / name).is_file(), name
    ds = json.loads((base / "dataset.json").read_text())
    assert ds["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"] and ds["num_classes"] == 4
    sp = json.loads((base / "splits.json").read_text())
    assert sp["seed"] == 3 and len(sp["train"]) + len(sp["val"]) + len(sp["test"]) == 48
    rows = list(csv.DictReader(open(base / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["train_loss"]) > 0 and 0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    ck = torch.load(base / "checkpoints" / "last.pt", weights_only=True)
    # one engine: "epoch" counts the epochs completed, as in segmentation runs
    assert ck["epoch"] == 2 and ck["global_step"] == 2 * (len(sp["train"]) // 8) and ck["scheduler"]["last_epoch"] == ck["global_step"]
    assert ck["class_names"] == ds["class_names"] and len(ck["history"]) == 2
    info = json.loads((base / "run_info.json").read_text())
    assert info["task"] == "classification" and "torch_version" in info


def test_splits_keep_patients_apart(runs, synth):
    base, se = runs
    pid = {r["path"]: r["patient_id"] for r in csv.DictReader(open(synth / "manifest.csv"))}
    sp = json.loads((base / "splits.json").read_text())
    groups = {k: {pid[i] for i in sp[k]} for k in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert json.loads((se / "splits.json").read_text())["test"] == sp["test"]  # same seed -> same test set


def test_resume_equals_uninterrupted(runs, synth, tmp_path):
    base, _ = runs
    part = train(_cfg(synth / "manifest.csv", train={"epochs": 1}), tmp_path / "part")
    assert len(list(csv.DictReader(open(part / "metrics.csv")))) == 1
    resume(part, ["train.epochs=2"])
    a = torch.load(base / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["epoch"] for r in csv.DictReader(open(part / "metrics.csv"))] == ["1", "2"]
    assert (part / "run_info.json").is_file() and (part / "run_info_resume_epoch1.json").is_file()
    with pytest.raises(MedseError, match="already exists and is not empty"):
        train(_cfg(synth / "manifest.csv"), part)


def test_evaluate_and_compare_write_outputs(runs, tmp_path):
    from medse.classify.evaluate import evaluate_run
    from medse.compare.classifier import compare_runs

    base, se = runs
    m = evaluate_run(base, tmp_path / "eval", progress=False)
    for name in ("predictions.csv", "metrics.json", "metrics.csv", "table.md", "roc.png", "confusion.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    n_test = len(json.loads((base / "splits.json").read_text())["test"])
    preds = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert len(preds) == n_test == m["n"]
    assert abs(sum(float(preds[0][f"prob_{c}"]) for c in m["class_names"]) - 1) < 1e-4
    assert sum(map(sum, m["confusion_matrix"])) == n_test
    comp = compare_runs(base, se, tmp_path / "cmp", progress=False)
    out = tmp_path / "cmp"
    for name in ("comparison.json", "comparison.csv", "comparison.md", "confusion.png", "roc_glioma.png",
                 "roc_pituitary.png", "baseline/predictions.csv", "candidate/metrics.json"):
        assert (out / name).is_file(), name
    assert [r["class"] for r in comp["per_class"]] == m["class_names"]
    md = (out / "comparison.md").read_text()
    assert "UNPAIRED" in md and "| glioma |" in md and "McNemar" in md
    assert comp["baseline"]["accuracy"] == pytest.approx(m["accuracy"])
    macro = comp["overall"]["delong_macro"]
    assert macro["auc_a"] == pytest.approx(comp["baseline"]["macro_auc"]) and 0 <= macro["p"] <= 1
    assert all(r["mcnemar"]["p_holm"] >= r["mcnemar"]["p"] for r in comp["per_class"])
    assert "NaN" not in (out / "comparison.json").read_text()


def test_config_validation(synth, tmp_path):
    with pytest.raises(MedseError, match="missing config key 'data.root'"):
        load_config({})
    with pytest.raises(MedseError, match="unknown config key 'train.epoch'.*Did you mean 'epochs'"):
        load_config(_cfg(synth, train={"epoch": 3}))
    with pytest.raises(MedseError, match="train.optimizer"):
        load_config(_cfg(synth, train={"optimizer": "adamm"}))
    with pytest.raises(MedseError, match="data.image_size"):
        load_config(_cfg(synth, data={"image_size": 16}))
    cfg = load_config(_cfg(synth), ["train.lr=0.01", "model.attention=se"])
    assert cfg.train.lr == 0.01 and cfg.model.attention == "se"
    with pytest.raises(MedseError, match="model"):
        train(_cfg(synth, model={"attention": "sqeeze"}), tmp_path / "bad")


def test_cli_synth_and_errors(tmp_path, capsys):
    from medse.cli import main

    assert main(["synth-cls", "--out", str(tmp_path / "s"), "--n-images", "8", "--size", "32"]) == 0
    assert len(list((tmp_path / "s").rglob("*.png"))) == 8
    assert main(["classify", "train", "--output", str(tmp_path / "r")]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["classify", "evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "missing: run folder not found" in capsys.readouterr().err


def test_3d_volumes_train_and_evaluate(tmp_path):
    import nibabel as nib
    import numpy as np

    from medse.classify.evaluate import evaluate_run

    rng = np.random.default_rng(0)
    root = tmp_path / "vols"
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            vol = rng.normal(size=(20, 22, 18)).astype(np.float32)
            vol[5:12, 5:12, 5:12] += 2.0 * c  # class b has a bright cube
            nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.2, 2.0, 1.0])), root / name / f"v{i}.nii.gz")
    cfg = {"model": {"spatial_dims": 3, "in_channels": 1, "arch": {"width": 0.125}},
           "data": {"root": str(root), "image_size": 32, "val_fraction": 0.2, "test_fraction": 0.2},
           "train": {"epochs": 1, "batch_size": 4, "progress": False, "num_threads": 1}}
    run = train(cfg, tmp_path / "run3d")
    m = evaluate_run(run, tmp_path / "ev", progress=False)
    assert m["n"] == len(json.loads((run / "splits.json").read_text())["test"]) >= 2
    assert set(m["per_class"]) == {"a", "b"}


@pytest.mark.parametrize("name", ["classifier", "classifier_se", "classifier_cpu_demo", "classifier_se_cpu_demo"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = load_config(path, ["data.root=/nonexistent"])
    assert cfg.model.name == "resnet50v2"
    assert cfg.model.attention == ("se" if "_se" in name else "none")
    assert cfg.model.arch.get("width", 1.0) == (0.25 if "cpu" in name else 1.0)


@pytest.mark.slow
def test_cli_end_to_end_learns_synthetic_task(tmp_path):
    """synth-cls -> train baseline and SE -> compare, through the CLI; both models beat chance on the test set."""
    from medse.cli import main

    data = tmp_path / "data"
    assert main(["synth-cls", "--out", str(data), "--n-images", "400", "--size", "64", "--seed", "2"]) == 0
    common = [f"data.root={data / 'manifest.csv'}", "train.epochs=10", "train.batch_size=16"]
    assert main(["classify", "train", "--config", "configs/classifier_cpu_demo.yaml", "--output",
                 str(tmp_path / "base"), *common]) == 0
    assert main(["classify", "train", "--config", "configs/classifier_se_cpu_demo.yaml", "--output",
                 str(tmp_path / "se"), *common]) == 0
    assert main(["classify", "compare", "--baseline", str(tmp_path / "base"), "--candidate", str(tmp_path / "se"),
                 "--output", str(tmp_path / "cmp")]) == 0
    comp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comp["baseline"]["macro_auc"] > 0.65 and comp["candidate"]["macro_auc"] > 0.65
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("\n|") >= 6


def test_ddp_two_processes_share_the_engine(synth, tmp_path, torchrun):
    """Under torchrun the classifier trains with the engine's DDP: rank 0 alone writes, each global batch is split
    over the ranks (same step count as one process), the loss is all-reduced (equal on both ranks)."""
    import yaml

    cfg = _cfg(synth / "manifest.csv", train={"tensorboard": True, "device": "cpu"})
    single = train(json.loads(json.dumps(cfg)), tmp_path / "single")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = torchrun("classify", "train", "--config", str(cfg_path), "--output", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert b["epoch"] == a["epoch"] == 2 and b["global_step"] == a["global_step"] > 0
    assert len(b["step_losses"]) == b["global_step"] and all(v > 0 for v in b["step_losses"])
    # half batches with per-rank BatchNorm: a different run than one process, not a copy of it
    assert b["step_losses"] != pytest.approx(a["step_losses"], abs=1e-6)
    timing = json.loads((tmp_path / "ddp" / "timing.json").read_text())
    assert timing["world_size"] == 2
    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.*"))) == 1
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(0 <= float(r["train_accuracy"]) <= 1 for r in rows)
