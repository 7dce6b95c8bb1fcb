"""Paired Dice-gain tables over nnU-Net's cross-validation: ``medse nnunet compare``.

For each plans identifier, :func:`compare_nnunet` reads
``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_<f>/validation/*.nii.gz`` (the
predictions nnU-Net writes for each fold's validation cases at the end of training) and re-scores every one
against its reference (``$nnUNet_preprocessed/DatasetXXX_Name/gt_segmentations``, the copies nnU-Net itself
evaluates against; ``$nnUNet_raw/.../labelsTr`` as a fallback) with medse's evaluator, so Dice, HD95 and ASSD
come from one code path (:func:`medse.evaluation.evaluate`), not from nnU-Net's ``summary.json``.

Cases are paired across plans: a table row rests only on the cases present for every plans compared; cases or
folds missing for some plans are listed in the table header and in ``missing.json``, never dropped silently.
The baseline is the plans without medse attention (no ``medse`` key). Parameters are counted on the networks
nnU-Net builds from each results folder's ``plans.json``; the training-step time is taken from nnU-Net's training
logs (``Epoch time: ... s`` divided by the training iterations per epoch from ``debug.json``; the epoch time
includes that epoch's validation iterations; the first epoch of a fold is left out when a fold has more), with
its spread over epochs stated in the header.

Outputs (as ``medse compare``): ``records.csv``, ``table.{md,csv,tex,json}``,
``table_structures.{md,csv,tex,json}``, ``figures/dice_boxplot.png``, ``figures/gain.png``, ``missing.json``,
and per plans and fold the evaluator's ``metrics.csv`` / ``summary.json`` under ``evaluations/``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medse.integrations.nnunet.plans import attention_tag, dataset_id, find_dataset
from medse.utils.atomic import atomic_path, atomic_write_text
from medse.utils.errors import MedseError

__all__ = ["NNUNetCompareReport", "compare_nnunet", "parse_folds", "epoch_times"]

_EPOCH_TIME = re.compile(r"Epoch time:\s*([0-9.]+)\s*s")


@dataclass
class NNUNetCompareReport:
    """What :func:`compare_nnunet` wrote and found."""

    output: Path
    outputs: dict[str, str]
    table_markdown: str
    n_cases: int
    folds: list[int]
    missing: dict[str, Any] = field(default_factory=dict)


def parse_folds(text: str | Sequence[int]) -> list[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; ``"0,2"`` -> ``[0, 2]``; a list is returned sorted."""
    if not isinstance(text, str):
        return sorted({int(f) for f in text})
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise MedseError(f"--folds: range '{part}' runs backwards")
            out.update(range(a, b + 1))
        elif part.isdigit():
            out.add(int(part))
        else:
            raise MedseError(f"--folds: '{part}' is not a fold number or a range such as 0-4")
    if not out:
        raise MedseError("--folds: no fold given")
    return sorted(out)


def epoch_times(fold_dir: Path) -> list[float]:
    """Epoch times (s) from the fold's ``training_log_*.txt`` files (oldest log first)."""
    times: list[float] = []
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        for line in log.read_text(errors="replace").splitlines():
            m = _EPOCH_TIME.search(line)
            if m:
                times.append(float(m.group(1)))
    return times


