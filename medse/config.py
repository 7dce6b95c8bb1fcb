"""Root configuration schema of a medse run: ``data``, ``augment``, ``model``, ``train``, ``infer``.

A YAML file (with optional ``_base_`` inheritance) plus dotted ``key=value`` overrides is validated
against :class:`Config` by :func:`load_config`; unknown keys, wrong types and inconsistent values raise
:class:`~medse.utils.errors.MedseError` naming the dotted key. The resolved config (all defaults filled
in) is written to ``RUN_DIR/config.yaml`` and read back by :func:`load_config` on resume and by the
inference (which reads the ``infer`` section).

Defaults follow MONAI/nnU-Net practice where a paper gives none: Dice + cross-entropy loss
(``monai.losses.DiceCELoss``), Adam at 1e-3 or SGD (momentum 0.99, Nesterov, nnU-Net v2), poly decay
with exponent 0.9 (nnU-Net v2), gradient clipping at norm 12 (nnU-Net v2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medse.data.config import AugmentConfig, DataConfig
from medse.utils.config import apply_overrides, blame, from_dict, load_yaml, to_dict
from medse.utils.errors import MedseError

__all__ = ["Config", "InferConfig", "ModelConfig", "TrainConfig", "load_config", "config_to_dict"]


@dataclass
class ModelConfig:
    """Which network to build (``medse.networks.create_model``).

    Args:
        name: registered model name (``medse models`` lists them). Defaults to ``"unet"``.
        spatial_dims: 2 (slice-wise network trained on slices of the 3D volumes) or 3. Defaults to 3.
        attention: attention block name (``medse blocks``), ``"none"``, a ``"a+b"`` composition, or a mapping
            position -> block (``{encoder: cse, decoder.0: scse}``, also written ``encoder=cse,decoder.0=scse``;
            docs/networks.md). Defaults to ``"none"``.
        attention_positions: where the network inserts a single block (ignored for a mapping). Defaults to
            encoder, bottleneck, decoder (Roy et al. 2018 place scSE after every encoder and decoder block).
        attention_kwargs: extra block arguments (e.g. ``{"reduction": 2}``). Defaults to ``{}``.
        kwargs: extra architecture arguments passed to the model constructor. Defaults to ``{}``.
    """

    name: str = "unet"
    spatial_dims: int = 3
    attention: str | dict[str, str] = "none"
    attention_positions: list[str] = field(default_factory=lambda: ["encoder", "bottleneck", "decoder"])
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"model.spatial_dims must be 2 or 3, got {self.spatial_dims}")


@dataclass
class TrainConfig:
    """Optimisation settings.

    Args:
        epochs: number of epochs. Defaults to 50.
        iterations_per_epoch: optimiser steps per epoch (global, over all ranks). Defaults to 50.
        batch_size: global batch size (split evenly over DDP ranks). Defaults to 2.
        patch_size: training patch (3 values for 3D, 2 for 2D slices). Defaults to [64, 64, 64].
        fg_ratio: fraction of patches centred on foreground. Defaults to 0.33 (nnU-Net v2).
        optimizer: ``adam`` or ``sgd``. Defaults to ``adam``.
        lr: peak learning rate. Defaults to 1e-3.
        weight_decay: L2 weight decay. Defaults to 3e-5 (nnU-Net v2).
        momentum: SGD momentum (ignored by Adam). Defaults to 0.99 (nnU-Net v2).
        nesterov: SGD Nesterov momentum. Defaults to True (nnU-Net v2).
        schedule: ``poly`` ((1 - t/T)^poly_power), ``cosine`` or ``constant``; stepped every iteration.
            Defaults to ``poly``.
        poly_power: exponent of the poly schedule. Defaults to 0.9 (nnU-Net v2).
        warmup: linear warm-up length in iterations. Defaults to 0.
        grad_clip: max gradient norm, ``null`` for none. Defaults to 12.0 (nnU-Net v2).
        lambda_dice: weight of the Dice term of DiceCELoss. Defaults to 1.0.
        lambda_ce: weight of the cross-entropy term. Defaults to 1.0.
        val_every: validate every N epochs (and always after the last). Defaults to 1.
        val_max_cases: validate on at most this many validation cases, ``null`` for all. Defaults to null.
        amp: mixed precision (autocast + GradScaler), used only on CUDA. Defaults to True.
        seed: seed of splits, sampling, augmentation and initialisation. Defaults to 0.
        num_workers: DataLoader workers. Defaults to 0.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. Defaults to ``auto``.
        progress: tqdm progress bars. Defaults to True.
        tensorboard: write TensorBoard events to ``RUN_DIR/tensorboard``. Defaults to True.
        num_threads: CPU threads of this training process (``torch.set_num_threads``), ``null`` for torch's
            default. On a CPU shared with other jobs, 1 avoids OpenMP oversubscription (measured 10x faster
            on a busy 2-core machine). Defaults to null.
        slice_axis: for 2D networks, the spatial axis of the preprocessed (canonical, RAS) volume the
            slices are taken along; 2 gives axial slices. Defaults to 2.
    """

    epochs: int = 50
    iterations_per_epoch: int = 50
    batch_size: int = 2
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    fg_ratio: float = 0.33
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 3e-5
    momentum: float = 0.99
    nesterov: bool = True
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup: int = 0
    grad_clip: float | None = 12.0
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    val_every: int = 1
    val_max_cases: int | None = None
    amp: bool = True
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    num_threads: int | None = None
    slice_axis: int = 2

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.fg_ratio <= 1.0:
            raise ValueError(f"train.fg_ratio must be in [0, 1], got {self.fg_ratio}")
        if not self.lr > 0:  # nan too
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.num_workers < 0:
            raise ValueError("train.warmup and train.num_workers must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"train.patch_size must be sizes >= 1 (voxels), got {self.patch_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"train.num_threads must be >= 1 or null, got {self.num_threads}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"train.slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {dev!r}")


@dataclass
class InferConfig:
    """Sliding-window inference settings (read by validation here and by ``medse.inference``).

    Args:
        roi_size: window size, ``null`` for the training patch size. Defaults to null.
        overlap: window overlap fraction. Defaults to 0.5 (nnU-Net v2).
        blend: ``gaussian`` or ``constant`` window weighting. Defaults to ``gaussian`` (nnU-Net v2).
        sw_batch_size: windows per forward pass. Defaults to 2.
        tta_flips: average predictions over flips along every spatial axis. Defaults to False.
        largest_component: keep the largest connected component of each foreground class. Defaults to False.
    """

    roi_size: list[int] | None = None
    overlap: float = 0.5
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 2
    tta_flips: bool = False
    largest_component: bool = False

    def __post_init__(self) -> None:
        if self.roi_size is not None and (len(self.roi_size) not in (2, 3) or any(r < 1 for r in self.roi_size)):
            raise ValueError(f"infer.roi_size must be null or 2 or 3 sizes >= 1 (voxels), got {self.roi_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"infer.overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ValueError(f"infer.sw_batch_size must be >= 1, got {self.sw_batch_size}")


@dataclass
class Config:
    """A whole run: ``data`` and ``augment`` (schemas of :mod:`medse.data.config`), model, train, infer."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self) -> None:
        dims = self.model.spatial_dims
        if len(self.train.patch_size) != dims:
            raise ValueError(
                f"train.patch_size has {len(self.train.patch_size)} values but model.spatial_dims is {dims}"
            )
        if self.infer.roi_size is not None and len(self.infer.roi_size) != dims:
            raise ValueError(f"infer.roi_size has {len(self.infer.roi_size)} values but model.spatial_dims is {dims}")

    @property
    def roi_size(self) -> list[int]:
        """The sliding-window size: ``infer.roi_size`` or the training patch size."""
        return list(self.infer.roi_size or self.train.patch_size)


