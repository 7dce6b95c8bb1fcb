"""medse blocks inside nnU-Net v2's own networks (needs nnunetv2 / dynamic-network-architectures: `make setup-nnunet`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2")
dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")

from medse.integrations.nnunet import AttentionPlainConvUNet, AttentionResidualEncoderUNet  # noqa: E402
from medse.integrations.nnunet.networks import attention_feature_map_size  # noqa: E402
from medse.networks.registry import attention_modules  # noqa: E402

pytestmark = pytest.mark.nnunet

FEATURES = [8, 16, 32]
SIZE = 16


def _kwargs(cls_name: str, dims: int, deep_supervision: bool = True) -> dict:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
    kw = dict(input_channels=2, n_stages=3, features_per_stage=FEATURES, conv_op=conv,
              kernel_sizes=[[3] * dims] * 3, strides=[[1] * dims, [2] * dims, [2] * dims], num_classes=3,
              n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op=norm,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    if cls_name == "plain":
        kw["n_conv_per_stage"] = [2, 2, 2]
    else:
        kw["n_blocks_per_stage"] = [1, 2, 2]
    return kw


PAIRS = {
    "plain": (dna_unet.PlainConvUNet, AttentionPlainConvUNet),
    "resenc": (dna_unet.ResidualEncoderUNet, AttentionResidualEncoderUNet),
}


def _build(kind: str, dims: int, seed: int = 0, **extra):
    base_cls, ours_cls = PAIRS[kind]
    torch.manual_seed(seed)
    ours = ours_cls(**_kwargs(kind, dims), **extra)
    ours.apply(ours.initialize)
    return ours


def _x(dims: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 2, *([SIZE] * dims), generator=g)


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dims", [2, 3])
def test_attention_none_equals_nnunet(kind: str, dims: int) -> None:
    """Same seed -> same state dict keys, same values and same outputs as nnU-Net's own class."""
    base_cls, ours_cls = PAIRS[kind]
    torch.manual_seed(0)
    base = base_cls(**_kwargs(kind, dims))
    base.apply(base.initialize)
    ours = _build(kind, dims, attention="none")
    sd_b, sd_o = base.state_dict(), ours.state_dict()
    assert list(sd_b) == list(sd_o)
    for k in sd_b:
        assert torch.equal(sd_b[k], sd_o[k]), k
    x = _x(dims)
    base.eval()
    ours.eval()
    with torch.no_grad():
        yb, yo = base(x), ours(x)
    assert len(yb) == len(yo) == 2
    for a, b in zip(yb, yo, strict=True):
        assert torch.equal(a, b)
    # and with deep supervision switched off the nnU-Net way
    base.decoder.deep_supervision = ours.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(base(x), ours(x))


