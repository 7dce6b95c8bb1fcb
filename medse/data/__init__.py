"""Data in: image I/O, dataset layouts and manifests, validation, preprocessing (+ inverse), augmentation,
patch/slice sampling with caching, and the synthetic demo dataset.

Modules (import them directly; this package imports nothing heavy):

* :mod:`medse.data.io` -- ``read_image``, ``write_image``, ``Image``
* :mod:`medse.data.datasets` -- ``Case``, ``DatasetSpec``, ``load_dataset``, ``write_manifest``, ``read_manifest``
* :mod:`medse.data.validate` -- ``validate_dataset``, ``ValidationReport``, ``resolve_labels``
* :mod:`medse.data.preprocess` -- ``PreprocessConfig``, ``preprocess_case``, ``invert_to_original``
* :mod:`medse.data.config` -- ``DataConfig``, ``SplitConfig``, ``AugmentConfig``
* :mod:`medse.data.splits` -- ``make_splits``, ``load_or_create_splits``
* :mod:`medse.data.augment` -- ``build_augmentation``, ``apply_augmentation``
* :mod:`medse.data.loader` -- ``CaseStore``, ``PatchDataset``, ``VolumeDataset``, ``collate_first``
* :mod:`medse.data.synth` -- ``generate_dataset``, ``generate_case``, ``LABELS``
* :mod:`medse.testing` -- random volumes with non-trivial affines for tests
"""

from __future__ import annotations
