"""Tests generated from the attention registry: every block x every supported dimension x odd sizes.

The contract every block keeps (shape, gradients, parameter formula, min_channels, recorded gate, fused =
unfused) is :class:`tests.contracts.BlockContract` (tests/test_contract_blocks.py); these are the rest.

The cases are read from ``list_attention()`` at collection time, so user blocks registered through
``MEDSE_PLUGINS`` are tested too: ``MEDSE_PLUGINS=path/to/my_block.py pytest tests/test_attention_blocks.py``.
"""

from __future__ import annotations

import pytest
import torch

from medse.attention import create_attention, list_attention
from medse.utils.complexity import count_params

C = 16
SIZES = {1: (7,), 2: (7, 5), 3: (7, 5, 3)}
CASES = [(n, d) for n, info in list_attention().items() for d in info.spatial_dims]
BLOCK_CASES = [(n, d) for n, d in CASES if n != "none"]
CHANNEL_GATES = ("se", "cse", "eca", "fca", "spse")  # gate constant over space
SPATIAL_GATE = ("sse",)  # gate constant over channels


def _build(name: str, d: int, c: int = C, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_attention(name, d, c, **kw)


def _x(d: int, b: int = 2, c: int = C, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, *SIZES[d], generator=g)


def test_paper_parameter_counts() -> None:
    # REFERENCE.md: scSE (r=2) C=64 -> 4,257, C=256 -> 66,177; CA C=64 -> 1,688, C=256 -> 6,680.
    assert count_params(create_attention("scse", 2, 64)) == 4257
    assert count_params(create_attention("scse", 3, 256)) == 66177
    assert count_params(create_attention("ca", 2, 64)) == 1688
    assert count_params(create_attention("ca", 2, 256)) == 6680
    assert count_params(create_attention("sse", 3, 64)) == 65
    assert count_params(create_attention("simam", 3, 64)) == 0
    c = 64  # SPSE: 2C*(C//16) + C//16 + 27C
    assert count_params(create_attention("spse", 2, c)) == 2 * c * (c // 16) + c // 16 + 27 * c
    assert count_params(create_attention("fca", 2, c)) == 2 * c * (c // 16)
    assert len(list(create_attention("fca", 2, c).buffers())) == 1  # DCT filters: a buffer, not a parameter


@pytest.mark.parametrize(("name", "d"), [(n, d) for n, d in BLOCK_CASES if n in CHANNEL_GATES])
def test_channel_gate_is_constant_over_space(name: str, d: int) -> None:
    block = _build(name, d, **({} if name == "eca" else {"reduction": 2})).eval()  # r=2: no all-dead hidden layer
    x = _x(d).abs() + 0.5
    ratio = block(x) / x
    flat = ratio.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-6)
    assert not torch.allclose(flat[:, :1], flat, atol=1e-4), "the gate should differ between channels"


@pytest.mark.parametrize("d", [1, 2, 3])
def test_sse_gate_is_constant_over_channels(d: int) -> None:
    block = _build("sse", d, record_gate=True)
    x = _x(d).abs() + 0.5
    ratio = block(x) / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6)
    assert block.last_gate is not None and block.last_gate.shape == (2, 1, *SIZES[d])
    assert torch.allclose(block.last_gate.expand_as(ratio), ratio, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_ca_gate_is_a_product_of_directional_gates(d: int) -> None:
    block = _build("ca", d, record_gate=True).eval()
    x = _x(d).abs() + 0.5
    r = (block(x) / x)[0, 3]
    sv = torch.linalg.svdvals(r.double() if d == 2 else r[0].double())
    assert sv[1] / sv[0] < 1e-6  # a_h[h] * a_w[w] is a rank-one matrix
    if d == 3:  # every 2D slice along D is rank one, and slices differ by a factor a_d
        ratio = r / r[:1]
        assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio), atol=1e-5)
    assert block.last_gate is not None
    assert torch.allclose(block.last_gate.expand(x.shape), block(x) / x, atol=1e-6)


def test_eca_gate_is_local_across_channels() -> None:
    block = _build("eca", 2, 32, kernel_size=3).eval()
    x = _x(2, c=32)
    x2 = x.clone()
    x2[:, 20] += 5.0  # channel 20 only influences the gates of channels 19, 20, 21
    g1, g2 = block(x) / x, block(x2) / x2
    changed = (g1 - g2).abs().flatten(2).amax(dim=(0, 2)) > 1e-7
    assert changed.nonzero().flatten().tolist() == [19, 20, 21]


@pytest.mark.parametrize("d", [1, 2, 3])
def test_simam_is_parameter_free_and_per_channel(d: int) -> None:
    block = _build("simam", d, record_gate=True)
    assert count_params(block) == 0 and len(list(block.buffers())) == 0
    x = _x(d)
    x2 = x.clone()
    x2[:, 1] *= 3.0
    y, y2 = block(x), block(x2)
    assert torch.allclose(y[:, 0], y2[:, 0]) and torch.allclose(y[:, 2:], y2[:, 2:])
    gate = block.last_gate
    assert gate is not None and gate.shape == x.shape
    assert (gate >= torch.sigmoid(torch.tensor(0.5)) - 1e-6).all() and (gate < 1).all()


