"""Efficient Multi-scale Attention, EMA (Ouyang et al., ICASSP 2023, arXiv:2305.13563).

Reference code: https://github.com/YOLOonMe/EMA-attention-module (class ``EMA``, ``factor=32``).

The channels are split into G groups (``factor``), folded into the batch: ``g = x`` viewed as (B*G, C/G, H, W).
Per group, with one set of weights shared by all groups:

- 1x1 branch: the strip means over W and over H are concatenated along the length axis, a 1x1 convolution
  (C/G -> C/G, bias) maps them, they are split back and ``x1 = GN(g * sigmoid(a_h) * sigmoid(a_w))`` with
  ``GroupNorm(C/G, C/G)`` (one group per channel, affine);
- 3x3 branch: ``x2 = conv3x3(g)`` (C/G -> C/G, padding 1, bias);
- cross-spatial learning: ``softmax`` over the channels of each branch's global average pool weights the other
  branch's map: ``w = softmax(avg(x1)) @ x2 + softmax(avg(x2)) @ x1``, a (B*G, 1, H, W) map;
- ``y = g * sigmoid(w)``, back to (B, C, H, W).

3D (NOTE: not in paper): strips along D, H and W (each the mean over the two other axes) through the same 1x1x1
convolution, three directional gates, a 3x3x3 convolution, and the cross-spatial weighting over all voxels.

The code is written in TorchScript's subset, and every shape is read from the tensor without a conversion to a
Python int: a trace records the strip lengths (the split back after the 1x1 convolution) as functions of the input
size, so a graph traced or exported at one size is right at every size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medse.attention._base import check_channels, check_spatial_dims, scriptable
from medse.attention.ela import directional, group_count, strip_means
from medse.attention.registry import free_rule, register_attention


def _spatial_sizes(x: torch.Tensor) -> list[int]:
    """The spatial sizes of a (B, C, *spatial) tensor as a list (a trace records each as a size of x)."""
    sizes: list[int] = []
    for i in range(2, x.dim()):
        sizes.append(x.shape[i])
    return sizes


def _ema_params(c: int, d: int, factor: int = 32, **_: Any) -> int:
    """Learnable parameters of EMA with c = C / G channels per group: the 1x1 and 3^d convolutions, GroupNorm."""
    cg = c // group_count(factor, c)
    return cg * cg * (1 + 3**d) + 4 * cg


@register_attention(
    "ema",
    paper="Ouyang, He, Zhang, Luo, Guo, Zhan, Huang. Efficient Multi-Scale Attention Module with Cross-Spatial "
    "Learning. ICASSP 2023 (arXiv:2305.13563)",
    year=2023,
    repo="https://github.com/YOLOonMe/EMA-attention-module",
    params_formula="c^2*(1 + 3^d) + 4c, c = C/G, G = gcd(32, C) groups",
    spatial_dims=(2, 3),
    defaults={"factor": 32},
    extension="3D: strips along D, H, W through the shared 1x1x1 conv, three gates, 3x3x3 conv, softmax weighting "
    "over all voxels.",
    departures=(
        "G = gcd(factor, C) groups, so any width works; for C a multiple of factor (32) this is the authors' "
        "grouping (their code fails for other widths)."
    ),
    params_fn=_ema_params,
    channel_rule=free_rule,
)
@scriptable
class EfficientMultiScaleAttention(nn.Module):
    """Efficient Multi-scale Attention (Ouyang et al., ICASSP 2023), 2D as the authors', 3D as medse's extension:
    the channels are split into G groups; per group a 1x1 branch (CA-style strip gates, then GroupNorm) and a 3x3
    branch weight each other through a softmax over their pooled channels, and the sigmoid of the summed maps gates
    the group (one spatial map per group).
    Layers (shared by the G groups, c = C/G channels each): ``conv1x1`` (c -> c, kernel 1, bias), ``conv3x3``
    (c -> c, kernel 3 per axis, padding 1, bias), ``gn`` (``GroupNorm(c, c)``). Learnable parameters:
    ``c^2 * (1 + 3^d) + 4c`` with ``c = C / G``.

    NOTE: not in paper: the 3D version (three strips and directional gates, 3x3x3 convolution).
    Departure: ``G = gcd(factor, C)`` groups, so every width works; where C is a multiple of ``factor`` this is
    ``factor``, the authors' grouping (their code fails for other widths).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels C.
        factor: the number of channel groups G. Defaults to 32 (the authors' code).
        record_gate: store the gate sigmoid(w), expanded to (B, C, *spatial) (every channel of a group shares its
            group's map), detached, in ``self.last_gate``. Defaults to False.
    """

    last_gate: torch.Tensor | None

    def __init__(self, spatial_dims: int, in_channels: int, *, factor: int = 32, record_gate: bool = False) -> None:
        super().__init__()
        cls = type(self).__name__
        self.spatial_dims = check_spatial_dims(cls, spatial_dims, (2, 3))
        self.in_channels = check_channels(cls, in_channels)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{cls}: factor must be a positive integer, got {factor!r}.")
        self.factor = factor
        self.groups = group_count(factor, self.in_channels)
        c = self.in_channels // self.groups
        conv = Conv[Conv.CONV, self.spatial_dims]
        self.conv1x1 = conv(c, c, kernel_size=1, bias=True)
        self.conv3x3 = conv(c, c, kernel_size=3, padding=1, bias=True)
        self.gn = nn.GroupNorm(c, c)
        self.softmax = nn.Softmax(dim=-1)
        self.record_gate = bool(record_gate)
        self.last_gate: torch.Tensor | None = None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(w), one (B*G, 1, *spatial) map per sample and group."""
        nd = x.dim() - 2
        sizes = _spatial_sizes(x)
        g = self._grouped(x)
        bg, c = g.shape[0], g.shape[1]
        strips = strip_means(g)
        cat = torch.cat(strips, dim=2).reshape([bg, c, -1] + [1] * (nd - 1))
        # split lengths read from the strips (x's sizes), never ints: a trace then records them, as for CA
        parts = torch.split(self.conv1x1(cat).reshape(bg, c, -1), [s.shape[2] for s in strips], dim=2)
        x1 = g
        for i, a in enumerate(parts):
            x1 = x1 * directional(torch.sigmoid(a), i, nd)
        x1 = self.gn(x1)
        x2 = self.conv3x3(g)
        spatial = list(range(2, 2 + nd))
        w1 = self.softmax(x1.mean(dim=spatial).reshape(bg, 1, c))
        w2 = self.softmax(x2.mean(dim=spatial).reshape(bg, 1, c))
        w = torch.matmul(w1, x2.reshape(bg, c, -1)) + torch.matmul(w2, x1.reshape(bg, c, -1))
        return torch.sigmoid(w).reshape([bg, 1] + sizes)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x viewed as (B*G, C/G, *spatial): the groups folded into the batch."""
        return x.reshape([x.shape[0] * self.groups, x.shape[1] // self.groups] + _spatial_sizes(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.gate(x)
        g = self._grouped(x)
        if self.record_gate:
            b, ch = x.shape[0], x.shape[1]
            sizes = _spatial_sizes(x)
            c = ch // self.groups
            self.last_gate = q.detach().reshape([b, self.groups, 1] + sizes).expand(
                [b, self.groups, c] + sizes).reshape([b, ch] + sizes)
        return (g * q).reshape(x.shape)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: strip means and directional gates (2 per axis), the two global means, the two
        weighted sums over the channels of a group (the matmuls) and g * sigmoid(w)."""
        return (2 * (len(input_shape) - 2) + 5) * math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, groups={self.groups}"
