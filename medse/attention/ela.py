"""Efficient Local Attention, ELA (Xu and Wan, arXiv:2403.01123, 2024).

No official code exists. medse follows the paper's equations and its PyTorch listing: for a 2D map,
``z_h = mean over W`` (B, C, H) and ``z_w = mean over H`` (B, C, W); each strip goes through the same 1D
convolution ``F`` (C -> C, kernel k, padding k//2, groups = C (depthwise), no bias) and the same GroupNorm (16
groups; statistics per strip), then a sigmoid: ``y_h = sigmoid(GN(F(z_h)))``, ``y_w = sigmoid(GN(F(z_w)))``,
``y = x * y_h * y_w``. No channel reduction, no BatchNorm (the paper's two changes to Coordinate Attention).

Choices the paper leaves open, stated: the paper's four variants (ELA-T/B/S/L) differ in the kernel size (5 or 7),
the convolution's groups and the GroupNorm groups; medse's default is the paper's listing (kernel 7, depthwise,
GroupNorm(16, C)), the others are keyword arguments. The convolution and the GroupNorm are shared by the strips
(one set of weights, as in the listing; timm's ``EfficientLocalAttn`` has one convolution per axis and one
GroupNorm group). Widths that are not a multiple of the GroupNorm groups get ``gcd(gn_groups, C)`` groups.

3D (NOTE: not in paper): one strip per spatial axis (D, H, W), each the mean over the two other axes, through the
same convolution and GroupNorm, three directional gates ``y = x * y_d * y_h * y_w``.

The code is written in TorchScript's subset (loops instead of comprehensions with conditions, sizes read from the
tensor, never converted to Python ints), so ``torch.jit.script`` compiles it and a trace at one size is right at
every size (EMA reuses :func:`strip_means` and :func:`directional`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medse.attention._base import check_channels, check_spatial_dims, scriptable
from medse.attention.registry import register_attention


def strip_means(x: torch.Tensor) -> list[torch.Tensor]:
    """One (B, C, L_i) strip per spatial axis i: the mean of x over the other spatial axes."""
    nd = x.dim() - 2
    if nd == 1:
        return [x]
    strips: list[torch.Tensor] = []
    for i in range(nd):
        other: list[int] = []
        for j in range(nd):
            if j != i:
                other.append(2 + j)
        strips.append(x.mean(dim=other))
    return strips


def directional(gate: torch.Tensor, axis: int, nd: int) -> torch.Tensor:
    """A (B, C, L) gate of spatial axis ``axis`` reshaped to broadcast against a (B, C, *spatial) tensor."""
    shape = [gate.shape[0], gate.shape[1]] + [1] * nd
    shape[2 + axis] = gate.shape[2]
    return gate.reshape(shape)


def group_count(wanted: int, channels: int) -> int:
    """``gcd(wanted, channels)``: ``wanted`` groups where it divides the width, else the largest divisor of both."""
    return math.gcd(int(wanted), int(channels))


def _ela_params(c: int, d: int, kernel_size: int = 7, groups: int | None = None, **_: Any) -> int:
    """Learnable parameters of ELA: the shared 1D convolution (no bias) and GroupNorm's affine pair."""
    return c * (c // (groups or c)) * kernel_size + 2 * c


def _ela_rule(groups: int | None = None, **_: Any) -> tuple[int, int]:
    """ELA: any width (GroupNorm groups adapt), a multiple of the convolution's groups when they are given."""
    return 1, (groups or 1)


@register_attention(
    "ela",
    paper="Xu, Wan. ELA: Efficient Local Attention for Deep Convolutional Neural Networks. arXiv:2403.01123 (2024)",
    year=2024,
    repo="",
    params_formula="C*(C/groups)*k + 2C; default (depthwise, k=7): 9C",
    spatial_dims=(2, 3),
    defaults={"kernel_size": 7, "groups": None, "gn_groups": 16},
    extension="3D: one strip per axis (D, H, W) through the same 1D convolution and GroupNorm, three gates.",
    departures=(
        "No official code: the paper's equations and listing (kernel 7, depthwise, no bias, GroupNorm(16), "
        "convolution and GroupNorm shared by the strips, statistics per strip). GroupNorm groups are "
        "gcd(gn_groups, C) where C is not a multiple of gn_groups. timm's EfficientLocalAttn differs (one "
        "convolution per axis, one GroupNorm group)."
    ),
    params_fn=_ela_params,
    channel_rule=_ela_rule,
)
@scriptable
class EfficientLocalAttention(nn.Module):
    """Efficient Local Attention (Xu and Wan, 2024), 2D as in the paper, 3D as medse's extension: per spatial axis
    i the strip mean z_i (the mean over the other axes) gives the gate ``sigmoid(GN(conv1d(z_i)))``, and
    ``y = x * prod_i gate_i``; Coordinate Attention without channel reduction or BatchNorm.
    Layers: ``conv`` (``Conv1d(C, C, k, padding=k//2, groups=groups, bias=False)``, shared by the strips), ``gn``
    (``GroupNorm(gcd(gn_groups, C), C)``, affine, shared; statistics per strip). Learnable parameters:
    ``C*(C/groups)*k + 2C``; depthwise (default) ``C*k + 2C``.

    NOTE: not in paper: the 3D version (one strip and gate per axis, shared convolution and GroupNorm).
    Departure: where C is not a multiple of ``gn_groups`` the GroupNorm has ``gcd(gn_groups, C)`` groups (the
    paper's GroupNorm(16, C) is undefined there).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels C.
        kernel_size: odd 1D kernel size. Defaults to 7 (the paper's listing; ELA-T/S use 5).
        groups: groups of the 1D convolution, a divisor of C; ``None`` is depthwise (groups = C). Defaults to None
            (the paper's listing).
        gn_groups: GroupNorm groups. Defaults to 16 (the paper's listing).
        record_gate: store the product of the directional gates (broadcastable to x), detached, in
            ``self.last_gate``. Defaults to False.
    """

    last_gate: torch.Tensor | None

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        kernel_size: int = 7,
        groups: int | None = None,
        gn_groups: int = 16,
        record_gate: bool = False,
    ) -> None:
        super().__init__()
        cls = type(self).__name__
        self.spatial_dims = check_spatial_dims(cls, spatial_dims, (2, 3))
        self.in_channels = c = check_channels(cls, in_channels)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{cls}: kernel_size must be a positive odd integer, got {kernel_size!r}.")
        conv_groups = c if groups is None else groups
        if isinstance(conv_groups, bool) or not isinstance(conv_groups, int) or conv_groups < 1 or c % conv_groups:
            raise ValueError(f"{cls}: groups must be a positive divisor of in_channels={c} (or None for depthwise), "
                             f"got {groups!r}.")
        if isinstance(gn_groups, bool) or not isinstance(gn_groups, int) or gn_groups < 1:
            raise ValueError(f"{cls}: gn_groups must be a positive integer, got {gn_groups!r}.")
        self.kernel_size = kernel_size
        self.groups = conv_groups
        self.conv = nn.Conv1d(c, c, kernel_size, padding=kernel_size // 2, groups=conv_groups, bias=False)
        self.gn = nn.GroupNorm(group_count(gn_groups, c), c)
        self.record_gate = bool(record_gate)
        self.last_gate: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One gate per spatial axis, each shaped to broadcast against x."""
        nd = x.dim() - 2
        out: list[torch.Tensor] = []
        for i, z in enumerate(strip_means(x)):
            out.append(directional(torch.sigmoid(self.gn(self.conv(z))), i, nd))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return 2 * (len(input_shape) - 2) * math.prod(input_shape)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, kernel_size={self.kernel_size}, "
                f"groups={self.groups}, gn_groups={self.gn.num_groups}")
