"""The ``medse`` console script on failure, as a user sees it (issue 11, item 1).

Every test runs the real CLI in a subprocess (the installed ``medse`` console script when it is there, else
``python -m medse``) with this checkout on PYTHONPATH, and checks stderr: usage errors are Typer's own
(usage line, "No such option" / "No such command", suggestion, exit 2); other failures are one line
``error: ...`` naming the file, without a traceback; unexpected errors say so and point to ``--debug``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("medse")
MEDSE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "medse"]
# what `import click` does on a fresh install of a recent typer (0.29 vendors click as typer._click): fail
NO_CLICK = [sys.executable, "-c",
            "import sys; sys.modules['click'] = None; sys.argv[0] = 'medse'; from medse.cli import _entry; _entry()"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDSE_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "MEDSE_PROGRESS": "off"})
    env.update(extra)
    return env


def run_cli(*args: str, cmd: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*(cmd or MEDSE), *map(str, args)], cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == rc, (proc.returncode, err)
    assert "Traceback" not in err and "click" not in err, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)
    return lines[0]


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err and "ModuleNotFoundError" not in err, err
    assert "Usage: medse" in err, err
    for n in needles:
        assert n in err, (n, err)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medse.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("cli") / "d", n_cases=4, size=16, seed=0)


def _config(data: Path, **train) -> dict:
    t = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "patch_size": [16, 16, 16], "device": "cpu",
         "tensorboard": False, "progress": False}
    t.update(train)
    return {"data": {"root": str(data), "split": {"val_fraction": 0.5, "seed": 1}},
            "model": {"name": "unet", "spatial_dims": 3, "attention": "scse", "kwargs": {"channels": [4, 8, 16]}},
            "train": t, "infer": {"roi_size": [16, 16, 16]}}


@pytest.fixture(scope="module")
def cfg_path(data, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(yaml.safe_dump(_config(data)))
    return p


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    from medse.training import train

    return train(_config(data), tmp_path_factory.mktemp("run") / "r")


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write into: a chmod 0555 folder, or for root (who ignores modes) ``/sys``."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    for cand in (d, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=cand)
        except OSError:
            yield cand
            break
        os.close(fd)
        os.unlink(probe)
    else:
        pytest.skip("no read-only folder on this machine")
    d.chmod(0o755)


# ----------------------------------------------------------------------------- usage errors: Typer's own
@pytest.mark.parametrize("cmd", [None, NO_CLICK], ids=["console-script", "click-unimportable"])
def test_usage_errors_look_like_typer(cmd):
    assert_usage_error(run_cli("trian", cmd=cmd), "No such command 'trian'", "Did you mean 'train'")
    assert_usage_error(run_cli("predict", "--bogus", cmd=cmd), "No such option: --bogus")
    assert_usage_error(run_cli("predict", "--overwirte", cmd=cmd), "No such option: --overwirte", "--overwrite")
    assert_usage_error(run_cli("predict", "--input", "x", cmd=cmd), "Missing option")
    proc = run_cli("--help", cmd=cmd)
    assert proc.returncode == 0 and "train" in proc.stdout and "--debug" in proc.stdout


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--roi-size", "-5,64,64", ">= 1"), ("--roi-size", "0,64,64", ">= 1"), ("--roi-size", "a,b", "integers"),
     ("--sw-batch-size", "0", "greater than or equal to 1"), ("--overlap", "1.5", "0 <= x < 1"),
     ("--overlap", "-0.1", "0 <= x < 1")],
)
def test_predict_rejects_bad_sizes_before_any_work(tmp_path, option, value, needle):
    proc = run_cli("predict", "--run", tmp_path / "nope", "-i", tmp_path / "nope", "-o", tmp_path / "out",
                   option, value)
    assert_usage_error(proc, f"Invalid value for '{option}'", needle)
    assert not (tmp_path / "out").exists()


def test_cli_does_not_import_click():
    import medse.cli  # noqa: F401  (the module and every command module)

    code = ("import sys; sys.modules['click'] = None; from medse.cli import main; "
            "rc = main(['models', '--help']); assert rc == 0, rc; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_typer_version_within_the_tested_range():
    """pyproject caps typer at the versions whose behaviour these tests pin (standalone-mode error output)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import typer
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "typer")
    assert any(s.operator == "<" for s in req.specifier), f"typer has no upper cap: {req}"
    assert req.specifier.contains(typer.__version__), (typer.__version__, str(req))


