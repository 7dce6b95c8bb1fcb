"""``evaluate(pred_dir, ref, output_dir)``: per-case metrics as a long table, ``metrics.csv`` and ``summary.json``.

:func:`evaluate_cases` scores ``(case_id, prediction, reference)`` triples; :func:`evaluate` builds them from the
folders below (``medse evaluate`` does too) and calls it.

Predictions are the image files of ``pred_dir`` (``{case_id}.nii.gz`` as written by ``medse predict``;
sidecar JSON, ``failures.csv`` and the ``probabilities/`` folder are ignored). References are a folder of
label files with the same case ids, or a dataset root / manifest read with
``medse.data.datasets.load_dataset`` (its cases' ``label`` paths).

Every reference is scored. A reference without a prediction is a failure: its rows score Dice 0 and HD95/ASSD
the worst value (the image diagonal in mm, :func:`medse.evaluation.metrics.worst_distance`) for every label,
it is listed in ``summary.json`` (``missing_predictions``, per label ``n_missing``) and :func:`evaluate` raises
after writing the results unless ``allow_missing=True``. Predictions without a reference are listed
(``extra_predictions``) and warned about. The output folder is checked for writability before any work.

``summary.json`` holds, per label and metric, ``mean``, ``std`` (sample, ddof=1), ``median`` over the
cases with a finite value, ``n`` (finite values) and ``n_nan``; per label ``n_empty`` (cases where exactly
one of reference and prediction is empty, see :data:`medse.evaluation.metrics.EMPTY_RULE`),
``n_both_empty`` and ``n_missing``. ``foreground`` gives the same statistics of the per-case mean over the
foreground labels (NaN values skipped). Prediction and reference grids must match (shape and affine within
1e-3 mm): a mismatch is a :class:`~medse.utils.errors.MedseError` naming both files.

Labels that would make the numbers lie (a label absent from both masks scores Dice 1 by convention):

* a label asked for with ``labels=`` that occurs in no reference and no prediction is an error (nothing is
  written): it would score Dice 1 in every case and raise the foreground mean; a declared label (dataset.json,
  sidecar) that occurs nowhere is dropped with a warning, for the same reason;
* label values present in references but not scored (e.g. 9, or -1 when only 1, 2 are scored) are listed with
  their voxel and case counts in ``summary.json`` (``unscored_labels``), and :func:`evaluate` raises after
  writing the results unless ``allow_unscored=True``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medse.evaluation.metrics import EMPTY_RULE, HD95_MODES, METRICS, case_metrics, missing_case_rows
from medse.utils.atomic import atomic_path, atomic_write_text, ensure_writable_dir
from medse.utils.errors import MedseError

__all__ = ["evaluate", "evaluate_cases", "summarise", "collect_pairs", "check_writable_folder", "format_unscored",
           "image_files"]

COLUMNS = ["case_id", "label", "label_value", "metric", "value"]


def image_files(folder: Path) -> dict[str, Path]:
    """``{case_id: file}`` of the image files in ``folder`` (``case_001.nii.gz`` -> ``case_001``); sidecars and
    sub-folders are not images. Two files of one case id are an error naming both."""
    from medse.data.io import is_image_file, split_suffix

    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and is_image_file(f):
            cid = split_suffix(f)[0]
            if cid in out:
                raise MedseError(f"two files for case '{cid}': {out[cid].name} and {f.name}", folder)
            out[cid] = f
    return out


def _references(ref: Path) -> tuple[dict[str, Path], dict[str, int]]:
    if not ref.exists():
        raise MedseError("reference folder or manifest not found", ref)
    if ref.is_dir():
        files = image_files(ref)
        if files:
            labels: dict[str, int] = {}
            ds = ref / "dataset.json"
            if ds.is_file():
                try:
                    raw = json.loads(ds.read_text()).get("labels") or {}
                    labels = {str(k): int(v) for k, v in raw.items()}
                except (json.JSONDecodeError, TypeError, ValueError):
                    labels = {}
            return files, labels
    from medse.data.datasets import load_dataset

    spec = load_dataset(ref)
    refs = {c.case_id: Path(c.label) for c in spec.cases if c.label is not None}
    if not refs:
        raise MedseError("no reference label maps found", ref)
    return refs, dict(spec.labels)


def collect_pairs(pred_dir: str | os.PathLike, ref: str | os.PathLike) -> tuple[list[tuple[str, Path, Path]],
                                                                                list[str], dict[str, int]]:
    """``([(case_id, pred_path, ref_path)], case ids with a reference but no prediction, declared labels)``.

    Use :func:`match_cases` for the reference paths of the missing cases and the predictions without reference.
    """
    m = match_cases(pred_dir, ref)
    return m["pairs"], sorted(m["missing"]), m["labels"]


def match_cases(pred_dir: str | os.PathLike, ref: str | os.PathLike) -> dict[str, Any]:
    """``{"pairs": [(case_id, pred, ref)], "missing": {case_id: ref path}, "extra": [case ids], "labels": {...}}``:
    the predictions matched to references, references without a prediction, predictions without a reference."""
    pdir = Path(pred_dir)
    if not pdir.is_dir():
        raise MedseError("prediction folder not found", pdir)
    preds = image_files(pdir)
    if not preds:
        raise MedseError("no prediction files in the folder", pdir)
    refs, labels = _references(Path(ref))
    pairs = [(cid, preds[cid], refs[cid]) for cid in sorted(preds) if cid in refs]
    if not pairs:
        raise MedseError(f"no prediction matches a reference case id (predictions: {', '.join(sorted(preds)[:3])}"
                         f"...; references: {', '.join(sorted(refs)[:3])}...)", pdir)
    missing = {cid: refs[cid] for cid in sorted(set(refs) - set(preds))}
    extra = sorted(set(preds) - set(refs))
    return {"pairs": pairs, "missing": missing, "extra": extra, "labels": labels}


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it (before any work is done).

    Raises:
        MedseError: naming the folder, when it is a file, cannot be created or is not writable.
    """
    ensure_writable_dir(folder)
    return Path(folder)


