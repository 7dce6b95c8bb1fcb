"""Resuming a batch: which existing masks ``medse predict`` skips, redoes or refuses, and the hashes that decide it.

A mask's sidecar records what made it (run folder, the checkpoint's sha256 or, without a checkpoint file, the
network's state dict's, the output-changing settings and the input files' paths, sizes and mtimes).
:func:`existing_output` compares them with the current batch (docs/inference.md): skip only what this run,
checkpoint, settings and inputs wrote and what still reads back; redo this run's own broken or stale outputs;
refuse everything else unless ``overwrite``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medse.inference.inputs import InputCase

__all__ = ["cached_file_sha256", "existing_output", "input_stats", "state_dict_sha256"]

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, cached by (resolved path, size, mtime_ns) for this process."""
    from medse.inference.writer import file_sha256

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def state_dict_sha256(model: Any) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and raw bytes of every tensor."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_SETTINGS_ORDER = ("roi_size", "overlap", "blend", "tta_flips", "largest_component", "slice_axis", "spatial_dims",
                   "class_values", "preprocess")


def input_stats(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Resolved path, size and mtime of each input (a DICOM series folder: its files' total size and newest
    mtime, so that a slice replaced in place makes the mask stale)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            sts = [f.stat() for f in p.iterdir() if f.is_file()]
            size, mtime = sum(st.st_size for st in sts), max((st.st_mtime_ns for st in sts), default=0)
        else:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        out.append({"path": str(p.resolve()), "size": size, "mtime_ns": mtime})
    return out


def existing_output(target: Path, case: InputCase, identity: Mapping[str, Any], settings: Mapping[str, Any],
                     prob_target: Path | None) -> tuple[str, str]:
    """What to do with a case whose mask exists (no ``overwrite``): ``("skip"|"redo"|"refuse", reason)``.

    The rule (docs/inference.md): skip only a mask that this run and checkpoint wrote with the same
    output-changing settings and inputs, that still reads back (sha256 as recorded, header and data load,
    shape of the input). Redo what is provably this run's own but broken or stale (mask unreadable or
    truncated, input files updated in place, requested probabilities missing). Refuse everything else
    (no or unreadable sidecar, another run or checkpoint, other settings, other input files, a mask
    edited after it was written): the user decides with ``overwrite``.
    """
    from medse.inference.writer import file_sha256, mask_file_problem, read_sidecar

    side, why = read_sidecar(target)
    if side is None:
        return "refuse", f"mask exists with {why}: cannot tell which run wrote it; pass --overwrite"
    if not side.get("checkpoint_sha256") and not side.get("model_sha256"):
        return "refuse", "mask exists from another run/checkpoint (its sidecar records no checkpoint hash); " \
                         "pass --overwrite"
    for key, what in (("run_dir", "run"), ("checkpoint_sha256", "checkpoint"), ("model_sha256", "model")):
        if side.get(key) != identity.get(key):
            theirs_ = side.get(key)
            shown = theirs_[:12] if key.endswith("sha256") and isinstance(theirs_, str) else theirs_
            return "refuse", f"mask exists from another {what} ({shown}); pass --overwrite"
    theirs = side.get("settings") if isinstance(side.get("settings"), dict) else {}
    diffs = [f"{k} {theirs.get(k)!r} -> {settings.get(k)!r}" for k in _SETTINGS_ORDER
             if json.dumps(theirs.get(k), sort_keys=True, default=str) != json.dumps(settings.get(k), sort_keys=True,
                                                                                   default=str)]
    if diffs:
        return "refuse", f"mask exists from other inference settings ({'; '.join(diffs)}); pass --overwrite"
    recorded = side.get("input_files") if isinstance(side.get("input_files"), list) else []
    current = input_stats(case.images)
    if [r.get("path") for r in recorded if isinstance(r, dict)] != [c["path"] for c in current]:
        return "refuse", "mask exists for other input files (" + \
            ", ".join(str(r.get("path")) for r in recorded if isinstance(r, dict)) + "); pass --overwrite"
    sha_ok = False
    try:
        sha_ok = file_sha256(target) == side.get("mask_sha256")
    except OSError as e:
        return "redo", f"existing mask unreadable ({e.strerror or type(e).__name__})"
    problem = mask_file_problem(target, case.images[0], read_data=not sha_ok)
    if problem is not None:
        return "redo", f"existing mask {problem}"
    if not sha_ok:
        return "refuse", "mask was modified after medse wrote it (sha256 differs from its sidecar); pass --overwrite"
    if [(r.get("size"), r.get("mtime_ns")) for r in recorded] != [(c["size"], c["mtime_ns"]) for c in current]:
        return "redo", "input file changed since the mask was written"
    if prob_target is not None:
        if not prob_target.is_file():
            return "redo", "probabilities requested but missing"
        if file_sha256(prob_target) != side.get("probabilities_sha256"):
            return "redo", "probabilities file differs from the one recorded in the sidecar"
    return "skip", ""
