"""Training engine: config schema, training loop, checkpoints/resume, DistributedDataParallel.

Public API::

    from medse.training import train, resume, load_config, Config
    run_dir = train("configs/demo.yaml", "runs/demo", overrides=["data.root=/data"])
    resume(run_dir)

Command line::

    medse train --config configs/demo.yaml --output runs/demo data.root=DIR [train.epochs=2 ...]
    medse train --resume runs/demo
    torchrun --nproc_per_node=4 -m medse train --config configs/unet_3d.yaml --output runs/u3 data.root=DIR

Under ``torchrun`` the same code runs DistributedDataParallel (nccl on GPUs, gloo on CPU): each global batch
of ``train.batch_size`` samples is split evenly over the ranks, the loss and validation Dice are all-reduced,
and only rank 0 writes. BatchNorm statistics stay per rank (no SyncBatchNorm), so only networks without
BatchNorm (the U-Net with its default instance norm) train exactly as a single process would.

Run-folder layout and contracts: ``docs/ARCHITECTURE.md``; ``timing.json`` adds the mean training-step time
(forward + backward + optimiser step, seconds, the first 3 steps of each process excluded) and the number of
steps measured.
"""

from __future__ import annotations

from medse.config import Config, InferConfig, ModelConfig, TrainConfig, load_config
from medse.runs import build_model
from medse.training.trainer import TrainingInterrupted, resume, train

__all__ = [
    "Config",
    "InferConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainingInterrupted",
    "build_model",
    "load_config",
    "resume",
    "train",
]