def _read_label(path: Path) -> Any:
    from medse.data.io import read_image

    img = read_image(path, expect_3d=True)
    arr = img.array
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise MedseError("label map holds non-integer or NaN values", path)
        arr = arr.astype(np.int64)
    img.array = arr
    return img


def _values_in(pairs: Sequence[tuple[str, Path, Path]]) -> set[int]:
    """Every label value present in any prediction or reference (a pre-pass; unreadable files are skipped
    here and reported by the main pass)."""
    seen: set[int] = set()
    for _, p, r in pairs:
        for path in (p, r):
            try:
                seen |= {int(v) for v in np.unique(_read_label(path).array)}
            except MedseError:
                continue
    return seen


def _resolve_labels(labels: Mapping[str, int] | Sequence[int] | None, declared: Mapping[str, int],
                    pred_dir: Path, first_pred: Path, values_seen: Any) -> dict[str, int]:
    if isinstance(labels, Mapping):
        out = {str(k): int(v) for k, v in labels.items()}
    elif labels is not None:
        by_value = {int(v): k for k, v in declared.items()}
        out = {by_value.get(int(v), str(int(v))): int(v) for v in labels}
    else:
        out = dict(declared)
        if not out:
            from medse.inference.writer import sidecar_path

            side = sidecar_path(first_pred)
            if side.is_file():
                try:
                    out = {str(k): int(v) for k, v in (json.loads(side.read_text()).get("labels") or {}).items()}
                except (json.JSONDecodeError, TypeError, ValueError):
                    out = {}
        if not out:
            out = {str(v): v for v in sorted(values_seen())}
    out = {k: v for k, v in out.items() if v != 0}
    if not out:
        raise MedseError("no foreground labels to evaluate (pass labels=... or give the references a dataset.json)",
                         pred_dir)
    return out


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    fin = arr[np.isfinite(arr)]
    n = int(fin.size)
    return {
        "mean": float(fin.mean()) if n else math.nan,
        "std": float(fin.std(ddof=1)) if n > 1 else math.nan,
        "median": float(np.median(fin)) if n else math.nan,
        "n": n,
        "n_nan": int(arr.size - n),
    }


