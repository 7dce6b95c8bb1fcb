"""Segmentation networks with pluggable attention (and the model registry).

``create_model(name, spatial_dims, in_channels, out_channels, attention="none",
attention_positions=("encoder", "bottleneck", "decoder"), attention_kwargs=None, **arch_kwargs)``
builds a registered network (``attention`` may be one block or a mapping position -> block); ``list_models()`` describes them. Networks: ``unet`` (MONAI's U-Net),
``fc_densenet`` (Tiramisu), ``sdnet``, ``quicknat``, and MONAI's ``dynunet``, ``segresnet``, ``unetr``, ``swinunetr``; ``resnet50v2`` (classification) when the classifier module
is installed. See ``docs/networks.md``.
"""

from __future__ import annotations

# The network modules register their models with @register_model when imported (list_models() sorts by name).
from medse.networks import dynunet, fc_densenet, quicknat, resnet, sdnet, segresnet, swinunetr, unet, unetr  # noqa: F401
from medse.networks.placement import AttentionSpec
from medse.networks.registry import (
    ALL_POSITIONS,
    POSITIONS,
    ByDims,
    ModelInfo,
    attention_modules,
    create_model,
    format_assignment,
    list_models,
    parse_assignment,
    register_model,
    run_context_kwargs,
)

__all__ = [
    "ALL_POSITIONS",
    "POSITIONS",
    "AttentionSpec",
    "ByDims",
    "ModelInfo",
    "attention_modules",
    "create_model",
    "format_assignment",
    "list_models",
    "parse_assignment",
    "register_model",
    "run_context_kwargs",
]
