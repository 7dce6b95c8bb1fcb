"""Registry behaviour: names, metadata, composition, keyword routing, bad arguments, min_channels, fast paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medse.attention import AttentionInfo, create_attention, list_attention, min_channels
from medse.attention.kernels import core as kernels_core
from medse.attention.se import ChannelSE

REQUIRED = {"none", "se", "cse", "sse", "scse", "scse_smp", "eca", "fca", "ca", "simam", "spse", "pe", "grn", "cbam",
            "cbam_channel", "cbam_spatial", "ela", "ema"}
GATED = {"sse", "scse", "scse_smp", "ca", "simam", "pe", "cbam", "cbam_spatial", "ela", "ema"}
FUSED = {"scse", "scse_smp", "sse", "se", "cse", "simam", "ca", "eca"}


def test_registered_names_and_metadata() -> None:
    infos = list_attention()
    assert REQUIRED <= set(infos)
    for name, info in infos.items():
        assert isinstance(info, AttentionInfo) and info.name == name
        assert set(info.spatial_dims) <= {1, 2, 3} and info.spatial_dims
        assert isinstance(info.defaults, dict) and isinstance(info.extension, str)
        if name != "none":
            assert info.paper and info.year >= 2018 and info.params_formula
            assert name in ("spse", "ela") or info.repo.startswith("https://github.com/")  # no official code
    assert {n for n, i in infos.items() if i.spatial_gate} == GATED
    assert infos["pe"].spatial_dims == (3,)
    assert infos["fca"].extension and infos["ca"].extension  # 3D extensions are declared


def test_none_is_identity_and_ignores_kwargs() -> None:
    block = create_attention("none", 3, 8, reduction=4)
    assert isinstance(block, nn.Identity)


@pytest.mark.parametrize("name", sorted(GATED))
def test_record_gate_keyword_default_false(name: str) -> None:
    d = 3
    block = create_attention(name, d, 16)
    assert block.record_gate is False and block.last_gate is None
    assert create_attention(name, d, 16, record_gate=True).record_gate is True


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_keyword(name: str) -> None:
    assert create_attention(name, 2, 16).fused is True
    assert create_attention(name, 2, 16, fused=False).fused is False
    assert list_attention()[name].fused


def test_fused_hint_dropped_for_blocks_without_fast_path() -> None:
    block = create_attention("spse", 2, 16, fused=False)
    assert not hasattr(block, "fused")


def test_composition() -> None:
    block = create_attention("eca+ca", 2, 32)
    assert isinstance(block, nn.Sequential) and [type(m).__name__ for m in block] == ["ECA", "CoordAttention"]
    x = torch.randn(2, 32, 7, 5)
    torch.testing.assert_close(block(x), block[1](block[0](x)))
    # shared keywords go to every part accepting them, dict keywords to one part
    both = create_attention("se+cse", 2, 32, reduction=4)
    assert both[0].fc1.out_features == 8 and both[1].fc1.out_features == 8
    one = create_attention("se+cse", 2, 32, cse={"reduction": 8})
    assert one[0].fc1.out_features == 2 and one[1].fc1.out_features == 4
    gated = create_attention("eca+sse", 2, 32, record_gate=True)
    assert gated[1].record_gate is True
    assert "eca+ca" not in list_attention()


def test_case_and_spaces_in_names() -> None:
    assert type(create_attention(" SE + ECA ", 2, 32)[1]).__name__ == "ECA"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: create_attention("sce", 2, 16), r"Unknown attention block 'sce'\. Did you mean 'scse'"),
        (lambda: create_attention("eca+cordinate", 2, 16), r"Unknown attention block 'cordinate'"),
        (lambda: create_attention("none+se", 2, 16), r"'none' cannot be combined"),
        (lambda: create_attention("", 2, 16), r"non-empty string"),
        (lambda: create_attention("se", 2, 8), r"in_channels=8 is smaller than reduction=16"),
        (lambda: create_attention("cse", 2, 1), r"smaller than reduction=2"),
        (lambda: create_attention("scse_smp", 3, 15), r"smaller than reduction=16"),
        (lambda: create_attention("fca", 2, 24), r"in_channels=24 must be divisible by the number of frequencies 16"),
        (lambda: create_attention("fca", 2, 32, freq_method="top3"), r"Unknown FcaNet frequency method 'top3'"),
        (lambda: create_attention("fca", 2, 32, dct_size=5), r"dct_size must be an int >= 7"),
        (lambda: create_attention("pe", 2, 16), r"'pe': spatial_dims must be one of \{3\}.*volumes only"),
        (lambda: create_attention("ca", 1, 16), r"'ca': spatial_dims must be one of \{2, 3\}"),
        (lambda: create_attention("se", 4, 16), r"spatial_dims must be one of \{1, 2, 3\}"),
        (lambda: create_attention("eca", 2, 16, kernel_size=4), r"kernel_size must be a positive odd integer"),
        (lambda: create_attention("scse", 2, 16, aggregation="sum"), r"Unknown SCSE aggregation 'sum'"),
        (lambda: create_attention("simam", 2, 16, e_lambda=0), r"e_lambda must be a positive number"),
        (lambda: create_attention("se", 2, 16, reducton=4), r"unknown argument 'reducton'.*Did you mean 'reduction'"),
        (lambda: create_attention("eca", 2, 16, record_gate=True), r"unknown argument 'record_gate'"),
        (lambda: create_attention("spse", 2, 16, levels=(1, 0)), r"levels must be"),
        (lambda: create_attention("se", 2, 0), r"in_channels must be a positive integer"),
        (lambda: create_attention("ca", 2, 16, reduction=0), r"reduction must be a positive integer"),
    ],
)
def test_bad_arguments_raise_value_error_at_construction(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_direct_class_construction_checks_too() -> None:
    from medse.attention import ECA, SPSE, FcaAttention, ProjectExcite, SimAM, SqueezeExcitation

    for cls, args in [(SqueezeExcitation, (0, 16)), (ECA, (4, 16)), (SimAM, (2.5, 16)), (ProjectExcite, (2, 16))]:
        with pytest.raises(ValueError, match="spatial_dims"):
            cls(*args)
    with pytest.raises(ValueError, match="divisible"):
        FcaAttention(3, 20, reduction=2, freq_method="top8")
    with pytest.raises(ValueError, match="smaller than reduction"):
        SPSE(3, 8)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("none", {}, 1),
        ("se", {}, 16),
        ("cse", {}, 2),
        ("sse", {}, 1),
        ("scse", {}, 2),
        ("scse_smp", {}, 16),
        ("eca", {}, 1),
        ("fca", {}, 16),
        ("fca", {"freq_method": "top32", "reduction": 4}, 32),
        ("fca", {"freq_method": "low4", "reduction": 6}, 8),
        ("ca", {}, 1),
        ("simam", {}, 1),
        ("spse", {}, 16),
        ("pe", {}, 2),
        ("se", {"reduction": 4}, 4),
        ("eca+cse", {}, 2),
        ("scse+fca", {"fca": {"freq_method": "top8", "reduction": 2}}, 8),
    ],
)
def test_min_channels(name: str, kwargs: dict, expected: int) -> None:
    c = min_channels(name, **kwargs)
    assert c == expected
    d = 3
    create_attention(name, d, c, **kwargs)  # the minimum is valid
    if c > 1:
        with pytest.raises(ValueError):
            create_attention(name, d, c - 1, **kwargs)


class _TanhSE(ChannelSE):
    """cSE with tanh in the hidden layer: a block that changes its gate network by overriding ``excite``."""

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.tanh(self.fc1(z))))


def test_fast_path_runs_the_blocks_own_gate_network(monkeypatch) -> None:
    """Each block calls its family's kernel with its own layers: a subclass (or a replaced branch) changes the
    fused and the plain result alike, and the fused path is the one taken."""
    monkeypatch.setattr(kernels_core, "MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    block = _TanhSE(2, 8)
    expected = x * torch.sigmoid(block.fc2(torch.tanh(block.fc1(x.mean((2, 3)))))).view(2, 8, 1, 1)
    for fused in (True, False):
        block.fused = fused
        assert block.takes_fast_path(x) is fused
        y = block(x)
        assert (type(y.grad_fn).__name__ == "_ChannelFnBackward") is fused
        torch.testing.assert_close(y, expected)
    scse = create_attention("scse", 2, 8, aggregation="add")
    scse.cse = _TanhSE(2, 8)
    c = torch.sigmoid(scse.cse.fc2(torch.tanh(scse.cse.fc1(x.mean((2, 3)))))).view(2, 8, 1, 1)
    expected = x * c + x * torch.sigmoid(scse.sse.conv(x))
    for fused in (True, False):
        scse.fused = fused
        y = scse(x)
        assert (type(y.grad_fn).__name__ == "_SCSEFnBackward") is fused
        torch.testing.assert_close(y, expected)


def test_fast_paths_follow_the_blocks_switch_and_size(monkeypatch) -> None:
    monkeypatch.setattr(kernels_core, "MIN_ELEMENTS", 100)
    xs, xl = torch.randn(1, 16, 2, 3), torch.randn(1, 16, 2, 4)  # 96 and 128 elements
    for name in sorted(FUSED):
        block = create_attention(name, 2, 16)
        assert block.takes_fast_path(xl) and not block.takes_fast_path(xs), name
        block.fused = False
        assert not block.takes_fast_path(xl), name


def test_docs_blocks_page_is_current() -> None:
    """docs/blocks.md is generated from the registry (``medse blocks --docs --output docs/blocks.md``)."""
    from medse.attention.report import blocks_markdown
    from medse.utils import plugins

    if plugins.plugin_entries():
        pytest.skip("MEDSE_PLUGINS is set: the page would list the plugin blocks too")
    page = Path(__file__).resolve().parents[1] / "docs" / "blocks.md"
    assert page.read_text() == blocks_markdown(), (
        "docs/blocks.md is out of date: run `medse blocks --docs --output docs/blocks.md`"
    )
