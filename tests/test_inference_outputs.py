"""Trustworthy outputs of ``medse predict``: what is skipped, redone or refused; settings and output folder
checked before anything is loaded; NaN/Inf voxels; the mask writer's failure path (issue 11)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medse.inference import Predictor, predict_folder
from medse.inference.writer import file_sha256, write_label_like
from medse.testing import make_affine
from medse.utils.errors import MedseError


def _nifti(path: Path, data: np.ndarray, kind: str = "oblique", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), make_affine(kind, seed=seed)), str(path))
    return path


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run folder as training makes it (``medse.testing.make_run``): best.pt, and a last.pt with other weights."""
    from medse.testing import make_run

    config = {
        "data": {"root": str(tmp_path), "preprocess": {"normalization": "zscore"}},
        "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8], "strides": [2]}},
        "train": {"patch_size": [16, 16, 16], "amp": False},
        "infer": {"sw_batch_size": 2, "overlap": 0.25},
    }
    run = make_run(tmp_path / "run", config, channel_names=["ct"], checkpoints=("best",), seed=0)
    other = make_run(tmp_path / "other", config, channel_names=["ct"], checkpoints=("last",), seed=1)
    run.save_checkpoint("last", {"model": other.checkpoint("last")["model"], "epoch": 2})
    return run.path


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    inp = tmp_path / "scans"
    for i in range(2):
        _nifti(inp / f"case{i}.nii.gz", rng.normal(size=(12, 10, 9)), seed=i)
    return inp


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir()) if p.is_file()}


def _run(run_dir: Path, scans: Path, out: Path, **kw):
    lines: list[str] = []
    rep = predict_folder(run_dir, scans, out, device="cpu", progress=False, echo=lines.append, **kw)
    return rep, lines


