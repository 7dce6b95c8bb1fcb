"""The model registry: ``create_model``, ``list_models``, ``register_model``, ``attention_modules``.

Networks register a builder with ``@register_model(name, task=..., ...)`` in their own module, which
:mod:`medse.networks` imports; the ``MEDSE_PLUGINS`` modules are imported on first use (the bookkeeping, names,
duplicates, suggestions and plugins, is :class:`medse.utils.registry.Registry`'s). A builder is called as
``builder(spatial_dims=..., in_channels=..., out_channels=..., attention=..., attention_positions=...,
attention_kwargs=..., **arch_kwargs)`` and returns an ``nn.Module``. Report tables: :mod:`medse.networks.report`.

Design after segmentation_models_pytorch's ``create_model(arch, ...)`` and timm's ``create_attn``: models are
chosen by name, attention by name, and unknown names or arguments raise ``ValueError`` with a suggestion.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from medse.networks._common import ByDims, resolve_default
from medse.networks.placement import ALL_POSITIONS, POSITIONS, AttentionSpec, format_assignment, parse_assignment
from medse.utils.errors import did_you_mean, unknown_option_error
from medse.utils.plugins import load_plugins
from medse.utils.registry import Registry, keyword_arguments, keyword_defaults

__all__ = [
    "ALL_POSITIONS",
    "POSITIONS",
    "ByDims",
    "TASKS",
    "ModelInfo",
    "attention_modules",
    "create_model",
    "format_assignment",
    "list_models",
    "parse_assignment",
    "register_model",
    "run_context_kwargs",
    "RUN_CONTEXT_ARGS",
]

TASKS: tuple[str, ...] = ("segmentation", "classification")


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


def _builder(info: ModelInfo) -> object:
    return info.builder


_REGISTRY: Registry[ModelInfo] = Registry("model", decorator="register_model", owner=_builder, load=load_plugins)


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
    _REGISTRY.check_name(name)
    if task not in TASKS:
        raise unknown_option_error("task", str(task), TASKS)
    dims = tuple(int(d) for d in spatial_dims)
    if positions is None:
        positions = POSITIONS if task == "segmentation" else ()
    for arg in run_context:
        if arg not in RUN_CONTEXT_ARGS:
            raise unknown_option_error("run_context argument", str(arg), RUN_CONTEXT_ARGS)

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY.check_free(name, builder)
        desc = description or (inspect.getdoc(builder) or "").split("\n")[0]
        _REGISTRY.add(name, ModelInfo(
            name=name,
            task=task,
            spatial_dims=dims,
            description=desc,
            defaults=dict(defaults) if defaults is not None else keyword_defaults(builder, _BASE_ARGS),
            positions=tuple(positions),
            paper=paper,
            builder=builder,
            run_context=tuple(run_context),
        ))
        return builder

    return decorator


_BASE_ARGS = ("spatial_dims", "in_channels", "out_channels", "attention", "attention_positions", "attention_kwargs")


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
    if task is not None and task not in TASKS:
        raise unknown_option_error("task", str(task), TASKS)
    return {k: v for k, v in sorted(_REGISTRY.items()) if task is None or v.task == task}


def _check_attention(model: str, info: ModelInfo, attention: object, positions: object,
                     spatial_dims: int) -> AttentionSpec:
    """``attention`` parsed once (:meth:`AttentionSpec.parse`) and checked for the model: its blocks, then its
    positions or ``attention_positions`` (:meth:`AttentionSpec.for_model`)."""
    try:
        spec = AttentionSpec.parse(attention)
    except ValueError as e:
        raise ValueError(f"create_model('{model}'): {e}") from None
    return spec.for_model(model, positions, info.positions, spatial_dims)


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
    spec = _check_attention(key, info, attention, attention_positions, spatial_dims)
    if info.positions:
        attention_positions = spec.positions or (info.positions if attention_positions is None else attention_positions)
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise ValueError(f"create_model('{key}'): attention_kwargs must be a dict, got {attention_kwargs!r}.")
    names, var_kw = keyword_arguments(info.builder)
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
            attention=spec.argument_for(info.builder),
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
