"""FcaNet multi-spectral channel attention (Qin, Zhang, Wu, Li, ICCV 2021, arXiv:2012.11879).

Reference code: https://github.com/cfzd/FcaNet (``MultiSpectralAttentionLayer``).

Descriptor: if x's spatial size differs from the DCT size, a copy of x is adaptive-average-pooled to it; then
``y_c = sum_p x[c, p] * F[c, p]`` with F a fixed DCT filter bank (persistent, non-learnable buffer
``dct_filter``, stored as (C, prod(dct_size)) so that ``.to(memory_format=...)`` leaves it alone). The C channels are split into n equal groups; group i uses frequency i of the selected list.
Excitation: ``fc1`` Linear(C, C // r, no bias) -> ReLU -> ``fc2`` Linear(C // r, C, no bias) -> sigmoid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medse.attention._base import (
    adaptive_avg_pool,
    channel_view,
    check_channels,
    check_spatial_dims,
    in_capture,
    reduced_channels,
)
from medse.attention.registry import reduction_rule, register_attention
from medse.utils.errors import unknown_option_error

# Frequencies on the authors' 7x7 grid (u indexes H, v indexes W), from their get_freq_indices.
_FREQS: dict[str, tuple[list[int], list[int]]] = {
    "top": (
        [0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1],
        [0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3],
    ),
    "low": (
        [0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4],
        [0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3],
    ),
    "bot": (
        [6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5, 6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6],
        [6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1, 4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3],
    ),
}
FREQ_METHODS = tuple(f"{kind}{n}" for kind in ("top", "low", "bot") for n in (1, 2, 4, 8, 16, 32))


def freq_indices(method: str) -> list[tuple[int, int]]:
    """The (u, v) pairs of a selection method such as ``"top16"`` on the authors' 7x7 grid."""
    if method not in FREQ_METHODS:
        raise unknown_option_error("FcaNet frequency method", str(method), FREQ_METHODS)
    kind, n = method[:3], int(method[3:])
    us, vs = _FREQS[kind]
    return list(zip(us[:n], vs[:n], strict=True))


def dct_basis(pos: int, freq: int, size: int) -> float:
    """Orthonormal DCT-II basis value: ``cos(pi*f*(p+0.5)/N) / sqrt(N)``, times sqrt(2) when f != 0."""
    value = math.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
    return value * math.sqrt(2) if freq != 0 else value


def dct_filter(dct_size: Sequence[int], frequencies: Sequence[Sequence[int]], channels: int) -> torch.Tensor:
    """The (C, *dct_size) DCT filter bank: channel group i (C / n channels) holds frequency i, any dimension."""
    n = len(frequencies)
    if channels % n:
        raise ValueError(f"FcaNet: in_channels={channels} must be divisible by the number of frequencies {n}.")
    group = channels // n
    filt = torch.zeros(channels, *dct_size, dtype=torch.float64)
    for i, freq in enumerate(frequencies):
        w = torch.ones((), dtype=torch.float64)
        for axis, (f, size) in enumerate(zip(freq, dct_size, strict=True)):
            vec = torch.tensor([dct_basis(p, int(f), size) for p in range(size)], dtype=torch.float64)
            w = w.unsqueeze(-1) * vec.reshape(*([1] * axis), size)
        filt[i * group : (i + 1) * group] = w
    return filt.float()


