"""MONAI's U-Net with attention blocks after each encoder stage, the bottleneck and each decoder stage.

Base network: ``monai.networks.nets.UNet`` (Kerfoot et al., "Left-Ventricle Quantification Using Residual
U-Net", STACOM 2018, the residual U-Net MONAI implements; Ronneberger et al., MICCAI 2015, for the U-Net).
Attention placement follows Roy, Navab and Wachinger, "Recalibrating Fully Convolutional Networks with Spatial
and Channel 'Squeeze and Excitation' Blocks", IEEE TMI 2019 (arXiv 1808.08127): after every encoder block,
so both the skip connection and the deeper path see the recalibrated features, and after every decoder block;
never on the layer that produces the logits.

The network is extended only through MONAI's documented hooks: ``_get_down_layer`` (encoder stages; MONAI's
``_get_bottom_layer`` calls it for the bottleneck, told apart here) and ``_get_up_layer`` (decoder stages;
``is_top`` marks the logits layer). With ``attention="none"`` nothing is inserted, so the state dict and the
outputs are those of a plain MONAI ``UNet`` built with the same arguments and seed.

Odd sizes: the input is padded (zeros by default) up to a multiple of ``size_divisor`` = product of the strides
and the output is cropped back, so any spatial size works. NOTE: padding is medse's (MONAI's UNet requires
sizes that are multiples of the strides' product); with instance normalisation the padded voxels take part in
the statistics, so for exact results feed multiples of ``size_divisor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Act, Norm
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from medse.networks._common import check_int, check_pad_mode, check_spatial_dims, class_builder
from medse.networks.layers import crop_to, divisor_of, forward_then_cat, lcm, pad_to_multiple
from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["DEFAULT_CHANNELS", "UNetWithAttention", "unet"]

#: Default channels per level (top first) when none are given; strides default to 2 between levels.
DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)


class _ConcatSkipConnection(SkipConnection):
    """MONAI's ``SkipConnection`` (``cat([x, submodule(x)], 1)``, same keys and numbers) whose concatenation is
    written by the attention block that ends the submodule (:func:`~medse.networks.layers.forward_then_cat`):
    the bottleneck's and the decoder stages' blocks then add no saved activation to training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "cat" or self.dim != 1:
            return super().forward(x)
        return forward_then_cat(self.submodule, x, x)