def summarise(df: Any, missing: Sequence[str] = ()) -> dict[str, Any]:
    """Summary statistics of a long-format metrics table (see the module docstring); ``missing``: case ids
    whose rows are failure rows of a missing prediction (counted as ``n_missing``, not as empty masks)."""
    out: dict[str, Any] = {"labels": {}, "foreground": {}}
    if df.empty:
        return out
    missing_set = {str(c) for c in missing}
    for (name, value), part in df.groupby(["label", "label_value"], sort=False):
        entry: dict[str, Any] = {"label_value": int(value)}
        for metric in METRICS:
            entry[metric] = _stats(part.loc[part.metric == metric, "value"].tolist())
        vols = part[part.metric.isin(["volume_ref_mm3", "volume_pred_mm3"])].pivot(
            index="case_id", columns="metric", values="value")
        is_missing = vols.index.isin(list(missing_set))
        ref_empty = (vols["volume_ref_mm3"] == 0) & ~is_missing
        pred_empty = (vols["volume_pred_mm3"] == 0) & ~is_missing
        entry["n_cases"] = int(len(vols))
        entry["n_empty"] = int((ref_empty ^ pred_empty).sum())
        entry["n_both_empty"] = int((ref_empty & pred_empty).sum())
        entry["n_missing"] = int(is_missing.sum())
        out["labels"][str(name)] = entry
    for metric in METRICS:
        per_case = df[df.metric == metric].groupby("case_id")["value"].apply(
            lambda s: float(np.nanmean(s.to_numpy())) if np.isfinite(s.to_numpy()).any() else math.nan)
        out["foreground"][metric] = _stats(per_case.tolist())
    return out


def format_unscored(unscored: Mapping[Any, Mapping[str, int]]) -> str:
    """``"9 (1200 voxels in 3 cases), -1 (..."`` from ``summary.json``'s ``unscored_labels``."""
    return ", ".join(f"{v} ({c['voxels']} voxels in {c['cases']} case{'s' if c['cases'] != 1 else ''})"
                     for v, c in unscored.items())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def evaluate(
    pred_dir: str | os.PathLike,
    ref: str | os.PathLike,
    output_dir: str | os.PathLike | None,
    labels: Mapping[str, int] | Sequence[int] | None = None,
    *,
    strict: bool = True,
    allow_missing: bool = False,
    hd95_mode: str = "max",
    progress: bool = False,
    allow_unscored: bool = False,
) -> Any:
    """Compare every reference with its prediction; write ``metrics.csv`` and ``summary.json``.

    Args:
        pred_dir: folder of predicted label maps (``{case_id}.nii.gz`` ...).
        ref: folder of reference label maps with the same case ids, or a dataset root / manifest.
        output_dir: where ``metrics.csv`` and ``summary.json`` go (checked for writability first); None writes
            nothing.
        labels: ``{name: value}`` or label values to evaluate. Defaults to the reference dataset's
            labels, else the first prediction's sidecar's, else every non-zero value found in any
            prediction or reference.
        strict: after writing the results of the good cases, raise a MedseError when some case failed
            (unreadable file, mismatched grids). Defaults to True.
        allow_missing: do not raise when references have no prediction (their failure rows, Dice 0 and the
            worst HD95/ASSD, are in the results either way). Defaults to False.
        hd95_mode: ``"max"`` (MONAI's convention: the larger directed 95th percentile) or ``"pooled"`` (medpy's:
            the 95th percentile of both directed distance sets pooled), see :mod:`medse.evaluation.metrics`.
            Defaults to ``"max"``.
        progress: tqdm bar over the cases. Defaults to False.
        allow_unscored: do not raise when references hold label values that are not scored (they are listed in
            ``summary.json``'s ``unscored_labels`` either way). Defaults to False.

    Returns:
        pandas DataFrame with columns ``case_id, label, label_value, metric, value`` (one row per case x
        label x metric; metrics in :data:`medse.evaluation.metrics.METRICS`), missing predictions included.

    Raises:
        MedseError: no matching cases, output folder not writable, mismatched grids (naming both files),
            unreadable files (with ``strict``), references without a prediction (unless ``allow_missing``), a
            label of ``labels`` found in no reference and no prediction (nothing written), references holding
            label values that are not scored (unless ``allow_unscored``; after writing the results).
    """
    _check_hd95_mode(hd95_mode)
    pdir = Path(pred_dir)
    matched = match_cases(pdir, ref)  # folder listings only: cheap, and nothing is created when inputs are wrong
    cases = [*matched["pairs"], *((cid, None, r) for cid, r in matched["missing"].items())]
    return evaluate_cases(cases, output_dir, labels, declared_labels=matched["labels"], strict=strict,
                          allow_missing=allow_missing, hd95_mode=hd95_mode, progress=progress,
                          allow_unscored=allow_unscored, pred_dir=pdir, ref=ref, extra_predictions=matched["extra"])


