"""``medse.export.export_nnunet``: a network trained by nnU-Net (medse's attention plans) exported from its results
folder + fold to ONNX and TorchScript, checked against the network nnU-Net's own predictor restores.

The results folder is real nnU-Net output, only tiny: plans made by medse's ``derive_plans`` (scSE) from a small
nnU-Net-style plans file, and ``fold_0/checkpoint_final.pth`` written by nnU-Net's ``nnUNetTrainer.save_checkpoint``
for its randomly initialised network (numpy numbers in the training log included). Needs nnunetv2
(``make setup-nnunet``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2")
pytest.importorskip("onnxruntime")

from medse.export import export_nnunet  # noqa: E402
from medse.utils.errors import MedseError  # noqa: E402

pytestmark = pytest.mark.nnunet

DATASET = "Dataset519_ExportTiny"
PATCH = [8, 16, 16]
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]  # anisotropic: sides must be multiples of 2, 4, 4


def _plans() -> dict:
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 3,
                            "strides": STRIDES, "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1],
                            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}}}
    resample = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [16] * 3, "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                                                              "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                                                              "std": 1.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": PATCH, "median_image_size_in_voxels": [16] * 3, "spacing": [1.0] * 3,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resample,
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": resample,
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": resample, "architecture": arch, "batch_dice": False}},
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``res/Dataset519_ExportTiny/nnUNetTrainer__nnUNetPlans_medse_scse__3d_fullres`` with fold 0."""
    import torch

    from medse.integrations.nnunet.plans import derive_plans

    root = tmp_path_factory.mktemp("nnunet_export")
    pre = root / "pre" / DATASET
    pre.mkdir(parents=True)
    dataset_json = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                    "numTraining": 2, "file_ending": ".nii.gz"}
    (pre / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    derive_plans(DATASET, ["scse"], preprocessed=root / "pre", attention_kwargs={"reduction": 2})
    plans = json.loads((pre / "nnUNetPlans_medse_scse.json").read_text())
    # nnU-Net's trainer reads the preprocessed folder's file type at initialise: one (empty) case file
    (pre / "nnUNetPlans_3d_fullres").mkdir()
    (pre / "nnUNetPlans_3d_fullres" / "case_000.b2nd").write_bytes(b"")
    env = {"nnUNet_preprocessed": str(root / "pre"), "nnUNet_raw": str(root / "raw"),
           "nnUNet_results": str(root / "res")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        torch.manual_seed(0)
        trainer = nnUNetTrainer(dict(plans, continue_training=False), "3d_fullres", 0, dataset_json,
                                device=torch.device("cpu"))
        trainer.initialize()  # builds the plans' network (medse's AttentionPlainConvUNet) with deep supervision
        trainer.logger.log("ema_fg_dice", np.float64(0.5), 0)  # numpy scalars, as a real training log has
        trainer._best_ema = np.float64(0.5)
        model = root / "res" / DATASET / "nnUNetTrainer__nnUNetPlans_medse_scse__3d_fullres"
        (model / "fold_0").mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(model / "fold_0" / "checkpoint_final.pth"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    shutil.copy(pre / "nnUNetPlans_medse_scse.json", model / "plans.json")
    shutil.copy(pre / "dataset.json", model / "dataset.json")
    return model


def _nnunet_network(model: Path):
    """The network nnU-Net's own predictor restores from the folder (its loader, its deep-supervision switch)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    pred.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    pred.network.load_state_dict(pred.list_of_parameters[0])
    return pred.network.eval()


def test_export_both_formats_match_nnunets_predictor_network(results: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    net = _nnunet_network(results)
    assert type(net).__name__ == "AttentionPlainConvUNet" and net.attention["decoder"] == "scse"
    x = torch.randn(1, 1, 12, 24, 28, generator=torch.Generator().manual_seed(3))  # a size the export did not see
    with torch.no_grad():
        ref = net(x).numpy()
    assert ref.shape == (1, 3, 12, 24, 28)

    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
        out = tmp_path / fmt
        res = export_nnunet(results, 0, fmt, out)
        assert res.model_path == out / name and res.model_path.is_file()
        assert [p["shape"] for p in res.parity] == [[2, 1, *PATCH], [1, 1, *PATCH], [2, 1, 10, 20, 20],
                                                    [1, 1, 10, 20, 20]]
        assert res.max_abs_diff <= 1e-4
        meta = json.loads((out / "export.json").read_text())
        assert meta["file"] == name and meta["format"] == fmt
        assert meta["configuration"] == "3d_fullres" and meta["fold"] == 0 and meta["trainer_name"] == "nnUNetTrainer"
        assert meta["network"].endswith("AttentionPlainConvUNet") and meta["plans_name"] == "nnUNetPlans_medse_scse"
        assert meta["spatial_sizes"]["multiple_of_per_axis"] == [2, 4, 4] and meta["spatial_sizes"]["multiple_of"] == 4
        assert meta["num_classes"] == 3 and meta["labels"] == {"background": 0, "liver": 1, "tumour": 2}
        assert meta["preprocessing"]["normalization_schemes"] == ["ZScoreNormalization"]
        assert meta["parity"]["max_abs_diff"] == res.max_abs_diff
        # the file, read without medse, gives nnU-Net's single full-resolution output (no deep supervision)
        if fmt == "onnx":
            sess = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"])
            got = sess.run(None, {"image": x.numpy()})[0]
        else:
            got = torch.jit.load(str(res.model_path)).eval()(x).detach().numpy()
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= 1e-4, fmt
    with pytest.raises(MedseError, match=r"already exists; pass --overwrite \(overwrite=True\)"):
        export_nnunet(results, 0, "onnx", tmp_path / "onnx")
    assert export_nnunet(results, 0, "onnx", tmp_path / "onnx", overwrite=True).max_abs_diff <= 1e-4


def test_missing_fold_checkpoint_and_bundle_are_one_line_errors(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(MedseError) as e:
        export_nnunet(results, 3, "onnx", out)
    msg = str(e.value)
    assert "\n" not in msg and "no fold 3" in msg and "folds: 0" in msg and str(results / "fold_3") in msg
    with pytest.raises(MedseError) as e:
        export_nnunet(results, 0, "torchscript", out, checkpoint="checkpoint_best.pth")
    assert "\n" not in str(e.value) and "checkpoint_final.pth" in str(e.value)
    with pytest.raises(MedseError, match="onnx or torchscript"):
        export_nnunet(results, 0, "bundle", out)
    # a checkpoint that needs more than numpy's numbers to unpickle is refused, not loaded with weights_only=False
    import torch

    (results / "fold_1").mkdir()
    try:
        torch.save({"network_weights": {}, "init_args": {"where": Path("x")}}, results / "fold_1" / "checkpoint_final.pth")
        with pytest.raises(MedseError) as e:
            export_nnunet(results, 1, "onnx", out)
        assert "\n" not in str(e.value) and "weights_only=True" in str(e.value) and "PosixPath" in str(e.value)
    finally:
        shutil.rmtree(results / "fold_1")
    assert not out.exists()  # nothing written


def test_cli_exports_an_nnunet_fold_and_names_the_fold_when_missing(results: Path, tmp_path: Path, capsys) -> None:
    """``medse export RESULTS --fold 0 --format onnx`` exports the fold as the Python API does; without
    ``--fold`` it says to name one, and an existing output is refused naming --overwrite, each in one line."""
    from medse.cli import main

    def export(*args: str) -> tuple[int, str]:
        code = main(["export", *args])
        return code, capsys.readouterr().err

    out = tmp_path / "cli"
    code, err = export(str(results), "--fold", "0", "--format", "onnx", "--output", str(out))
    assert code == 0, err
    meta = json.loads((out / "export.json").read_text())
    assert meta["fold"] == 0 and meta["format"] == "onnx" and meta["parity"]["max_abs_diff"] <= 1e-4
    assert (out / "model.onnx").is_file()
    code, err = export(str(results), "--format", "onnx", "--output", str(tmp_path / "x"))
    assert code == 2 and "name the fold to export with --fold" in err and err.count("\n") == 1, err
    code, err = export(str(results), "--fold", "0", "--format", "onnx", "--output", str(out))
    assert code == 2 and "pass --overwrite" in err and err.count("\n") == 1, err
    code, err = export(str(results), "--fold", "7", "--format", "torchscript", "--output", str(tmp_path / "y"))
    assert code == 2 and "no fold 7" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
