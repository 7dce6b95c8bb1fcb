"""The blocks since 2021 (GRN, CBAM and its halves, ELA, EMA) against independent transcriptions of the authors' code.

Each transcription below is written from the authors' code (ConvNeXt-V2 ``models/utils.py`` ``GRN``; MONAI's MedNeXt
``global_resp_norm``, called from MONAI itself; Jongchan/attention-module ``MODELS/cbam.py``; YOLOonMe's ``EMA``)
or, for ELA (no official code), from the paper's equations and listing, in the authors' own style (pool modules,
channels-last, ``view``/``permute``), so that it shares no code with medse. Where the authors define 2D only, the
3D (and 1D) transcriptions spell out the extension medse documents (NOTE: not in paper). Forward and gradients
(input and every parameter) are compared in float64 on odd sizes, with batch 1 and 2, with random parameters
(GRN's zero initialisation would hide the formula). Then every segmentation network x every new block x 2D/3D
trains a step and predicts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.mednext_block import MedNeXtBlock
from torch import nn

from medse.attention import create_attention, list_attention
from medse.networks import attention_modules, create_model, list_models

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py

NEW = ("grn", "cbam", "cbam_channel", "cbam_spatial", "ela", "ema")
ODD = {1: (9,), 2: (7, 5), 3: (5, 7, 3)}
BATCHES = (1, 2)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Random values for every parameter (zero-initialised GRN, unit GroupNorm would hide formula details)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (0.5 if p.ndim == 1 else 0.0))


def _compare(ours: nn.Module, ref: nn.Module, names: dict[str, str], x: torch.Tensor, train: bool = True,
             layout=None) -> None:
    """Copy ours' parameters into ref (``names``: ours -> ref, reshaped), then compare outputs and gradients."""
    ours, ref = ours.double().train(train), ref.double().train(train)
    _randomize(ours)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for a, b in names.items():
            ref_params[b].copy_(ours.get_parameter(a).reshape(ref_params[b].shape))
    assert {n for n, _ in ours.named_parameters()} == set(names), "every parameter must be mapped"
    assert set(ref_params) == set(names.values())
    to_ref, from_ref = layout or ((lambda t: t), (lambda t: t))
    xa = x.double().clone().requires_grad_(True)
    xb = x.double().clone().requires_grad_(True)
    ya = ours(xa)
    yb = from_ref(ref(to_ref(xb)))
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    w = torch.randn(ya.shape, generator=torch.Generator().manual_seed(7), dtype=ya.dtype)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-11)
    for a, b in names.items():
        ga, gb = ours.get_parameter(a).grad, ref_params[b].grad
        torch.testing.assert_close(ga, gb.reshape(ga.shape), rtol=1e-9, atol=1e-11, msg=f"gradient of {a}")
    for (na, ba), (nb, bb) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):  # BatchNorm statistics
        torch.testing.assert_close(ba, bb, msg=f"buffer {na} / {nb}")


