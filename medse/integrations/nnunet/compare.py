"""Paired Dice-gain tables over nnU-Net's cross-validation: ``medse nnunet compare``.

For each plans identifier, :func:`compare_nnunet` reads
``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_<f>/validation/*.nii.gz`` (the
predictions nnU-Net writes for each fold's validation cases at the end of training) and re-scores exactly the
fold's validation cases of ``splits_final.json`` (other files there are listed as extra, never scored) against its reference (``$nnUNet_preprocessed/DatasetXXX_Name/gt_segmentations``, the copies nnU-Net itself
evaluates against; ``$nnUNet_raw/.../labelsTr`` as a fallback) with medse's evaluator, so Dice, HD95 and ASSD
come from one code path (:func:`medse.evaluation.evaluate`), not from nnU-Net's ``summary.json``.

Cases are paired across plans by fold (a run) and case, as in :func:`medse.compare.table.build_table`: a table
row rests only on the folds present for both it and the baseline and the cases present for every plans compared;
cases or folds missing for some plans are listed in the table header and in ``missing.json``, never dropped
silently, and the header names only the folds that contribute paired cases.
The baseline is the plans without medse attention (no ``medse`` key). Parameters are counted on the networks
nnU-Net builds from each results folder's ``plans.json``; the training-step time is taken from nnU-Net's training
logs (``Epoch time: ... s`` divided by the training iterations per epoch from ``debug.json``; the epoch time
includes that epoch's validation iterations; the first epoch of a fold is left out when a fold has more),
compared on the folds timed for both plans as paired per-fold ratios (median and range in the header).

Outputs (as ``medse compare``): ``records.csv``, ``table.{md,csv,tex,json}``,
``table_structures.{md,csv,tex,json}``, ``figures/dice_boxplot.png``, ``figures/gain.png``, ``missing.json``,
and per plans and fold the evaluator's ``metrics.csv`` / ``summary.json`` under ``evaluations/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
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
    incomplete: list[str] = field(default_factory=list)


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


def _recorded_plans(fold_dir: Path) -> dict[str, Any] | None:
    """The plans the fold was trained with, as nnU-Net recorded them at the fold's start (``debug.json``'s
    ``plans_manager``: the repr of the plans dict); None when the fold has no such record.

    The results folder's ``plans.json`` is rewritten by every fold's start, so it only tells the plans of the fold
    trained last; ``debug.json`` sits in the fold's own folder.
    """
    import ast

    try:
        text = json.loads((fold_dir / "debug.json").read_text()).get("plans_manager")
        plans = ast.literal_eval(text) if isinstance(text, str) else None
    except (OSError, ValueError, SyntaxError, TypeError, AttributeError, MemoryError, RecursionError):
        return None
    return plans if isinstance(plans, dict) else None


def _json_differences(old: Any, new: Any) -> list[str]:
    """``key old -> new`` for every (flattened) key of two JSON documents that differs (long values shortened:
    a fingerprint holds per-case lists)."""
    from medse.compare.pipeline import _differences, _flatten

    return [d if len(d) <= 160 else d[:157] + "..."
            for d in _differences({"config": _flatten(old)}, {"config": _flatten(new)})]


def _check_fresh(res_folder: Path, pre_folder: Path, plans: Sequence[str], folds: Sequence[int], *, trainer: str,
                 configuration: str) -> None:
    """Refuse (one line) folds trained with other plans than their results folder's ``plans.json`` (the plans the
    table's header names), and results trained on another dataset fingerprint than the preprocessed one.

    medse does not train nnU-Net folds itself (the user runs ``nnUNetv2_train``): a fold trained before its plans
    were re-derived would be scored under the new plans' block name, so it is refused until it is retrained (or
    left out with ``--folds``). Folds without a recorded plans (no ``debug.json``) cannot be checked and pass.
    """
    did = dataset_id(pre_folder)
    stale: list[tuple[Path, str, list[str]]] = []
    for p in plans:
        model_dir = res_folder / f"{trainer}__{p}__{configuration}"
        claimed = json.loads((model_dir / "plans.json").read_text())
        fp_used, fp_now = model_dir / "dataset_fingerprint.json", pre_folder / "dataset_fingerprint.json"
        if fp_used.is_file() and fp_now.is_file():
            try:
                diffs = _json_differences(json.loads(fp_used.read_text()), json.loads(fp_now.read_text()))
            except ValueError as e:
                raise MedseError(f"unreadable dataset fingerprint ({e})", fp_used) from None
            if diffs:
                stale.append((fp_used, f"plans {p} was trained on another dataset fingerprint than {fp_now}", diffs))
        for f in folds:
            recorded = _recorded_plans(model_dir / f"fold_{f}")
            if recorded is None:
                continue
            diffs = _json_differences(recorded, claimed)
            if diffs:
                stale.append((model_dir / f"fold_{f}" / "debug.json",
                              f"plans {p}: fold {f} was trained with other plans than {model_dir.name}/plans.json "
                              f"(the plans the table names; retrain: nnUNetv2_train {did} {configuration} {f} "
                              f"-tr {trainer} -p {p}, or leave the fold out with --folds)", diffs))
    if stale:
        where, what, diffs = stale[0]
        more = f" (and {len(stale) - 1} more stale fold(s) or plans)" if len(stale) > 1 else ""
        raise MedseError(f"{what}{more}: {'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}", where)


def _count_params(model_dir: Path, configuration: str) -> float:
    """Learnable parameters of the network nnU-Net builds from ``model_dir/plans.json`` (NaN without nnunetv2, or
    when nnU-Net cannot read the plans back)."""
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError:
        return float("nan")
    from medse.utils.complexity import count_params

    try:
        plans = json.loads((model_dir / "plans.json").read_text())
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        lm = pm.get_label_manager(dataset_json)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return float("nan")  # plans nnU-Net cannot read back: the table shows n/a for the parameters
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

    _check_fresh(res_folder, pre_folder, plans, wanted_folds, trainer=trainer, configuration=configuration)

    dataset_json = json.loads((pre_folder / "dataset.json").read_text())
    labels = _labels(dataset_json, pre_folder / "dataset.json")
    file_ending = str(dataset_json.get("file_ending", ".nii.gz"))
    refs = _references(pre_folder, pre_folder.name, raw)
    splits_path = pre_folder / "splits_final.json"
    if not splits_path.is_file():
        raise MedseError("no splits_final.json: the folds' validation cases (the only files scored) are unknown",
                         splits_path)
    try:
        splits = json.loads(splits_path.read_text())
        val_cases = {i: {str(c) for c in fold["val"]} for i, fold in enumerate(splits)}
    except (ValueError, KeyError, TypeError) as e:
        raise MedseError(f"unreadable splits_final.json ({type(e).__name__}: {e})", splits_path) from None
    beyond = [f for f in wanted_folds if f not in val_cases]
    if beyond:
        raise MedseError(f"--folds {', '.join(map(str, beyond))}: splits_final.json has {len(val_cases)} folds",
                         splits_path)

    frames = []
    missing: dict[str, Any] = {"folds": {}, "cases": {}, "extra": {}, "dropped_cases": []}
    found: dict[str, dict[int, set[str]]] = {p: {} for p in plans}
    fold_steps: dict[str, dict[int, list[float]]] = {p: {} for p in plans}
    arch = f"nnU-Net {configuration}"
    for p in plans:
        model_dir = res_folder / f"{trainer}__{p}__{configuration}"
        params = _count_params(model_dir, configuration)
        for f in wanted_folds:
            val = model_dir / f"fold_{f}" / "validation"
            files = {_case_id(x, file_ending): x for x in sorted(val.glob(f"*{file_ending}"))} if val.is_dir() else {}
            expected = val_cases[f]
            # exactly the fold's validation cases are scored; any other file there is listed, never scored
            extra = sorted(set(files) - expected)
            if extra:
                missing["extra"].setdefault(p, {})[str(f)] = extra
                say(f"{p}: fold {f}: {len(extra)} file(s) that are not validation cases of the fold, not scored: "
                    f"{', '.join(extra[:5])}")
            got = set(files) & expected
            if not got:
                missing["folds"].setdefault(p, []).append(f)
                say(f"{p}: fold {f} has no validation predictions ({val})")
                continue
            if expected - got:
                missing["cases"].setdefault(p, {})[str(f)] = sorted(expected - got)
            found[p][f] = got
            ev_dir = out / "evaluations" / p / f"fold_{f}"
            with tempfile.TemporaryDirectory(prefix=".medse-val-") as tmp:
                for cid in sorted(got):  # only the validation cases, linked into a folder of their own
                    _link(files[cid], Path(tmp) / files[cid].name)
                # the references hold every case of the dataset: score the fold's own cases (missing ones are
                # listed above, never scored as zeros here)
                df = evaluate(tmp, refs, ev_dir, labels=labels, strict=False, allow_missing=True, progress=False)
            df = df[df["case_id"].isin(got)]
            ep = epoch_times(model_dir / f"fold_{f}")
            if len(ep) > 1:
                ep = ep[1:]
            per_step = [t / _iterations_per_epoch(model_dir / f"fold_{f}") for t in ep]
            if per_step:
                fold_steps[p][f] = per_step
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
    # the folds that contribute paired cases (each case is a validation case of one fold)
    folds_used = sorted(f for f in wanted_folds if all(found[p].get(f, set()) & common for p in plans))

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "records.csv") as tmp_csv:
        records.to_csv(tmp_csv, index=False)
    notes = [
        f"nnU-Net: trainer {trainer}, configuration {configuration}; baseline plans {baseline}; "
        + "; ".join(f"{blocks[p]} = plans {p}" for p in plans if p != baseline) + ".",
        f"Paired over the {len(common)} validation cases (from splits_final.json) present for every plans (folds "
        f"{', '.join(map(str, folds_used))}; one nnU-Net run per fold, nnU-Net training is not seeded); "
        f"scores re-computed by medse's evaluator against {refs.name}/.",
        _step_note(plans, baseline, blocks, fold_steps),
    ]
    gaps = []
    for p, fl in missing["folds"].items():
        gaps.append(f"{p}: no predictions for fold(s) {', '.join(map(str, fl))}")
    for p, per_fold in missing["cases"].items():
        gaps.append(f"{p}: missing cases " + "; ".join(f"fold {f}: {', '.join(c)}" for f, c in per_fold.items()))
    if dropped:
        gaps.append(f"left out (not present for every plans): {', '.join(dropped)}")
    notes.append("Missing: " + (" | ".join(gaps) if gaps else "nothing (every requested fold and case present)")
                 + ".")
    if missing["extra"]:
        notes.append("Extra files in validation folders, not validation cases of their fold (not scored): "
                     + " | ".join(f"{p}: " + "; ".join(f"fold {f}: {', '.join(c)}" for f, c in per_fold.items())
                                  for p, per_fold in missing["extra"].items()) + ".")
    mixed = {sources[p] for p in plans}
    if len(mixed) > 1:
        notes.append(f"Note: the plans derive from different nnU-Net plans ({', '.join(sorted(mixed))}).")

    block_order = [blocks[p] for p in plans]
    common_kw = dict(baseline="none", dataset=pre_folder.name, n_boot=n_boot, block_order=block_order,
                     expected_runs=[(f, -1) for f in wanted_folds])
    outputs: dict[str, str] = {"records": str(out / "records.csv")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unmatched runs and cases: in the notes and missing.json
        table = build_table(records, **common_kw)
        st = build_table(records, structures=True, **common_kw)
    table.header["nnunet"] = {"trainer": trainer, "configuration": configuration, "plans": dict(blocks),
                              "baseline_plans": baseline, "notes": notes}
    _NNUNetTable(table, notes)
    for kind, path in table.write(out, "table").items():
        outputs[f"table_{kind}"] = str(path)
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
    missing["folds_paired"] = folds_used
    atomic_write_text(out / "missing.json", json.dumps(missing, indent=2) + "\n")
    outputs["missing"] = str(out / "missing.json")
    incomplete = [*table.incomplete(), *gaps]
    for line in incomplete:
        say(f"warning: {line}")
    return NNUNetCompareReport(output=out, outputs=outputs, table_markdown=table.to_markdown(),
                               n_cases=len(common), folds=folds_used, missing=missing,
                               incomplete=list(dict.fromkeys(incomplete)))


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _step_note(plans: Sequence[str], baseline: str, blocks: dict[str, str],
               fold_steps: dict[str, dict[int, list[float]]]) -> str:
    """Training step on the folds measured for both the baseline and each plans: the mean step time per plans over
    those folds, and the paired ratio block / baseline per fold (median and range over folds)."""
    import numpy as np

    bits = []
    base = fold_steps[baseline]
    for p in plans:
        if p == baseline:
            continue
        paired = sorted(set(base) & set(fold_steps[p]))
        if not paired:
            bits.append(f"{blocks[p]}: n/a (no fold timed for both it and {blocks[baseline]})")
            continue
        t_base = [float(np.mean(base[f])) for f in paired]
        t_mine = [float(np.mean(fold_steps[p][f])) for f in paired]
        ratios = [100.0 * (m / b - 1.0) for b, m in zip(t_base, t_mine, strict=True)]
        spread = (f", range [{min(ratios):+.1f}%, {max(ratios):+.1f}%]" if len(ratios) > 1
                  else " (one fold, no spread)")
        bits.append(f"{blocks[p]} vs {blocks[baseline]} on fold(s) {', '.join(map(str, paired))}: "
                    f"{np.mean(t_mine):.3f} s vs {np.mean(t_base):.3f} s, paired overhead median "
                    f"{float(np.median(ratios)):+.1f}%{spread}")
    return ("Training step (epoch time / training iterations, validation iterations included, first epoch left "
            "out; per fold the mean over epochs; only folds timed for both plans): " + "; ".join(bits) + ".")
