"""ResNet50V2 (pre-activation ResNet-50) for 2D images and 3D volumes, with optional attention blocks.

Architecture: He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
(arXiv 1603.05027), in the exact layout of Keras's ``keras.applications.ResNet50V2``
(``keras/src/applications/resnet_v2.py``, ``block2`` / ``stack2``):

* stem: zero-pad 3 -> 7x7/2 conv, 64 filters, with bias, no BN after it -> zero-pad 1 -> 3x3/2 max-pool;
* four stacks of 3, 4, 6, 3 pre-activation bottlenecks with 64, 128, 256, 512 filters (output 4x that);
  each block: ``preact = ReLU(BN(x))``; shortcut = 1x1 conv (with bias) of ``preact`` on the first block of a
  stack, otherwise ``x`` itself, passed through a 1x1 max-pool with stride 2 on a strided block; residual
  branch = 1x1 conv f (no bias) -> BN -> ReLU -> 3x3 conv f (no bias, carries the stride) -> BN -> ReLU ->
  1x1 conv 4f (with bias, no BN); output = shortcut + residual. The stride (2) sits on the LAST block of
  stacks 1-3; stack 4 has none;
* head: BN -> ReLU -> global average pool -> dense (with bias).

With 3 input channels and a 1000-class head the model has 25,568,360 learnable parameters; Keras reports
25,613,800 because it also counts the BatchNorm moving mean and moving variance (45,440 values) as
"non-trainable params". :func:`keras_param_count` reproduces Keras's count. Without the head: 23,564,800.

Attention (``attention="se"`` or any name known to :func:`medse.attention.create_attention`) goes on the
residual branch right after the last 1x1 conv and before the addition, as SE in Hu et al., "Squeeze-and-
Excitation Networks", CVPR 2018 (arXiv 1709.01507), Fig. 3. SE with r=16 adds 2,530,992 parameters (with the
biases of both FC layers; 2,514,944 without, the paper's formula).

NOTE: not in paper: the 3D variant (same layout with 3D convolutions and pooling), the ``width`` multiplier
(for quick CPU experiments; default 1.0 = the faithful model) and any attention block other than SE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medse.networks.layers import batch_norm, max_pool
from medse.networks.layers import conv as conv_factory
from medse.networks.placement import AttentionSpec, build_attention, takes_spec
from medse.networks.registry import register_model

__all__ = [
    "KERAS_BN_EPS",
    "PreActBottleneck",
    "ResNet50V2",
    "keras_param_count",
    "resnet50v2",
]

#: Keras's BatchNormalization epsilon in ResNet50V2.
KERAS_BN_EPS = 1.001e-5
#: (filters, blocks, stride of the last block) per stack, as Keras's ``stack2`` calls.
STACKS: tuple[tuple[int, int, int], ...] = ((64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1))


class PreActBottleneck(nn.Module):
    """Keras ``block2``: a pre-activation bottleneck with attention on the residual branch before the add.

    Args:
        spatial_dims: 2 or 3 (1 also works). Defaults to none (required).
        in_channels: channels of the input.
        filters: bottleneck width ``f``; the block outputs ``4 * f`` channels.
        stride: stride of the 3x3 conv (and of the 1x1 max-pool on the identity shortcut). Defaults to 1.
        conv_shortcut: 1x1 conv (with bias) of the pre-activated input as shortcut. Defaults to False.
        attention: attention block name on the residual branch. Defaults to "none".
        attention_kwargs: keyword arguments for the attention block. Defaults to None.
        bn_eps: BatchNorm epsilon. Defaults to 1.001e-5 (Keras).
        bn_momentum: BatchNorm momentum in PyTorch's convention. Defaults to 0.1 (Keras uses 0.99 in its
            convention, i.e. 0.01 here: too slow for short runs).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        filters: int,
        stride: int = 1,
        conv_shortcut: bool = False,
        attention: str | AttentionSpec = "none",
        attention_kwargs: dict[str, Any] | None = None,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        conv, bn = conv_factory(spatial_dims), batch_norm(spatial_dims)
        out_channels = 4 * filters
        if not conv_shortcut and in_channels != out_channels:
            raise ValueError(
                f"identity shortcut needs in_channels == 4 * filters, got {in_channels} and {out_channels}"
            )
        self.stride = stride
        self.preact_bn = bn(in_channels, eps=bn_eps, momentum=bn_momentum)
        self.shortcut = conv(in_channels, out_channels, 1, stride=stride, bias=True) if conv_shortcut else None
        self.conv1 = conv(in_channels, filters, 1, bias=False)
        self.bn1 = bn(filters, eps=bn_eps, momentum=bn_momentum)
        self.conv2 = conv(filters, filters, 3, stride=stride, padding=1, bias=False)
        self.bn2 = bn(filters, eps=bn_eps, momentum=bn_momentum)
        self.conv3 = conv(filters, out_channels, 1, bias=True)
        block = build_attention(AttentionSpec.parse(attention or "none").format(), spatial_dims, out_channels,
                                attention_kwargs, f"resnet50v2 bottleneck ({filters} filters)")
        self.attention = nn.Identity() if block is None else block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.preact_bn(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        elif self.stride > 1:
            # Keras MaxPooling(1, strides=stride): plain subsampling, output size ceil(n / stride).
            slices = (slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.ndim - 2)
            shortcut = x[slices]
        else:
            shortcut = x
        out = F.relu(self.bn1(self.conv1(preact)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.attention(self.conv3(out))
        return shortcut + out


class ResNet50V2(nn.Module):
    """ResNet50V2 classifier (Keras layout), 2D or 3D, with optional attention in every bottleneck.

    Input ``(B, in_channels, *spatial)``, any spatial size of at least 1 after five stride-2 stages
    (32 or more voxels a side is sensible); output logits ``(B, out_channels)``.

    Args:
        spatial_dims: 2 for images, 3 for volumes (NOTE: not in paper). Defaults to 2.
        in_channels: input channels. Defaults to 3.
        out_channels: number of classes; 0 drops the dense layer (returns pooled features). Defaults to 1000.
        attention: attention block on the residual branch of every bottleneck, any name accepted by
            ``medse.attention.create_attention`` (e.g. "se", "eca", "scse", "se+sse"). Defaults to "none".
        attention_kwargs: keyword arguments for the block (e.g. ``{"reduction": 16}``). Defaults to None
            (the block's own defaults; SE's reduction is 16).
        attention_positions: accepted for compatibility with ``create_model``; the only position in this
            network is the residual branch of every bottleneck, so the value is ignored. Defaults to None.
        width: multiplier on every stack's filter count and on the stem (NOTE: not in paper; for quick CPU
            runs only). Defaults to 1.0 (the faithful model).
        dropout: dropout before the dense layer (NOTE: not in Keras's model). Defaults to 0.0.
        bn_eps: BatchNorm epsilon. Defaults to 1.001e-5 (Keras).
        bn_momentum: BatchNorm momentum, PyTorch convention. Defaults to 0.1 (Keras's 0.99 equals 0.01 here).
        init: "torch" (PyTorch's default initialisation) or "keras" (Glorot-uniform conv and dense kernels, zero
            biases, as Keras's ``Conv2D``/``Dense`` defaults). Attention blocks keep their own initialisation.
            Defaults to "torch".
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1000,
        attention: str | AttentionSpec = "none",
        attention_kwargs: dict[str, Any] | None = None,
        attention_positions: Sequence[str] | None = None,
        width: float = 1.0,
        dropout: float = 0.0,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = 0.1,
        init: str = "torch",
    ) -> None:
        super().__init__()
        if init not in ("torch", "keras"):
            raise ValueError(f"init must be 'torch' or 'keras', got {init!r}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if out_channels < 0:
            raise ValueError(f"out_channels must be >= 0, got {out_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        spec = AttentionSpec.parse(attention or "none")
        if spec.is_mapping:
            raise ValueError(f"resnet50v2 has no attention positions (the block goes on the residual branch of every "
                             f"bottleneck); attention must be one block name, got '{spec.format()}'.")
        self.attention_name = spec.format()
        self.width = width
        self.size_divisor = 32
        conv, bn = conv_factory(spatial_dims), batch_norm(spatial_dims)

        def scaled(c: int) -> int:
            return max(1, int(round(c * width)))

        stem = scaled(64)
        self.stem = conv(in_channels, stem, 7, stride=2, padding=3, bias=True)
        self.stem_pool = max_pool(spatial_dims)(3, stride=2)
        blocks: list[nn.Module] = []
        channels = stem
        self.stage_ends: list[int] = []
        for filters, n_blocks, last_stride in STACKS:
            f = scaled(filters)
            for i in range(n_blocks):
                blocks.append(
                    PreActBottleneck(
                        spatial_dims,
                        channels,
                        f,
                        stride=last_stride if i == n_blocks - 1 else 1,
                        conv_shortcut=(i == 0),
                        attention=spec,
                        attention_kwargs=attention_kwargs,
                        bn_eps=bn_eps,
                        bn_momentum=bn_momentum,
                    )
                )
                channels = 4 * f
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.Sequential(*blocks)
        self.post_bn = bn(channels, eps=bn_eps, momentum=bn_momentum)
        self.num_features = channels
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, out_channels) if out_channels > 0 else nn.Identity()
        if init == "keras":
            self._keras_init()

    def _keras_init(self) -> None:
        attention = {id(p) for b in self.blocks for p in b.attention.parameters()}
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and id(m.weight) not in attention:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` after the final BN-ReLU and global average pooling."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D input (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        x = self.stem(x)
        x = F.pad(x, (1, 1) * self.spatial_dims)  # Keras ZeroPadding(1) before the max-pool: zeros, not -inf
        x = self.stem_pool(x)
        x = self.blocks(x)
        x = F.relu(self.post_bn(x))
        return x.mean(dim=tuple(range(2, x.ndim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


def keras_param_count(model: nn.Module) -> dict[str, int]:
    """Parameter counts as Keras's ``model.summary()`` reports them.

    Keras counts a BatchNormalization layer's moving mean and moving variance as non-trainable parameters;
    PyTorch keeps them as buffers (``running_mean``, ``running_var``; ``num_batches_tracked`` has no Keras
    counterpart and is not counted).

    Returns:
        ``{"trainable": learnable parameters, "non_trainable": BN running mean + variance values,
        "total": their sum}``; for ResNet50V2 with a 1000-class head: 25,568,360 + 45,440 = 25,613,800.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    running = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            running += m.running_mean.numel() + m.running_var.numel()
    return {"trainable": trainable, "non_trainable": frozen + running, "total": trainable + frozen + running}


@register_model(
    "resnet50v2",
    task="classification",
    spatial_dims=(2, 3),
    description="Keras-layout ResNet50V2 (pre-activation ResNet-50), attention before the residual add",
    defaults={"width": 1.0, "dropout": 0.0, "bn_eps": KERAS_BN_EPS, "bn_momentum": 0.1, "init": "torch"},
    paper="He et al., Identity Mappings in Deep Residual Networks, ECCV 2016 (Keras ResNet50V2 layout)",
)
@takes_spec
def resnet50v2(
    spatial_dims: int = 2,
    in_channels: int = 3,
    out_channels: int = 1000,
    attention: str | AttentionSpec = "none",
    attention_positions: Sequence[str] | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    **arch_kwargs: Any,
) -> ResNet50V2:
    """Build :class:`ResNet50V2`; registered as ``resnet50v2`` (task "classification").

    ``create_model("resnet50v2", spatial_dims=2, in_channels=3, out_channels=4, attention="se")``.
    """
    return ResNet50V2(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        attention=attention,
        attention_kwargs=attention_kwargs,
        attention_positions=attention_positions,
        **arch_kwargs,
    )