def _x(b: int, c: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, *ODD[d], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------ GRN
class ConvNeXtV2GRN(nn.Module):
    """facebookresearch/ConvNeXt-V2 models/utils.py ``GRN``: channels-last input (N, *spatial, C).

    The authors' spatial axes (1, 2) become (1, ..., d) for 1D and 3D."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, *([1] * spatial_dims), dim))
        self.beta = nn.Parameter(torch.zeros(1, *([1] * spatial_dims), dim))
        self.axes = tuple(range(1, spatial_dims + 1))

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=self.axes, keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * Nx) + self.beta + x


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_grn_equals_convnext_v2(d: int, b: int) -> None:
    channels_last = (lambda t: t.movedim(1, -1)), (lambda t: t.movedim(-1, 1))
    _compare(create_attention("grn", d, 12), ConvNeXtV2GRN(12, d), {"gamma": "gamma", "beta": "beta"},
             _x(b, 12, d), layout=channels_last)


@pytest.mark.parametrize("d", [2, 3])
def test_grn_equals_monai_mednext_global_resp_norm(d: int) -> None:
    """MONAI's MedNeXtBlock with global_resp_norm=True, with medse's GRN put where MONAI computes its own."""
    c, exp = 6, 2
    torch.manual_seed(0)
    block = MedNeXtBlock(c, c, expansion_ratio=exp, kernel_size=3, dim=f"{d}d", global_resp_norm=True).double()
    grn = create_attention("grn", d, c * exp).double()
    _randomize(grn)
    with torch.no_grad():
        block.global_resp_gamma.copy_(grn.gamma.reshape(block.global_resp_gamma.shape))
        block.global_resp_beta.copy_(grn.beta.reshape(block.global_resp_beta.shape))
    x = _x(2, c, d)
    ours = block.conv3(grn(block.act(block.conv2(block.norm(block.conv1(x)))))) + x
    torch.testing.assert_close(ours, block(x), rtol=1e-10, atol=1e-12)


def test_grn_starts_as_identity_and_keeps_half_precision_finite() -> None:
    block = create_attention("grn", 3, 8)
    x = torch.randn(2, 8, 5, 6, 7)
    assert torch.equal(block(x), x)
    _randomize(block)
    big = (torch.randn(1, 8, 9, 9, 9) * 300).half()  # sum of squares ~ 6e7: beyond float16
    y = block.half()(big)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------------------- CBAM
def test_cbam_resnet50_parameter_count_matches_the_paper() -> None:
    from medse.attention.report import RESNET50_PARAMS, resnet50_params

    added = resnet50_params("cbam")  # one CBAM per bottleneck, r=16, 7x7: the paper's ResNet-50 + CBAM, 28.09M
    assert added == resnet50_params("se") + 16 * (2 * 49 + 2)
    assert round((RESNET50_PARAMS + added) / 1e6, 2) == 28.09


def _pool(kind: str, d: int):
    return getattr(F, f"{kind}_pool{d}d")


def logsumexp_2d(tensor):
    tensor_flatten = tensor.view(tensor.size(0), tensor.size(1), -1)
    s, _ = torch.max(tensor_flatten, dim=2, keepdim=True)
    return s + (tensor_flatten - s).exp().sum(dim=2, keepdim=True).log()


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    """Jongchan/attention-module MODELS/cbam.py ``ChannelGate``; F.*_pool2d becomes F.*_pool{d}d."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), d=2):
        super().__init__()
        self.mlp = nn.Sequential(Flatten(), nn.Linear(gate_channels, gate_channels // reduction_ratio), nn.ReLU(),
                                 nn.Linear(gate_channels // reduction_ratio, gate_channels))
        self.pool_types = pool_types
        self.d = d

    def forward(self, x):
        size = tuple(x.shape[2:])
        channel_att_sum = None
        for pool_type in self.pool_types:
            if pool_type == "avg":
                channel_att_raw = self.mlp(_pool("avg", self.d)(x, size, stride=size))
            elif pool_type == "max":
                channel_att_raw = self.mlp(_pool("max", self.d)(x, size, stride=size))
            elif pool_type == "lp":
                channel_att_raw = self.mlp(_pool("lp", self.d)(x, 2, size, stride=size))
            else:
                channel_att_raw = self.mlp(logsumexp_2d(x))
            channel_att_sum = channel_att_raw if channel_att_sum is None else channel_att_sum + channel_att_raw
        scale = torch.sigmoid(channel_att_sum).view(*channel_att_sum.shape, *([1] * self.d)).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class BasicConv(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, padding, d):
        super().__init__()
        self.conv = getattr(nn, f"Conv{d}d")(in_planes, out_planes, kernel_size, stride=1, padding=padding, bias=False)
        self.bn = getattr(nn, f"BatchNorm{d}d")(out_planes, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialGate(nn.Module):
    def __init__(self, d=2, kernel_size=7):
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, padding=(kernel_size - 1) // 2, d=d)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class AuthorsCBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), d=2):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types, d)
        self.SpatialGate = SpatialGate(d)

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


_CHANNEL_NAMES = {"fc1.weight": "mlp.1.weight", "fc1.bias": "mlp.1.bias", "fc2.weight": "mlp.3.weight",
                  "fc2.bias": "mlp.3.bias"}
_SPATIAL_NAMES = {"conv.weight": "spatial.conv.weight", "bn.weight": "spatial.bn.weight", "bn.bias": "spatial.bn.bias"}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_cbam_equals_authors(d: int, b: int, train: bool) -> None:
    names = {f"channel.{k}": f"ChannelGate.{v}" for k, v in _CHANNEL_NAMES.items()}
    names |= {f"spatial.{k}": f"SpatialGate.{v}" for k, v in _SPATIAL_NAMES.items()}
    _compare(create_attention("cbam", d, 32, reduction=8), AuthorsCBAM(32, 8, d=d), names, _x(b, 32, d), train)


@pytest.mark.parametrize("pools", [("avg",), ("max",), ("avg", "max", "lp", "lse")])
@pytest.mark.parametrize("d", [2, 3])
def test_cbam_channel_gate_pool_types_equal_authors(d: int, pools: tuple[str, ...]) -> None:
    _compare(create_attention("cbam_channel", d, 32, reduction=4, pool_types=pools), ChannelGate(32, 4, pools, d),
             _CHANNEL_NAMES, _x(2, 32, d))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_cbam_spatial_gate_equals_authors(d: int) -> None:
    _compare(create_attention("cbam_spatial", d, 8), SpatialGate(d), _SPATIAL_NAMES, _x(2, 8, d))


def test_cbam_is_its_two_halves_composed() -> None:
    whole = create_attention("cbam", 3, 32).double()
    _randomize(whole)
    halves = create_attention("cbam_channel+cbam_spatial", 3, 32).double()
    halves[0].load_state_dict(whole.channel.state_dict())
    halves[1].load_state_dict(whole.spatial.state_dict())
    x = _x(2, 32, 3)
    torch.testing.assert_close(halves(x), whole(x), rtol=1e-12, atol=1e-12)
    whole.record_gate = True
    y = whole(x)
    torch.testing.assert_close(whole.last_gate.expand_as(x) * x, y, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ ELA
class PaperELA(nn.Module):
    """ELA as the paper's equations and listing (kernel 7, depthwise 1D conv without bias, GroupNorm(16, C)).

    3D: one strip per axis (D, H, W), NOTE: not in paper, medse's extension."""

    def __init__(self, channel, kernel_size=7, d=2):
        super().__init__()
        self.conv = nn.Conv1d(channel, channel, kernel_size=kernel_size, padding=kernel_size // 2, groups=channel,
                              bias=False)
        self.gn = nn.GroupNorm(16, channel)
        self.sigmoid = nn.Sigmoid()
        self.d = d

    def forward(self, x):
        if self.d == 2:
            b, c, h, w = x.size()
            x_h = torch.mean(x, dim=3, keepdim=True).view(b, c, h)
            x_w = torch.mean(x, dim=2, keepdim=True).view(b, c, w)
            x_h = self.sigmoid(self.gn(self.conv(x_h))).view(b, c, h, 1)
            x_w = self.sigmoid(self.gn(self.conv(x_w))).view(b, c, 1, w)
            return x * x_h * x_w
        b, c, dd, h, w = x.size()
        x_d = x.mean(dim=(3, 4)).view(b, c, dd)
        x_h = x.mean(dim=(2, 4)).view(b, c, h)
        x_w = x.mean(dim=(2, 3)).view(b, c, w)
        x_d = self.sigmoid(self.gn(self.conv(x_d))).view(b, c, dd, 1, 1)
        x_h = self.sigmoid(self.gn(self.conv(x_h))).view(b, c, 1, h, 1)
        x_w = self.sigmoid(self.gn(self.conv(x_w))).view(b, c, 1, 1, w)
        return x * x_d * x_h * x_w


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("d", [2, 3])
def test_ela_equals_paper(d: int, b: int) -> None:
    names = {"conv.weight": "conv.weight", "gn.weight": "gn.weight", "gn.bias": "gn.bias"}
    _compare(create_attention("ela", d, 32), PaperELA(32, d=d), names, _x(b, 32, d))
    assert create_attention("ela", d, 48).gn.num_groups == 16


def test_ela_options_and_odd_widths() -> None:
    block = create_attention("ela", 2, 24, kernel_size=5, groups=3, gn_groups=4)
    assert block.conv.weight.shape == (24, 8, 5) and block.gn.num_groups == 4
    assert create_attention("ela", 2, 24).gn.num_groups == 8  # gcd(16, 24)
    with pytest.raises(ValueError, match="groups must be a positive divisor"):
        create_attention("ela", 2, 24, groups=5)
    with pytest.raises(ValueError, match="kernel_size"):
        create_attention("ela", 2, 24, kernel_size=4)


# ------------------------------------------------------------------------------------------------------ EMA
class AuthorsEMA(nn.Module):
    """YOLOonMe/EMA-attention-module ``EMA`` (2D as the authors'); 3D: medse's extension spelled out with pools."""

    def __init__(self, channels, factor=32, d=2):
        super().__init__()
        self.groups = factor
        assert channels // self.groups > 0
        cg = channels // self.groups
        self.d = d
        self.softmax = nn.Softmax(-1)
        if d == 2:
            self.agp = nn.AdaptiveAvgPool2d((1, 1))
            self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
            self.pool_w = nn.AdaptiveAvgPool2d((1, None))
            self.conv1x1 = nn.Conv2d(cg, cg, kernel_size=1, stride=1, padding=0)
            self.conv3x3 = nn.Conv2d(cg, cg, kernel_size=3, stride=1, padding=1)
        else:
            self.agp = nn.AdaptiveAvgPool3d((1, 1, 1))
            self.pool_d = nn.AdaptiveAvgPool3d((None, 1, 1))
            self.pool_h = nn.AdaptiveAvgPool3d((1, None, 1))
            self.pool_w = nn.AdaptiveAvgPool3d((1, 1, None))
            self.conv1x1 = nn.Conv3d(cg, cg, kernel_size=1, stride=1, padding=0)
            self.conv3x3 = nn.Conv3d(cg, cg, kernel_size=3, stride=1, padding=1)
        self.gn = nn.GroupNorm(cg, cg)

    def forward(self, x):
        if self.d == 2:
            b, c, h, w = x.size()
            group_x = x.reshape(b * self.groups, -1, h, w)
            x_h = self.pool_h(group_x)
            x_w = self.pool_w(group_x).permute(0, 1, 3, 2)
            hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
            x_h, x_w = torch.split(hw, [h, w], dim=2)
            x1 = self.gn(group_x * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
            n = h * w
            shape = (h, w)
        else:
            b, c, dd, h, w = x.size()
            group_x = x.reshape(b * self.groups, -1, dd, h, w)
            x_d = self.pool_d(group_x)  # (bg, cg, D, 1, 1)
            x_h = self.pool_h(group_x).permute(0, 1, 3, 2, 4)  # (bg, cg, H, 1, 1)
            x_w = self.pool_w(group_x).permute(0, 1, 4, 3, 2)  # (bg, cg, W, 1, 1)
            dhw = self.conv1x1(torch.cat([x_d, x_h, x_w], dim=2))
            x_d, x_h, x_w = torch.split(dhw, [dd, h, w], dim=2)
            x1 = self.gn(group_x * x_d.sigmoid() * x_h.permute(0, 1, 3, 2, 4).sigmoid()
                         * x_w.permute(0, 1, 4, 3, 2).sigmoid())
            n = dd * h * w
            shape = (dd, h, w)
        x2 = self.conv3x3(group_x)
        x11 = self.softmax(self.agp(x1).reshape(b * self.groups, -1, 1).permute(0, 2, 1))
        x12 = x2.reshape(b * self.groups, c // self.groups, -1)
        x21 = self.softmax(self.agp(x2).reshape(b * self.groups, -1, 1).permute(0, 2, 1))
        x22 = x1.reshape(b * self.groups, c // self.groups, -1)
        weights = (torch.matmul(x11, x12) + torch.matmul(x21, x22)).reshape(b * self.groups, 1, *shape)
        assert weights[0].numel() == n
        return (group_x * weights.sigmoid()).reshape(x.shape)


_EMA_NAMES = {k: k for k in ("conv1x1.weight", "conv1x1.bias", "conv3x3.weight", "conv3x3.bias", "gn.weight",
                             "gn.bias")}


@pytest.mark.parametrize(("c", "factor"), [(64, 32), (16, 4)])
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("d", [2, 3])
def test_ema_equals_authors(d: int, b: int, c: int, factor: int) -> None:
    _compare(create_attention("ema", d, c, factor=factor), AuthorsEMA(c, factor, d), _EMA_NAMES, _x(b, c, d))


def test_ema_groups_fit_every_width_and_gate_is_per_group() -> None:
    assert create_attention("ema", 2, 64).groups == 32  # the authors' grouping
    assert create_attention("ema", 2, 48).groups == 16 and create_attention("ema", 2, 24).groups == 8
    block = create_attention("ema", 3, 16, factor=4, record_gate=True)
    x = torch.randn(2, 16, 4, 5, 6)
    y = block(x)
    gate = block.last_gate
    assert gate.shape == x.shape
    torch.testing.assert_close(gate * x, y)
    g = gate.reshape(2, 4, 4, -1)  # channels of one group share the group's map
    assert torch.equal(g, g[:, :, :1].expand_as(g))


# ---------------------------------------------------------------------- every network x every new block, train + predict
SEGMENTATION = sorted(list_models(task="segmentation"))
HEAVY = {"unetr", "swinunetr"}


def _tiny(name: str, dims: int) -> dict:
    from test_networks import TINY
    from test_networks_monai import tiny

    return dict(TINY[name]) if name in TINY else tiny(name, dims)


def _cases() -> list:
    """Fast: 2D everywhere (the heavy transformer networks with cbam and ema only) and 3D U-Net; the rest slow."""
    out = []
    for name in SEGMENTATION:
        for block in NEW:
            for dims in (2, 3):
                fast = (dims == 2 and (name not in HEAVY or block in ("cbam", "ema"))) or (dims == 3 and name == "unet")
                out.append(pytest.param(name, block, dims, marks=[] if fast else [pytest.mark.slow],
                                        id=f"{name}-{block}-{dims}d"))
    return out


@pytest.mark.parametrize(("name", "block", "dims"), _cases())
def test_every_network_trains_a_step_and_predicts_with_the_new_blocks(name: str, block: str, dims: int) -> None:
    info = list_attention()[block]
    kw = _tiny(name, dims)
    if dims not in info.spatial_dims:
        with pytest.raises(ValueError, match="spatial_dims"):
            create_model(name, dims, 1, 2, attention=block, **kw)
        return
    torch.manual_seed(0)
    model = create_model(name, dims, 1, 2, attention=block, **kw)
    atts = attention_modules(model)
    assert atts and all(type(m) is info.cls for m in atts)
    size = (20, 18, 17)[:dims] if name not in HEAVY else (30, 29, 31)[:dims]
    x = torch.randn(2, 1, *size)
    target = torch.randint(0, 2, (2, *size))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    params = [p for m in atts for p in m.parameters()]
    before = [p.detach().clone() for p in params]
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    assert params and any(not torch.equal(a, p) for a, p in zip(before, params, strict=True)), "attention must train"
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert pred.shape == (2, *size)
