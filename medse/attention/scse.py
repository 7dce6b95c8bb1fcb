"""Spatial SE (sSE) and concurrent spatial and channel SE (scSE), Roy et al.

- Roy, Navab, Wachinger, "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional
  Networks", MICCAI 2018, arXiv:1803.02579 (aggregation by addition).
- Roy, Navab, Wachinger, "Recalibrating Fully Convolutional Networks with Spatial and Channel 'Squeeze and
  Excitation' Blocks", IEEE TMI 2019, arXiv:1808.08127 (aggregation by element-wise maximum, as in the
  authors' released code https://github.com/ai-med/squeeze_and_excitation).
- segmentation_models_pytorch's ``SCSEModule`` adds the branches with r = 16 (registered here as ``scse_smp``).

sSE: ``q = sigmoid(conv(x))`` with a C -> 1 pointwise convolution with bias; ``y = x * q``.
scSE: ``max(x * c, x * q)`` (default, authors' code), ``x * c + x * q`` (MICCAI paper, smp) or ``x * c * q``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medse.attention._base import ConcatOutput, check_channels, check_spatial_dims, eager_only, scriptable
from medse.attention.kernels import fast_path_applies, scse_attention, spatial_attention
from medse.attention.kernels.spatial import AGGREGATIONS
from medse.attention.registry import register_attention
from medse.attention.se import ROY_PAPER, ROY_REPO, ChannelSE, se_params
from medse.utils.errors import unknown_option_error


@register_attention(
    "sse",
    paper=ROY_PAPER,
    year=2018,
    repo=ROY_REPO,
    params_formula="C + 1",
    spatial_dims=(1, 2, 3),
    extension="1D (the authors define 2D and 3D).",
    spatial_gate=True,
    params_fn=lambda c, d, **_: c + 1,
)
@scriptable
class SpatialSE(ConcatOutput, nn.Module):
    """Spatial squeeze-and-excitation, sSE (Roy et al., MICCAI 2018).

    ``y = x * sigmoid(conv(x))`` where ``conv`` is a C -> 1 pointwise convolution with bias (MONAI's
    ``Conv[Conv.CONV, spatial_dims]``). Learnable parameters: ``C + 1``. The gate is the same for every channel.
    NOTE: not in paper: the 1D version (the authors define 2D and 3D).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        record_gate: store the gate (B, 1, *spatial), detached, in ``self.last_gate`` at every forward.
            Defaults to False.
        fused: use the fused kernel (:func:`medse.attention.kernels.spatial_attention`; same numbers).
            Defaults to True.
    """

    last_gate: torch.Tensor | None

    def __init__(self, spatial_dims: int, in_channels: int, *, record_gate: bool = False, fused: bool = True) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("SpatialSE", spatial_dims, (1, 2, 3))
        self.in_channels = check_channels("SpatialSE", in_channels)
        self.conv = Conv[Conv.CONV, self.spatial_dims](self.in_channels, 1, kernel_size=1, bias=True)
        self.record_gate = bool(record_gate)
        self.fused = bool(fused)
        self.last_gate: torch.Tensor | None = None

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate q as a (B, 1, *spatial) tensor."""
        return torch.sigmoid(self.conv(x))

    @eager_only
    def takes_fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel."""
        return self.fused and fast_path_applies(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.takes_fast_path(x):
            return self._fused(x, None)
        q = self.spatial_gate(x)
        if self.record_gate:
            self.last_gate = q.detach()
        return x * q

    @eager_only
    def _fused(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        y, q = spatial_attention(x, self.conv.weight, self.conv.bias, skip=skip)
        if self.record_gate:
            self.last_gate = q.detach().reshape(x.shape[0], 1, *x.shape[2:])
        return y

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the convolution: x * q (one multiply per element)."""
        return math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}"


def _scse_params(c: int, d: int, reduction: float = 2, **_: Any) -> int:
    """Learnable parameters of scSE: the cSE gate (:func:`~medse.attention.se.se_params`) plus the sSE
    convolution's ``C + 1``."""
    return se_params(c, d, reduction) + c + 1


