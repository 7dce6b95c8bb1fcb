"""FC-DenseNet ("The One Hundred Layers Tiramisu"), 2D and 3D, with attention after every dense block.

Jégou, Drozdzal, Vazquez, Romero and Bengio, "The One Hundred Layers Tiramisu: Fully Convolutional DenseNets
for Semantic Segmentation", CVPR Workshops 2017 (arXiv 1611.09326); authors' code
https://github.com/SimJeg/FC-DenseNet (Theano/Lasagne).

* layer: BN -> ReLU -> 3x3 conv (growth rate k new feature maps, with bias) -> dropout 0.2;
* dense block of n layers: every layer sees the concatenation of the block input and all earlier layers'
  outputs; on the down path the block outputs input + new maps, in the bottleneck and on the up path only the
  n*k new maps (so the number of feature maps does not explode), except the last up block;
* transition down: BN -> ReLU -> 1x1 conv (same width, with bias) -> dropout -> 2x2 max-pool;
* transition up: 3x3 transposed conv with stride 2 (with bias) on the previous block's new maps only,
  then concatenation with the skip connection;
* first layer a 3x3 conv with 48 filters; last a 1x1 conv to the classes.

Presets (``preset=...``): ``"56"`` k=12, 4 layers per block; ``"67"`` k=16, 5 per block; ``"103"`` k=16,
layers [4, 5, 7, 10, 12] down, 15 in the bottleneck, [12, 10, 7, 5, 4] up. Paper parameter counts 1.5M / 3.5M /
9.4M; in 2D with 3 input channels and 11 classes these presets have 1,376,795 / 3,463,243 / 9,322,091
learnable parameters, the counts of the public PyTorch port (bfortuner/pytorch_tiramisu). FC-DenseNet67 and
103 are within 2% of the paper; FC-DenseNet56 is 8.2% below the paper's 1.5M, which the architecture the paper
describes cannot reach (see docs/networks.md).

Attention (Roy et al., IEEE TMI 2019, arXiv 1808.08127, used scSE in FC-DenseNet): after every dense block
of the down path (on the block output, before the transition down, so skip and pooled path are both
recalibrated; position "encoder"), after the bottleneck block ("bottleneck") and after every up-path block
("decoder"), on the tensor the block passes on.

NOTE: not in paper: the 3D variant (3D convolutions, 2x2x2 pooling, ``Dropout3d``); the ``"slim"`` preset,
the 3D default (k=8, 32 first filters, 4 pools of 4 layers, 4-layer bottleneck; every width a multiple
of 16 so that all blocks fit) sized for CPU training;
the transposed convolution uses padding 1 and output padding 1 so it exactly doubles the size (the authors
crop a 'valid' transposed convolution instead; the parameters are the same); inputs are padded to a multiple
of ``size_divisor = 2 ** number_of_pools`` and the output cropped back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medse.networks._common import ByDims, check_dropout, check_int, check_kernel_size, class_builder
from medse.networks.layers import PadCropMixin, batch_norm, channel_dropout, conv, conv_transpose, max_pool
from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model
from medse.utils.errors import unknown_option_error

__all__ = ["PRESETS", "DenseBlock", "DenseLayer", "FCDenseNet", "TransitionDown", "fc_densenet"]

#: Architectures by name: growth rate, layers per down block, bottleneck layers, layers per up block,
#: filters of the first convolution.
PRESETS: dict[str, dict[str, Any]] = {
    "56": {"growth_rate": 12, "down_layers": (4,) * 5, "bottleneck_layers": 4, "up_layers": (4,) * 5,
           "first_channels": 48},
    "67": {"growth_rate": 16, "down_layers": (5,) * 5, "bottleneck_layers": 5, "up_layers": (5,) * 5,
           "first_channels": 48},
    "103": {"growth_rate": 16, "down_layers": (4, 5, 7, 10, 12), "bottleneck_layers": 15,
            "up_layers": (12, 10, 7, 5, 4), "first_channels": 48},
    # NOTE: not in paper: medse's 3D default, small enough to train on a CPU.
    "slim": {"growth_rate": 8, "down_layers": (4,) * 4, "bottleneck_layers": 4, "up_layers": (4,) * 4,
             "first_channels": 32},
}


class DenseLayer(nn.Sequential):
    """BN -> ReLU -> conv (``growth_rate`` maps, with bias) -> channel dropout (Jégou et al. 2017)."""

    def __init__(self, spatial_dims: int, in_channels: int, growth_rate: int, kernel_size: int, dropout: float):
        super().__init__()
        self.add_module("norm", batch_norm(spatial_dims)(in_channels))
        self.add_module("relu", nn.ReLU())
        self.add_module("conv", conv(spatial_dims)(in_channels, growth_rate, kernel_size, padding=kernel_size // 2))
        if dropout > 0:
            self.add_module("drop", channel_dropout(spatial_dims)(dropout))


class DenseBlock(nn.Module):
    """``n_layers`` densely connected :class:`DenseLayer`.

    Returns the input concatenated with all new maps (``keep_input=True``, down path and the last up block)
    or only the ``n_layers * growth_rate`` new maps (bottleneck and the other up blocks).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        growth_rate: int,
        n_layers: int,
        kernel_size: int,
        dropout: float,
        keep_input: bool,
    ) -> None:
        super().__init__()
        self.keep_input = keep_input
        self.layers = nn.ModuleList(
            DenseLayer(spatial_dims, in_channels + i * growth_rate, growth_rate, kernel_size, dropout)
            for i in range(n_layers)
        )
        self.out_channels = (in_channels if keep_input else 0) + n_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new: list[torch.Tensor] = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], dim=1)
            new.append(out)
        return x if self.keep_input else torch.cat(new, dim=1)


