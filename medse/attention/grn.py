"""Global Response Normalization, GRN (Woo et al., "ConvNeXt V2", CVPR 2023, arXiv:2301.00808).

Reference code: https://github.com/facebookresearch/ConvNeXt-V2 (``models/utils.py``, class ``GRN``, on
channels-last (N, H, W, C) tensors); the 3D form used in medical segmentation is MONAI's
``monai/networks/blocks/mednext_block.py`` (``global_resp_norm``, MedNeXt; MedNeXt-v2 arXiv:2512.17774).

Per sample and channel: ``G = ||x||_2`` over all spatial positions, ``N = G / (mean_c G + eps)`` (the mean over the
channels, eps added to the mean, 1e-6), ``y = gamma * (x * N) + beta + x``; gamma and beta, one value per channel,
are zero-initialised, so the block starts as the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medse.attention._base import channel_view, check_channels, check_spatial_dims, spatial_axes
from medse.attention.registry import register_attention


@register_attention(
    "grn",
    paper="Woo, Debnath, Hu, Chen, Liu, Kweon, Xie. ConvNeXt V2: Co-designing and Scaling ConvNets with Masked "
    "Autoencoders. CVPR 2023 (arXiv:2301.00808)",
    year=2023,
    repo="https://github.com/facebookresearch/ConvNeXt-V2",
    params_formula="2C",
    spatial_dims=(1, 2, 3),
    defaults={"eps": 1e-6},
    extension="1D (ConvNeXt V2 is 2D; 3D is MONAI's MedNeXt global_resp_norm, which medse equals).",
    departures=(
        "Channels-first (B, C, *spatial) where the authors' GRN is channels-last (same numbers); the norm is "
        "accumulated in float32 for half-precision inputs. gamma = beta = 0 at construction, as the authors': the "
        "block starts as the identity."
    ),
    params_fn=lambda c, d, **_: 2 * c,
)
class GlobalResponseNorm(nn.Module):
    """Global Response Normalization (Woo et al., CVPR 2023) on channels-first (B, C, *spatial) tensors:
    ``y = gamma * (x * N) + beta + x`` with ``N = G / (mean_c(G) + eps)`` and ``G`` the per-channel L2 norm over all
    spatial axes. Parameters ``gamma`` and ``beta`` (C,), zero-initialised as the authors': a fresh block is the
    identity. Learnable parameters: ``2C``. Equal to ConvNeXt-V2's ``GRN`` on the channels-last view in 2D and to
    MONAI MedNeXt's ``global_resp_norm`` in 2D and 3D.

    NOTE: not in paper: 1D (the norm is over whatever spatial axes there are; ConvNeXt-V2 is 2D, MedNeXt 2D/3D).
    Departure, numerical only: the norm is accumulated in float32 for half-precision inputs (the sum of squares of a
    float16 feature map overflows); the output has the input's dtype.

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        eps: added to the channel mean of the norms. Defaults to 1e-6 (authors' code and MONAI).
    """

    #: gamma = beta = 0 at construction (the authors' initialisation): the block starts as the identity.
    identity_at_init = True

    def __init__(self, spatial_dims: int, in_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("GlobalResponseNorm", spatial_dims, (1, 2, 3))
        self.in_channels = check_channels("GlobalResponseNorm", in_channels)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"GlobalResponseNorm: eps must be a positive number, got {eps!r}.")
        self.eps = float(eps)
        self.gamma = nn.Parameter(torch.zeros(self.in_channels))
        self.beta = nn.Parameter(torch.zeros(self.in_channels))

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """N = G / (mean_c G + eps), shape (B, C, 1, ..., 1), in x's dtype."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = torch.linalg.vector_norm(x, ord=2, dim=spatial_axes(x), keepdim=True, dtype=acc)
        return (g / (g.mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = x.ndim - 2
        gamma = channel_view(self.gamma.unsqueeze(0), nd)
        beta = channel_view(self.beta.unsqueeze(0), nd)
        return gamma * (x * self.response(x)) + beta + x

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: the sum of squares, x * N, gamma * (.), + beta + x (4 per element)."""
        return 4 * math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, eps={self.eps}"