@register_attention(
    "scse",
    paper=ROY_PAPER,
    year=2018,
    repo=ROY_REPO,
    params_formula="2*C*(C//r) + C//r + 2C + 1, r=2",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 2, "aggregation": "max"},
    extension="1D; aggregation 'mul' (offered for comparison only).",
    spatial_gate=True,
    departures=(
        "Default aggregation is the element-wise maximum of the authors' code and TMI paper; the MICCAI "
        "paper adds the branches (aggregation='add')."
    ),
    params_fn=_scse_params,
)
@scriptable
class SCSE(ConcatOutput, nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation, scSE (Roy et al., MICCAI 2018 / TMI 2019).

    Two branches on the same input: ``cse`` (a :class:`ChannelSE`, reduction r) and ``sse`` (a
    :class:`SpatialSE`), aggregated by ``aggregation``. Learnable parameters: ``2*C*(C//r) + C//r + 2C + 1``.

    Departure: the MICCAI paper adds the two branches; the authors' released code and the TMI paper take the
    element-wise maximum, which is medse's default. ``"mul"`` (x * c * q) is offered for comparison only.
    NOTE: not in paper: the 1D version and ``"mul"``.

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        reduction: reduction ratio r of the channel branch. Defaults to 2.
        aggregation: ``"max"``, ``"add"`` or ``"mul"``. Defaults to ``"max"`` (authors' code).
        record_gate: store the spatial gate (B, 1, *spatial), detached, in ``self.last_gate``. Defaults to False.
        fused: use the fused kernel (:func:`medse.attention.kernels.scse_attention`; same numbers).
            Defaults to True.
    """

    last_gate: torch.Tensor | None

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        reduction: float = 2,
        aggregation: str = "max",
        record_gate: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("SCSE", spatial_dims, (1, 2, 3))
        self.in_channels = check_channels("SCSE", in_channels)
        if aggregation not in AGGREGATIONS:
            raise unknown_option_error("SCSE aggregation", str(aggregation), AGGREGATIONS)
        self.aggregation = aggregation
        self.reduction = reduction
        self.cse = ChannelSE(self.spatial_dims, self.in_channels, reduction=reduction, fused=False)
        self.sse = SpatialSE(self.spatial_dims, self.in_channels, fused=False)
        self.record_gate = bool(record_gate)
        self.fused = bool(fused)
        self.last_gate: torch.Tensor | None = None

    @eager_only
    def takes_fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel."""
        return self.fused and fast_path_applies(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.takes_fast_path(x):
            return self._fused(x, None)
        c = self.cse.channel_gate(x)
        q = self.sse.spatial_gate(x)
        if self.record_gate:
            self.last_gate = q.detach()
        if self.aggregation == "max":
            return torch.maximum(x * c, x * q)
        if self.aggregation == "add":
            return x * c + x * q
        return x * c * q

    @eager_only
    def _fused(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        y, q = scse_attention(
            x, self.cse.excite, tuple(self.cse.parameters()), self.sse.conv.weight, self.sse.conv.bias,
            self.aggregation, skip=skip,
        )
        if self.record_gate:
            self.last_gate = q.detach().reshape(x.shape[0], 1, *x.shape[2:])
        return y

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the linear/conv layers: mean, x*c, x*q and the aggregation (4 per element)."""
        return 4 * math.prod(input_shape)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, reduction={self.reduction}, "
            f"aggregation={self.aggregation!r}"
        )


# segmentation_models_pytorch's preset of the same class, listed after scse.
register_attention(
    "scse_smp",
    paper=ROY_PAPER + "; preset of segmentation_models_pytorch's SCSEModule",
    year=2018,
    repo="https://github.com/qubvel-org/segmentation_models.pytorch",
    params_formula="2*C*(C//r) + C//r + 2C + 1, r=16",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "aggregation": "add"},
    extension="1D and 3D (smp's module is 2D).",
    spatial_gate=True,
    departures="smp's choices: addition of the branches and r=16.",
    params_fn=lambda c, d, reduction=16, **kw: _scse_params(c, d, reduction),
)(SCSE)
