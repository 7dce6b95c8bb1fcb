"""Each block against an independent, plain transcription of its paper's formula (random inputs and weights).

The transcriptions below read weights from the blocks by their documented names but recompute everything else
by hand (loops, einsum, explicit BatchNorm / h_swish / DCT formulas), in float64. Blocks with a fast path are
checked with fused=False (plain code) and fused=True (their kernel in medse/attention/kernels/).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medse.attention import (
    ECA,
    SCSE,
    SPSE,
    ChannelSE,
    CoordAttention,
    FcaAttention,
    ProjectExcite,
    SimAM,
    SpatialSE,
    SqueezeExcitation,
    create_attention,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
SIZES = {1: (7,), 2: (7, 5), 3: (7, 5, 3)}


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights, biases, BatchNorm affine parameters and running statistics; float64."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
    return module


def _x(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-t))


def _mean_space(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1).sum(-1) / math.prod(x.shape[2:])


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.reshape(*s.shape, *([1] * (x.ndim - s.ndim)))


def ref_se(x, w1, b1, w2, b2):
    z = _mean_space(x)
    h = torch.clamp(z @ w1.T + (0 if b1 is None else b1), min=0)
    s = _sigmoid(h @ w2.T + (0 if b2 is None else b2))
    return x * _bcast(s, x)


def ref_sse_gate(x, w, b):
    q = torch.einsum("bc...,c->b...", x, w.flatten()) + b
    return _sigmoid(q).unsqueeze(1)


def ref_eca(x, w):
    k = w.numel()
    pad = (k - 1) // 2
    z = _mean_space(x)
    b, c = z.shape
    s = torch.zeros_like(z)
    for i in range(c):
        for j in range(k):
            src = i + j - pad
            if 0 <= src < c:
                s[:, i] += w.flatten()[j] * z[:, src]
    return x * _bcast(_sigmoid(s), x)


def ref_simam(x, lam):
    n = math.prod(x.shape[2:]) - 1
    mu = _bcast(_mean_space(x), x)
    d = (x - mu) ** 2
    dsum = _bcast(d.reshape(x.shape[0], x.shape[1], -1).sum(-1), x)
    e = d / (4 * (dsum / n + lam)) + 0.5
    return x * _sigmoid(e)


def ref_bn_eval(t, bn):
    shape = (1, -1) + (1,) * (t.ndim - 2)
    mean, var = bn.running_mean.reshape(shape), bn.running_var.reshape(shape)
    return (t - mean) / torch.sqrt(var + bn.eps) * bn.weight.reshape(shape) + bn.bias.reshape(shape)


def ref_bn_train(t, bn):
    axes = [0] + list(range(2, t.ndim))
    shape = (1, -1) + (1,) * (t.ndim - 2)
    mean = t.mean(dim=axes, keepdim=True)
    var = ((t - mean) ** 2).mean(dim=axes, keepdim=True)
    return (t - mean) / torch.sqrt(var + bn.eps) * bn.weight.reshape(shape) + bn.bias.reshape(shape)


def ref_hswish(t):
    return t * torch.clamp(t + 3, 0, 6) / 6


def pw(t, conv):
    """Pointwise conv by einsum: (B, Cin, *sp) -> (B, Cout, *sp)."""
    w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])
    out = torch.einsum("bi...,oi->bo...", t, w)
    return out + conv.bias.reshape(1, -1, *([1] * (t.ndim - 2)))


# --- SE / cSE / sSE / scSE ------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize(("cls", "r"), [(SqueezeExcitation, 16), (ChannelSE, 2), (ChannelSE, 4)])
def test_se_and_cse(cls, r, d, fused) -> None:
    block = _randomize(cls(d, 32, reduction=r, fused=fused))
    assert block.fc1.out_features == 32 // r
    x = _x((2, 32, *SIZES[d]))
    torch.testing.assert_close(
        block(x), ref_se(x, block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias), **TOL
    )


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_sse(d, fused) -> None:
    block = _randomize(SpatialSE(d, 8, fused=fused))
    x = _x((2, 8, *SIZES[d]))
    torch.testing.assert_close(block(x), x * ref_sse_gate(x, block.conv.weight, block.conv.bias), **TOL)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("aggregation", ["max", "add", "mul"])
def test_scse(aggregation, d, fused) -> None:
    block = _randomize(SCSE(d, 16, aggregation=aggregation, fused=fused))
    x = _x((2, 16, *SIZES[d]))
    cse = block.cse
    xc = ref_se(x, cse.fc1.weight, cse.fc1.bias, cse.fc2.weight, cse.fc2.bias)
    q = ref_sse_gate(x, block.sse.conv.weight, block.sse.conv.bias)
    xs = x * q
    expected = {"max": torch.maximum(xc, xs), "add": xc + xs, "mul": xc * q}[aggregation]
    torch.testing.assert_close(block(x), expected, **TOL)


def test_scse_smp_preset_is_add_with_r16() -> None:
    block = create_attention("scse_smp", 2, 32)
    assert block.aggregation == "add" and block.cse.fc1.out_features == 2
    assert create_attention("scse", 2, 32).aggregation == "max"


# --- ECA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_eca(k, d, fused) -> None:
    block = _randomize(ECA(d, 12, kernel_size=k, fused=fused))
    x = _x((2, 12, *SIZES[d]))
    torch.testing.assert_close(block(x), ref_eca(x, block.conv.weight), **TOL)


@pytest.mark.parametrize(("c", "k"), [(16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel(c, k) -> None:
    assert ECA(2, c).kernel_size == k


# --- SimAM ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("lam", [1e-4, 0.1])
def test_simam(lam, d, fused) -> None:
    block = SimAM(d, 8, e_lambda=lam, fused=fused)
    x = _x((2, 8, *SIZES[d]))
    torch.testing.assert_close(block(x), ref_simam(x, lam), **TOL)
    xf = x.float()  # float32 path
    torch.testing.assert_close(block(xf), ref_simam(x, lam).float(), **TOL)


# --- FcaNet ---------------------------------------------------------------------------------------------

TOP16 = [(0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0), (5, 0), (1, 6), (3, 0), (0, 4), (0, 6)]
TOP16 += [(0, 3), (3, 5), (2, 2)]
LOW16 = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2), (2, 2), (0, 3), (3, 0), (4, 0), (0, 4)]
LOW16 += [(1, 3), (3, 1), (0, 5)]
BOT16 = [(6, 6), (1, 4), (3, 4), (3, 6), (2, 6), (4, 3), (1, 1), (2, 4), (4, 4), (4, 5), (5, 6), (1, 5), (4, 2)]
BOT16 += [(6, 2), (2, 5), (5, 1)]


def dct1(p, f, n):
    v = math.cos(math.pi * f * (p + 0.5) / n) / math.sqrt(n)
    return v * math.sqrt(2) if f else v


def ref_fca(x, freqs, dct, fc1, fc2):
    """freqs: per-group tuples already scaled; dct: per-axis sizes."""
    b, c = x.shape[:2]
    xp = x
    if tuple(x.shape[2:]) != tuple(dct):
        xp = (F.adaptive_avg_pool2d if len(dct) == 2 else F.adaptive_avg_pool3d)(x, tuple(dct))
    group = c // len(freqs)
    y = torch.zeros(b, c, dtype=x.dtype)
    for ch in range(c):
        f = freqs[ch // group]
        if len(dct) == 2:
            for h in range(dct[0]):
                for w in range(dct[1]):
                    y[:, ch] += xp[:, ch, h, w] * dct1(h, f[0], dct[0]) * dct1(w, f[1], dct[1])
        else:
            for a in range(dct[0]):
                for h in range(dct[1]):
                    for w in range(dct[2]):
                        basis = dct1(a, f[0], dct[0]) * dct1(h, f[1], dct[1]) * dct1(w, f[2], dct[2])
                        y[:, ch] += xp[:, ch, a, h, w] * basis
    s = _sigmoid(torch.clamp(y @ fc1.T, min=0) @ fc2.T)
    return x * _bcast(s, x)


@pytest.mark.parametrize(("method", "pairs"), [("top16", TOP16), ("low16", LOW16), ("bot16", BOT16)])
def test_fca_2d_exact_size(method, pairs) -> None:
    block = _randomize(FcaAttention(2, 32, reduction=4, freq_method=method))
    x = _x((2, 32, 7, 7))
    expected = ref_fca(x, pairs, (7, 7), block.fc1.weight, block.fc2.weight)
    torch.testing.assert_close(block(x), expected, **TOL)


def test_fca_2d_pooled_and_scaled_frequencies() -> None:
    block = _randomize(FcaAttention(2, 8, reduction=2, freq_method="top4", dct_size=(14, 7)))
    x = _x((2, 8, 9, 11))  # pooled to 14 x 7 (adaptive pooling up and down)
    pairs = [(u * 2, v) for u, v in TOP16[:4]]
    torch.testing.assert_close(block(x), ref_fca(x, pairs, (14, 7), block.fc1.weight, block.fc2.weight), **TOL)


def test_fca_frequency_zero_is_scaled_mean() -> None:
    block = FcaAttention(2, 4, reduction=2, freq_method="top1").double()
    x = _x((1, 4, 7, 7))
    torch.testing.assert_close(block.descriptor(x), 7.0 * _mean_space(x), **TOL)  # sqrt(HW) * mean


def test_fca_3d_extension() -> None:
    block = _randomize(FcaAttention(3, 8, reduction=2, freq_method="low8"))
    x = _x((2, 8, 5, 7, 9))
    triples = [(0, u, v) for u, v in LOW16[:8]]
    torch.testing.assert_close(block(x), ref_fca(x, triples, (7, 7, 7), block.fc1.weight, block.fc2.weight), **TOL)
    explicit = _randomize(FcaAttention(3, 4, reduction=2, frequencies=[(1, 0, 0), (0, 2, 1), (3, 3, 3), (6, 0, 1)]))
    torch.testing.assert_close(
        explicit(x[:, :4]),
        ref_fca(
            x[:, :4], [(1, 0, 0), (0, 2, 1), (3, 3, 3), (6, 0, 1)], (7, 7, 7), explicit.fc1.weight, explicit.fc2.weight
        ),
        **TOL,
    )


def test_fca_filter_is_a_persistent_buffer() -> None:
    block = FcaAttention(2, 16)
    assert "dct_filter" in block.state_dict()
    assert not any("dct" in n for n, _ in block.named_parameters())


# --- Coordinate attention -------------------------------------------------------------------------------


def ref_ca_2d(x, m, train):
    b, c, h, w = x.shape
    x_h = x.mean(dim=3, keepdim=True)  # (B, C, H, 1)
    x_w = x.mean(dim=2, keepdim=True).permute(0, 1, 3, 2)  # (B, C, W, 1)
    y = pw(torch.cat([x_h, x_w], dim=2), m.conv1)
    y = ref_hswish((ref_bn_train if train else ref_bn_eval)(y, m.bn))
    y_h, y_w = y[:, :, :h], y[:, :, h:].permute(0, 1, 3, 2)
    a_h = _sigmoid(pw(y_h, m.conv_gates[0]))
    a_w = _sigmoid(pw(y_w, m.conv_gates[1]))
    return x * a_w * a_h


def ref_ca_3d(x, m, train):
    b, c, d, h, w = x.shape
    x_d = x.mean(dim=(3, 4)).reshape(b, c, d, 1, 1)
    x_h = x.mean(dim=(2, 4)).reshape(b, c, h, 1, 1)
    x_w = x.mean(dim=(2, 3)).reshape(b, c, w, 1, 1)
    y = pw(torch.cat([x_d, x_h, x_w], dim=2), m.conv1)
    y = ref_hswish((ref_bn_train if train else ref_bn_eval)(y, m.bn))
    a_d = _sigmoid(pw(y[:, :, :d], m.conv_gates[0])).reshape(b, c, d, 1, 1)
    a_h = _sigmoid(pw(y[:, :, d : d + h], m.conv_gates[1])).reshape(b, c, 1, h, 1)
    a_w = _sigmoid(pw(y[:, :, d + h :], m.conv_gates[2])).reshape(b, c, 1, 1, w)
    return x * a_d * a_h * a_w


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("d", [2, 3])
def test_coord_attention(d, train, fused) -> None:
    block = _randomize(CoordAttention(d, 16, fused=fused)).train(train)
    assert block.mip == 8
    x = _x((2, 16, *SIZES[d]))
    expected = (ref_ca_2d if d == 2 else ref_ca_3d)(x, block, train)
    torch.testing.assert_close(block(x), expected, **TOL)


def test_coord_attention_mip() -> None:
    assert CoordAttention(2, 64).mip == 8 and CoordAttention(2, 512).mip == 16


# --- SPSE -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3])
def test_spse(d) -> None:
    block = _randomize(SPSE(d, 16, reduction=4)).eval()
    x = _x((2, 16, *SIZES[d]))
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[d]
    z = 0
    for level, conv in zip((1, 2, 4), block.fuse, strict=True):
        p = pool(x, level).reshape(2, 16, -1)  # (B, C, level^d)
        z = z + (p * conv.weight.reshape(16, -1)).sum(-1) + conv.bias  # depthwise, kernel = level
    z = torch.clamp(ref_bn_eval(z, block.bn), min=0)
    s = _sigmoid(torch.clamp(z @ block.fc1.weight.T + block.fc1.bias, min=0) @ block.fc2.weight.T + block.fc2.bias)
    torch.testing.assert_close(block(x), x * _bcast(s, x), **TOL)


# --- Project & Excite -----------------------------------------------------------------------------------


def test_project_excite() -> None:
    block = _randomize(ProjectExcite(3, 8))
    x = _x((2, 8, 7, 5, 3))
    b, c, d, h, w = x.shape
    z = torch.zeros_like(x)
    for i in range(d):
        for j in range(h):
            for k in range(w):
                z[:, :, i, j, k] = (
                    x[:, :, i].mean(dim=(2, 3)) + x[:, :, :, j].mean(dim=(2, 3)) + x[..., k].mean(dim=(2, 3))
                )
    gate = _sigmoid(pw(torch.clamp(pw(z, block.conv1), min=0), block.conv2))
    torch.testing.assert_close(block(x), x * gate, **TOL)


@pytest.mark.parametrize("d", [2, 3])
def test_fca_every_method_and_orthonormal_basis(d) -> None:
    from medse.attention.fca import FREQ_METHODS, dct_filter

    assert len(FREQ_METHODS) == 18
    for method in FREQ_METHODS:
        n = int(method[3:])
        block = FcaAttention(d, 32, reduction=2, freq_method=method)
        assert len(block.frequencies) == n and len(set(block.frequencies)) == n
        assert block(torch.randn(1, 32, *([5] * d))).shape == (1, 32, *([5] * d))
    # distinct DCT-II basis functions are orthonormal: <F_i, F_j> = delta_ij
    freqs = [(0, 0, 0), (1, 0, 0), (0, 3, 2), (6, 6, 6)] if d == 3 else [(0, 0), (1, 0), (3, 2), (6, 6)]
    filt = dct_filter((7,) * d, freqs, 4).double().flatten(1)
    torch.testing.assert_close(filt @ filt.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
