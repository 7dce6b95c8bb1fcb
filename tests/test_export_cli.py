"""``medse export`` (ONNX, TorchScript, MONAI bundle) and ``medse predict --model`` on a run trained through the
CLI (issue 24).

One tiny run (3D U-Net with scSE, 16-voxel patch, one step, foreground crop with a margin, largest component) is
trained in a module fixture, exported through the command line, and the written files are checked here
independently of the command's own parity check: at batch 1 and 2 and at two spatial sizes against the eager
network, the TorchScript file in a Python that cannot import medse, the masks of ``medse predict --model
model.onnx`` and of the bundle run by ``monai.bundle`` against ``medse predict``'s (one scan stored LPS-flipped).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medse.cli import main

#: (batch, spatial) pairs checked against the eager network: two batch sizes, two spatial sizes (multiples of 8)
SHAPES = [(1, (16, 16, 16)), (2, (16, 16, 16)), (1, (24, 32, 16)), (2, (24, 32, 16))]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medse.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("export")
    data = generate_dataset(root / "ph", n_cases=3, size=20, seed=0, anisotropy=False)
    cfg = {
        "data": {"root": str(data), "split": {"kind": "holdout", "val_fraction": 0.34, "test_fraction": 0.0,
                                              "seed": 0}, "cache": "memory"},
        "augment": {k: {"p": 0.0} for k in ("affine", "bias_field", "noise", "gamma")},
        "model": {"name": "unet", "spatial_dims": 3, "attention": "scse"},
        "train": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "patch_size": [16, 16, 16],
                  "device": "cpu", "num_threads": 1, "progress": False, "tensorboard": False, "val_every": 1,
                  "val_max_cases": 1},
        "infer": {"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 3, "largest_component": True},
    }
    cfg["data"]["preprocess"] = {"crop_foreground": True, "crop_margin": 2}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(root / "config.yaml"), "--output", str(root / "run")]) == 0
    return root / "run"


def _eager(run: Path) -> torch.nn.Module:
    from medse.runs import Run

    return Run.open(run).load_model("best").eval()


def _inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(b, 1, *s, generator=gen) for b, s in SHAPES]


def _export(run: Path, fmt: str, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["export", str(run), "--format", fmt, "--output", str(out), *extra])
    o, e = capsys.readouterr()
    return code, o, e


def test_onnx_export_has_dynamic_axes_and_matches_torch(run, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "onnx"
    code, stdout, err = _export(run, "onnx", out, capsys)
    assert code == 0, err
    assert "ONNX opset 17" in stdout and stdout.count("parity onnxruntime vs torch") == 4, stdout
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "onnx" and meta["opset"] == 17 and meta["input"]["example_shape"] == [2, 1, 16, 16, 16]
    assert meta["run_dir"] == str(run.resolve()) and meta["medse_version"]
    assert 0 <= meta["parity"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "x", "y", "z"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model = _eager(run)
    for x in _inputs():
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_torchscript_loads_without_medse_and_matches_torch(run, tmp_path, capsys):
    out = tmp_path / "ts"
    code, stdout, err = _export(run, "torchscript", out, capsys)
    assert code == 0, err
    assert stdout.count("parity torch.jit.load vs torch") == 4, stdout
    xs = _inputs()
    torch.save(xs, tmp_path / "inputs.pt")
    script = ("import sys; sys.modules['medse'] = None\n"
              "import torch\n"
              f"m = torch.jit.load({str(out / 'model.ts')!r})\n"
              f"xs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)\n"
              "with torch.no_grad():\n"
              f"    torch.save([m(x) for x in xs], {str(tmp_path / 'outputs.pt')!r})\n"
              "try:\n    import medse\nexcept ImportError:\n    print('medse not importable')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "medse not importable" in proc.stdout
    outs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    model = _eager(run)
    for x, got in zip(xs, outs, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=0)


def test_existing_output_is_refused_unless_overwrite_and_a_failed_parity_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "onnx"
    code, _, err = _export(run, "onnx", out, capsys, "--tolerance", "1e-12")  # the trace differs by ~1e-7
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "above the tolerance 1e-12" in err, err
    assert not out.exists() or not list(out.iterdir())
    assert _export(run, "onnx", out, capsys)[0] == 0
    before = (out / "model.onnx").stat().st_mtime_ns
    code, _, err = _export(run, "onnx", out, capsys)
    assert code == 2 and err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert str(out / "model.onnx") in err
    assert (out / "model.onnx").stat().st_mtime_ns == before
    code, _, err = _export(run, "torchscript", out, capsys)  # another format's export.json in the folder
    assert code == 2 and "export.json" in err and "folder of its own" in err, err
    code, _, err = _export(run, "onnx", out, capsys, "--overwrite")
    assert code == 0, err
    assert (out / "model.onnx").stat().st_mtime_ns != before


def test_bad_format_and_bad_run_are_one_line_errors(run, tmp_path, capsys):
    code, _, err = _export(run, "onx", tmp_path / "o", capsys)
    assert code == 2 and err.strip() == "error: unknown export format 'onx'. Did you mean 'onnx'? Available: " \
        "onnx, torchscript, bundle"
    code, _, err = _export(tmp_path / "no_run", "onnx", tmp_path / "o", capsys)
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "no_run") in err, err
    assert not (tmp_path / "o").exists()


def test_fold_is_for_nnunet_results_folders_only(run, tmp_path, capsys):
    """``--fold`` names a fold of an nnU-Net results folder: refused on a medse run; an nnU-Net folder (plans.json)
    without it is told to name one; both in one line, before anything is written."""
    code, _, err = _export(run, "onnx", tmp_path / "o", capsys, "--fold", "0")
    assert code == 2 and err.count("\n") == 1 and "--fold applies to an nnU-Net results folder" in err, err
    nn = tmp_path / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (nn / "fold_0").mkdir(parents=True)
    (nn / "plans.json").write_text("{}")
    code, _, err = _export(nn, "onnx", tmp_path / "o", capsys)
    assert code == 2 and err.count("\n") == 1 and "name the fold to export with --fold" in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def scans(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three scans: a phantom as generated, one stored with its x and y axes flipped (an LPS voxel order), one
    with a zero slab and a NaN voxel."""
    import nibabel as nib

    from medse.data.datasets import load_dataset

    folder = tmp_path_factory.mktemp("scans")
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    cases = load_dataset(data).cases
    (folder / f"{cases[0].case_id}.nii.gz").write_bytes(Path(cases[0].images[0]).read_bytes())
    img = nib.load(str(cases[1].images[0]))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [arr.shape[0] - 1, arr.shape[1] - 1]
    nib.save(nib.Nifti1Image(arr[::-1, ::-1].copy(), img.affine @ flip), str(folder / "flipped.nii.gz"))
    zeros = arr.copy()  # a zero slab (outside the z-score foreground) and a NaN voxel (replaced)
    zeros[:4] = 0
    zeros[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(zeros, img.affine), str(folder / "zeros_nan.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def torch_masks(run: Path, scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torch_masks")
    assert main(["predict", "--run", str(run), "--input", str(scans), "--output", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    return out


def _assert_same_masks(ref: Path, got: Path) -> None:
    """Same files, shapes and affines; Dice >= 0.999 for every label present in either mask."""
    import nibabel as nib

    names = sorted(f.name for f in ref.glob("*.nii.gz"))
    assert names and names == sorted(f.name for f in got.glob("*.nii.gz"))
    for name in names:
        a, b = nib.load(str(ref / name)), nib.load(str(got / name))
        x, y = np.asarray(a.dataobj), np.asarray(b.dataobj)
        assert x.shape == y.shape and np.allclose(a.affine, b.affine, atol=1e-5)
        assert x.any()
        for label in np.union1d(np.unique(x), np.unique(y)):
            if label == 0:
                continue
            dice = 2 * ((x == label) & (y == label)).sum() / ((x == label).sum() + (y == label).sum())
            assert dice >= 0.999, (name, int(label), dice)


def test_predict_with_the_onnx_model_gives_medse_predicts_masks(run, scans, torch_masks, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert _export(run, "onnx", out, capsys)[0] == 0
    common = ["--run", str(run), "--input", str(scans), "--device", "cpu", "--no-progress"]
    assert main(["predict", *common, "--output", str(tmp_path / "ort"), "--model", str(out / "model.onnx")]) == 0
    capsys.readouterr()
    _assert_same_masks(torch_masks, tmp_path / "ort")
    side = json.loads((tmp_path / "ort" / "flipped.json").read_text())
    assert side["checkpoint"] == str((out / "model.onnx").resolve())
    code = main(["predict", *common, "--output", str(tmp_path / "o2"), "--model", str(tmp_path / "m.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "m.txt" in err, err
    # a window the trace's frozen padding does not fit (sides must be multiples of the U-Net's divisor 8)
    code = main(["predict", *common, "--output", str(tmp_path / "o3"), "--model", str(out / "model.onnx"),
                 "--roi-size", "16,16,20"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "multiples of 8" in err and "model.onnx" in err, err


def test_monai_bundle_runs_and_writes_medse_predicts_masks(run, scans, torch_masks, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    code, stdout, err = _export(run, "bundle", bundle, capsys)
    assert code == 0, err
    assert "MONAI bundle" in stdout and stdout.count("parity torch.jit.load vs torch") == 4, stdout
    for f in ("configs/inference.json", "configs/metadata.json", "models/model.ts", "models/model.pt",
              "scripts/medse_transforms.py", "export.json"):
        assert (bundle / f).is_file(), f
    masks = tmp_path / "masks"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    # the bundle as its users run it: MONAI's command line (needs `fire`, in medse's export extra)
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--input_dir", str(scans), "--output_dir", str(masks)],
                          capture_output=True, text=True, timeout=180, cwd=bundle, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = ("from monai.bundle import verify_net_in_out\n"
              "verify_net_in_out(net_id='network_def', meta_file='configs/metadata.json', "
              "config_file='configs/inference.json', device='cpu')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=bundle,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_masks(torch_masks, masks)
    code, _, err = _export(run, "bundle", bundle, capsys)
    assert code == 2 and err.count("\n") == 1 and "pass --overwrite" in err, err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = _export(run, "bundle", tmp_path / "other", capsys, "--overwrite")
    assert code == 2 and "not a MONAI bundle" in err and (tmp_path / "other" / "notes.txt").is_file(), err
    assert _export(run, "bundle", bundle, capsys, "--overwrite")[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
