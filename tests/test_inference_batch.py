"""Batch prediction: run folders, the CLI, broken files, resume, sharding, sliding windows vs MONAI."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medse.data.preprocess import PreprocessConfig
from medse.inference import Predictor, collect_cases, predict_folder
from medse.inference.sliding import (
    argmax_channels,
    choose_stream_axis,
    flip_tta,
    iter_window_slabs,
    monai_sliding_window,
    stream_buffer_bytes,
)
from medse.testing import make_affine
from medse.utils.errors import MedseError


def _nifti(path: Path, data: np.ndarray, kind: str = "oblique", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), make_affine(kind, seed=seed)), str(path))
    return path


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run folder as training makes it (``medse.testing.make_run``) holding a randomly initialised tiny U-Net."""
    from medse.testing import make_run

    config = {
        "data": {"root": str(tmp_path), "preprocess": {"normalization": "zscore"}},
        "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8], "strides": [2]}},
        "train": {"patch_size": [16, 16, 16], "amp": False},
        "infer": {"sw_batch_size": 2, "overlap": 0.25},
    }
    return make_run(tmp_path / "run", config, labels={"background": 0, "liver": 1, "tumour": 5},
                    channel_names=["ct"], checkpoints=("best", "last")).path


def test_from_run_loads_weights_and_maps_class_values(run_dir: Path, tmp_path: Path) -> None:
    pred = Predictor.from_run(run_dir, device="cpu")
    saved = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    for k, v in pred.model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert pred.roi_size == [16, 16, 16] and pred.overlap == 0.25 and pred.class_values == [0, 1, 5]
    src = _nifti(tmp_path / "x.nii.gz", np.random.default_rng(0).normal(size=(12, 19, 9)))
    lab = pred.predict_case(src)
    assert lab.shape == (12, 19, 9) and lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) <= {0, 1, 5}
    # MONAI's SlidingWindowInferer as the engine gives the same labels
    assert np.array_equal(Predictor.from_run(run_dir, device="cpu", engine="monai").predict_case(src), lab)
    with pytest.raises(MedseError, match="checkpoint not found"):
        Predictor.from_run(run_dir, checkpoint=str(tmp_path / "nope.pt"), device="cpu")
    with pytest.raises(ValueError, match="Predictor override"):
        Predictor.from_run(run_dir, device="cpu", roi=[8, 8, 8])