def test_skip_only_what_the_same_run_checkpoint_and_settings_finished(run_dir: Path, scans: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "masks"
    rep, _ = _run(run_dir, scans, out)
    assert [p.name for p in rep.written] == ["case0.nii.gz", "case1.nii.gz"] and rep.ok
    side = json.loads((out / "case0.json").read_text())
    assert side["run_dir"] == str(run_dir.resolve())
    assert side["checkpoint_sha256"] == file_sha256(run_dir / "checkpoints" / "best.pt")
    assert side["mask_sha256"] == file_sha256(out / "case0.nii.gz")
    assert side["settings"]["roi_size"] == [16, 16, 16] and side["settings"]["overlap"] == 0.25
    assert side["nonfinite_voxels"] == 0 and side["input_files"][0]["path"] == str((scans / "case0.nii.gz").resolve())
    before = _mtimes(out)

    # same run, checkpoint and settings: skipped, nothing touched
    rep, lines = _run(run_dir, scans, out)
    assert rep.skipped == ["case0", "case1"] and not rep.written and rep.ok and lines == []
    assert _mtimes(out) == before

    # another checkpoint of the same run: refused with a one-line reason, counted as a failure
    rep, lines = _run(run_dir, scans, out, checkpoint="last")
    assert not rep.written and [c for c, _ in rep.failed] == ["case0", "case1"]
    msg = dict(rep.failed)["case0"]
    assert "mask exists from another checkpoint" in msg and "pass --overwrite" in msg and "case0.nii.gz" in msg
    assert all("\n" not in ln for ln in lines) and len(lines) == 2
    assert (out / "failures.csv").is_file()
    assert {k: v for k, v in _mtimes(out).items() if k != "failures.csv"} == before

    # other settings that change the output: refused, naming the setting
    rep, _ = _run(run_dir, scans, out, tta_flips=True)
    assert "other inference settings (tta_flips False -> True)" in dict(rep.failed)["case1"]

    # another run folder (a copy of this one): refused
    import shutil

    other = shutil.copytree(run_dir, tmp_path / "run_copy")
    rep, _ = _run(other, scans, out)
    assert "mask exists from another run" in dict(rep.failed)["case0"]

    # --overwrite: redone with the other checkpoint; then that checkpoint's run skips
    rep, _ = _run(run_dir, scans, out, checkpoint="last", overwrite=True)
    assert len(rep.written) == 2 and rep.ok and not (out / "failures.csv").exists()
    assert json.loads((out / "case0.json").read_text())["checkpoint_sha256"] == \
        file_sha256(run_dir / "checkpoints" / "last.pt")
    rep, _ = _run(run_dir, scans, out, checkpoint="last")
    assert rep.skipped == ["case0", "case1"]


def test_broken_own_masks_are_redone_and_foreign_ones_refused(run_dir: Path, scans: Path, tmp_path: Path,
                                                              capsys) -> None:
    from medse.cli import main

    out = tmp_path / "masks"
    _run(run_dir, scans, out)
    good = nib.load(str(out / "case0.nii.gz")).get_fdata()

    # truncated mask, sidecar intact (ours): redone
    data = (out / "case0.nii.gz").read_bytes()
    (out / "case0.nii.gz").write_bytes(data[: len(data) // 2])
    rep, lines = _run(run_dir, scans, out)
    assert [p.name for p in rep.written] == ["case0.nii.gz"] and rep.skipped == ["case1"] and rep.ok
    assert rep.redone[0][0] == "case0" and "existing mask unreadable" in rep.redone[0][1]
    assert lines == [f"redo: case0: {rep.redone[0][1]}"]
    np.testing.assert_array_equal(nib.load(str(out / "case0.nii.gz")).get_fdata(), good)

    # deleted sidecar: cannot tell who wrote the mask -> refused (exit 1 on the command line), kept as it is
    (out / "case1.json").unlink()
    kept = (out / "case1.nii.gz").read_bytes()
    argv = ["predict", "--run", str(run_dir), "--input", str(scans), "--output", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    fail = [ln for ln in err.splitlines() if ln.startswith("failed:")]
    assert len(fail) == 1 and "case1" in fail[0] and "no sidecar case1.json" in fail[0] and "--overwrite" in fail[0]
    assert (out / "case1.nii.gz").read_bytes() == kept

    # a mask edited after medse wrote it (e.g. corrected by hand): refused, never overwritten silently
    img = nib.load(str(out / "case0.nii.gz"))
    edited = np.asarray(img.dataobj).copy()
    edited[0, 0, 0] = 1 - edited[0, 0, 0]
    nib.save(nib.Nifti1Image(edited, None, header=img.header), str(out / "case0.nii.gz"))
    rep, _ = _run(run_dir, scans, out)
    assert "mask was modified after medse wrote it" in dict(rep.failed)["case0"]

    # --overwrite redoes both; an input updated in place is then redone without it
    rep, _ = _run(run_dir, scans, out, overwrite=True)
    assert len(rep.written) == 2 and rep.ok
    st = (scans / "case1.nii.gz").stat()
    os.utime(scans / "case1.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rep, _ = _run(run_dir, scans, out)
    assert rep.skipped == ["case0"] and rep.redone == [("case1", "input file changed since the mask was written")]

    # masks for other input files with the same case ids: refused
    moved = tmp_path / "scans2"
    os.rename(scans, moved)
    rep, _ = _run(run_dir, moved, out)
    assert "mask exists for other input files" in dict(rep.failed)["case0"]

    # probabilities requested where the finished masks have none: redone
    rep, _ = _run(run_dir, moved, out, overwrite=True)
    rep, _ = _run(run_dir, moved, out, save_probabilities=True)
    assert len(rep.written) == 2 and all("probabilities requested but missing" in r for _, r in rep.redone)
    rep, _ = _run(run_dir, moved, out, save_probabilities=True)
    assert rep.skipped == ["case0", "case1"]


def test_stale_temp_files_of_a_killed_run_are_removed(run_dir: Path, scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    out.mkdir()
    stale = [".tmp-case0-abcd1234.nii.gz", ".tmp-case0-k2_9x0qa.json", ".tmp-case1-00ff00ff.nii.gz"]
    foreign = [".tmp-notes.txt", ".tmp-case9-abcd1234.nii.gz", ".tmp-case0-abcd1234.nii.gz.bak", "case0.txt"]
    for n in stale + foreign:
        (out / n).write_bytes(b"partial")
    rep, lines = _run(run_dir, scans, out)
    assert sorted(p.name for p in rep.removed_temp) == sorted(stale)
    assert lines == [f"removed 3 temporary file(s) left by an interrupted run in {out}"]
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted(foreign + ["case0.json", "case0.nii.gz", "case1.json", "case1.nii.gz"])


@pytest.mark.parametrize(
    "override, needle",
    [({"roi_size": [0, 0, 0]}, "roi_size [0, 0, 0] must be 3 integers >= 1"),
     ({"roi_size": [-5, 64, 64]}, "roi_size [-5, 64, 64] must be 3 integers >= 1 (got -5)"),
     ({"roi_size": [16, 16]}, "roi_size [16, 16] must have 3 entries for a 3D network"),
     ({"roi_size": [16.5, 16, 16]}, "must be 3 integers >= 1"),
     ({"sw_batch_size": 0}, "sw_batch_size 0 must be an integer >= 1"),
     ({"overlap": 1.0}, "overlap 1.0 must be in [0, 1)"),
     ({"overlap": -0.1}, "overlap -0.1 must be in [0, 1)"),
     ({"blend": "linear"}, "blend 'linear' must be 'gaussian' or 'constant'")],
)
def test_bad_settings_rejected_before_anything_is_loaded(run_dir: Path, scans: Path, tmp_path: Path, monkeypatch,
                                                         override, needle) -> None:
    import medse.data.preprocess as pre

    def boom(*a, **k):
        raise AssertionError("loaded before the settings were checked")

    monkeypatch.setattr(Predictor, "_load", classmethod(boom))
    monkeypatch.setattr(pre, "preprocess_case", boom)
    out = tmp_path / "masks"
    with pytest.raises(MedseError) as e:
        predict_folder(run_dir, scans, out, device="cpu", progress=False, **override)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # also a ValueError for programmatic callers
    assert not out.exists()
    monkeypatch.undo()
    # the same checks guard the constructor
    with pytest.raises(ValueError, match=needle.split(" must")[0].replace("[", r"\[").replace("]", r"\]")):
        Predictor(torch.nn.Identity(), spatial_dims=3, in_channels=1, device="cpu",
                  **{"roi_size": [8, 8, 8], **override})


def test_bad_settings_in_the_run_config_name_the_file(run_dir: Path, scans: Path, tmp_path: Path, capsys) -> None:
    from medse.cli import main

    cfg = (run_dir / "config.yaml").read_text()
    assert "roi_size: null" in cfg
    (run_dir / "config.yaml").write_text(cfg.replace("roi_size: null", "roi_size: [0, 0, 0]"))
    with pytest.raises(MedseError, match=r"config\.yaml: config section 'infer': infer\.roi_size must be null or 2 or 3 "
                                         r"sizes >= 1 \(voxels\), got \[0, 0, 0\]"):
        predict_folder(run_dir, scans, tmp_path / "m", device="cpu", progress=False)
    assert not (tmp_path / "m").exists()
    (run_dir / "config.yaml").write_text(cfg)
    rc = main(["predict", "--run", str(run_dir), "--input", str(scans), "--output", str(tmp_path / "m2"),
               "--roi-size", "-5,8,8", "--no-progress"])
    assert rc == 2 and not (tmp_path / "m2").exists()
    err = capsys.readouterr().err
    assert "Invalid value for '--roi-size'" in err and "Traceback" not in err
    # the API refuses the same value before anything is loaded
    with pytest.raises(MedseError, match=r"roi_size \[-5, 8, 8\] must be 3 integers >= 1 \(got -5\)"):
        predict_folder(run_dir, scans, tmp_path / "m3", device="cpu", progress=False, roi_size=[-5, 8, 8])
    assert not (tmp_path / "m3").exists()


def test_unwritable_output_folder_fails_before_the_model_or_any_case(run_dir: Path, scans: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import medse.data.preprocess as pre

    def boom(*a, **k):
        raise AssertionError("loaded before the output folder was checked")

    monkeypatch.setattr(Predictor, "_load", classmethod(boom))
    monkeypatch.setattr(pre, "preprocess_case", boom)
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "masks"  # a parent is a file: cannot be created, even by root
    with pytest.raises(MedseError) as e:
        predict_folder(run_dir, scans, bad, device="cpu", progress=False)
    assert str(e.value).startswith(f"{bad}: cannot create the output folder") and "\n" not in str(e.value)
    with pytest.raises(MedseError, match="output folder exists and is not a folder"):
        predict_folder(run_dir, scans, tmp_path / "afile", device="cpu", progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # not root: the mode bites too
            with pytest.raises(MedseError, match="cannot write into the output folder"):
                predict_folder(run_dir, scans, ro / "masks", device="cpu", progress=False)
    finally:
        ro.chmod(0o700)
    monkeypatch.undo()
    # a run that fails while loading the model leaves no empty output folder behind
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedseError, match="cannot load checkpoint"):
        predict_folder(run_dir, scans, tmp_path / "new" / "masks", device="cpu", progress=False)
    assert not (tmp_path / "new").exists()


def test_nan_and_inf_voxels_are_replaced_warned_and_recorded(run_dir: Path, tmp_path: Path, capsys) -> None:
    from medse.cli import main

    rng = np.random.default_rng(2)
    arr = rng.normal(size=(12, 10, 9)).astype(np.float32)
    arr[0, 0, :3] = np.nan
    arr[5, 5, 5] = np.inf
    arr[6, 6, 6] = -np.inf
    inp = tmp_path / "in"
    _nifti(inp / "holes.nii.gz", arr)
    _nifti(inp / "clean.nii.gz", rng.normal(size=(12, 10, 9)))
    rep, lines = _run(run_dir, inp, tmp_path / "out")
    assert rep.ok and len(rep.written) == 2 and rep.nonfinite == {"holes": 5}
    warn = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warn) == 1 and warn[0].startswith("warning: holes: 5 NaN/Inf voxels replaced by the channel's finite "
                                                 "minimum") and "holes.nii.gz" in warn[0]
    assert json.loads((tmp_path / "out" / "holes.json").read_text())["nonfinite_voxels"] == 5
    assert json.loads((tmp_path / "out" / "clean.json").read_text())["nonfinite_voxels"] == 0
    # strict: the case is refused (a failure), the clean one still written
    rep, _ = _run(run_dir, inp, tmp_path / "strict", strict_nonfinite=True)
    assert [c for c, _ in rep.failed] == ["holes"] and "5 NaN/Inf voxels" in rep.failed[0][1]
    assert [p.name for p in rep.written] == ["clean.nii.gz"]
    argv = ["predict", "--run", str(run_dir), "--input", str(inp), "--device", "cpu", "--no-progress", "--output"]
    assert main([*argv, str(tmp_path / "cli_strict"), "--strict-nonfinite"]) == 1
    assert "failed: holes:" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "cli")]) == 0
    assert "warning: holes: 5 NaN/Inf voxels replaced" in capsys.readouterr().err


def test_nibabel_resampled_file_with_153_nans_predicts(run_dir: Path, tmp_path: Path) -> None:
    from nibabel.testing import data_path

    src = Path(data_path) / "resampled_anat_moved.nii"
    if not src.exists():
        pytest.skip("this nibabel has no resampled_anat_moved.nii")
    rep, lines = _run(run_dir, [src], tmp_path / "out")
    assert rep.ok and rep.nonfinite == {"resampled_anat_moved": 153}
    mask = nib.load(str(tmp_path / "out" / "resampled_anat_moved.nii"))
    assert mask.shape == nib.load(str(src)).shape
    assert json.loads((tmp_path / "out" / "resampled_anat_moved.json").read_text())["nonfinite_voxels"] == 153


def test_mask_writer_header_round_trip_failure_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import medse.inference.writer as writer

    ref = _nifti(tmp_path / "ref.nii.gz", np.zeros((6, 7, 8)), kind="oblique")
    out = tmp_path / "o"
    old = write_label_like(np.ones((6, 7, 8), np.uint8), ref, out / "case.nii.gz")  # an earlier good mask
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = writer._nifti_header_like

    def broken_header(ref_img, dtype, intent):  # a writer that loses the sform code (as nibabel can)
        hdr = real(ref_img, dtype, intent)
        hdr["sform_code"] = 0
        return hdr

    monkeypatch.setattr(writer, "_nifti_header_like", broken_header)
    with pytest.raises(MedseError) as e:
        write_label_like(np.zeros((6, 7, 8), np.uint8), ref, out / "case.nii.gz")
    msg = str(e.value)
    assert "round-trip header check failed" in msg and "qform/sform codes" in msg and "ref.nii.gz" in msg
    assert "\n" not in msg
    # the earlier mask and its sidecar are untouched, no temporary file is left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and old.is_file()
    with pytest.raises(MedseError, match="round-trip header check failed"):
        write_label_like(np.zeros((6, 7, 8), np.uint8), ref, out / "new.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["case.json", "case.nii.gz"]  # no new.nii.gz, no new.json


def test_masks_fsynced_and_sidecar_in_place_before_the_mask(tmp_path: Path, monkeypatch) -> None:
    import medse.utils.atomic as atomic

    ref = _nifti(tmp_path / "ref.nii.gz", np.zeros((6, 7, 8)))
    synced: list[str] = []
    seen_at_rename: dict[str, bool] = {}
    real_fsync, real_replace = atomic.fsync_file, atomic.os.replace

    def fsync_file(p):
        synced.append(Path(p).name)
        real_fsync(p)

    def replace(a, b):
        if str(b).endswith(".nii.gz"):
            seen_at_rename[Path(b).name] = (tmp_path / "o" / "m.json").is_file()
        real_replace(a, b)

    monkeypatch.setattr(atomic, "fsync_file", fsync_file)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_label_like(np.ones((6, 7, 8), np.uint8), ref, tmp_path / "o" / "m.nii.gz")
    assert any(n.startswith(".tmp-m-") and n.endswith(".nii.gz") for n in synced)  # the mask, before its rename
    assert seen_at_rename == {"m.nii.gz": True}
    assert json.loads((tmp_path / "o" / "m.json").read_text())["mask_sha256"] == file_sha256(tmp_path / "o" / "m.nii.gz")


def test_predictor_built_in_code_and_nrrd_outputs_follow_the_same_rule(tmp_path: Path) -> None:
    """No run folder or checkpoint file: the model's state dict hash identifies it; NRRD masks via SimpleITK."""
    from medse.data.io import write_image
    from medse.data.preprocess import PreprocessConfig

    def predictor(bias: float) -> Predictor:
        net = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            net.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1))
            net.bias.copy_(torch.tensor([0.0, bias]))
        return Predictor(net, spatial_dims=3, in_channels=1, preprocess=PreprocessConfig(normalization="none"),
                         roi_size=[8, 8, 8], device="cpu")

    inp = tmp_path / "in"
    write_image(np.random.default_rng(0).normal(size=(9, 8, 7)).astype(np.float32), make_affine("lps"),
                inp / "a.nrrd")
    out = tmp_path / "out"
    rep = predict_folder(predictor(0.0), inp, out, progress=False)
    assert [p.name for p in rep.written] == ["a.nrrd"]
    side = json.loads((out / "a.json").read_text())
    assert side["run_dir"] is None and side["checkpoint_sha256"] is None and len(side["model_sha256"]) == 64
    assert predict_folder(predictor(0.0), inp, out, progress=False).skipped == ["a"]
    rep = predict_folder(predictor(0.5), inp, out, progress=False, echo=lambda _: None)
    assert "mask exists from another model" in rep.failed[0][1]
    data = (out / "a.nrrd").read_bytes()
    (out / "a.nrrd").write_bytes(data[: len(data) - 20])
    rep = predict_folder(predictor(0.0), inp, out, progress=False, echo=lambda _: None)
    assert rep.written and rep.redone and rep.redone[0][1].startswith("existing mask unreadable")
