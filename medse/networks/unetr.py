"""MONAI's UNETR with attention in its convolutional stages and on its transformer tokens (SQET-style gate).

Base network: ``monai.networks.nets.UNETR`` (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image
Segmentation", WACV 2022, arXiv 2103.10504): a 12-layer ViT on 16^d patches; the tokens after layers 3, 6, 9 and
12 are reshaped to their patch grid and decoded by convolutional blocks.

Attention positions (stages in data-flow order):

* ``encoder.0`` .. ``encoder.3``: after MONAI's ``encoder1`` (convolutions on the image) and ``encoder2`` ..
  ``encoder4`` (the up-sampling blocks on the tokens of layers 3, 6, 9), i.e. on every skip connection;
* ``bottleneck``: on the last transformer output (after the ViT's final layer norm), seen as its patch grid
  ``(hidden_size, *img_size / 16)``, before ``decoder5``;
* ``decoder.0`` .. ``decoder.3``: after ``decoder5``, ``decoder4``, ``decoder3``, ``decoder2``;
* ``tokens.0`` .. ``tokens.11``: after each transformer layer, on its token features. Not in the default
  ``attention_positions`` (opt in with ``attention_positions=[..., "tokens"]`` or a mapping).

The ``tokens`` position is medse's own design (NOTE: not in any paper), motivated by SQET (Squeeze and
Excitation Transformer, "for High-accuracy Brain Age Estimation", BIBM 2022), which fuses an SE module into the
transformer for 3D MRI; only SQET's abstract is public, so its exact design is unknown and is not reproduced. In
medse, a block at ``tokens.l`` is applied to the output ``T`` (``(B, N, D)``) of transformer layer ``l`` viewed as
its patch grid (:class:`medse.networks.placement.TokenAttention`). With ``cse`` (or ``se``) this is a channel gate
on the tokens::

    z = (1 / N) * sum_n T[:, n, :]              # squeeze over the N tokens, (B, D)
    s = sigmoid(W2 relu(W1 z + b1) + b2)        # excitation, W1: D -> D / r, W2: D / r -> D
    T' = T * s[:, None, :]                      # every token's features rescaled by the same gate

The gated tokens feed the next layer and, for layers 3, 6, 9, the skip connections. Spatial blocks (``sse``,
``scse``, ...) at ``tokens`` gate individual tokens on their grid.

The blocks are attached to MONAI's modules (:meth:`medse.networks.placement.AttentionPlan.attach`): MONAI's keys are
kept, and with ``attention="none"`` the network is MONAI's (same state dict and outputs for the same seed).

Input size: UNETR's position embeddings fix the input to ``img_size`` (medse's trainer passes
``train.patch_size``; sliding-window inference feeds windows of that size). NOTE: medse's: smaller inputs are
padded up to ``img_size`` and the output cropped back; larger inputs raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import UNETR

from medse.networks._common import check_int, check_pad_mode, check_spatial_dims, class_builder
from medse.networks.layers import PadCropMixin
from medse.networks.placement import ALL_POSITIONS, POSITIONS, TOKENS, AttentionPlan, AttentionSpec
from medse.networks.registry import register_model

__all__ = ["DEFAULT_IMG_SIZE", "UNETRWithAttention", "unetr"]

#: ``img_size`` when none is given (MONAI's examples use 96).
DEFAULT_IMG_SIZE = 96
#: UNETR's patch size along every axis (fixed by MONAI).
PATCH = 16


class UNETRWithAttention(PadCropMixin, UNETR):
    """MONAI ``UNETR`` with attention blocks attached to its convolutional stages and transformer layers.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        img_size: input size (an int or one per axis), multiples of 16. Defaults to 96 (medse's trainer passes
            ``train.patch_size``).
        feature_size: channels of the first convolutional stage. Defaults to 16 (MONAI).
        hidden_size: transformer width. Defaults to 768 (MONAI).
        mlp_dim: transformer MLP width. Defaults to 3072 (MONAI).
        num_heads: attention heads. Defaults to 12 (MONAI).
        proj_type: patch embedding, ``"conv"`` or ``"perceptron"``. Defaults to ``"conv"`` (MONAI).
        norm_name: normalisation of the convolutional blocks. Defaults to ``"instance"`` (MONAI).
        conv_block: convolutional blocks in the token up-sampling path. Defaults to True (MONAI).
        res_block: residual convolutional blocks. Defaults to True (MONAI).
        dropout_rate: transformer dropout. Defaults to 0.0 (MONAI).
        qkv_bias: biases of the qkv projection. Defaults to False (MONAI).
        attention: block name, "none", or a mapping position -> block. Defaults to "none".
        attention_positions: subset of ``("encoder", "bottleneck", "decoder", "tokens")`` or stages. Defaults to
            ``("encoder", "bottleneck", "decoder")``.
        attention_kwargs: keyword arguments for the blocks. Defaults to None.
        pad_mode: padding of inputs smaller than ``img_size``. Defaults to "constant".
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int = DEFAULT_IMG_SIZE,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        proj_type: str = "conv",
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        *,
        attention: str | Mapping[str, str] | AttentionSpec = "none",
        attention_positions: Sequence[str] = POSITIONS,
        attention_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
    ) -> None:
        owner = "unetr"
        d = check_spatial_dims(owner, spatial_dims)
        check_int("in_channels", in_channels, 1, owner)
        check_int("out_channels", out_channels, 1, owner)
        size = (img_size,) * d if isinstance(img_size, int) else tuple(img_size)
        if len(size) != d or any(isinstance(s, bool) or not isinstance(s, int) or s < PATCH or s % PATCH
                                 for s in size):
            raise ValueError(f"{owner}: img_size must be {d} multiples of {PATCH} (UNETR's patch size), "
                             f"got {img_size!r}.")
        f = check_int("feature_size", feature_size, 1, owner)
        super().__init__(
            in_channels, out_channels, size, feature_size=f, hidden_size=hidden_size, mlp_dim=mlp_dim,
            num_heads=num_heads, proj_type=proj_type, norm_name=norm_name, conv_block=conv_block,
            res_block=res_block, dropout_rate=dropout_rate, spatial_dims=d, qkv_bias=qkv_bias,
        )
        self.spatial_dims = d
        self.img_size = size
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self._divisors = size
        self.size_divisor = PATCH
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, d, allowed=ALL_POSITIONS)
        grid = self.feat_size
        for i, (block, c) in enumerate(zip((self.encoder1, self.encoder2, self.encoder3, self.encoder4),
                                           (f, 2 * f, 4 * f, 8 * f), strict=True)):
            plan.attach(block, "encoder", c, f"encoder stage {i}")
        for i, layer in enumerate(self.vit.blocks):
            plan.attach(layer, TOKENS, hidden_size, f"transformer layer {i} tokens", tokens=True, grid=grid)
        plan.attach(self.vit.norm, "bottleneck", hidden_size, "bottleneck (transformer output)", tokens=True, grid=grid)
        for i, (block, c) in enumerate(zip((self.decoder5, self.decoder4, self.decoder3, self.decoder2),
                                           (8 * f, 4 * f, 2 * f, f), strict=True)):
            plan.attach(block, "decoder", c, f"decoder stage {i}")
        plan.install(self)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return UNETR.forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == self.spatial_dims + 2 and any(n > s for n, s in zip(x.shape[2:], self.img_size, strict=True)):
            raise ValueError(f"unetr: input spatial size {tuple(x.shape[2:])} is larger than img_size "
                             f"{self.img_size} (UNETR's position embeddings fix the size; use a sliding window).")
        return super().forward(x)


#: Builder registered as ``unetr``.
unetr = register_model(
    "unetr",
    task="segmentation",
    spatial_dims=(2, 3),
    description="MONAI UNETR (ViT encoder); attention in the convolutional stages, on the transformer output "
    "and (opt-in 'tokens') after every transformer layer",
    defaults={
        "img_size": "train.patch_size (96 without a run)",
        "feature_size": 16,
        "hidden_size": 768,
        "mlp_dim": 3072,
        "num_heads": 12,
        "proj_type": "conv",
        "norm_name": "instance",
        "conv_block": True,
        "res_block": True,
        "dropout_rate": 0.0,
        "qkv_bias": False,
        "pad_mode": "constant",
    },
    positions=ALL_POSITIONS,
    run_context=("img_size",),
    paper="Hatamizadeh et al., WACV 2022 (arXiv 2103.10504; MONAI UNETR); tokens gate: medse's, after SQET "
    "(BIBM 2022)",
)(class_builder(UNETRWithAttention, "unetr"))
