"""Squeeze-and-Excitation (Hu et al.) and its channel-SE reading for segmentation (cSE, Roy et al.).

- Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.
  Reference code: https://github.com/hujie-frank/SENet (Caffe).
- Roy, Navab, Wachinger, "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional
  Networks", MICCAI 2018, arXiv:1803.02579. Reference code: https://github.com/ai-med/squeeze_and_excitation.

Formula: ``z = mean(x)`` over the spatial axes, ``s = sigmoid(fc2(relu(fc1(z))))``, ``y = x * s``.
Parameter names: ``fc1`` (``nn.Linear(C, C // r)``, bias) and ``fc2`` (``nn.Linear(C // r, C)``, bias); they map
one-to-one on MONAI's ``ChannelSELayer.fc[0]`` / ``fc[2]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medse.attention._base import ChannelGateBlock, check_channels, check_spatial_dims, reduced_channels
from medse.attention.registry import register_attention

HU_PAPER = "Hu, Shen, Sun. Squeeze-and-Excitation Networks. CVPR 2018 (arXiv:1709.01507)"
ROY_PAPER = (
    "Roy, Navab, Wachinger. Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional "
    "Networks. MICCAI 2018 (arXiv:1803.02579); IEEE TMI 2019 (arXiv:1808.08127)"
)
ROY_REPO = "https://github.com/ai-med/squeeze_and_excitation"


def se_params(c: int, d: int, reduction: float = 16, **_: Any) -> int:
    """Learnable parameters of an SE gate with C // r hidden units and biases: ``2*C*(C//r) + C//r + C``."""
    h = int(c // reduction)
    return 2 * c * h + h + c


@register_attention(
    "se",
    paper=HU_PAPER,
    year=2018,
    repo="https://github.com/hujie-frank/SENet",
    params_formula="2*C*(C//r) + C//r + C, r=16",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16},
    extension="1D and 3D (the paper is 2D; the formula has no spatial axis to adapt).",
    departures="Biases in both FC layers as in the authors' Caffe models (the paper's count ignores them).",
    params_fn=se_params,
)
class SqueezeExcitation(ChannelGateBlock):
    """Squeeze-and-Excitation block (Hu et al., CVPR 2018), any number of spatial dimensions.

    ``y = x * sigmoid(fc2(relu(fc1(mean(x)))))``; both linear layers have a bias, as in the authors' Caffe
    models. Learnable parameters: ``2*C*(C//r) + C//r + C``.

    NOTE: not in paper: the 1D and 3D versions (the SE paper is 2D; the squeeze is a mean over whatever spatial
    axes there are, as in Roy et al.'s 3D cSE).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        reduction: reduction ratio r of the hidden layer (C // r units). Defaults to 16 (the paper's choice).
        fused: use the fused kernel (:mod:`medse.attention.kernels.channel`; same numbers). Defaults to True.

    Shapes: input (B, C, *spatial) -> output of the same shape and dtype.
    """

    def __init__(self, spatial_dims: int, in_channels: int, *, reduction: float = 16, fused: bool = True) -> None:
        super().__init__()
        cls = type(self).__name__
        self.spatial_dims = check_spatial_dims(cls, spatial_dims, (1, 2, 3))
        self.in_channels = check_channels(cls, in_channels)
        self.reduction = reduction
        hidden = reduced_channels(cls, self.in_channels, reduction)
        self.hidden_channels = hidden
        self.fc1 = nn.Linear(self.in_channels, hidden, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, self.in_channels, bias=True)
        self.fused = bool(fused)

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        """The excitation s = sigmoid(fc2(act(fc1(z)))) of the (B, C) spatial mean z, (B, C)."""
        return torch.sigmoid(self.fc2(self.act(self.fc1(z))))

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, reduction={self.reduction}"


@register_attention(
    "cse",
    paper=ROY_PAPER,
    year=2018,
    repo=ROY_REPO,
    params_formula="2*C*(C//r) + C//r + C, r=2",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 2},
    extension="1D (the authors define 2D and 3D).",
    departures="",
    params_fn=lambda c, d, reduction=2, **kw: se_params(c, d, reduction),
)
class ChannelSE(SqueezeExcitation):
    """Channel squeeze-and-excitation, cSE (Roy et al., MICCAI 2018): SE with reduction 2 by default.

    Numerically identical to ``monai.networks.blocks.ChannelSELayer(spatial_dims, C, r=2)`` when the weights
    are shared (``fc1`` <-> ``fc[0]``, ``fc2`` <-> ``fc[2]``). Learnable parameters: ``2*C*(C//r) + C//r + C``.
    NOTE: not in paper: the 1D version (the authors define 2D and 3D).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        reduction: reduction ratio r. Defaults to 2 (the authors' segmentation networks).
        fused: use the fused kernel (:mod:`medse.attention.kernels.channel`; same numbers). Defaults to True.
    """

    def __init__(self, spatial_dims: int, in_channels: int, *, reduction: float = 2, fused: bool = True) -> None:
        super().__init__(spatial_dims, in_channels, reduction=reduction, fused=fused)
