"""nnU-Net v2's own U-Nets with medse attention blocks: ``AttentionPlainConvUNet``, ``AttentionResidualEncoderUNet``.

Both subclass dynamic-network-architectures' ``PlainConvUNet`` / ``ResidualEncoderUNet`` and build the parent
first, unchanged, so nnU-Net's modules, their parameter names and their random initialisation are exactly
nnU-Net's. The attention modules live beside them, in three module lists of the network:

- ``encoder_attention[s]`` after encoder stage ``s`` (s < n_stages - 1): it recalibrates both the skip and the
  path going deeper (position ``"encoder"``);
- ``bottleneck_attention`` after the last encoder stage (position ``"bottleneck"``);
- ``decoder_attention[s]`` after decoder stage ``s`` (lowest resolution first), before its segmentation
  layer and the next stage (position ``"decoder"``);
- ``AttentionResidualEncoderUNet`` only: inside every residual block of the encoder, on the residual branch
  before the addition (position ``"residual"``, SE-ResNet's placement). The block goes where
  dynamic-network-architectures puts its own ``SqueezeExcite`` when ``squeeze_excitation=True``
  (``BasicBlockD``/``BottleneckD.squeeze_excitation``, switched on with ``apply_se``), so its keys are
  ``encoder.stages.<s>.blocks.<b>.squeeze_excitation.*``; unlike that ``SqueezeExcite``, which averages over two
  of the three axes of a 5D tensor, medse's blocks squeeze over every spatial axis.

Where a position has no attention the entry is ``nn.Identity()`` (no parameters), so with ``attention="none"``
the state dict and the outputs equal nnU-Net's class built with the same seed. The attention keys are extra keys
(own prefixes, or ``squeeze_excitation`` inside the residual blocks), so nnU-Net weights load into an attention
network with ``strict=False`` (only attention keys missing). ``forward`` runs the parent's encoder and decoder modules in nnU-Net's order and reads
``self.decoder.deep_supervision`` (nnU-Net's switch); ``compute_conv_feature_map_size`` is the parent's
estimate plus the attention feature maps; ``initialize`` is nnU-Net's and leaves the attention blocks with
their own initialisation.

Plans choose them with ``network_class_name = "medse.integrations.nnunet.AttentionPlainConvUNet"`` and the
extra ``arch_kwargs`` ``attention``, ``attention_positions``, ``attention_kwargs`` (see ``medse nnunet plans``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

from medse.networks.placement import POSITIONS, AttentionPlan, AttentionSpec, position_blocks

__all__ = ["AttentionPlainConvUNet", "AttentionResidualEncoderUNet", "attention_feature_map_size", "RESIDUAL"]

#: ``AttentionResidualEncoderUNet``'s extra position: inside each residual block, before the addition.
RESIDUAL = "residual"


def _kwargs_for_position(kwargs: dict[str, Any] | None, position: str) -> dict[str, Any]:
    """Block options for one position: ``kwargs[position]`` if that is a dict, plus the shared options."""
    kwargs = dict(kwargs or {})
    shared = {k: v for k, v in kwargs.items() if k not in (*POSITIONS, RESIDUAL)}
    own = kwargs.get(position)
    if own is not None and not isinstance(own, dict):
        raise ValueError(f"attention_kwargs['{position}'] must be a dict of block options, got {own!r}.")
    return {**shared, **(own or {})}


def _mark_parts(module: nn.Module) -> None:
    """Tag every submodule of an attention block so that :meth:`initialize` leaves it alone."""
    for m in module.modules():
        m._medse_attention_part = True


def attention_feature_map_size(name: str, channels: int, size: Sequence[int]) -> int:
    """Feature-map elements one attention block adds to nnU-Net's VRAM estimate on a (channels, *size) map.

    nnU-Net's ``compute_conv_feature_map_size`` counts the elements of the maps a network stores for the
    backward pass. medse counts, per block of a composition, its output (``channels * prod(size)``) and, for
    blocks with a spatial gate (sSE, scSE, CA, SimAM, PE), one more single-channel map of ``size``. An
    estimate in nnU-Net's sense, not a measurement.
    """
    from medse.attention import list_attention

    blocks = list_attention()
    voxels = int(np.prod([int(s) for s in size], dtype=np.int64))
    total = 0
    for part in name.split("+"):
        info = blocks[part.strip()]
        total += channels * voxels + (voxels if info.spatial_gate else 0)
    return total


class _AttentionUNetMixin:
    """The attention insertion shared by both networks (state set up by :meth:`_add_attention`)."""

    encoder: nn.Module
    decoder: nn.Module
    encoder_attention: nn.ModuleList
    bottleneck_attention: nn.Module
    decoder_attention: nn.ModuleList
    attention: dict[str, str]
    attention_positions: tuple[str, ...]
    spatial_dims: int

    def _add_attention(self, attention: object, attention_positions: object,
                       attention_kwargs: dict[str, Any] | None, offered: tuple[str, ...] = POSITIONS) -> None:
        owner = type(self).__name__
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise ValueError(f"{owner}: attention_kwargs must be a dict, got {attention_kwargs!r}.")
        self.spatial_dims = convert_conv_op_to_dim(self.encoder.conv_op)
        chosen = position_blocks(owner, attention, attention_positions, offered)
        plan = AttentionPlan(owner, chosen, None, None, self.spatial_dims, allowed=offered)
        self.attention_kwargs = dict(attention_kwargs or {})
        channels = list(self.encoder.output_channels)
        n = len(channels)

        def build(position: str, c: int, where: str) -> nn.Module:
            m = plan.slot(position, c, where, kwargs=_kwargs_for_position(attention_kwargs, position))
            if not isinstance(m, nn.Identity):
                _mark_parts(m)
            return m

        # built after nnU-Net's modules, so the parent's parameters draw the same random numbers as nnU-Net's
        self.encoder_attention = nn.ModuleList(build("encoder", channels[s], f"encoder stage {s}")
                                               for s in range(n - 1))
        self.bottleneck_attention = build("bottleneck", channels[-1], f"bottleneck (stage {n - 1})")
        self.decoder_attention = nn.ModuleList(build("decoder", channels[-(s + 2)], f"decoder stage {s}")
                                               for s in range(n - 1))
        if RESIDUAL in chosen.key_blocks(()):  # dynamic-network-architectures' own SE slot, switched on per block
            for s, blocks in enumerate(self.residual_blocks()):
                for b, blk in enumerate(blocks):
                    blk.squeeze_excitation = build(RESIDUAL, blk.output_channels, f"residual block {b} of encoder "
                                                   f"stage {s}")
                    blk.apply_se = True
        plan.install(self)

    def residual_blocks(self) -> list[list[nn.Module]]:
        """The residual blocks (``BasicBlockD``/``BottleneckD``) of each encoder stage; empty lists for plain
        stages."""
        return [[m for m in stage.modules() if isinstance(m, (BasicBlockD, BottleneckD))]
                for stage in self.encoder.stages]

    def _attention_after_stage(self, s: int) -> nn.Module:
        return self.bottleneck_attention if s == len(self.encoder.stages) - 1 else self.encoder_attention[s]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        enc, dec = self.encoder, self.decoder
        if getattr(enc, "stem", None) is not None:
            x = enc.stem(x)
        skips: list[torch.Tensor] = []
        for s, stage in enumerate(enc.stages):
            x = self._attention_after_stage(s)(stage(x))
            skips.append(x)
        # nnU-Net's UNetDecoder.forward with attention after each stage
        lres = skips[-1]
        seg_outputs: list[torch.Tensor] = []
        for s in range(len(dec.stages)):
            x = dec.transpconvs[s](lres)
            x = torch.cat((x, skips[-(s + 2)]), 1)
            x = self.decoder_attention[s](dec.stages[s](x))
            if dec.deep_supervision:
                seg_outputs.append(dec.seg_layers[s](x))
            elif s == len(dec.stages) - 1:
                seg_outputs.append(dec.seg_layers[-1](x))
            lres = x
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if dec.deep_supervision else seg_outputs[0]

    def attention_feature_map_size(self, input_size: Sequence[int]) -> int:
        """The attention blocks' part of :meth:`compute_conv_feature_map_size` (see
        :func:`attention_feature_map_size`)."""
        size = [int(i) for i in input_size]
        sizes = []
        for stride in self.encoder.strides:
            size = [i // j for i, j in zip(size, stride, strict=True)]
            sizes.append(size)
        channels = list(self.encoder.output_channels)
        n = len(channels)
        total = 0
        for s in range(n):
            pos = "bottleneck" if s == n - 1 else "encoder"
            if pos in self.attention:
                total += attention_feature_map_size(self.attention[pos], channels[s], sizes[s])
        if "decoder" in self.attention:
            for s in range(n - 1):  # decoder stage s works at the resolution of encoder stage n - 2 - s
                total += attention_feature_map_size(self.attention["decoder"], channels[-(s + 2)], sizes[-(s + 2)])
        if RESIDUAL in self.attention:  # every residual block of stage s works at that stage's resolution
            for s, blocks in enumerate(self.residual_blocks()):
                total += len(blocks) * attention_feature_map_size(self.attention[RESIDUAL], channels[s], sizes[s])
        return total

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """nnU-Net's estimate for the parent network plus :meth:`attention_feature_map_size`."""
        base = super().compute_conv_feature_map_size(input_size)  # type: ignore[misc]
        return np.int64(base) + np.int64(self.attention_feature_map_size(input_size))

    def extra_repr(self) -> str:
        return f"attention={self.attention}" if self.attention else "attention=none"


