"""Tests of the shared utilities: typed configs, atomic writes, checkpoints, seeds, run info."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import pytest

from medse.utils.atomic import atomic_path, atomic_write_text, ensure_writable_dir, stale_temp_files
from medse.utils.checkpoint import load_checkpoint, save_checkpoint
from medse.utils.config import apply_overrides, from_dict, load_yaml, to_dict
from medse.utils.errors import MedseError, unknown_option_error
from medse.utils.runinfo import run_info
from medse.utils.seed import derive_seed, get_rng_states, set_rng_states


@dataclasses.dataclass
class _Train:
    epochs: int = 10
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    patch: tuple[int, ...] = (32, 32, 32)
    tag: str | None = None


@dataclasses.dataclass
class _Root:
    train: _Train = dataclasses.field(default_factory=_Train)
    name: str = "x"


def test_from_dict_types_and_defaults():
    cfg = from_dict(_Root, {"train": {"epochs": 3, "lr": 1, "patch": [16, 16]}})
    assert cfg.train.epochs == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.patch == (16, 16) and cfg.name == "x"
    assert to_dict(cfg)["train"]["patch"] == [16, 16]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"train": {"epcohs": 3}}, "unknown config key 'train.epcohs'. Did you mean 'epochs'?"),
        ({"train": {"epochs": "many"}}, "config key 'train.epochs': expected an integer"),
        ({"train": {"optimizer": "adamw"}}, "config key 'train.optimizer'"),
        ({"train": {"patch": 5}}, "config key 'train.patch': expected a list"),
        ({"trian": {}}, "unknown config key 'trian'. Did you mean 'train'?"),
    ],
)
def test_from_dict_errors_name_the_key(data, needle):
    with pytest.raises(MedseError) as e:
        from_dict(_Root, data)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 5\n  lr: 0.1\nname: base\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 7\n")
    d = load_yaml(tmp_path / "child.yaml")
    assert d == {"train": {"epochs": 7, "lr": 0.1}, "name": "base"}
    d2 = apply_overrides(d, ["train.epochs=2", "name=run1", "train.patch=[8, 8]"])
    assert d2["train"]["epochs"] == 2 and d2["name"] == "run1" and d2["train"]["patch"] == [8, 8]
    assert d["train"]["epochs"] == 7  # the input is not modified
    with pytest.raises(MedseError, match="key.sub=value"):
        apply_overrides(d, ["oops"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(MedseError, match="bad.yaml: invalid YAML"):
        load_yaml(bad)
    with pytest.raises(MedseError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    atomic_write_text(target, "done")
    assert target.read_text() == "done" and os.listdir(tmp_path) == ["out.nii.gz"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_atomic_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        atomic_write_text(tmp_path / "a.txt", "content")
        with atomic_path(tmp_path / "b.nii.gz") as tmp:
            assert tmp.name.startswith(".tmp-b-") and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"bytes")
        save_checkpoint(tmp_path / "c.pt", {"x": 1})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "plain.txt").st_mode & 0o777) == mode
    for name in ("a.txt", "b.nii.gz", "c.pt"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == mode, name
    assert (tmp_path / "a.txt").read_text() == "content" and (tmp_path / "b.nii.gz").read_bytes() == b"bytes"
    assert load_checkpoint(tmp_path / "c.pt") == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.nii.gz", "c.pt", "plain.txt"]


def test_checkpoints_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import medse.utils.atomic as atomic

    events = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else ""))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    save_checkpoint(tmp_path / "last.pt", {"epoch": 3})
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events  # file, rename, folder
    if os.path.isdir("/proc/self/fd"):
        assert ".tmp-last-" in events[0][1] and events[2][1] == str(tmp_path)
    assert load_checkpoint(tmp_path / "last.pt") == {"epoch": 3}
    events.clear()
    with atomic_path(tmp_path / "plain.csv") as tmp:  # the default: no fsync
        tmp.write_text("a,b\n")
    assert [k for k, _ in events] == ["replace"]


def test_stale_temp_files_match_only_medse_names_of_the_targets(tmp_path):
    names = [".tmp-case1-abcd1234.nii.gz", ".tmp-case1-zz_9x0q1.nii.gz", ".tmp-case1-abcd1234.json",
             ".tmp-case10-abcd1234.nii.gz", ".tmp-case1-abc.nii.gz", ".tmp-other-abcd1234.nii.gz", "case1.nii.gz",
             ".tmp-case1-abcd1234.nii"]
    for n in names:
        (tmp_path / n).write_text("x")
    found = stale_temp_files([tmp_path / "case1.nii.gz", tmp_path / "missing_dir" / "x.json"])
    assert [p.name for p in found] == [".tmp-case1-abcd1234.nii.gz", ".tmp-case1-zz_9x0q1.nii.gz"]
    found = stale_temp_files([tmp_path / "case1.json"])
    assert [p.name for p in found] == [".tmp-case1-abcd1234.json"]


def test_ensure_writable_dir_fails_in_one_line_even_as_root(tmp_path):
    created = ensure_writable_dir(tmp_path / "a" / "b")
    assert created == [tmp_path / "a", tmp_path / "a" / "b"] and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    assert ensure_writable_dir(tmp_path / "a") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedseError) as e:
        ensure_writable_dir(tmp_path / "file" / "sub")  # a parent is a file: fails for root too
    assert str(tmp_path / "file" / "sub") in str(e.value) and "cannot create the output folder" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(MedseError, match="exists and is not a folder"):
        ensure_writable_dir(tmp_path / "file")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root: the mode does not stop it (the file/sub case above does)
            assert ensure_writable_dir(ro) == []
        else:
            with pytest.raises(MedseError, match="cannot write into the output folder"):
                ensure_writable_dir(ro)
    finally:
        ro.chmod(0o700)


def test_checkpoint_roundtrip_weights_only(tmp_path):
    import torch

    torch.manual_seed(0)
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 4, "rng": get_rng_states()}
    p = save_checkpoint(tmp_path / "ck.pt", state)
    loaded = load_checkpoint(p)
    assert loaded["epoch"] == 4
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    # restoring the RNG state reproduces the same draws
    set_rng_states(loaded["rng"])
    a = torch.rand(3)
    set_rng_states(loaded["rng"])
    assert torch.equal(a, torch.rand(3))


def test_checkpoint_rejects_unsafe_pickle(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(MedseError, match="weights_only=True"):
        load_checkpoint(p)
    with pytest.raises(MedseError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_seed_derivation_and_errors():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    err = unknown_option_error("attention block", "scce", ["scse", "sse", "cse"])
    assert "Did you mean 'scse'?" in str(err)
    assert str(MedseError("bad voxel values", "/x/a.nii.gz")).startswith("/x/a.nii.gz: bad voxel values")


def test_run_info_records_versions():
    info = run_info({"seed": 3})
    assert info["medse_version"] and info["torch_version"] and info["seed"] == 3
