"""Tests of MONAI's DynUNet, SegResNet, UNETR and SwinUNETR with medse attention, generated from the registries.

Every network x every attention block x spatial_dims {2, 3}: builds, forward + backward on odd sizes (padding and
cropping exercised), output shape, finite values, every parameter gets a gradient, the number of attached
attention modules per position (counted from the architecture arguments, independently of the implementation).
The 2D grid and a few 3D blocks per network run in the fast set; the whole 3D grid is marked slow.
With ``attention="none"`` each network equals the MONAI class (state dict and outputs, same seed); with attention
every MONAI key is kept. DynUNet: kernel/stride derivation, deep supervision and the trainer's loss over the
heads. UNETR/SwinUNETR: the ``tokens`` gate formula.
"""

from __future__ import annotations

import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR

from medse.attention import list_attention
from medse.networks import ALL_POSITIONS, attention_modules, create_model, list_models
from medse.networks.dynunet import get_kernels_strides
from medse.networks.placement import ATTACHED

NETWORKS = ("dynunet", "segresnet", "unetr", "swinunetr")

# Tiny architectures: every width a multiple of 16 where the network allows it (FcaNet's top16 needs C % 16 == 0,
# reduction 16 needs C >= 16). SwinUNETR's widths are multiples of 12 (feature_size % 12 == 0, MONAI): FcaNet gets
# 8 frequencies there (BLOCK_KWARGS). SwinUNETR's bottleneck is one voxel at 32^d, where instance norm is undefined
# in training: batch norm in the tiny configuration.
TINY: dict[str, dict] = {
    "dynunet": {"patch_size": None, "filters": (16, 32, 32)},  # patch_size set per dims: 16^d -> strides 1, 2, 2
    "segresnet": {"init_filters": 16, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "unetr": {"img_size": 32, "feature_size": 16, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2},
    "swinunetr": {"feature_size": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4,
                  "norm_name": "batch"},
}
BLOCK_KWARGS: dict[tuple[str, str], dict] = {("swinunetr", "fca"): {"freq_method": "top8"}}
#: Sizes that are no multiple of the networks' divisors (UNETR: smaller than img_size), so inputs are padded.
ODD_SIZE = {2: (29, 31), 3: (27, 30, 31)}
#: MONAI's TransformerBlock always builds a cross-attention norm that only cross-attention uses (unused in plain
#: MONAI UNETR too): exempt from the every-parameter-gets-a-gradient check.
UNUSED_IN_MONAI = "norm_cross_attn"
BLOCKS = sorted(list_attention())
FAST_3D = ("none", "scse", "pe")


def tiny(name: str, dims: int) -> dict:
    kw = dict(TINY[name])
    if name == "dynunet":
        kw["patch_size"] = (16,) * dims
    return kw


def expected_counts(name: str, kw: dict) -> dict[str, int]:
    """Attention modules per position from the architecture arguments."""
    if name == "dynunet":  # strides (1, 2, 2): input block + 1 down block, bottleneck, 2 up blocks
        levels = len(get_kernels_strides(kw["patch_size"])[1]) - 1
        return {"encoder": levels, "bottleneck": 1, "decoder": levels, "tokens": 0}
    if name == "segresnet":
        return {"encoder": len(kw["blocks_down"]) - 1, "bottleneck": 1, "decoder": len(kw["blocks_up"]), "tokens": 0}
    if name == "unetr":  # encoder1-4, transformer output, decoder5-2, 12 transformer layers
        return {"encoder": 4, "bottleneck": 1, "decoder": 4, "tokens": 12}
    return {"encoder": 4, "bottleneck": 1, "decoder": 5, "tokens": sum(kw["depths"])}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


def test_registry_lists_the_monai_networks_and_their_positions() -> None:
    models = list_models("segmentation")
    for name in NETWORKS:
        assert models[name].spatial_dims == (2, 3)
    assert models["unetr"].positions == models["swinunetr"].positions == ALL_POSITIONS
    assert "tokens" not in models["dynunet"].positions and "tokens" not in models["segresnet"].positions


def _check_forward_backward(name: str, block: str, dims: int) -> None:
    kw = tiny(name, dims)
    positions = list_models()[name].positions
    if dims not in list_attention()[block].spatial_dims:
        with pytest.raises(ValueError, match="spatial_dims"):
            create_model(name, dims, 1, 3, attention=block, attention_positions=positions, **kw)
        return
    torch.manual_seed(0)
    model = create_model(name, dims, 2, 3, attention=block, attention_positions=positions,
                         attention_kwargs=BLOCK_KWARGS.get((name, block)), **kw)
    counts = expected_counts(name, kw)
    n_expected = 0 if block == "none" else sum(counts[p] for p in positions)
    atts = attention_modules(model)
    assert len(atts) == n_expected and len({id(m) for m in atts}) == n_expected
    if block != "none":
        per_position = {p: sum(1 for s, b in model.attention_sites.items() if s.partition(".")[0] == p)
                        for p in positions}
        stages = {p: counts[p] for p in positions}
        if name == "swinunetr":  # one site per Swin stage, depths[i] gates in it
            stages["tokens"] = 4
        assert per_position == stages
    calls = {id(m): 0 for m in atts}
    for m in atts:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    model.train()
    x = torch.randn(2, 2, *ODD_SIZE[dims])
    y = model(x)
    assert all(v == 1 for v in calls.values()), "every attached module runs once per forward pass"
    assert y.shape == (2, 3, *ODD_SIZE[dims]) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in model.named_parameters():
        if UNUSED_IN_MONAI in pname:
            continue
        assert p.grad is not None, f"{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", NETWORKS)
