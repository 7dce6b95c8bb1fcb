"""Classifier data: folder and CSV inputs, grouped stratified splits, image reading, augmentation, synthetic set."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medse.classify.data import (
    ClassificationDataset,
    class_weights,
    default_augment,
    load_classification_data,
    load_image,
    make_splits,
    read_manifest,
    scan_folder,
)
from medse.classify.synth import CLASS_NAMES, generate_classification_dataset, synth_slice
from medse.data.config import AffineAug, AugmentConfig, FlipAug, IntensityAug
from medse.utils.errors import MedseError


def _png(path, value, size=(40, 36), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 255, (size[1], size[0]) + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for ci, name in enumerate(["meningioma", "glioma", "notumor"]):
        for i in range(4):
            _png(root / name / f"img{i}.png", 10 * ci + i)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 34, 5)).astype(np.float32), np.eye(4)),
             root / "glioma" / "vol.nii.gz")
    (root / "glioma" / "notes.txt").write_text("ignored")
    return root


def test_scan_folder_sorted_classes_and_ids(folder):
    d = scan_folder(folder)
    assert d.class_names == ["glioma", "meningioma", "notumor"]
    assert d.counts() == {"glioma": 5, "meningioma": 4, "notumor": 4}
    assert "glioma/vol.nii.gz" in {s.image_id for s in d.samples}
    assert all(s.patient_id == s.image_id for s in d.samples)
    with pytest.raises(MedseError, match="not one of the configured classes"):
        scan_folder(folder, ["glioma", "meningioma"])
    d2 = scan_folder(folder, ["notumor", "glioma", "meningioma", "pituitary"])
    assert d2.labels.max() == 2 and any("pituitary" in w for w in d2.warnings)
    with pytest.raises(MedseError, match="not found"):
        scan_folder(folder / "nope")


def test_manifest_with_patients_and_errors(tmp_path, folder):
    man = folder / "manifest.csv"
    man.write_text("path,label,patient_id\nglioma/img0.png,glioma,p1\nglioma/img1.png,glioma,p1\n"
                   "notumor/img0.png,notumor,p2\n")
    d = load_classification_data(man)
    assert d.class_names == ["glioma", "notumor"] and [s.patient_id for s in d.samples] == ["p1", "p1", "p2"]
    assert d.samples[0].path == folder / "glioma" / "img0.png"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(MedseError, match="no 'path' column"):
        read_manifest(bad)
    bad.write_text("path,label\na.png,x\na.png,x\n")
    with pytest.raises(MedseError, match="duplicate path"):
        read_manifest(bad)
    bad.write_text("path,label\na.png,5\n")
    with pytest.raises(MedseError, match="out of range"):
        read_manifest(bad, ["a", "b"])


def test_splits_are_grouped_and_stratified():
    from medse.classify.data import ClassificationData, Sample

    rng = np.random.default_rng(0)
    samples = []
    for p in range(60):
        label = p % 4
        for k in range(int(rng.integers(1, 4))):
            samples.append(Sample(f"p{p}_s{k}", None, label, f"p{p}"))
    d = ClassificationData(samples, ["a", "b", "c", "d"], "mem")
    sp = make_splits(d, 0.2, 0.2, seed=3)
    ids = {k: set(v) for k, v in sp.items()}
    assert sum(len(v) for v in ids.values()) == len(samples) and not (ids["train"] & ids["test"])
    pid = {s.image_id: s.patient_id for s in samples}
    groups = {k: {pid[i] for i in v} for k, v in ids.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    lab = {s.image_id: s.label for s in samples}
    for k in ("val", "test"):
        assert {lab[i] for i in ids[k]} == {0, 1, 2, 3}  # every class on every side
        assert 0.1 < len(ids[k]) / len(samples) < 0.3
    assert make_splits(d, 0.2, 0.2, seed=3) == sp  # deterministic
    assert make_splits(d, 0.2, 0.2, seed=4) != sp
    assert make_splits(d, 0.2, 0.0, seed=3)["test"] == []
    with pytest.raises(MedseError, match="must be < 1"):
        make_splits(d, 0.6, 0.5)


def test_class_weights():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w, [4 / 9, 4 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(class_weights(np.array([0, 1]), 2, "none"), [1, 1])


def test_load_image_channels_size_norm_and_errors(folder, tmp_path):
    x = load_image(folder / "glioma" / "img0.png", in_channels=3, image_size=32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], x[2])  # grey replicated
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    v = load_image(folder / "glioma" / "vol.nii.gz", in_channels=1, image_size=32, normalize="minmax")
    assert v.shape == (1, 32, 32) and v.min() == 0 and v.max() == pytest.approx(1)
    arr = np.asarray(nib.load(folder / "glioma" / "vol.nii.gz").dataobj)[:, :, 2]  # (X=30, Y=34) middle slice
    raw = load_image(folder / "glioma" / "vol.nii.gz", in_channels=1, image_size=34, normalize="none")
    assert raw.shape == (1, 34, 34)
    slice_nii = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(arr[:30, :30].astype(np.float32), np.eye(4)), slice_nii)
    np.testing.assert_allclose(load_image(slice_nii, 1, 30, normalize="none")[0], arr[:30, :30].T, rtol=1e-5)
    v3 = load_image(folder / "glioma" / "vol.nii.gz", in_channels=1, image_size=16, spatial_dims=3)
    assert v3.shape == (1, 16, 16, 16)
    _png(tmp_path / "rgb.png", 1, mode="RGB")
    assert load_image(tmp_path / "rgb.png", in_channels=1, image_size=32).shape == (1, 32, 32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(MedseError, match="cannot read image") as err:
        load_image(broken)
    assert err.value.path == str(broken) and "broken.png" in str(err.value)
    with pytest.raises(MedseError, match="raster images are 2D"):
        load_image(folder / "glioma" / "img0.png", spatial_dims=3)


def test_dataset_skips_unreadable_and_augments_deterministically(folder):
    (folder / "notumor" / "img3.png").write_bytes(b"corrupt")
    d = scan_folder(folder)
    aug = default_augment(2)
    ds = ClassificationDataset(d, in_channels=1, image_size=32, augment=aug, seed=5)
    assert len(ds) == len(d.samples) - 1 and ds.skipped[0][0] == "notumor/img3.png"
    x0, y0, i0 = ds[0]
    assert x0.shape == (1, 32, 32) and y0 == 0 and i0 == 0
    torch.testing.assert_close(ds[0][0], x0)  # same (seed, epoch, index) -> same sample
    ds.set_epoch(1)
    assert not torch.allclose(ds[0][0], x0)
    plain = ClassificationDataset(d, in_channels=1, image_size=32, augment=None, cache=False)
    np.testing.assert_allclose(plain[0][0].numpy(), load_image(d.samples[0].path, 1, 32), atol=0)


def _augment(x, cfg, seed=0):
    from medse.data.augment import apply_augmentation, build_augmentation

    t = build_augmentation(cfg, x.ndim - 1)
    return x if t is None else apply_augmentation(t, x, None, seed=seed)[0]


def test_augment_shapes_2d_3d_and_disabled():
    x2 = torch.randn(2, 24, 20)
    assert _augment(x2, default_augment(2)).shape == x2.shape
    x3 = torch.randn(1, 12, 14, 10)
    assert _augment(x3, default_augment(3)).shape == x3.shape
    assert _augment(x2, AugmentConfig()) is x2  # every section off: no transform
    flip_only = AugmentConfig(flip=FlipAug(p=1.0, axes=default_augment(2).flip.axes, flip_probability=1.0))
    torch.testing.assert_close(_augment(x2, flip_only), torch.flip(x2, dims=(2,)))  # left-right = image width


def test_intensity_scale_shift_is_one_draw_per_image():
    x = torch.randn(2, 16, 16)
    cfg = AugmentConfig(intensity=IntensityAug(p=1.0, scale=(0.5, 2.0), shift=1.0))
    y = _augment(x, cfg, seed=3)
    a = float(((y[0] - y[0].mean()) / (x[0] - x[0].mean())).median())
    b = float(y[0].mean() - a * x[0].mean())
    torch.testing.assert_close(y, x * a + b, rtol=1e-5, atol=1e-5)  # both channels, one (a, b)
    assert 0.5 <= a <= 2.0 and -1.0 <= b <= 1.0 and (a, b) != (1.0, 0.0)
    torch.testing.assert_close(_augment(x, cfg, seed=3), y)  # the seed fixes it


def test_synthetic_dataset_layout_proportions_determinism(tmp_path):
    a = generate_classification_dataset(tmp_path / "a", n_images=24, size=48, seed=7)
    b = generate_classification_dataset(tmp_path / "b", n_images=24, size=48, seed=7)
    d = scan_folder(a)
    assert d.class_names == sorted(CLASS_NAMES)
    assert d.counts() == {"glioma": 7, "meningioma": 7, "notumor": 3, "pituitary": 7}  # study proportions
    man = read_manifest(a / "manifest.csv")
    assert len(man.samples) == 24 and len({s.patient_id for s in man.samples}) < 24  # several slices per patient
    with Image.open(a / man.samples[0].image_id) as im:
        assert im.size == (48, 48) and im.mode == "L"

    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()

    assert digest(a) == digest(b)
    with pytest.raises(ValueError, match="unknown class"):
        synth_slice("astrocytoma")


def test_synthetic_lesions_are_where_the_class_says():
    # pituitary lesion: midline, lower part; meningioma: at the brain edge; no tumour: brain close to symmetric
    rng = np.random.default_rng(0)
    from medse.classify.synth import _patient

    size = 96
    diffs = {}
    for label in CLASS_NAMES:
        d = []
        for _ in range(6):
            p = _patient(rng)
            seed = int(rng.integers(1 << 30))
            les = synth_slice(label, size, np.random.default_rng(seed), p)
            ref = synth_slice("notumor", size, np.random.default_rng(seed), p)
            d.append(np.abs(les - ref))
        diffs[label] = np.mean(d, axis=0)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    assert diffs["notumor"].max() == 0
    pit = diffs["pituitary"]
    assert pit[yy > 0.3].sum() > 0.8 * pit.sum() and pit[np.abs(xx) < 0.3].sum() > 0.8 * pit.sum()
    rho = np.sqrt(xx**2 + yy**2)
    assert diffs["meningioma"][rho > 0.45].sum() > diffs["glioma"][rho > 0.45].sum() * 0.8
    assert diffs["glioma"].sum() > 0


def test_3d_rotation_is_axial_and_flip_is_left_right():
    # NIfTI order (C, X, Y, Z): a volume constant along Z stays constant along Z (rotation in the X-Y plane)
    vol = torch.randn(1, 16, 16, 1).expand(1, 16, 16, 6).contiguous()
    cfg = AugmentConfig(affine=AffineAug(p=1.0, scales=(1, 1), degrees=30, in_plane=True))
    out = _augment(vol, cfg, seed=1)
    assert out.shape == vol.shape and not torch.allclose(out, vol)
    for z in range(6):
        torch.testing.assert_close(out[..., z], out[..., 0], rtol=0, atol=1e-5)
    flip = AugmentConfig(flip=FlipAug(p=1.0, axes=default_augment(3).flip.axes, flip_probability=1.0))
    v = torch.randn(1, 5, 6, 7)
    torch.testing.assert_close(_augment(v, flip), torch.flip(v, dims=(1,)))


def _small_set(counts: dict[int, int]):
    from medse.classify.data import ClassificationData, Sample

    names = ["glioma", "meningioma", "notumor", "pituitary"]
    samples = [Sample(f"{names[c]}/{i}.png", None, c, f"{names[c]}/{i}.png") for c, n in counts.items()
               for i in range(n)]
    return ClassificationData(samples, names, "mem"), {s.image_id: s.label for s in samples}


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_small_set_every_class_in_every_split(seed, recwarn):
    """22 images, 4 glioma: before, seed 0 gave a test split without glioma (seen only in the evaluation table)."""
    d, lab = _small_set({0: 4, 1: 6, 2: 6, 3: 6})
    sp = make_splits(d, 0.15, 0.15, seed=seed)
    for k in ("train", "val", "test"):
        assert {lab[i] for i in sp[k]} == {0, 1, 2, 3}, (k, sp[k])
    assert sorted(len(v) for v in sp.values()) == [4, 4, 14]
    assert make_splits(d, 0.15, 0.15, seed=seed) == sp  # deterministic for a seed
    assert not [w for w in recwarn if "no image in the" in str(w.message)]


def test_class_that_cannot_be_in_every_split_is_warned_at_split_time():
    d, lab = _small_set({0: 2, 1: 6, 2: 6, 3: 6})  # two glioma images cannot cover train, val and test
    with pytest.warns(UserWarning, match=r"class 'glioma' has no image in the (val|train) split\(s\)"):
        sp = make_splits(d, 0.15, 0.15, seed=0)
    assert {lab[i] for i in sp["test"]} == {0, 1, 2, 3} and 0 in {lab[i] for i in sp["train"]}
