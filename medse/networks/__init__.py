"""Segmentation networks with pluggable attention (and the model registry).

``create_model(name, spatial_dims, in_channels, out_channels, attention="none",
attention_positions=("encoder", "bottleneck", "decoder"), attention_kwargs=None, **arch_kwargs)``
builds a registered network (``attention`` may be one block or a mapping position -> block); ``list_models()`` describes them. Networks: ``unet`` (MONAI's U-Net),
``fc_densenet`` (Tiramisu), ``sdnet``, ``quicknat``, and MONAI's ``dynunet``, ``segresnet``, ``unetr``, ``swinunetr``; ``resnet50v2`` (classification) when the classifier area
is installed. See ``docs/networks.md``.
"""

from __future__ import annotations

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
