"""Helpers shared by medse's segmentation networks: attention insertion, argument checks, pad-and-crop,
the SD-Net / QuickNAT encoder-decoder and registry builders derived from a network class.

Not public API; the networks import from here so that every network inserts attention, checks its
arguments and handles odd input sizes the same way.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from medse.attention import create_attention, list_attention
from medse.utils.errors import did_you_mean, unknown_option_error

#: The named places where a segmentation network can insert attention modules (the default set).
POSITIONS: tuple[str, ...] = ("encoder", "bottleneck", "decoder")
#: The transformer networks' extra position: their token features (``unetr``, ``swinunetr``).
TOKENS = "tokens"
#: Every position name a network may offer, in the order assignments are written.
ALL_POSITIONS: tuple[str, ...] = (*POSITIONS, TOKENS)
#: Padding modes accepted by the networks' ``pad_mode`` argument (``torch.nn.functional.pad`` modes).
PAD_MODES: tuple[str, ...] = ("constant", "replicate", "reflect", "circular")


@dataclass(frozen=True)
class ByDims:
    """A default that depends on ``spatial_dims``, e.g. ``ByDims({2: 7, 3: 3})`` for a kernel size.

    Used in :class:`medse.networks.ModelInfo` ``defaults``; ``resolve(spatial_dims)`` gives the value.
    """

    values: dict[int, Any]

    def resolve(self, spatial_dims: int) -> Any:
        return self.values[spatial_dims]

    def __repr__(self) -> str:
        return ", ".join(f"{k}D: {v!r}" for k, v in sorted(self.values.items()))


def resolve_default(value: Any, spatial_dims: int) -> Any:
    """``value.resolve(spatial_dims)`` for a :class:`ByDims`, else ``value`` itself."""
    return value.resolve(spatial_dims) if isinstance(value, ByDims) else value


def check_int(name: str, value: object, minimum: int = 1, owner: str = "") -> int:
    """``value`` as an int, or ``ValueError`` naming the argument when it is not an int >= ``minimum``."""
    prefix = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{prefix}{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_spatial_dims(owner: str, spatial_dims: object, supported: Sequence[int] = (2, 3)) -> int:
    """``spatial_dims`` as an int, or ``ValueError`` naming the supported values."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in supported:
        sup = ", ".join(str(d) for d in supported)
        raise ValueError(f"{owner}: spatial_dims must be one of {{{sup}}}, got {spatial_dims!r}.")
    return int(spatial_dims)


