"""The model registry: ``create_model``, ``list_models``, ``register_model``, ``attention_modules``.

Networks register a builder with ``@register_model(name, task=..., ...)`` in their own module; this module
imports those modules (and the ``MEDSE_PLUGINS`` modules) on first use. A builder is called as ``builder(spatial_dims=..., in_channels=..., out_channels=..., attention=...,
attention_positions=..., attention_kwargs=..., **arch_kwargs)`` and returns an ``nn.Module``.

Design after segmentation_models_pytorch's ``create_model(arch, ...)`` and timm's ``create_attn``: models are
chosen by name, attention by name, and unknown names or arguments raise ``ValueError`` with a suggestion.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from medse.networks._common import (
    ALL_POSITIONS,
    POSITIONS,
    ByDims,
    _check_position_key,
    format_assignment,
    normalize_stage_positions,
    parse_assignment,
    resolve_default,
)
from medse.plugins import load_plugins
from medse.utils.errors import did_you_mean, unknown_option_error

__all__ = [
    "ALL_POSITIONS",
    "POSITIONS",
    "ByDims",
    "TASKS",
    "ModelInfo",
    "attention_modules",
    "complexity_table",
    "create_model",
    "format_assignment",
    "format_complexity_table",
    "list_models",
    "parse_assignment",
    "register_model",
    "run_context_kwargs",
    "RUN_CONTEXT_ARGS",
]

TASKS: tuple[str, ...] = ("segmentation", "classification")
#: Modules that register models; imported on first use of the registry.
_MODEL_MODULES: tuple[str, ...] = (
    "medse.networks.unet",
    "medse.networks.fc_densenet",
    "medse.networks.sdnet",
    "medse.networks.quicknat",
    "medse.networks.dynunet",
    "medse.networks.segresnet",
    "medse.networks.unetr",
    "medse.networks.swinunetr",
    "medse.networks.resnet",
)

_REGISTRY: dict[str, ModelInfo] = {}
_loaded = False


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model.

    Attributes:
        name: registry name (``create_model(name, ...)``).
        task: ``"segmentation"`` or ``"classification"``.
        spatial_dims: supported numbers of spatial dimensions, e.g. ``(2, 3)``.
        description: one line.
        defaults: architecture arguments and their defaults; a value that depends on ``spatial_dims`` is a
            :class:`~medse.networks._common.ByDims` (use :meth:`defaults_for`).
        positions: the attention positions the model understands (empty: the model ignores
            ``attention_positions``).
        paper: the paper the architecture follows.
        builder: the registered callable.
        run_context: architecture arguments a training run fills in from its config (:data:`RUN_CONTEXT_ARGS`,
            e.g. DynUNet's ``patch_size`` and ``spacing``, UNETR's ``img_size``); empty for most models.
    """

    name: str
    task: str
    spatial_dims: tuple[int, ...]
    description: str
    defaults: dict[str, Any]
    positions: tuple[str, ...] = ()
    paper: str = ""
    builder: Callable[..., nn.Module] | None = dataclasses.field(default=None, repr=False, compare=False)
    run_context: tuple[str, ...] = ()

    def defaults_for(self, spatial_dims: int) -> dict[str, Any]:
        """``defaults`` with every dimension-dependent value resolved for ``spatial_dims``."""
        return {k: resolve_default(v, spatial_dims) for k, v in self.defaults.items()}


