"""The one device rule: which ``torch.device`` a device setting names, for training, the classifier and prediction.

A setting is ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` (a ``torch.device``
is taken by its name). :func:`check_device` refuses, in one line naming the setting, a name outside these or a
GPU this machine does not have, before any work; :func:`resolve_device` checks the same and returns the device
(under ``torchrun`` the process's own GPU, ``cuda:LOCAL_RANK``). The setting is named as the user wrote it:
a command-line option (``--device``), a config key (``train.device``) or a keyword argument (``device``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from medse.utils.errors import MedseError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_CHOICES", "check_device", "device_type", "resolve_device"]

#: the device names a setting accepts, as error messages list them
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _names(setting: str) -> tuple[str, str]:
    """How an error names ``setting`` and the value that fixes it: ``--device`` / ``--device cpu or auto``,
    ``config key 'train.device':`` / ``train.device=cpu or auto``, ``device`` / ``device='cpu' or 'auto'``."""
    if setting.startswith("-"):
        return setting, f"{setting} cpu or auto"
    if "." in setting:
        return f"config key '{setting}':", f"{setting}=cpu or auto"
    return setting, f"{setting}='cpu' or 'auto'"


def device_type(device: str | torch.device | None) -> str:
    """``cuda`` or ``cpu``: the kind of device a setting names (``auto`` or ``None``: CUDA when available)."""
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def check_device(device: str | torch.device | None, setting: str = "--device") -> str:
    """The normalised name (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) of a device this machine has.

    Raises a one-line :class:`MedseError` naming ``setting`` (see :func:`_names`) for any other name, for CUDA
    when torch sees no GPU (saying which torch build) and for a GPU index past the visible ones.
    """
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    label, fix = _names(setting)
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise MedseError(f"{label} {str(device)!r}: use {DEVICE_CHOICES}")
    if not name.startswith("cuda"):
        return name
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        raise MedseError(f"{label} {str(device)!r} requested but CUDA is not available "
                         f"(torch {torch.__version__}, {build}); use {fix}")
    n = torch.cuda.device_count()
    if name.startswith("cuda:") and int(name[5:]) >= n:
        raise MedseError(f"{label} {str(device)!r} but only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
    return name


def resolve_device(
    device: str | torch.device | None = "auto",
    local_rank: int | None = None,
    *,
    setting: str = "device",
    set_current: bool = False,
) -> torch.device:
    """The ``torch.device`` a setting names, checked by :func:`check_device` (errors name ``setting``).

    Args:
        device: ``auto`` / ``None`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``.
        local_rank: the process's GPU under DistributedDataParallel: every rank trains on its own GPU, whatever
            index ``cuda:N`` names. ``None`` (one process): ``auto`` and ``cuda`` are ``cuda:LOCAL_RANK`` (the
            environment's, 0 when unset), ``cuda:N`` is itself.
        set_current: also make the GPU torch's current CUDA device (what training does before it builds
            anything; nccl uses the current device).
    """
    import torch

    name = check_device(device, setting)
    if device_type(name) == "cpu":
        return torch.device("cpu")
    if local_rank is not None:
        index = local_rank
    elif name in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        index = int(name[5:])
    if set_current:
        torch.cuda.set_device(index)
    return torch.device("cuda", index)