def test_network_block_forward_backward_2d(name: str, block: str) -> None:
    _check_forward_backward(name, block, 2)


@pytest.mark.parametrize("block", FAST_3D)
@pytest.mark.parametrize("name", NETWORKS)
def test_network_block_forward_backward_3d_fast(name: str, block: str) -> None:
    _check_forward_backward(name, block, 3)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b not in FAST_3D])
@pytest.mark.parametrize("name", NETWORKS)
def test_network_block_forward_backward_3d(name: str, block: str) -> None:
    _check_forward_backward(name, block, 3)


# ------------------------------------------------------------------------------------------- equal to MONAI
def _monai(name: str, dims: int, kw: dict):
    if name == "dynunet":
        k, s = get_kernels_strides(kw["patch_size"])
        return DynUNet(dims, 2, 3, k, s, s[1:], filters=kw["filters"],
                       deep_supervision=kw.get("deep_supervision", False))
    if name == "segresnet":
        return SegResNet(spatial_dims=dims, init_filters=kw["init_filters"], in_channels=2, out_channels=3,
                         blocks_down=kw["blocks_down"], blocks_up=kw["blocks_up"])
    if name == "unetr":
        return UNETR(2, 3, kw["img_size"], feature_size=kw["feature_size"], hidden_size=kw["hidden_size"],
                     mlp_dim=kw["mlp_dim"], num_heads=kw["num_heads"], spatial_dims=dims)
    return SwinUNETR(2, 3, feature_size=kw["feature_size"], depths=kw["depths"], num_heads=kw["num_heads"],
                     window_size=kw["window_size"], norm_name=kw["norm_name"], spatial_dims=dims)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", NETWORKS)
def test_none_equals_monai(name: str, dims: int) -> None:
    kw = tiny(name, dims)
    torch.manual_seed(0)
    ours = create_model(name, dims, 2, 3, **kw)
    torch.manual_seed(0)
    ref = _monai(name, dims, kw)
    sa, sb = ours.state_dict(), ref.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert attention_modules(ours) == []
    x = torch.randn(2, 2, *([32] * dims))  # a size every network takes as is
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        torch.manual_seed(1)
        a = ours(x)
        torch.manual_seed(1)
        assert torch.equal(a, ref(x))


@pytest.mark.parametrize("name", NETWORKS)
def test_attention_keeps_every_monai_key(name: str) -> None:
    """MONAI weights load into the attention network with strict=False: only medse's keys are missing."""
    kw = tiny(name, 2)
    ref = _monai(name, 2, kw)
    ours = create_model(name, 2, 2, 3, attention="cse", attention_positions=list_models()[name].positions, **kw)
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(f".{ATTACHED}." in k for k in result.missing_keys)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())


# ----------------------------------------------------------------------------------------------- DynUNet
def test_get_kernels_strides_follows_the_tutorial_rule() -> None:
    k, s = get_kernels_strides((128, 128, 128), (1.0, 1.0, 1.0))
    assert s == [[1, 1, 1]] + [[2, 2, 2]] * 5 and k == [[3, 3, 3]] * 6
    # thick slices: no convolution across them and no down-sampling until the spacing is comparable
    k, s = get_kernels_strides((160, 192, 80), (1.0, 1.0, 2.5))
    assert s[:3] == [[1, 1, 1], [2, 2, 1], [2, 2, 2]] and k[:2] == [[3, 3, 1], [3, 3, 3]]
    assert k[-1] == [3, 3, 3] and len(k) == len(s)
    k, s = get_kernels_strides((16, 12))  # an axis stops being halved below 8 voxels
    assert s == [[1, 1], [2, 2], [2, 1]]
    with pytest.raises(ValueError, match="axis 0 .18 voxels"):
        get_kernels_strides((18, 32, 32))


def test_dynunet_derives_and_takes_kernels_and_strides() -> None:
    m = create_model("dynunet", 3, 1, 2, patch_size=(64, 64, 32), spacing=(0.8, 0.8, 2.0), filters=(8, 16, 32, 64, 64))
    k, s = get_kernels_strides((64, 64, 32), (0.8, 0.8, 2.0))
    assert [list(v) for v in m.strides] == s and [list(v) for v in m.kernel_size] == k
    assert m._divisors == (16, 16, 8) and m.size_divisor == 16
    own = create_model("dynunet", 2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=(8, 16, 32))
    assert own.strides == [1, 2, 2] and own.size_divisor == 4
    assert create_model("dynunet", 3, 1, 2).strides == get_kernels_strides((128, 128, 128))[1]  # the default patch
    with pytest.raises(ValueError, match=r"strides\[0\] must be 1"):
        create_model("dynunet", 2, 1, 2, kernel_size=[3, 3, 3], strides=[2, 2, 2])
    with pytest.raises(ValueError, match="patch_size .* must have 2 values"):
        create_model("dynunet", 2, 1, 2, patch_size=(16, 16, 16))


