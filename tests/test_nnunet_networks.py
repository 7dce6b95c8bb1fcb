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


# ------------------------------------------------------------------------------ residual position (ResEnc only)
def _resenc_kwargs(dims: int, features: list[int]) -> dict:
    kw = _kwargs("resenc", dims)
    kw["features_per_stage"] = features
    return kw


def _residual_blocks(net: nn.Module) -> list[nn.Module]:
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD

    return [m for m in net.encoder.stages.modules() if isinstance(m, BasicBlockD)]


@pytest.mark.parametrize("dims", [2, 3])
def test_residual_position_is_dna_squeeze_excitation_slot_and_squeezes_every_axis(dims: int) -> None:
    """``residual`` puts the block where dynamic-network-architectures' ``BasicBlockD(squeeze_excitation=True)``
    puts its SqueezeExcite: same state-dict keys. In 2D both SEs are the same function (equal outputs); in 3D
    DNA's averages over D and H only, medse's over every axis (its gate is constant over the volume)."""
    from dynamic_network_architectures.building_blocks.regularization import SqueezeExcite

    features = [16, 32, 64]  # DNA rounds its hidden width to a multiple of 8: C/2 matches medse's reduction 2
    kw = _resenc_kwargs(dims, features)
    torch.manual_seed(0)
    ours = AttentionResidualEncoderUNet(**kw, attention="se", attention_positions=["residual"],
                                        attention_kwargs={"reduction": 2}).eval()
    torch.manual_seed(0)
    ref = dna_unet.ResidualEncoderUNet(**kw).eval()
    for blk in _residual_blocks(ref):  # what BasicBlockD(squeeze_excitation=True, ratio 1/2) builds
        blk.squeeze_excitation = SqueezeExcite(blk.output_channels, kw["conv_op"], rd_ratio=1 / 2, rd_divisor=8)
        blk.apply_se = True
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r)  # the same keys, in the same order
    se_keys = [k for k in sd_o if k.startswith("encoder.") and k.endswith(".squeeze_excitation.fc1.weight")]
    assert len(se_keys) == sum(kw["n_blocks_per_stage"])  # (the decoder's reference to the encoder repeats them)
    ref.load_state_dict({k: v.reshape(sd_r[k].shape) for k, v in sd_o.items()})
    mods = attention_modules(ours)
    assert len(mods) == sum(kw["n_blocks_per_stage"]) and all(type(m).__name__ == "SqueezeExcitation" for m in mods)
    assert [m.in_channels for m in mods] == [16, 32, 32, 64, 64]
    ratios: list[torch.Tensor] = []
    for m in mods:
        m.register_forward_hook(lambda mod, i, o: ratios.append(o / i[0]))
    x = _x(dims)
    with torch.no_grad():
        yo, yr = ours(x), ref(x)
    assert len(ratios) == len(mods)
    for r in ratios:  # one gate value per channel over the whole map (2D and 3D)
        flat = r.flatten(2)
        torch.testing.assert_close(flat, flat[..., :1].expand_as(flat), rtol=1e-5, atol=1e-6)
    if dims == 2:
        for a, b in zip(yo, yr, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(yo[0], yr[0], atol=1e-4)  # DNA's 3D "channel" gate varies along W


def test_residual_position_choice_estimate_init_and_errors() -> None:
    n_blocks = _kwargs("resenc", 3)["n_blocks_per_stage"]
    both = _build("resenc", 3, attention={"residual": "cbam", "decoder": "ema"},
                  attention_kwargs={"residual": {"reduction": 4}})
    assert both.attention == {"decoder": "ema", "residual": "cbam"}
    assert len(attention_modules(both)) == sum(n_blocks) + len(FEATURES) - 1
    assert isinstance(both.bottleneck_attention, nn.Identity)
    assert not _build("resenc", 3, attention="se", attention_kwargs={"reduction": 4}).attention.get("residual")
    out = both(_x(3))
    assert out[0].shape == (2, 3, SIZE, SIZE, SIZE)
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for m in attention_modules(both) for p in m.parameters())

    # nnU-Net's initialisation: residual blocks' last norm zeroed, the attention blocks left alone
    torch.manual_seed(0)
    net = AttentionResidualEncoderUNet(**_kwargs("resenc", 3), attention="grn", attention_positions="residual")
    for m in attention_modules(net):
        with torch.no_grad():
            m.gamma.fill_(0.5)
    net.apply(net.initialize)
    blocks = _residual_blocks(net)
    assert all(torch.all(b.conv2.norm.weight == 0) for b in blocks)
    assert all(torch.all(b.squeeze_excitation.gamma == 0.5) for b in blocks)

    # the estimate adds one output map per residual block at its stage's resolution
    base = _build("resenc", 3, attention="none")
    se = _build("resenc", 3, attention="cse", attention_positions=["residual"])
    size = (SIZE,) * 3
    extra = se.compute_conv_feature_map_size(size) - base.compute_conv_feature_map_size(size)
    assert extra == sum(n * c * r**3 for n, c, r in zip(n_blocks, FEATURES, [SIZE, SIZE // 2, SIZE // 4], strict=True))
    # nnU-Net weights load, only the residual attention keys missing
    missing, unexpected = se.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".squeeze_excitation." in k for k in missing)

    with pytest.raises(ValueError, match="Unknown attention position for AttentionPlainConvUNet 'residual'"):
        _build("plain", 3, attention="cse", attention_positions=["residual"])
    with pytest.raises(ValueError, match="residual block 0 of encoder stage 0 \\(8 channels\\)"):
        _build("resenc", 3, attention="se", attention_positions=["residual"])


def _write_plans(root, network: str) -> None:
    import json

    folder = root / "Dataset503_Res"
    folder.mkdir(parents=True)
    kw = _kwargs("resenc" if network == "ResidualEncoderUNet" else "plain", 3, deep_supervision=False)
    for key in ("conv_op", "norm_op", "nonlin"):
        kw[key] = f"{kw[key].__module__}.{kw[key].__name__}"
    for key in ("input_channels", "num_classes", "deep_supervision"):
        kw.pop(key)
    plans = {"dataset_name": "Dataset503_Res", "plans_name": "P", "configurations": {"3d_fullres": {
        "data_identifier": "d", "patch_size": [SIZE] * 3,
        "architecture": {"network_class_name": f"dynamic_network_architectures.architectures.unet.{network}",
                         "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    (folder / "P.json").write_text(json.dumps(plans))


def test_cli_plans_residual_position(tmp_path, capsys) -> None:
    import json

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from medse.cli import main

    _write_plans(tmp_path / "res", "ResidualEncoderUNet")
    assert main(["nnunet", "plans", "503", "-a", "cse,residual=cbam/decoder=cse", "--positions", "residual", "-p", "P",
                 "--reduction", "4", "--preprocessed", str(tmp_path / "res")]) == 0
    folder = tmp_path / "res" / "Dataset503_Res"
    arch = json.loads((folder / "P_medse_cse.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["arch_kwargs"]["attention_positions"] == ["residual"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 2, 3,
                                 deep_supervision=False)
    assert type(net).__name__ == "AttentionResidualEncoderUNet"
    assert [type(b.squeeze_excitation).__name__ for b in _residual_blocks(net)] == ["ChannelSE"] * 5
    assert net(_x(3)).shape == (2, 3, SIZE, SIZE, SIZE)
    # --positions filters the per-position dict too; without it the dict's own positions are written
    assert main(["nnunet", "plans", "503", "-a", "residual=cbam/decoder=cse", "-p", "P", "--reduction", "4",
                 "--preprocessed", str(tmp_path / "res")]) == 0
    kw = json.loads((folder / "P_medse_dec-cse_res-cbam.json").read_text())[
        "configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kw["attention_positions"] == ["decoder", "residual"]
    capsys.readouterr()
    # options are checked against every block before anything is written (ela takes no reduction)
    assert main(["nnunet", "plans", "503", "-a", "residual=ela", "-p", "P", "--reduction", "4",
                 "--preprocessed", str(tmp_path / "res")]) == 2
    assert "unknown argument 'reduction'" in capsys.readouterr().err

    _write_plans(tmp_path / "plain", "PlainConvUNet")
    assert main(["nnunet", "plans", "503", "-a", "se", "--positions", "residual", "-p", "P",
                 "--preprocessed", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert "position 'residual' needs residual blocks" in err and "PlainConvUNet" in err
    assert not list((tmp_path / "plain" / "Dataset503_Res").glob("P_medse_*"))