# --- numerical robustness -------------------------------------------------------------------------------


def _inputs(d: int) -> dict[str, torch.Tensor]:
    return {
        "constant": torch.full((2, C, *SIZES[d]), 3.0),
        "single_position": torch.randn(2, C, *([1] * d)),
        "batch1": torch.randn(1, C, *SIZES[d]),
        "large": torch.randn(2, C, *SIZES[d]) * 1e4,
    }


@pytest.mark.parametrize(("name", "d"), BLOCK_CASES)
def test_robust_inputs(name: str, d: int) -> None:
    torch.manual_seed(3)
    block = _build(name, d)
    for mode in ("train", "eval"):
        block.train(mode == "train")
        for kind, x in _inputs(d).items():
            y = block(x)
            assert y.shape == x.shape
            assert torch.isfinite(y).all(), f"{name} {d}D {mode} {kind}"
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                for kind in ("batch1", "large"):
                    y = block(_inputs(d)[kind])
                    assert torch.isfinite(y).all(), f"{name} {d}D autocast {dtype} {kind}"


def test_simam_single_position_is_not_nan() -> None:
    block = create_attention("simam", 3, 4)
    x = torch.randn(2, 4, 1, 1, 1)
    assert torch.allclose(block(x), x * torch.sigmoid(torch.tensor(0.5)))


@pytest.mark.parametrize("name", ["ca", "spse"])
def test_batchnorm_blocks_eval_batch1_and_train_batch1(name: str) -> None:
    for d in list_attention()[name].spatial_dims:
        block = _build(name, d)
        x = torch.randn(1, C, *SIZES[d])
        block.eval()
        assert torch.isfinite(block(x)).all()
        block.train()
        bn = block.bn
        before = bn.running_mean.clone()
        assert torch.isfinite(block(x)).all()
        if name == "spse":  # batch of one in training: running statistics used, not updated
            assert torch.equal(bn.running_mean, before)


# --- 2D / 3D consistency --------------------------------------------------------------------------------


def _copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    dst_state = dst.state_dict()
    dst.load_state_dict({k: v.reshape(dst_state[k].shape) for k, v in src.state_dict().items()})


@pytest.mark.parametrize("name", ["se", "cse", "sse", "scse", "scse_smp", "eca", "simam"])
def test_3d_on_a_single_slice_equals_2d(name: str) -> None:
    b2 = _build(name, 2).eval()
    b3 = create_attention(name, 3, C).eval()
    _copy_weights(b2, b3)
    x = torch.randn(2, C, 7, 5, dtype=torch.float64)
    b2, b3 = b2.double(), b3.double()
    torch.testing.assert_close(b3(x.unsqueeze(2)).squeeze(2), b2(x), atol=1e-10, rtol=1e-10)
    # and 1D on a row equals 2D on a (1, W) image
    b1 = create_attention(name, 1, C).double().eval()
    _copy_weights(b2, b1)
    torch.testing.assert_close(b1(x[:, :, 0]), b2(x[:, :, :1]).squeeze(2), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("name", "d"), BLOCK_CASES)
def test_half_precision_modules(name: str, d: int) -> None:
    """Blocks converted to bfloat16 / float16 (no autocast) keep the dtype and stay finite.

    Known limit: float16 modules with activations near 1e4 overflow in FcaNet's and SPSE's 3D descriptors (sums
    over 7^3 and 4^3 cells exceed float16's 65504); bfloat16 and autocast handle them (tested above)."""
    for dtype, scale in ((torch.bfloat16, 1e4), (torch.float16, 1.0)):
        block = _build(name, d).to(dtype).eval()
        y = block((_x(d) * scale).to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all(), f"{name} {d}D {dtype}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "d"), BLOCK_CASES)
def test_cuda_matches_cpu(name: str, d: int, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions would differ by ~1e-3
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    block = _build(name, d).eval()
    x = _x(d)
    expected = block(x)
    got = block.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["scse", "fca", "ca", "spse", "eca+ca"])
def test_checkpoint_round_trip(name: str, tmp_path) -> None:
    from medse.utils.checkpoint import load_checkpoint, save_checkpoint

    d = 3
    block = _build(name, d).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1)
    path = save_checkpoint(tmp_path / "block.pt", {"model": block.state_dict()})
    torch.manual_seed(123)
    fresh = create_attention(name, d, C).eval()
    fresh.load_state_dict(load_checkpoint(path)["model"])  # weights_only=True
    x = _x(d)
    torch.testing.assert_close(fresh(x), block(x))
