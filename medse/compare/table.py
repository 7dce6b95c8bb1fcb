"""Comparison tables (CSV, Markdown, LaTeX) computed from per-case records alone.

Reproduces the layout of the scSE papers' central table (Roy et al., MICCAI 2018, arXiv 1803.02579, Table 1;
IEEE TMI 2019, arXiv 1808.08127): architectures x {none, cSE, sSE, scSE}, mean ± std Dice, and adds what the
papers leave out: the gain over ``none`` in Dice points and %, a paired Wilcoxon signed-rank p-value over cases
(Holm-corrected across the blocks of each architecture), a bootstrap 95% CI of the mean paired difference,
and the parameter, training-step and inference-time overheads (timings only where they rise above the noise).

NOTE: not in paper — the statistics, CIs and time overheads are medse's additions.

Conventions:

* Per case, the score is the mean over the foreground labels (``label_value > 0``); a case evaluated in several
  runs (seeds) is averaged over them first, so the cases are the paired units. A case whose value is NaN for
  some label is not averaged over the others: it has no score (and becomes unmatched).
* **One paired case set per architecture** (and structure): every figure of every row of an architecture (n,
  mean, std, gain, CI, p) rests on the cases scored for *all* its blocks. Cases scored for only some blocks are
  *unmatched*: left out, listed in the header (``unmatched``) and warned about.
* Metrics (their :class:`~medse.evaluation.metrics.Metric` records): ``dice`` (higher is better, gains in Dice points = Dice x 100), ``hd95`` and
  ``assd`` (lower is better, in mm, no scaling). The gain is the improvement: ``block - baseline`` for Dice,
  ``baseline - block`` for distances, so a positive gain is always better. A structure missed entirely
  carries the evaluation's worst distance (the image diagonal, :mod:`medse.evaluation.metrics`) and is
  counted, not averaged away.
* ``std`` is the standard deviation over cases (ddof=1).
* Timings (:func:`timing_overhead`): paired relative overheads, block vs baseline on the same case and run
  (inference) or the same run (training step); the table shows the median with its IQR only with at least
  :data:`MIN_TIMING_N` measurements from at least :data:`MIN_TIMING_RUNS` paired runs (so that the noise
  between runs is measured too) and an IQR narrower than the median effect; otherwise "n/a" with the reason.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medse.compare.records import CELL_COLUMNS, run_scores, validate_records
from medse.compare.stats import bootstrap_ci, holm, relative_gain, wilcoxon_paired
from medse.evaluation.metrics import Metric, list_metrics
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["ComparisonTable", "FOREGROUND", "format_runs", "MIN_TIMING_N", "MIN_TIMING_RUNS", "TimingOverhead",
           "build_table", "timing_overhead"]

FOREGROUND = "foreground"

#: fewest paired timing measurements for an overhead to be shown
MIN_TIMING_N = 5
#: fewest paired runs (fold x seed) the timing measurements must come from
MIN_TIMING_RUNS = 2

TABLE_COLUMNS = [
    "arch", "block", "structure", "metric", "n_cases", "n_unmatched", "n_runs", "runs", "mean", "std",
    "gain", "gain_pct", "ci_low", "ci_high", "wilcoxon_stat", "p_value", "p_holm",
    "params", "param_overhead_pct",
    "train_step_s", "train_time_overhead_pct", "train_time_iqr_low", "train_time_iqr_high", "train_time_n",
    "train_time_note",
    "infer_s", "infer_time_overhead_pct", "infer_time_iqr_low", "infer_time_iqr_high", "infer_time_n",
    "infer_time_note",
]


@dataclass(frozen=True)
class TimingOverhead:
    """Paired relative timing overhead in % (see :func:`timing_overhead`); ``shown`` False -> ``note`` says why."""

    median: float
    iqr_low: float
    iqr_high: float
    n: int
    n_runs: int
    shown: bool
    note: str


def timing_overhead(pairs: Sequence[tuple[float, float]], n_runs: int, *, min_n: int = MIN_TIMING_N,
                    min_runs: int = MIN_TIMING_RUNS) -> TimingOverhead:
    """Relative overhead ``100 * (t_block / t_base - 1)`` of paired timing measurements ``(t_base, t_block)``.

    The overhead is the median over the pairs, the spread their interquartile range. It is shown only with at
    least ``min_n`` pairs from at least ``min_runs`` paired runs, and when the IQR is narrower than the absolute
    median (otherwise the number would be noise): ``shown`` is False and ``note`` says which condition failed.
    """
    import numpy as np

    arr = np.asarray([(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b) and a > 0],
                     dtype=np.float64).reshape(-1, 2)
    n = int(arr.shape[0])
    if n == 0:
        return TimingOverhead(math.nan, math.nan, math.nan, 0, n_runs, False, "n/a (not measured)")
    r = 100.0 * (arr[:, 1] / arr[:, 0] - 1.0)
    med = float(np.median(r))
    lo, hi = (float(v) for v in np.percentile(r, [25, 75]))
    if n < min_n or n_runs < min_runs:
        what = f"{n} measurement{'s' if n != 1 else ''} from {n_runs} paired run{'s' if n_runs != 1 else ''}"
        return TimingOverhead(med, lo, hi, n, n_runs, False,
                              f"n/a ({what}; needs >= {min_n} from >= {min_runs} runs)")
    if hi - lo >= abs(med):
        return TimingOverhead(med, lo, hi, n, n_runs, False, f"n/a (below noise: IQR {hi - lo:.0f}% >= effect)")
    return TimingOverhead(med, lo, hi, n, n_runs, True, "")


def _no_worst(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Worst value of a metric the registry does not know (a table header read back): none."""
    return math.nan


