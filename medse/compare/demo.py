"""The one-command demo (``medse demo --output runs/demo``, what ``make demo`` runs).

It generates the synthetic phantom dataset, trains a small 3D U-Net without attention and with cSE, sSE and
scSE (Roy et al., MICCAI 2018, arXiv 1803.02579: the papers' none / cSE / sSE / scSE design), predicts and
evaluates the held-out test cases, writes the comparison table and figures, saves the sSE gate maps of the
scSE model over the example case (``medse explain``), and prints the table and where everything is.

The grid is ``pipelines/demo.yaml``, which reuses the training engineer's ``configs/demo.yaml``; the numbers
are whatever the runs produce: nothing is tuned per block. Rerunning continues an interrupted demo (finished
cells are skipped).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

if TYPE_CHECKING:
    from medse.compare.pipeline import CompareConfig

__all__ = ["default_pipeline", "run_demo"]


def default_pipeline() -> Path:
    """The shipped ``pipelines/demo.yaml`` (the checkout's, or the installed package's: :mod:`medse._shipped`)."""
    from medse._shipped import shipped_root

    path = shipped_root() / "pipelines" / "demo.yaml"
    if not path.is_file():
        raise MedseError("the shipped pipelines/demo.yaml is missing: reinstall medse, or pass --pipeline", path)
    return path


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_demo(
    output: str | os.PathLike = "runs/demo",
    *,
    pipeline: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    train_overrides: Sequence[str] = (),
    explain_maps: bool = True,
    log: Callable[[str], None] | None = print,
    retrain_stale: bool = False,
) -> dict[str, Any]:
    """Run the demo grid and print the table.

    Args:
        output: demo folder. Defaults to ``runs/demo``.
        pipeline: the grid. Defaults to ``pipelines/demo.yaml``.
        overrides: pipeline overrides (e.g. ``synthetic.n_cases=8``). Defaults to none.
        train_overrides: training overrides for every model (e.g. ``train.epochs=1`` for a quick try).
            Defaults to none.
        explain_maps: also save the gate maps of the scSE model on the example case. Defaults to True.
        log: progress lines. Defaults to ``print``.
        retrain_stale: retrain the cells made with other settings (e.g. an earlier ``-t train.epochs=1``) instead
            of refusing them. Defaults to False.

    Returns:
        summary dict (also written to ``OUT/demo_summary.json``): wall and CPU seconds, the table, outputs.
    """
    from medse.compare.cell import CELLS, Cell
    from medse.compare.pipeline import load_pipeline, run_compare

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    out = Path(output).expanduser().resolve()
    cfg = load_pipeline(pipeline or default_pipeline(), overrides)
    if cfg.synthetic is None:
        raise MedseError("the demo pipeline must have a 'synthetic' section (the demo generates its data)",
                         cfg.source)
    import shlex

    resume = ["medse", "demo", "-o", str(out), *([] if pipeline is None else ["--pipeline", str(pipeline)]),
              *overrides, *[x for t in train_overrides for x in ("-t", t)]]
    report = run_compare(cfg, out, train_overrides=train_overrides, log=say, retrain_stale=retrain_stale,
                         resume_command=" ".join(shlex.quote(str(x)) for x in resume))
    outputs = dict(report.outputs)
    if explain_maps:
        try:
            outputs.update(_explain_example(cfg, out, say))
        except (MedseError, ValueError, FileNotFoundError, ImportError) as e:
            say(f"gate maps skipped: {e}")
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    summary = {
        "output": str(out),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cells_run": report.ran,
        "cells_skipped": report.skipped,
        "cells_failed": report.failed,
        "outputs": outputs,
    }
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    say("")
    say(report.table_markdown or "(no table: no cell finished)")
    say("")
    say(f"demo finished in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU "
        f"({len(report.ran)} cells run, {len(report.skipped)} reused, {len(report.failed)} failed)")
    for key in ("table_md", "table_csv", "table_tex", "fig_boxplot", "fig_gain", "fig_overlay", "gates_montage"):
        if key in outputs:
            say(f"  {key:14s} {outputs[key]}")
    say(f"  {'cells':14s} {out / CELLS} (training runs, predictions, per-case metrics)")
    if report.failed:
        raise MedseError(f"{len(report.failed)} demo cell(s) failed: {', '.join(report.failed)}; see "
                         f"{Cell.in_grid(out, '<cell>').error_path}", out)
    return summary


def _explain_example(cfg: CompareConfig, out: Path, say: Callable[[str], None]) -> dict[str, str]:
    """Gate maps of the first spatial-gate block model (scSE in the demo) on the overlay's example case."""
    from medse.compare.cell import Cell
    from medse.compare.explain import explain, spatial_gate_blocks
    from medse.compare.figures import pick_example_case
    from medse.compare.pipeline import _dataset_of_run, grid_cells
    from medse.compare.records import load_records

    gated = set(spatial_gate_blocks())
    keys = [c for c in grid_cells(cfg) if c.block in gated]
    keys.sort(key=lambda c: (c.block != "scse",))
    for key in keys:
        cell = Cell.in_grid(out, key.cell_id)
        if not cell.finished:
            continue
        records = load_records(c.records_path for c in Cell.all_in(out) if c.finished)
        case_id = pick_example_case(records, key.arch, cfg.table.baseline, key.block, metric=cfg.table.metric)
        spec = _dataset_of_run(cell.run_dir)
        case = next(c for c in spec.cases if c.case_id == case_id)
        res = explain(cell.run_dir, case.images, out / "figures" / "gates", block_order=cfg.blocks)
        say(f"gate maps of {key.cell_id} on case {case_id}: {res.output_dir}")
        return {"gates_montage": str(res.montage), "gates_dir": str(res.output_dir)}
    raise MedseError("no finished cell with a spatial-gate block")
