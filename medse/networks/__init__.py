"""Segmentation networks with pluggable attention (and the model registry).

``create_model(name, spatial_dims, in_channels, out_channels, attention="none",
attention_positions=("encoder", "bottleneck", "decoder"), attention_kwargs=None, **arch_kwargs)``
builds a registered network; ``list_models()`` describes them. Networks: ``unet`` (MONAI's U-Net),
``fc_densenet`` (Tiramisu), ``sdnet``, ``quicknat``; ``resnet50v2`` (classification) when the classifier area
is installed. See ``docs/networks.md``.
"""

from __future__ import annotations

from medse.networks.registry import (
    POSITIONS,
    ByDims,
    ModelInfo,
    attention_modules,
    create_model,
    list_models,
    register_model,
)

__all__ = [
    "POSITIONS",
    "ByDims",
    "ModelInfo",
    "attention_modules",
    "create_model",
    "list_models",
    "register_model",
]
