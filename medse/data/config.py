"""Typed configuration of the data pipeline: the ``data:`` and ``augment:`` sections of a run config.

Build with ``medse.utils.config.from_dict(DataConfig, d)`` / ``from_dict(AugmentConfig, d)`` (unknown
keys and wrong types raise :class:`~medse.utils.errors.MedseError` naming the key). YAML example::

    data:
      root: demo_data            # folder or manifest; layout detected unless named
      layout: auto               # auto | folder | nnunet | msd | manifest
      labels: null               # optional pin {name: value}; else from the dataset
      preprocess: {orientation: RAS, target_spacing: null, normalization: zscore, crop_foreground: false}
      split: {kind: holdout, val_fraction: 0.2, test_fraction: 0.0, seed: 0}
      cache: memory              # memory | disk | none
    augment:
      affine: {p: 0.3, scales: [0.9, 1.1], degrees: 10}
      flip: {p: 0.0}             # NB: a left/right flip swaps paired left/right labels' positions
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medse.data.preprocess import PreprocessConfig

__all__ = [
    "SplitConfig",
    "DataConfig",
    "AffineAug",
    "ElasticAug",
    "FlipAug",
    "BiasFieldAug",
    "NoiseAug",
    "GammaAug",
    "MotionAug",
    "GhostingAug",
    "AugmentConfig",
    "IntensityAug",
]


def _check_p(p: float, name: str) -> None:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}.p = {p} must lie in [0, 1]")


@dataclass
class SplitConfig:
    """How cases are split (drawn once from ``seed``, stored in the run folder as ``splits.json``).

    Attributes:
        kind: ``"holdout"`` (train/val/test fractions) or ``"kfold"`` (cross-validation; the test
            fraction is held out first). Defaults to "holdout".
        folds: number of folds for ``"kfold"``. Defaults to 5.
        fold: the validation fold, 0-based. Defaults to 0.
        val_fraction: validation share for ``"holdout"``. Defaults to 0.2.
        test_fraction: test share, never trained or validated on. Defaults to 0.0.
        seed: shuffling seed. Defaults to 0.
    """

    kind: Literal["holdout", "kfold"] = "holdout"
    folds: int = 5
    fold: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"split.folds = {self.folds} must be >= 2")
        if not 0 <= self.fold < self.folds:
            raise ValueError(f"split.fold = {self.fold} must lie in 0..{self.folds - 1}")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.test_fraction < 1.0:
            raise ValueError("split.val_fraction and split.test_fraction must lie in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("split.val_fraction + split.test_fraction must be < 1")


@dataclass
class DataConfig:
    """The ``data:`` section of a run config.

    Attributes:
        root: dataset folder or manifest file (layouts: see :func:`medse.data.datasets.load_dataset`).
            Defaults to None (must be set, e.g. ``data.root=DIR`` on the command line).
        layout: ``"auto"``, ``"folder"``, ``"nnunet"``, ``"msd"`` or ``"manifest"``. Defaults to "auto".
        manifest: a manifest file used instead of ``root``. Defaults to None.
        labels: pin the label set {name: value}; otherwise it comes from the dataset. Defaults to None.
        preprocess: :class:`~medse.data.preprocess.PreprocessConfig`.
        split: :class:`SplitConfig`.
        cache: ``"memory"`` (keep preprocessed cases in RAM), ``"disk"`` (``.npz`` in ``cache_dir``)
            or ``"none"``. Defaults to "memory".
        cache_dir: folder for ``cache: disk``; None = ``$MEDSE_CACHE_DIR`` or ``~/.cache/medse/preprocessed``
            (entries are keyed by a hash of settings and input files). Defaults to None.

    Patch size, foreground ratio and slice axis belong to the ``train`` section (medse.training).
    """

    root: str | None = None
    layout: Literal["auto", "folder", "nnunet", "msd", "manifest"] = "auto"
    manifest: str | None = None
    labels: dict[str, int] | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: str | None = None

    @property
    def source(self) -> str | None:
        """The path to load: ``manifest`` if set, else ``root``."""
        return self.manifest or self.root


# ------------------------------------------------------------------------------------ augmentation
@dataclass
class AffineAug:
    """torchio ``RandomAffine``: ``scales`` range, rotation ``degrees``, ``translation`` (mm). ``in_plane``: a 3D
    sample rotates about its last axis only (the axial X-Y plane of a NIfTI volume); 2D samples always rotate in
    their plane. Defaults: p 0, not in-plane."""

    p: float = 0.0
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0
    translation: float = 0.0
    in_plane: bool = False


@dataclass
class ElasticAug:
    """torchio ``RandomElasticDeformation``. Defaults: p 0, 7 control points, 7.5 mm."""

    p: float = 0.0
    num_control_points: int = 7
    max_displacement: float = 7.5


@dataclass
class FlipAug:
    """torchio ``RandomFlip`` over ``axes`` (each flipped with ``flip_probability``). Defaults: p 0.

    A flip across the left/right axis moves left structures to the right: keep it off for datasets
    with paired left/right labels (the demo data).
    """

    p: float = 0.0
    axes: tuple[int, ...] = (0,)
    flip_probability: float = 0.5


@dataclass
class BiasFieldAug:
    """torchio ``RandomBiasField``. Defaults: p 0, coefficients 0.5, order 3."""

    p: float = 0.0
    coefficients: float = 0.5
    order: int = 3


@dataclass
class NoiseAug:
    """torchio ``RandomNoise`` (Gaussian, std drawn from ``std``). Defaults: p 0, std (0, 0.1)."""

    p: float = 0.0
    std: tuple[float, float] = (0.0, 0.1)


@dataclass
class IntensityAug:
    """Random intensity scale and shift, ``x * a + b`` with ``a ~ U(scale)`` and ``b ~ U(-shift, shift)`` (one
    draw per image, all channels alike; in the units of the normalised image). Defaults: p 0, scale (0.9, 1.1),
    shift 0.1."""

    p: float = 0.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.1


@dataclass
class GammaAug:
    """torchio ``RandomGamma``. Defaults: p 0, log_gamma (-0.3, 0.3)."""

    p: float = 0.0
    log_gamma: tuple[float, float] = (-0.3, 0.3)


@dataclass
class MotionAug:
    """torchio ``RandomMotion``. Defaults: p 0, 10 degrees, 10 mm, 2 movements."""

    p: float = 0.0
    degrees: float = 10.0
    translation: float = 10.0
    num_transforms: int = 2


@dataclass
class GhostingAug:
    """torchio ``RandomGhosting``. Defaults: p 0, 4-10 ghosts, intensity 0.5-1."""

    p: float = 0.0
    num_ghosts: tuple[int, int] = (4, 10)
    intensity: tuple[float, float] = (0.5, 1.0)


_AUG_SECTIONS = ("affine", "elastic", "flip", "bias_field", "noise", "intensity", "gamma", "motion", "ghosting")


@dataclass
class AugmentConfig:
    """The ``augment:`` section: torchio transforms, each applied with probability ``p`` (all off by
    default). Image and label always get the same spatial transform; labels use nearest interpolation
    (``tio.LabelMap``). Intensity transforms touch images only.
    """

    affine: AffineAug = field(default_factory=AffineAug)
    elastic: ElasticAug = field(default_factory=ElasticAug)
    flip: FlipAug = field(default_factory=FlipAug)
    bias_field: BiasFieldAug = field(default_factory=BiasFieldAug)
    noise: NoiseAug = field(default_factory=NoiseAug)
    intensity: IntensityAug = field(default_factory=IntensityAug)
    gamma: GammaAug = field(default_factory=GammaAug)
    motion: MotionAug = field(default_factory=MotionAug)
    ghosting: GhostingAug = field(default_factory=GhostingAug)

    def __post_init__(self) -> None:
        for name in _AUG_SECTIONS:
            _check_p(getattr(self, name).p, name)

    @property
    def enabled(self) -> bool:
        return any(getattr(self, n).p > 0 for n in _AUG_SECTIONS)

    @classmethod
    def light(cls) -> AugmentConfig:
        """A light preset: affine p 0.3, bias field p 0.2, noise p 0.2, gamma p 0.2 (no flips)."""
        return cls(affine=AffineAug(p=0.3), bias_field=BiasFieldAug(p=0.2, coefficients=0.3),
                   noise=NoiseAug(p=0.2, std=(0.0, 0.05)), gamma=GammaAug(p=0.2))
