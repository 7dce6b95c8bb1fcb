"""medse: squeeze-and-excitation family attention for medical image segmentation and classification."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
