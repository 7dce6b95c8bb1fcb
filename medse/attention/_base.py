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
:func:`medse.networks.layers.forward_then_cat` calls it where a network concatenates a block's output.

Graph capture
-------------
``forward`` tests ``not torch.jit.is_scripting() and self.takes_fast_path(x)``: under any capture
(``torch.compile``, ``torch.export``, ONNX export, ``torch.jit.trace``, ``torch.func``) ``takes_fast_path`` is False
(:func:`medse.attention.kernels.core.capturing`) and the plain formula is recorded, which is valid at every batch
and spatial size. ``takes_fast_path`` and ``_fused`` are :func:`eager_only` (``torch.jit.unused``), so
``torch.jit.script`` compiles the plain formula only; the blocks' plain code is written in TorchScript's subset
(lists instead of star-unpacking, ``Optional`` attributes declared on the class with :func:`scriptable`).
"""

from __future__ import annotations

import math
import numbers
import sys
import typing
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from medse.attention.kernels import channel_attention, fast_path_applies
from medse.attention.kernels.core import capturing, skip_fits

_T = TypeVar("_T")


def scriptable(cls: type[_T]) -> type[_T]:
    """Class decorator: resolve the class's own annotations (strings under ``from __future__ import
    annotations``) so that ``torch.jit.script`` reads the types of attributes such as ``last_gate: Tensor | None``
    (TorchScript cannot evaluate a string annotation)."""
    namespace = vars(sys.modules[cls.__module__])
    own = cls.__dict__.get("__annotations__", {})
    cls.__annotations__ = {k: eval(v, namespace) if isinstance(v, str) else v for k, v in own.items()}  # noqa: S307
    return cls


def eager_only(fn: Callable) -> Callable:
    """``torch.jit.unused`` for a method (or function) that only eager code reaches, typically a block's fast path
    guarded by ``not torch.jit.is_scripting()``: TorchScript compiles a stub that raises instead of the body. The
    annotations are resolved first (TorchScript reads the stub's signature and cannot evaluate string
    annotations); arguments of such a function must not have defaults."""
    fn.__annotations__ = typing.get_type_hints(fn)
    return torch.jit.unused(fn)


def spatial_axes(x: torch.Tensor) -> list[int]:
    """The spatial axes of a (B, C, *spatial) tensor: ``[2, ..., x.ndim - 1]``."""
    return list(range(2, x.dim()))


def channel_view(s: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Reshape a (B, C) descriptor to (B, C, 1, ..., 1) so it broadcasts over ``spatial_dims`` axes."""
    return s.reshape([s.shape[0], s.shape[1]] + [1] * spatial_dims)


@eager_only
def in_capture(x: torch.Tensor) -> bool:
    """:func:`medse.attention.kernels.core.capturing` for the blocks' plain code; guard it with
    ``not torch.jit.is_scripting()`` (TorchScript compiles a stub that raises)."""
    return capturing(x)


@eager_only
def _torch_adaptive_pool(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(output_size) - 1]
    return pool(x, output_size)


def adaptive_avg_pool(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    """Adaptive average pooling of a (B, C, *spatial) tensor to ``output_size`` (one size per spatial axis).

    Eager: PyTorch's ``adaptive_avg_pool{1,2,3}d``. Under a graph capture (ONNX export, ``torch.export``,
    ``torch.jit.trace``/``script``) the same numbers (up to float rounding) in operators every exporter knows:
    adaptive pooling averages rectangular bins, bin i of an axis of length n spanning ``[floor(i n / m),
    ceil((i + 1) n / m))``, so it is separable; each axis is contracted with an (m, n) averaging matrix built
    from ``arange(n)``, valid for every input size (``aten::_adaptive_avg_pool3d`` has no ONNX function, and a
    pooling with a kernel computed from the traced size would freeze that size).
    """
    nd = len(output_size)
    if not torch.jit.is_scripting() and not in_capture(x):
        return _torch_adaptive_pool(x, output_size)
    y = x
    for k in range(nd):
        axis = y.dim() - nd + k
        n = y.shape[axis]
        m = output_size[k]
        i = torch.arange(m, device=x.device)
        start = torch.div(i * n, m, rounding_mode="floor")
        end = torch.div((i + 1) * n + m - 1, m, rounding_mode="floor")
        j = torch.arange(n, device=x.device).unsqueeze(0)
        inside = (j >= start.unsqueeze(1)) & (j < end.unsqueeze(1))
        w = inside.to(x.dtype) / (end - start).to(x.dtype).unsqueeze(1)  # (m, n), rows average one bin
        last = y.dim() - 1
        y = torch.matmul(y.transpose(axis, last), w.t()).transpose(axis, last)
    return y


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


@scriptable
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
        return channel_view(self.excite(x.mean(dim=spatial_axes(x))), x.dim() - 2)

    @eager_only
    def takes_fast_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel."""
        return self.fused and fast_path_applies(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.takes_fast_path(x):
            return self._fused(x, None)
        return x * self.channel_gate(x)

    @eager_only
    def _fused(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return channel_attention(x, self.excite, tuple(self.parameters()), skip=skip)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """Element-wise work outside the gate's layers: the spatial mean (one add per element) and x * s."""
        return 2 * math.prod(input_shape)
