"""QuickNAT, 2D and 3D, with its own attention module after every dense block.

Roy, Conjeti, Navab and Wachinger, "QuickNAT: A fully convolutional network for quick and accurate segmentation
of neuroanatomy", NeuroImage 186, 2019 (arXiv 1801.04161); squeeze-and-excitation in it: Roy, Navab and
Wachinger, IEEE TMI 2019 (arXiv 1808.08127). Authors' code: https://github.com/ai-med/quickNAT_pytorch with
https://github.com/ai-med/nn-common-modules.

* dense block (authors' ``DenseBlock``): BN -> PReLU -> conv k x k (F filters); concat with the input;
  BN -> PReLU -> conv k x k (F); concat input, both; BN -> PReLU -> 1x1 conv (F). One PReLU (a single
  learnable slope) per block, convs with bias;
* encoder block: dense block -> [attention] -> [dropout] -> 2x2 max-pool keeping the indices;
* bottleneck: a dense block; decoder block: max-unpool with the indices -> concat(encoder output, unpooled)
  -> dense block -> [attention] -> [dropout]; classifier: 1x1 conv to the classes (logits).
  4 encoder and 4 decoder blocks, F = 64, k = 5, dropout 0.2 (the authors' settings).

Unlike the authors' release (its blocks call the SE layer with two arguments, which crashes for cSE and
scSE) and MONAI's ``Quicknat`` (fails on every forward pass, MONAI issue 7475, and shares one SE module
across all blocks), every block here gets its own attention module built by ``medse.attention``, and every
block type works.

Attention positions: "encoder" (after every encoder dense block, before dropout and pooling, so skip and
pooled path are recalibrated, as in the authors' code), "decoder" (after every decoder dense block) and
"bottleneck" (NOTE: not in paper: the authors construct an SE layer for the bottleneck but never call it).

NOTE: not in paper: the 3D variant, whose defaults are F = 32 filters and 3x3x3 kernels for CPU training
(pass ``num_filters=64, kernel_size=5`` for the literal extension); ``depth``; inputs are padded to a multiple
of ``size_divisor = 2 ** depth`` and the output cropped back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medse.networks._common import ByDims, check_dropout, class_builder
from medse.networks.layers import UnpoolingEncoderDecoder, batch_norm, channel_dropout, conv
from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["QuickNAT", "QuickNATDenseBlock", "quicknat"]


class QuickNATDenseBlock(nn.Module):
    """The authors' dense block: three BN -> PReLU -> conv units with dense concatenations, F output maps."""

    def __init__(self, spatial_dims: int, in_channels: int, num_filters: int, kernel_size: int) -> None:
        super().__init__()
        c, f, k, d = in_channels, num_filters, kernel_size, spatial_dims
        self.norm1 = batch_norm(d)(c)
        self.conv1 = conv(d)(c, f, k, padding=k // 2)
        self.norm2 = batch_norm(d)(c + f)
        self.conv2 = conv(d)(c + f, f, k, padding=k // 2)
        self.norm3 = batch_norm(d)(c + 2 * f)
        self.conv3 = conv(d)(c + 2 * f, f, 1)
        self.prelu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(self.prelu(self.norm1(x)))
        o2 = self.conv2(self.prelu(self.norm2(torch.cat([x, o1], dim=1))))
        return self.conv3(self.prelu(self.norm3(torch.cat([x, o1, o2], dim=1))))


class QuickNAT(UnpoolingEncoderDecoder):
    """QuickNAT (Roy et al., NeuroImage 2019) in 2D or 3D, attention after every dense block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        num_filters: filters F of every conv. Defaults to 64 in 2D (paper) and 32 in 3D (NOTE: not in paper).
        kernel_size: kernel of the two large convs of every dense block. Defaults to 5 in 2D (paper) and 3 in
            3D (NOTE: not in paper).
        depth: number of encoder / decoder blocks. Defaults to 4 (paper).
        dropout: channel dropout after every encoder and decoder block. Defaults to 0.2 (authors' settings).
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
        depth: int = 4,
        dropout: float = 0.2,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        owner = "quicknat"
        d = self._check_io(owner, spatial_dims, in_channels, out_channels)
        f, k, depth = self._check_architecture(owner, num_filters, kernel_size, 5, depth)
        dropout = check_dropout(owner, dropout)
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d)
        self._setup_padding(owner, pad_mode, depth)
        self._build_encoder_decoder(lambda c: QuickNATDenseBlock(d, c, f, k), in_channels, plan)
        self.dropout = channel_dropout(d)(dropout) if dropout > 0 else nn.Identity()
        self.classifier = conv(d)(f, out_channels, 1)

    def _after_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)


#: Builder registered as ``quicknat``: ``quicknat(spatial_dims, in_channels, out_channels, attention, ...)``.
quicknat = register_model(
    "quicknat",
    task="segmentation",
    spatial_dims=(2, 3),
    description="QuickNAT: dense blocks with max-pool indices and unpooling; own attention per block",
    defaults={
        "num_filters": ByDims({2: 64, 3: 32}),
        "kernel_size": ByDims({2: 5, 3: 3}),
        "depth": 4,
        "dropout": 0.2,
        "pad_mode": "constant",
    },
    paper="Roy et al., NeuroImage 2019 (arXiv 1801.04161)",
)(class_builder(QuickNAT, "quicknat"))
