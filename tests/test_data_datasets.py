from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medse.data.datasets import (
    MANIFEST_FORMAT,
    DatasetSpec,
    detect_layout,
    load_dataset,
    read_manifest,
    write_manifest,
)
from medse.data.io import write_image
from medse.data.synth import LABELS
from medse.testing import make_affine, write_random_volume
from medse.utils.errors import MedseError


def test_folder_layout_from_synth(synth_dataset):
    assert detect_layout(synth_dataset) == "folder"
    spec = load_dataset(synth_dataset)
    assert spec.layout == "folder"
    assert spec.case_ids == [f"case_{i:03d}" for i in range(6)]
    assert spec.labels == LABELS
    assert spec.channel_names == ["T1"]
    c = spec.case("case_002")
    assert c.images == [synth_dataset / "images" / "case_002.nii.gz"]
    assert c.label == synth_dataset / "labels" / "case_002.nii.gz"
    assert spec.issues == []


def test_folder_layout_channels_missing_label_and_orphan(tmp_path):
    root = tmp_path / "ds"
    aff = make_affine("ras")
    for cid in ("a", "b"):
        for ch in range(2):
            write_random_volume(root / "images" / f"{cid}_{ch:04d}.nii.gz", (6, 6, 6), affine=aff, seed=ch)
    write_random_volume(root / "labels" / "a.nii.gz", (6, 6, 6), affine=aff, label=True)
    write_random_volume(root / "labels" / "zzz.nii.gz", (6, 6, 6), affine=aff, label=True)
    spec = load_dataset(root)
    assert spec.case_ids == ["a", "b"]
    assert [p.name for p in spec.case("a").images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert spec.case("a").label is not None and spec.case("b").label is None
    assert spec.num_channels == 2
    assert len(spec.issues) == 1 and "zzz.nii.gz" in spec.issues[0] and "no matching image" in spec.issues[0]


def test_folder_layout_names_ending_in_digits_are_cases_not_channels(tmp_path):
    root = tmp_path / "ds"
    for cid in ("case_0001", "case_0002"):
        write_random_volume(root / "images" / f"{cid}.nii.gz", (5, 5, 5), kind="ras")
        write_random_volume(root / "labels" / f"{cid}.nii.gz", (5, 5, 5), kind="ras", label=True)
    spec = load_dataset(root)
    assert spec.case_ids == ["case_0001", "case_0002"]
    assert all(len(c.images) == 1 and c.label is not None for c in spec.cases)


def test_nnunet_layout(synth_nnunet):
    assert detect_layout(synth_nnunet) == "nnunet"
    spec = load_dataset(synth_nnunet)
    assert spec.layout == "nnunet" and spec.labels == LABELS and spec.channel_names == ["T1"]
    assert spec.case_ids == ["case_000", "case_001", "case_002", "case_003"]
    c = spec.case("case_001")
    assert [p.name for p in c.images] == ["case_001_0000.nii.gz"]
    assert c.label is not None and c.label.name == "case_001.nii.gz"


def test_nnunet_layout_two_channels_and_missing_channel(tmp_path):
    root = tmp_path / "Dataset002_X"
    (root / "imagesTr").mkdir(parents=True)
    json.dump({"channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
               "numTraining": 2, "file_ending": ".nii.gz"}, open(root / "dataset.json", "w"))
    aff = make_affine("lps")
    for ch in (0, 1):
        write_random_volume(root / "imagesTr" / f"p1_{ch:04d}.nii.gz", (6, 7, 8), affine=aff)
    write_random_volume(root / "imagesTr" / "p2_0000.nii.gz", (6, 7, 8), affine=aff)  # p2 lacks channel 1
    write_random_volume(root / "labelsTr" / "p1.nii.gz", (6, 7, 8), affine=aff, label=True, n_labels=2)
    spec = load_dataset(root)
    assert spec.channel_names == ["T1", "FLAIR"] and spec.labels == {"background": 0, "lesion": 1}
    assert [len(c.images) for c in spec.cases] == [2, 1]
    assert any("p2" in i and "channels [0] found" in i for i in spec.issues)


def test_msd_layout(tmp_path):
    root = tmp_path / "Task09_Spleen"
    aff = make_affine("ras")
    items = []
    for i in range(3):
        write_random_volume(root / "imagesTr" / f"spleen_{i}.nii.gz", (6, 6, 6), affine=aff, seed=i)
        write_random_volume(root / "labelsTr" / f"spleen_{i}.nii.gz", (6, 6, 6), affine=aff, label=True, n_labels=2)
        items.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    json.dump({"name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
               "training": items, "test": []}, open(root / "dataset.json", "w"))
    for target in (root, root / "dataset.json"):
        assert detect_layout(target) == "msd"
        spec = load_dataset(target)
        assert spec.layout == "msd"
        assert spec.labels == {"background": 0, "spleen": 1} and spec.channel_names == ["CT"]
        assert spec.case_ids == ["spleen_0", "spleen_1", "spleen_2"]
        assert spec.case("spleen_1").images[0] == (root / "imagesTr" / "spleen_1.nii.gz").resolve()


def test_manifest_roundtrip_relative_paths(synth_dataset, tmp_path):
    ds = tmp_path / "data"
    shutil.copytree(synth_dataset, ds)
    spec = load_dataset(ds)
    out = tmp_path / "manifests" / "m.json"
    write_manifest(spec, out, description="test")
    meta = json.loads(out.read_text())
    assert meta["format"] == MANIFEST_FORMAT and meta["version"] == 1 and meta["description"] == "test"
    assert meta["cases"][0]["images"] == ["../data/images/case_000.nii.gz"]
    assert meta["cases"][0]["label"] == "../data/labels/case_000.nii.gz"
    # moving data and manifest together keeps the manifest valid
    moved = tmp_path / "moved"
    (moved / "manifests").mkdir(parents=True)
    shutil.move(str(ds), moved / "data")
    shutil.move(str(out), moved / "manifests" / "m.json")
    back = load_dataset(moved / "manifests" / "m.json")
    assert back.layout == "manifest" and back.labels == LABELS and back.channel_names == ["T1"]
    assert back.case_ids == spec.case_ids
    assert all(p.is_file() for c in back.cases for p in [*c.images, c.label])


def test_csv_manifest(tmp_path):
    aff = make_affine("ras")
    for cid in ("x", "y"):
        for ch in ("t1", "t2"):
            write_random_volume(tmp_path / "imgs" / f"{cid}_{ch}.nii.gz", (5, 5, 5), affine=aff)
        write_random_volume(tmp_path / "segs" / f"{cid}.nii.gz", (5, 5, 5), affine=aff, label=True)
    (tmp_path / "m.csv").write_text("case_id,image_t1,image_t2,label\n"
                                    "x,imgs/x_t1.nii.gz,imgs/x_t2.nii.gz,segs/x.nii.gz\n"
                                    "y,imgs/y_t1.nii.gz,imgs/y_t2.nii.gz,\n")
    spec = load_dataset(tmp_path / "m.csv")
    assert spec.layout == "manifest" and spec.channel_names == ["t1", "t2"]
    assert spec.case("x").images == [tmp_path / "imgs" / "x_t1.nii.gz", tmp_path / "imgs" / "x_t2.nii.gz"]
    assert spec.case("x").label == tmp_path / "segs" / "x.nii.gz" and spec.case("y").label is None
    (tmp_path / "bad.csv").write_text("id,image\nx,a.nii.gz\n")
    with pytest.raises(MedseError, match=r"bad\.csv.*case_id"):
        load_dataset(tmp_path / "bad.csv")


def test_manifest_errors(tmp_path):
    (tmp_path / "v2.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 2, "cases": []}))
    with pytest.raises(MedseError, match=r"v2\.json.*unsupported manifest version 2"):
        read_manifest(tmp_path / "v2.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(MedseError, match=r"other\.json.*cannot tell the layout"):
        load_dataset(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(MedseError, match=r"broken\.json.*invalid JSON"):
        load_dataset(tmp_path / "broken.json")
    with pytest.raises(MedseError, match="dataset not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MedseError, match="cannot tell the dataset layout"):
        load_dataset(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="Did you mean 'nnunet'"):
        load_dataset(tmp_path, layout="nnunet2")
    with pytest.raises(MedseError, match=r"must be written as \.json"):
        write_manifest(DatasetSpec(cases=[]), tmp_path / "x.csv")


def test_dataset_json_label_errors(tmp_path):
    root = tmp_path / "ds"
    write_random_volume(root / "images" / "a.nii.gz", (4, 4, 4), kind="ras")
    write_image(np.zeros((4, 4, 4), np.uint8), make_affine("ras"), root / "labels" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": [1, 2]}}))
    with pytest.raises(MedseError, match=r"dataset\.json.*region-based"):
        load_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 1}}))
    with pytest.raises(MedseError, match="label value 1 appears twice"):
        load_dataset(root)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_in_folder_layout(tmp_path, suffix):
    from medse.data.preprocess import PreprocessConfig, invert_to_original, preprocess_case
    from medse.data.validate import validate_dataset
    from medse.testing import write_case

    for i, kind in enumerate(("oblique", "permuted")):
        write_case(tmp_path / "ds", f"k{i}", (9, 10, 11), kind, seed=i, suffix=suffix)
    spec = load_dataset(tmp_path / "ds")
    assert spec.case_ids == ["k0", "k1"] and spec.case("k1").images[0].name == f"k1{suffix}"
    assert validate_dataset(spec).ok
    c = spec.case("k1")
    _, lab, props = preprocess_case(c.images, c.label, PreprocessConfig(crop_foreground=True))
    from medse.data.io import read_image

    np.testing.assert_array_equal(invert_to_original(lab, props, True), read_image(c.label).array)