def register_model(
    name: str,
    *,
    task: str = "segmentation",
    spatial_dims: Sequence[int] = (2, 3),
    description: str = "",
    defaults: dict[str, Any] | None = None,
    positions: Sequence[str] | None = None,
    paper: str = "",
    run_context: Sequence[str] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder (a function or an ``nn.Module`` class) under ``name``.

    Args:
        name: registry name, lower case letters, digits and underscores.
        task: ``"segmentation"`` or ``"classification"``. Defaults to ``"segmentation"``.
        spatial_dims: supported spatial dimensions. Defaults to ``(2, 3)``.
        description: one line for ``medse models``. Defaults to the builder's first docstring line.
        defaults: architecture arguments and defaults, for documentation and ``list_models``. Defaults to the
            keyword defaults of the builder's signature.
        positions: attention positions the model understands. Defaults to ``("encoder", "bottleneck",
            "decoder")`` for segmentation models and ``()`` (positions ignored) otherwise.
        paper: reference. Defaults to "".
        run_context: arguments the trainer fills in from the run config, names from :data:`RUN_CONTEXT_ARGS`
            (``patch_size``, ``img_size``: ``train.patch_size``; ``spacing``: the target spacing). Defaults to ().
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"register_model: name must be lower case letters, digits and '_', got {name!r}.")
    if task not in TASKS:
        raise unknown_option_error("task", str(task), TASKS)
    dims = tuple(int(d) for d in spatial_dims)
    if positions is None:
        positions = POSITIONS if task == "segmentation" else ()
    for arg in run_context:
        if arg not in RUN_CONTEXT_ARGS:
            raise unknown_option_error("run_context argument", str(arg), RUN_CONTEXT_ARGS)

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.builder) != _qualname(builder):
            raise ValueError(f"register_model: '{name}' is already registered by {_qualname(old.builder)}.")
        desc = description or (inspect.getdoc(builder) or "").split("\n")[0]
        _REGISTRY[name] = ModelInfo(
            name=name,
            task=task,
            spatial_dims=dims,
            description=desc,
            defaults=dict(defaults) if defaults is not None else _signature_defaults(builder),
            positions=tuple(positions),
            paper=paper,
            builder=builder,
            run_context=tuple(run_context),
        )
        return builder

    return decorator


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


_BASE_ARGS = ("spatial_dims", "in_channels", "out_channels", "attention", "attention_positions", "attention_kwargs")


