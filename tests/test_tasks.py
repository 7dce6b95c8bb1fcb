"""The task table (medse.tasks) and the one device rule (medse.utils.device)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from medse.tasks import TaskSpec, get_task, list_tasks, register_task
from medse.utils.device import check_device, device_type, resolve_device
from medse.utils.errors import MedseError


def test_builtin_tasks_register_themselves_from_their_packages():
    seg, cls = get_task("segmentation"), get_task("classification")
    assert seg.training_task.__module__ == "medse.training.trainer"
    assert cls.training_task.__module__ == "medse.classify.train"
    assert cls.predictor().__name__ == "predict_run"
    assert seg.predictor().__qualname__ == "Predictor.from_run"
    assert {"segmentation", "classification"} <= set(list_tasks())


def test_run_module_imports_no_task():
    code = ("import sys, medse.runs; bad = [m for m in sys.modules if m.startswith(('medse.training', "
            "'medse.classify', 'medse.inference'))]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_task_and_a_second_registration():
    with pytest.raises(MedseError, match="unknown task 'detection'"):
        get_task("detection")
    seg = get_task("segmentation")
    assert register_task(seg) is seg  # the same spec again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("segmentation", seg.load_config, seg.build_model, object, seg.predict))


def test_device_rule():
    assert check_device(" CPU ") == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert device_type("cuda:1") == "cuda"
    with pytest.raises(MedseError, match=r"--device 'gpu': use auto, cpu, cuda or cuda:N"):
        check_device("gpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
        with pytest.raises(MedseError, match=r"config key 'train.device': 'cuda' requested but CUDA is not available"):
            resolve_device("cuda", setting="train.device")
        with pytest.raises(MedseError, match=r"^device 'cuda:0' requested but .*use device='cpu' or 'auto'$"):
            resolve_device("cuda:0")
