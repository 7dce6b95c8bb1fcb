"""MONAI's SwinUNETR with attention in its convolutional stages and on its Swin tokens (SQET-style gate).

Base network: ``monai.networks.nets.SwinUNETR`` (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic
Segmentation of Brain Tumors in MRI Images", BrainLes 2021, arXiv 2201.01266): a 4-stage Swin transformer whose
multi-scale outputs feed a convolutional U-shaped decoder.

Attention positions (stages in data-flow order):

* ``encoder.0`` .. ``encoder.3``: after MONAI's ``encoder1`` (on the image), ``encoder2``, ``encoder3``,
  ``encoder4`` (residual blocks on the Swin outputs of the patch embedding and stages 1-2), the skip paths;
* ``bottleneck``: after ``encoder10`` (the residual block on the last Swin stage, ``16 * feature_size``);
* ``decoder.0`` .. ``decoder.4``: after ``decoder5``, ``decoder4``, ``decoder3``, ``decoder2``, ``decoder1``;
* ``tokens.0`` .. ``tokens.3``: after every Swin transformer block of Swin stage ``i`` (``depths[i]`` blocks,
  ``feature_size * 2 ** i`` channels), on its channels-last token features ``(B, *grid, C)``. Not in the default
  ``attention_positions``.

The ``tokens`` position is medse's own design (NOTE: not in any paper), after SQET (BIBM 2022, abstract only):
see :mod:`medse.networks.unetr` for the exact formula; with ``cse`` a block at ``tokens.i`` computes
``z = mean over the tokens of T``, ``s = sigmoid(W2 relu(W1 z + b1) + b2)``, ``T' = T * s`` after each Swin
block (before the stage's patch merging), so the gated tokens feed the next block.

The blocks are attached to MONAI's modules (:meth:`medse.networks.placement.AttentionPlan.attach`): MONAI's keys are
kept (``load_from`` of pretrained Swin weights still works), and with ``attention="none"`` the network is
MONAI's (same state dict and outputs for the same seed).

NOTE: medse's: inputs are padded to a multiple of ``size_divisor = patch_size ** 5`` (32 by default) and the
output cropped back (MONAI raises ``ValueError`` for other sizes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import SwinUNETR

from medse.networks._common import check_int, check_pad_mode, check_spatial_dims, class_builder
from medse.networks.layers import PadCropMixin
from medse.networks.placement import ALL_POSITIONS, POSITIONS, TOKENS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["SwinUNETRWithAttention", "swinunetr"]


class SwinUNETRWithAttention(PadCropMixin, SwinUNETR):
    """MONAI ``SwinUNETR`` with attention blocks attached to its convolutional stages and Swin blocks.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        patch_size: Swin patch size; inputs are padded to multiples of ``patch_size ** 5``. Defaults to 2 (MONAI).
        depths: Swin blocks per stage (4 stages). Defaults to (2, 2, 2, 2) (MONAI).
        num_heads: attention heads per stage. Defaults to (3, 6, 12, 24) (MONAI).
        window_size: Swin window size. Defaults to 7 (MONAI).
        qkv_bias: biases of the qkv projection. Defaults to True (MONAI).
        mlp_ratio: MLP width over the embedding width. Defaults to 4.0 (MONAI).
        feature_size: embedding width, a multiple of 12. Defaults to 24 (MONAI).
        norm_name: normalisation of the convolutional blocks. Defaults to ``"instance"`` (MONAI).
        drop_rate: dropout. Defaults to 0.0 (MONAI).
        attn_drop_rate: attention dropout. Defaults to 0.0 (MONAI).
        dropout_path_rate: stochastic depth. Defaults to 0.0 (MONAI).
        normalize: layer-normalise the Swin outputs fed to the decoder. Defaults to True (MONAI).
        patch_norm: normalise the patch embedding. Defaults to False (MONAI).
        use_checkpoint: gradient checkpointing. Defaults to False (MONAI).
        downsample: ``"merging"`` or ``"mergingv2"``. Defaults to ``"merging"`` (MONAI).
        use_v2: SwinUNETR-v2 (a residual convolution before every stage). Defaults to False (MONAI).
        attention: block name, "none", or a mapping position -> block. Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder", "tokens")`` or stages. Defaults to
            ``("encoder", "bottleneck", "decoder")``.
        attention_kwargs: keyword arguments for the blocks. Defaults to None.
        pad_mode: padding of inputs that are not multiples of ``size_divisor``. Defaults to "constant".
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        patch_size: int = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 7,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        feature_size: int = 24,
        norm_name: tuple | str = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
        *,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        owner = "swinunetr"
        d = check_spatial_dims(owner, spatial_dims)
        check_int("in_channels", in_channels, 1, owner)
        check_int("out_channels", out_channels, 1, owner)
        p = check_int("patch_size", patch_size, 1, owner)
        f = check_int("feature_size", feature_size, 12, owner)
        if f % 12:
            raise ValueError(f"{owner}: feature_size must be a multiple of 12 (MONAI), got {feature_size}.")
        if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or len(depths) != 4:
            raise ValueError(f"{owner}: depths must have 4 values (one per Swin stage), got {depths!r}.")
        super().__init__(
            in_channels, out_channels, patch_size=p, depths=tuple(depths), num_heads=tuple(num_heads),
            window_size=window_size, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, feature_size=f, norm_name=norm_name,
            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, dropout_path_rate=dropout_path_rate,
            normalize=normalize, patch_norm=patch_norm, use_checkpoint=use_checkpoint, spatial_dims=d,
            downsample=downsample, use_v2=use_v2,
        )
        self.spatial_dims = d
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self.size_divisor = p**5
        self._divisors = (self.size_divisor,) * d
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d, allowed=ALL_POSITIONS)
        for i, (block, c) in enumerate(zip((self.encoder1, self.encoder2, self.encoder3, self.encoder4),
                                           (f, f, 2 * f, 4 * f), strict=True)):
            plan.attach(block, "encoder", c, f"encoder stage {i}")
        stages = (self.swinViT.layers1, self.swinViT.layers2, self.swinViT.layers3, self.swinViT.layers4)
        for i, stage in enumerate(stages):
            for j, blk in enumerate(stage[0].blocks):
                plan.attach(blk, TOKENS, f * 2**i, f"Swin stage {i} block {j} tokens", stage=i, tokens=True)
        plan.attach(self.encoder10, "bottleneck", 16 * f, "bottleneck")
        for i, (block, c) in enumerate(zip((self.decoder5, self.decoder4, self.decoder3, self.decoder2,
                                            self.decoder1), (8 * f, 4 * f, 2 * f, f, f), strict=True)):
            plan.attach(block, "decoder", c, f"decoder stage {i}")
        plan.install(self)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return SwinUNETR.forward(self, x)


#: Builder registered as ``swinunetr``.
swinunetr = register_model(
    "swinunetr",
    task="segmentation",
    spatial_dims=(2, 3),
    description="MONAI SwinUNETR (Swin encoder); attention in the convolutional stages and (opt-in 'tokens') "
    "after every Swin block",
    defaults={
        "patch_size": 2,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        "qkv_bias": True,
        "mlp_ratio": 4.0,
        "feature_size": 24,
        "norm_name": "instance",
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "dropout_path_rate": 0.0,
        "normalize": True,
        "patch_norm": False,
        "use_checkpoint": False,
        "downsample": "merging",
        "use_v2": False,
        "pad_mode": "constant",
    },
    positions=ALL_POSITIONS,
    paper="Hatamizadeh et al., BrainLes 2021 (arXiv 2201.01266; MONAI SwinUNETR); tokens gate: medse's, after "
    "SQET (BIBM 2022)",
)(class_builder(SwinUNETRWithAttention, "swinunetr"))
