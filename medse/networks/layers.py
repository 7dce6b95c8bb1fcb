"""Layers and plumbing medse's own networks share: layer factories, pad-to-a-multiple and crop-back, the skip
concatenation that lets an attention block write it, and the SD-Net / QuickNAT max-unpooling encoder-decoder.

Layer factories: ``conv(d)``, ``conv_transpose(d)``, ``batch_norm(d)``, ``max_pool(d)`` and ``channel_dropout(d)``
are MONAI's (``monai.networks.layers.factories``: ``Conv``, ``Norm``, ``Pool``, ``Dropout``; the same
``torch.nn`` classes), ``max_unpool(d)`` is medse's (MONAI has no unpooling factory).

Padding: networks accept any spatial size; :class:`PadCropMixin` pads the input to a multiple of the network's
divisors (:func:`pad_to_multiple`), runs ``forward_padded`` and crops the output back (:func:`crop_to`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Dropout, Norm, Pool
from torch import nn

from medse.networks._common import check_int, check_kernel_size, check_pad_mode, check_spatial_dims
from medse.networks.placement import AttentionPlan

__all__ = [
    "PadCropMixin",
    "UnpoolingEncoderDecoder",
    "batch_norm",
    "channel_dropout",
    "conv",
    "conv_transpose",
    "crop_to",
    "divisor_of",
    "forward_then_cat",
    "lcm",
    "max_pool",
    "max_unpool",
    "pad_to_multiple",
]


# ------------------------------------------------------------------------------------------- factories
def conv(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv{1,2,3}d`` (MONAI's ``Conv[Conv.CONV, d]``)."""
    return Conv[Conv.CONV, spatial_dims]


