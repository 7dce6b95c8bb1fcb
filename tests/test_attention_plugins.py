"""The public extension story: ``@register_attention`` / ``@register_model`` in a user's file, ``MEDSE_PLUGINS``.

A block defined in a file written into ``tmp_path`` is registered through ``MEDSE_PLUGINS``, trains in a tiny
U-Net through ``medse train``, and appears in ``medse blocks`` (in a fresh process) and in every network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medse.attention import create_attention, list_attention, min_channels, register_attention
from medse.attention import registry as attention_registry
from medse.networks import create_model, list_models
from medse.networks import registry as model_registry
from medse.utils import plugins
from medse.utils.errors import MedseError

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A user's block and network, registered with medse's decorators."""
import os

import torch
from torch import nn

from medse.attention import create_attention, register_attention
from medse.networks import register_model

with open(os.environ["PLUGIN_LOG"], "a") as f:  # one line per import, to check that it is imported once
    f.write("imported\\n")


@register_attention(
    "tiny_gate",
    paper="Doe, Roe. A tiny channel gate. Test Workshop 2025",
    year=2025,
    repo="https://example.org/tiny-gate",
    params_formula="C + 1",
    spatial_dims=(2, 3),
    defaults={"scale": 2.0},
    extension="none",
    params_fn=lambda c, d, **_: c + 1,
)
class TinyGate(nn.Module):
    """A tiny channel gate: y = x * sigmoid(scale * w * mean(x) + b)."""

    def __init__(self, spatial_dims: int, in_channels: int, *, scale: float = 1.0, reduction: int = 1) -> None:
        super().__init__()
        if in_channels < reduction:
            raise ValueError(f"TinyGate: in_channels={in_channels} < reduction={reduction}")
        self.w = nn.Parameter(torch.ones(in_channels))
        self.b = nn.Parameter(torch.zeros(1))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=tuple(range(2, x.ndim)))
        g = torch.sigmoid(self.scale * self.w * z + self.b)
        return x * g.reshape(*g.shape, *([1] * (x.ndim - 2)))


@register_model("tiny_net", task="segmentation", spatial_dims=(2, 3), description="Two convolutions and a block")
def tiny_net(spatial_dims, in_channels, out_channels, attention="none", attention_positions=None,
             attention_kwargs=None, width: int = 4):
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    net = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(),
                        create_attention(attention, spatial_dims, width, **(attention_kwargs or {})),
                        conv(width, out_channels, 1))
    net.size_divisor = 1
    return net