def _iterations_per_epoch(fold_dir: Path) -> int:
    try:
        dbg = json.loads((fold_dir / "debug.json").read_text())
        return int(dbg["num_iterations_per_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 250  # nnU-Net's default


def _count_params(model_dir: Path, configuration: str) -> float:
    """Learnable parameters of the network nnU-Net builds from ``model_dir/plans.json`` (NaN without nnunetv2)."""
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError:
        return float("nan")
    from medse.utils.complexity import count_params

    plans = json.loads((model_dir / "plans.json").read_text())
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import,
                                 determine_num_input_channels(pm, cm, dataset_json), lm.num_segmentation_heads,
                                 allow_init=False, deep_supervision=False)
    return float(count_params(net))


def _labels(dataset_json: dict[str, Any], where: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    for name, value in (dataset_json.get("labels") or {}).items():
        if isinstance(value, (list, tuple)):
            raise MedseError(f"label '{name}' is a region {value}: region-based nnU-Net training is not supported "
                             "by medse nnunet compare", where)
        labels[str(name)] = int(value)
    labels.pop("ignore", None)
    return labels


def _references(preprocessed: Path, dataset_name: str, raw: str | os.PathLike | None) -> Path:
    gt = preprocessed / "gt_segmentations"
    if gt.is_dir() and any(gt.iterdir()):
        return gt
    raw_root = Path(raw) if raw is not None else (Path(os.environ["nnUNet_raw"]) if os.environ.get("nnUNet_raw")
                                                   else None)
    if raw_root is not None and (raw_root / dataset_name / "labelsTr").is_dir():
        return raw_root / dataset_name / "labelsTr"
    raise MedseError("no reference labels: neither gt_segmentations/ here nor nnUNet_raw/<dataset>/labelsTr", gt)


def _case_id(path: Path, file_ending: str) -> str:
    return path.name[: -len(file_ending)] if path.name.endswith(file_ending) else path.name.split(".")[0]


class _NNUNetTable:
    """Wraps a :class:`medse.compare.table.ComparisonTable`, adding nnU-Net lines to its header text."""

    def __init__(self, table: Any, notes: list[str]):
        self.table = table
        self.notes = notes
        base = table.header_lines

        def header_lines() -> list[str]:
            return [*base(), *notes]

        table.header_lines = header_lines  # instance attribute: used by to_markdown / to_latex


def compare_nnunet(
    dataset: str | int,
    plans: Sequence[str],
    *,
    configuration: str = "3d_fullres",
    trainer: str = "nnUNetTrainer",
    folds: str | Sequence[int] = "0-4",
    output: str | os.PathLike | None = None,
    results: str | os.PathLike | None = None,
    preprocessed: str | os.PathLike | None = None,
    raw: str | os.PathLike | None = None,
    figures: bool = True,
    n_boot: int = 10000,
    log: Callable[[str], None] | None = None,
) -> NNUNetCompareReport:
    """Re-score nnU-Net's cross-validation predictions of several plans and write the paired comparison table.

    Args:
        dataset: dataset id or folder name.
        plans: plans identifiers; exactly one without medse attention (the baseline).
        configuration: nnU-Net configuration. Defaults to ``"3d_fullres"``.
        trainer: nnU-Net trainer class name of the runs. Defaults to ``"nnUNetTrainer"``.
        folds: folds to use (``"0-4"``, ``"0,1"`` or a list). Defaults to ``"0-4"``.
        output: output folder. Defaults to ``runs/nnunet_compare/<dataset>_<configuration>``.
        results, preprocessed, raw: nnU-Net's folders. Default to ``$nnUNet_results``, ``$nnUNet_preprocessed``,
            ``$nnUNet_raw`` (raw only as a fallback for references).
        figures: write the box plot and gain chart. Defaults to True.
        n_boot: bootstrap resamples of the CIs. Defaults to 10000.
        log: progress messages. Defaults to silent.

    Raises:
        MedseError: missing folders, no baseline (or more than one), no fold with predictions, no case shared by
            all plans.
    """
    import numpy as np
    import pandas as pd

    from medse.compare.records import cell_rows
    from medse.compare.table import build_table
    from medse.evaluation import evaluate

    say = log or (lambda _m: None)
    plans = [p.strip() for p in plans if p and p.strip()]
    if len(plans) < 2:
        raise MedseError("--plans needs at least two plans identifiers (the baseline and one with attention)")
    if len(set(plans)) != len(plans):
        raise MedseError(f"--plans lists a plans identifier twice: {', '.join(plans)}")
    pre_folder = find_dataset(dataset, preprocessed)
    res_folder = find_dataset(pre_folder.name, results, env="nnUNet_results")
    did = dataset_id(pre_folder)
    wanted_folds = parse_folds(folds)
    out = Path(output) if output is not None else Path("runs") / "nnunet_compare" / f"{pre_folder.name}_{configuration}"

    # which plans is which block
    blocks: dict[str, str] = {}
    sources: dict[str, str] = {}
    for p in plans:
        model_dir = res_folder / f"{trainer}__{p}__{configuration}"
        if not model_dir.is_dir():
            raise MedseError(f"no results of trainer '{trainer}' with plans '{p}' and configuration "
                             f"'{configuration}' (train with: nnUNetv2_train {did} {configuration} FOLD -tr {trainer} "
                             f"-p {p})", model_dir)
        pj = model_dir / "plans.json"
        if not pj.is_file():
            raise MedseError("results folder has no plans.json", model_dir)
        meta = json.loads(pj.read_text()).get("medse")
        blocks[p] = "none" if meta is None else attention_tag(meta["attention"])
        sources[p] = p if meta is None else str(meta.get("source_plans", ""))
    baselines = [p for p, b in blocks.items() if b == "none"]
    if len(baselines) != 1:
        raise MedseError(f"exactly one plans must be without medse attention (the baseline); got "
                         f"{len(baselines)}: {', '.join(baselines) or 'none'}")
    baseline = baselines[0]
    if len(set(blocks.values())) != len(blocks):
        raise MedseError(f"two plans carry the same attention: {blocks}")

    dataset_json = json.loads((pre_folder / "dataset.json").read_text())
    labels = _labels(dataset_json, pre_folder / "dataset.json")
    file_ending = str(dataset_json.get("file_ending", ".nii.gz"))
    refs = _references(pre_folder, pre_folder.name, raw)
    splits_path = pre_folder / "splits_final.json"
    splits = json.loads(splits_path.read_text()) if splits_path.is_file() else None

    frames = []
    missing: dict[str, Any] = {"folds": {}, "cases": {}, "dropped_cases": []}
    found: dict[str, dict[int, set[str]]] = {p: {} for p in plans}
    times: dict[str, list[float]] = {p: [] for p in plans}
    arch = f"nnU-Net {configuration}"
    for p in plans:
        model_dir = res_folder / f"{trainer}__{p}__{configuration}"
        params = _count_params(model_dir, configuration)
        for f in wanted_folds:
            val = model_dir / f"fold_{f}" / "validation"
            preds = sorted(val.glob(f"*{file_ending}")) if val.is_dir() else []
            if not preds:
                missing["folds"].setdefault(p, []).append(f)
                say(f"{p}: fold {f} has no validation predictions ({val})")
                continue
            expected = set(splits[f]["val"]) if splits is not None and f < len(splits) else set()
            got = {_case_id(x, file_ending) for x in preds}
            if expected - got:
                missing["cases"].setdefault(p, {})[str(f)] = sorted(expected - got)
            found[p][f] = got
            ev_dir = out / "evaluations" / p / f"fold_{f}"
            df = evaluate(val, refs, ev_dir, labels=labels, strict=False)
            ep = epoch_times(model_dir / f"fold_{f}")
            if len(ep) > 1:
                ep = ep[1:]
            per_step = [t / _iterations_per_epoch(model_dir / f"fold_{f}") for t in ep]
            times[p] += per_step
            frames.append(cell_rows(df, arch=arch, block=blocks[p], fold=f, seed=-1, params=params,
                                    train_step_s=float(np.mean(per_step)) if per_step else None,
                                    dataset=pre_folder.name))
            say(f"{p}: fold {f}: {df['case_id'].nunique()} cases evaluated")
    if not frames:
        raise MedseError(f"no fold of {', '.join(str(f) for f in wanted_folds)} has validation predictions",
                         res_folder)
    records = pd.concat(frames, ignore_index=True)

    # pair: keep only the cases evaluated for every plans
    per_plans_cases = {p: set().union(*found[p].values()) if found[p] else set() for p in plans}
    common = set.intersection(*per_plans_cases.values())
    evaluated = set(records.loc[records["case_id"] != "__run__", "case_id"])
    dropped = sorted(evaluated - common)
    for cid in dropped:
        missing["dropped_cases"].append({"case_id": cid, "missing_for": [p for p in plans
                                                                          if cid not in per_plans_cases[p]]})
    if not common:
        raise MedseError(f"no case has validation predictions for every plans ({', '.join(plans)})", res_folder)
    keep = records["case_id"].isin(common) | (records["case_id"] == "__run__")
    records = records[keep].reset_index(drop=True)
    folds_used = sorted({f for p in plans for f in found[p]})

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "records.csv") as tmp:
        records.to_csv(tmp, index=False)
    notes = [
        f"nnU-Net: trainer {trainer}, configuration {configuration}; baseline plans {baseline}; "
        + "; ".join(f"{blocks[p]} = plans {p}" for p in plans if p != baseline) + ".",
        f"Paired over the {len(common)} validation cases present for every plans (folds "
        f"{', '.join(map(str, folds_used))}; one nnU-Net run per fold, nnU-Net training is not seeded); "
        f"scores re-computed by medse's evaluator against {refs.name}/.",
    ]
    step_bits = []
    for p in plans:
        t = times[p]
        if len(t) > 1:
            step_bits.append(f"{blocks[p]} {np.mean(t):.3f} ± {np.std(t, ddof=1):.3f} s (n={len(t)} epochs)")
        elif t:
            step_bits.append(f"{blocks[p]} {t[0]:.3f} s (n=1 epoch, no spread)")
        else:
            step_bits.append(f"{blocks[p]} n/a")
    notes.append("Training step (epoch time / training iterations, validation iterations included; mean ± std "
                 "over epochs): " + "; ".join(step_bits) + ".")
    gaps = []
    for p, fl in missing["folds"].items():
        gaps.append(f"{p}: no predictions for fold(s) {', '.join(map(str, fl))}")
    for p, per_fold in missing["cases"].items():
        gaps.append(f"{p}: missing cases " + "; ".join(f"fold {f}: {', '.join(c)}" for f, c in per_fold.items()))
    if dropped:
        gaps.append(f"left out (not present for every plans): {', '.join(dropped)}")
    notes.append("Missing: " + (" | ".join(gaps) if gaps else "nothing (every requested fold and case present)")
                 + ".")
    mixed = {sources[p] for p in plans}
    if len(mixed) > 1:
        notes.append(f"Note: the plans derive from different nnU-Net plans ({', '.join(sorted(mixed))}).")

    block_order = [blocks[p] for p in plans]
    common_kw = dict(baseline="none", dataset=pre_folder.name, n_boot=n_boot, block_order=block_order)
    outputs: dict[str, str] = {"records": str(out / "records.csv")}
    table = build_table(records, **common_kw)
    table.header["nnunet"] = {"trainer": trainer, "configuration": configuration, "plans": dict(blocks),
                              "baseline_plans": baseline, "notes": notes}
    _NNUNetTable(table, notes)
    for kind, path in table.write(out, "table").items():
        outputs[f"table_{kind}"] = str(path)
    st = build_table(records, structures=True, **common_kw)
    st.header["nnunet"] = table.header["nnunet"]
    _NNUNetTable(st, notes)
    for kind, path in st.write(out, "table_structures").items():
        outputs[f"table_structures_{kind}"] = str(path)
    if figures:
        from medse.compare.figures import dice_boxplot, gain_barchart

        try:
            outputs["fig_boxplot"] = str(dice_boxplot(records, out / "figures" / "dice_boxplot.png", baseline="none"))
            outputs["fig_gain"] = str(gain_barchart(table, out / "figures" / "gain.png"))
        except MedseError as e:
            say(f"figures skipped: {e}")
    missing["n_cases_paired"] = len(common)
    atomic_write_text(out / "missing.json", json.dumps(missing, indent=2) + "\n")
    outputs["missing"] = str(out / "missing.json")
    return NNUNetCompareReport(output=out, outputs=outputs, table_markdown=table.to_markdown(),
                               n_cases=len(common), folds=folds_used, missing=missing)