class AttentionPlainConvUNet(_AttentionUNetMixin, PlainConvUNet):
    """nnU-Net's ``PlainConvUNet`` (2D or 3D, from ``conv_op``) with medse attention blocks.

    Args:
        input_channels ... nonlin_first: exactly ``PlainConvUNet``'s (nnU-Net's plans fill them).
        attention: a registered medse block (``medse blocks``), a composition such as ``"eca+ca"``, ``"none"``,
            or a dict ``{"encoder": ..., "bottleneck": ..., "decoder": ...}`` choosing per position (missing
            positions get nothing). Defaults to ``"none"``.
        attention_positions: where to insert, a subset of ``("encoder", "bottleneck", "decoder")`` (names as
            in ``medse.networks``). Defaults to None: all three for a block name, the positions a dict names.
        attention_kwargs: block options for every block (e.g. ``{"reduction": 4}``); a key named after a
            position with a dict value applies to that position only. Defaults to ``None``.

    Raises:
        ValueError: unknown block or position, or a block that does not fit a stage's width.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Any, conv_op: type[nn.Module],
                 kernel_sizes: Any, strides: Any, n_conv_per_stage: Any, num_classes: int,
                 n_conv_per_stage_decoder: Any, conv_bias: bool = False, norm_op: type[nn.Module] | None = None,
                 norm_op_kwargs: dict | None = None, dropout_op: type[nn.Module] | None = None,
                 dropout_op_kwargs: dict | None = None, nonlin: type[nn.Module] | None = None,
                 nonlin_kwargs: dict | None = None, deep_supervision: bool = False, nonlin_first: bool = False,
                 attention: str | dict[str, str] | AttentionSpec = "none", attention_positions: Sequence[str] | str | None = None,
                 attention_kwargs: dict[str, Any] | None = None):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op,
                         norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision,
                         nonlin_first)
        self._add_attention(attention, attention_positions, attention_kwargs)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He initialisation, skipping the attention blocks (they keep their own initialisation)."""
        if getattr(module, "_medse_attention_part", False):
            return
        InitWeights_He(1e-2)(module)