def conv_transpose(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose{1,2,3}d`` (MONAI's ``Conv[Conv.CONVTRANS, d]``)."""
    return Conv[Conv.CONVTRANS, spatial_dims]


def batch_norm(spatial_dims: int) -> type[nn.Module]:
    """``nn.BatchNorm{1,2,3}d`` (MONAI's ``Norm[Norm.BATCH, d]``)."""
    return Norm[Norm.BATCH, spatial_dims]


def max_pool(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool{1,2,3}d`` (MONAI's ``Pool[Pool.MAX, d]``)."""
    return Pool[Pool.MAX, spatial_dims]


def max_unpool(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxUnpool{1,2,3}d``."""
    return {1: nn.MaxUnpool1d, 2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}[spatial_dims]


def channel_dropout(spatial_dims: int) -> type[nn.Module]:
    """Dropout of whole feature maps (``nn.Dropout2d`` / ``nn.Dropout3d``, MONAI's ``Dropout[Dropout.DROPOUT, d]``),
    as in Jégou et al. and QuickNAT."""
    return Dropout[Dropout.DROPOUT, spatial_dims]


# ------------------------------------------------------------------------------------------- padding
def divisor_of(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """Per-axis product of a list of strides (each an int or one int per axis)."""
    out = [1] * spatial_dims
    for s in strides:
        per_axis = [int(s)] * spatial_dims if isinstance(s, int) else [int(v) for v in s]
        if len(per_axis) != spatial_dims:
            raise ValueError(f"stride {s!r} must be an int or have {spatial_dims} values.")
        out = [a * b for a, b in zip(out, per_axis, strict=True)]
    return tuple(out)


def lcm(values: Sequence[int]) -> int:
    """Least common multiple of ``values`` (1 for none)."""
    out = 1
    for v in values:
        out = out * int(v) // math.gcd(out, int(v))
    return out


def pad_to_multiple(
    x: torch.Tensor, divisors: Sequence[int], mode: str = "constant"
) -> tuple[torch.Tensor, list[int]]:
    """Pad the spatial axes of ``x`` (B, C, *spatial) up to multiples of ``divisors``.

    The padding is split between both ends (the smaller half first), so the image stays centred.
    Returns the padded tensor and the per-axis amount padded before the data (``[]`` when nothing was
    padded), which :func:`crop_to` uses to cut the output back to the input's size.
    """
    spatial = x.shape[2:]
    totals = [(-int(n)) % int(d) for n, d in zip(spatial, divisors, strict=True)]
    if not any(totals):
        return x, []
    before = [t // 2 for t in totals]
    pad: list[int] = []
    for t, b in zip(reversed(totals), reversed(before), strict=True):  # F.pad wants the last axis first
        pad += [b, t - b]
    if mode == "reflect" and any(t - b > n - 1 or b > n - 1 for t, b, n in zip(totals, before, spatial, strict=True)):
        mode = "replicate"  # reflect cannot pad more than size - 1: fall back rather than fail
    if mode == "constant":
        return F.pad(x, pad, mode="constant", value=0.0), before
    return F.pad(x, pad, mode=mode), before


def crop_to(y: torch.Tensor, before: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: cut ``y``'s last ``len(spatial)`` axes to ``spatial`` starting at ``before``.

    Leading axes are kept whatever their number (``(B, C, *S)``, or DynUNet's deep-supervision stack
    ``(B, heads, C, *S)``).
    """
    if not before:
        return y
    lead = [slice(None)] * (y.ndim - len(spatial))
    index = lead + [slice(b, b + int(n)) for b, n in zip(before, spatial, strict=True)]
    return y[tuple(index)]


class PadCropMixin:
    """``forward(x)`` pads ``x`` to a multiple of ``self._divisors``, runs ``forward_padded``, crops back.

    Networks set ``self._divisors`` (per-axis), ``self.size_divisor`` (their lcm) and ``self.pad_mode``,
    usually through :meth:`_check_io` and :meth:`_setup_padding`.
    """

    _divisors: tuple[int, ...]
    pad_mode: str
    spatial_dims: int
    size_divisor: int

    def _check_io(self, owner: str, spatial_dims: object, in_channels: object, out_channels: object) -> int:
        """Check the arguments every network has; sets and returns ``self.spatial_dims`` (2 or 3)."""
        d = self.spatial_dims = check_spatial_dims(owner, spatial_dims)
        check_int("in_channels", in_channels, 1, owner)
        check_int("out_channels", out_channels, 1, owner)
        return d

    def _setup_padding(self, owner: str, pad_mode: object, pools: int) -> None:
        """Check and set ``pad_mode``; for ``pools`` 2x poolings along every axis set ``_divisors`` and
        ``size_divisor = 2 ** pools``."""
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self._divisors = (2**pools,) * self.spatial_dims
        self.size_divisor = 2**pools

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} expects a (B, C, {', '.join('XYZ'[: self.spatial_dims])}) tensor "
                f"({self.spatial_dims + 2} axes), got shape {tuple(x.shape)}."
            )
        spatial = x.shape[2:]
        xp, before = pad_to_multiple(x, self._divisors, self.pad_mode)
        return crop_to(self.forward_padded(xp), before, spatial)


# ------------------------------------------------------------------------------- skip concatenation
def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    return bool(
        module._forward_hooks or module._forward_pre_hooks or _m._global_forward_hooks
        or _m._global_forward_pre_hooks
    )


def forward_then_cat(module: nn.Module, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([skip, module(x)], 1)``, with the block that ends ``module`` writing into the concatenation.

    ``module`` is a chain of ``nn.Sequential`` whose last module may be an attention block with ``forward_cat``
    (:class:`medse.attention._base.ConcatOutput`): the chain runs up to that block, and the block's fused kernel
    writes its output straight into the concatenation and saves that, which the next convolution saves anyway.
    A block there would otherwise keep its own output for its backward pass: one activation more than the
    network without attention (MONAI's U-Net decoder stages and bottleneck; ``benchmarks/bench_memory.py``).
    Same numbers as ``torch.cat``. Containers or blocks with forward hooks (and global hooks) run as usual.
    """
    while isinstance(module, nn.Sequential) and len(module) > 0 and not _has_hooks(module):
        *head, module = module
        for m in head:
            x = m(x)
    cat = getattr(module, "forward_cat", None)
    if cat is None or _has_hooks(module):
        return torch.cat([skip, module(x)], 1)
    return cat(skip, x)


# --------------------------------------------------------------------- SD-Net / QuickNAT skeleton
class UnpoolingEncoderDecoder(PadCropMixin, nn.Module):
    """The encoder-decoder of SD-Net and QuickNAT: max-pool indices and unpooling, attention after every block.

    ``depth`` encoder blocks (each -> attention -> :meth:`_after_block` -> 2x max-pool keeping the indices, the
    pre-pool output being the skip), a bottleneck block -> attention, ``depth`` decoder blocks (max-unpool ->
    concat(skip, unpooled) -> block -> attention -> :meth:`_after_block`) and a 1x1 ``classifier`` that the
    subclass adds. Every block has ``num_filters`` output maps.
    """

    num_filters: int
    kernel_size: int
    depth: int
    classifier: nn.Module

    def _check_architecture(
        self, owner: str, num_filters: int | None, kernel_size: int | None, kernel_size_2d: int, depth: object
    ) -> tuple[int, int, int]:
        """Check and set ``num_filters`` (default 64 in 2D, 32 in 3D), ``kernel_size`` (default
        ``kernel_size_2d`` in 2D, 3 in 3D) and ``depth``; call after :meth:`_check_io`."""
        d = self.spatial_dims
        if num_filters is None:
            num_filters = 64 if d == 2 else 32
        f = check_int("num_filters", num_filters, 1, owner)
        k = check_kernel_size(owner, (kernel_size_2d if d == 2 else 3) if kernel_size is None else kernel_size)
        depth = check_int("depth", depth, 1, owner)
        self.num_filters, self.kernel_size, self.depth = f, k, depth
        return f, k, depth

    def _build_encoder_decoder(
        self, block: Callable[[int], nn.Module], in_channels: int, plan: AttentionPlan
    ) -> None:
        """Build the blocks (``block(in_channels)`` gives one with ``num_filters`` outputs), pools and attention,
        then record the attention choice (:meth:`AttentionPlan.install`)."""
        d, f, depth = self.spatial_dims, self.num_filters, self.depth
        self.encoders = nn.ModuleList(block(in_channels if i == 0 else f) for i in range(depth))
        self.encoder_attention = nn.ModuleList(plan.slot("encoder", f, f"encoder block {i}") for i in range(depth))
        self.pool = max_pool(d)(2, stride=2, return_indices=True)
        self.bottleneck = block(f)
        self.bottleneck_attention = plan.slot("bottleneck", f, "bottleneck")
        self.unpool = max_unpool(d)(2, stride=2)
        self.decoders = nn.ModuleList(block(2 * f) for _ in range(depth))
        self.decoder_attention = nn.ModuleList(plan.slot("decoder", f, f"decoder block {i}") for i in range(depth))
        plan.install(self)

    def _after_block(self, x: torch.Tensor) -> torch.Tensor:
        """Applied after every encoder and decoder block's attention (QuickNAT: channel dropout)."""
        return x

    def _unpool(self, x: torch.Tensor, indices: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Max-unpool ``x`` to the skip's size. Under ``torch.jit.trace`` the same scatter written out: MaxUnpool's
        size checks fail on the traced sizes (``cond must be a bool, but got a Tensor``), and an ``output_size``
        read there would freeze the traced size into the graph. Every encoder block has ``num_filters`` maps, so
        the output has the skip's shape."""
        if not torch.jit.is_tracing():
            return self.unpool(x, indices, output_size=skip.shape[2:])
        flat = torch.zeros_like(skip).flatten(2).scatter(2, indices.flatten(2), x.flatten(2))
        return flat.view_as(skip)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for enc, att in zip(self.encoders, self.encoder_attention, strict=True):
            x = self._after_block(att(enc(x)))
            skips.append(x)
            x, idx = self.pool(x)
            indices.append(idx)
        x = self.bottleneck_attention(self.bottleneck(x))
        for i, (dec, att) in enumerate(zip(self.decoders, self.decoder_attention, strict=True)):
            skip = skips[-1 - i]
            x = self._unpool(x, indices[-1 - i], skip)
            x = self._after_block(att(dec(torch.cat([skip, x], dim=1))))
        return self.classifier(x)
