"""SimAM, a parameter-free attention module (Yang et al., ICML 2021).

Yang, Zhang, Li, Xie, "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
ICML 2021. Reference code: https://github.com/ZjjConan/SimAM.

Per channel: ``n = N - 1`` (N spatial positions), ``d = (x - mean(x))**2``,
``e = d / (4 * (sum(d) / n + lambda)) + 0.5``, ``y = x * sigmoid(e)``. No learnable parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medse.attention._base import check_channels, check_spatial_dims, eager_only, scriptable, spatial_axes
from medse.attention.kernels import fast_path_applies, simam_attention
from medse.attention.registry import register_attention


@register_attention(
    "simam",
    paper="Yang, Zhang, Li, Xie. SimAM: A Simple, Parameter-Free Attention Module for CNNs. ICML 2021",
    year=2021,
    repo="https://github.com/ZjjConan/SimAM",
    params_formula="0",
    spatial_dims=(1, 2, 3),
    defaults={"e_lambda": 1e-4},
    extension="1D and 3D (the energy is defined per channel over any number of positions).",
    spatial_gate=True,
    departures=(
        "n = max(N-1, 1) so a single spatial position gives sigmoid(0.5) instead of NaN; energy in float32 "
        "for half-precision inputs. lambda=1e-4 is the module default (the authors' ImageNet/COCO runs: 0.1)."
    ),
    params_fn=lambda c, d, **_: 0,
)
@scriptable
class SimAM(nn.Module):
    """SimAM (Yang et al., ICML 2021): a full 3D (C x space) gate from an energy function, no parameters.

    NOTE: not in paper: the 1D and 3D versions (the energy is taken over all spatial positions of a channel).

    Departures from the authors' code, both for numerical robustness only:
    ``n = max(N - 1, 1)`` so that a single spatial position gives the gate ``sigmoid(0.5)`` instead of NaN
    (the formula is 0/0 there), and the energy is computed in float32 for half-precision inputs (the squares of
    large activations overflow float16); the output has the input's dtype.

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3.
        in_channels: number of input channels C (only checked; SimAM has no parameters).
        e_lambda: the regulariser lambda. Defaults to 1e-4 (the module default; the authors' ImageNet and COCO
            runs use 0.1).
        record_gate: store the gate sigmoid(e) (B, C, *spatial), detached, in ``self.last_gate``. Defaults to False.
        fused: use the fused kernel (:func:`medse.attention.kernels.simam_attention`; same numbers) for float32
            and float64 inputs without ``record_gate`` (half types: the plain code, energy in float32). Defaults
            to True.
    """

    last_gate: torch.Tensor | None

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        e_lambda: float = 1e-4,
        record_gate: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims("SimAM", spatial_dims, (1, 2, 3))
        self.in_channels = check_channels("SimAM", in_channels)
        if isinstance(e_lambda, bool) or not isinstance(e_lambda, (int, float)) or not e_lambda > 0:
            raise ValueError(f"SimAM: e_lambda must be a positive number, got {e_lambda!r}.")
        self.e_lambda = float(e_lambda)
        self.record_gate = bool(record_gate)
        self.fused = bool(fused)
        self.last_gate: torch.Tensor | None = None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate sigmoid(e) in float32 (float64 for float64 inputs), shape of x."""
        axes = spatial_axes(x)
        xf = x if x.dtype == torch.float64 else x.float()
        positions = 1
        for size in x.shape[2:]:
            positions = positions * size
        n = max(positions - 1, 1)
        d = (xf - xf.mean(dim=axes, keepdim=True)).pow(2)
        e = d / (4 * (d.sum(dim=axes, keepdim=True) / n + self.e_lambda)) + 0.5
        return torch.sigmoid(e)

    @eager_only
    def takes_fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel."""
        return (
            self.fused
            and not self.record_gate
            and x.dtype in (torch.float32, torch.float64)
            and fast_path_applies(x)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.takes_fast_path(x):
            return simam_attention(x, self.e_lambda)
        g = self.gate(x)
        if self.record_gate:
            self.last_gate = g.detach()
        return (x * g).to(x.dtype)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: mean, subtract, square, sum, divide(+add), sigmoid, x * gate (7 per element)."""
        return 7 * math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, e_lambda={self.e_lambda}"
