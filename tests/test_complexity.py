"""Parameter / MAC counters, the papers' counts, and the ``medse blocks`` efficiency table."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import ChannelSELayer
from torch import nn

from medse.attention import create_attention
from medse.attention.report import (
    RESNET50_STAGES,
    blocks_markdown,
    efficiency_rows,
    format_table,
    reference_conv,
    resnet50_params,
)
from medse.utils.complexity import count_macs, count_ops, count_params

# --- the papers' counts ---------------------------------------------------------------------------------


def test_se_resnet50_adds_2530992_params() -> None:
    assert resnet50_params("se") == 2_530_992
    # the paper's formula (biases ignored): 2/r * sum_s N_s * C_s^2 = 2,514,944
    assert sum(n * 2 * c * (c // 16) for c, n in RESNET50_STAGES) == 2_514_944
    assert resnet50_params("se", spatial_dims=3) == 2_530_992


def test_eca_resnet50_with_authors_kernels_adds_80_params() -> None:
    assert resnet50_params("eca", stage_kwargs=[{"kernel_size": k} for k in (3, 5, 5, 7)]) == 80
    assert resnet50_params("eca") == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7  # adaptive k from C: 5, 5, 5, 7


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("c", [8, 12])
def test_cse_equals_monai_channel_se_layer(d: int, c: int) -> None:
    torch.manual_seed(0)
    ref = ChannelSELayer(d, c, r=2)
    ours = create_attention("cse", d, c)
    ours.fc1.load_state_dict(ref.fc[0].state_dict())
    ours.fc2.load_state_dict(ref.fc[2].state_dict())
    x = torch.randn(2, c, *((9, 7, 5)[:d]))
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    assert count_params(ours) == count_params(ref) == 2 * c * (c // 2) + c // 2 + c


# --- counters -------------------------------------------------------------------------------------------


def test_count_params_trainable_and_shared() -> None:
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.BatchNorm1d(3))
    assert count_params(model) == 15 + 6  # shared linear counted once; BN running stats excluded
    lin.bias.requires_grad_(False)
    assert count_params(model) == 12 + 6
    assert count_params(model, trainable_only=False) == 15 + 6


def test_count_macs_layers() -> None:
    conv2 = nn.Conv2d(4, 6, 3, padding=1)
    assert count_macs(conv2, (2, 4, 5, 7)) == 2 * 6 * 5 * 7 * 4 * 9
    conv3 = nn.Conv3d(4, 8, 3, stride=2, padding=1, groups=2)
    assert count_macs(conv3, (1, 4, 8, 8, 8)) == 8 * 4 * 4 * 4 * 2 * 27
    tconv = nn.ConvTranspose3d(4, 2, 2, stride=2)
    assert count_macs(tconv, (1, 4, 3, 3, 3)) == 4 * 27 * 2 * 8
    assert count_macs(nn.Conv1d(3, 5, 3), (2, 3, 10)) == 2 * 5 * 8 * 3 * 3
    assert count_macs(nn.Linear(10, 4), (3, 10)) == 3 * 10 * 4
    assert count_macs(nn.BatchNorm3d(4), (2, 4, 3, 3, 3)) == 2 * 4 * 27
    assert count_macs(nn.Sequential(nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d(1)), (1, 2, 4, 4)) == 2 * 2 * 16


def test_count_macs_attention_blocks() -> None:
    shape = (1, 64, 8, 8, 8)
    n = 64 * 512
    se = create_attention("se", 3, 64)
    assert count_macs(se, shape) == 64 * 4 + 4 * 64
    assert count_ops(se, shape)["elementwise"] == 2 * n
    assert count_macs(se, shape, elementwise=True) == 64 * 4 + 4 * 64 + 2 * n
    assert count_macs(create_attention("sse", 3, 64), shape) == n
    assert count_macs(create_attention("eca", 3, 64), shape) == 64 * 3
    assert count_macs(create_attention("simam", 3, 64), shape) == 0
    assert count_ops(create_attention("simam", 3, 64), shape)["elementwise"] == 7 * n
    mip = 8
    assert (
        count_macs(create_attention("ca", 2, 64), (1, 64, 8, 6)) == 14 * 64 * mip + 14 * mip + 14 * mip * 64
    )  # conv1, BN, two gates


def test_count_macs_leaves_module_state_alone() -> None:
    block = create_attention("spse", 2, 32).train()
    before = block.bn.running_mean.clone()
    assert count_macs(block, (2, 32, 8, 8)) > 0
    assert block.training and torch.equal(block.bn.running_mean, before)
    fused = create_attention("scse", 2, 32)
    count_macs(fused, (1, 32, 8, 8))
    assert fused.fused is True
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(block, (0, 32, 8, 8))


# --- efficiency table and CLI ---------------------------------------------------------------------------


def test_efficiency_rows_and_table() -> None:
    rows = efficiency_rows(channels=16, size=8, dims=(2, 3))
    names = {r["block"] for r in rows}
    assert {"se", "cse", "sse", "scse", "scse_smp", "eca", "fca", "ca", "simam", "spse", "pe", "none"} <= names
    by = {(r["block"], r["dims"]): r for r in rows}
    assert by[("pe", 2)]["note"] == "2D not supported" and by[("pe", 3)]["params"] == 2 * 16 * 8 + 8 + 16
    assert by[("scse", 3)]["params"] == 2 * 16 * 8 + 8 + 2 * 16 + 1
    conv_params, conv_macs = reference_conv(16, 8, 3)
    assert (conv_params, conv_macs) == (16 * 16 * 27 + 16, 16 * 16 * 27 * 512)
    assert by[("sse", 3)]["macs_pct_conv"] == pytest.approx(100 * 16 * 512 / conv_macs)
    assert by[("se", 2)]["resnet50_params"] == 2_530_992
    text = format_table(rows, markdown=False, channels=16, size=8)
    assert "scse_smp" in text and "2D not supported" in text
    md = format_table(rows, markdown=True, channels=16, size=8)
    assert md.count("\n| ") == len(rows) + 1
    narrow = {(r["block"], r["dims"]): r for r in efficiency_rows(channels=8, size=4, dims=(2,))}
    assert narrow[("se", 2)]["note"] == "needs C >= 16"


def test_blocks_markdown_documents_every_block() -> None:
    page = blocks_markdown(channels=16, size=8)
    for name in ("se", "cse", "sse", "scse", "scse_smp", "eca", "fca", "ca", "simam", "spse", "pe", "none"):
        assert f"## `{name}`" in page
    assert "NOTE: not in paper" in page and "2,530,992" in page and "+80 parameters" in page


def test_cli_blocks(tmp_path, capsys) -> None:
    from medse.cli import main

    assert main(["blocks", "--channels", "16", "--size", "8", "--dims", "2", "3"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("scse ", "pe "))]
    assert [ln.split()[:2] for ln in lines] == [["scse", "2"], ["scse", "3"], ["pe", "2"], ["pe", "3"]]
    assert main(["blocks", "--channels", "16", "--size", "8", "--dims", "3", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| scse | 3 |" in md and "| scse | 2 |" not in md
    target = tmp_path / "blocks.md"
    assert main(["blocks", "--channels", "16", "--size", "8", "--docs", "--output", str(target)]) == 0
    assert target.read_text().startswith("# Attention blocks")
    assert main(["blocks", "--dims", "4"]) == 2
    assert "--dims" in capsys.readouterr().err


def test_counts_on_the_meta_device_match_cpu() -> None:
    """medse.networks counts models built on the meta device (no memory): the blocks must support it."""
    for name, d in [("scse", 3), ("fca", 3), ("ca", 2), ("spse", 3), ("simam", 2), ("pe", 3), ("eca+ca", 3)]:
        with torch.device("meta"):
            meta = create_attention(name, d, 32)
        shape = (1, 32, *([9] * d))
        assert count_ops(meta, shape) == count_ops(create_attention(name, d, 32), shape), name
        assert count_params(meta) == count_params(create_attention(name, d, 32)), name