'''


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Registries and loaded plugins as they were, after the test; the plugin written to tmp_path."""
    list_models()  # the built-in models in before the snapshot
    monkeypatch.setattr(attention_registry, "_REGISTRY", attention_registry._REGISTRY.copy())
    monkeypatch.setattr(model_registry, "_REGISTRY", model_registry._REGISTRY.copy())
    monkeypatch.setattr(plugins, "_loaded", {})
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    log = tmp_path / "plugin.log"
    monkeypatch.setenv("PLUGIN_LOG", str(log))
    path = tmp_path / "my_blocks.py"
    path.write_text(PLUGIN)
    modules = set(sys.modules)
    yield path, log
    for name in set(sys.modules) - modules:
        if name.startswith("medse_plugin_") or name == "my_blocks":
            del sys.modules[name]


def test_register_attention_validates() -> None:
    class Good(nn.Module):
        def __init__(self, spatial_dims: int, in_channels: int, *, k: int = 3) -> None:
            super().__init__()

    with pytest.raises(ValueError, match="lower case"):
        register_attention("My-Gate", paper="p", year=2020)
    with pytest.raises(ValueError, match="lower case"):
        register_attention("none", paper="p", year=2020)
    with pytest.raises(ValueError, match="spatial_dims"):
        register_attention("g", paper="p", year=2020, spatial_dims=(4,))
    with pytest.raises(ValueError, match="already registered by medse.attention.se.SqueezeExcitation"):
        register_attention("se", paper="p", year=2020)(Good)
    with pytest.raises(ValueError, match="default 'kk' is not a keyword-only argument of Good. Did you mean 'k'"):
        register_attention("g", paper="p", year=2020, defaults={"kk": 1})(Good)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_attention("g", paper="p", year=2020)(object)
    assert "g" not in list_attention()


def test_decorator_metadata_matches_the_builtins() -> None:
    """The built-ins go through the same decorator: fused / spatial_gate come from the signature."""
    infos = list_attention()
    assert {n for n, i in infos.items() if i.fused} == {"se", "cse", "sse", "scse", "scse_smp", "eca", "ca", "simam"}
    assert {n for n, i in infos.items() if i.spatial_gate} == {"sse", "scse", "scse_smp", "ca", "simam", "pe", "cbam",
                                                               "cbam_spatial", "ela", "ema"}
    assert infos["scse"].cls is infos["scse_smp"].cls  # one class, two names


def test_plugin_file_registers_a_block_and_a_model(isolated, monkeypatch) -> None:
    path, log = isolated
    assert "tiny_gate" not in attention_registry._REGISTRY
    with pytest.raises(ValueError, match="Unknown attention block 'tiny_gate'.*name their module in MEDSE_PLUGINS"):
        create_attention("tiny_gate", 2, 8)
    monkeypatch.setenv(plugins.ENV_VAR, os.pathsep.join(["", str(path), " "]))
    info = list_attention()["tiny_gate"]
    assert (info.paper, info.year, info.defaults, info.params_formula) == (
        "Doe, Roe. A tiny channel gate. Test Workshop 2025", 2025, {"scale": 2.0}, "C + 1")
    assert info.spatial_dims == (2, 3) and not info.fused and not info.spatial_gate
    block = create_attention("tiny_gate", 3, 8)
    assert block.scale == 2.0 and sum(p.numel() for p in block.parameters()) == info.params_fn(8, 3)
    x = torch.randn(2, 8, 4, 4, 4)
    torch.testing.assert_close(block(x), x * torch.sigmoid(2.0 * x.mean((2, 3, 4)))[..., None, None, None])
    assert [type(m).__name__ for m in create_attention("tiny_gate+cse", 2, 8)] == ["TinyGate", "ChannelSE"]
    assert min_channels("tiny_gate", reduction=6) == 6  # default rule: the class takes `reduction`
    with pytest.raises(ValueError, match="spatial_dims must be one of"):
        create_attention("tiny_gate", 1, 8)
    # the user's network, with a built-in block and with the user's block
    assert list_models()["tiny_net"].defaults == {"width": 4}
    y = create_model("tiny_net", 2, 1, 3, attention="tiny_gate")(torch.randn(1, 1, 8, 8))
    assert y.shape == (1, 3, 8, 8)
    assert log.read_text() == "imported\n"  # imported once however often the registries are used


@pytest.mark.parametrize("name", sorted(list_models(task="segmentation")))
def test_plugin_block_works_in_every_network(isolated, monkeypatch, name) -> None:
    path, _ = isolated
    monkeypatch.setenv(plugins.ENV_VAR, str(path))
    info = list_models()[name]
    d = 2 if 2 in info.spatial_dims else 3
    model = create_model(name, d, 1, 3, attention="tiny_gate").eval()
    n_blocks = sum(type(m).__name__ == "TinyGate" for m in model_registry.attention_modules(model))
    assert n_blocks >= 1
    size = max(16, 2 * model.size_divisor)  # at least 2 voxels at the deepest level (instance norm needs them)
    with torch.no_grad():
        assert model(torch.randn(1, 1, *([size] * d))).shape == (1, 3, *([size] * d))


def test_plugin_module_name_and_errors(isolated, monkeypatch) -> None:
    path, log = isolated
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.setenv(plugins.ENV_VAR, "my_blocks")  # an importable module name
    assert "tiny_gate" in list_attention() and log.read_text() == "imported\n"
    monkeypatch.setenv(plugins.ENV_VAR, str(path.parent / "missing.py"))
    with pytest.raises(MedseError, match=r"missing\.py: MEDSE_PLUGINS: plugin file not found"):
        list_attention()
    monkeypatch.setenv(plugins.ENV_VAR, "no_such_plugin_module")
    with pytest.raises(MedseError, match="cannot import plugin module 'no_such_plugin_module'"):
        create_attention("se", 2, 16)
    bad = path.parent / "bad_plugin.py"
    bad.write_text("import torch\nraise RuntimeError('boom')\n")
    monkeypatch.setenv(plugins.ENV_VAR, str(bad))
    with pytest.raises(MedseError, match=r"bad_plugin\.py: MEDSE_PLUGINS: plugin failed to import: RuntimeError: boom"):
        list_models()
    with pytest.raises(MedseError, match="boom"):  # not silently dropped on the next use
        list_attention()


def _cli(*args: str) -> int:
    from medse.cli import main

    return main(list(args))


@pytest.mark.slow
def test_plugin_block_trains_through_the_cli_and_is_listed(isolated, monkeypatch, tmp_path, capsys) -> None:
    path, _ = isolated
    monkeypatch.setenv(plugins.ENV_VAR, str(path))
    data, run = tmp_path / "data", tmp_path / "run"
    assert _cli("synth", "--out", str(data), "--cases", "4", "--size", "16", "--seed", "1") == 0
    assert _cli(
        "train", "--config", str(REPO / "configs" / "demo.yaml"), "--output", str(run),
        f"data.root={data}", "model.attention=tiny_gate", "model.attention_kwargs={scale: 3.0}",
        "model.kwargs={channels: [4, 8]}", "train.epochs=2", "train.iterations_per_epoch=2", "train.val_every=1",
        "train.patch_size=[16, 16, 16]", "train.device=cpu", "infer.roi_size=[16, 16, 16]", "train.progress=false",
        "data.split={kind: holdout, val_fraction: 0.25, test_fraction: 0.0, seed: 0}",
    ) == 0
    from medse.utils.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    gate_keys = [k for k in state if k.endswith(".w")]
    assert gate_keys, "the run's model has no TinyGate parameters"
    assert any(not torch.equal(state[k], torch.ones_like(state[k])) for k in gate_keys), "the gates did not train"
    assert len((run / "metrics.csv").read_text().strip().splitlines()) >= 2
    capsys.readouterr()
    assert _cli("models") == 0
    assert "tiny_net" in capsys.readouterr().out
    # a fresh process sees the block through the environment variable alone
    env = {**os.environ, plugins.ENV_VAR: str(path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "medse", "blocks", "--dims", "3", "--channels", "16", "--size", "8"],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("tiny_gate"))
    assert row.split()[1:3] == ["3", "17"]  # dims, params = C + 1
