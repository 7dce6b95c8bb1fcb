from __future__ import annotations

import numpy as np
import pytest
import torch

from medse.data.augment import apply_augmentation, build_augmentation
from medse.data.config import AffineAug, AugmentConfig, BiasFieldAug, ElasticAug, FlipAug, GammaAug, NoiseAug
from medse.data.datasets import load_dataset
from medse.data.loader import CaseStore, PatchDataset, VolumeDataset, collate_first
from medse.data.preprocess import PreprocessConfig
from medse.utils.errors import MedseError


@pytest.fixture(scope="module")
def store(synth_dataset):
    return CaseStore(load_dataset(synth_dataset), PreprocessConfig())


def _epoch(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_memory_cache_reads_each_case_once(synth_dataset):
    s = CaseStore(load_dataset(synth_dataset), PreprocessConfig(), cache="memory")
    ds = PatchDataset(s, s.case_ids[:3], (16, 16, 16), samples_per_epoch=6)
    _epoch(ds, 0)
    assert s.n_preprocessed == 3
    _epoch(ds, 1)
    _epoch(ds, 2)
    assert s.n_preprocessed == 3
    s_none = CaseStore(load_dataset(synth_dataset), PreprocessConfig(), cache="none")
    s_none.get("case_000")
    s_none.get("case_000")
    assert s_none.n_preprocessed == 2


def test_disk_cache(synth_dataset, tmp_path):
    spec = load_dataset(synth_dataset)
    s1 = CaseStore(spec, PreprocessConfig(), cache="disk", cache_dir=tmp_path / "c")
    a = s1.get("case_001")
    assert s1.n_preprocessed == 1 and len(list((tmp_path / "c").glob("case_001-*.npz"))) == 1
    s2 = CaseStore(spec, PreprocessConfig(), cache="disk", cache_dir=tmp_path / "c")
    b = s2.get("case_001")
    assert s2.n_preprocessed == 0
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    s3 = CaseStore(spec, PreprocessConfig(normalization="none"), cache="disk", cache_dir=tmp_path / "c")
    s3.get("case_001")
    assert s3.n_preprocessed == 1  # other settings -> other key
    with pytest.raises(ValueError, match="Unknown cache 'ram'"):
        CaseStore(spec, cache="ram")


def test_patches_deterministic_from_seed_epoch_index(store):
    ds = PatchDataset(store, store.case_ids, (16, 12, 20), fg_ratio=0.5, samples_per_epoch=8, seed=3)
    torch.manual_seed(123)
    np.random.seed(7)
    state_t, state_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    e0 = _epoch(ds, 0)
    e1 = _epoch(ds, 1)
    assert torch.equal(torch.get_rng_state(), state_t)
    assert np.array_equal(np.random.get_state()[1], state_np)
    for s in e0:
        assert s["image"].shape == (1, 16, 12, 20) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, 16, 12, 20) and s["label"].dtype == torch.int64
    # a fresh dataset reproduces any sample of any epoch, in any order
    ds2 = PatchDataset(store, store.case_ids, (16, 12, 20), fg_ratio=0.5, samples_per_epoch=8, seed=3)
    ds2.set_epoch(1)
    for i in (5, 0, 7):
        assert torch.equal(ds2[i]["image"], e1[i]["image"]) and torch.equal(ds2[i]["label"], e1[i]["label"])
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(e0, e1, strict=True))
    ds3 = PatchDataset(store, store.case_ids, (16, 12, 20), fg_ratio=0.5, samples_per_epoch=8, seed=4)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(e0, _epoch(ds3, 0), strict=True))


