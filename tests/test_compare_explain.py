"""``medse explain``: gate maps of spatial-gate blocks written as NIfTI in the scan's space and as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medse.networks")
pytest.importorskip("medse.inference")

from medse import testing  # noqa: E402
from medse.compare.explain import explain, gate_layers  # noqa: E402
from medse.runs import Run  # noqa: E402
from medse.utils.errors import MedseError  # noqa: E402


def make_run(tmp_path: Path, attention: str = "scse", spatial_dims: int = 3, name: str = "run") -> Run:
    """A tiny U-Net run with randomly initialised (seeded) weights (:func:`medse.testing.make_run`)."""
    patch = [16, 16, 16] if spatial_dims == 3 else [16, 16]
    config = {"model": {"name": "unet", "spatial_dims": spatial_dims, "attention": attention,
                        "kwargs": {"channels": [4, 8, 16], "strides": [2, 2]}},
              "train": {"patch_size": patch, "device": "cpu"}}
    return testing.make_run(tmp_path / name, config, labels={"background": 0, "a": 1, "b": 2}, channel_names=["t1"])


def make_scan(tmp_path: Path, shape=(20, 17, 13)) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, size=shape).astype(np.float32)
    data[5:12, 4:10, 3:9] += 80
    # a non-trivial affine: permuted / flipped axes with anisotropic spacing and an offset
    affine = np.array([[0.0, -1.2, 0.0, 10.0], [0.0, 0.0, 2.0, -5.0], [0.9, 0.0, 0.0, 3.0], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path, affine


def test_explain_scse_3d_writes_maps_in_scan_space(tmp_path):
    run = make_run(tmp_path)
    scan, affine = make_scan(tmp_path)
    res = explain(run, scan, tmp_path / "maps")
    from medse.inference import Predictor

    n_gates = len(gate_layers(Predictor.from_run(run, device="cpu").model))
    assert n_gates == len(res.layers) == len(res.nifti) == len(res.png) >= 4
    for p in res.nifti:
        img = nib.load(p)
        assert img.shape == (20, 17, 13)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        g = np.asarray(img.dataobj)
        assert np.isfinite(g).all() and g.min() >= 0.0 and g.max() <= 1.0  # sigmoid gates
        assert g.std() > 0  # a spatial map, not a constant
    for p in [*res.png, res.montage]:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size < 200_000
    summary = json.loads(res.summary.read_text())
    assert [layer["name"] for layer in summary["layers"]] == res.layers
    assert all(0.0 <= layer["mean"] <= 1.0 for layer in summary["layers"])


def test_explain_matches_direct_gate_at_full_resolution(tmp_path):
    """The first encoder gate equals the block's own last_gate, upsampled to the input and mapped to the scan grid."""
    import torch.nn.functional as F

    from medse.data.preprocess import invert_to_original, preprocess_case
    from medse.inference import Predictor

    run = make_run(tmp_path)
    scan, _ = make_scan(tmp_path, shape=(16, 16, 16))  # already a multiple of the size divisor: no padding
    res = explain(run, scan, tmp_path / "maps", layers=[0])
    pred = Predictor.from_run(run, device="cpu")
    img, _, props = preprocess_case([scan], None, pred.preprocess, expected_channels=1)
    name, mod = gate_layers(pred.model)[0]
    mod.record_gate = True
    with torch.no_grad():
        pred.model(torch.from_numpy(img)[None])
    gate = mod.last_gate
    assert tuple(gate.shape[2:]) == (8, 8, 8)  # MONAI's U-Net: the first down layer has stride 2
    direct = F.interpolate(gate, size=(16, 16, 16), mode="trilinear", align_corners=False)[0, 0].numpy()
    expected = invert_to_original(direct, props, is_label=False)
    got = np.asarray(nib.load(res.nifti[0]).dataobj)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert name == "model.0.1" and res.layers == ["encoder.0"]  # named by position, not by module path
    assert json.loads(res.summary.read_text())["layers"][0]["module"] == name


def test_explain_2d_network_and_layer_selection(tmp_path):
    run = make_run(tmp_path, attention="sse", spatial_dims=2)
    scan, _ = make_scan(tmp_path)
    res = explain(run, scan, tmp_path / "maps2d", layers=["-1", 0])
    assert len(res.nifti) == 2
    g = np.asarray(nib.load(res.nifti[0]).dataobj)
    assert g.shape == (20, 17, 13) and np.isfinite(g).all()


def test_explain_errors(tmp_path):
    scan, _ = make_scan(tmp_path)
    cse_run = make_run(tmp_path, attention="cse", name="cse")
    with pytest.raises(MedseError, match="no spatial-gate block"):
        explain(cse_run, scan, tmp_path / "x")
    run = make_run(tmp_path, name="scse")
    with pytest.raises(MedseError, match="out of range"):
        explain(run, scan, tmp_path / "x", layers=[99])
    with pytest.raises(MedseError, match="no gate layer"):
        explain(run, scan, tmp_path / "x", layers=["model.nope"])
    with pytest.raises(MedseError, match="not found"):
        explain(run, tmp_path / "missing.nii.gz", tmp_path / "x")


