"""The attention registry: names -> block classes with metadata, and the factory used by every network.

``create_attention(name, spatial_dims, in_channels, **kwargs)`` builds a block by name; ``"none"`` gives
``nn.Identity``; ``"a+b"`` builds the blocks in sequence (``nn.Sequential``, the survey's "hybrid" direction).
``list_attention()`` returns the metadata; ``min_channels(name, **kwargs)`` the smallest valid width.

Blocks join the registry with the :func:`register_attention` decorator in their own files: the built-ins in
their family's module (with their parameter formula beside them; :mod:`medse.attention` imports the modules,
and their import order is the order of :func:`list_attention` and ``medse blocks``), and user blocks in the
files the ``MEDSE_PLUGINS`` environment variable names (:mod:`medse.utils.plugins`, loaded on the first use of the
registry). This module imports no block, so a block module can import the decorator from it::

    from medse.attention import register_attention

    @register_attention("my_gate", paper="Me et al. 2025", year=2025, params_formula="C + 1")
    class MyGate(nn.Module):
        def __init__(self, spatial_dims: int, in_channels: int, *, reduction: int = 4) -> None: ...
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from medse.utils.errors import MedseError, did_you_mean
from medse.utils.plugins import ENV_VAR, load_plugins
from medse.utils.registry import Registry, keyword_arguments

# Keywords every block accepts through create_attention even where the block has no use for them:
# ``fused`` is a performance hint (dropped for blocks without a fast path).
_HINTS = ("fused",)


@dataclass(frozen=True)
class AttentionInfo:
    """Metadata of a registered attention block.

    Attributes:
        name: registry name.
        cls: the block class (``None`` for ``"none"``, built as ``nn.Identity``).
        paper: the paper (authors, title, venue).
        year: publication year.
        repo: the authors' (or reference) repository, empty if none.
        params_formula: the learnable-parameter formula, C = in_channels, r = reduction.
        spatial_dims: supported spatial dimensions.
        defaults: the keyword defaults create_attention applies for this name.
        extension: what is medse's own (not in the paper), empty if nothing.
        spatial_gate: True when the block has a spatial gate (``record_gate`` / ``last_gate``).
        departures: where medse departs from the paper or the authors' code, empty if nowhere.
        fused: True when the block takes the ``fused`` keyword (it has a fast path).
        params_fn: ``params_fn(C, spatial_dims, **kwargs) -> int``, the formula as a function (None: not given;
            the generated tests then skip the formula check).
        channel_rule: ``channel_rule(**kwargs) -> (lower, multiple)``: the widths the block accepts with these
            keyword arguments are the multiples of ``multiple`` that are at least ``lower`` (used by
            :func:`min_channels`).
    """

    name: str
    cls: type[nn.Module] | None
    paper: str
    year: int
    repo: str
    params_formula: str
    spatial_dims: tuple[int, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    extension: str = ""
    spatial_gate: bool = False
    departures: str = ""
    fused: bool = False
    params_fn: Callable[..., int] | None = None
    channel_rule: Callable[..., tuple[int, int]] | None = field(default=None, repr=False, compare=False)


def reduction_rule(reduction: float | None = None, **_: Any) -> tuple[int, int]:
    """Blocks with a hidden layer of C // r units: C >= r (the default channel rule of a block taking
    ``reduction``)."""
    return (1 if reduction is None else math.ceil(reduction)), 1


def free_rule(**_: Any) -> tuple[int, int]:
    """Any width (the default channel rule of a block without ``reduction``)."""
    return 1, 1


def _block_class(info: AttentionInfo) -> object:
    return info.cls


_REGISTRY: Registry[AttentionInfo] = Registry(
    "attention block", decorator="register_attention", owner=_block_class, reserved=("none",), load=load_plugins,
    hint=f"Blocks of your own: name their module in {ENV_VAR}.",
)
_REGISTRY.add("none", AttentionInfo(
    name="none",
    cls=None,
    paper="no attention (baseline)",
    year=0,
    repo="",
    params_formula="0",
    spatial_dims=(1, 2, 3),
    params_fn=lambda c, d, **_: 0,
    channel_rule=free_rule,
))

_BlockT = TypeVar("_BlockT", bound=type[nn.Module])


def _accepted(cls: type[nn.Module]) -> set[str]:
    """The keyword-only options of a block class (what ``create_attention`` may pass it)."""
    return keyword_arguments(cls.__init__, keyword_only=True)[0]


def register_attention(
    name: str,
    *,
    paper: str,
    year: int,
    repo: str = "",
    params_formula: str = "",
    spatial_dims: Sequence[int] = (1, 2, 3),
    defaults: dict[str, Any] | None = None,
    extension: str = "",
    spatial_gate: bool | None = None,
    departures: str = "",
    params_fn: Callable[..., int] | None = None,
    channel_rule: Callable[..., tuple[int, int]] | None = None,
) -> Callable[[_BlockT], _BlockT]:
    """Class decorator registering an attention block under ``name`` with its :class:`AttentionInfo`.

    The block is then built by :func:`create_attention` (so by every network's ``attention=`` argument and
    every config's ``model.attention``), listed by :func:`list_attention` (``medse blocks``, ``medse compare``,
    the generated tests) and counted by :func:`min_channels`. Decorators stack: one class may be registered
    under several names with different defaults (``scse`` and ``scse_smp``).

    The class is built as ``cls(spatial_dims, in_channels, **kwargs)``; its options must be keyword-only.
    A block that records a spatial gate takes ``record_gate`` (and sets ``last_gate``); a block with a fast
    path takes ``fused``. Both are read from the signature.

    Args:
        name: registry name: lower case letters, digits and ``_``, starting with a letter; not ``none``.
        paper: the paper (authors, title, venue).
        year: publication year.
        repo: the authors' (or reference) repository. Defaults to "".
        params_formula: the learnable-parameter formula, for the docs (C = in_channels, r = reduction).
        spatial_dims: supported spatial dimensions, a subset of (1, 2, 3). Defaults to (1, 2, 3).
        defaults: keyword defaults :func:`create_attention` applies for this name (must be accepted by the
            class). Defaults to none.
        extension: what is medse's (or your) own, not in the paper. Defaults to "".
        spatial_gate: whether the block has a spatial gate. Defaults to: the class takes ``record_gate``.
        departures: where the block departs from the paper or the authors' code. Defaults to "".
        params_fn: ``params_fn(C, spatial_dims, **kwargs) -> int``, checked by the generated tests. Defaults to
            None (not checked).
        channel_rule: ``channel_rule(**kwargs) -> (lower, multiple)``; see :class:`AttentionInfo`. Defaults to:
            ``C >= ceil(reduction)`` if the class takes ``reduction``, else any width.

    Raises:
        ValueError: bad name, a name taken by another class, unsupported dimensions, a class that is not an
            ``nn.Module``, or defaults the class does not accept.
    """
    _REGISTRY.check_name(name)
    dims = tuple(int(d) for d in spatial_dims)
    if not dims or not set(dims) <= {1, 2, 3}:
        raise ValueError(f"register_attention('{name}'): spatial_dims must be a non-empty subset of (1, 2, 3), "
                         f"got {tuple(spatial_dims)!r}.")
    if isinstance(year, bool) or not isinstance(year, int):
        raise ValueError(f"register_attention('{name}'): year must be an integer, got {year!r}.")

    def decorator(cls: _BlockT) -> _BlockT:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"register_attention('{name}'): expected an nn.Module subclass, got {cls!r}.")
        _REGISTRY.check_free(name, cls)
        accepted = _accepted(cls)
        unknown = sorted(set(defaults or {}) - accepted)
        if unknown:
            raise ValueError(
                f"register_attention('{name}'): default '{unknown[0]}' is not a keyword-only argument of "
                f"{cls.__name__}.{did_you_mean(unknown[0], accepted)} Accepted: {', '.join(sorted(accepted)) or 'none'}."
            )
        rule = channel_rule or (reduction_rule if "reduction" in accepted else free_rule)
        _REGISTRY.add(name, AttentionInfo(
            name=name,
            cls=cls,
            paper=paper,
            year=year,
            repo=repo,
            params_formula=params_formula,
            spatial_dims=dims,
            defaults=dict(defaults or {}),
            extension=extension,
            spatial_gate=("record_gate" in accepted) if spatial_gate is None else bool(spatial_gate),
            departures=departures,
            fused="fused" in accepted,
            params_fn=params_fn,
            channel_rule=rule,
        ))
        return cls

    return decorator


def list_attention() -> dict[str, AttentionInfo]:
    """All registered blocks, name -> :class:`AttentionInfo` (composition names are not listed): the built-ins in
    registration order, then the blocks of the ``MEDSE_PLUGINS`` modules."""
    return dict(_REGISTRY)


def _split_names(name: object) -> list[str]:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"attention name must be a non-empty string, got {name!r}.")
    parts = [p.strip().lower() for p in name.split("+")]
    for p in parts:
        _REGISTRY.get_or_raise(p)
    if len(parts) > 1 and "none" in parts:
        raise ValueError(f"attention '{name}': 'none' cannot be combined with other blocks.")
    return parts


def _kwargs_for(parts: list[str], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Route keyword arguments to the parts of a (possibly composite) name.

    A keyword whose name is a part's name and whose value is a dict goes to that part only; any other keyword
    goes to every part that accepts it; a keyword no part accepts raises ValueError (``fused`` excepted).
    """
    per_part: list[dict[str, Any]] = [dict(_REGISTRY[p].defaults) for p in parts]
    shared = {k: v for k, v in kwargs.items() if not (k in parts and isinstance(v, dict))}
    for i, p in enumerate(parts):
        if p in kwargs and isinstance(kwargs[p], dict):
            per_part[i].update(kwargs[p])
    accepted = [_accepted(_REGISTRY[p].cls) for p in parts]  # type: ignore[arg-type]
    for key, value in shared.items():
        takers = [i for i, acc in enumerate(accepted) if key in acc]
        if not takers and key not in _HINTS:
            options = sorted(set().union(*accepted))
            raise ValueError(
                f"attention '{'+'.join(parts)}': unknown argument '{key}'.{did_you_mean(key, options)} "
                f"Accepted: {', '.join(options) or 'none'}."
            )
        for i in takers:
            per_part[i][key] = value
    for i, p in enumerate(parts):
        unknown = set(per_part[i]) - accepted[i]
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(
                f"attention '{p}': unknown argument '{key}'.{did_you_mean(key, accepted[i])} "
                f"Accepted: {', '.join(sorted(accepted[i])) or 'none'}."
            )
    return per_part


