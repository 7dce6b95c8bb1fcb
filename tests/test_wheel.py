"""medse installed like a library (issue 24, "install like a library"): the built wheel, installed non-editable in
a scratch environment, runs the README's commands from any folder; the shipped configs and pipelines resolve by
name; every third-party import of medse is a declared dependency; ``medse --version``.

The wheel test (marker ``wheel``, about 30 s on 2 busy cores) runs in ``make test`` and so in CI (``.ci/run``). It
builds from a copy of the sources (``pip wheel --no-deps --no-build-isolation``: no download, nothing written into
the checkout), installs the wheel with ``--no-deps`` into a venv made with ``--without-pip`` whose one ``.pth`` line
puts this environment's site-packages (torch, MONAI, ...) after its own, so that nothing is downloaded and the
``medse`` that runs is the wheel's (checked), not the checkout's.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from medse.cli import main

REPO = Path(__file__).resolve().parents[1]
_SOURCES = ("pyproject.toml", "setup.py", "README.md", "medse", "configs", "pipelines")
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
_ENV.pop("PYTHONPATH", None)


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=_ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res


def _shipped_files() -> set[str]:
    """The YAML files the checkout ships, as the wheel must hold them (``medse/_shipped/configs/demo.yaml``)."""
    return {f"medse/_shipped/{p.relative_to(REPO).as_posix()}" for top in ("configs", "pipelines")
            for p in (REPO / top).rglob("*.yaml")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel built from a copy of the sources and installed in a scratch venv: paths of both."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in _SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)], tmp)
    (wheel,) = (tmp / "dist").glob("medse-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, timeout=60)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "medse-test-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, MONAI, ... from here
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], tmp)
    work = tmp / "elsewhere"  # not the checkout: nothing is found next to it by accident
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "site": site, "work": work}


@pytest.mark.wheel
def test_wheel_holds_the_shipped_configs_and_pipelines(installed: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    missing = _shipped_files() - names
    assert not missing, f"the wheel lacks shipped files: {sorted(missing)}"
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "medse").rglob("*.py")}
    assert not sources - names, f"the wheel lacks medse modules: {sorted(sources - names)}"


@pytest.mark.wheel
def test_installed_wheel_runs_the_readme_commands_from_any_folder(installed: dict[str, Path]) -> None:
    bin_, work, site = installed["venv"] / "bin", installed["work"], installed["site"]
    medse = str(bin_ / "medse")
    where = _run([str(bin_ / "python"), "-c", "import medse; print(medse.__file__)"], work).stdout.strip()
    assert Path(where).is_relative_to(site), f"the scratch venv imports medse from {where}, not the wheel"
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_ / "python"), "check"], cwd=work,
                           env=_ENV, capture_output=True, text=True, timeout=120)
    assert "medse " not in check.stdout, f"medse's declared dependencies are not met here: {check.stdout}"

    from importlib.metadata import version

    assert _run([medse, "--version"], work).stdout.strip() == f"medse {version('medse')}"
    assert "--output" in _run([medse, "demo", "--help"], work).stdout
    assert "--config" in _run([medse, "train", "--help"], work).stdout
    # the demo's default grid and the config it names (../configs/demo.yaml) resolve inside the installed package
    probe = ("from medse.compare.demo import default_pipeline; from medse.compare.pipeline import load_pipeline; "
             "print(load_pipeline(default_pipeline()).train_config_path())")
    demo_cfg = Path(_run([str(bin_ / "python"), "-c", probe], work).stdout.strip())
    assert demo_cfg.is_relative_to(site) and demo_cfg.as_posix().endswith("_shipped/configs/demo.yaml"), demo_cfg
    # one tiny end-to-end run with a shipped config named as the README names it, and by its bare name
    _run([medse, "synth", "--out", "data", "--cases", "4", "--size", "16"], work)
    tiny = ["data.root=data", "train.epochs=1", "train.iterations_per_epoch=1", "train.batch_size=1",
            "train.patch_size=[16,16,16]", "infer.roi_size=[16,16,16]", "train.val_every=1",
            "model.kwargs={channels: [4, 8]}"]
    out = _run([medse, "train", "--config", "configs/demo.yaml", "--output", "run", *tiny], work).stdout
    assert "run folder:" in out and (work / "run" / "checkpoints").is_dir()
    bad = subprocess.run([medse, "train", "--config", "nosuch", "--output", "run2", *tiny], cwd=work, env=_ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1 and "shipped configs:" in bad.stderr and " demo," in bad.stderr, bad.stderr
    assert not (work / "run2").exists()


def test_version_option(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"medse {version('medse')}"


def test_shipped_config_names_resolve_in_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a folder that is not the checkout, ``demo`` and ``configs/demo.yaml`` are the shipped config; a local
    file of that path wins; an unknown name is one line that lists the shipped names."""
    from medse._shipped import find
    from medse.config import load_config

    monkeypatch.chdir(tmp_path)
    shipped = REPO / "configs" / "demo.yaml"
    assert find("demo") == find("demo.yaml") == find("configs/demo.yaml") == shipped
    assert find("demo", "pipelines") == REPO / "pipelines" / "demo.yaml"
    assert load_config("demo").model.name == load_config(shipped).model.name
    (tmp_path / "configs").mkdir()
    local = tmp_path / "configs" / "demo.yaml"
    local.write_text("_base_: " + str(shipped) + "\nmodel: {attention: cse}\n")
    assert find("configs/demo.yaml") == Path("configs/demo.yaml")
    assert load_config("configs/demo.yaml").model.attention == "cse"
    assert main(["train", "--config", "nosuch", "--output", str(tmp_path / "r"), "data.root=x"]) == 2
    assert not (tmp_path / "r").exists()


def test_shipped_name_error_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--pipeline", "pipelines/nosuch.yaml", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: pipelines/nosuch.yaml: ") and " demo," in err, err


# modules imported by medse that no requirement names, each with where it comes from
_PROVIDED = {"dynamic_network_architectures": "nnunetv2 (extra nnunet) depends on it"}
# folders whose imports belong to an extra (imported only when that feature is used)
_OPTIONAL_DIRS = ("medse/integrations/", "medse/export/")


def _requirement_name(spec: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_every_third_party_import_is_declared() -> None:
    """numpy was imported everywhere but not declared: every module medse imports at the top of a core module is
    a core dependency, and every other third-party import is a dependency of core or an extra."""
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(s) for s in project["dependencies"]}
    extras = {_requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}
    dists = {m: {d.lower().replace("_", "-") for d in ds} for m, ds in packages_distributions().items()}
    problems = []
    for f in sorted((REPO / "medse").rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        tree = ast.parse(f.read_text(), rel)
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module.split(".")[0]]
            else:
                continue
            for mod in mods:
                if mod in sys.stdlib_module_names or mod in ("medse", "__future__") or mod in _PROVIDED:
                    continue
                names = dists.get(mod)
                if names is None:  # not installed here (nnunetv2 outside .venv-nnunet): its name is the dist's
                    if not rel.startswith(_OPTIONAL_DIRS) or _requirement_name(mod) not in extras:
                        problems.append(f"{rel}: imports {mod}, which is neither installed nor an extra")
                elif id(node) in top_level and not rel.startswith(_OPTIONAL_DIRS) and not names & core:
                    problems.append(f"{rel}: imports {mod} ({', '.join(sorted(names))}) at the top; not a core dependency")
                elif not names & (core | extras):
                    problems.append(f"{rel}: imports {mod} ({', '.join(sorted(names))}); not declared")
    assert not problems, "\n".join(problems)
