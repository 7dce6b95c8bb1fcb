"""Spatial-pyramid squeeze-and-excitation, SPSE (Jin et al., Pattern Recognition 2022).

Jin, Xie, Wang, Chen, Liang, "Delving deep into spatial pooling for squeeze-and-excitation networks",
Pattern Recognition, 2022. medse follows the paper's description (no reference repository is pinned).

Adaptive average pools at sizes 1, 2, 4; each level fused by a depthwise convolution whose kernel equals the level
size (C -> C, groups = C, bias) into one value per channel; the levels are summed -> BN -> ReLU ->
Linear(C, C // r, bias) -> ReLU -> Linear(C // r, C, bias) -> sigmoid -> ``x * s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from medse.attention._base import adaptive_avg_pool, channel_view, check_channels, check_spatial_dims, reduced_channels
from medse.attention.registry import register_attention


class AdaptiveAvgPool(nn.Module):
    """Adaptive average pooling to ``size`` cells along each of ``spatial_dims`` axes
    (:func:`medse.attention._base.adaptive_avg_pool`: PyTorch's pooling in eager code, exportable operators under
    a graph capture). No parameters or buffers: checkpoints are those of ``nn.AdaptiveAvgPool{1,2,3}d``."""

    def __init__(self, size: int, spatial_dims: int) -> None:
        super().__init__()
        self.output_size = [int(size)] * spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool(x, self.output_size)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """One add per input element, as :func:`medse.utils.complexity.count_ops` counts PyTorch's pools."""
        return math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"output_size={tuple(self.output_size)}"


def _spse_params(c: int, d: int, reduction: float = 16, levels: tuple[int, ...] = (1, 2, 4), **_: Any) -> int:
    """Learnable parameters of SPSE: the depthwise pyramid convolutions and BatchNorm, then the SE gate."""
    h = int(c // reduction)
    return c * sum(lv**d + 1 for lv in levels) + 2 * c + 2 * c * h + h + c


@register_attention(
    "spse",
    paper="Jin, Xie, Wang, Chen, Liang. Delving deep into spatial pooling for squeeze-and-excitation "
    "networks. Pattern Recognition 2022",
    year=2022,
    repo="",
    params_formula="C*sum_l(l^d + 1) + 2C + 2*C*(C//r) + C//r + C; 2D levels (1,2,4): 2C*(C//16) + C//16 + 27C",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "levels": (1, 2, 4)},
    extension="1D and 3D: each level pools to l cells per axis (l^d cells), depthwise kernel l per axis.",
    departures="Training with a batch of one normalises with the running statistics (BatchNorm is undefined).",
    params_fn=_spse_params,
)
class SPSE(nn.Module):
    """Spatial-pyramid SE (Jin et al., Pattern Recognition 2022), 1D, 2D and 3D.

    Layers (parameter names): ``pools`` (adaptive average pools, :class:`AdaptiveAvgPool`), ``fuse`` (``ModuleList`` of depthwise convs,
    one per level, kernel = level in every spatial axis), ``bn`` (``BatchNorm1d(C)``), ``fc1``, ``fc2``.
    Learnable parameters: ``C * sum_l (l**d + 1) + 2C + 2*C*(C//r) + C//r + C``; in 2D with levels (1, 2, 4) this
    is the paper's ``2C*(C//16) + C//16 + 27C``.

    The pyramid is adapted per dimension: each level l pools to l cells along every spatial axis (l**d cells,
    e.g. 1 + 8 + 64 in 3D). NOTE: not in paper: the 1D and 3D versions. Departure: in training mode with a
    batch of one, BatchNorm over a per-channel scalar is undefined (PyTorch raises); medse then normalises with
    the running statistics (as in eval mode) and leaves them unchanged, so batch-size-1 training still runs.

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        reduction: reduction ratio r of the excitation. Defaults to 16.
        levels: pyramid sizes. Defaults to (1, 2, 4).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, *, reduction: float = 16, levels: Sequence[int] = (1, 2, 4)
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("SPSE", spatial_dims, (1, 2, 3))
        self.in_channels = check_channels("SPSE", in_channels)
        levels = tuple(levels)
        if not levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in levels):
            raise ValueError(f"SPSE: levels must be a non-empty sequence of positive integers, got {levels!r}.")
        self.levels = levels
        self.reduction = reduction
        hidden = reduced_channels("SPSE", self.in_channels, reduction)
        c = self.in_channels
        conv = Conv[Conv.CONV, self.spatial_dims]
        self.pools = nn.ModuleList([AdaptiveAvgPool(level, self.spatial_dims) for level in levels])
        self.fuse = nn.ModuleList([conv(c, c, kernel_size=level, groups=c, bias=True) for level in levels])
        self.bn = nn.BatchNorm1d(c)
        self.act = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(c, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, c, bias=True)

    def _bn(self, z: torch.Tensor) -> torch.Tensor:
        mean, var = self.bn.running_mean, self.bn.running_var
        if self.training and z.shape[0] == 1 and mean is not None and var is not None:
            return F.batch_norm(z, mean, var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        return self.bn(z)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate s as a (B, C, 1, ..., 1) tensor."""
        b, c = x.shape[0], x.shape[1]
        pooled = [p(x) for p in self.pools]
        z = torch.zeros(0)  # replaced by the first level (TorchScript needs the variable typed before the loop)
        for i, f in enumerate(self.fuse):
            zi = f(pooled[i]).reshape(b, c)
            z = zi if i == 0 else z + zi
        z = self.act(self._bn(z))
        s = torch.sigmoid(self.fc2(self.act(self.fc1(z))))
        return channel_view(s, self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the layers: x * s (pools are counted as layers)."""
        return math.prod(input_shape)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, reduction={self.reduction}, "
            f"levels={self.levels}"
        )