def create_attention(name: str, spatial_dims: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build an attention block by registry name.

    Args:
        name: a registered name (see :func:`list_attention`), or several joined by ``+`` (e.g. ``"eca+ca"``),
            built in sequence as an ``nn.Sequential``. ``"none"`` gives ``nn.Identity`` and ignores ``kwargs``.
        spatial_dims: number of spatial dimensions (1, 2 or 3; each block lists what it supports).
        in_channels: number of input (= output) channels.
        kwargs: block options. For a composition, ``{part_name: {...}}`` targets one part; other keywords go to
            every part accepting them. ``fused`` is a hint accepted by every block.

    Raises:
        ValueError: unknown name (with a suggestion), unknown option, or invalid arguments for the block.
    """
    parts = _split_names(name)
    if parts == ["none"]:
        if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
            raise ValueError(f"attention 'none': spatial_dims must be one of {{1, 2, 3}}, got {spatial_dims!r}.")
        return nn.Identity()
    for p in parts:
        dims = _REGISTRY[p].spatial_dims
        if isinstance(spatial_dims, bool) or spatial_dims not in dims:
            sup = ", ".join(map(str, dims))
            hint = " (Project & Excite is defined for volumes only)" if p == "pe" else ""
            raise ValueError(f"attention '{p}': spatial_dims must be one of {{{sup}}}, got {spatial_dims!r}{hint}.")
    blocks = [
        _REGISTRY[p].cls(spatial_dims, in_channels, **kw)  # type: ignore[misc]
        for p, kw in zip(parts, _kwargs_for(parts, kwargs), strict=True)
    ]
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


def min_channels(name: str, **kwargs: Any) -> int:
    """The smallest ``in_channels`` for which ``create_attention(name, ..., **kwargs)`` is valid.

    From each block's ``channel_rule`` (:class:`AttentionInfo`): the reduction (C // r >= 1) and FcaNet's
    divisibility by the number of frequencies; for a composition the smallest width valid for every part.
    """
    parts = _split_names(name)
    if parts == ["none"]:
        return 1
    per_part = _kwargs_for(parts, kwargs)
    lower = 1
    multiple = 1
    for p, kw in zip(parts, per_part, strict=True):
        rule = _REGISTRY[p].channel_rule or free_rule
        lo, mult = rule(**kw)
        lower = max(lower, int(lo))
        multiple = math.lcm(multiple, int(mult))
    return math.ceil(lower / multiple) * multiple


def check_run_blocks(attention: Any, run_dir: str | os.PathLike) -> None:
    """Check that every block a run's config names (``model.attention``: a name, ``a+b``, or a position ->
    block mapping) is registered; the run trained with them, so an unknown one is a plugin block.

    Raises:
        MedseError: ``Unknown attention block 'my_gate'`` plus the hint ``the run was trained with a plugin
            block: set MEDSE_PLUGINS=<what the run recorded>`` (or where to look when it recorded nothing).
    """
    values = attention.values() if isinstance(attention, dict) else str(attention).split(",")
    names = []
    for v in values:
        v = str(v).split("=", 1)[-1]  # "encoder=cse,decoder=scse" spelling
        names += [p.strip().lower() for p in v.split("+") if p.strip()]
    known = list_attention()
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    run_dir = Path(run_dir)
    recorded: list[str] = []
    try:
        recorded = [str(e) for e in json.loads((run_dir / "run_info.json").read_text()).get("medse_plugins") or []]
    except (OSError, ValueError, AttributeError):
        pass
    if recorded:
        hint = f"set {ENV_VAR}={os.pathsep.join(recorded)} (recorded in {run_dir / 'run_info.json'})"
    else:
        hint = f"set {ENV_VAR} to the module or .py file that registers it (the run did not record it)"
    raise MedseError(f"Unknown attention block '{unknown[0]}': the run was trained with a plugin block; {hint}",
                     run_dir / "config.yaml")
