"""Attention placement: which block goes where in a network, parsed once and inserted one way.

* :class:`AttentionSpec` is the choice, immutable, parsed once from a block name (``"scse"``, ``"eca+ca"``,
  ``"none"``), a mapping position -> block (``{"encoder": "cse", "decoder.0": "scse"}``) or the same mapping as
  command-line text (``"encoder=cse,decoder.0=scse"``, the canonical form :meth:`AttentionSpec.format` writes and
  tables, folder names and every ``--attention`` option use). ``AttentionSpec.parse`` returns an
  ``AttentionSpec`` unchanged, so the choice is parsed where it enters (``create_model``, a network's
  constructor, a command line) and passed on as is.
* :class:`AttentionPlan` resolves a spec against one network while the network is built: the block of each site
  (``"encoder.0"``, ``"bottleneck"``, ``"decoder.1"``, ...), its keyword arguments, the one insertion API
  (:meth:`AttentionPlan.wrap`, :meth:`AttentionPlan.attach`, :meth:`AttentionPlan.slot`) and
  :meth:`AttentionPlan.install`, the one place that records the choice on the network (``attention``,
  ``attention_positions``, ``attention_sites``).

Positions and stages: a key is a position (``"encoder"``: every encoder stage) or a stage (``"encoder.1"``: the
second encoder stage in data-flow order; ``encoder.0`` is the first, highest-resolution encoder stage,
``decoder.0`` the first, deepest decoder stage); a stage key wins over its position's key; a site no key names
gets no attention. A single block name goes to every position in ``attention_positions``.

Why the state-dict keys differ by network family (kept so that old checkpoints and the base networks' weights
load; the insertion API hides the difference from the networks):

* medse's U-Net is built through MONAI's ``UNet`` layer hooks: :meth:`AttentionPlan.wrap` returns
  ``nn.Sequential(layer, block)`` for the hook to return, so the block is the layer's sibling (``...1.*``) and
  the keys of a network without attention are MONAI's;
* MONAI's other networks (DynUNet, SegResNet, UNETR, SwinUNETR) are built by MONAI, then
  :meth:`AttentionPlan.attach` adds the block as the submodule ``<module>.medse_attention`` with a forward hook:
  every MONAI key stays, only ``*.medse_attention.*`` keys are added (MONAI weights load with ``strict=False``);
* networks written in medse (FC-DenseNet, SD-Net, QuickNAT), nnU-Net's U-Nets
  (:mod:`medse.integrations.nnunet.networks`) and ResNet50V2 store the block where their own ``forward`` calls
  it: :meth:`AttentionPlan.slot` gives the module, ``nn.Identity()`` (no parameters) where a site gets none.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from medse.attention import create_attention, list_attention
from medse.utils.errors import did_you_mean, unknown_option_error

__all__ = [
    "ALL_POSITIONS",
    "ATTACHED",
    "POSITIONS",
    "TOKENS",
    "AttentionPlan",
    "AttentionSpec",
    "TokenAttention",
    "assignment_blocks",
    "build_attention",
    "check_position_key",
    "cli_choices",
    "format_assignment",
    "parse_assignment",
    "position_blocks",
    "takes_spec",
]

#: The named places where a segmentation network can insert attention modules (the default set).
POSITIONS: tuple[str, ...] = ("encoder", "bottleneck", "decoder")
#: The transformer networks' extra position: their token features (``unetr``, ``swinunetr``).
TOKENS = "tokens"
#: Every position name a network may offer, in the order assignments are written.
ALL_POSITIONS: tuple[str, ...] = (*POSITIONS, TOKENS)
#: Name of the submodule :meth:`AttentionPlan.attach` adds to a MONAI block.
ATTACHED = "medse_attention"


def _is_stage_key(key: str) -> bool:
    base, dot, stage = key.partition(".")
    return bool(dot) and base in ALL_POSITIONS and stage.isdigit()


def _key_order(key: str) -> tuple[int, int]:
    base, _, stage = key.partition(".")
    rank = ALL_POSITIONS.index(base) if base in ALL_POSITIONS else len(ALL_POSITIONS)
    return rank, (int(stage) + 1 if stage.isdigit() else 0)


def check_position_key(owner: str, key: str, allowed: Sequence[str]) -> None:
    """``ValueError`` (one line, with a suggestion and the positions) unless ``key`` is a position in ``allowed``
    or a stage ``<position>.<N>`` of one (the bottleneck has no stages)."""
    base = key.partition(".")[0]
    if key in allowed or (_is_stage_key(key) and base in allowed and base != "bottleneck"):
        return
    stages = [f"{p}.N" for p in allowed if p != "bottleneck"]
    hint = did_you_mean(base, allowed) if base not in allowed else ""
    raise ValueError(f"{owner}: unknown attention position '{key}';{hint} {owner} has positions "
                     f"{', '.join([*allowed, *stages])} (N = stage index from 0).")


def _normalize_positions(owner: str, positions: object, allowed: Sequence[str], stages: bool = True
                         ) -> tuple[str, ...]:
    """``attention_positions`` as a tuple of position or stage names (``"encoder"``, ``"decoder.1"``).

    ``None`` means every position in ``allowed``; a single string is one position. ``stages=False`` (networks
    whose positions have no stages, nnU-Net's): names exactly as in ``allowed``, no stage names.
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
        if stages:
            p = p.strip().lower()
        if p not in allowed and not (stages and _is_stage_key(p)):
            raise unknown_option_error(f"attention position for {owner}", p, allowed)
        if stages:
            check_position_key(owner, p, allowed)
        if p not in out:
            out.append(p)
    return tuple(out)


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


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which attention block goes where: one block name, or a mapping position/stage -> block. Immutable.

    Build it with :meth:`parse`. ``block`` is the block of a single-block choice (``None`` for a mapping);
    ``assignment`` the mapping's ``(key, block)`` pairs in the order given (``()`` for a single block);
    ``positions`` where a single block goes once :meth:`place` has checked them against a network (``None``: not
    placed, every position of the network). Names are stripped and lower-cased.
    """

    block: str | None = "none"
    assignment: tuple[tuple[str, str], ...] = ()
    positions: tuple[str, ...] | None = None
    #: True for the resolved choice of a network whose positions have no stages (:func:`position_blocks`).
    flat: bool = False
    #: The network positions :meth:`place` checked this spec against (``None``: not placed yet).
    placed_in: tuple[str, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, attention: object) -> AttentionSpec:
        """The spec of ``attention``: an ``AttentionSpec`` (returned as is), a block name (``"scse"``, ``"eca+ca"``,
        ``"none"``), a mapping ``{"encoder": "cse", "decoder.0": "scse"}`` or the mapping as text
        ``"encoder=cse,decoder.0=scse"``.

        Raises:
            ValueError: not a string or mapping of strings, an empty mapping, a malformed ``key=value`` list or a
                key given twice.
        """
        if isinstance(attention, AttentionSpec):
            return attention
        if isinstance(attention, Mapping):
            out: dict[str, str] = {}
            for k, v in attention.items():
                if not isinstance(k, str) or not isinstance(v, str) or not k.strip() or not v.strip():
                    raise ValueError(f"attention mapping must map position names to block names, got {k!r}: {v!r}.")
                out[k.strip().lower()] = v.strip().lower()
            if not out:
                raise ValueError("attention mapping is empty; use 'none' for no attention.")
            return cls(block=None, assignment=tuple(out.items()))
        if not isinstance(attention, str) or not attention.strip():
            raise ValueError(f"attention must be a block name such as 'scse' or 'none', or a mapping position -> "
                             f"block, got {attention!r}.")
        text = attention.strip().lower()
        if "=" not in text:
            return cls(block=text)
        out = {}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key or not value:
                raise ValueError(f"attention '{attention}': expected position=block pairs separated by commas "
                                 f"(e.g. 'encoder=cse,decoder=scse'), got '{item.strip()}'.")
            if key in out:
                raise ValueError(f"attention '{attention}': position '{key}' is given twice.")
            out[key] = value
        return cls(block=None, assignment=tuple(out.items()))

    # ------------------------------------------------------------------------------------------ reading
    @property
    def is_mapping(self) -> bool:
        """True for a per-position mapping, False for one block name."""
        return self.block is None

    @property
    def choice(self) -> str | dict[str, str]:
        """The choice as plain data: the block name, or a new dict position -> block."""
        return self.block if self.block is not None else dict(self.assignment)

    @property
    def blocks(self) -> list[str]:
        """The distinct block names the choice uses (``"none"`` included when given), in first-use order."""
        values = [self.block] if self.block is not None else [b for _, b in self.assignment]
        return list(dict.fromkeys(values))

    def format(self) -> str:
        """The readable, canonical name of the choice, e.g. ``"encoder=cse,decoder=scse"``.

        A single block name is returned as is (``"scse"``); a mapping is written ``position=block`` in network order
        (encoder, bottleneck, decoder, tokens; a position before its stages), comma-separated. :meth:`parse` reads it.
        """
        if self.block is not None:
            return self.block
        return ",".join(f"{k}={b}" for k, b in sorted(self.assignment, key=lambda kb: (_key_order(kb[0]), kb[0])))

    def __str__(self) -> str:
        return self.format()

    def key_blocks(self, allowed: Sequence[str]) -> dict[str, str]:
        """Key -> block as a network with positions ``allowed`` sees it: a mapping's pairs, or the single block at
        ``positions`` (every position in ``allowed`` when not placed)."""
        if self.block is None:
            return dict(self.assignment)
        return {p: self.block for p in (self.positions if self.positions is not None else allowed)}

    def block_for(self, site: str, stage: int | None = None) -> str:
        """The block of a site, ``block_for("encoder.1")`` or ``block_for("encoder", 1)`` (``"none"`` when no key
        names it). A stage key wins over its position's key."""
        position, dot, index = site.partition(".")
        if dot:
            stage = int(index)
        if self.block is not None and self.positions is None:
            return self.block
        keys = self.key_blocks(())
        if stage is not None and f"{position}.{stage}" in keys:
            return keys[f"{position}.{stage}"]
        return keys.get(position, "none")

    def kwargs_for(self, block: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """The keyword arguments of ``block`` out of ``attention_kwargs``.

        With one block (or one block everywhere) every keyword goes to it unchanged; with several different blocks
        each gets the keywords it accepts, and ``{"eca": {...}}`` targets one block.
        """
        kwargs = dict(kwargs or {})
        accepted = self._accepted_kwargs
        if accepted is None or accepted.get(block) is None:
            return kwargs
        parts = {part.strip() for part in block.split("+")}
        return {k: v for k, v in kwargs.items() if k in accepted[block] or (k in parts and isinstance(v, dict))}

    def check_kwargs(self, owner: str, kwargs: Mapping[str, Any] | None) -> None:
        """``ValueError`` for a keyword no chosen block accepts (checked only when the choice has several blocks)."""
        accepted = self._accepted_kwargs
        if accepted is None or any(a is None for a in accepted.values()):
            return
        names = {part.strip() for b in accepted for part in b.split("+")}
        for key, value in (kwargs or {}).items():
            if key in names and isinstance(value, dict):
                continue
            if not any(key in a for a in accepted.values()):  # type: ignore[operator]
                raise ValueError(f"{owner}: attention argument '{key}' is accepted by none of the chosen "
                                 f"blocks ({', '.join(sorted(accepted))}).")

    @functools.cached_property
    def _accepted_kwargs(self) -> dict[str, set[str] | None] | None:
        """Block -> the keywords it accepts when the choice has several different blocks, else ``None``."""
        blocks = {b for b in self.blocks if b != "none"}
        if len(blocks) < 2:
            return None
        return {b: _accepted_block_kwargs(b) for b in blocks}

    # ------------------------------------------------------------------------------------------ checking
    def check_blocks(self, owner: str, spatial_dims: int) -> None:
        """``ValueError`` unless every block (and every part of a composition) is registered and supports
        ``spatial_dims``; ``owner`` starts the spatial-dims message."""
        blocks = list_attention()
        for name in self.blocks:
            if name == "none":
                continue
            for part in name.split("+"):
                part = part.strip()
                if part not in blocks:
                    raise unknown_option_error("attention block", part, sorted({*blocks, "none"}))
                supported = tuple(getattr(blocks[part], "spatial_dims", (2, 3)))
                if spatial_dims not in supported:
                    raise ValueError(f"{owner}: attention block '{part}' supports spatial_dims {supported}, "
                                     f"got spatial_dims={spatial_dims}.")

    def place(self, owner: str, positions: object, allowed: Sequence[str]) -> AttentionSpec:
        """This spec checked against a network offering positions ``allowed``; returned unchanged when already
        placed there.

        A mapping's keys must be positions or stages of ``allowed`` (``positions`` is then ignored); a single block
        goes to ``positions`` (position or stage names, ``None`` for every position in ``allowed``).
        """
        allowed = tuple(allowed)
        if self.placed_in == allowed:
            return self
        if self.block is None:
            for key, _ in self.assignment:
                check_position_key(owner, key, allowed)
            return dataclasses.replace(self, placed_in=allowed)
        return dataclasses.replace(self, positions=_normalize_positions(owner, positions, allowed), placed_in=allowed)

    def for_model(self, model: str, positions: object, allowed: Sequence[str], spatial_dims: int) -> AttentionSpec:
        """This spec checked as ``create_model(model, ...)`` checks its arguments: blocks, then positions (every
        error starts ``create_model('<model>')``). ``allowed`` empty (a classifier): only the blocks are checked.

        With a mapping, ``attention_positions`` must be left at its default (``None``, the three default positions
        or all of the model's positions).
        """
        where = f"create_model('{model}')"
        self.check_blocks(where, spatial_dims)
        if not allowed:
            return self
        allowed = tuple(allowed)
        if self.block is None:
            for key, _ in self.assignment:
                try:
                    check_position_key(model, key, allowed)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            if positions is not None and not (isinstance(positions, (list, tuple, set, frozenset)) and
                                              set(positions) in (set(POSITIONS), set(allowed))):
                raise ValueError(f"{where}: attention is a mapping position -> block, so "
                                 f"attention_positions must be left at its default, got {positions!r}.")
            return dataclasses.replace(self, placed_in=allowed)
        if positions is None:
            return dataclasses.replace(self, positions=allowed, placed_in=allowed)
        if isinstance(positions, str):
            positions = (positions,)
        if not isinstance(positions, (list, tuple, set, frozenset)):
            raise ValueError(f"{where}: attention_positions must be a sequence of names from "
                             f"{allowed}, got {positions!r}.")
        for p in positions:
            if str(p).partition(".")[0] not in allowed:
                raise unknown_option_error(f"attention position for '{model}'", str(p), allowed)
        out = _normalize_positions(where, tuple(positions), allowed)
        ordered = tuple(sorted(out, key=lambda p: (allowed.index(p.partition(".")[0]), p)))
        return dataclasses.replace(self, positions=ordered, placed_in=allowed)

    def argument_for(self, builder: Callable[..., Any]) -> AttentionSpec | str | dict[str, str]:
        """What ``create_model`` passes a builder as ``attention``: this spec to medse's networks (:func:`takes_spec`),
        the plain :attr:`choice` to other builders (plugins written against names and dicts)."""
        return self if getattr(builder, "__medse_attention_spec__", False) else self.choice


B = TypeVar("B", bound=Callable[..., Any])


def takes_spec(builder: B) -> B:
    """Mark a model builder as taking an :class:`AttentionSpec` as ``attention`` (see
    :meth:`AttentionSpec.argument_for`); returns ``builder``."""
    builder.__medse_attention_spec__ = True  # type: ignore[attr-defined]
    return builder


# ---------------------------------------------------------------------------- the plain-data helpers
def parse_assignment(attention: object) -> str | dict[str, str]:
    """``attention`` as one block name (``str``) or a position -> block mapping (``dict``): ``AttentionSpec.parse(
    attention).choice``."""
    return AttentionSpec.parse(attention).choice


def format_assignment(attention: object) -> str:
    """The canonical name of an attention choice (:meth:`AttentionSpec.format`), e.g. ``"encoder=cse,decoder=scse"``;
    accepted by :func:`parse_assignment`, ``create_model``, configs and the command line."""
    return AttentionSpec.parse(attention).format()


def assignment_blocks(attention: object) -> list[str]:
    """The distinct block names an attention choice uses (:attr:`AttentionSpec.blocks`)."""
    return AttentionSpec.parse(attention).blocks


def cli_choices(values: Iterable[str] | None) -> list[AttentionSpec]:
    """The attention choices of repeated ``--attention`` options (the one command-line grammar).

    A value without ``=`` is a comma-separated list of block names (``scse,cse,eca+ca``); a value with ``=`` is
    one per-position assignment (``encoder=cse,decoder=scse``). The nnU-Net command's older form, assignments
    written ``encoder=eca/decoder=scse`` inside a comma-separated list (``cse,residual=cbam/decoder=cse``), is
    still read.

    Raises:
        ValueError: a malformed assignment (see :meth:`AttentionSpec.parse`).
    """
    out: list[AttentionSpec] = []
    for value in values or ():
        text = str(value).strip()
        if "=" in text and "/" not in text:
            out.append(AttentionSpec.parse(text))
            continue
        out += [AttentionSpec.parse(item.strip().replace("/", ",")) for item in text.split(",") if item.strip()]
    return out


def position_blocks(owner: str, attention: object, positions: object, offered: Sequence[str],
                    default: Sequence[str] = POSITIONS) -> AttentionSpec:
    """The choice resolved for a network whose positions have no stages (nnU-Net's U-Nets,
    :mod:`medse.integrations.nnunet.networks`): a mapping ``{position: block}`` of the positions that get a block
    (``"none"`` dropped; possibly empty), in ``positions`` order for a block name, ``offered`` order for a mapping.

    ``attention`` is one block name for every position in ``positions``, or a mapping (missing positions get
    nothing, ``positions`` still filters). ``positions=None``: ``default`` for a block name, every position the
    mapping names for a mapping. ``offered``: the positions the network has.
    """
    spec = AttentionSpec.parse(attention)
    offered = tuple(offered)
    if positions is None:
        allowed = offered if spec.is_mapping else tuple(default)
    else:
        allowed = _normalize_positions(owner, positions, offered, stages=False)
    if spec.is_mapping:
        for key, _ in spec.assignment:
            if key not in offered:
                raise unknown_option_error(f"attention position for {owner}", key, offered)
    keys = spec.key_blocks(allowed)
    order = offered if spec.is_mapping else allowed
    chosen = tuple((p, keys[p]) for p in order if p in keys and p in allowed and keys[p] != "none")
    return AttentionSpec(block=None, assignment=chosen, flat=True)


# ------------------------------------------------------------------------------------ one network's plan
def _run_attached(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the block's output passed through the attention module attached to it."""
    return getattr(module, ATTACHED)(output)


class TokenAttention(nn.Module):
    """Applies a feature-map block to transformer token features by viewing the tokens as their spatial grid.

    * ``grid`` given (ViT tokens ``(B, N, D)`` with ``N = prod(grid)``, row-major as MONAI's patch embedding and
      UNETR's ``proj_feat`` order them): ``(B, N, D) -> (B, D, *grid) -> block -> (B, N, D)``;
    * ``grid=None`` (Swin tokens, channels last ``(B, *S, D)``): ``-> (B, D, *S) -> block -> (B, *S, D)``.

    With ``block = cSE`` this is the token channel gate of medse's SQET-style position: ``z = mean_n t_n``,
    ``s = sigmoid(W2 relu(W1 z))``, ``t_n' = t_n * s`` (see :mod:`medse.networks.unetr`).
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


class AttentionPlan:
    """One network's placement while it is built: the block and keyword arguments of every site, inserted one way.

    ``AttentionPlan(owner, attention, attention_positions, attention_kwargs, spatial_dims, allowed)`` takes the
    network's constructor arguments; ``attention`` is parsed with :meth:`AttentionSpec.parse` (an
    ``AttentionSpec`` from ``create_model``, already placed there, is used as is). The network then calls, once per
    site in data-flow order, one of

    * :meth:`wrap` (``nn.Sequential(layer, block)``; U-Net),
    * :meth:`attach` (``<module>.medse_attention`` + forward hook; MONAI's networks),
    * :meth:`slot` (the block, ``nn.Identity()`` for none; networks whose ``forward`` calls it),

    and finally :meth:`install`, which rejects stage keys that matched no stage (listing the network's sites) and
    records the choice on the network. ``sites`` maps every site (``"encoder.0"``, ..., ``"bottleneck"``) to its
    block. ``stage`` defaults to the number of earlier sites of the position (``None`` for the bottleneck).
    """

    def __init__(
        self,
        owner: str,
        attention: object,
        positions: object,
        kwargs: Mapping[str, Any] | None,
        spatial_dims: int,
        allowed: Sequence[str] = POSITIONS,
    ) -> None:
        self.owner, self.spatial_dims, self.allowed = owner, spatial_dims, tuple(allowed)
        self.spec = AttentionSpec.parse("none" if attention is None else attention).place(owner, positions,
                                                                                          self.allowed)
        self.kwargs = dict(kwargs or {})
        self.spec.check_kwargs(owner, self.kwargs)
        self.sites: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def block_for(self, position: str, stage: int | None) -> str:
        """The block of a site (``"none"`` when no key names it)."""
        return self.spec.block_for(position, stage)

    def make(self, position: str, channels: int, where: str, stage: int | None = None,
             kwargs: Mapping[str, Any] | None = None) -> nn.Module | None:
        """The attention module of one site, tagged ``_medse_attention`` and ``_medse_site``; ``None`` when it gets
        none. ``kwargs``: the block's keyword arguments when the network chooses them itself (nnU-Net's per-position
        options), else :meth:`AttentionSpec.kwargs_for`. Errors of the block library are re-raised naming the
        network, ``where`` and the width."""
        if position not in self.allowed:
            raise ValueError(f"{self.owner}: internal error: position '{position}' not in {self.allowed}.")
        if stage is None and position != "bottleneck":
            stage = self._counts.get(position, 0)
        self._counts[position] = self._counts.get(position, 0) + 1
        site = position if stage is None else f"{position}.{stage}"
        block = self.block_for(position, stage)
        self.sites[site] = block
        if kwargs is None:
            kwargs = self.spec.kwargs_for(block, self.kwargs)
        module = build_attention(block, self.spatial_dims, channels, kwargs, f"{self.owner} {where}")
        if module is not None:
            module._medse_site = site  # the position name ("encoder.0", "bottleneck") medse explain shows
        return module

    def slot(self, position: str, channels: int, where: str, stage: int | None = None,
             kwargs: Mapping[str, Any] | None = None) -> nn.Module:
        """The site's block for a network that stores and calls it; ``nn.Identity()`` when it gets none."""
        module = self.make(position, channels, where, stage, kwargs)
        return nn.Identity() if module is None else module

    def wrap(self, layer: nn.Module, position: str, channels: int, where: str, stage: int | None = None) -> nn.Module:
        """``nn.Sequential(layer, block)`` for the site after ``layer``, or ``layer`` unchanged when it gets none."""
        module = self.make(position, channels, where, stage)
        return layer if module is None else nn.Sequential(layer, module)

    def attach(self, module: nn.Module, position: str, channels: int, where: str, stage: int | None = None, *,
               tokens: bool = False, grid: Sequence[int] | None = None) -> nn.Module:
        """Make ``module`` apply the site's block to its output, keeping the module (and its keys) in place.

        The block becomes the submodule ``module.medse_attention`` (keys ``<module>.medse_attention.*`` are added)
        and a forward hook returns ``block(output)``; the hook is a module-level function that looks the submodule
        up, so ``copy.deepcopy`` and pickling give working copies. Works for any call signature (MONAI's up-blocks
        take ``(x, skip)``). An ``nn.Sequential`` runs every child, so there the block is appended without a hook.
        ``tokens=True``: the output is transformer tokens, the block runs on their grid (:class:`TokenAttention`;
        ``grid`` for ViT tokens ``(B, N, D)``, ``None`` for channels-last Swin tokens). Returns ``module``.
        """
        block = self.make(position, channels, where, stage)
        if block is None:
            return module
        if tokens:
            block = TokenAttention(block, grid)
        if hasattr(module, ATTACHED):
            raise ValueError(f"{type(module).__name__} already has attention attached.")
        module.add_module(ATTACHED, block)
        if not isinstance(module, nn.Sequential):
            module.register_forward_hook(_run_attached)
        return module

    def finish(self) -> dict[str, str]:
        """Check that every stage key named a stage of the network; returns ``sites`` in network order."""
        unused = [k for k in self.spec.key_blocks(self.allowed) if "." in k and k not in self.sites]
        if unused:
            raise ValueError(
                f"{self.owner}: unknown attention position '{unused[0]}'; this {self.owner} has positions "
                f"{', '.join(self.positions())}."
            )
        self.sites = dict(sorted(self.sites.items(), key=lambda kv: _key_order(kv[0])))
        return self.sites

    def install(self, network: nn.Module) -> None:
        """:meth:`finish`, then record the choice on ``network``, the one place it is recorded: ``attention`` (the
        block name or a position -> block dict), ``attention_positions`` (where a single block goes; for a mapping
        empty, or the positions that get a block when the positions have no stages, as in nnU-Net's U-Nets:
        :func:`position_blocks`) and ``attention_sites`` (site -> block)."""
        network.attention = self.spec.choice
        if not self.spec.is_mapping:
            network.attention_positions = tuple(self.spec.key_blocks(self.allowed))
        else:
            network.attention_positions = tuple(self.spec.key_blocks(())) if self.spec.flat else ()
        network.attention_sites = self.finish()

    def positions(self) -> list[str]:
        """The position names this network accepts: its positions, each followed by its stages."""
        out: list[str] = []
        for p in self.allowed:
            out.append(p)
            out += sorted((s for s in self.sites if s.startswith(p + ".")), key=_key_order)
        return out


def build_attention(
    block: str, spatial_dims: int, channels: int, kwargs: Mapping[str, Any] | None, where: str
) -> nn.Module | None:
    """One attention module for a ``channels``-channel feature map, tagged ``_medse_attention``; ``None`` for
    ``"none"`` (the network then inserts nothing). Errors from the block library (e.g. a reduction larger than the
    width) are re-raised as ``ValueError`` naming ``where`` and the channel count."""
    if block is None or block == "none":
        return None
    try:
        module = create_attention(block, spatial_dims, channels, **dict(kwargs or {}))
    except ValueError as e:
        raise ValueError(f"{where} ({channels} channels): cannot build attention '{block}': {e}") from e
    if isinstance(module, nn.Identity):
        return None
    module._medse_attention = True
    return module
