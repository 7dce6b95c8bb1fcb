"""ResNet50V2 (Keras layout): parameter counts, SE overhead, layout, attention placement, 2D/3D, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medse.networks.resnet import STACKS, PreActBottleneck, ResNet50V2, keras_param_count


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test, restored after: on a shared 2-core machine this is several times faster."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _meta(**kw) -> ResNet50V2:
    """Build on the meta device: shapes and counts without the cost of initialising 25M weights."""
    with torch.device("meta"):
        return ResNet50V2(**kw)


def test_keras_parameter_count_with_1000_class_head():
    # Keras ResNet50V2().summary(): Total 25,613,800 = trainable 25,568,360 + non-trainable 45,440
    # (BatchNorm moving mean + moving variance, which PyTorch keeps as buffers).
    m = _meta(spatial_dims=2, in_channels=3, out_channels=1000)
    counts = keras_param_count(m)
    assert counts == {"trainable": 25_568_360, "non_trainable": 45_440, "total": 25_613_800}
    assert _n(m) == 25_568_360
    bn_channels = sum(b.num_features for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert 2 * bn_channels == 45_440
    # without the head (include_top=False): 23,564,800 in Keras's count
    assert keras_param_count(_meta(out_channels=0))["total"] == 23_564_800


def test_se_overhead_matches_derivation():
    # SE(C, r=16) on the residual branch: Linear(C, C/16) + Linear(C/16, C), both with bias
    # -> 2 * C * (C/16) + C/16 + C per block; C = 4f = 256, 512, 1024, 2048 over 3, 4, 6, 3 blocks.
    expected = sum(n * (2 * (4 * f) * (4 * f // 16) + 4 * f // 16 + 4 * f) for f, n, _ in STACKS)
    assert expected == 3 * 8_464 + 4 * 33_312 + 6 * 132_160 + 3 * 526_464 == 2_530_992
    base = _meta(out_channels=1000)
    se = _meta(out_channels=1000, attention="se")
    assert _n(se) - _n(base) == expected
    se_small = _meta(out_channels=4, attention="se", attention_kwargs={"reduction": 8})
    assert _n(se_small) - _n(_meta(out_channels=4)) == sum(
        n * (2 * (4 * f) * (4 * f // 8) + 4 * f // 8 + 4 * f) for f, n, _ in STACKS
    )


def test_layout_strides_and_shortcuts():
    m = ResNet50V2(out_channels=10, width=0.25)
    blocks = list(m.blocks)
    assert len(blocks) == 16
    strided = [i for i, b in enumerate(blocks) if b.stride == 2]
    assert strided == [2, 6, 12]  # last block of stacks 1-3
    conv_sc = [i for i, b in enumerate(blocks) if b.shortcut is not None]
    assert conv_sc == [0, 3, 7, 13]  # first block of each stack, stride 1
    assert all(b.shortcut.bias is not None for b in blocks if b.shortcut is not None)
    assert all(b.conv1.bias is None and b.conv2.bias is None and b.conv3.bias is not None for b in blocks)
    assert m.stem.bias is not None and m.stem.kernel_size == (7, 7) and m.stem.stride == (2, 2)
    # feature map sizes: 64 -> 32 (stem) -> 16 (pool) -> 16, 8, 4, 2 (stacks)
    sizes = []
    hooks = [blocks[i].register_forward_hook(lambda _m, _i, o: sizes.append(o.shape[-1])) for i in m.stage_ends]
    m.eval()
    m(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert sizes == [8, 4, 2, 2]
    # odd sizes: the strided identity shortcut (1x1 max-pool, stride 2) matches the strided 3x3 conv
    assert m(torch.randn(1, 3, 75, 61)).shape == (1, 10)


def test_attention_is_on_residual_branch_before_add():
    from medse.networks.registry import attention_modules

    m = ResNet50V2(out_channels=3, attention="se", width=0.25)
    assert len(attention_modules(m)) == 16
    block = m.blocks[1]  # identity shortcut
    block.eval()
    x = torch.randn(2, block.conv3.out_channels, 8, 8)

    class Zero(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(t)

    block.attention = Zero()
    torch.testing.assert_close(block(x), x)  # branch silenced -> output is the shortcut alone


def test_identity_shortcut_requires_matching_channels():
    with pytest.raises(ValueError, match="4 \\* filters"):
        PreActBottleneck(2, 64, 64, conv_shortcut=False)


@pytest.mark.parametrize("attention", ["none", "se"])
def test_3d_forward_backward_every_param_gets_grad(attention):
    if attention != "none":
        torch.manual_seed(0)
    m = ResNet50V2(spatial_dims=3, in_channels=2, out_channels=3, attention=attention, width=0.125)
    out = m(torch.randn(2, 2, 32, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_input_checks_and_arguments():
    m = ResNet50V2(in_channels=1, out_channels=2, width=0.125)
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4D input"):
        m(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="width"):
        ResNet50V2(width=0)
    with pytest.raises(ValueError, match="spatial_dims"):
        ResNet50V2(spatial_dims=4)


def test_registry_builds_resnet50v2():
    from medse.networks import registry

    info = registry.list_models(task="classification")
    assert info["resnet50v2"].task == "classification"
    m = registry.create_model("resnet50v2", spatial_dims=2, in_channels=3, out_channels=4, attention="se",
                              width=0.25)
    assert isinstance(m, ResNet50V2) and m.fc.out_features == 4
    assert len(registry.attention_modules(m)) == 16
    with pytest.raises(ValueError, match="widht"):
        registry.create_model("resnet50v2", 2, 3, 4, widht=0.5)


def _blocks() -> list[tuple[str, int]]:
    from medse.attention import list_attention

    blocks = [(name, 2 if 2 in info.spatial_dims else info.spatial_dims[0]) for name, info in list_attention().items()]
    assert len(blocks) >= 10, f"attention registry lists only {blocks}"  # an empty list would run zero cases
    return blocks


@pytest.mark.parametrize("name,dims", _blocks())
def test_every_registered_block_fits_in_the_bottleneck(name, dims):
    from medse.networks.registry import attention_modules

    torch.manual_seed(0)
    m = ResNet50V2(dims, 1, 3, attention=name, width=0.125)
    out = m(torch.randn(2, 1, *([32] * dims)))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert len(attention_modules(m)) == (0 if name == "none" else 16)


def test_keras_initialisation():
    m = ResNet50V2(in_channels=1, out_channels=5, width=0.125, init="keras")
    conv = m.blocks[0].conv2  # 3x3, fan_in = fan_out = 8 * 9
    limit = (6 / (conv.in_channels * 9 + conv.out_channels * 9)) ** 0.5
    assert conv.weight.abs().max() <= limit and conv.weight.abs().max() > 0.8 * limit
    assert torch.all(m.stem.bias == 0) and torch.all(m.fc.bias == 0) and torch.all(m.blocks[0].conv3.bias == 0)
    with pytest.raises(ValueError, match="init"):
        ResNet50V2(init="he")
