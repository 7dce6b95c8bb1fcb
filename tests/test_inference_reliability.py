"""`medse predict` when things go wrong: a full disk, a run without best.pt, SIGTERM mid-batch, a window the
network cannot take, colour pictures, and `--help` at 80 columns (issue 22, items 2, 3, 5 and 7)."""

from __future__ import annotations

import csv
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_train_reliability import fill  # the same filler as the training tests

from medse.cli import main

MEDSE = [sys.executable, "-m", "medse"]


def make_run(tmp_path: Path, *, dims: int = 3, name: str = "unet", kwargs: dict | None = None,
             patch: list[int] | None = None, checkpoints: tuple[str, ...] = ("best", "last"),
             infer: dict | None = None) -> Path:
    """A run folder as training makes it (``medse.testing.make_run``: ``Run.create``) holding a randomly
    initialised tiny network."""
    from medse.testing import make_run as make_tiny_run

    config = {
        "data": {"root": str(tmp_path), "preprocess": {"normalization": "zscore"}},
        "model": {"name": name, "spatial_dims": dims,
                  "kwargs": kwargs if kwargs is not None else {"channels": [4, 8], "strides": [2]}},
        "train": {"patch_size": patch or [16] * dims, "amp": False},
        "infer": infer or {"sw_batch_size": 2, "overlap": 0.25},
    }
    run = make_tiny_run(tmp_path / f"run_{name}{dims}d", config, labels={"background": 0, "organ": 1},
                        channel_names=["ct"], checkpoints=checkpoints)
    return run.path


def nifti(path: Path, shape: tuple[int, ...] = (20, 18, 16), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 1.1, 1.5, 1.0])), str(path))
    return path


def predict(run: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--run", str(run), "--input", str(inp), "--output", str(out), "--device", "cpu",
            "--no-progress", *extra]


def failures(out: Path) -> dict[str, str]:
    with open(out / "failures.csv") as f:
        return {r["case_id"]: r["error"] for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------- full disk
@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (as root); None where mounting is refused (the test then simulates ENOSPC)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                            capture_output=True).returncode == 0
    except OSError:
        ok = False
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_fails_each_case_in_one_line_naming_the_mask_and_leaves_nothing(tmp_path: Path, small_disk,
                                                                                   monkeypatch, capsys) -> None:
    run = make_run(tmp_path)
    inp = tmp_path / "scans"
    for i in range(2):  # uncompressed: each mask (~45 KiB) is larger than the space left
        nifti(inp / f"case{i}.nii", shape=(40, 36, 32), seed=i)
    img = sitk.GetImageFromArray(np.random.default_rng(5).normal(size=(48, 64, 64)).astype(np.float32))
    sitk.WriteImage(img, str(inp / "case_nrrd.nrrd"))  # ITK's writer: a short write, no errno
    if small_disk is not None:
        out = small_disk / "masks"
        filler = fill(small_disk, 8 * 1024)
    else:  # no mount: the mask writes fail with ENOSPC half way, as on a full disk
        import medse.data.io as io_mod

        out = tmp_path / "masks"
        real = io_mod.save_nifti

        def full_disk(image, path):
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(io_mod, "save_nifti", full_disk)
        for f in inp.glob("*.nrrd"):
            f.unlink()
    rc = main(predict(run, inp, out))
    err = capsys.readouterr().err
    assert rc == 1
    cases = sorted(p.name for p in inp.iterdir())
    for name in cases:
        cid = name.split(".")[0]
        target = out / name
        assert f"failed: {cid}: no space left on device, {target}" in err, err
    assert "Errno" not in err and "unexpected" not in err
    # nothing half-written: no mask, no sidecar, no temporary file; the failures are in failures.csv
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv"]
    assert set(failures(out)) == {n.split(".")[0] for n in cases}
    assert all(v.startswith("no space left on device, ") for v in failures(out).values())
    # space again: the same command writes them all
    if small_disk is not None:
        filler.unlink()
    else:
        monkeypatch.setattr(io_mod, "save_nifti", real)
    assert main(predict(run, inp, out)) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".json")) == cases


