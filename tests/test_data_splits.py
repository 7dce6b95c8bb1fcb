from __future__ import annotations

import json

import pytest
import yaml

from medse.data.config import AugmentConfig, DataConfig, SplitConfig
from medse.data.splits import load_or_create_splits, make_splits
from medse.utils.config import from_dict, to_dict
from medse.utils.errors import MedseError

IDS = [f"case_{i:03d}" for i in range(20)]


def test_holdout_fractions_and_determinism():
    s = make_splits(IDS, SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=1))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (14, 4, 2)
    assert sorted(s["train"] + s["val"] + s["test"]) == IDS
    assert s["seed"] == 1 and s["kind"] == "holdout"
    assert make_splits(list(reversed(IDS)), SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=1)) == s
    assert make_splits(IDS, SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=2))["val"] != s["val"]
    tiny = make_splits(["a", "b"], SplitConfig(val_fraction=0.1))
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 1


def test_kfold_partition():
    vals = []
    for f in range(5):
        s = make_splits(IDS, SplitConfig(kind="kfold", folds=5, fold=f, test_fraction=0.0, seed=0))
        assert len(s["val"]) == 4 and len(s["train"]) == 16 and not set(s["val"]) & set(s["train"])
        vals += s["val"]
    assert sorted(vals) == IDS  # every case validated exactly once
    with pytest.raises(MedseError, match="cannot fill 5 folds"):
        make_splits(IDS[:3], SplitConfig(kind="kfold", folds=5))


def test_stored_splits_reused_never_redrawn(tmp_path):
    cfg = SplitConfig(seed=3)
    first = load_or_create_splits(tmp_path, IDS, cfg)
    stored = json.loads((tmp_path / "splits.json").read_text())
    assert stored == first and {"seed", "kind", "fold", "train", "val", "test"} <= set(stored)
    # hand-edited file is reused as is (not redrawn)
    stored["val"], stored["train"] = stored["train"][:2], stored["train"][2:] + stored["val"]
    (tmp_path / "splits.json").write_text(json.dumps(stored))
    assert load_or_create_splits(tmp_path, IDS, cfg)["val"] == stored["val"]
    with pytest.raises(MedseError, match=r"splits\.json: stored split disagrees with the dataset: 1 dataset case"):
        load_or_create_splits(tmp_path, [*IDS, "case_new"], cfg)
    with pytest.raises(MedseError, match="1 stored case"):
        load_or_create_splits(tmp_path, IDS[1:], cfg)
    with pytest.raises(MedseError, match="seed=3 but the config says 4"):
        load_or_create_splits(tmp_path, IDS, SplitConfig(seed=4))
    (tmp_path / "splits.json").write_text("{")
    with pytest.raises(MedseError, match="unreadable splits file"):
        load_or_create_splits(tmp_path, IDS, cfg)


def test_data_config_from_yaml():
    text = """
root: demo_data
preprocess: {orientation: RAS, target_spacing: [1.5, 1.5, 1.5], normalization: zscore, crop_foreground: true}
split: {kind: kfold, folds: 4, fold: 2, seed: 7}
cache: disk
labels: {background: 0, tumour: 1}
"""
    cfg = from_dict(DataConfig, yaml.safe_load(text))
    assert cfg.root == "demo_data" and cfg.source == "demo_data" and cfg.cache == "disk"
    assert cfg.preprocess.target_spacing == (1.5, 1.5, 1.5) and cfg.preprocess.crop_foreground
    assert cfg.split.kind == "kfold" and cfg.split.fold == 2 and cfg.labels == {"background": 0, "tumour": 1}
    again = from_dict(DataConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg
    with pytest.raises(MedseError, match="unknown config key 'preprocess.normalisation'. Did you mean 'normalization'"):
        from_dict(DataConfig, {"preprocess": {"normalisation": "ct"}})
    with pytest.raises(MedseError, match="'cache'"):
        from_dict(DataConfig, {"cache": "gpu"})
    with pytest.raises(MedseError, match="split.fold = 5"):
        from_dict(DataConfig, {"split": {"kind": "kfold", "folds": 5, "fold": 5}})


def test_augment_config_from_yaml():
    cfg = from_dict(AugmentConfig, {"affine": {"p": 0.3, "degrees": 5}, "flip": {"p": 0.5, "axes": [1, 2]}})
    assert cfg.affine.p == 0.3 and cfg.affine.degrees == 5.0 and cfg.flip.axes == (1, 2) and cfg.enabled
    with pytest.raises(MedseError, match=r"gamma.p = 1.5"):
        from_dict(AugmentConfig, {"gamma": {"p": 1.5}})
    with pytest.raises(MedseError, match="unknown config key 'elastic.sigma'"):
        from_dict(AugmentConfig, {"elastic": {"sigma": 3}})