class UNetWithAttention(MonaiUNet):
    """MONAI ``UNet`` with an attention block after every encoder stage, the bottleneck and decoder stage.

    With ``channels = (c0, ..., cL)`` the network has ``L`` encoder stages (outputs ``c0..c(L-1)``), the
    bottleneck (``cL``) and ``L - 1`` decoder stages with attention (outputs ``c(L-2)..c0``; the top decoder
    stage produces the logits and gets none): ``2L`` attention modules with all positions.

    Args:
        spatial_dims: 2 or 3 (MONAI also allows 1).
        in_channels: input channels.
        out_channels: output channels (logits).
        channels: channels per level, top first, at least 2. Defaults to ``(16, 32, 64, 128)`` (medse's; MONAI
            has no default), small enough for 3D training on a CPU.
        strides: stride between consecutive levels, ``len(channels) - 1`` values. Defaults to 2 for each.
        kernel_size: convolution kernel size. Defaults to 3 (MONAI).
        up_kernel_size: transposed convolution kernel size. Defaults to 3 (MONAI).
        num_res_units: residual units per stage. Defaults to 0 (MONAI).
        act: activation. Defaults to PReLU (MONAI).
        norm: normalisation. Defaults to instance norm (MONAI).
        dropout: dropout probability. Defaults to 0.0 (MONAI).
        bias: convolution biases. Defaults to True (MONAI).
        adn_ordering: order of activation, dropout and normalisation. Defaults to "NDA" (MONAI).
        attention: block name for ``medse.attention.create_attention``, "none", or a mapping position -> block
            (``{"encoder": "cse", "decoder.0": "scse"}``, see ``docs/networks.md``). Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder")`` or stages (``"encoder.1"``)
            for a single block name. Defaults to all three.
        attention_kwargs: keyword arguments for every block. Defaults to None.
        pad_mode: how inputs that are not multiples of ``size_divisor`` are padded (``torch.nn.functional.pad``
            mode). Defaults to "constant" (zeros).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_size: Sequence[int] | int = 3,
        up_kernel_size: Sequence[int] | int = 3,
        num_res_units: int = 0,
        act: tuple | str = Act.PRELU,
        norm: tuple | str = Norm.INSTANCE,
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
        *,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        owner = "unet"
        spatial_dims = check_spatial_dims(owner, spatial_dims, (1, 2, 3))
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) < 2:
            raise ValueError(f"{owner}: channels must be a sequence of at least 2 integers, got {channels!r}.")
        channels = tuple(check_int(f"channels[{i}]", c, 1, owner) for i, c in enumerate(channels))
        if strides is None:
            strides = (2,) * (len(channels) - 1)
        if isinstance(strides, (int, str)) or not isinstance(strides, Sequence) or len(strides) != len(channels) - 1:
            raise ValueError(f"{owner}: strides must have len(channels) - 1 = {len(channels) - 1} values, "
                             f"got {strides!r}.")
        check_int("num_res_units", num_res_units, 0, owner)
        divisors = divisor_of(tuple(strides), spatial_dims)
        # MONAI's __init__ builds the layers through the hooks below, which need these settings first.
        nn.Module.__init__(self)
        self._plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, spatial_dims)
        self._in_bottom = False
        self._stage = {"encoder": 0, "decoder": 0}
        self._n_levels = len(channels) - 1
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            channels=channels,
            strides=tuple(strides),
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=bias,
            adn_ordering=adn_ordering,
        )
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self._divisors = divisors
        self.size_divisor = lcm(divisors)
        self._plan.install(self)
        del self._plan  # not a module attribute worth keeping (and not picklable state)

    def _with_attention(self, layer: nn.Module, position: str, channels: int) -> nn.Module:
        """``layer`` followed by its site's block (:meth:`AttentionPlan.wrap`)."""
        if position == "bottleneck":
            return self._plan.wrap(layer, "bottleneck", channels, "bottleneck")
        # MONAI builds from the bottom up (deepest level first). Levels count from the top (0 = top) in the
        # messages; stages count in data-flow order: encoder.0 is the top level, decoder.0 the deepest.
        self._stage[position] += 1
        level = self._n_levels - self._stage[position]
        stage = level if position == "encoder" else self._stage[position] - 1
        return self._plan.wrap(layer, position, channels, f"{position} level {level}", stage)

    def _get_down_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        layer = super()._get_down_layer(in_channels, out_channels, strides, is_top)
        if self._in_bottom:  # MONAI's _get_bottom_layer calls this hook: the bottleneck is wrapped there
            return layer
        return self._with_attention(layer, "encoder", out_channels)

    def _get_bottom_layer(self, in_channels: int, out_channels: int) -> nn.Module:
        self._in_bottom = True
        try:
            layer = super()._get_bottom_layer(in_channels, out_channels)
        finally:
            self._in_bottom = False
        return self._with_attention(layer, "bottleneck", out_channels)

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        layer = super()._get_up_layer(in_channels, out_channels, strides, is_top)
        if is_top:  # the logits layer
            return layer
        return self._with_attention(layer, "decoder", out_channels)

    def _get_connection_block(self, down_path: nn.Module, up_path: nn.Module, subblock: nn.Module) -> nn.Module:
        return nn.Sequential(down_path, _ConcatSkipConnection(subblock), up_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dimensions + 2:
            raise ValueError(f"unet expects a tensor with {self.dimensions + 2} axes (B, C, *spatial), "
                             f"got shape {tuple(x.shape)}.")
        spatial = x.shape[2:]
        xp, before = pad_to_multiple(x, self._divisors, self.pad_mode)
        return crop_to(self.model(xp), before, spatial)


#: Builder registered as ``unet``: ``unet(spatial_dims, in_channels, out_channels, attention, ...)``.
unet = register_model(
    "unet",
    task="segmentation",
    spatial_dims=(2, 3),
    description="MONAI U-Net (residual units optional); attention after encoder stages, bottleneck, decoder stages",
    defaults={
        "channels": DEFAULT_CHANNELS,
        "strides": "2 per level",
        "kernel_size": 3,
        "up_kernel_size": 3,
        "num_res_units": 0,
        "act": Act.PRELU,
        "norm": Norm.INSTANCE,
        "dropout": 0.0,
        "bias": True,
        "adn_ordering": "NDA",
        "pad_mode": "constant",
    },
    paper="Kerfoot et al., STACOM 2018 (MONAI UNet); attention placement: Roy et al., IEEE TMI 2019",
)(class_builder(UNetWithAttention, "unet"))