# ------------------------------------------------------------------------------------------- checkpoints
def test_run_without_best_pt_predicts_with_last_pt_and_says_so(tmp_path: Path, capsys) -> None:
    inp = nifti(tmp_path / "scans" / "a.nii.gz")
    run = make_run(tmp_path, checkpoints=("last",))
    assert main(predict(run, inp.parent, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert notes == [f"note: best.pt not found in {run / 'checkpoints'}; using last.pt (the latest weights)"]
    side = json.loads((tmp_path / "out" / "a.json").read_text())
    assert side["checkpoint"].endswith("last.pt")
    # only best.pt, last asked for: say which exists and how to pick it
    run_b = make_run(tmp_path / "b", checkpoints=("best",))
    assert main(predict(run_b, inp.parent, tmp_path / "out_b", "--checkpoint", "last")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run_b / 'checkpoints' / 'last.pt'}: checkpoint not found; the run has best.pt: pick "
                   "it with --checkpoint best")
    run_c = make_run(tmp_path / "c", checkpoints=())
    assert main(predict(run_c, inp.parent, tmp_path / "out_c")) == 2
    assert "the run has no checkpoint (training stopped before it saved one)" in capsys.readouterr().err
    assert not (tmp_path / "out_c").exists()


# ------------------------------------------------------------------------------------------- signals
def test_sigterm_mid_batch_stops_cleanly_and_the_printed_command_resumes(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path, infer={"sw_batch_size": 1, "overlap": 0.75})
    inp = tmp_path / "scans"
    n = 4
    for i in range(n):
        nifti(inp / f"case{i}.nii.gz", shape=(32, 32, 32), seed=i)
    out = tmp_path / "masks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSE_PROGRESS": "off"}
    proc = subprocess.Popen(MEDSE + predict(run, inp, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob("case*.nii.gz")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the batch ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, stderr
    assert lines[0].startswith("interrupted (SIGTERM): stopped at case ") and f"of {n} cases done" in lines[0]
    assert lines[0].endswith(f" in {out}")
    assert lines[1].startswith("resume with: medse predict --run ")
    masks = sorted(out.glob("case*.nii.gz"))
    assert 1 <= len(masks) < n
    done = int(lines[0].split(": ")[2].split(" of ")[0])
    assert done == len(masks)
    for m in masks:  # every mask under its final name is whole and has its sidecar; no temporary file
        assert np.asarray(nib.load(str(m)).dataobj).shape == (32, 32, 32)
        assert (out / m.name.replace(".nii.gz", ".json")).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    # the printed command continues: the finished cases are skipped, the rest written
    resume = shlex.split(lines[1][len("resume with: "):])
    assert resume[:2] == ["medse", "predict"]
    assert main(resume[1:]) == 0
    assert f"{n - len(masks)} written, {len(masks)} skipped" in capsys.readouterr().out
    assert len(list(out.glob("case*.nii.gz"))) == n


# ------------------------------------------------------------------------------------------- window
def test_unetr_window_is_checked_before_any_case_or_checkpoint_is_loaded(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path, name="unetr", patch=[32, 32, 32], checkpoints=(),
                   kwargs={"feature_size": 4, "hidden_size": 24, "mlp_dim": 24, "num_heads": 2})
    inp = tmp_path / "scans"
    inp.mkdir()
    (inp / "broken.nii.gz").write_bytes(b"not an image")  # would be a case failure if it were read
    out = tmp_path / "out"
    assert main(predict(run, inp, out, "--roi-size", "64,64,64")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --roi-size 64,64,64 does not fit the run's network unetr: its input size is fixed to "
                   "img_size 32,32,32 (the transformer's position embeddings); use --roi-size 32,32,32 or leave "
                   "--roi-size out")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- messages
def test_rgba_png_is_called_a_colour_image_and_2d_pictures_need_a_2d_run(tmp_path: Path, capsys) -> None:
    inp = tmp_path / "pics"
    inp.mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, size=(32, 32, 4)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(inp / "photo.png"))
    grey = np.random.default_rng(1).integers(0, 255, size=(32, 32)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(inp / "slice.png"))
    run2d = make_run(tmp_path, dims=2)
    out = tmp_path / "out2d"
    assert main(predict(run2d, inp, out)) == 1
    err = capsys.readouterr().err
    assert (f"failed: photo: {inp / 'photo.png'}: RGBA colour 2D image (32x32 pixels, 4 channels per pixel) where a "
            "single-channel image is expected") in err
    assert "4D image" not in err
    mask = sitk.ReadImage(str(out / "slice.png"))  # a grayscale picture is predicted by a 2D run
    assert mask.GetSize() == (32, 32)
    run3d = make_run(tmp_path)
    assert main(predict(run3d, inp / "slice.png", tmp_path / "out3d")) == 1
    assert "2D image (.png) but the run's network is 3D" in capsys.readouterr().err


def test_predict_help_at_80_columns_shows_every_option_name_whole(tmp_path: Path) -> None:
    import typer.main

    from medse.cli import app

    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80", "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run(MEDSE + ["predict", "--help"], capture_output=True, encoding="utf-8", env=env, timeout=120)
    assert res.returncode == 0
    assert max(len(ln) for ln in res.stdout.splitlines()) <= 80
    words = set(res.stdout.replace(",", " ").replace("│", " ").split())
    params = typer.main.get_command(app).commands["predict"].params
    for p in params:
        if not getattr(p, "hidden", False):
            for opt in (*p.opts, *p.secondary_opts):
                assert opt in words, f"{opt} is cut in `medse predict --help` at 80 columns"
    assert "…" not in res.stdout
    # the older long names are still accepted
    run = make_run(tmp_path)
    inp = nifti(tmp_path / "scans" / "a.nii.gz")
    assert main(predict(run, inp.parent, tmp_path / "out", "--largest-component", "--strict-nonfinite",
                        "--save-probabilities")) == 0
    side = json.loads((tmp_path / "out" / "a.json").read_text())
    assert side["settings"]["largest_component"] is True
    assert (tmp_path / "out" / "probabilities" / "a.nii.gz").is_file()
