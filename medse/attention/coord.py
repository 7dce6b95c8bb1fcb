"""Coordinate Attention, CA (Hou, Zhou, Feng, CVPR 2021, arXiv:2103.02907).

Reference code: https://github.com/houqb/CoordAttention (``coordatt.py``).

2D: ``x_h = mean over W`` (B, C, H, 1) and ``x_w = mean over H`` (B, C, W, 1) are concatenated along the length
axis, ``y = h_swish(BN(conv1(concat)))`` with one BatchNorm over both strips, split back,
``a_h = sigmoid(conv_gates[0](y_h))``, ``a_w = sigmoid(conv_gates[1](y_w))`` and ``out = x * a_h * a_w``.
``mip = max(8, C // 32)``.

3D (NOTE: not in paper): one strip per spatial axis (D, H, W), each the mean over the two other axes, one shared
``conv1``/BN/h_swish over the concatenation, and three directional gates ``out = x * a_d * a_h * a_w``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from medse.attention._base import check_channels, check_spatial_dims, eager_only, scriptable
from medse.attention.kernels import coord_attention, fast_path_applies
from medse.attention.registry import free_rule, register_attention


def _ca_params(c: int, d: int, reduction: int = 32, min_mip: int = 8, **_: Any) -> int:
    """Learnable parameters of Coordinate attention with mip = max(min_mip, C // r) hidden channels."""
    mip = max(min_mip, c // reduction)
    return (d + 1) * c * mip + 3 * mip + d * c


@register_attention(
    "ca",
    paper="Hou, Zhou, Feng. Coordinate Attention for Efficient Mobile Network Design. CVPR 2021 (arXiv:2103.02907)",
    year=2021,
    repo="https://github.com/houqb/CoordAttention",
    params_formula="2D: 3*C*mip + 3*mip + 2C; 3D: 4*C*mip + 3*mip + 3C; mip = max(8, C//32)",
    spatial_dims=(2, 3),
    defaults={"reduction": 32, "min_mip": 8},
    extension="3D: one strip per axis (D, H, W), one shared conv/BN/h_swish, three directional gates.",
    spatial_gate=True,
    params_fn=_ca_params,
    channel_rule=free_rule,
)
@scriptable
class CoordAttention(nn.Module):
    """Coordinate Attention (Hou et al., CVPR 2021), 2D as in the paper, 3D as medse's extension.

    Layers (parameter names): ``conv1`` (1x1 conv C -> mip, bias), ``bn`` (BatchNorm over the concatenated
    strips), ``act`` (``nn.Hardswish``, the authors' h_swish), ``conv_gates`` (a ``ModuleList`` with one 1x1 conv
    mip -> C, bias, per spatial axis, in axis order: (H, W) in 2D = the authors' ``conv_h``, ``conv_w``).
    Learnable parameters: 2D ``3*C*mip + 3*mip + 2C``; 3D ``4*C*mip + 3*mip + 3C``.

    NOTE: not in paper: the 3D version with three directional gates (D, H, W), one strip per axis.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels C.
        reduction: mip = max(min_mip, C // reduction). Defaults to 32 (authors' code).
        min_mip: lower bound of the hidden width. Defaults to 8 (authors' code).
        record_gate: store the product of the directional gates (broadcastable to x), detached, in
            ``self.last_gate``. Defaults to False.
        fused: use the fused kernel (:func:`medse.attention.kernels.coord_attention`; same numbers) when
            ``record_gate`` is off. Defaults to True.
    """

    last_gate: torch.Tensor | None

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        reduction: int = 32,
        min_mip: int = 8,
        record_gate: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("CoordAttention", spatial_dims, (2, 3))
        self.in_channels = check_channels("CoordAttention", in_channels)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"CoordAttention: reduction must be a positive integer, got {reduction!r}.")
        if isinstance(min_mip, bool) or not isinstance(min_mip, int) or min_mip < 1:
            raise ValueError(f"CoordAttention: min_mip must be a positive integer, got {min_mip!r}.")
        self.reduction = reduction
        self.mip = max(min_mip, self.in_channels // reduction)
        conv = Conv[Conv.CONV, self.spatial_dims]
        self.conv1 = conv(self.in_channels, self.mip, kernel_size=1, bias=True)
        self.bn = Norm[Norm.BATCH, self.spatial_dims](self.mip)
        self.act = nn.Hardswish()
        self.conv_gates = nn.ModuleList(
            [conv(self.mip, self.in_channels, kernel_size=1, bias=True) for _ in range(self.spatial_dims)]
        )
        self.record_gate = bool(record_gate)
        self.fused = bool(fused)
        self.last_gate: torch.Tensor | None = None

    def strip_gates(self, strips: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gate network: one (B, C, L_i) strip mean per spatial axis i -> one (B, C, L_i) gate per axis.

        The strips are concatenated along the length axis, passed through ``conv1``, ``bn`` and ``act`` (one
        BatchNorm over all strips, as the authors'), split back and mapped by ``conv_gates[i]`` and a sigmoid.
        """
        nd = self.spatial_dims
        b, c = strips[0].shape[0], strips[0].shape[1]
        ones = [1] * (nd - 1)
        cat = torch.cat([s.reshape([b, c, s.shape[2]] + ones) for s in strips], dim=2)  # (B, C, sum L_i, 1, ...)
        y = self.act(self.bn(self.conv1(cat)))
        parts = torch.split(y, [s.shape[2] for s in strips], dim=2)
        gates: list[torch.Tensor] = []
        for i, conv in enumerate(self.conv_gates):
            gates.append(torch.sigmoid(conv(parts[i])).reshape(b, c, -1))
        return gates

    def gates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One gate per spatial axis i, shaped (B, C, 1, .., L_i, .., 1) so that it broadcasts against x."""
        nd = self.spatial_dims
        b, c = x.shape[0], x.shape[1]
        strips: list[torch.Tensor] = []
        for i in range(nd):
            other: list[int] = []
            for j in range(nd):
                if j != i:
                    other.append(2 + j)
            strips.append(x.mean(dim=other))  # (B, C, L_i)
        out: list[torch.Tensor] = []
        for i, g in enumerate(self.strip_gates(strips)):
            shape = [b, c] + [1] * nd
            shape[2 + i] = x.shape[2 + i]
            out.append(g.reshape(shape))
        return out

    @eager_only
    def takes_fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel."""
        return self.fused and not self.record_gate and x.ndim == self.spatial_dims + 2 and fast_path_applies(x)

    @eager_only
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return coord_attention(x, lambda *strips: self.strip_gates(list(strips)), tuple(self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.takes_fast_path(x):
            return self._fused(x)
        gates = self.gates(x)
        y = x
        for g in gates:
            y = y * g
        if self.record_gate:
            prod = gates[0]
            for g in gates[1:]:
                prod = prod * g
            self.last_gate = prod.detach()
        return y

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: one pass over x per strip mean and one multiply per directional gate."""
        return 2 * self.spatial_dims * math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, mip={self.mip}"