BLOCKS_3D = ["se", "sse", "scse", "eca", "ca", "simam", "eca+ca"]
BLOCKS_2D = ["cse", "scse", "eca+ca"]


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dims,block", [(3, b) for b in BLOCKS_3D] + [(2, b) for b in BLOCKS_2D])
def test_blocks_build_and_run(kind: str, dims: int, block: str) -> None:
    net = _build(kind, dims, attention=block, attention_kwargs={"reduction": 4} if block in ("se", "cse", "scse") else None)
    n_stages = len(FEATURES)
    mods = attention_modules(net)
    # n_stages - 1 encoder stages + bottleneck + n_stages - 1 decoder stages
    assert len(mods) == 2 * n_stages - 1
    assert set(net.attention.values()) == {block}
    # the blocks sit at the stage widths: encoder 8, 16; bottleneck 32; decoder 16, 8
    att_keys = [k for k in net.state_dict() if k.split(".")[0].endswith("_attention")]
    if block != "simam":  # SimAM has no parameters
        assert att_keys, "attention parameters must be in the state dict"
    assert {k.split(".")[0] for k in att_keys} <= {"encoder_attention", "bottleneck_attention", "decoder_attention"}
    x = _x(dims)
    out = net(x)
    assert isinstance(out, list) and len(out) == n_stages - 1
    assert out[0].shape == (2, 3, *([SIZE] * dims))
    assert out[1].shape == (2, 3, *([SIZE // 2] * dims))
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.float().mean() for o in out).backward()
    for name, p in net.named_parameters():
        if "_attention" in name.split(".")[0]:
            assert p.grad is not None, name


def test_attention_changes_output_and_keys_are_extra() -> None:
    base = _build("plain", 3, attention="none")
    ours = _build("plain", 3, attention="scse")
    kb, ko = set(base.state_dict()), set(ours.state_dict())
    assert kb < ko  # nnU-Net's keys are kept, attention keys added
    missing, unexpected = ours.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and set(missing) == ko - kb
    with torch.no_grad():
        assert not torch.allclose(base(_x(3))[0], ours(_x(3))[0])


def test_positions_and_per_position_dict() -> None:
    enc = _build("plain", 3, attention="cse", attention_positions=["encoder"])
    assert len(attention_modules(enc)) == len(FEATURES) - 1
    assert isinstance(enc.bottleneck_attention, nn.Identity)
    assert all(isinstance(m, nn.Identity) for m in enc.decoder_attention)

    mixed = _build("resenc", 3, attention={"encoder": "eca", "bottleneck": "scse", "decoder": "cse"},
                   attention_kwargs={"decoder": {"reduction": 2}})
    assert type(mixed.bottleneck_attention).__name__ == "SCSE"
    assert all(type(m).__name__ == "ECA" for m in mixed.encoder_attention)
    assert all(type(m).__name__ == "ChannelSE" for m in mixed.decoder_attention)
    assert mixed.decoder_attention[1].fc1.out_features == FEATURES[0] // 2  # reduction 2 reached the decoder
    assert mixed(_x(3))[0].shape == (2, 3, SIZE, SIZE, SIZE)

    with pytest.raises(ValueError, match="position"):
        _build("plain", 3, attention={"middle": "cse"})
    with pytest.raises(ValueError, match="Unknown attention block 'nope'"):
        _build("plain", 3, attention="nope")
    with pytest.raises(ValueError, match="Unknown attention position"):
        _build("plain", 3, attention="cse", attention_positions=["skip"])
    with pytest.raises(ValueError, match="encoder stage 0 \\(8 channels\\)"):
        _build("plain", 3, attention="cse", attention_kwargs={"reduction": 16})


def test_initialize_leaves_attention_blocks_alone() -> None:
    """nnU-Net's He init must not touch the blocks (sSE's 1x1 conv keeps PyTorch's default init, non-zero bias)."""
    torch.manual_seed(0)
    net = AttentionPlainConvUNet(**_kwargs("plain", 3), attention="scse")
    before = copy.deepcopy(net.state_dict())
    net.apply(net.initialize)
    after = net.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("encoder.") for k in changed)  # nnU-Net's convs re-initialised
    assert not [k for k in changed if "_attention" in k]
    assert after["encoder_attention.0.sse.conv.bias"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dims", [2, 3])
def test_feature_map_estimate(kind: str, dims: int) -> None:
    base_cls, _ = PAIRS[kind]
    torch.manual_seed(0)
    base = base_cls(**_kwargs(kind, dims))
    none = _build(kind, dims, attention="none")
    size = (SIZE,) * dims
    assert none.compute_conv_feature_map_size(size) == base.compute_conv_feature_map_size(size)
    # nnU-Net's encoder and decoder estimates keep working on the wrapped network
    assert none.encoder.compute_conv_feature_map_size(size) == base.encoder.compute_conv_feature_map_size(size)
    scse = _build(kind, dims, attention="scse")
    extra = scse.compute_conv_feature_map_size(size) - base.compute_conv_feature_map_size(size)
    # scSE: its output (C x voxels) + one spatial gate (voxels) per block, at every stage's resolution
    res = [SIZE, SIZE // 2, SIZE // 4]
    expect = sum((c + 1) * r**dims for c, r in zip(FEATURES, res, strict=True))  # encoder + bottleneck
    expect += sum((c + 1) * r**dims for c, r in zip(FEATURES[:2], res[:2], strict=True))  # decoder
    assert extra == expect
    assert attention_feature_map_size("eca+ca", 4, (2, 3)) == 4 * 6 + (4 * 6 + 6)
    assert isinstance(scse.compute_conv_feature_map_size(size), np.integer)


def test_dna_squeeze_excite_is_not_a_channel_gate_on_5d() -> None:
    """dynamic-network-architectures' SqueezeExcite averages axes (2, 3) only: on (B, C, D, H, W) its "channel"
    gate varies along W. medse's cSE gates each channel with one value over the whole volume."""
    from dynamic_network_architectures.building_blocks.regularization import SqueezeExcite

    from medse.attention import create_attention

    torch.manual_seed(0)
    c = 8
    x = torch.rand(1, c, 6, 6, 6) + 0.1
    x[..., 3:] *= 5.0  # the second half along W differs, so a W-dependent squeeze shows
    dna = SqueezeExcite(c, nn.Conv3d, rd_ratio=1 / 4, rd_divisor=1)
    med = create_attention("cse", 3, c, reduction=4)
    with torch.no_grad():
        gate_dna = dna(x) / x
        gate_med = med(x) / x
    spread_dna = (gate_dna.amax(dim=(2, 3, 4)) - gate_dna.amin(dim=(2, 3, 4))).max()
    spread_med = (gate_med.amax(dim=(2, 3, 4)) - gate_med.amin(dim=(2, 3, 4))).max()
    assert spread_med < 1e-5  # medse: one gate value per channel
    assert spread_dna > 1e-3  # DNA: the gate changes along W inside a channel
    # along D and H it is constant (it did average those), along W not
    assert (gate_dna.amax(dim=(2, 3)) - gate_dna.amin(dim=(2, 3))).max() < 1e-5