# ----------------------------------------------------------------------------- issue 22 item 8, issue 21 item 7
def _cli(*args: str) -> int:
    from medse.cli import main

    return main([str(a) for a in args])


def test_cli_explain_layers_0_replaces_an_earlier_full_run(tmp_path, capsys):
    run = make_run(tmp_path)
    scan, _ = make_scan(tmp_path)
    out = tmp_path / "maps"
    assert _cli("explain", "--run", run, "--image", scan, "-o", out) == 0
    full = sorted(p.name for p in out.iterdir())
    assert len([n for n in full if n.endswith(".nii.gz")]) >= 4
    (out / "notes.txt").write_text("mine")  # not medse's: kept
    capsys.readouterr()
    assert _cli("explain", "--run", run, "--image", scan, "-o", out, "--layers", "0") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["notes.txt", "scan_gate00_encoder_0.nii.gz", "scan_gate00_encoder_0.png", "scan_gates.json",
                     "scan_gates.png"], names  # was: the 4 old NIfTI/PNG pairs kept beside the new one
    summary = json.loads((out / "scan_gates.json").read_text())
    assert [layer["name"] for layer in summary["layers"]] == ["encoder.0"]
    assert "encoder.0:" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--axis", "5"], ["--slice", "999"], ["--axis", "-1"]])
def test_cli_explain_bad_axis_or_slice_exit_2_and_create_nothing(tmp_path, capsys, args):
    run = make_run(tmp_path)
    scan, _ = make_scan(tmp_path)
    out = tmp_path / "new" / "maps"
    assert _cli("explain", "--run", run, "--image", scan, "-o", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and args[0] in err, err
    assert not (tmp_path / "new").exists()  # was: an empty folder left behind


def test_explain_layer_names_are_positions_and_layout_does_not_overlap(tmp_path):
    from medse.compare.explain import gate_montage_figure, gate_overlay_figure, layer_names
    from medse.compare.figures import block_colors
    from medse.inference import Predictor

    run = make_run(tmp_path, attention="scse")
    model = Predictor.from_run(run, device="cpu").model
    names = layer_names(model, gate_layers(model))
    assert names == ["encoder.0", "encoder.1", "bottleneck", "decoder.0"], names
    scan = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    gate = np.linspace(0, 1, scan.size).reshape(scan.shape).astype(np.float32)
    title = "decoder.0: scse gate"
    fig = gate_overlay_figure(scan, gate, 2, 3, title, aspect=1.28, color=block_colors(["none", "scse"])["scse"])
    fig.canvas.draw()
    ax, cax = fig.axes
    assert ax.get_title() == title and ax.get_aspect() == pytest.approx(1.28)
    r = fig.canvas.get_renderer()
    t, c = ax.title.get_window_extent(r), cax.get_window_extent(r)
    assert not t.overlaps(c), (t, c)  # was: the title ran into the colour bar
    fig = gate_montage_figure(scan, [gate] * 4, [f"{n}: scse gate" for n in names], 2, 3, aspect=1.28)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    panels = [a for a in fig.axes if a.get_visible() and a.images]
    assert [a.get_title() for a in panels] == ["scan", *[f"{n}: scse gate" for n in names]]
    boxes = [a.title.get_window_extent(r) for a in panels] + [a.get_window_extent(r) for a in fig.axes
                                                              if not a.images and a.get_visible()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_explain_slices_use_the_voxel_aspect(tmp_path, monkeypatch):
    """A 3 x 3.84 mm in-plane grid: the PNG panels are drawn with aspect 3.84 / 3 (rows / columns)."""
    import medse.compare.explain as ex
    from medse.compare.figures import slice_aspect

    assert slice_aspect((3.0, 3.84, 1.0), 2) == pytest.approx(3.84 / 3.0)
    assert slice_aspect((3.0, 3.84, 5.0), 0) == pytest.approx(5.0 / 3.84)
    assert slice_aspect(None, 1) == 1.0
    figs = []
    for name in ("gate_overlay_figure", "gate_montage_figure"):
        real = getattr(ex, name)
        monkeypatch.setattr(ex, name, lambda *a, _real=real, **k: figs.append(_real(*a, **k)) or figs[-1])
    run = make_run(tmp_path)
    path = tmp_path / "aniso.nii.gz"
    data = np.random.default_rng(1).normal(size=(16, 12, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.84, 2.0, 1.0])), path)
    explain(run, path, tmp_path / "maps", layers=[0])
    assert len(figs) == 2
    for fig in figs:
        for ax in fig.axes:
            if ax.images:
                assert ax.get_aspect() == pytest.approx(3.84 / 3.0)  # was: 1 (square voxels drawn)
