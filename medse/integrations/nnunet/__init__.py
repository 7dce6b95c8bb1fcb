"""medse blocks inside nnU-Net v2 (extra ``medse[nnunet]``: nnunetv2 and dynamic-network-architectures).

- :class:`AttentionPlainConvUNet`, :class:`AttentionResidualEncoderUNet` (``networks``): nnU-Net's own
  ``PlainConvUNet`` / ``ResidualEncoderUNet`` with medse attention after the encoder stages, the bottleneck
  and/or the decoder stages. Plans name them as ``medse.integrations.nnunet.AttentionPlainConvUNet``.
- ``plans``: derived plans files, one per block (``medse nnunet plans``).
- ``compare``: paired Dice-gain tables over nnU-Net's cross-validation folds (``medse nnunet compare``).
- ``trainers/``: the folder to put in ``nnUNet_extTrainer`` (``nnUNetTrainer_medseShort``).

The network classes are imported on first access, so this package imports without nnU-Net installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AttentionPlainConvUNet", "AttentionResidualEncoderUNet", "trainer_folder"]


def trainer_folder() -> str:
    """The folder to list in env ``nnUNet_extTrainer`` so nnU-Net finds medse's trainers."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "trainers")


def __getattr__(name: str) -> Any:
    if name in ("AttentionPlainConvUNet", "AttentionResidualEncoderUNet"):
        from medse.integrations.nnunet import networks

        return getattr(networks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
