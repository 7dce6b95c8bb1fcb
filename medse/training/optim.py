"""Optimisers and per-iteration learning-rate schedules.

Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` multipliers of the peak ``lr``, stepped once per
iteration, so their state (``last_epoch`` = iterations done) is saved in the checkpoint and a resumed run
continues the schedule where it stopped (the nnU-Net issue 901 failure mode is a restarted schedule).

* ``poly``: (1 - t/T)^p, p = 0.9 (nnU-Net v2; Chen et al., DeepLab, arXiv 1606.00915).
* ``cosine``: 0.5 (1 + cos(pi t/T)) (Loshchilov & Hutter, SGDR, arXiv 1608.03983, without restarts).
* ``constant``: 1.
* optional linear warm-up over the first ``warmup`` iterations, (t + 1)/warmup (Goyal et al., arXiv 1706.02677).
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


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015) or SGD with momentum/Nesterov, from ``train.*``."""
    import torch

    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    raise ValueError(f"Unknown optimizer '{cfg.optimizer}'. Available: adam, sgd.")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR over ``epochs * iterations_per_epoch`` iterations."""
    import torch

    total = cfg.epochs * cfg.iterations_per_epoch
    fn = lr_multiplier(cfg.schedule, total, cfg.warmup, cfg.poly_power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