def _signature_defaults(builder: Callable[..., Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}
    return {
        k: p.default
        for k, p in params.items()
        if k not in _BASE_ARGS and p.default is not inspect.Parameter.empty and k != "self"
    }


def _ensure_loaded() -> None:
    global _loaded
    load_plugins()  # MEDSE_PLUGINS modules may register models (each is imported once)
    if _loaded:
        return
    for mod in _MODEL_MODULES:
        importlib.import_module(mod)
    _loaded = True


#: Architecture arguments a run can fill in from its config, and where they come from.
RUN_CONTEXT_ARGS: dict[str, str] = {
    "patch_size": "train.patch_size",
    "img_size": "train.patch_size",
    "spacing": "data.preprocess.target_spacing",
}


def run_context_kwargs(
    name: str, patch_size: Sequence[int] | None = None, spacing: Sequence[float] | None = None
) -> dict[str, Any]:
    """Architecture arguments of model ``name`` that depend on the training patch and voxel spacing.

    DynUNet derives its kernels and strides from ``patch_size`` and ``spacing``; UNETR's ``img_size`` is the
    patch size. Returns the model's ``ModelInfo.run_context`` arguments (``None`` values left out); the trainer
    passes them unless the config's ``model.kwargs`` sets them, and ``medse models`` passes the tabulated size.
    """
    info = list_models().get(name.strip().lower().replace("-", "_"))
    if info is None:
        return {}
    values = {"patch_size": patch_size, "img_size": patch_size, "spacing": spacing}
    return {k: tuple(values[k]) for k in info.run_context if values[k] is not None}


def list_models(task: str | None = None) -> dict[str, ModelInfo]:
    """Registered models by name (sorted), optionally only those of one ``task``."""
    _ensure_loaded()
    if task is not None and task not in TASKS:
        raise unknown_option_error("task", str(task), TASKS)
    return {k: v for k, v in sorted(_REGISTRY.items()) if task is None or v.task == task}


def _check_block(model: str, attention: str, spatial_dims: int) -> str:
    if attention == "none":
        return attention
    from medse.attention import list_attention

    blocks = list_attention()
    for part in attention.split("+"):
        part = part.strip()
        if part not in blocks:
            raise unknown_option_error("attention block", part, sorted({*blocks, "none"}))
        supported = tuple(getattr(blocks[part], "spatial_dims", (2, 3)))
        if spatial_dims not in supported:
            raise ValueError(
                f"create_model('{model}'): attention block '{part}' supports spatial_dims {supported}, "
                f"got spatial_dims={spatial_dims}."
            )
    return attention


def _check_attention(model: str, attention: object, spatial_dims: int) -> str | dict[str, str]:
    """One block name, or a position -> block mapping (also given as ``"encoder=cse,decoder=scse"``)."""
    try:
        parsed = parse_assignment(attention)
    except ValueError as e:
        raise ValueError(f"create_model('{model}'): {e}") from None
    if isinstance(parsed, str):
        return _check_block(model, parsed, spatial_dims)
    return {k: _check_block(model, v, spatial_dims) for k, v in parsed.items()}


def _check_positions(key: str, info: ModelInfo, attention: str | dict[str, str], positions: object) -> tuple[str, ...]:
    """``attention_positions`` checked against the model's positions (stage names such as ``encoder.1`` allowed).

    With a mapping ``attention`` the mapping says where blocks go: ``attention_positions`` must then be left at its
    default (``None``, the three default positions or all of the model's positions) and is returned unchanged.
    """
    if isinstance(attention, dict):
        for k in attention:
            try:
                _check_position_key(key, k, info.positions)
            except ValueError as e:
                raise ValueError(f"create_model('{key}'): {e}") from None
        if positions is not None and not (isinstance(positions, (list, tuple, set, frozenset)) and
                                          set(positions) in (set(POSITIONS), set(info.positions))):
            raise ValueError(f"create_model('{key}'): attention is a mapping position -> block, so "
                             f"attention_positions must be left at its default, got {positions!r}.")
        return tuple(info.positions) if positions is None else tuple(positions)
    if positions is None:
        return tuple(info.positions)
    if isinstance(positions, str):
        positions = (positions,)
    if not isinstance(positions, (list, tuple, set, frozenset)):
        raise ValueError(f"create_model('{key}'): attention_positions must be a sequence of names from "
                         f"{info.positions}, got {positions!r}.")
    for p in positions:
        base = str(p).partition(".")[0]
        if base not in info.positions:
            raise unknown_option_error(f"attention position for '{key}'", str(p), info.positions)
    out = normalize_stage_positions(f"create_model('{key}')", tuple(positions), info.positions)
    return tuple(sorted(out, key=lambda p: (info.positions.index(p.partition(".")[0]), p)))


def _accepted_kwargs(builder: Callable[..., Any]) -> tuple[set[str], bool]:
    """Names of the builder's keyword arguments, and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    return names, var_kw


def create_model(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    attention: str = "none",
    attention_positions: Sequence[str] | str | None = POSITIONS,
    attention_kwargs: dict[str, Any] | None = None,
    **arch_kwargs: Any,
) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: a name from :func:`list_models` (``unet``, ``fc_densenet``, ``sdnet``, ``quicknat``, ...).
        spatial_dims: 2 or 3.
        in_channels: input channels (image modalities).
        out_channels: output channels (classes, background included).
        attention: an attention block name from ``medse.attention.list_attention()``, a composition
            ``"a+b"``, or ``"none"``. Defaults to ``"none"``.
        attention_positions: where to insert attention, a subset of the model's positions
            (``"encoder"``, ``"bottleneck"``, ``"decoder"`` for segmentation models); a single string is one
            position; ``None`` means all. Ignored by models without positions (classifiers). Defaults to all
            three.
        attention_kwargs: keyword arguments for every attention block (e.g. ``{"reduction": 4}``). Defaults to
            ``None`` (the blocks' defaults).
        **arch_kwargs: architecture arguments of the model (see ``list_models()[name].defaults``).

    Raises:
        ValueError: unknown model, block, position or argument (with a suggestion), unsupported
            ``spatial_dims``, or channel counts that are not positive integers.
    """
    models = list_models()
    if not isinstance(name, str):
        raise ValueError(f"create_model: name must be a string, got {name!r}.")
    key = name.strip().lower().replace("-", "_")
    if key not in models:
        raise unknown_option_error("model", name, models)
    info = models[key]
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in info.spatial_dims:
        raise ValueError(f"create_model('{key}'): spatial_dims must be one of {info.spatial_dims}, "
                         f"got {spatial_dims!r}.")
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"create_model('{key}'): {arg} must be a positive integer, got {value!r}.")
    attention = _check_attention(key, attention, spatial_dims)
    if info.positions:
        attention_positions = _check_positions(key, info, attention, attention_positions)
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise ValueError(f"create_model('{key}'): attention_kwargs must be a dict, got {attention_kwargs!r}.")
    names, var_kw = _accepted_kwargs(info.builder)
    if not var_kw:
        valid = sorted(names - set(_BASE_ARGS))
        for k in arch_kwargs:
            if k not in names or k in _BASE_ARGS:
                raise ValueError(f"create_model('{key}'): unknown argument '{k}'.{did_you_mean(k, valid)} "
                                 f"Valid arguments: {', '.join(valid)}.")
    try:
        model = info.builder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            attention=attention,
            attention_positions=tuple(attention_positions) if info.positions else attention_positions,
            attention_kwargs=dict(attention_kwargs or {}),
            **arch_kwargs,
        )
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m is None:
            raise
        bad = m.group(1)
        raise ValueError(f"create_model('{key}'): unknown argument '{bad}'."
                         f"{did_you_mean(bad, list(info.defaults))}") from e
    return model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules a network inserted (those tagged ``_medse_attention = True``), in module order."""
    return [m for m in model.modules() if getattr(m, "_medse_attention", False)]


def _count(name: str, spatial_dims: int, in_channels: int, out_channels: int, attention: str,
           arch_kwargs: dict[str, Any], size: int) -> tuple[int, dict[str, int]]:
    """(parameters, count_ops result); built and run on the meta device (no memory, no compute) when every
    operation supports it, else on the CPU."""
    import torch

    from medse.utils.complexity import count_ops, count_params

    shape = (1, in_channels, *([size] * spatial_dims))
    arch_kwargs = {**run_context_kwargs(name, (size,) * spatial_dims), **arch_kwargs}
    try:
        with torch.device("meta"):
            model = create_model(name, spatial_dims, in_channels, out_channels, attention=attention, **arch_kwargs)
        return count_params(model), count_ops(model, shape)
    except (NotImplementedError, RuntimeError):  # e.g. SwinUNETR calls .item() while building
        model = create_model(name, spatial_dims, in_channels, out_channels, attention=attention, **arch_kwargs)
        params = count_params(model)
        try:  # count on the meta device all the same: no arithmetic
            return params, count_ops(model.to("meta"), shape)
        except (NotImplementedError, RuntimeError):
            model = create_model(name, spatial_dims, in_channels, out_channels, attention=attention, **arch_kwargs)
            return params, count_ops(model, shape)


def complexity_table(
    size: int = 64,
    dims: Sequence[int] = (2, 3),
    networks: Sequence[str] | None = None,
    attention: Sequence[str] | None = None,
    in_channels: int = 1,
    out_channels: int = 2,
    arch_kwargs: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Parameters and multiply-adds of every network x attention block, with the overhead over ``"none"``.

    One row per (network, spatial_dims, block): ``network, dims, attention, params, params_overhead,
    params_overhead_pct, macs, macs_overhead_pct, elementwise, error``. MACs are those of
    ``medse.utils.complexity.count_ops`` for one input of shape ``(1, in_channels, size, ..., size)``
    (conv, linear and norm layers; ``elementwise`` counts pooling and the blocks' own element-wise work). A
    block that does not fit a network (unsupported ``spatial_dims``, a width the block cannot take) gets a
    row with ``error`` set and no numbers; so does a network that cannot run at this size (SwinUNETR below 64
    voxels per side) or fails otherwise: one network never aborts the table. Models are built on the meta
    device where they can be, so nothing is computed; the +params/+MACs columns stay empty when ``none`` failed.

    Args:
        size: spatial size of the input along every axis. Defaults to 64.
        dims: spatial dimensions to tabulate. Defaults to ``(2, 3)``.
        networks: model names. Defaults to every segmentation model.
        attention: block names (``"none"`` is always added first). Defaults to every registered block.
        in_channels: input channels. Defaults to 1.
        out_channels: output channels. Defaults to 2.
        arch_kwargs: per-network architecture arguments, e.g. ``{"unet": {"num_res_units": 1}}``. Defaults to
            None (the registry defaults).
    """
    models = list_models()
    if networks is None:
        networks = [k for k, v in models.items() if v.task == "segmentation"]
    for n in networks:
        if n not in models:
            raise unknown_option_error("model", n, models)
    if attention is None:
        from medse.attention import list_attention

        attention = [b for b in list_attention() if b != "none"]
    blocks = ["none", *dict.fromkeys(format_assignment(b) for b in attention if b != "none")]
    arch_kwargs = arch_kwargs or {}
    for n in arch_kwargs:
        if n not in models:
            raise unknown_option_error("model", n, models)
    rows: list[dict[str, Any]] = []
    for net in networks:
        kwargs = dict(arch_kwargs.get(net, {}))
        for d in dims:
            if d not in models[net].spatial_dims:
                continue
            base: dict[str, int] | None = None
            for block in blocks:
                row: dict[str, Any] = {"network": net, "dims": d, "attention": block, "params": None,
                                       "params_overhead": None, "params_overhead_pct": None, "macs": None,
                                       "macs_overhead_pct": None, "elementwise": None, "error": ""}
                try:
                    params, ops = _count(net, d, in_channels, out_channels, block, kwargs, size)
                except Exception as e:  # noqa: BLE001 - any failure of one network is its n/a row, not the table's
                    first = (str(e).strip().splitlines() or [""])[0]
                    row["error"] = first if isinstance(e, ValueError) and first else f"{type(e).__name__}: {first}"
                    rows.append(row)
                    continue
                row.update(params=params, macs=ops["macs"], elementwise=ops["elementwise"])
                if block == "none":
                    base = {"params": params, "macs": ops["macs"]}
                if base is not None:
                    row["params_overhead"] = params - base["params"]
                    row["params_overhead_pct"] = 100.0 * (params - base["params"]) / base["params"]
                    row["macs_overhead_pct"] = 100.0 * (ops["macs"] - base["macs"]) / max(base["macs"], 1)
                rows.append(row)
    return rows


def format_complexity_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Render :func:`complexity_table` rows as a Markdown table or aligned plain text."""
    header = ["network", "dims", "attention", "params", "+params", "+params %", "GMACs", "+MACs %",
              "elementwise (M)"]
    lines: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        if r["error"]:
            notes.append(f"{r['network']} {r['dims']}D {r['attention']}: {r['error']}")
            lines.append([r["network"], f"{r['dims']}D", r["attention"], "n/a", "", "", "", "", ""])
            continue
        def fmt(spec: str, key: str, scale: float = 1.0, r: dict[str, Any] = r) -> str:
            return "" if r[key] is None else format(r[key] / scale if scale != 1.0 else r[key], spec)

        lines.append([
            r["network"],
            f"{r['dims']}D",
            r["attention"],
            fmt(",", "params"),
            fmt("+,", "params_overhead"),
            fmt("+.2f", "params_overhead_pct"),
            fmt(".3f", "macs", 1e9),
            fmt("+.2f", "macs_overhead_pct"),
            fmt(".1f", "elementwise", 1e6),
        ])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i >= 3 else "---"
                                                              for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    if notes:
        out += ["", "n/a:"] + [f"- {n}" for n in notes]
    return "\n".join(out)