def _order(values: Sequence[str], preferred: Sequence[str] | None, first: str | None = None) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    if preferred:
        ordered = [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]
    else:
        ordered = seen
    if first is not None and first in ordered:
        ordered = [first] + [v for v in ordered if v != first]
    return ordered


def _overhead(value: float, base: float) -> float:
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return float("nan")
    return 100.0 * (value - base) / base


@dataclass
class ComparisonTable:
    """A comparison table: ``rows`` (one per architecture x block x structure) and a ``header`` of facts.

    ``header`` holds ``dataset, n_cases, folds, seeds, metric, baseline, confidence, n_boot, seed``.
    """

    rows: pd.DataFrame
    header: dict[str, Any] = field(default_factory=dict)

    def metric(self) -> Metric:
        """The :class:`~medse.evaluation.metrics.Metric` of ``header["metric"]`` (Dice when absent); a metric the
        registry does not know reads as higher-is-better, unscaled and without unit."""
        name = self.header.get("metric", "dice")
        return list_metrics().get(name) or Metric(name, name, higher_is_better=True, worst=_no_worst)

    # ------------------------------------------------------------------ text
    def header_lines(self) -> list[str]:
        h = self.header
        folds = ", ".join(str(f) for f in h.get("folds", [])) or "-"
        seeds = ", ".join(str(s) for s in h.get("seeds", [])) or "-"
        conf = int(round(100 * h.get("confidence", 0.95)))
        metric = self.metric()
        name, higher, unit = metric.label, metric.higher_is_better, metric.gain_unit
        scaled = " (x100)" if metric.scale == 100 else ""
        direction = f"block - baseline ({metric.direction})" if higher else f"baseline - block ({metric.direction})"
        runs_by_row = h.get("runs_by_row") or {}
        distinct = {tuple(tuple(r) for r in v) for v in runs_by_row.values()}
        if len(distinct) <= 1 and not h.get("unmatched_runs"):
            runs_text = f"runs per row: {h.get('runs_per_cell', '-')}"
            per_row = []
        else:
            runs_text = "runs per row: see below"
            per_row = ["Runs per row (a row rests only on the runs present for both it and the baseline): "
                       + "; ".join(f"{k.replace('/', ' ')}: {format_runs([tuple(r) for r in v])}"
                                   for k, v in runs_by_row.items()) + "."]
        lines = [
            f"Dataset: {h.get('dataset') or 'unnamed'}; test cases: {h.get('n_cases', 0)}; "
            f"folds: {folds}; seeds: {seeds}; {runs_text}.",
            *per_row,
            f"Metric: {name}: mean ± std over cases of the per-case foreground mean (each case averaged over the "
            f"row's runs); each row paired with the baseline on the same cases and runs (case, fold, seed); all "
            f"rows of an architecture on the same cases."
            + ("" if higher else " A structure missed entirely counts as the worst distance (the image diagonal)."),
            f"Gain over '{h.get('baseline', 'none')}': {direction}, in {unit}{scaled} and %; p: two-sided paired "
            f"Wilcoxon signed-rank over cases, Holm-corrected across the blocks of each architecture; CI: {conf}% "
            f"percentile bootstrap of the mean paired difference (B={h.get('n_boot')}, seed {h.get('seed')}).",
            f"Overheads: learnable parameters (exact); training-step and per-case inference time as the median "
            f"[IQR] of paired relative differences, shown only with >= {MIN_TIMING_N} measurements from >= "
            f"{MIN_TIMING_RUNS} paired runs and an IQR narrower than the effect, else n/a.",
        ]
        for key, what in (("unmatched_runs", "Unmatched runs, left out of the rows that lack them"),
                          ("failed_runs", "Failed or unfinished cells"),
                          ("unmatched", "Unmatched cases, left out of the paired comparison")):
            items = h.get(key) or []
            if items:
                shown = "; ".join(items[:5]) + (f"; ... ({len(items)} in all)" if len(items) > 5 else "")
                lines.append(f"{what}: {shown}.")
        return lines

    def incomplete(self) -> list[str]:
        """Everything that keeps the table from resting on the full grid: unmatched runs, failed or unfinished
        cells, unmatched cases (empty when complete)."""
        h = self.header
        return [*(h.get("unmatched_runs") or []), *(h.get("failed_runs") or []), *(h.get("unmatched") or [])]

    def _display_rows(self) -> list[dict[str, str]]:
        per_structure = self.rows["structure"].nunique() > 1
        metric = self.metric()
        name, scale, unit = metric.label, metric.scale, metric.gain_unit
        out = []
        for r in self.rows.to_dict("records"):
            is_base = r["block"] == self.header.get("baseline", "none")
            row = {"Architecture": r["arch"], "Block": r["block"]}
            if per_structure:
                row["Structure"] = r["structure"]
            row["n"] = str(int(r["n_cases"]))
            row[f"{name} (mean ± std)"] = _fmt_pm(r["mean"], r["std"], 3 if scale == 100 else 2)
            row[f"Gain ({unit})"] = "-" if is_base else _fmt_signed(r["gain"], 2)
            row["Gain (%)"] = "-" if is_base else _fmt_signed(r["gain_pct"], 1)
            conf = int(round(100 * self.header.get("confidence", 0.95)))
            row[f"{conf}% CI ({unit})"] = "-" if is_base else _fmt_ci(r["ci_low"], r["ci_high"])
            row["p (Holm)"] = "-" if is_base else _fmt_p(r["p_holm"])
            row["Params"] = _fmt_int(r["params"])
            row["Param overhead"] = "-" if is_base else _fmt_pct(r["param_overhead_pct"], 2)
            row["Train-step overhead"] = "-" if is_base else _fmt_timing(r, "train_time")
            row["Inference overhead"] = "-" if is_base else _fmt_timing(r, "infer_time")
            out.append(row)
        return out

    def to_markdown(self) -> str:
        """A Markdown table preceded by the header lines (dataset, cases, folds, seeds, methods)."""
        rows = self._display_rows()
        lines = [f"> {line}" for line in self.header_lines()]
        lines.append("")
        if not rows:
            lines.append("(no records)")
            return "\n".join(lines) + "\n"
        cols = list(rows[0])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
        for r in rows:
            lines.append("| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        """A booktabs ``table`` environment; the header lines form the caption."""
        rows = self._display_rows()
        caption = " ".join(self.header_lines())
        if not rows:
            return f"% no records\n% {caption}\n"
        cols = list(rows[0])
        spec = "ll" + "r" * (len(cols) - 2)
        lines = [
            "\\begin{table}[t]",
            "\\centering",
            "\\small",
            f"\\caption{{{_tex(caption)}}}",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            " & ".join(_tex(c) for c in cols) + " \\\\",
            "\\midrule",
        ]
        prev_arch = None
        for r in rows:
            if prev_arch is not None and r["Architecture"] != prev_arch:
                lines.append("\\midrule")
            prev_arch = r["Architecture"]
            lines.append(" & ".join(_tex(r[c]) for c in cols) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """All numeric columns (unrounded) as CSV; header facts are in ``table.json``."""
        return self.rows.to_csv(index=False)

    def write(self, out_dir: str | Path, stem: str = "table") -> dict[str, Path]:
        """Write ``<stem>.csv``, ``<stem>.md``, ``<stem>.tex`` and ``<stem>.json`` (header) atomically."""
        out_dir = Path(out_dir)
        paths = {
            "csv": atomic_write_text(out_dir / f"{stem}.csv", self.to_csv()),
            "md": atomic_write_text(out_dir / f"{stem}.md", self.to_markdown()),
            "tex": atomic_write_text(out_dir / f"{stem}.tex", self.to_latex()),
            "json": atomic_write_text(out_dir / f"{stem}.json", json.dumps(self.header, indent=2) + "\n"),
        }
        return paths


def _fmt_pm(m: float, s: float, nd: int = 3) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{nd}f} ± {s:.{nd}f}" if math.isfinite(s) else f"{m:.{nd}f}"


def _fmt_timing(r: dict[str, Any], key: str) -> str:
    note = r.get(f"{key}_note")
    if isinstance(note, str) and note:
        return note
    med, lo, hi = r[f"{key}_overhead_pct"], r[f"{key}_iqr_low"], r[f"{key}_iqr_high"]
    if not all(isinstance(v, float) and math.isfinite(v) for v in (med, lo, hi)):
        return "n/a"
    return f"{med:+.1f}% [{lo:+.1f}, {hi:+.1f}]"


def _fmt_signed(v: float, nd: int) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.{nd}f}"


def _fmt_ci(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{lo:+.2f}, {hi:+.2f}]"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_int(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{int(round(v)):,}"


def _fmt_pct(v: float, nd: int) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.{nd}f}%"


def _tex(s: str) -> str:
    rep = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
           "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\^{}", "±": "$\\pm$", "<": "$<$"}
    return "".join(rep.get(ch, ch) for ch in s)


def build_table(
    records: pd.DataFrame,
    *,
    baseline: str = "none",
    metric: str = "dice",
    structures: bool | Sequence[str] = False,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
    dataset: str | None = None,
    arch_order: Sequence[str] | None = None,
    block_order: Sequence[str] | None = None,
    expected_runs: Sequence[tuple[int, int]] | None = None,
) -> ComparisonTable:
    """Build the comparison table from per-case records (see :mod:`medse.compare.records`).

    Args:
        records: records frame (columns ``arch, block, fold, seed, case_id, label, label_value, metric, value``).
        baseline: the block every other block is compared with. Defaults to ``"none"``.
        metric: evaluation metric to tabulate, one of :func:`~medse.evaluation.metrics.list_metrics` (``dice``,
            ``hd95``, ``assd``).
            Defaults to ``"dice"``.
        structures: False for the foreground mean only; True to add one row group per foreground structure;
            or a list of label names. Defaults to False.
        confidence: bootstrap CI coverage. Defaults to 0.95.
        n_boot: bootstrap resamples. Defaults to 10000.
        seed: bootstrap seed. Defaults to 0.
        dataset: dataset name for the header. Defaults to the records' ``dataset`` column, if any.
        arch_order, block_order: display order. Defaults to first appearance, baseline first.
        expected_runs: the ``(fold, seed)`` runs every architecture x block should have (the grid); those without
            records are listed as unmatched runs. Defaults to None (the runs found in the records).

    Returns:
        :class:`ComparisonTable`; ``header["unmatched"]`` lists the cases left out of the paired sets (also
        warned about with :class:`UserWarning`).

    Raises:
        MedseError: when the metric is not tabulable or the records hold no rows of ``metric``.
    """
    import numpy as np
    import pandas as pd

    known = list_metrics()
    if metric not in known:
        raise MedseError(f"table metric '{metric}' is not one of {', '.join(known)}")
    higher, scale = known[metric].higher_is_better, known[metric].scale
    sign = 1.0 if higher else -1.0
    rec = validate_records(records)
    if dataset is None and "dataset" in rec.columns:
        names = [d for d in rec["dataset"].unique().tolist() if d]
        dataset = ", ".join(names) if names else None
    if structures is True:
        fg = rec[(rec["metric"] == metric) & (rec["label_value"] > 0)]
        struct_list: list[str | None] = [None, *sorted(fg["label"].unique(), key=lambda n: (
            int(fg.loc[fg["label"] == n, "label_value"].iloc[0]), n))]
    elif structures:
        struct_list = [None, *[str(s) for s in structures]]
    else:
        struct_list = [None]

    archs = _order(rec["arch"].tolist(), arch_order)
    blocks = _order(rec["block"].tolist(), block_order, first=baseline)
    # the runs of each cell: a (fold, seed) with per-case records of the metric; a row rests on the runs present
    # for both its block and the baseline (the baseline row: the runs it is paired on with any block)
    per_run_all = run_scores(rec, metric=metric)
    runs_of = {(a, b): set() for a in archs for b in blocks}
    for (a, b, f, s_), _ in per_run_all.groupby(CELL_COLUMNS, sort=False):
        runs_of.setdefault((a, b), set()).add((int(f), int(s_)))
    row_runs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    unmatched_runs: list[str] = []
    for arch in archs:
        base_runs = runs_of.get((arch, baseline), set())
        paired_any: set[tuple[int, int]] = set()
        for block in blocks:
            if block == baseline:
                continue
            mine = runs_of.get((arch, block), set())
            row_runs[(arch, block)] = sorted(mine & base_runs if base_runs else mine)
            paired_any |= mine & base_runs
        row_runs[(arch, baseline)] = sorted(paired_any or base_runs)
        expected = set(expected_runs) if expected_runs is not None else set()
        every_run = expected.union(*(runs_of.get((arch, b), set()) for b in blocks))
        for run in sorted(every_run):
            lacking = [b for b in blocks if run not in runs_of.get((arch, b), set())]
            if lacking:
                unmatched_runs.append(f"{arch}: run {format_runs([run])} has no records for {', '.join(lacking)}")

    has_records = set(zip(rec["arch"], rec["block"], strict=True))

    def rec_of(arch: str, block: str) -> pd.DataFrame:
        runs = set(row_runs.get((arch, block), []))
        r = rec[(rec["arch"] == arch) & (rec["block"] == block)]
        return r[[(int(f), int(s_)) in runs for f, s_ in zip(r["fold"], r["seed"], strict=True)]]

    params = {(a, b): _mean_of_runs(rec_of(a, b), "params") for a in archs for b in blocks}
    tstep = {(a, b): _mean_of_runs(rec_of(a, b), "train_step_s") for a in archs for b in blocks}
    tinf = {(a, b): _mean_of_runs(rec_of(a, b), "infer_s") for a in archs for b in blocks}
    timing = {(a, b): _timings(rec_of(a, b), rec_of(a, baseline) if baseline in blocks else rec_of(a, b))
              for a in archs for b in blocks if b != baseline}

    rows: list[dict[str, Any]] = []
    all_cases: set[str] = set()
    unmatched: list[str] = []
    for structure in struct_list:
        per_run = run_scores(rec, metric=metric, structure=structure)
        if structure is None and per_run["value"].notna().sum() == 0:
            raise MedseError(f"records hold no per-case '{metric}' values of foreground labels")
        for arch in archs:
            sa = per_run[per_run["arch"] == arch]
            # the (case, run) units: a case evaluated in a run by any block of the architecture (every case once
            # per seed; under cross-validation, in the one fold that validates it)
            present = sa.groupby(["case_id", "fold", "seed"]).size().unstack(["fold", "seed"]).notna()

            def over(block: str, runs: Sequence[tuple[int, int]], sa: pd.DataFrame = sa,
                     present: pd.DataFrame = present) -> pd.Series:
                """Per case: the mean over its units in ``runs``; no score (dropped) unless scored in every one."""
                sb = sa[sa["block"] == block]
                if sb.empty or not runs:
                    return pd.Series(dtype=float)
                cols = pd.MultiIndex.from_tuples(list(runs), names=["fold", "seed"])
                units = present.reindex(columns=cols, fill_value=False).fillna(False).astype(bool)
                wide = sb.groupby(["case_id", "fold", "seed"])["value"].mean().unstack(["fold", "seed"])
                wide = wide.reindex(index=units.index, columns=cols)
                ok = units.any(axis=1) & ~(units & wide.isna()).any(axis=1)
                return wide.where(units).mean(axis=1)[ok]

            per_block = {b: over(b, row_runs.get((arch, b), [])) for b in blocks}
            base_for = {b: over(baseline, row_runs.get((arch, b), [])) for b in blocks if b != baseline}
            scored = [b for b in blocks if not per_block[b].empty]
            sets = [set(per_block[b].index) for b in scored]
            sets += [set(base_for[b].index) for b in scored if b != baseline and baseline in scored]
            shared = sorted(set.intersection(*sets)) if sets else []
            every = sorted(set().union(*(set(per_block[b].index) for b in scored))) if scored else []
            all_cases.update(shared)
            where = arch + (f"/{structure}" if structure else "")
            for cid in every:
                if cid not in shared:
                    lacking = [b for b in scored if cid not in per_block[b].index] or [baseline]
                    unmatched.append(f"{where}: case {cid} not scored for {', '.join(lacking)}")
            arch_rows = []
            for block in blocks:
                sb = per_block[block]
                if sb.empty and (arch, block) not in has_records:
                    continue
                vals = sb.reindex(shared).to_numpy(dtype=float) if block in scored else np.array([])
                runs = row_runs.get((arch, block), [])
                row: dict[str, Any] = {
                    "arch": arch, "block": block, "structure": structure or FOREGROUND, "metric": metric,
                    "n_cases": int(vals.size), "n_unmatched": int(len(sb) - vals.size),
                    "n_runs": len(runs), "runs": format_runs(runs),
                    "mean": float(vals.mean()) if vals.size else float("nan"),
                    "std": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
                }
                if block != baseline and baseline in scored and vals.size > 0:
                    x = base_for[block].reindex(shared).to_numpy(dtype=float)
                    y = vals
                    w = wilcoxon_paired(x, y)
                    d = sign * (y - x)  # improvement: positive is better for every metric
                    lo, hi = bootstrap_ci(d, confidence=confidence, n_boot=n_boot, seed=seed)
                    row.update(
                        gain=scale * float(d.mean()),
                        gain_pct=sign * relative_gain(float(x.mean()), float(y.mean())),
                        ci_low=scale * lo, ci_high=scale * hi,
                        wilcoxon_stat=w.statistic, p_value=w.pvalue,
                    )
                elif block == baseline:
                    row.update(gain=0.0, gain_pct=0.0)
                p_b = params.get((arch, baseline), float("nan"))
                row.update(
                    params=params.get((arch, block), float("nan")),
                    param_overhead_pct=_overhead(params.get((arch, block), float("nan")), p_b),
                    train_step_s=tstep.get((arch, block), float("nan")),
                    infer_s=tinf.get((arch, block), float("nan")),
                )
                if block != baseline:
                    for key, t in zip(("train_time", "infer_time"), timing[(arch, block)], strict=True):
                        row.update({f"{key}_overhead_pct": t.median, f"{key}_iqr_low": t.iqr_low,
                                    f"{key}_iqr_high": t.iqr_high, f"{key}_n": t.n,
                                    f"{key}_note": "" if t.shown else t.note})
                arch_rows.append(row)
            pv = [r.get("p_value", float("nan")) if r["block"] != baseline else float("nan") for r in arch_rows]
            for r, p in zip(arch_rows, holm(pv), strict=True):
                r["p_holm"] = float(p)
            rows.extend(arch_rows)

    df = pd.DataFrame(rows)
    for c in TABLE_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    df = df[TABLE_COLUMNS]
    for c in ("train_time_note", "infer_time_note", "runs"):
        df[c] = df[c].fillna("").astype(str)
    if unmatched:
        warnings.warn(f"{len(unmatched)} case(s) left out of the paired comparison (not scored for every block): "
                      f"{'; '.join(unmatched[:3])}{' ...' if len(unmatched) > 3 else ''}", UserWarning, stacklevel=2)
    if unmatched_runs:
        warnings.warn(f"{len(unmatched_runs)} run(s) not present for every block, left out of the rows that lack "
                      f"them: {'; '.join(unmatched_runs[:3])}{' ...' if len(unmatched_runs) > 3 else ''}",
                      UserWarning, stacklevel=2)
    n_runs = {len(r) for k, r in row_runs.items() if k in has_records}
    header = {
        "dataset": dataset,
        "n_cases": len(all_cases),
        # the folds and seeds of the runs the rows rest on (unmatched runs are listed in "unmatched_runs")
        "folds": sorted({int(f) for k, r in row_runs.items() if k in has_records for f, _ in r if f >= 0}),
        "seeds": sorted({int(s_) for k, r in row_runs.items() if k in has_records for _, s_ in r if s_ >= 0}),
        "runs_per_cell": max(n_runs) if n_runs else 0,
        "runs_by_row": {f"{a}/{b}": [list(r) for r in row_runs[(a, b)]] for a in archs for b in blocks
                        if (a, b) in has_records and (a, b) in row_runs},
        "unmatched_runs": unmatched_runs,
        "metric": metric,
        "higher_is_better": higher,
        "gain_unit": known[metric].gain_unit,
        "baseline": baseline,
        "confidence": confidence,
        "n_boot": n_boot,
        "seed": seed,
        "architectures": archs,
        "blocks": blocks,
        "unmatched": unmatched,
        "timing_rule": {"min_measurements": MIN_TIMING_N, "min_runs": MIN_TIMING_RUNS,
                        "shown_when": "IQR of the paired relative differences < |median|"},
    }
    return ComparisonTable(rows=df, header=header)


def _mean_of_runs(r: pd.DataFrame, metric: str) -> float:
    """Mean of a run-level or per-case measurement: within each run first, then over the runs."""
    r = r[r["metric"] == metric]
    if r.empty:
        return float("nan")
    return float(r.groupby(["fold", "seed"])["value"].mean().mean())


def format_runs(runs: Sequence[tuple[int, int]]) -> str:
    """``[(-1, 0), (-1, 1)]`` -> ``"seeds 0, 1"``; ``[(0, 0), (1, 0)]`` -> ``"folds 0, 1 x seed 0"``; otherwise each
    run as ``fold f/seed s`` (fold -1, the config's own split, is not named). ``"none"`` for no run."""
    runs = sorted({(int(f), int(s)) for f, s in runs})
    if not runs:
        return "none"
    folds = sorted({f for f, _ in runs})
    seeds = sorted({s for _, s in runs})

    def part(word: str, values: list[int]) -> str:
        return f"{word}{'s' if len(values) > 1 else ''} {', '.join(map(str, values))}"

    if len(runs) == len(folds) * len(seeds):
        bits = ([part("fold", folds)] if folds != [-1] else []) + ([part("seed", seeds)] if seeds != [-1] else [])
        return " x ".join(bits) or "1 run"
    return ", ".join("/".join(([f"fold {f}"] if f >= 0 else []) + ([f"seed {s}"] if s >= 0 else [])) for f, s in runs)


def _timings(mine: pd.DataFrame, base: pd.DataFrame) -> tuple[TimingOverhead, TimingOverhead]:
    """Paired training-step (per run) and inference (per case and run) overheads of ``mine`` over ``base``."""

    def paired(metric: str, by: list[str]) -> tuple[list[tuple[float, float]], int]:
        a = base[base["metric"] == metric].groupby(by)["value"].mean()
        b = mine[mine["metric"] == metric].groupby(by)["value"].mean()
        common = a.index.intersection(b.index)
        pairs = [(float(a.loc[i]), float(b.loc[i])) for i in common]
        return pairs, len({tuple(i)[:2] for i in common})

    train_pairs, train_runs = paired("train_step_s", ["fold", "seed"])
    infer_pairs, infer_runs = paired("infer_s", ["fold", "seed", "case_id"])
    return timing_overhead(train_pairs, train_runs), timing_overhead(infer_pairs, infer_runs)
