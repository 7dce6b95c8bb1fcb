"""``nnUNetTrainer_medseShort``: nnU-Net's trainer with a few iterations, for smoke tests and CPU demos.

nnU-Net finds it by class name in the folders of env ``nnUNet_extTrainer`` (this folder, see
``medse.integrations.nnunet.trainer_folder()``). Everything but the length is nnU-Net's ``nnUNetTrainer``
(loss, deep supervision, augmentation, validation and the final prediction of the fold's validation cases).
The length comes from the environment, else from the class attributes (subclass to change them in code;
nnU-Net's constructor signature is fixed: it stores ``__init__``'s arguments in the checkpoint):

- ``MEDSE_NNUNET_EPOCHS`` / ``medse_epochs`` (default 1): epochs;
- ``MEDSE_NNUNET_ITERS`` / ``medse_iterations`` (default 10): training iterations per epoch (nnU-Net: 250);
- ``MEDSE_NNUNET_VAL_ITERS`` / ``medse_val_iterations`` (default 2): validation iterations per epoch (nnU-Net: 50).

At start it writes one line to nnU-Net's training log naming the network class and its medse attention
modules (count, block per position), so a log shows which network the plans built.
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _setting(default: int, env: str) -> int:
    """``$env`` as a positive int, else ``default``; ``ValueError`` naming the variable when it is not one."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return int(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {env} must be a positive integer, got {raw!r}")
    return value


def describe_network(network: torch.nn.Module) -> str:
    """One line: the network's class and its medse attention modules (``_medse_attention`` tags)."""
    net = getattr(network, "_orig_mod", network)  # torch.compile wrapper
    net = getattr(net, "module", net)  # DDP wrapper
    mods = [m for m in net.modules() if getattr(m, "_medse_attention", False)]
    choice = getattr(net, "attention", None)
    where = ", ".join(f"{p}={b}" for p, b in choice.items()) if isinstance(choice, dict) and choice else "none"
    return f"medse: network {type(net).__module__}.{type(net).__name__}, {len(mods)} medse attention modules ({where})"


class nnUNetTrainer_medseShort(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming convention
    """nnU-Net's trainer, shortened to ``num_epochs`` x ``num_iterations`` (see the module docstring)."""

    medse_epochs: int = 1
    medse_iterations: int = 10
    medse_val_iterations: int = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _setting(self.medse_epochs, "MEDSE_NNUNET_EPOCHS")
        self.num_iterations_per_epoch = _setting(self.medse_iterations, "MEDSE_NNUNET_ITERS")
        self.num_val_iterations_per_epoch = _setting(self.medse_val_iterations, "MEDSE_NNUNET_VAL_ITERS")

    def on_train_start(self) -> None:
        super().on_train_start()
        self.print_to_log_file(describe_network(self.network))
        self.print_to_log_file(f"medse: short run, {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"training + {self.num_val_iterations_per_epoch} validation iterations")
