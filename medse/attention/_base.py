"""Shared helpers of the attention blocks: argument checks, spatial reductions, the channel-gate base class.

Fast paths
----------
Blocks with a fused implementation (``se``/``cse``, ``eca``, ``sse``, ``scse``, ``ca``, ``simam``) take
``fused: bool = True`` and store it as ``self.fused``. Each block owns its fast path: ``takes_fast_path(x)``
says whether ``forward`` will use it (``self.fused`` and :func:`medse.attention.kernels.fast_path_applies`, plus
the block's own conditions), and ``forward`` then calls its family's kernel in :mod:`medse.attention.kernels`
directly, passing its own layers (for example its ``excite`` method as the gate network). The kernel computes
what the plain code computes, ``last_gate`` included where the block records it.

Blocks whose kernel saves its output (``se``/``cse``, ``eca``, ``sse``, ``scse``) also have
``forward_cat(skip, x)``, equal to ``torch.cat([skip, block(x)], 1)``: on the fast path the kernel writes its
output into the concatenation directly and saves that (see :func:`medse.attention.kernels.core.output_buffer`);
:func:`medse.networks._common.forward_then_cat` calls it where a network concatenates a block's output.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from medse.attention.kernels import channel_attention, fast_path_applies
from medse.attention.kernels.core import skip_fits


def spatial_axes(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a (B, C, *spatial) tensor: ``(2, ..., x.ndim - 1)``."""
    return tuple(range(2, x.ndim))


def channel_view(s: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Reshape a (B, C) descriptor to (B, C, 1, ..., 1) so it broadcasts over ``spatial_dims`` axes."""
    return s.reshape(s.shape[0], s.shape[1], *([1] * spatial_dims))


def check_spatial_dims(block: str, spatial_dims: object, supported: Sequence[int]) -> int:
    """Return ``spatial_dims`` as an int or raise ``ValueError`` naming the block and the supported values."""
    if (
        isinstance(spatial_dims, bool)
        or not isinstance(spatial_dims, numbers.Integral)
        or spatial_dims not in supported
    ):
        sup = ", ".join(str(d) for d in supported)
        raise ValueError(f"{block}: spatial_dims must be one of {{{sup}}}, got {spatial_dims!r}.")
    return int(spatial_dims)


def check_channels(block: str, in_channels: object) -> int:
    """Return ``in_channels`` as an int or raise ``ValueError`` if it is not a positive integer."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"{block}: in_channels must be a positive integer, got {in_channels!r}.")
    return int(in_channels)


def reduced_channels(block: str, in_channels: int, reduction: object) -> int:
    """``in_channels // reduction``, or ``ValueError`` when the reduction is not positive or too large."""
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or reduction <= 0:
        raise ValueError(f"{block}: reduction must be a positive number, got {reduction!r}.")
    hidden = int(in_channels // reduction)
    if hidden < 1:
        raise ValueError(
            f"{block}: in_channels={in_channels} is smaller than reduction={reduction} (hidden width would be "
            f"{hidden}); use in_channels >= {int(reduction) if float(reduction).is_integer() else reduction} "
            f"or a smaller reduction."
        )
    return hidden


class ConcatOutput:
    """Mixin of the blocks whose fused kernel can write its output into a concatenation (see the module docstring).

    The block defines ``takes_fast_path(x)`` and ``_fused(x, skip)`` (its kernel with ``skip``: returns
    ``torch.cat([skip, y], 1)`` written once).
    """

    def forward_cat(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``torch.cat([skip, self(x)], 1)``, written in one piece on the fast path (same numbers)."""
        if self.takes_fast_path(x) and skip_fits(x, skip):  # type: ignore[attr-defined]
            return self._fused(x, skip)  # type: ignore[attr-defined]
        return torch.cat([skip, self(x)], 1)  # type: ignore[operator]


class ChannelGateBlock(ConcatOutput, torch.nn.Module):
    """Base of the blocks that rescale each channel by a gate computed from the spatial mean (SE, cSE, ECA).

    Subclasses define ``excite(z) -> s``, mapping the (B, C) spatial mean to the (B, C) gate (after the sigmoid),
    and set ``self.fused``. ``forward`` computes ``x * s``: with the fused kernel
    (:func:`medse.attention.kernels.channel_attention`, given ``excite`` and the block's parameters) when
    :meth:`takes_fast_path`, else with the plain formula ``x * channel_gate(x)``.
    """

    fused: bool

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate s as a (B, C, 1, ..., 1) tensor (plain code)."""
        return channel_view(self.excite(x.mean(dim=spatial_axes(x))), x.ndim - 2)

    def takes_fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel."""
        return self.fused and fast_path_applies(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_fast_path(x):
            return self._fused(x, None)
        return x * self.channel_gate(x)

    def _fused(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return channel_attention(x, self.excite, tuple(self.parameters()), skip=skip)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the gate's layers: the spatial mean (one add per element) and x * s."""
        return 2 * math.prod(input_shape)
