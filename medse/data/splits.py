"""Train/validation/test splits, drawn once from a seed and stored in the run folder.

``make_splits(case_ids, split_cfg) -> dict`` with keys ``seed``, ``kind``, ``folds``, ``fold``,
``train``, ``val``, ``test`` (sorted lists) and ``case_ids`` (all, sorted). The draw depends only on
the *set* of case IDs and the config, never on their order or on global RNG state.

* ``holdout``: shuffle; the first ``round(n * test_fraction)`` go to test, the next
  ``round(n * val_fraction)`` (at least 1 when the fraction is > 0 and n >= 2) to validation.
* ``kfold``: the test share is held out first; the rest is shuffled and dealt into ``folds`` folds;
  fold ``fold`` is validation.

``load_or_create_splits(run_dir, case_ids, split_cfg)`` reads ``RUN_DIR/splits.json`` when it exists
and raises :class:`~medse.utils.errors.MedseError` if it disagrees with the dataset or the config
(never silently redraws); otherwise draws and writes it atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medse.data.config import SplitConfig
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

__all__ = ["SPLITS_FILE", "make_splits", "load_or_create_splits"]

SPLITS_FILE = "splits.json"


def make_splits(case_ids: list[str] | tuple[str, ...], split_cfg: SplitConfig | None = None) -> dict[str, Any]:
    """Draw the split (see the module docstring). Defaults to ``SplitConfig()``."""
    cfg = split_cfg or SplitConfig()
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise MedseError("duplicate case IDs: cannot split")
    n = len(ids)
    if n < 2:
        raise MedseError(f"need at least 2 cases to split, got {n}")
    rng = np.random.default_rng(cfg.seed)
    order = [ids[i] for i in rng.permutation(n)]
    n_test = int(round(n * cfg.test_fraction))
    test, rest = order[:n_test], order[n_test:]
    if cfg.kind == "holdout":
        n_val = int(round(n * cfg.val_fraction))
        if cfg.val_fraction > 0 and n_val == 0:
            n_val = 1
        n_val = min(n_val, len(rest) - 1)
        val, train = rest[:n_val], rest[n_val:]
    else:
        if len(rest) < cfg.folds:
            raise MedseError(f"{len(rest)} cases cannot fill {cfg.folds} folds")
        fold_of = {c: i % cfg.folds for i, c in enumerate(rest)}
        val = [c for c in rest if fold_of[c] == cfg.fold]
        train = [c for c in rest if fold_of[c] != cfg.fold]
    if not train:
        raise MedseError(f"the split leaves no training cases ({n} cases)")
    return {
        "seed": int(cfg.seed),
        "kind": cfg.kind,
        "folds": int(cfg.folds) if cfg.kind == "kfold" else None,
        "fold": int(cfg.fold) if cfg.kind == "kfold" else None,
        "val_fraction": float(cfg.val_fraction),
        "test_fraction": float(cfg.test_fraction),
        "train": sorted(train),
        "val": sorted(val),
        "test": sorted(test),
        "case_ids": ids,
    }


def load_or_create_splits(
    run_dir: str | os.PathLike, case_ids: list[str] | tuple[str, ...], split_cfg: SplitConfig | None = None
) -> dict[str, Any]:
    """Reuse ``RUN_DIR/splits.json`` or draw and store it; a stored split that disagrees raises."""
    cfg = split_cfg or SplitConfig()
    path = Path(run_dir) / SPLITS_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MedseError(f"unreadable splits file ({e})", path) from e
        if not isinstance(stored, dict) or not all(k in stored for k in ("train", "val", "test")):
            raise MedseError("splits file lacks train/val/test lists", path)
        have = set(stored["train"]) | set(stored["val"]) | set(stored["test"])
        want = {str(c) for c in case_ids}
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            parts = []
            if missing:
                parts.append(f"{len(missing)} dataset case(s) not in the stored split (e.g. '{missing[0]}')")
            if extra:
                parts.append(f"{len(extra)} stored case(s) not in the dataset (e.g. '{extra[0]}')")
            raise MedseError("stored split disagrees with the dataset: " + "; ".join(parts)
                             + ". Use a new run folder or delete splits.json on purpose", path)
        for key in ("seed", "kind"):
            if key in stored and stored[key] != getattr(cfg, key):
                raise MedseError(f"stored split has {key}={stored[key]!r} but the config says {getattr(cfg, key)!r}",
                                 path)
        if cfg.kind == "kfold" and stored.get("fold") is not None and stored["fold"] != cfg.fold:
            raise MedseError(f"stored split is fold {stored['fold']} but the config says fold {cfg.fold}", path)
        return stored
    splits = make_splits(case_ids, cfg)
    atomic_write_text(path, json.dumps(splits, indent=2) + "\n")
    return splits
