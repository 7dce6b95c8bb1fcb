"""Shared helpers of the attention blocks: argument checks, spatial reductions, the fast-path hook.

Fast paths
----------
Blocks that may get a fused implementation (``se``/``cse``, ``sse``, ``scse``, ``eca``, ``ca``, ``simam``) take
``fused: bool = True`` and store it as ``self.fused``. Their ``forward`` first asks :func:`fused_impl` for a
function named after the block (``"cse"``, ``"sse"``, ``"scse"``, ``"eca"``, ``"ca"``, ``"simam"``) in the
optional module ``medse/attention/_fused.py``. The contract for that module: ``fn(module, x) -> Tensor`` computes
exactly what the plain ``forward`` computes with the module's own parameters (including ``last_gate`` when
``module.record_gate`` is set), or returns ``NotImplemented`` to fall back to the plain code (for example on a
device or dtype it does not handle). While ``_fused.py`` does not exist, both ``fused`` values run the plain code.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import torch


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


@functools.cache
def _fused_module():
    """The optional fast-path module, or None when it is absent or fails to import (then with a warning:
    a broken optional fast path must not take the plain blocks down with it)."""
    try:
        return importlib.import_module("medse.attention._fused")
    except ModuleNotFoundError as e:
        if e.name == "medse.attention._fused":
            return None
        warnings.warn(f"medse.attention._fused cannot be imported ({e}); using the plain blocks.", stacklevel=3)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure of an optional module
        warnings.warn(f"medse.attention._fused cannot be imported ({e!r}); using the plain blocks.", stacklevel=3)
        return None


def fused_impl(name: str) -> Callable | None:
    """The fast path ``medse.attention._fused.<name>`` if that module defines it, else ``None``."""
    mod = _fused_module()
    return None if mod is None else getattr(mod, name, None)


def run_fused(module: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """Run the fast path for ``module`` if it is enabled and available; ``None`` means: use the plain code."""
    if not getattr(module, "fused", False):
        return None
    fn = fused_impl(name)
    if fn is None:
        return None
    out = fn(module, x)
    return None if out is NotImplemented else out


class ChannelGateBlock(torch.nn.Module):
    """Base of the blocks that rescale each channel by a gate computed from the input (SE, cSE, ECA).

    Subclasses define ``channel_gate(x) -> (B, C, 1, ..., 1)`` and ``block_name`` (the fast-path name);
    ``forward`` takes the fast path when enabled and available, else computes ``x * channel_gate(x)``.
    """

    block_name: str

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_fused(self, self.block_name, x)
        if out is not None:
            return out
        return x * self.channel_gate(x)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the gate's layers: the spatial mean (one add per element) and x * s."""
        return 2 * math.prod(input_shape)