def load_config(
    config: str | Path | dict[str, Any] | Config, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load and validate a run configuration.

    Args:
        config: a YAML path (``_base_`` inheritance resolved), a mapping, or a :class:`Config`.
        overrides: dotted ``key=value`` strings applied on top (values parsed as YAML).

    Returns:
        The validated :class:`Config`.

    Raises:
        MedseError: unknown key, wrong type or inconsistent values, naming the dotted key and the file, or the
            command-line override that set it (:func:`medse.utils.config.blame`); a run folder's ``config.yaml``
            naming a block that is not registered (a plugin block without ``MEDSE_PLUGINS``), with the plugin
            the run recorded.
    """
    path: Path | None = None
    if isinstance(config, Config):
        data = config_to_dict(config)
    elif isinstance(config, dict):
        data = config
    else:
        from medse._shipped import find

        path = find(config, "configs")  # a local file, else a shipped config (demo, configs/demo.yaml)
        data = load_yaml(path)
    merged = apply_overrides(data, list(overrides))
    try:
        cfg = from_dict(Config, merged)
    except MedseError as e:
        raise blame(e, Config, data, list(overrides), path) from None
    if path is not None and path.name == "config.yaml" and (path.parent / "run_info.json").is_file():
        from medse.attention.registry import check_run_blocks  # a run folder's config: its blocks must be registered

        check_run_blocks(cfg.model.attention, path.parent)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain YAML-safe types (tuples become lists, paths strings)."""
    return to_dict(cfg)
