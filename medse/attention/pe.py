"""Project & Excite, PE (Rickmann, Roy, Sarasua, Navab, Wachinger, MICCAI 2019, arXiv:1906.04649).

"'Project & Excite' Modules for Segmentation of Volumetric Medical Scans". Reference code:
https://github.com/ai-med/squeeze_and_excitation (``ProjectExciteLayer``).

Squeeze by averaging over each pair of axes ((H, W) -> D, (D, W) -> H, (D, H) -> W), broadcast-sum the three
projections back to full size, then ``conv1`` (1x1x1 C -> C // r, bias) -> ReLU -> ``conv2`` (C // r -> C, bias)
-> sigmoid -> ``x * gate``. 3D only.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medse.attention._base import check_channels, reduced_channels, scriptable
from medse.attention.registry import register_attention
from medse.attention.se import ROY_REPO, se_params


@register_attention(
    "pe",
    paper="Rickmann, Roy, Sarasua, Navab, Wachinger. 'Project & Excite' Modules for Segmentation of "
    "Volumetric Medical Scans. MICCAI 2019 (arXiv:1906.04649)",
    year=2019,
    repo=ROY_REPO,
    params_formula="2*C*(C//r) + C//r + C, r=2",
    spatial_dims=(3,),
    defaults={"reduction": 2},
    spatial_gate=True,
    params_fn=lambda c, d, reduction=2, **kw: se_params(c, d, reduction),
)
@scriptable
class ProjectExcite(nn.Module):
    """Project & Excite (Rickmann et al., MICCAI 2019), a full (C x D x H x W) gate for volumes.

    Parameter names: ``conv1`` (the authors' ``conv_c``) and ``conv2`` (``conv_cT``).
    Learnable parameters: ``2*C*(C//r) + C//r + C``.

    Args:
        spatial_dims: must be 3 (the block is defined for volumes only; ValueError otherwise).
        in_channels: number of input channels C.
        reduction: reduction ratio r. Defaults to 2 (authors' code).
        record_gate: store the gate (B, C, D, H, W), detached, in ``self.last_gate``. Defaults to False.
    """

    last_gate: torch.Tensor | None

    def __init__(self, spatial_dims: int, in_channels: int, *, reduction: float = 2, record_gate: bool = False) -> None:
        super().__init__()
        if spatial_dims != 3 or isinstance(spatial_dims, bool):
            raise ValueError(
                f"ProjectExcite: spatial_dims must be 3 (Project & Excite is defined for volumes only), got "
                f"{spatial_dims!r}; for 2D use 'scse' or 'cse'."
            )
        self.spatial_dims = 3
        self.in_channels = check_channels("ProjectExcite", in_channels)
        self.reduction = reduction
        hidden = reduced_channels("ProjectExcite", self.in_channels, reduction)
        conv = Conv[Conv.CONV, 3]
        self.conv1 = conv(self.in_channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv(hidden, self.in_channels, kernel_size=1, bias=True)
        self.record_gate = bool(record_gate)
        self.last_gate: torch.Tensor | None = None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The full gate, shape of x."""
        z = x.mean(dim=(3, 4), keepdim=True) + x.mean(dim=(2, 4), keepdim=True) + x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.conv2(self.act(self.conv1(z))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        if self.record_gate:
            self.last_gate = g.detach()
        return x * g

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the convs: three projections, two broadcast sums, x * gate (6 per element)."""
        return 6 * math.prod(input_shape)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, reduction={self.reduction}"
