"""Convolutional Block Attention Module, CBAM (Woo, Park, Lee, Kweon, ECCV 2018, arXiv:1807.06521).

Reference code: https://github.com/Jongchan/attention-module (``MODELS/cbam.py``).

- Channel gate (``ChannelGate``): each pooled descriptor (average and maximum over space by default) goes through
  one shared MLP ``Linear(C, C//r) -> ReLU -> Linear(C//r, C)`` (with biases); the outputs are summed, passed
  through a sigmoid and multiply x. r = 16.
- Spatial gate (``SpatialGate``): ``ChannelPool`` = concatenation of the channel maximum and the channel mean (in
  that order), a 7x7 convolution 2 -> 1 without bias (padding 3), BatchNorm (eps 1e-5, momentum 0.01, affine),
  sigmoid; y = x * gate.
- CBAM: the channel gate, then the spatial gate on its output.

3D (NOTE: not in paper): the pools run over the three spatial axes and the spatial gate's convolution is 7x7x7,
as in the 3D request on the authors' repository (issue #46, PR #53). 1D likewise (kernel 7).

The blocks have no fast path; their code is written in TorchScript's subset (loops instead of ``sum`` over a
generator, ``Optional`` attributes declared with :func:`~medse.attention._base.scriptable`) so that
``torch.jit.script`` compiles them and a trace or an export records operators valid at every size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from medse.attention._base import channel_view, check_channels, check_spatial_dims, reduced_channels, scriptable
from medse.attention.registry import register_attention
from medse.attention.se import se_params
from medse.utils.errors import unknown_option_error

#: The descriptors of the authors' ``ChannelGate``: average, maximum, LP (p=2) and log-sum-exp pooling over space.
POOL_TYPES: tuple[str, ...] = ("avg", "max", "lp", "lse")


def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """One (B, C) descriptor of x pooled over all spatial axes."""
    flat = x.flatten(2)
    if kind == "avg":
        return flat.mean(dim=2)
    if kind == "max":
        return flat.amax(dim=2)
    if kind == "lp":  # F.lp_pool with p=2 over the whole map: (sum x^2)^(1/2)
        return torch.linalg.vector_norm(flat, ord=2, dim=2)
    return torch.logsumexp(flat, dim=2)


class CBAMChannelGate(nn.Module):
    """CBAM's channel attention (the authors' ``ChannelGate``), 1D, 2D and 3D:
    ``s = sigmoid(sum_p fc2(relu(fc1(pool_p(x)))))``, ``y = x * s``: one MLP shared by the pooled descriptors.
    Layers: ``fc1`` (``Linear(C, C//r)``, bias), ``fc2`` (``Linear(C//r, C)``, bias). Learnable parameters:
    ``2*C*(C//r) + C//r + C``. NOTE: not in paper: 1D and 3D (pools over all spatial axes).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        reduction: reduction ratio r of the MLP. Defaults to 16 (the paper).
        pool_types: descriptors from ``("avg", "max", "lp", "lse")``, summed after the MLP. Defaults to
            ``("avg", "max")`` (the paper; the authors' code offers the other two).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, *, reduction: float = 16, pool_types: Sequence[str] = ("avg", "max")
    ) -> None:
        super().__init__()
        cls = type(self).__name__
        self.spatial_dims = check_spatial_dims(cls, spatial_dims, (1, 2, 3))
        self.in_channels = check_channels(cls, in_channels)
        pools = (pool_types,) if isinstance(pool_types, str) else tuple(pool_types)
        if not pools:
            raise ValueError(f"{cls}: pool_types must name at least one of {POOL_TYPES}.")
        for p in pools:
            if p not in POOL_TYPES:
                raise unknown_option_error(f"{cls} pool type", str(p), POOL_TYPES)
        self.pool_types = pools
        self.reduction = reduction
        hidden = reduced_channels(cls, self.in_channels, reduction)
        self.fc1 = nn.Linear(self.in_channels, hidden, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, self.in_channels, bias=True)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate s as a (B, C, 1, ..., 1) tensor."""
        outs: list[torch.Tensor] = []
        for p in self.pool_types:
            outs.append(self.fc2(self.act(self.fc1(_pool(x, p)))))
        total = outs[0]  # summed in pool order, as the authors' loop (and Python's sum: 0 + a is a)
        for o in outs[1:]:
            total = total + o
        return channel_view(torch.sigmoid(total), x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: one pass over x per pooled descriptor, then x * s."""
        return (len(self.pool_types) + 1) * math.prod(input_shape)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, reduction={self.reduction}, "
                f"pool_types={self.pool_types}")


@scriptable
class CBAMSpatialGate(nn.Module):
    """CBAM's spatial attention (the authors' ``SpatialGate``), 1D, 2D and 3D:
    ``q = sigmoid(bn(conv(cat(max_c x, mean_c x))))``, ``y = x * q``. Layers: ``conv`` (2 -> 1, kernel k per axis,
    padding k//2, no bias), ``bn`` (BatchNorm of one channel, eps 1e-5, momentum 0.01, affine). Learnable
    parameters: ``2*k^d + 2``. NOTE: not in paper: 1D and 3D (a k^d convolution). Departure: in training with a
    single value to normalise (batch 1 and one spatial position) BatchNorm is undefined; the running statistics
    are used then (as in eval mode) and left unchanged.

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C (the gate's convolution sees 2 pooled channels).
        kernel_size: odd kernel size per axis. Defaults to 7 (the paper).
        record_gate: store the gate q (B, 1, *spatial), detached, in ``self.last_gate``. Defaults to False.
    """

    last_gate: torch.Tensor | None

    def __init__(self, spatial_dims: int, in_channels: int, *, kernel_size: int = 7, record_gate: bool = False) -> None:
        super().__init__()
        cls = type(self).__name__
        self.spatial_dims = check_spatial_dims(cls, spatial_dims, (1, 2, 3))
        self.in_channels = check_channels(cls, in_channels)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{cls}: kernel_size must be a positive odd integer, got {kernel_size!r}.")
        self.kernel_size = kernel_size
        self.conv = Conv[Conv.CONV, self.spatial_dims](2, 1, kernel_size=kernel_size, padding=kernel_size // 2,
                                                       bias=False)
        self.bn = Norm[Norm.BATCH, self.spatial_dims](1, eps=1e-5, momentum=0.01, affine=True)
        self.record_gate = bool(record_gate)
        self.last_gate: torch.Tensor | None = None

    def _bn(self, z: torch.Tensor) -> torch.Tensor:
        mean, var = self.bn.running_mean, self.bn.running_var  # locals: TorchScript refines them, not attributes
        if self.training and z.numel() == 1 and mean is not None:
            return F.batch_norm(z, mean, var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        return self.bn(z)

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate q as a (B, 1, *spatial) tensor."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self._bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.spatial_gate(x)
        if self.record_gate:
            self.last_gate = q.detach()
        return x * q

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: the channel maximum and mean (one pass each) and x * q."""
        return 3 * math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, kernel_size={self.kernel_size}"


@scriptable
class CBAM(nn.Module):
    """CBAM (Woo et al., ECCV 2018): :class:`CBAMChannelGate`, then :class:`CBAMSpatialGate` on its output,
    ``y = x' * q(x')`` with ``x' = x * s(x)``, ``s`` the shared-MLP gate of the average- and max-pooled channel
    descriptors, ``q`` the 7x7 (7x7x7 in 3D) convolution + BatchNorm gate of the channel maximum and mean.
    Equal to the authors' ``CBAM(C, r, ['avg', 'max'])`` in 2D. Submodules ``channel`` and ``spatial`` (parameter
    names ``channel.fc1``, ``channel.fc2``, ``spatial.conv``, ``spatial.bn``). Learnable parameters:
    ``2*C*(C//r) + C//r + C + 2*k^d + 2``. NOTE: not in paper: 1D and 3D (7x7x7 spatial convolution).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        reduction: reduction ratio r of the channel MLP. Defaults to 16.
        pool_types: the channel gate's descriptors. Defaults to ``("avg", "max")``.
        kernel_size: the spatial gate's kernel size per axis. Defaults to 7.
        record_gate: store the whole gate y / x = s * q (B, C, *spatial), detached, in ``self.last_gate``.
            Defaults to False.
    """

    last_gate: torch.Tensor | None

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        reduction: float = 16,
        pool_types: Sequence[str] = ("avg", "max"),
        kernel_size: int = 7,
        record_gate: bool = False,
    ) -> None:
        super().__init__()
        self.channel = CBAMChannelGate(spatial_dims, in_channels, reduction=reduction, pool_types=pool_types)
        self.spatial = CBAMSpatialGate(spatial_dims, in_channels, kernel_size=kernel_size)
        self.spatial_dims = self.channel.spatial_dims
        self.in_channels = self.channel.in_channels
        self.record_gate = bool(record_gate)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.channel.channel_gate(x)
        xc = x * s
        q = self.spatial.spatial_gate(xc)
        if self.record_gate:
            self.last_gate = (s * q).detach()
        return xc * q

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work of both gates (the gates' own forwards are not called, so not hooked)."""
        return self.channel.extra_macs(input_shape) + self.spatial.extra_macs(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}"


def _cbam_spatial_params(c: int, d: int, kernel_size: int = 7, **_: Any) -> int:
    """Learnable parameters of CBAM's spatial gate: the 2 -> 1 k^d convolution (no bias) and BatchNorm's pair."""
    return 2 * kernel_size**d + 2


_WOO_CBAM = "Woo, Park, Lee, Kweon. CBAM: Convolutional Block Attention Module. ECCV 2018 (arXiv:1807.06521)"
_CBAM_REPO = "https://github.com/Jongchan/attention-module"
_CBAM_3D = ("1D and 3D: pools over all spatial axes and a k^d spatial convolution (7x7x7 in 3D, as requested on "
            "the authors' repository, issue #46 / PR #53).")

# Registered after the three classes so that the module is listed before its two gates (``medse blocks``).
register_attention(
    "cbam",
    paper=_WOO_CBAM,
    year=2018,
    repo=_CBAM_REPO,
    params_formula="2*C*(C//r) + C//r + C + 2*k^d + 2, r=16, k=7",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "pool_types": ("avg", "max"), "kernel_size": 7},
    extension=_CBAM_3D,
    departures=(
        "Training with one value per BatchNorm channel in the spatial gate (batch 1, one position) normalises "
        "with the running statistics (BatchNorm is undefined there)."
    ),
    params_fn=lambda c, d, reduction=16, kernel_size=7, **_: se_params(c, d, reduction)
    + _cbam_spatial_params(c, d, kernel_size),
)(CBAM)
register_attention(
    "cbam_channel",
    paper=_WOO_CBAM + "; its channel attention (ChannelGate)",
    year=2018,
    repo=_CBAM_REPO,
    params_formula="2*C*(C//r) + C//r + C, r=16",
    spatial_dims=(1, 2, 3),
    defaults={"reduction": 16, "pool_types": ("avg", "max")},
    extension="1D and 3D: average and maximum over all spatial axes.",
    params_fn=lambda c, d, reduction=16, **_: se_params(c, d, reduction),
)(CBAMChannelGate)
register_attention(
    "cbam_spatial",
    paper=_WOO_CBAM + "; its spatial attention (SpatialGate)",
    year=2018,
    repo=_CBAM_REPO,
    params_formula="2*k^d + 2, k=7",
    spatial_dims=(1, 2, 3),
    defaults={"kernel_size": 7},
    extension=_CBAM_3D,
    departures="As cbam's spatial gate (running statistics for a single value per BatchNorm channel in training).",
    params_fn=_cbam_spatial_params,
)(CBAMSpatialGate)