def test_foreground_ratio_and_case_coverage(store):
    fg = PatchDataset(store, store.case_ids, (6, 6, 6), fg_ratio=1.0, samples_per_epoch=30, seed=0)
    samples = _epoch(fg, 0)
    assert all(int(s["label"][0, 3, 3, 3]) > 0 for s in samples)  # centred on a foreground voxel
    classes = {int(s["label"][0, 3, 3, 3]) for s in samples}
    assert len(classes) >= 5  # classes drawn uniformly, not by voxel count
    assert {s["case_id"] for s in samples} == set(store.case_ids)
    bg = PatchDataset(store, store.case_ids, (6, 6, 6), fg_ratio=0.0, samples_per_epoch=60, seed=0)
    centres = [int(s["label"][0, 3, 3, 3]) for s in _epoch(bg, 0)]
    assert centres.count(0) > 10  # uniform positions hit the (large) background


def test_padding_when_volume_smaller_than_patch(store):
    img, lab, _ = store.get("case_000")
    big = tuple(s + 6 for s in img.shape[1:])
    ds = PatchDataset(store, ["case_000"], big, fg_ratio=1.0, seed=0)
    s = ds[0]
    assert s["image"].shape == (1, *big)
    assert int((s["label"] > 0).sum()) == int((lab > 0).sum())  # whole volume inside, padding is 0
    assert float(s["image"][0, 0, 0, 0]) == pytest.approx(float(img.min()))


def test_2d_slices(store):
    ds = PatchDataset(store, store.case_ids, (20, 16), fg_ratio=1.0, samples_per_epoch=5, seed=1, slice_axis=2)
    s = ds[0]
    assert s["image"].shape == (1, 20, 16) and s["label"].shape == (1, 20, 16)
    assert int(s["label"][0, 10, 8]) > 0
    with pytest.raises(ValueError, match="slice_axis"):
        PatchDataset(store, store.case_ids, (20, 16))
    # the slice is a real slice of the volume
    ds0 = PatchDataset(store, ["case_002"], (8, 8), fg_ratio=0.0, seed=2, slice_axis=0)
    img, _, _ = store.get("case_002")
    sl = ds0[0]["image"][0].numpy()
    hits = [x for x in range(img.shape[1]) for y in range(img.shape[2] - 7) for z in range(img.shape[3] - 7)
            if np.array_equal(img[0, x, y:y + 8, z:z + 8], sl)]
    assert hits


def test_augmented_patches_deterministic_and_same_spatial_transform(store):
    aug = AugmentConfig(affine=AffineAug(p=1.0, degrees=15), elastic=ElasticAug(p=0.5, max_displacement=2.0),
                        noise=NoiseAug(p=0.5, std=(0.0, 0.05)), gamma=GammaAug(p=0.5))
    ds = PatchDataset(store, store.case_ids, (16, 16, 16), fg_ratio=0.5, augment=aug, samples_per_epoch=3, seed=5)
    state = torch.get_rng_state()
    a = _epoch(ds, 2)
    b = _epoch(ds, 2)
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    plain = PatchDataset(store, store.case_ids, (16, 16, 16), fg_ratio=0.5, samples_per_epoch=3, seed=5)
    assert not torch.equal(plain.__getitem__(0)["image"], a[0]["image"])
    assert set(torch.unique(a[0]["label"]).tolist()) <= set(range(7))


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    lab = np.zeros((24, 24, 24), np.int64)
    lab[4:12, 6:20, 8:16] = 1
    lab[14:20, 3:9, 2:22] = 2
    img = (lab * 10.0)[None].astype(np.float32) + rng.normal(0, 0.01, size=(1, 24, 24, 24)).astype(np.float32)
    flip = build_augmentation(AugmentConfig(flip=FlipAug(p=1.0, axes=(0, 1), flip_probability=1.0)))
    fi, fl = apply_augmentation(flip, img, lab, seed=0)
    np.testing.assert_array_equal(fl[0].numpy(), lab[::-1, ::-1])
    np.testing.assert_allclose(fi[0].numpy(), img[0, ::-1, ::-1])
    aff = build_augmentation(AugmentConfig(affine=AffineAug(p=1.0, degrees=25, scales=(0.8, 1.2))))
    ai, al = apply_augmentation(aff, img, lab, seed=11)
    assert not torch.equal(al[0], torch.from_numpy(lab))
    agree = (torch.round(ai[0] / 10).long() == al[0]).float().mean()
    assert agree > 0.95  # same spatial transform; differences only at edges (linear vs nearest)
    assert set(torch.unique(al).tolist()) <= {0, 1, 2}  # nearest: no new label values


