"""Efficient Channel Attention, ECA (Wang et al., CVPR 2020, arXiv:1910.03151).

Reference code: https://github.com/BangguWu/ECANet.

``z = mean(x)`` read as a length-C sequence; ``s = sigmoid(conv(z))`` with ``conv = nn.Conv1d(1, 1, k,
padding=(k - 1) // 2, bias=False)`` (zero padding at the channel ends); ``y = x * s``. Learnable parameters: k.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medse.attention._base import ChannelGateBlock, check_channels, check_spatial_dims
from medse.attention.registry import register_attention


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's adaptive kernel size: ``t = int(abs((log2(C) + b) / gamma))``, ``k = t if t is odd else t + 1``.

    With gamma = 2, b = 1 (the paper's values): C = 16..64 -> 3, 128..1024 -> 5, 2048 -> 7.
    """
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def _eca_params(c: int, d: int, kernel_size: int | None = None, gamma: float = 2, b: float = 1, **_: Any) -> int:
    """Learnable parameters of ECA: the 1D convolution's k weights (no bias)."""
    return kernel_size if kernel_size is not None else eca_kernel_size(c, gamma, b)


@register_attention(
    "eca",
    paper="Wang, Wu, Zhu, Li, Zuo, Hu. ECA-Net: Efficient Channel Attention for Deep CNNs. CVPR 2020 "
    "(arXiv:1910.03151)",
    year=2020,
    repo="https://github.com/BangguWu/ECANet",
    params_formula="k, k = adaptive odd(int((log2(C) + 1) / 2)) or given",
    spatial_dims=(1, 2, 3),
    defaults={"kernel_size": None},
    extension="1D and 3D.",
    departures="Even kernel sizes are rejected (the authors' padding would shorten the channel axis).",
    params_fn=_eca_params,
)
class ECA(ChannelGateBlock):
    """Efficient Channel Attention (Wang et al., CVPR 2020), any number of spatial dimensions.

    Learnable parameters: k (the 1D convolution across channels, no bias). Parameter name: ``conv``.
    NOTE: not in paper: the 1D and 3D versions (the squeeze is a mean over all spatial axes).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C.
        kernel_size: odd kernel size k of the channel convolution, or None to derive it from C with
            :func:`eca_kernel_size`. Defaults to None (adaptive). Note: the authors' ECA-ResNet-50 passes
            k = [3, 5, 5, 7] per stage explicitly rather than computing it.
        gamma: gamma of the adaptive rule. Defaults to 2.
        b: b of the adaptive rule. Defaults to 1.
        fused: use the fused kernel (:mod:`medse.attention.kernels.channel`; same numbers). Defaults to True.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        b: float = 1,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("ECA", spatial_dims, (1, 2, 3))
        self.in_channels = check_channels("ECA", in_channels)
        if kernel_size is None:
            if gamma == 0:
                raise ValueError("ECA: gamma must not be 0.")
            kernel_size = eca_kernel_size(self.in_channels, gamma, b)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"ECA: kernel_size must be a positive odd integer (or None for adaptive), got {kernel_size!r}."
            )
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.fused = bool(fused)

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        """The gate s of the (B, C) spatial mean z: the channel axis read as a sequence, (B, 1, C) -> (B, C)."""
        return torch.sigmoid(self.conv(z.unsqueeze(1))).squeeze(1)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, kernel_size={self.kernel_size}"
