"""End to end (slow): train a tiny run on synthetic phantoms, ``medse predict`` its scans, ``medse evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest


@pytest.mark.slow
def test_train_predict_evaluate_on_synthetic_run(tmp_path: Path) -> None:
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medse.cli import main
    from medse.data.datasets import load_dataset
    from medse.data.synth import generate_dataset
    from medse.training import train

    data = generate_dataset(tmp_path / "data", n_cases=4, size=24, seed=0)
    run = train(
        {"data": {"root": str(data), "split": {"kind": "holdout", "val_fraction": 0.25, "test_fraction": 0.0,
                                               "seed": 0}},
         "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8, 16], "strides": [2, 2]}},
         "train": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 1, "patch_size": [16, 16, 16],
                   "device": "cpu", "progress": False, "tensorboard": False, "num_workers": 0}},
        tmp_path / "run",
    )
    spec = load_dataset(data)
    scans = tmp_path / "scans"
    scans.mkdir()
    for c in spec.cases:
        src = Path(c.images[0])
        (scans / f"{c.case_id}{src.name[len(src.name.split('.')[0]):]}").write_bytes(src.read_bytes())
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(run), "--input", str(scans), "--output", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    for c in spec.cases:
        mask = next(out.glob(f"{c.case_id}.nii*"))
        m, s = nib.load(str(mask)), nib.load(str(c.images[0]))
        assert m.shape == s.shape and m.get_data_dtype() == np.uint8
        np.testing.assert_allclose(m.affine, s.affine, atol=1e-5)
    ref = tmp_path / "refs"
    ref.mkdir()
    for c in spec.cases:
        src = Path(c.label)
        (ref / f"{c.case_id}{src.name[len(src.name.split('.')[0]):]}").write_bytes(src.read_bytes())
    ev = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(out), "--ref", str(ref), "--output", str(ev), "--no-progress"]) == 0
    df = pd.read_csv(ev / "metrics.csv")
    summary = json.loads((ev / "summary.json").read_text())
    assert set(df.case_id) == {c.case_id for c in spec.cases}
    assert "foreground" in summary and summary["num_cases"] == len(spec.cases)
    labels = sorted(int(v) for v in spec.labels.values() if int(v) != 0)
    k = max(labels) + 1
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    for c in spec.cases:
        p = np.asarray(nib.load(str(next(out.glob(f"{c.case_id}.nii*")))).dataobj).astype(np.int64)
        r = np.asarray(nib.load(str(c.label)).dataobj).astype(np.int64)
        d = metric(one_hot(torch.from_numpy(p)[None, None], k), one_hot(torch.from_numpy(r)[None, None], k))[0]
        got = df[(df.case_id == c.case_id) & (df.metric == "dice")].set_index("label_value").value
        for v in labels:
            pe, re_ = (p == v).any(), (r == v).any()
            if pe or re_:
                assert got[v] == pytest.approx(float(d[v - 1]), abs=1e-6)