def test_2d_augmentation_and_config(tmp_path):
    cfg = AugmentConfig.light()
    assert cfg.enabled and not AugmentConfig().enabled
    assert build_augmentation(AugmentConfig()) is None
    t2 = build_augmentation(cfg, spatial_dims=2)
    img = np.random.default_rng(0).normal(size=(2, 20, 18)).astype(np.float32)
    lab = np.zeros((20, 18), np.int64)
    lab[5:15, 4:12] = 1
    a, la = apply_augmentation(t2, img, lab, seed=1)
    b, lb = apply_augmentation(t2, img, lab, seed=1)
    assert a.shape == (2, 20, 18) and la.shape == (1, 20, 18)
    assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(ValueError, match="flip.axes"):
        build_augmentation(AugmentConfig(flip=FlipAug(p=1.0, axes=(2,))), spatial_dims=2)
    assert build_augmentation(AugmentConfig(bias_field=BiasFieldAug(p=1.0))) is not None


def test_volume_dataset(store):
    vd = VolumeDataset(store, ["case_001", "case_004"])
    loader = torch.utils.data.DataLoader(vd, batch_size=1, collate_fn=collate_first)
    items = list(loader)
    assert [it["case_id"] for it in items] == ["case_001", "case_004"]
    img, lab, props = store.get("case_004")
    assert items[1]["image"].shape == (1, *img.shape) and items[1]["label"].shape == (1, 1, *lab.shape)
    assert items[1]["props"]["shape_after"] == list(lab.shape)


def test_patch_dataset_in_dataloader_with_shuffle(store):
    ds = PatchDataset(store, store.case_ids, (8, 8, 8), samples_per_epoch=6, seed=0)
    ds.set_epoch(0)
    g = torch.Generator().manual_seed(0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, generator=g)))
    assert batch["image"].shape == (3, 1, 8, 8, 8) and batch["label"].shape == (3, 1, 8, 8, 8)


def test_samples_do_not_alias_the_cache(store):
    img, lab, _ = store.get("case_005")
    assert not img.flags.writeable and not lab.flags.writeable
    before = img.copy()
    ds = PatchDataset(store, ["case_005"], img.shape[1:], fg_ratio=0.0, seed=0)
    s = ds[0]
    s["image"].add_(100.0)
    v = VolumeDataset(store, ["case_005"])[0]
    v["image"].mul_(0.0)
    np.testing.assert_array_equal(store.get("case_005")[0], before)


def test_3d_transform_rebuilt_for_2d_slices(store):
    t3 = build_augmentation(AugmentConfig(affine=AffineAug(p=1.0, degrees=30)), spatial_dims=3)
    ds = PatchDataset(store, store.case_ids, (16, 16), augment=t3, seed=0, slice_axis=2)
    assert ds.transform is not t3 and ds.transform._medse_spatial_dims == 2
    assert ds[0]["image"].shape == (1, 16, 16)
    assert PatchDataset(store, store.case_ids, (8, 8, 8), augment=t3).transform is t3


