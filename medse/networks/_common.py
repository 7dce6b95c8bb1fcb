"""Argument checks and registry helpers shared by medse's networks: ``ByDims`` defaults, ``check_*`` and
``class_builder`` (a registry builder derived from a network class).

Not public API. Attention placement lives in :mod:`medse.networks.placement`, layers and padding in
:mod:`medse.networks.layers`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from medse.networks.placement import takes_spec
from medse.utils.errors import unknown_option_error

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
    """``mode`` if it is one of :data:`PAD_MODES`, or ``ValueError`` with a suggestion."""
    if not isinstance(mode, str) or mode not in PAD_MODES:
        raise unknown_option_error(f"{owner} pad_mode", str(mode), PAD_MODES)
    return mode


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
    annotations; it binds its arguments and calls ``cls(spatial_dims, in_channels, out_channels, **rest)``. The
    class places its attention with :class:`medse.networks.placement.AttentionPlan`, so the builder takes
    ``create_model``'s :class:`~medse.networks.placement.AttentionSpec` as is (:func:`~medse.networks.placement.takes_spec`).
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
    return takes_spec(builder)