def test_dynunet_deep_supervision_and_the_trainer_loss() -> None:
    from medse.training.trainer import supervised_loss

    torch.manual_seed(0)
    m = create_model("dynunet", 2, 1, 3, patch_size=(32, 32), filters=(16, 16, 32, 32), deep_supervision=True,
                     deep_supr_num=2, attention="scse")
    x = torch.randn(2, 1, 30, 29)
    m.train()
    out = m(x)
    assert out.shape == (2, 3, 3, 30, 29)  # (B, 1 + deep_supr_num, C, *spatial), cropped back like the logits
    m.eval()
    assert m(x).shape == (2, 3, 30, 29)
    label = torch.randint(0, 3, (2, 1, 30, 29))
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = supervised_loss(DeepSupervisionLoss(base, weight_mode="exp"), out, label, 2)
    expected = sum(w * base(out[:, i].float(), label) for i, w in enumerate((1.0, 0.5, 0.25)))
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, base(out[:, 0], label))
    plain = torch.randn(2, 3, 30, 29)  # no stack: the loss of the logits
    assert torch.allclose(supervised_loss(DeepSupervisionLoss(base), plain, label, 2), base(plain, label))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


# ---------------------------------------------------------------------------------------- tokens (SQET-style)
def test_unetr_tokens_gate_is_the_documented_channel_gate() -> None:
    """tokens.l with cSE: z = mean over tokens, s = sigmoid(W2 relu(W1 z + b1) + b2), T' = T * s."""
    torch.manual_seed(0)
    kw = tiny("unetr", 2)
    m = create_model("unetr", 2, 1, 2, attention={"tokens.0": "cse"}, **kw).eval()
    assert m.attention_sites["tokens.0"] == "cse" and m.attention_sites["tokens.1"] == "none"
    layer = m.vit.blocks[0]
    gate = getattr(layer, ATTACHED).block
    seen = {}
    layer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("in", args[0]))
    m.vit.blocks[1].register_forward_pre_hook(lambda mod, args: seen.__setitem__("next", args[0]))
    with torch.no_grad():
        m(torch.randn(1, 1, 32, 32))
        raw = type(layer).forward(layer, seen["in"])  # the MONAI layer's own output, without the gate
        z = raw.mean(dim=1)
        s = torch.sigmoid(gate.fc2(torch.relu(gate.fc1(z))))
        assert torch.allclose(seen["next"], raw * s[:, None, :], atol=1e-6)
        assert not torch.allclose(seen["next"], raw)


def test_swinunetr_tokens_gate_every_block_of_a_stage() -> None:
    torch.manual_seed(0)
    kw = dict(tiny("swinunetr", 2), depths=(2, 1, 1, 1))
    m = create_model("swinunetr", 2, 1, 2, attention={"tokens.0": "cse", "bottleneck": "sse"}, **kw)
    blocks = list(m.swinViT.layers1[0].blocks)
    assert len(blocks) == 2 and all(hasattr(b, ATTACHED) for b in blocks)
    assert not hasattr(m.swinViT.layers2[0].blocks[0], ATTACHED)
    assert len(attention_modules(m)) == 3
    assert getattr(blocks[0], ATTACHED).block.fc1.in_features == 24  # feature_size channels in stage 0
    y = m(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 2, 32, 32)


def test_unetr_input_size_errors_and_padding() -> None:
    m = create_model("unetr", 2, 1, 2, **tiny("unetr", 2)).eval()
    assert m(torch.randn(1, 1, 20, 32)).shape == (1, 2, 20, 32)
    with pytest.raises(ValueError, match=r"larger than img_size \(32, 32\)"):
        m(torch.randn(1, 1, 48, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        create_model("unetr", 2, 1, 2, img_size=40)
    with pytest.raises(ValueError, match="multiple of 12"):
        create_model("swinunetr", 2, 1, 2, feature_size=16)


def test_fca_error_names_the_swin_stage_width() -> None:
    """FcaNet's 16 frequencies do not divide SwinUNETR's 24-channel stages: a clear error at construction."""
    with pytest.raises(ValueError, match=r"swinunetr encoder stage 0 \(24 channels\)"):
        create_model("swinunetr", 2, 1, 2, attention="fca", **tiny("swinunetr", 2))


def test_deepcopy_keeps_working_attached_attention() -> None:
    import copy

    torch.manual_seed(0)
    m = create_model("segresnet", 2, 1, 2, attention="cse", **tiny("segresnet", 2)).eval()
    c = copy.deepcopy(m)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), c(x))
        for mod in attention_modules(c):
            mod.fc2.bias.add_(5.0)  # the copy's hooks use the copy's modules, not the original's
        assert not torch.equal(m(x), c(x))