def test_multichannel_patches(tmp_path):
    from medse.testing import make_affine, write_random_volume

    aff = make_affine("oblique")
    for cid in ("a", "b"):
        for ch in range(2):
            write_random_volume(tmp_path / "ds" / "images" / f"{cid}_{ch:04d}.nii.gz", (12, 13, 14), affine=aff,
                                seed=ch)
        write_random_volume(tmp_path / "ds" / "labels" / f"{cid}.nii.gz", (12, 13, 14), affine=aff, label=True)
    st = CaseStore(load_dataset(tmp_path / "ds"), PreprocessConfig())
    ds = PatchDataset(st, ["a", "b"], (8, 8, 8), fg_ratio=1.0, seed=0)
    s = ds[1]
    assert s["image"].shape == (2, 8, 8, 8) and s["label"].shape == (1, 8, 8, 8)
    assert not torch.equal(s["image"][0], s["image"][1])


def test_non_contiguous_labels_become_class_indices(tmp_path):
    import json

    from medse.data.io import write_image
    from medse.data.preprocess import invert_to_original
    from medse.testing import make_affine

    aff = make_affine("lps")
    rng = np.random.default_rng(0)
    lab = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(10, 10, 10))
    write_image(rng.normal(size=(10, 10, 10)).astype(np.float32), aff, tmp_path / "ds" / "images" / "a.nii.gz")
    write_image(lab, aff, tmp_path / "ds" / "labels" / "a.nii.gz")
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "x": 1, "y": 2, "z": 4}}))
    st = CaseStore(load_dataset(tmp_path / "ds"), PreprocessConfig())
    _, plab, props = st.get("a")
    assert sorted(np.unique(plab).tolist()) == [0, 1, 2, 3] and props["label_values"] == [0, 1, 2, 4]
    np.testing.assert_array_equal(invert_to_original(plab, props, is_label=True), lab)


def test_nonfinite_voxels_replaced_in_training_data_with_one_warning_per_case(tmp_path):
    import warnings

    from medse.data.preprocess import NonFiniteWarning
    from medse.testing import make_broken_dataset

    root, _, _ = make_broken_dataset(tmp_path / "ds", "nan")  # c01: one NaN and one +Inf voxel
    spec = load_dataset(root)
    store = CaseStore(spec, PreprocessConfig(), cache="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for cid in store.case_ids:
                image, _, props = store.get(cid)
                assert np.all(np.isfinite(image))
                assert props["nonfinite_voxels"] == (2 if cid == "c01" else 0)
    msgs = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("case 'c01': 2 NaN/Inf voxels replaced") and "c01.nii.gz" in msgs[0]
    strict = CaseStore(spec, PreprocessConfig(nonfinite="error"), cache="none")
    with pytest.raises(MedseError, match=r"c01\.nii\.gz: 2 NaN/Inf voxels"):
        strict.get("c01")


@pytest.mark.slow
def test_training_on_a_dataset_with_nan_voxels_runs_with_a_warning(tmp_path):
    """prepare_data validates with NaN/Inf as a warning, the store replaces them, the loss stays finite."""
    import csv
    import math
    import warnings

    from medse.data.preprocess import NonFiniteWarning
    from medse.testing import make_broken_dataset
    from medse.training import train

    root, _, _ = make_broken_dataset(tmp_path / "ds", "nan", n_cases=3, shape=(16, 16, 16))
    cfg = {
        "data": {"root": str(root), "split": {"val_fraction": 0.34, "seed": 0}, "cache": "memory"},
        "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8], "strides": [2]}},
        "train": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [16, 16, 16],
                  "val_every": 1, "progress": False, "device": "cpu", "amp": False},
        "infer": {"roi_size": [16, 16, 16]},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(cfg, tmp_path / "run")
    msgs = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    assert len(msgs) == 1 and "case 'c01': 2 NaN/Inf voxels replaced" in msgs[0]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(math.isfinite(float(r["train_loss"])) for r in rows)
    strict = {**cfg, "data": {**cfg["data"], "preprocess": {"nonfinite": "error"}}}
    with pytest.raises(MedseError, match=r"^dataset validation failed with 1 error: .*c01\.nii\.gz: 2 NaN/Inf voxels"):
        train(strict, tmp_path / "run_strict")
    assert not (tmp_path / "run_strict").exists()
