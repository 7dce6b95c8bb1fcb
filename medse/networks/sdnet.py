"""SD-Net, 2D and 3D, with attention after every encoder and decoder block.

Roy, Conjeti, Sheet, Katouzian, Navab and Wachinger, "Error Corrective Boosting for Learning Fully
Convolutional Networks with Limited Data", MICCAI 2017 (arXiv 1705.00938), as commonly re-implemented:

* 3 encoder blocks: conv (64 filters, 7x7) -> BN -> ReLU -> 2x2 max-pool that keeps the indices;
* bottleneck: conv (7x7, 64 -> 64) -> BN -> ReLU;
* 3 decoder blocks: max-unpool with the stored indices -> concatenate the encoder block's (pre-pool) output
  -> conv (7x7, 128 -> 64) -> BN -> ReLU;
* classifier: 1x1 conv to the classes (logits; the paper trains with weighted cross-entropy + Dice).

Attention (Roy et al., IEEE TMI 2019, arXiv 1808.08127, which evaluates SD-Net with cSE / sSE / scSE):
after every encoder block before the pooling (so the skip connection and the pooled path are both
recalibrated; position "encoder"), after every decoder block ("decoder") and, as medse's option, after the
bottleneck ("bottleneck"; NOTE: not in paper).

NOTE: not in paper: the 3D variant, whose defaults are 32 filters and 3x3x3 kernels (a 7x7x7 kernel with 64
filters has 2.8M weights per conv and is too slow for CPU training; pass ``num_filters=64, kernel_size=7`` for
the literal extension); ``depth`` (number of pools, 3 in the paper); inputs are padded to a multiple of
``size_divisor = 2 ** depth`` and the output cropped back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from medse.networks._common import ByDims, check_dropout, class_builder
from medse.networks.layers import UnpoolingEncoderDecoder, batch_norm, channel_dropout, conv
from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["ConvBNReLU", "SDNet", "sdnet"]


class ConvBNReLU(nn.Sequential):
    """conv ('same' padding, with bias) -> BN -> ReLU [-> channel dropout]."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, dropout: float):
        super().__init__()
        self.add_module("conv", conv(spatial_dims)(in_channels, out_channels, kernel_size, padding=kernel_size // 2))
        self.add_module("norm", batch_norm(spatial_dims)(out_channels))
        self.add_module("relu", nn.ReLU())
        if dropout > 0:
            self.add_module("drop", channel_dropout(spatial_dims)(dropout))


class SDNet(UnpoolingEncoderDecoder):
    """SD-Net (Roy et al., MICCAI 2017) with max-pool indices and unpooling, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        num_filters: filters of every conv. Defaults to 64 in 2D (paper) and 32 in 3D (NOTE: not in paper).
        kernel_size: kernel of every conv but the classifier. Defaults to 7 in 2D (paper) and 3 in 3D
            (NOTE: not in paper).
        depth: number of encoder blocks / pools. Defaults to 3 (paper).
        dropout: channel dropout after every conv block. Defaults to 0.0 (the paper uses none).
        attention: block name for ``medse.attention.create_attention``, "none", or a mapping position -> block
            (``{"encoder": "cse", "decoder.0": "scse"}``, see ``docs/networks.md``). Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder")`` or stages (``"encoder.1"``)
            for a single block name. Defaults to all three.
        attention_kwargs: keyword arguments for every block. Defaults to None.
        pad_mode: padding of inputs that are not multiples of ``size_divisor``. Defaults to "constant".

    Attributes:
        size_divisor: ``2 ** depth``; other sizes are padded and the output cropped back.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        num_filters: int | None = None,
        kernel_size: int | None = None,
        depth: int = 3,
        dropout: float = 0.0,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        owner = "sdnet"
        d = self._check_io(owner, spatial_dims, in_channels, out_channels)
        f, k, depth = self._check_architecture(owner, num_filters, kernel_size, 7, depth)
        dropout = check_dropout(owner, dropout)
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d)
        self._setup_padding(owner, pad_mode, depth)
        self._build_encoder_decoder(lambda c: ConvBNReLU(d, c, f, k, dropout), in_channels, plan)
        self.classifier = conv(d)(f, out_channels, 1)


#: Builder registered as ``sdnet``: ``sdnet(spatial_dims, in_channels, out_channels, attention, ...)``.
sdnet = register_model(
    "sdnet",
    task="segmentation",
    spatial_dims=(2, 3),
    description="SD-Net: conv blocks with max-pool indices and unpooling; attention after every block",
    defaults={
        "num_filters": ByDims({2: 64, 3: 32}),
        "kernel_size": ByDims({2: 7, 3: 3}),
        "depth": 3,
        "dropout": 0.0,
        "pad_mode": "constant",
    },
    paper="Roy et al., MICCAI 2017 (arXiv 1705.00938)",
)(class_builder(SDNet, "sdnet"))