class AttentionResidualEncoderUNet(_AttentionUNetMixin, ResidualEncoderUNet):
    """nnU-Net's ``ResidualEncoderUNet`` (ResEnc M/L/XL presets; 2D or 3D) with medse attention blocks.

    Attention sits after each residual encoder stage (not after the stem) and each decoder stage, and, with the
    position ``"residual"``, inside every residual block of the encoder before the addition (SE-ResNet's
    placement; see the module docstring). ``"residual"`` is chosen explicitly (``attention_positions``
    naming it, or a dict ``{"residual": ...}``); ``attention_positions=None`` with a block name means the three
    after-stage positions. Arguments as :class:`AttentionPlainConvUNet`, the others exactly
    ``ResidualEncoderUNet``'s.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Any, conv_op: type[nn.Module],
                 kernel_sizes: Any, strides: Any, n_blocks_per_stage: Any, num_classes: int,
                 n_conv_per_stage_decoder: Any, conv_bias: bool = False, norm_op: type[nn.Module] | None = None,
                 norm_op_kwargs: dict | None = None, dropout_op: type[nn.Module] | None = None,
                 dropout_op_kwargs: dict | None = None, nonlin: type[nn.Module] | None = None,
                 nonlin_kwargs: dict | None = None, deep_supervision: bool = False, block: Any = None,
                 bottleneck_channels: Any = None, stem_channels: int | None = None,
                 attention: str | dict[str, str] | AttentionSpec = "none", attention_positions: Sequence[str] | str | None = None,
                 attention_kwargs: dict[str, Any] | None = None):
        extra: dict[str, Any] = {} if block is None else {"block": block}
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_blocks_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op,
                         norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision,
                         bottleneck_channels=bottleneck_channels, stem_channels=stem_channels, **extra)
        self._add_attention(attention, attention_positions, attention_kwargs, (*POSITIONS, RESIDUAL))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's initialisation (He, last norm of each residual block zeroed), skipping attention blocks."""
        if getattr(module, "_medse_attention_part", False):
            return
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
