"""Spread and verdicts of benchmark measurements: one rule for every benchmark script (issue 21).

A measurement repeated in interleaved rounds is a sample, not a number: its median says where it sits, its
25-75% range how far one round can move it. A target is decided only when the whole range is on one side of it:

* ``met``: the 75th percentile meets the target (for an upper bound, q75 <= target);
* ``missed``: even the 25th percentile fails it (q25 > target);
* ``not decided``: the range straddles the target (more rounds, or a quieter machine, may decide it).

For a lower bound (``higher_is_better``, e.g. a speed-up of at least 2x) the roles of the quartiles swap.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MET, MISSED, UNDECIDED = "met", "missed", "not decided"


@dataclass(frozen=True)
class Spread:
    median: float
    q25: float
    q75: float
    n: int

    def range_text(self, fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(self.q25)} .. {fmt.format(self.q75)}"


def spread(samples: Sequence[float]) -> Spread:
    """Median and 25th/75th percentiles (inclusive method: the quartiles of n rounds lie within their range)."""
    v = [float(s) for s in samples]
    if not v:
        raise ValueError("no samples")
    if len(v) == 1:
        return Spread(v[0], v[0], v[0], 1)
    q = statistics.quantiles(v, n=4, method="inclusive")
    return Spread(statistics.median(v), q[0], q[2], len(v))


def verdict(samples: Sequence[float] | Spread, target: float, higher_is_better: bool = False) -> str:
    """``met``, ``missed`` or ``not decided`` for the rounds ``samples`` against ``target`` (see the module)."""
    s = samples if isinstance(samples, Spread) else spread(samples)
    if higher_is_better:
        if s.q25 >= target:
            return MET
        return MISSED if s.q75 < target else UNDECIDED
    if s.q75 <= target:
        return MET
    return MISSED if s.q25 > target else UNDECIDED


def verdict_cell(samples: Sequence[float] | Spread, target: float, higher_is_better: bool = False,
                 fmt: str = "{:.2f}") -> str:
    """The verdict with the target it was judged against, e.g. ``met (<= 2.50)``: a table cell a script writes."""
    op = ">=" if higher_is_better else "<="
    return f"{verdict(samples, target, higher_is_better)} ({op} {fmt.format(target)})"