def check_dropout(owner: str, p: object) -> float:
    """A dropout probability in [0, 1), or ``ValueError``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{owner}: dropout must be a number in [0, 1), got {p!r}.")
    return float(p)


def check_kernel_size(owner: str, k: object) -> int:
    """An odd positive kernel size (so 'same' padding is k // 2), or ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"{owner}: kernel_size must be an odd positive integer, got {k!r}.")
    return int(k)


def check_pad_mode(owner: str, mode: object) -> str:
    if not isinstance(mode, str) or mode not in PAD_MODES:
        raise unknown_option_error(f"{owner} pad_mode", str(mode), PAD_MODES)
    return mode


def normalize_positions(owner: str, positions: object, allowed: Sequence[str] = POSITIONS) -> tuple[str, ...]:
    """``attention_positions`` as a tuple of known names (a single string is accepted as one position)."""
    if positions is None:
        return tuple(allowed)
    if isinstance(positions, str):
        positions = (positions,)
    if not isinstance(positions, (list, tuple, set, frozenset)):
        raise ValueError(f"{owner}: attention_positions must be a sequence of names from {tuple(allowed)}, "
                         f"got {positions!r}.")
    out: list[str] = []
    for p in positions:
        if not isinstance(p, str) or p not in allowed:
            raise unknown_option_error(f"attention position for {owner}", str(p), allowed)
        if p not in out:
            out.append(p)
    return tuple(out)


def make_attention(
    attention: str,
    spatial_dims: int,
    channels: int,
    kwargs: dict[str, Any] | None,
    where: str,
) -> nn.Module | None:
    """Build one attention module for a feature map with ``channels`` channels, tagged ``_medse_attention``.

    Returns ``None`` for ``attention="none"`` (the network then inserts nothing, so its state dict has no
    extra keys). Errors from the block library (e.g. a reduction larger than the width) are re-raised as
    ``ValueError`` naming ``where`` (network, position and stage) and the channel count.
    """
    if attention is None or attention == "none":
        return None
    try:
        module = create_attention(attention, spatial_dims, channels, **(kwargs or {}))
    except ValueError as e:
        raise ValueError(f"{where} ({channels} channels): cannot build attention '{attention}': {e}") from e
    if isinstance(module, nn.Identity):
        return None
    module._medse_attention = True
    return module


#: ``att(position, channels, where)``: an attention module for a feature map, ``nn.Identity()`` when none.
AttentionFactory = Callable[[str, int, str], nn.Module]


def attention_factory(
    owner: str,
    attention: str,
    spatial_dims: int,
    positions: Sequence[str],
    kwargs: dict[str, Any] | None,
) -> AttentionFactory:
    """``att(position, channels, where)`` building one attention module per call with :func:`make_attention`.

    Gives ``nn.Identity()`` when ``position`` is not in ``positions`` or the block inserts nothing, so a
    network can store the result unconditionally; errors name ``f"{owner} {where}"``.
    """

    def att(position: str, channels: int, where: str) -> nn.Module:
        if position not in positions:
            return nn.Identity()
        m = make_attention(attention, spatial_dims, channels, kwargs, f"{owner} {where}")
        return nn.Identity() if m is None else m

    return att


def with_attention(layer: nn.Module, attention: nn.Module | None) -> nn.Module:
    """``nn.Sequential(layer, attention)``, or ``layer`` unchanged when ``attention`` is ``None``."""
    return layer if attention is None else nn.Sequential(layer, attention)


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


def conv(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def conv_transpose(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


def batch_norm(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


def max_pool(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]


def max_unpool(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.MaxUnpool1d, 2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}[spatial_dims]


def channel_dropout(spatial_dims: int) -> type[nn.Module]:
    """Dropout of whole feature maps (``nn.Dropout2d`` / ``nn.Dropout3d``), as in Jégou et al. and QuickNAT."""
    return {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}[spatial_dims]


class PadCropMixin:
    """``forward(x)`` pads ``x`` to a multiple of ``self._divisors``, runs ``forward_padded``, crops back.

    Networks set ``self._divisors`` (per-axis), ``self.size_divisor`` (their lcm) and ``self.pad_mode``,
    usually through :meth:`_check_io` and :meth:`_setup_attention`.
    """

    _divisors: tuple[int, ...]
    pad_mode: str
    spatial_dims: int
    size_divisor: int
    attention: str
    attention_positions: tuple[str, ...]

    def _check_io(self, owner: str, spatial_dims: object, in_channels: object, out_channels: object) -> int:
        """Check the arguments every network has; sets and returns ``self.spatial_dims`` (2 or 3)."""
        d = self.spatial_dims = check_spatial_dims(owner, spatial_dims)
        check_int("in_channels", in_channels, 1, owner)
        check_int("out_channels", out_channels, 1, owner)
        return d

    def _setup_attention(
        self,
        owner: str,
        attention: str,
        attention_positions: object,
        attention_kwargs: dict[str, Any] | None,
        pad_mode: object,
        pools: int,
    ) -> AttentionPlan:
        """Check positions and ``pad_mode``, set the attention and padding attributes, return the plan.

        Sets ``pad_mode``, ``attention``, ``attention_positions`` and, for a network with ``pools`` 2x
        poolings along every axis, ``_divisors`` and ``size_divisor = 2 ** pools``. The network calls the plan
        (``plan(position, channels, where)``) for every site and :meth:`_finish_attention` at the end.
        """
        plan = AttentionPlan(owner, attention, attention_positions, attention_kwargs, self.spatial_dims)
        self.pad_mode = check_pad_mode(owner, pad_mode)
        self.attention = parse_assignment("none" if attention is None else attention)
        self.attention_positions = tuple(plan.assignment) if isinstance(self.attention, str) else ()
        self._divisors = (2**pools,) * self.spatial_dims
        self.size_divisor = 2**pools
        return plan

    def _finish_attention(self, plan: AttentionPlan) -> None:
        """Reject stage keys that matched no stage; set ``attention_sites`` (site -> block)."""
        self.attention_sites = plan.finish()

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
        self, block: Callable[[int], nn.Module], in_channels: int, att: AttentionPlan
    ) -> None:
        """Build the blocks (``block(in_channels)`` gives one with ``num_filters`` outputs), pools and attention."""
        d, f, depth = self.spatial_dims, self.num_filters, self.depth
        self.encoders = nn.ModuleList(block(in_channels if i == 0 else f) for i in range(depth))
        self.encoder_attention = nn.ModuleList(att("encoder", f, f"encoder block {i}") for i in range(depth))
        self.pool = max_pool(d)(2, stride=2, return_indices=True)
        self.bottleneck = block(f)
        self.bottleneck_attention = att("bottleneck", f, "bottleneck")
        self.unpool = max_unpool(d)(2, stride=2)
        self.decoders = nn.ModuleList(block(2 * f) for _ in range(depth))
        self.decoder_attention = nn.ModuleList(att("decoder", f, f"decoder block {i}") for i in range(depth))
        self._finish_attention(att)

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


#: Arguments a registered builder takes first, in this order (the registry passes them by keyword).
BUILDER_HEAD: tuple[str, ...] = (
    "spatial_dims", "in_channels", "out_channels", "attention", "attention_positions", "attention_kwargs",
)

M = TypeVar("M", bound=nn.Module)


def class_builder(cls: type[M], name: str) -> Callable[..., M]:
    """A registry builder function ``name(...)`` for the network class ``cls`` without re-typing its signature.

    The builder's signature is the constructor's with :data:`BUILDER_HEAD` first and every argument
    positional-or-keyword (``name(spatial_dims, in_channels, out_channels, attention, attention_positions,
    attention_kwargs, <architecture arguments in the constructor's order>)``), the same defaults and
    annotations; it binds its arguments and calls ``cls(spatial_dims, in_channels, out_channels, **rest)``.
    """
    params = inspect.signature(cls).parameters
    head = [params[n] for n in BUILDER_HEAD]
    rest = [p for n, p in params.items() if n not in BUILDER_HEAD]
    signature = inspect.Signature(
        [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in head + rest],
        return_annotation=cls.__name__,
    )

    def builder(*args: Any, **kwargs: Any) -> M:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        return cls(arguments.pop("spatial_dims"), arguments.pop("in_channels"), arguments.pop("out_channels"),
                   **arguments)

    builder.__signature__ = signature  # type: ignore[attr-defined]
    builder.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    builder.__annotations__["return"] = signature.return_annotation
    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = cls.__module__
    builder.__doc__ = f"Build :class:`{cls.__name__}` (registered as ``{name}``)."
    return builder


# ------------------------------------------------------------------------------ per-position attention
def _is_stage_key(key: str) -> bool:
    base, dot, stage = key.partition(".")
    return bool(dot) and base in ALL_POSITIONS and stage.isdigit()


def parse_assignment(attention: object) -> str | dict[str, str]:
    """``attention`` as one block name (``str``) or a position -> block mapping (``dict``).

    Accepts a block name (``"scse"``, ``"eca+ca"``, ``"none"``), a mapping ``{"encoder": "cse", "decoder.0":
    "scse"}``, or the mapping written as ``"encoder=cse,decoder.0=scse"`` (the form tables and folder names use,
    see :func:`format_assignment`). Names are stripped and lower-cased; a mapping is returned as a new dict.

    Raises:
        ValueError: not a string or mapping of strings, or a malformed ``key=value`` list.
    """
    if isinstance(attention, Mapping):
        out: dict[str, str] = {}
        for k, v in attention.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k.strip() or not v.strip():
                raise ValueError(f"attention mapping must map position names to block names, got {k!r}: {v!r}.")
            out[k.strip().lower()] = v.strip().lower()
        if not out:
            raise ValueError("attention mapping is empty; use 'none' for no attention.")
        return out
    if not isinstance(attention, str) or not attention.strip():
        raise ValueError(f"attention must be a block name such as 'scse' or 'none', or a mapping position -> block, "
                         f"got {attention!r}.")
    text = attention.strip().lower()
    if "=" not in text:
        return text
    out = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"attention '{attention}': expected position=block pairs separated by commas "
                             f"(e.g. 'encoder=cse,decoder=scse'), got '{item.strip()}'.")
        if key in out:
            raise ValueError(f"attention '{attention}': position '{key}' is given twice.")
        out[key] = value
    return out


def _key_order(key: str) -> tuple[int, int]:
    base, _, stage = key.partition(".")
    rank = ALL_POSITIONS.index(base) if base in ALL_POSITIONS else len(ALL_POSITIONS)
    return rank, (int(stage) + 1 if stage.isdigit() else 0)


def format_assignment(attention: object) -> str:
    """The readable, canonical name of an attention choice, e.g. ``"encoder=cse,decoder=scse"``.

    A single block name is returned as is (``"scse"``); a mapping is written ``position=block`` in network order
    (encoder, bottleneck, decoder, tokens; a position before its stages), comma-separated. The result is accepted
    by :func:`parse_assignment` (and so by ``create_model``, configs and the command line).
    """
    parsed = parse_assignment(attention)
    if isinstance(parsed, str):
        return parsed
    return ",".join(f"{k}={parsed[k]}" for k in sorted(parsed, key=lambda k: (_key_order(k), k)))


def assignment_blocks(attention: object) -> list[str]:
    """The distinct block names an attention choice uses (``"none"`` included when given), in first-use order."""
    parsed = parse_assignment(attention)
    values = [parsed] if isinstance(parsed, str) else list(parsed.values())
    return list(dict.fromkeys(values))


def _accepted_block_kwargs(block: str) -> set[str] | None:
    """Keyword arguments any part of ``block`` accepts (``None`` when the block library cannot say)."""
    infos = list_attention()
    out: set[str] = set()
    for part in block.split("+"):
        info = infos.get(part.strip())
        if info is None or info.cls is None:
            continue
        params = inspect.signature(info.cls.__init__).parameters.values()
        out |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return out | {"fused"}


class AttentionPlan:
    """Which block goes where in one network: resolves position/stage sites against an attention choice.

    The choice is one block name applied at ``positions`` (the historic ``attention`` + ``attention_positions``
    pair), or a mapping from positions to blocks. Keys are a position (``"encoder"``: every encoder stage) or a
    stage (``"encoder.1"``: the second encoder stage in the order the data passes the stages); a stage key wins
    over its position's key; a site no key names gets no attention. Stages are counted from 0 in data-flow order
    (``encoder.0`` is the first, highest-resolution encoder stage, ``decoder.0`` the first, deepest decoder stage).

    A network calls :meth:`make` (or the plan itself, the :data:`AttentionFactory` form) once per place where it
    can insert attention, then :meth:`finish`, which rejects stage keys that matched no stage, listing the
    network's sites. ``sites`` maps every site (``"encoder.0"``, ..., ``"bottleneck"``) to its block.

    Attention keyword arguments: with one block (or one block everywhere) ``kwargs`` go to it unchanged; with
    several different blocks each gets the keywords it accepts (``{"eca": {...}}`` targets one block), and a
    keyword no chosen block accepts is an error.
    """

    def __init__(
        self,
        owner: str,
        attention: object,
        positions: object,
        kwargs: dict[str, Any] | None,
        spatial_dims: int,
        allowed: Sequence[str] = POSITIONS,
    ) -> None:
        self.owner, self.spatial_dims, self.allowed = owner, spatial_dims, tuple(allowed)
        parsed = parse_assignment("none" if attention is None else attention)
        self.kwargs = dict(kwargs or {})
        if isinstance(parsed, str):
            self.assignment = {p: parsed for p in normalize_stage_positions(owner, positions, self.allowed)}
        else:
            for key in parsed:
                _check_position_key(owner, key, self.allowed)
            self.assignment = parsed
        self.sites: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        blocks = {b for b in self.assignment.values() if b != "none"}
        self._split_kwargs = len(blocks) > 1
        if self._split_kwargs:
            accepted = {b: _accepted_block_kwargs(b) for b in blocks}
            if all(a is not None for a in accepted.values()):
                names = {part.strip() for b in blocks for part in b.split("+")}
                for key, value in self.kwargs.items():
                    if key in names and isinstance(value, dict):
                        continue
                    if not any(key in a for a in accepted.values()):  # type: ignore[operator]
                        raise ValueError(f"{owner}: attention argument '{key}' is accepted by none of the chosen "
                                         f"blocks ({', '.join(sorted(blocks))}).")
            self._accepted = accepted

    @property
    def is_none(self) -> bool:
        """True when no site can get a block."""
        return all(b == "none" for b in self.assignment.values())

    def block_for(self, position: str, stage: int | None) -> str:
        """The block of a site (``"none"`` when no key names it)."""
        if stage is not None and f"{position}.{stage}" in self.assignment:
            return self.assignment[f"{position}.{stage}"]
        return self.assignment.get(position, "none")

    def _kwargs_for(self, block: str) -> dict[str, Any]:
        if not self._split_kwargs:
            return self.kwargs
        accepted = self._accepted.get(block)
        if accepted is None:
            return self.kwargs
        parts = {part.strip() for part in block.split("+")}
        return {k: v for k, v in self.kwargs.items()
                if k in accepted or (k in parts and isinstance(v, dict))}

    def make(self, position: str, channels: int, where: str, stage: int | None = None) -> nn.Module | None:
        """The attention module of one site, tagged ``_medse_attention``; ``None`` when it gets none.

        ``stage`` defaults to the number of earlier sites of ``position`` (``None`` for the bottleneck, which has
        one site).
        """
        if position not in self.allowed:
            raise ValueError(f"{self.owner}: internal error: position '{position}' not in {self.allowed}.")
        if stage is None and position != "bottleneck":
            stage = self._counts.get(position, 0)
        self._counts[position] = self._counts.get(position, 0) + 1
        site = position if stage is None else f"{position}.{stage}"
        block = self.block_for(position, stage)
        self.sites[site] = block
        module = make_attention(block, self.spatial_dims, channels, self._kwargs_for(block), f"{self.owner} {where}")
        if module is not None:
            module._medse_site = site  # the position name ("encoder.0", "bottleneck") medse explain shows
        return module

    def __call__(self, position: str, channels: int, where: str, stage: int | None = None) -> nn.Module:
        m = self.make(position, channels, where, stage)
        return nn.Identity() if m is None else m

    def finish(self) -> dict[str, str]:
        """Check that every stage key named a stage of the network; returns ``sites`` in network order."""
        unused = [k for k in self.assignment if "." in k and k not in self.sites]
        if unused:
            raise ValueError(
                f"{self.owner}: unknown attention position '{unused[0]}'; this {self.owner} has positions "
                f"{', '.join(self.positions())}."
            )
        self.sites = dict(sorted(self.sites.items(), key=lambda kv: _key_order(kv[0])))
        return self.sites

    def install(self, network: nn.Module, attention: object) -> None:
        """:meth:`finish`, then record the choice on ``network``: ``attention`` (parsed), ``attention_positions``
        (the positions of a single block; empty for a mapping) and ``attention_sites`` (site -> block)."""
        network.attention = parse_assignment("none" if attention is None else attention)
        network.attention_positions = tuple(self.assignment) if isinstance(network.attention, str) else ()
        network.attention_sites = self.finish()

    def positions(self) -> list[str]:
        """The position names this network accepts: its positions, each followed by its stages."""
        out: list[str] = []
        for p in self.allowed:
            out.append(p)
            out += sorted((s for s in self.sites if s.startswith(p + ".")), key=_key_order)
        return out


def _check_position_key(owner: str, key: str, allowed: Sequence[str]) -> None:
    base = key.partition(".")[0]
    if key in allowed or (_is_stage_key(key) and base in allowed and base != "bottleneck"):
        return
    stages = [f"{p}.N" for p in allowed if p != "bottleneck"]
    hint = did_you_mean(base, allowed) if base not in allowed else ""
    raise ValueError(f"{owner}: unknown attention position '{key}';{hint} {owner} has positions "
                     f"{', '.join([*allowed, *stages])} (N = stage index from 0).")


def normalize_stage_positions(owner: str, positions: object, allowed: Sequence[str] = POSITIONS) -> tuple[str, ...]:
    """``attention_positions`` as a tuple of position or stage names (``"encoder"``, ``"decoder.1"``).

    ``None`` means every position in ``allowed``; a single string is one position.
    """
    if positions is None:
        return tuple(allowed)
    if isinstance(positions, str):
        positions = (positions,)
    if not isinstance(positions, (list, tuple, set, frozenset)):
        raise ValueError(f"{owner}: attention_positions must be a sequence of names from {tuple(allowed)}, "
                         f"got {positions!r}.")
    out: list[str] = []
    for p in positions:
        if not isinstance(p, str):
            raise unknown_option_error(f"attention position for {owner}", str(p), allowed)
        p = p.strip().lower()
        if p not in allowed and not _is_stage_key(p):
            raise unknown_option_error(f"attention position for {owner}", p, allowed)
        _check_position_key(owner, p, allowed)
        if p not in out:
            out.append(p)
    return tuple(out)


# ------------------------------------------------------------------ attaching attention to MONAI modules
#: Name of the submodule :func:`attach_attention` adds to a MONAI block.
ATTACHED = "medse_attention"


def _run_attached(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the block's output passed through the attention module attached to it."""
    return getattr(module, ATTACHED)(output)


def attach_attention(module: nn.Module, attention: nn.Module | None) -> nn.Module:
    """Make ``module`` apply ``attention`` to its output, keeping the module (and its state-dict keys) in place.

    ``attention`` becomes the submodule ``module.medse_attention`` (keys ``<module>.medse_attention.*`` are
    added, the MONAI keys stay, so MONAI weights load with ``strict=False``) and a forward hook on ``module``
    returns ``attention(output)``. The hook is a module-level function that looks the submodule up on the module
    it is called for, so ``copy.deepcopy`` and pickling give working copies. ``None`` leaves ``module`` alone.
    Works for blocks with any call signature (MONAI's up-blocks take ``(x, skip)``). An ``nn.Sequential`` runs
    every child in order, so there the submodule is appended and no hook is needed (it would run it twice).
    """
    if attention is None:
        return module
    if hasattr(module, ATTACHED):
        raise ValueError(f"{type(module).__name__} already has attention attached.")
    module.add_module(ATTACHED, attention)
    if not isinstance(module, nn.Sequential):
        module.register_forward_hook(_run_attached)
    return module


class TokenAttention(nn.Module):
    """Applies a feature-map block to transformer token features by viewing the tokens as their spatial grid.

    * ``grid`` given (ViT tokens ``(B, N, D)`` with ``N = prod(grid)``, row-major as MONAI's patch embedding and
      UNETR's ``proj_feat`` order them): ``(B, N, D) -> (B, D, *grid) -> block -> (B, N, D)``;
    * ``grid=None`` (Swin tokens, channels last ``(B, *S, D)``): ``-> (B, D, *S) -> block -> (B, *S, D)``.

    With ``block = cSE`` this is the token channel gate of medse's SQET-style position: ``z = mean_n t_n``,
    ``s = sigmoid(W2 relu(W1 z))``, ``t_n' = t_n * s`` (see :mod:`medse.networks.transformers`).
    """

    def __init__(self, block: nn.Module, grid: Sequence[int] | None = None) -> None:
        super().__init__()
        self.block = block
        self.grid = None if grid is None else tuple(int(g) for g in grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            b, n, d = x.shape
            y = self.block(x.transpose(1, 2).reshape(b, d, *self.grid))
            return y.reshape(b, d, n).transpose(1, 2).contiguous()
        k = x.ndim
        to_first = (0, k - 1, *range(1, k - 1))
        to_last = (0, *range(2, k), 1)
        return self.block(x.permute(to_first)).permute(to_last).contiguous()
