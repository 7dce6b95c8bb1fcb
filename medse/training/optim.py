"""Optimisers and per-iteration learning-rate schedules.

Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` multipliers of the peak ``lr``, stepped once per
iteration, so their state (``last_epoch`` = iterations done) is saved in the checkpoint and a resumed run
continues the schedule where it stopped (the nnU-Net issue 901 failure mode is a restarted schedule).

* ``poly``: (1 - t/T)^p, p = 0.9 (nnU-Net v2; Chen et al., DeepLab, arXiv 1606.00915).
* ``cosine``: 0.5 (1 + cos(pi t/T)) (Loshchilov & Hutter, SGDR, arXiv 1608.03983, without restarts).
* ``constant``: 1.
* optional linear warm-up over the first ``warmup`` iterations, (t + 1)/warmup (Goyal et al., arXiv 1706.02677).

Epoch-wise schedules (the classifier's ``train.scheduler``: ``cosine``, ``step``, ``none``, with warm-up in
epochs) hold the rate constant within an epoch: :func:`epoch_lr_multiplier` gives the multiplier of epoch e and
:func:`per_iteration` turns it into the per-iteration function the engine's ``LambdaLR`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from medse.config import TrainConfig


def lr_multiplier(schedule: str, total: int, warmup: int = 0, power: float = 0.9) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at iteration ``t`` (0-based) of ``total`` iterations.

    Args:
        schedule: ``poly``, ``cosine`` or ``constant``.
        total: total number of iterations T.
        warmup: linear warm-up iterations. Defaults to 0.
        power: poly exponent. Defaults to 0.9.
    """
    if schedule not in ("poly", "cosine", "constant"):
        raise ValueError(f"Unknown schedule '{schedule}'. Available: constant, cosine, poly.")
    total = max(int(total), 1)

    def fn(t: int) -> float:
        t = min(max(int(t), 0), total)
        if warmup > 0 and t < warmup:
            return (t + 1) / warmup
        frac = t / total
        if schedule == "poly":
            return (1.0 - frac) ** power
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return fn


def epoch_lr_multiplier(schedule: str, epochs: int, warmup_epochs: int = 0, step_size: int = 10,
                        gamma: float = 0.1) -> Callable[[int], float]:
    """The multiplier of the peak learning rate in epoch ``e`` (0-based) of ``epochs``.

    Args:
        schedule: ``cosine`` (0.5 (1 + cos(pi (e - w) / (E - w)))), ``step`` (gamma^((e - w) // step_size))
            or ``none`` (1).
        warmup_epochs: linear warm-up (e + 1) / w over the first w epochs. Defaults to 0.
    """
    if schedule not in ("cosine", "step", "none"):
        raise ValueError(f"Unknown schedule '{schedule}'. Available: cosine, none, step.")

    def fn(epoch: int) -> float:
        if warmup_epochs > 0 and epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        if schedule == "cosine":
            span = max(1, epochs - warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))
        if schedule == "step":
            return gamma ** ((epoch - warmup_epochs) // max(1, step_size))
        return 1.0

    return fn


def per_iteration(epoch_fn: Callable[[int], float], iterations_per_epoch: int) -> Callable[[int], float]:
    """An epoch-wise multiplier as a function of the iteration (constant within each epoch)."""
    n = max(int(iterations_per_epoch), 1)
    return lambda t: epoch_fn(int(t) // n)


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                   nesterov: bool = True) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015), AdamW (Loshchilov & Hutter 2019) or SGD with momentum (Nesterov when
    ``nesterov`` and ``momentum > 0``)."""
    import torch

    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer '{name}'. Available: adam, adamw, sgd.")


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of a segmentation config's ``train.*``."""
    return make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)


def schedule_of(cfg: TrainConfig) -> Callable[[int], float]:
    """The per-iteration multiplier of a segmentation config over ``epochs * iterations_per_epoch`` iterations."""
    return lr_multiplier(cfg.schedule, cfg.epochs * cfg.iterations_per_epoch, cfg.warmup, cfg.poly_power)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR over ``epochs * iterations_per_epoch`` iterations."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(cfg))
