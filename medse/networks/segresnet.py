"""MONAI's SegResNet (Auto3DSeg's default network) with attention after its encoder, bottleneck and decoder stages.

Base network: ``monai.networks.nets.SegResNet`` (Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", BrainLes 2018, arXiv 1810.11654; the network without the VAE branch). ``blocks_down`` gives the
residual blocks per level: levels ``0 .. n-2`` are the encoder stages (``encoder.0`` .. ``encoder.(n-2)``, each
output feeding the deeper level and the skip connection), level ``n-1`` is the bottleneck; the ``blocks_up``
levels are the decoder stages (``decoder.0`` the deepest, the first one run). Attention follows Roy et al.
(IEEE TMI 2019): after every stage's residual blocks, never on the final norm-act-1x1 convolution.

The blocks are attached to MONAI's stage modules after MONAI built them
(:meth:`medse.networks.placement.AttentionPlan.attach`): MONAI's state-dict keys are kept, and with
``attention="none"`` the network is MONAI's (same state dict and outputs for the same seed).

NOTE: medse's: inputs are padded to a multiple of ``size_divisor = 2 ** (len(blocks_down) - 1)`` and the
output cropped back (MONAI requires multiples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import SegResNet
from monai.utils import UpsampleMode

from medse.networks._common import check_int, check_pad_mode, check_spatial_dims, class_builder
from medse.networks.layers import PadCropMixin
from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["SegResNetWithAttention", "segresnet"]


class SegResNetWithAttention(PadCropMixin, SegResNet):
    """MONAI ``SegResNet`` with attention blocks attached to its stages.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        init_filters: channels of the first level (doubling per level). Defaults to 8 (MONAI).
        dropout_prob: dropout after the first convolution. Defaults to None (MONAI).
        act: activation. Defaults to in-place ReLU (MONAI).
        norm: normalisation. Defaults to group norm with 8 groups (MONAI).
        use_conv_final: final norm-act-1x1 convolution to ``out_channels``. Defaults to True (MONAI).
        blocks_down: residual blocks per level, encoder then bottleneck. Defaults to (1, 2, 2, 4) (MONAI).
        blocks_up: residual blocks per decoder level, ``len(blocks_down) - 1`` values. Defaults to (1, 1, 1).
        upsample_mode: ``"nontrainable"`` (linear interpolation), ``"deconv"`` or ``"pixelshuffle"``. Defaults
            to ``"nontrainable"`` (MONAI).
        attention: block name, "none", or a mapping position -> block. Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder")`` or stages. Defaults to all three.
        attention_kwargs: keyword arguments for the blocks. Defaults to None.
        pad_mode: padding of inputs that are not multiples of ``size_divisor``. Defaults to "constant".
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        init_filters: int = 8,
        dropout_prob: float | None = None,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        use_conv_final: bool = True,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        upsample_mode: UpsampleMode | str = UpsampleMode.NONTRAINABLE,
        *,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        owner = "segresnet"
        d = check_spatial_dims(owner, spatial_dims)
        check_int("in_channels", in_channels, 1, owner)
        check_int("out_channels", out_channels, 1, owner)
        f = check_int("init_filters", init_filters, 1, owner)
        for name, blocks in (("blocks_down", blocks_down), ("blocks_up", blocks_up)):
            if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
                raise ValueError(f"{owner}: {name} must be a non-empty sequence of integers, got {blocks!r}.")
            for i, b in enumerate(blocks):
                check_int(f"{name}[{i}]", b, 1, owner)
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(f"{owner}: blocks_up must have len(blocks_down) - 1 = {len(blocks_down) - 1} values, "
                             f"got {len(blocks_up)}.")
        super().__init__(
            spatial_dims=d, init_filters=f, in_channels=in_channels, out_channels=out_channels,
            dropout_prob=dropout_prob, act=act, norm=norm, use_conv_final=use_conv_final,
            blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), upsample_mode=upsample_mode,
        )
        n = len(blocks_down)
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self.size_divisor = 2 ** (n - 1)
        self._divisors = (self.size_divisor,) * d
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d)
        for i, layer in enumerate(self.down_layers):
            if i < n - 1:
                plan.attach(layer, "encoder", f * 2**i, f"encoder level {i}")
            else:
                plan.attach(layer, "bottleneck", f * 2**i, "bottleneck")
        for i, layer in enumerate(self.up_layers):
            plan.attach(layer, "decoder", f * 2 ** (n - 2 - i), f"decoder stage {i}")
        plan.install(self)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return SegResNet.forward(self, x)


#: Builder registered as ``segresnet``.
segresnet = register_model(
    "segresnet",
    task="segmentation",
    spatial_dims=(2, 3),
    description="MONAI SegResNet (Auto3DSeg's default, no VAE); attention after encoder levels, bottleneck, "
    "decoder levels",
    defaults={
        "init_filters": 8,
        "dropout_prob": None,
        "act": ("RELU", {"inplace": True}),
        "norm": ("GROUP", {"num_groups": 8}),
        "use_conv_final": True,
        "blocks_down": (1, 2, 2, 4),
        "blocks_up": (1, 1, 1),
        "upsample_mode": "nontrainable",
        "pad_mode": "constant",
    },
    paper="Myronenko, BrainLes 2018 (arXiv 1810.11654; MONAI SegResNet); attention placement: Roy et al., "
    "IEEE TMI 2019",
)(class_builder(SegResNetWithAttention, "segresnet"))