def _fca_params(c: int, d: int, reduction: float = 16, **_: Any) -> int:
    """Learnable parameters of FcaNet's gate: two bias-free linear layers (the DCT filters are a buffer)."""
    return 2 * c * int(c // reduction)


def _fca_rule(reduction: float | None = None, frequencies: Any = None, freq_method: str = "top16",
              **_: Any) -> tuple[int, int]:
    """FcaNet: C >= r and C a multiple of the number of frequencies (one DCT frequency per channel group)."""
    n = len(frequencies) if frequencies else len(freq_indices(freq_method))
    return reduction_rule(reduction)[0], n


@register_attention(
    "fca",
    paper="Qin, Zhang, Wu, Li. FcaNet: Frequency Channel Attention Networks. ICCV 2021 (arXiv:2012.11879)",
    year=2021,
    repo="https://github.com/cfzd/FcaNet",
    params_formula="2*C*(C//r), r=16 (DCT filters are a buffer)",
    spatial_dims=(2, 3),
    defaults={"reduction": 16, "freq_method": "top16", "dct_size": 7},
    extension=(
        "3D: a 3D DCT basis; the 2D (u, v) pair applies to the last two spatial axes, frequency 0 on the "
        "first, unless explicit 3D frequencies are given."
    ),
    departures="dct_size defaults to 7 (the frequency grid); the authors' ResNet uses 56/28/14/7 by stage.",
    params_fn=_fca_params,
    channel_rule=_fca_rule,
)
class FcaAttention(nn.Module):
    """FcaNet multi-spectral channel attention (Qin et al., ICCV 2021), 2D, and 3D as medse's extension.

    Learnable parameters: ``2*C*(C//r)`` (both linear layers without bias); the DCT filters are a buffer.

    Frequencies: the authors' (u, v) indices on a 7x7 grid, scaled by ``dct_size // 7`` per axis.
    NOTE: not in paper: in 3D the filters are a 3D DCT basis; the selected 2D pair (u, v) applies to the last two
    spatial axes and the first spatial axis gets frequency 0 (the in-plane spectrum summed over slices), unless
    explicit 3D ``frequencies`` are given.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels C; must be divisible by the number of frequencies.
        reduction: reduction ratio r. Defaults to 16.
        freq_method: ``top|low|bot`` + N with N in 1, 2, 4, 8, 16, 32. Defaults to ``"top16"``.
        dct_size: DCT size per spatial axis (an int for all axes), each at least 7. Defaults to 7. The authors'
            ResNet keys it by the bottleneck's planes: {64: 56, 128: 28, 256: 14, 512: 7}.
        frequencies: explicit frequency tuples (one int per spatial axis, on the 7-grid, scaled like the
            method's), overriding ``freq_method``. Defaults to None.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        reduction: float = 16,
        freq_method: str = "top16",
        dct_size: int | Sequence[int] = 7,
        frequencies: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        nd = self.spatial_dims = check_spatial_dims("FcaAttention", spatial_dims, (2, 3))
        self.in_channels = check_channels("FcaAttention", in_channels)
        size = (dct_size,) * nd if isinstance(dct_size, int) else tuple(dct_size)
        if len(size) != nd or any(isinstance(s, bool) or not isinstance(s, int) or s < 7 for s in size):
            raise ValueError(
                f"FcaAttention: dct_size must be an int >= 7 or {nd} ints >= 7 (frequencies live on a 7-grid), "
                f"got {dct_size!r}."
            )
        self.dct_size = size
        self._pool_size = list(size)  # the same as a list: TorchScript has no variadic tuples
        if frequencies is None:
            pairs = freq_indices(freq_method)
            freqs = [(0, u, v) if nd == 3 else (u, v) for u, v in pairs]
            self.freq_method = freq_method
        else:
            freqs = [tuple(int(f) for f in fr) for fr in frequencies]
            if not freqs or any(len(f) != nd or min(f) < 0 or max(f) > 6 for f in freqs):
                raise ValueError(
                    f"FcaAttention: frequencies must be a non-empty list of {nd}-tuples with entries in 0..6, "
                    f"got {frequencies!r}."
                )
            self.freq_method = "custom"
        scale = [s // 7 for s in size]
        self.frequencies = [tuple(f * k for f, k in zip(fr, scale, strict=True)) for fr in freqs]
        if self.in_channels % len(freqs):
            raise ValueError(
                f"FcaAttention: in_channels={self.in_channels} must be divisible by the number of frequencies "
                f"{len(freqs)} ({self.freq_method})."
            )
        self.reduction = reduction
        hidden = reduced_channels("FcaAttention", self.in_channels, reduction)
        # flattened: a (C, 7, 7, 7) buffer is 4-D, and Module.to(memory_format=torch.channels_last_3d) would try
        # (and fail) to give it a 5-D layout; checkpoints with the (C, *dct_size) shape load (_load_from_state_dict)
        filt = dct_filter(size, self.frequencies, self.in_channels).flatten(1)
        self.register_buffer("dct_filter", filt, persistent=True)
        self.fc1 = nn.Linear(self.in_channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, self.in_channels, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Accept checkpoints that stored ``dct_filter`` unflattened, (C, *dct_size)."""
        key = prefix + "dct_filter"
        filt = state_dict.get(key)
        if isinstance(filt, torch.Tensor) and filt.dim() == self.spatial_dims + 1:
            state_dict[key] = filt.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """The multi-spectral descriptor y, shape (B, C)."""
        pooled = x
        # a captured graph pools at every size (to the DCT size itself that is the identity): a size test would be
        # frozen into a trace, or become a guard of torch.export
        if (not torch.jit.is_scripting() and in_capture(x)) or list(x.shape[2:]) != self._pool_size:
            pooled = adaptive_avg_pool(x, self._pool_size)
        return (pooled.flatten(2) * self.dct_filter.to(pooled.dtype)).sum(dim=2)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate s as a (B, C, 1, ..., 1) tensor."""
        s = torch.sigmoid(self.fc2(self.act(self.fc1(self.descriptor(x)))))
        return channel_view(s, self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work: adaptive pooling (one add per input element, when the size differs), the DCT
        weighting (one multiply-add per pooled element) and x * s."""
        numel = math.prod(input_shape)
        pooled = input_shape[0] * input_shape[1] * math.prod(self.dct_size)
        pool = numel if tuple(input_shape[2:]) != self.dct_size else 0
        return pool + pooled + numel

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, reduction={self.reduction}, "
            f"freq_method={self.freq_method!r}, dct_size={self.dct_size}"
        )