def test_cli_batch_with_broken_files_reports_and_resumes(run_dir: Path, tmp_path: Path, capsys) -> None:
    from medse.cli import main

    inp = tmp_path / "scans"
    rng = np.random.default_rng(1)
    for i, kind in enumerate(("lps", "oblique", "anisotropic")):
        _nifti(inp / f"good{i}.nii.gz", rng.normal(size=(10 + i, 14, 9)), kind=kind, seed=i)
    full = gzip.compress(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).to_bytes())
    (inp / "bad_truncated.nii.gz").write_bytes(full[: len(full) // 2])
    (inp / "bad_garbage.nii.gz").write_bytes(b"this is not an image" * 10)
    before = {p.name: p.read_bytes() for p in inp.iterdir()}
    out = tmp_path / "masks"
    argv = ["predict", "--run", str(run_dir), "--input", str(inp), "--output", str(out), "--device", "cpu",
            "--no-progress"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    fail_lines = [ln for ln in err.splitlines() if ln.startswith("failed:")]
    assert len(fail_lines) == 2
    assert any("bad_truncated" in ln for ln in fail_lines) and any("bad_garbage" in ln for ln in fail_lines)
    masks = sorted(p.name for p in out.glob("*.nii.gz"))
    assert masks == ["good0.nii.gz", "good1.nii.gz", "good2.nii.gz"]
    with open(out / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case_id"] for r in rows) == ["bad_garbage", "bad_truncated"]
    assert all(r["error"] for r in rows)
    for i in range(3):
        m, s = nib.load(str(out / f"good{i}.nii.gz")), nib.load(str(inp / f"good{i}.nii.gz"))
        assert m.shape == s.shape and m.get_data_dtype() == np.uint8
        np.testing.assert_allclose(m.affine, s.affine, atol=1e-5)
        assert json.loads((out / f"good{i}.json").read_text())["labels"] == {"background": 0, "liver": 1,
                                                                              "tumour": 5}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    rc2 = main(argv)
    captured = capsys.readouterr()
    assert rc2 == 1
    assert "0 written, 3 skipped" in captured.out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes
    assert {p.name: p.read_bytes() for p in inp.iterdir()} == before  # inputs never modified
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def _label_predictor() -> Predictor:
    class Thresh(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.5], dim=1)

    return Predictor(Thresh(), spatial_dims=3, in_channels=1, preprocess=PreprocessConfig(normalization="none"),
                     roi_size=[8, 8, 8], device="cpu")


def test_sharding_over_ranks_and_channel_grouping(tmp_path: Path, monkeypatch) -> None:
    inp = tmp_path / "in"
    for i in range(5):
        _nifti(inp / f"c{i}.nii.gz", (np.arange(6 * 7 * 5).reshape(6, 7, 5) % 2).astype(np.float32))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    rep = predict_folder(_label_predictor(), inp, tmp_path / "out", progress=False)
    assert sorted(p.name for p in rep.written) == ["c1.nii.gz", "c3.nii.gz"]
    lab = nib.load(str(tmp_path / "out" / "c1.nii.gz")).get_fdata()
    np.testing.assert_array_equal(lab, np.arange(6 * 7 * 5).reshape(6, 7, 5) % 2)
    # nnU-Net channel naming groups files into one case; a wrong channel count fails that case only
    mc = tmp_path / "mc"
    for ch in range(2):
        _nifti(mc / f"a_{ch:04d}.nii.gz", np.ones((6, 6, 6)))
    _nifti(mc / "b_0000.nii.gz", np.ones((6, 6, 6)))
    cases = collect_cases(mc)
    assert [(c.case_id, len(c.images)) for c in cases] == [("a", 2), ("b", 1)]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    lines: list[str] = []
    rep = predict_folder(_label_predictor(), mc, tmp_path / "out2", progress=False, echo=lines.append)
    assert [p.name for p in rep.written] == ["b.nii.gz"]
    assert rep.failed[0][0] == "a" and "2 channels where 1 are expected" in rep.failed[0][1]
    assert len(lines) == 1 and "\n" not in lines[0]
    with pytest.raises(MedseError, match="not found"):
        collect_cases(tmp_path / "missing")
    # two files for one case id, and an output folder that is the input folder: failures, inputs untouched
    dup = tmp_path / "dup"
    _nifti(dup / "d.nii.gz", np.ones((6, 6, 6)))
    _nifti(dup / "d.nii", np.ones((6, 6, 6)))
    _nifti(dup / "e.nii.gz", np.ones((6, 6, 6)))
    before = {p.name: p.read_bytes() for p in dup.iterdir()}
    rep = predict_folder(_label_predictor(), dup, dup, progress=False, echo=lines.append)
    errs = dict(rep.failed)
    assert "several files for case 'd'" in errs["d"] and "overwrite an input" in errs["e"]
    assert {p.name: p.read_bytes() for p in dup.iterdir() if p.name != "failures.csv"} == before


@pytest.mark.parametrize(
    "size,roi,overlap,mode",
    [((20, 17, 23), (8, 8, 8), 0.5, "gaussian"), ((5, 30, 9), (8, 8, 8), 0.25, "constant"),
     ((13, 11, 19), (6, 10, 7), 0.6, "gaussian")],
)
def test_streamed_sliding_window_equals_monai(size, roi, overlap, mode) -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.randn(2, *size)
    with torch.no_grad():
        ref = monai_sliding_window(x, net, roi, overlap=overlap, mode=mode, sw_batch_size=3)
        for axis in (None, 0, 2):
            out = torch.full_like(ref, float("nan"))
            cover = torch.zeros(size)
            for a, s0, s1, slab in iter_window_slabs(x, net, roi, overlap=overlap, mode=mode, sw_batch_size=3,
                                                     axis=axis):
                idx = [slice(None)] * 3
                idx[a] = slice(s0, s1)
                out[(slice(None), *idx)] = slab
                cover[tuple(idx)] += 1
            assert torch.all(cover == 1)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_stream_buffer_size_and_axis_choice() -> None:
    # 512x512x300, 14 classes, 128^3 windows: streaming along x holds (14 + 1) * 128 * 512 * 300 float32
    assert stream_buffer_bytes((512, 512, 300), (128, 128, 128), 14, 0) == 4 * 15 * 128 * 512 * 300
    assert choose_stream_axis((512, 512, 300), (128, 128, 128)) == 1  # x and y tie; the later wins
    assert choose_stream_axis((100, 300, 100), (64, 64, 64)) == 1


def test_flip_tta_averages_flipped_predictions() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1, bias=False)
    x = torch.randn(1, 1, 6, 5, 4)
    with torch.no_grad():
        got = flip_tta(net, 3)(x)
        manual = sum(net(x.flip(d)).flip(d) if d else net(x) for d in
                     [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]) / 8
        torch.testing.assert_close(got, manual)
        assert not torch.allclose(got, net(x))


def test_manifest_inputs_and_manifest_references(tmp_path: Path) -> None:
    from medse.data.datasets import Case, DatasetSpec, write_manifest
    from medse.evaluation import evaluate

    cases = []
    for i in range(2):
        img = _nifti(tmp_path / "data" / f"img{i}.nii.gz", (np.indices((6, 7, 5)).sum(0) % 2).astype(np.float32))
        lab = tmp_path / "data" / f"lab{i}.nii.gz"
        nib.save(nib.Nifti1Image((np.indices((6, 7, 5)).sum(0) % 2).astype(np.uint8), nib.load(str(img)).affine),
                 str(lab))
        cases.append(Case(f"case{i}", [img], lab))
    manifest = write_manifest(DatasetSpec(cases, {"background": 0, "fg": 1}, ["ct"]), tmp_path / "m.json")
    found = collect_cases(manifest)
    assert [(c.case_id, [p.name for p in c.images]) for c in found] == [("case0", ["img0.nii.gz"]),
                                                                        ("case1", ["img1.nii.gz"])]
    rep = predict_folder(_label_predictor(), manifest, tmp_path / "out", progress=False)
    assert sorted(p.name for p in rep.written) == ["case0.nii.gz", "case1.nii.gz"]
    df = evaluate(tmp_path / "out", manifest, tmp_path / "ev")
    assert set(df.label) == {"fg"}
    assert df[df.metric == "dice"].value.tolist() == [1.0, 1.0]


def test_argmax_channels_equals_torch_argmax_with_ties() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 3, (5, 7, 6, 4)).float()  # many ties
    x = x[:, 1:, ::2]  # strided view, as a cropped slab
    got = argmax_channels(x)
    assert got.dtype == torch.uint8
    torch.testing.assert_close(got.long(), torch.argmax(x, dim=0))
