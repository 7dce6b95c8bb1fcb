"""Training engine: config schema, training loop, checkpoints/resume, DistributedDataParallel.

Public API::

    from medse.training import train, resume, load_config, Config
    run_dir = train("configs/demo.yaml", "runs/demo", overrides=["data.root=/data"])
    resume(run_dir)

Run-folder layout and contracts: ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

from medse.training.config import Config, InferConfig, ModelConfig, TrainConfig, load_config
from medse.training.trainer import TrainingInterrupted, build_model, resume, train

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