# ----------------------------------------------------------------------------- one-line errors
def test_train_into_read_only_folder(cfg_path, readonly_dir):
    out = readonly_dir / "run"
    line = assert_one_line_error(run_cli("train", "-c", cfg_path, "-o", out), str(out), "cannot write into the output folder")
    assert "Traceback" not in line and not out.exists()


def test_train_output_is_a_file(cfg_path, tmp_path):
    f = tmp_path / "taken.txt"
    f.write_text("x")
    assert_one_line_error(run_cli("train", "-c", cfg_path, "-o", f), str(f), "is a file")
    assert f.read_text() == "x"


def test_train_unknown_block_one_line_and_no_folder(cfg_path, tmp_path):
    out = tmp_path / "r"
    assert_one_line_error(run_cli("train", "-c", cfg_path, "-o", out, "model.attention=scsee"),
                          "config key 'model'", "Did you mean 'scse'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.name=unett"], "config key 'model' (name 'unett'"),
    (["model.attention=se", "model.kwargs={channels: [2, 4, 8]}"], "reduction=16"),
    (["model.name=fc_densenet", "model.spatial_dims=2", "train.patch_size=[16,16]", "train.batch_size=1",
      "infer.roi_size=[16,16]", "model.kwargs={}"], "config key 'train.patch_size' [16, 16] (batch 1"),
    (["train.device=cuda"], "config key 'train.device': 'cuda' requested but CUDA is not available"),
    (["train.device=cuda:7"], "config key 'train.device'"),
    (["infer.roi_size=[0,0,0]"], ">= 1"),
    (["infer.roi_size=[16,-5,16]"], ">= 1"),
    (["train.patch_size=[16,-16,16]"], ">= 1"),
])
def test_train_config_errors_one_line_and_no_folder(cfg_path, tmp_path, capsys, monkeypatch, overrides, needle):
    """The same errors in-process (medse.cli.main, the console script's code) to keep the test fast; each is
    found before the run folder is ever created (not created and then removed)."""
    import torch

    from medse.cli import main
    from medse.training import trainer

    if "cuda" in overrides[0] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    created: list[Path] = []
    create = trainer._create_run_dir
    monkeypatch.setattr(trainer, "_create_run_dir", lambda out, *a: (created.append(out), create(out, *a)))
    out = tmp_path / "r"
    assert main(["train", "-c", str(cfg_path), "-o", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert created == [] and list(tmp_path.iterdir()) == []


def test_predict_device_cuda_without_cuda(run_dir, data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "masks"
    proc = run_cli("predict", "--run", run_dir, "-i", data / "images", "-o", out, "--device", "cuda")
    assert_one_line_error(proc, "--device 'cuda'", "CUDA is not available", "--device cpu")
    assert not out.exists()


def test_predict_output_is_a_file_or_read_only(run_dir, data, tmp_path, readonly_dir):
    f = tmp_path / "taken.nii.gz"
    f.write_bytes(b"not a folder")
    assert_one_line_error(run_cli("predict", "--run", run_dir, "-i", data / "images", "-o", f), str(f), rc=2)
    assert f.read_bytes() == b"not a folder"
    out = readonly_dir / "masks"
    assert_one_line_error(run_cli("predict", "--run", run_dir, "-i", data / "images", "-o", out), str(out))


def test_evaluate_output_is_a_file_or_read_only(data, tmp_path, readonly_dir):
    labels = tmp_path / "labels"
    shutil.copytree(data / "labels", labels)
    f = tmp_path / "taken"
    f.write_text("x")
    assert_one_line_error(run_cli("evaluate", "--pred", labels, "--ref", data, "-o", f), str(f))
    out = readonly_dir / "eval"
    assert_one_line_error(run_cli("evaluate", "--pred", labels, "--ref", data, "-o", out), str(out))


def test_missing_config_file_and_debug_traceback(tmp_path):
    missing = tmp_path / "nope.yaml"
    line = assert_one_line_error(run_cli("train", "-c", missing, "-o", tmp_path / "r"), str(missing))
    for proc in (run_cli("--debug", "train", "-c", missing, "-o", tmp_path / "r"),
                 run_cli("train", "-c", missing, "-o", tmp_path / "r", MEDSE_DEBUG="1")):
        assert proc.returncode == 2
        assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1] == line


_BOOM = ("import sys; sys.argv[0] = 'medse'; import medse.cli as c\n"
         "@c.app.command('boom')\n"
         "def boom():\n"
         "    raise RuntimeError('the kernel broke\\nsecond line')\n"
         "sys.exit(c.main(sys.argv[1:]))\n")


def test_unexpected_error_one_line_with_debug_hint():
    proc = run_cli("boom", cmd=[sys.executable, "-c", _BOOM])
    line = assert_one_line_error(proc, rc=1)
    assert line == ("error: unexpected RuntimeError: the kernel broke second line (run with --debug or "
                    "MEDSE_DEBUG=1 for the traceback)")
    proc = run_cli("--debug", "boom", cmd=[sys.executable, "-c", _BOOM])
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "in boom" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: unexpected RuntimeError: the kernel broke second line"


def test_os_errors_name_the_path(monkeypatch, capsys):
    import medse.cli as c

    def fail(exc):
        def f() -> None:
            raise exc
        return f

    cases = [
        (PermissionError(13, "Permission denied", "/data/out/a.nii.gz"), "Permission denied, /data/out/a.nii.gz"),
        (IsADirectoryError(21, "Is a directory", "/data/x"), "Is a directory, /data/x"),
        (NotADirectoryError(20, "Not a directory", "/data/f/x"), "Not a directory, /data/f/x"),
        (OSError(18, "Invalid cross-device link", "/a", None, "/b"), "Invalid cross-device link, /a -> /b"),
        (OSError("disk on fire"), "disk on fire"),
    ]
    for i, (exc, text) in enumerate(cases):
        c.app.command(f"fail{i}")(fail(exc))
        assert c.main([f"fail{i}"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {text}\n", err


# ----------------------------------------------------------------------------- messages that mislead (issue 22, item 7)
def test_command_line_typo_is_blamed_on_the_override_not_the_file(cfg_path, tmp_path, capsys):
    from medse.cli import main

    assert main(["train", "-c", str(cfg_path), "-o", str(tmp_path / "r"), "train.epoch=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: command-line override 'train.epoch=2': unknown config key 'train.epoch'. "
                   "Did you mean 'epochs'?"), err
    bad = tmp_path / "bad.yaml"  # the same typo in the file is the file's
    bad.write_text(yaml.safe_dump({**_config(Path("/nowhere")), "train": {"epoch": 2}}))
    assert main(["train", "-c", str(bad), "-o", str(tmp_path / "r"), "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "unknown config key 'train.epoch'" in err and "override" not in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "-1", "0"])
def test_non_finite_or_negative_lr_refused_by_the_config_check(cfg_path, tmp_path, capsys, value):
    from medse.cli import main

    assert main(["train", "-c", str(cfg_path), "-o", str(tmp_path / "r"), f"train.lr={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr" in err and f"override 'train.lr={value}'" in err, err
    assert "Invalid learning rate" not in err and not (tmp_path / "r").exists()


_GATE_PLUGIN = '''
import torch
from torch import nn

from medse.attention import register_attention


@register_attention("my_gate", paper="Doe. A gate. 2025", year=2025, repo="https://example.org/gate",
                    params_formula="C", spatial_dims=(2, 3), defaults={}, extension="none",
                    params_fn=lambda c, d, **_: c)
class MyGate(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, **kwargs) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(in_channels))

    def forward(self, x):
        return x * torch.sigmoid(self.w).reshape(1, -1, *([1] * (x.ndim - 2)))
'''


def test_predict_plugin_run_without_medse_plugins_says_which_plugin(cfg_path, data, tmp_path, monkeypatch, capsys):
    from medse.attention import registry as attention_registry
    from medse.cli import main
    from medse.utils import plugins

    monkeypatch.setattr(attention_registry, "_REGISTRY", attention_registry._REGISTRY.copy())
    monkeypatch.setattr(plugins, "_loaded", {})
    plugin = tmp_path / "my_gate.py"
    plugin.write_text(_GATE_PLUGIN)
    monkeypatch.setenv(plugins.ENV_VAR, str(plugin))
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg_path), "-o", str(run), "model.attention=my_gate"]) == 0
    capsys.readouterr()
    # the user predicts later, in a new shell without MEDSE_PLUGINS
    env = _env()
    env.pop(plugins.ENV_VAR)
    proc = subprocess.run([*MEDSE, "predict", "--run", str(run), "-i", str(data / "images"), "-o",
                           str(tmp_path / "pred")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(proc, "Unknown attention block 'my_gate'", "trained with a plugin block",
                                 f"set MEDSE_PLUGINS={plugin}")
    assert str(run / "config.yaml") in line and not (tmp_path / "pred").exists()