class TransitionDown(nn.Sequential):
    """BN -> ReLU -> 1x1 conv (with bias) -> channel dropout -> 2x2 max-pool (Jégou et al. 2017)."""

    def __init__(self, spatial_dims: int, channels: int, dropout: float) -> None:
        super().__init__()
        self.add_module("norm", batch_norm(spatial_dims)(channels))
        self.add_module("relu", nn.ReLU())
        self.add_module("conv", conv(spatial_dims)(channels, channels, 1))
        if dropout > 0:
            self.add_module("drop", channel_dropout(spatial_dims)(dropout))
        self.add_module("pool", max_pool(spatial_dims)(2))


class FCDenseNet(PadCropMixin, nn.Module):
    """FC-DenseNet (Jégou et al., CVPR-W 2017) in 2D or 3D with attention after every dense block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits; the network has no softmax).
        preset: ``"56"``, ``"67"``, ``"103"`` (the paper's) or ``"slim"`` (NOTE: not in paper); explicit
            arguments below override the preset's values. Defaults to ``"56"`` in 2D and ``"slim"`` in 3D.
        growth_rate: new maps per layer (k). Defaults to the preset's.
        down_layers: layers per down block (one int repeats for 5 blocks); the number of blocks is the number
            of pools. Defaults to the preset's.
        bottleneck_layers: layers of the bottleneck block. Defaults to the preset's.
        up_layers: layers per up block, as many as ``down_layers``. Defaults to ``down_layers`` reversed (the
            preset's when only the preset is given).
        first_channels: filters of the first 3x3 conv. Defaults to the preset's (48, the paper's).
        kernel_size: kernel of the dense layers and the first conv. Defaults to 3 (paper).
        dropout: dropout probability after every conv. Defaults to 0.2 (paper).
        attention: block name for ``medse.attention.create_attention``, "none", or a mapping position -> block
            (``{"encoder": "cse", "decoder.0": "scse"}``, see ``docs/networks.md``). Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder")`` or stages (``"encoder.1"``)
            for a single block name. Defaults to all three.
        attention_kwargs: keyword arguments for every block. Defaults to None.
        pad_mode: padding of inputs that are not multiples of ``size_divisor``. Defaults to "constant".

    Attributes:
        size_divisor: ``2 ** len(down_layers)``; other sizes are padded and the output cropped back.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        preset: str | int | None = None,
        growth_rate: int | None = None,
        down_layers: int | Sequence[int] | None = None,
        bottleneck_layers: int | None = None,
        up_layers: int | Sequence[int] | None = None,
        first_channels: int | None = None,
        kernel_size: int = 3,
        dropout: float = 0.2,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        owner = "fc_densenet"
        d = self._check_io(owner, spatial_dims, in_channels, out_channels)
        if preset is None:
            preset = "56" if d == 2 else "slim"
        preset = str(preset)
        if preset not in PRESETS:
            raise unknown_option_error("fc_densenet preset", preset, PRESETS)
        cfg = dict(PRESETS[preset])
        if down_layers is not None and up_layers is None:
            up_layers = tuple(reversed(down_layers)) if not isinstance(down_layers, int) else down_layers
        for key, value in (("growth_rate", growth_rate), ("down_layers", down_layers),
                           ("bottleneck_layers", bottleneck_layers), ("up_layers", up_layers),
                           ("first_channels", first_channels)):
            if value is not None:
                cfg[key] = value
        k = check_int("growth_rate", cfg["growth_rate"], 1, owner)
        down = _layers("down_layers", cfg["down_layers"], None, owner)
        up = _layers("up_layers", cfg["up_layers"], len(down), owner)
        n_bottleneck = check_int("bottleneck_layers", cfg["bottleneck_layers"], 1, owner)
        first = check_int("first_channels", cfg["first_channels"], 1, owner)
        kernel_size = check_kernel_size(owner, kernel_size)
        dropout = check_dropout(owner, dropout)
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d)
        self._setup_padding(owner, pad_mode, len(down))
        self.preset = preset
        self.growth_rate, self.down_layers, self.up_layers = k, down, up
        self.bottleneck_layers, self.first_channels = n_bottleneck, first

        self.first_conv = conv(d)(in_channels, first, kernel_size, padding=kernel_size // 2)
        channels = first
        skips: list[int] = []
        self.down_blocks = nn.ModuleList()
        self.down_attention = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        for i, n in enumerate(down):
            block = DenseBlock(d, channels, k, n, kernel_size, dropout, keep_input=True)
            channels = block.out_channels
            skips.append(channels)
            self.down_blocks.append(block)
            self.down_attention.append(plan.slot("encoder", channels, f"encoder block {i}"))
            self.transitions_down.append(TransitionDown(d, channels, dropout))
        self.bottleneck = DenseBlock(d, channels, k, n_bottleneck, kernel_size, dropout, keep_input=False)
        self.bottleneck_attention = plan.slot("bottleneck", self.bottleneck.out_channels, "bottleneck block")
        prev = self.bottleneck.out_channels
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.up_attention = nn.ModuleList()
        for i, n in enumerate(up):
            last = i == len(up) - 1
            self.transitions_up.append(
                conv_transpose(d)(prev, prev, 3, stride=2, padding=1, output_padding=1)
            )
            block = DenseBlock(d, prev + skips[-1 - i], k, n, kernel_size, dropout, keep_input=last)
            self.up_blocks.append(block)
            self.up_attention.append(plan.slot("decoder", block.out_channels, f"decoder block {i}"))
            prev = block.out_channels
        plan.install(self)
        self.final_conv = conv(d)(prev, out_channels, 1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        skips: list[torch.Tensor] = []
        for block, att, down in zip(self.down_blocks, self.down_attention, self.transitions_down, strict=True):
            x = att(block(x))
            skips.append(x)
            x = down(x)
        x = self.bottleneck_attention(self.bottleneck(x))
        for i, (tu, block, att) in enumerate(zip(self.transitions_up, self.up_blocks, self.up_attention,
                                                 strict=True)):
            x = torch.cat([tu(x), skips[-1 - i]], dim=1)
            x = att(block(x))
        return self.final_conv(x)


def _layers(name: str, value: object, length: int | None, owner: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * (length if length is not None else 5)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{owner}: {name} must be an int or a non-empty sequence of ints, got {value!r}.")
    out = tuple(check_int(f"{name}[{i}]", v, 1, owner) for i, v in enumerate(value))
    if length is not None and len(out) != length:
        raise ValueError(f"{owner}: {name} must have {length} values (one per down block), got {len(out)}.")
    return out


#: Builder registered as ``fc_densenet``: ``fc_densenet(spatial_dims, in_channels, out_channels, attention, ...)``.
fc_densenet = register_model(
    "fc_densenet",
    task="segmentation",
    spatial_dims=(2, 3),
    description="FC-DenseNet / Tiramisu (presets 56, 67, 103); attention after every dense block",
    defaults={
        "preset": ByDims({2: "56", 3: "slim"}),
        "growth_rate": "preset",
        "down_layers": "preset",
        "bottleneck_layers": "preset",
        "up_layers": "preset",
        "first_channels": "preset",
        "kernel_size": 3,
        "dropout": 0.2,
        "pad_mode": "constant",
    },
    paper="Jégou et al., CVPR-W 2017 (arXiv 1611.09326)",
)(class_builder(FCDenseNet, "fc_densenet"))