def _check_hd95_mode(hd95_mode: str) -> None:
    if hd95_mode not in HD95_MODES:
        raise MedseError(f"hd95_mode '{hd95_mode}' must be one of {', '.join(HD95_MODES)}")


def _common_folder(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every one of ``paths``."""
    return Path(os.path.commonpath([str(Path(p).absolute().parent) for p in paths]))


def evaluate_cases(
    cases: Iterable[tuple[str, str | os.PathLike | None, str | os.PathLike]],
    output_dir: str | os.PathLike | None,
    labels: Mapping[str, int] | Sequence[int] | None = None,
    *,
    declared_labels: Mapping[str, int] | None = None,
    strict: bool = True,
    allow_missing: bool = False,
    hd95_mode: str = "max",
    progress: bool = False,
    allow_unscored: bool = False,
    pred_dir: str | os.PathLike | None = None,
    ref: str | os.PathLike | None = None,
    extra_predictions: Sequence[str] = (),
) -> Any:
    """Score ``(case_id, prediction, reference)`` triples; write ``metrics.csv`` and ``summary.json``.

    The engine of :func:`evaluate` (which builds the triples from a prediction folder and a reference folder or
    dataset); callers that know their cases' files (a compare cell: its test cases' predictions and the dataset's
    labels) pass them directly, so that nothing is gathered into a folder first.

    Args:
        cases: one triple per case; a prediction of None is a missing prediction (failure rows, see
            ``allow_missing``).
        output_dir, labels, strict, allow_missing, hd95_mode, progress, allow_unscored: as in :func:`evaluate`.
        declared_labels: the references' declared ``{name: value}`` (a dataset's labels), used when ``labels``
            is None. Defaults to none: the first prediction's sidecar's, else every non-zero value found.
        pred_dir: the predictions' folder as ``summary.json`` records it and errors name it. Defaults to the
            folder holding every prediction.
        ref: the references' source (folder, dataset root or manifest), likewise. Defaults to the folder
            holding every reference.
        extra_predictions: case ids of predictions without a reference: warned about and listed in
            ``summary.json``.

    Returns:
        the long table of :func:`evaluate`.

    Raises:
        MedseError: as :func:`evaluate`; also when no case has a prediction.
        ValueError: no cases, or a case id given twice.
    """
    import pandas as pd

    from medse.utils.progress import progress as progress_bar  # a tqdm bar on a terminal, plain lines otherwise

    _check_hd95_mode(hd95_mode)
    jobs = sorted(((str(cid), None if p is None else Path(p), Path(r)) for cid, p, r in cases), key=lambda j: j[0])
    if not jobs:
        raise ValueError("evaluate_cases: no cases given")
    ids = [j[0] for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"evaluate_cases: case ids given twice: {sorted({c for c in ids if ids.count(c) > 1})}")
    pairs = [j for j in jobs if j[1] is not None]
    missing = {cid: r for cid, p, r in jobs if p is None}
    pdir = Path(pred_dir) if pred_dir is not None else _common_folder([p for _, p, _ in pairs] or [jobs[0][2]])
    ref = ref if ref is not None else _common_folder([r for _, _, r in jobs])
    if not pairs:
        raise MedseError(f"no prediction for any of the {len(jobs)} case(s)", pdir)
    out = check_writable_folder(output_dir) if output_dir is not None else None  # before any image is read
    declared = dict(declared_labels or {})
    extra = list(extra_predictions)
    if extra:
        warnings.warn(f"{len(extra)} prediction(s) in {pdir} have no reference and are not evaluated: "
                      f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}", UserWarning, stacklevel=2)
    rows: list[tuple[str, str, int, str, float]] = []
    errors: list[str] = []
    resolved = _resolve_labels(labels, declared, pdir, pairs[0][1], lambda: _values_in(pairs))
    ref_voxels: dict[int, list[int]] = {}  # label value -> [voxels over all references, cases holding it]
    pred_values: set[int] = set()
    for cid, ppath, rpath in progress_bar(jobs, desc="evaluate", unit="case", disable=not progress, file=sys.stderr):
        try:
            r = _read_label(rpath)
            for v, n in zip(*np.unique(r.array, return_counts=True), strict=True):
                acc = ref_voxels.setdefault(int(v), [0, 0])
                acc[0] += int(n)
                acc[1] += 1
            spacing = [float(s) for s in np.linalg.norm(np.asarray(r.affine)[:3, :3], axis=0)]
            if ppath is None:
                case_rows = missing_case_rows(r.array, spacing, resolved)
            else:
                p = _read_label(ppath)
                pred_values.update(int(v) for v in np.unique(p.array))
                if p.array.shape != r.array.shape or not np.allclose(p.affine, r.affine, rtol=1e-4, atol=1e-3):
                    what = "shape" if p.array.shape != r.array.shape else "affine"
                    raise MedseError(f"prediction {ppath} and reference {rpath} are on different voxel grids "
                                     f"({what}: {p.array.shape if what == 'shape' else 'differs'} vs "
                                     f"{r.array.shape if what == 'shape' else 'reference'})")
                case_rows = case_metrics(p.array, r.array, spacing, resolved, hd95_mode=hd95_mode)
            for name, value, metric, v in case_rows:
                rows.append((cid, name, value, metric, v))
        except MedseError as e:
            errors.append(f"{cid}: {e}")
    absent = {name: v for name, v in resolved.items() if v not in ref_voxels and v not in pred_values}
    if absent and not errors:
        what = ", ".join(f"{v}" + (f" ('{n}')" if n != str(v) else "") for n, v in absent.items())
        if labels is not None:
            raise MedseError(f"labels: {what} occur(s) in no reference and no prediction of the {len(jobs)} case(s); "
                             f"absent from both masks it would score Dice 1 in every case and raise the mean: "
                             f"leave it out of the labels", pdir)
        warnings.warn(f"declared label(s) {what} occur in no reference and no prediction; not scored (absent from "
                      f"both masks they would score Dice 1 in every case)", UserWarning, stacklevel=2)
        rows = [row for row in rows if row[1] not in absent]
        if len(absent) == len(resolved):
            raise MedseError("no declared foreground label occurs in any reference or prediction", pdir)
    scored = set(resolved.values())
    unscored = {v: {"voxels": n, "cases": k} for v, (n, k) in sorted(ref_voxels.items())
                if v != 0 and v not in scored}
    df = pd.DataFrame(rows, columns=COLUMNS)
    missing_ids = sorted(missing)
    if out is not None:
        with atomic_path(out / "metrics.csv") as tmp:
            df.to_csv(tmp, index=False)
        summary = summarise(df, missing=missing_ids)
        summary.update({
            "num_cases": int(df.case_id.nunique()) if not df.empty else 0,
            "num_evaluated": int(df[~df.case_id.isin(missing_ids)].case_id.nunique()) if not df.empty else 0,
            "num_missing": len(missing_ids),
            "missing_predictions": missing_ids,
            "missing_rule": "a reference without a prediction scores dice 0 and hd95/assd the worst value "
                            "(the image diagonal in mm) for every label",
            "extra_predictions": extra,
            "unscored_labels": {str(v): c for v, c in unscored.items()},
            "unscored_rule": "label values present in references but not scored; evaluate fails unless "
                             "allow_unscored (--allow-unscored-labels)",
            "errors": errors,
            "empty_rule": EMPTY_RULE,
            "hd95_mode": hd95_mode,
            "pred_dir": str(pdir),
            "ref": str(ref),
        })
        atomic_write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    if errors and strict:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MedseError(f"{len(errors)} case(s) could not be evaluated; {errors[0]}{more}")
    if unscored and not allow_unscored:
        raise MedseError(f"references hold label value(s) that are not scored: {format_unscored(unscored)}; pass "
                         f"them in labels, or allow_unscored=True (--allow-unscored-labels) to accept that", ref)
    if missing_ids and not allow_missing:
        more = " ..." if len(missing_ids) > 5 else ""
        raise MedseError(f"{len(missing_ids)} reference case(s) have no prediction ({', '.join(missing_ids[:5])}{more})"
                         f"; they are scored as failures (Dice 0) in the results; pass allow_missing=True "
                         f"(--allow-missing) to accept that", pdir)
    return df
